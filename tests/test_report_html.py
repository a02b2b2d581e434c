"""report.html (lm_lexicon.evaluate.report_html): every table of the markdown report, the plots embedded, the example
rows; one self-contained file. The browser check of a real one is in tests/test_browser.py (slow)."""
from __future__ import annotations

import base64
from html.parser import HTMLParser
from pathlib import Path

from lm_lexicon.evaluate.report_html import markdown_to_html, render_report_html, write_report_html

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
REPORT = """# Evaluation: demo on test (2 rows, seed 0)

Intro with **bold** and `code` and <script>alert(1)</script>.

| model | bleu_a | note |
|---|---:|---|
| moe | 12.50 ± 1.00 | **best** |
| a <b>tag</b> | 3.00 | x |

## Metric settings

- **bleu_a**: `{"protocol": "A"}`

## Best-of-N (moe)

| N | reward model |
|---:|---:|
| 1 | 10.00 |

![BoN curve](bon.png)
| a stray pipe line
"""


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.h2: list[str] = []
        self.links: list[str] = []
        self.open: tuple[str, dict] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.open = (tag, dict(attrs))

    def handle_endtag(self, tag):
        self.open = None

    def handle_data(self, data):
        tag, attrs = self.open or ("", {})
        if tag == "h2":
            self.h2.append(data)
        elif tag == "a" and attrs.get("href", "").startswith("#"):
            self.links.append(attrs["href"])


def _parse(html: str) -> _Tags:
    p = _Tags()
    p.feed(html)
    return p


def _predictions() -> dict:
    rows = [{"term": "bank", "context": "the <river> bank", "reference": "sloping land", "prediction": "land"},
            {"term": "loan", "context": "", "reference": "money lent", "prediction": "money"}]
    return {"constant": [dict(r, prediction="a thing") for r in rows], "moe": rows}


def test_markdown_subset_becomes_escaped_html_tables(tmp_path):
    (tmp_path / "bon.png").write_bytes(PNG)
    html = markdown_to_html(REPORT, tmp_path)
    assert "<script>" not in html and "&lt;script&gt;" in html and "a &lt;b&gt;tag&lt;/b&gt;" in html
    assert "<strong>bold</strong>" in html and "<code>code</code>" in html
    tags = _parse(html).tags
    assert [t for t, _ in tags].count("table") == 2
    cells = [a.get("class") for t, a in tags if t in ("th", "td")]
    assert cells[:3] == [None, "num", None]  # |---:| right-aligns its column
    images = [a for t, a in tags if t == "img"]
    assert len(images) == 1 and images[0]["src"] == "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert "| a stray pipe line" in html  # text, not a table (and no endless loop)


def test_the_page_has_contents_every_section_and_example_rows(tmp_path):
    (tmp_path / "bon.png").write_bytes(PNG)
    (tmp_path / "metrics.png").write_bytes(PNG)
    path = write_report_html(tmp_path, REPORT, _predictions(), [(tmp_path / "metrics.png", "Headline metrics"),
                                                                (tmp_path / "missing.png", "not there")])
    html = path.read_text()
    parsed = _parse(html)
    assert parsed.h2 == ["Plots", "Best-of-N (moe)", "Example rows", "Metric settings"]
    ids = [a["id"] for t, a in parsed.tags if t == "h2"]
    assert parsed.links == [f"#{i}" for i in ids]  # the contents link every section
    assert sum(1 for t, _ in parsed.tags if t == "img") == 2  # bon.png and metrics.png; the missing one is left out
    assert "http" not in html.replace("http-equiv", "")  # nothing to fetch
    examples = html[html.index('id="examples"'):html.index('id="metric-settings"')]
    assert examples.count('<table class="example">') == 2
    first = examples[:examples.index("</table>")]
    for text in ('<span class="term">bank</span>', "“the &lt;river&gt; bank”", '<th scope="row">gold</th><td>sloping land',
                 '<th scope="row">constant</th><td>a thing', '<th scope="row">moe</th><td>land'):
        assert text in first, text
    assert "“" not in examples[examples.index("</table>"):]  # no context, no quotes
    assert render_report_html(REPORT, tmp_path, {}).count("Example rows") == 0
    assert Path(path).name == "report.html"
