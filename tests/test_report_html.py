"""report.html (lm_lexicon.report_html): every table of the markdown report, the plots embedded, the example rows;
one self-contained file. The browser check of a real one is in tests/test_browser.py (slow)."""
from __future__ import annotations

import base64
from html.parser import HTMLParser
from pathlib import Path

from lm_lexicon.report_html import markdown_to_html, render_report_html, write_report_html

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
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


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


def test_the_page_has_every_section_with_settings_last_and_example_rows(tmp_path):
    (tmp_path / "bon.png").write_bytes(PNG)
    (tmp_path / "metrics.png").write_bytes(PNG)
    path = write_report_html(tmp_path, REPORT, _predictions(), [(tmp_path / "metrics.png", "Headline metrics"),
                                                                (tmp_path / "missing.png", "not there")])
    html = path.read_text()
    parsed = _parse(html)
    headings = [text for text in parsed.text if text in ("Best-of-N (moe)", "Plots", "Example rows",
                                                         "Metric settings")]
    assert headings == ["Best-of-N (moe)", "Plots", "Example rows", "Metric settings"]
    assert sum(1 for t, _ in parsed.tags if t == "img") == 2  # bon.png and metrics.png; the missing one is left out
    assert "http" not in html.replace("http-equiv", "")  # nothing to fetch
    header = html[html.index('class="examples"'):]
    for text in ("<th scope=\"col\">term</th>", "<th scope=\"col\">gold</th>", "<th scope=\"col\">constant</th>",
                 "<th scope=\"col\">moe</th>", "the &lt;river&gt; bank", "sloping land", "a thing", "money lent"):
        assert text in header, text
    assert header.count("<tr>") == 3  # the header row and two examples
    assert render_report_html(REPORT, tmp_path, {}).count("Example rows") == 0
    assert Path(path).name == "report.html"
