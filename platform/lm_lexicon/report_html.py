"""The evaluation report as one self-contained HTML page (``evaluate/report.html``): open it in any browser, mail it,
attach it to a ticket; it needs no other file and no network.

It holds every table of ``report.md`` (the markdown is the single source of the tables: this module renders the
small markdown subset the evaluate stage writes, so the two reports cannot disagree), the plots embedded as PNG data
URIs (``metrics.png``, ``bon.png``, the partition's ``clusters.png``) and a table of example rows: term, context,
gold definition and each model's prediction.

Markdown subset: ``#``/``##`` headings, pipe tables (``|---:|`` right-aligns), ``- `` lists, paragraphs, ``**bold**``,
```code```, and ``![alt](file.png)`` on a line of its own. Everything is HTML-escaped first.
"""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Optional, Sequence

EXAMPLE_ROWS = 20
SETTINGS_HEADING = "## Metric settings"  # the report's last section: shown after the plots and examples
_IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)\s]+)\)$")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")

STYLE = """
:root { color-scheme: light; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1a1a1a; background: #fff;
       margin: 0 auto; max-width: 72rem; padding: 1.5rem; }
h1 { font-size: 1.6rem; margin: 0 0 1rem; } h2 { font-size: 1.25rem; margin: 2rem 0 .6rem;
  border-bottom: 1px solid #d0d0d0; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: .6rem 0 1rem; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #c8c8c8; padding: .3rem .55rem; vertical-align: top; text-align: left; }
th { background: #eef1f5; } td.num, th.num { text-align: right; } tbody tr:nth-child(even) { background: #f8f9fb; }
caption { text-align: left; font-weight: 600; padding: .2rem 0; }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, monospace; background: #f3f3f3; padding: 0 .2rem;
       word-break: break-word; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { color: #444; font-size: .9rem; }
.examples td { max-width: 22rem; } .examples td.term { font-weight: 600; white-space: nowrap; }
.scroll { overflow-x: auto; }
"""


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    out = _CODE.sub(lambda m: f"<code>{m.group(1)}</code>", out)
    return _BOLD.sub(lambda m: f"<strong>{m.group(1)}</strong>", out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(lines: list[str]) -> str:
    header, aligns, rows = _cells(lines[0]), _cells(lines[1]), [_cells(line) for line in lines[2:]]
    right = [a.endswith(":") for a in aligns] + [False] * len(header)
    head = "".join(f'<th scope="col"{" class=num" if right[i] else ""}>{_inline(h)}</th>'
                   for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td{" class=num" if right[i] else ""}>{_inline(c)}</td>'
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def data_uri(path: Path) -> Optional[str]:
    """A PNG as a ``data:`` URI (None when the file is missing)."""
    try:
        return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
    except OSError:
        return None


def _figure(path: Path, alt: str, caption: Optional[str] = None) -> str:
    uri = data_uri(path)
    if uri is None:
        return f"<p>(plot {html.escape(path.name)} is missing)</p>"
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{uri}" alt="{html.escape(alt)}">{cap}</figure>'


def markdown_to_html(markdown: str, image_dir: Path) -> str:
    """The report's markdown subset (module docstring) as HTML; images are read from ``image_dir`` and embedded."""
    out: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line.strip():
            i += 1
        elif line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")), 6)
            out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
            i += 1
        elif line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|-"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            out.append(_table(block))
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
        elif _IMAGE.match(line.strip()):
            alt, src = _IMAGE.match(line.strip()).groups()
            out.append(_figure(image_dir / Path(src).name, alt or src))
            i += 1
        else:
            para = [line.strip()]  # the first line always (a stray "|" or "![" line is text)
            i += 1
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(("#", "|", "- ", "![")):
                para.append(lines[i].strip())
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(out)


def examples_table(predictions: dict[str, Sequence[dict]], n: int = EXAMPLE_ROWS) -> str:
    """Term, context, gold and every model's prediction for the first ``n`` evaluated rows (every model predicted
    the same rows in the same order)."""
    models = [m for m, rows in predictions.items() if rows]
    if not models:
        return ""
    first = predictions[models[0]]
    shown = min(n, len(first))
    head = "".join(f'<th scope="col">{html.escape(h)}</th>' for h in ("term", "context", "gold", *models))
    body = []
    for k in range(shown):
        row = first[k]
        cells = [f'<td class="term">{html.escape(str(row.get("term") or ""))}</td>',
                 f'<td>{html.escape(str(row.get("context") or ""))}</td>',
                 f'<td>{html.escape(str(row.get("reference") or ""))}</td>']
        for m in models:
            pred = predictions[m][k].get("prediction") if k < len(predictions[m]) else None
            cells.append(f"<td>{html.escape(str(pred or ''))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<h2 id="examples">Example rows</h2><p>The first {shown} of {len(first)} evaluated rows (all in '
            f"<code>predictions/&lt;model&gt;.jsonl</code>).</p>"
            f'<div class="scroll"><table class="examples"><caption>Gold definitions and each model\'s prediction'
            f"</caption><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")


def render_report_html(markdown: str, image_dir: Path, predictions: dict[str, Sequence[dict]],
                       extra_plots: Sequence[tuple[Path, str]] = (), n_examples: int = EXAMPLE_ROWS) -> str:
    """The whole page: the markdown report's tables, then ``extra_plots`` ((png, caption) pairs, embedded) and the
    example rows, then the report's metric settings."""
    title = next((line.lstrip("#").strip() for line in markdown.splitlines() if line.startswith("# ")),
                 "Evaluation report")
    sections = re.split(r"(?m)^(?=## )", markdown)
    settings = "".join(sec for sec in sections if sec.startswith(SETTINGS_HEADING))
    results = "".join(sec for sec in sections if not sec.startswith(SETTINGS_HEADING))
    plots = "".join(_figure(path, caption, caption) for path, caption in extra_plots if Path(path).is_file())
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body><main>\n"
            f"{markdown_to_html(results, image_dir)}\n"
            + (f'<h2 id="plots">Plots</h2>{plots}' if plots else "")
            + examples_table(predictions, n_examples) + "\n"
            + markdown_to_html(settings, image_dir) + "\n</main></body></html>\n")


def write_report_html(stage_dir: Path, markdown: str, predictions: dict[str, Sequence[dict]],
                      extra_plots: Sequence[tuple[Path, str]] = ()) -> Path:
    """``stage_dir/report.html`` (see :func:`render_report_html`); images are read from ``stage_dir``."""
    path = Path(stage_dir) / "report.html"
    path.write_text(render_report_html(markdown, Path(stage_dir), predictions, extra_plots), encoding="utf-8")
    return path
