"""The evaluation report as one self-contained HTML page (``evaluate/report.html``): open it in any browser, mail it,
attach it to a ticket; it needs no other file and no network.

It holds every table of ``report.md`` (the markdown is the single source of the tables: this module renders the
small markdown subset the evaluate stage writes, so the two reports cannot disagree), the plots embedded as PNG data
URIs (``metrics.png``, ``bon.png``, the partition's ``clusters.png``) and a table of example rows: term, context,
gold definition and each model's prediction. Order: title, contents, the results table, the plots, the report's
other sections, the example rows, the metric settings.

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
SETTINGS_HEADING = "## Metric settings"  # shown last, after the example rows
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
th { background: #eef1f5; } td.num, th.num { text-align: right; white-space: nowrap; } tbody tr:nth-child(even) { background: #f8f9fb; }
caption { text-align: left; font-weight: 600; padding: .2rem 0; }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, monospace; background: #f3f3f3; padding: 0 .2rem;
       word-break: break-word; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { color: #444; font-size: .9rem; }
table.example { width: 100%; margin: 1rem 0; } table.example caption { font-weight: 400; }
table.example th { width: 11rem; white-space: nowrap; font-weight: 600; } table.example td { overflow-wrap: anywhere; }
table.example tr.gold td { font-weight: 600; } .term { font-weight: 700; } .context { color: #444; }
td:first-child { white-space: nowrap; }
.scroll { overflow-x: auto; }
nav p { margin: 0 0 1rem; color: #333; } nav a { color: #0b4fb3; }
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
            text = line[level:].strip()
            anchor = f' id="{_slug(text)}"' if level == 2 else ""  # the table of contents links the sections
            out.append(f"<h{level}{anchor}>{_inline(text)}</h{level}>")
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
    """The first ``n`` evaluated rows (every model predicted the same rows in the same order), one small table each:
    the term and its context as the caption, then the gold definition and every model's prediction (a row per model
    reads better than a column per model once there are more than a few)."""
    models = [m for m, rows in predictions.items() if rows]
    if not models:
        return ""
    first = predictions[models[0]]
    shown = min(n, len(first))
    blocks = []
    for k in range(shown):
        row = first[k]
        context = str(row.get("context") or "")
        caption = f'<span class="term">{html.escape(str(row.get("term") or ""))}</span>' + (
            f' <span class="context">“{html.escape(context)}”</span>' if context else "")
        cells = [f'<tr class="gold"><th scope="row">gold</th><td>{html.escape(str(row.get("reference") or ""))}'
                 "</td></tr>"]
        for m in models:
            pred = predictions[m][k].get("prediction") if k < len(predictions[m]) else None
            cells.append(f'<tr><th scope="row">{html.escape(m)}</th><td>{html.escape(str(pred or ""))}</td></tr>')
        blocks.append(f'<table class="example"><caption>{k + 1}. {caption}</caption><tbody>{"".join(cells)}'
                      "</tbody></table>")
    return (f'<h2 id="examples">Example rows</h2><p>The first {shown} of {len(first)} evaluated rows: the term, '
            f"its context, the gold definition and each model's prediction (all rows in "
            f"<code>predictions/&lt;model&gt;.jsonl</code>).</p>" + "".join(blocks))


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"


def render_report_html(markdown: str, image_dir: Path, predictions: dict[str, Sequence[dict]],
                       extra_plots: Sequence[tuple[Path, str]] = (), n_examples: int = EXAMPLE_ROWS) -> str:
    """The whole page: the title, a table of contents, the report's results table, ``extra_plots`` ((png, caption)
    pairs, embedded), the report's other sections, the example rows, and the report's metric settings last."""
    head, *sections = re.split(r"(?m)^(?=## )", markdown)
    lines = head.splitlines()
    title = lines[0].lstrip("#").strip() if lines and lines[0].startswith("# ") else "Evaluation report"
    body = "\n".join(lines[1:] if lines and lines[0].startswith("# ") else lines)
    settings = [sec for sec in sections if sec.startswith(SETTINGS_HEADING)]
    others = [sec for sec in sections if not sec.startswith(SETTINGS_HEADING)]
    plots = "".join(_figure(path, caption, caption) for path, caption in extra_plots if Path(path).is_file())
    examples = examples_table(predictions, n_examples)
    parts = [markdown_to_html(body, image_dir)]
    toc = []
    if plots:
        parts.append(f'<h2 id="plots">Plots</h2>{plots}')
        toc.append(("plots", "Plots"))
    for sec in others + (["EXAMPLES"] if examples else []) + settings:
        if sec == "EXAMPLES":
            parts.append(examples)
            toc.append(("examples", "Example rows"))
            continue
        heading = sec.splitlines()[0][3:].strip()
        parts.append(markdown_to_html(sec, image_dir))
        toc.append((_slug(heading), heading))
    nav = ('<nav aria-label="Contents"><p>' + " · ".join(f'<a href="#{i}">{html.escape(t)}</a>' for i, t in toc)
           + "</p></nav>") if toc else ""
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body><main>\n"
            f"<h1>{_inline(title)}</h1>{nav}\n" + "\n".join(parts) + "\n</main></body></html>\n")


def write_report_html(stage_dir: Path, markdown: str, predictions: dict[str, Sequence[dict]],
                      extra_plots: Sequence[tuple[Path, str]] = ()) -> Path:
    """``stage_dir/report.html`` (see :func:`render_report_html`); images are read from ``stage_dir``."""
    path = Path(stage_dir) / "report.html"
    path.write_text(render_report_html(markdown, Path(stage_dir), predictions, extra_plots), encoding="utf-8")
    return path
