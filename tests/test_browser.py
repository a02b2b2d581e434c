"""The web page and the HTML report in a real browser: headless Chromium (Debian's, `make browser-deps`) driven by
Selenium, against a live Serve app on the micro pipeline's output (the session's ``micro_run``).

The served directory is a copy of the micro run's ``export/`` and ``evaluate/`` plus a 1-layer MiniLM reward model
with an untrained head (the micro recipe skips Best-of-N), so that alternatives come with reward-model scores.
The tests run in file order on one browser tab: auth off first, then the app is redeployed with a token (only the
ingress changes) and the page must ask for it. Slow: the micro pipeline and the Serve app take a few minutes.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from browser import chromium_driver

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # serve_app/ lives at the repository root
    sys.path.insert(0, str(REPO))

pytestmark = [pytest.mark.slow, pytest.mark.ray]
APP = "lexicon-browser-test"
HOST = "127.0.0.1"
TOKEN = "s3cret-token"
WAIT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_dir(micro_run, tmp_path_factory):
    from lm_lexicon.evaluate.best_of_n.reward import RewardModel

    root = tmp_path_factory.mktemp("browser_serve") / "run"
    src = micro_run["out"]
    for part in ("export", "evaluate"):
        shutil.copytree(src / part, root / part, ignore=shutil.ignore_patterns("reward_model"))
    RewardModel.from_encoder("bundled-minilm", num_hidden_layers=1, max_length=64, seed=0).save(
        root / "evaluate" / "reward_model")
    return root


def _args(served_dir: Path, **extra) -> dict:
    zero = {"num_cpus": 0}
    return {"output_dir": str(served_dir), "app_name": APP, "ingress": zero, "router": zero, "scorer": zero,
            "expert": {**zero, "max_batch_size": 8, "max_ongoing_requests": 16},
            "generation": {"max_new_tokens": 8}, "limits": {"max_items": 8, "max_n": 4},
            "auth_token_env": None, **extra}


@pytest.fixture(scope="module")
def server(ray_local, served_dir):
    from ray import serve

    from serve_app.app import build_app

    port = _free_port()
    serve.start(http_options={"host": HOST, "port": port})
    try:
        serve.run(build_app(_args(served_dir)), name=APP, route_prefix="/")
        yield {"url": f"http://{HOST}:{port}/", "redeploy": lambda **kw: serve.run(
            build_app(_args(served_dir, **kw)), name=APP, route_prefix="/")}
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def driver(downloads):
    d = chromium_driver(width=1200, height=1000, download_dir=downloads)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def page(driver, server):
    driver.get(server["url"])
    _wait_text(driver, "model-info", "domain experts")
    return driver


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """Screenshots go here, and also to $LM_LEXICON_SCREENSHOT_DIR when set (bench/screenshots.py does the docs)."""
    return tmp_path_factory.mktemp("screenshots")


# =================================================================================================== helpers
def _by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def _wait(driver, predicate, what: str, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: predicate(d), message=what)


def _wait_text(driver, element_id: str, needle: str, timeout: float = WAIT_S) -> str:
    _wait(driver, lambda d: needle in _by_id(d, element_id).text, f"#{element_id} to contain {needle!r}", timeout)
    return _by_id(driver, element_id).text


def _api_define(server, items: list[dict], token: str | None = None, **kw) -> list[dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.post(server["url"] + "v1/definitions", json={"items": items, **kw}, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["definitions"]


def _set(driver, element_id: str, value: str) -> None:
    el = _by_id(driver, element_id)
    el.clear()
    if value:
        el.send_keys(value)


def _screenshot(driver, shots: Path, name: str) -> Path:
    """The whole page (the window grows to the document's height), as PNG."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    width = driver.get_window_size()["width"]
    driver.set_window_size(width, max(600, min(int(height) + 120, 4000)))
    path = shots / name
    driver.save_screenshot(str(path))
    target = os.environ.get("LM_LEXICON_SCREENSHOT_DIR")
    if target:
        shutil.copy(path, Path(target) / name)
    driver.set_window_size(width, 1000)
    return path


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


# =================================================================================================== the page
def test_the_page_loads_the_model_card_and_its_limits(page):
    from selenium.webdriver.support.ui import Select

    info = _by_id(page, "model-info").text
    assert APP in info and "2 domain experts" in info and "reward model on" in info
    assert [o.text for o in Select(_by_id(page, "lang")).options] == ["en", "es", "fr", "pt", "de"]
    assert _by_id(page, "n").get_attribute("max") == "4"
    assert not _by_id(page, "token-panel").is_displayed()  # auth is off: no token asked
    # offline: every resource the page loaded came from this server
    urls = page.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(f"http://{HOST}") for u in urls), urls


def test_every_control_has_a_label_and_the_keyboard_reaches_them_in_order(page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    unlabelled = page.execute_script(
        "return [...document.querySelectorAll('input, select, textarea')]"
        ".filter(e => !e.labels || e.labels.length === 0).map(e => e.id)")
    assert unlabelled == []
    page.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")
    order = []
    for _ in range(10):
        ActionChains(page).send_keys(Keys.TAB).perform()
        order.append(page.execute_script("return document.activeElement.id || document.activeElement.className"))
    assert order == ["skip", "term", "context", "lang", "n", "scores", "define-button", "batch-text", "batch-file",
                     "batch-button"]


CONTRAST_JS = """
const lum = (c) => { const v = c.match(/[\\d.]+/g).slice(0, 3).map(Number).map(x => x / 255)
  .map(x => x <= 0.03928 ? x / 12.92 : Math.pow((x + 0.055) / 1.055, 2.4));
  return 0.2126 * v[0] + 0.7152 * v[1] + 0.0722 * v[2]; };
const bg = (el) => { for (; el; el = el.parentElement) { const c = getComputedStyle(el).backgroundColor;
  if (c && c !== 'transparent' && !/rgba\\(.*, 0\\)$/.test(c)) return c; } return 'rgb(255, 255, 255)'; };
return [...document.querySelectorAll(arguments[0])].filter(e => e.offsetParent !== null).map(e => {
  const a = lum(getComputedStyle(e).color), b = lum(bg(e));
  return [e.tagName + '#' + e.id + '.' + e.className, (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05)]; });
"""


def test_text_contrast_meets_wcag_aa(page):
    ratios = page.execute_script(CONTRAST_JS, "h1, h2, p, label, button, .hint, .muted, footer, a, input, select")
    assert len(ratios) > 15
    low = [(name, round(r, 2)) for name, r in ratios if r < 4.5]
    assert low == [], low


def test_define_one_word_with_the_keyboard(page, server):
    from selenium.webdriver.common.keys import Keys

    _set(page, "term", "bank")
    _set(page, "context", "they sat on the bank of the river")
    _by_id(page, "term").send_keys(Keys.ENTER)  # Enter in the term field submits the form
    _wait(page, lambda d: _by_id(d, "definition").text.strip(), "a definition")
    expected = _api_define(server, [{"term": "bank", "context": "they sat on the bank of the river"}])[0]
    assert _by_id(page, "definition").text == (expected["definition"] or "(empty definition)")
    assert _by_id(page, "domain").text == str(expected["domain"])
    assert "greedy decoding" in _by_id(page, "define-result").text
    assert _by_id(page, "define-error").text == ""


def test_alternatives_come_with_their_reward_model_scores(page):
    _set(page, "n", "3")
    if not _by_id(page, "scores").is_selected():
        _by_id(page, "scores").click()
    _by_id(page, "define-button").click()
    _wait(page, lambda d: d.find_elements("css selector", "#alternatives tbody tr"), "the alternatives table")
    rows = [[td.text for td in tr.find_elements("css selector", "td")]
            for tr in page.find_elements("css selector", "#alternatives tbody tr")]
    assert len(rows) == 3 and [r[0] for r in rows] == ["1", "2", "3"]
    assert all(re.fullmatch(r"-?\d+\.\d{3}", r[2]) for r in rows), rows
    chosen = [r for r in rows if r[3] == "chosen"]
    assert chosen and chosen[0][1] == _by_id(page, "definition").text
    assert max(float(r[2]) for r in rows) == float(chosen[0][2])  # the best-scored sample is the one shown
    assert "picked by the reward model" in _by_id(page, "define-result").text


def test_an_empty_term_and_a_server_rejection_are_shown_in_the_page(page):
    _set(page, "term", "   ")
    _by_id(page, "define-button").click()
    assert _wait_text(page, "define-error", "Enter a term to define.")
    assert page.execute_script("return document.activeElement.id") == "term"  # focus goes to the field to fix
    # the server's validation message, shown as it is (a control character in the context)
    _set(page, "term", "bell")
    _set(page, "n", "1")
    page.execute_script("document.getElementById('context').value = 'ring the bell\\u0007'")
    _by_id(page, "define-button").click()
    text = _wait_text(page, "define-error", "control character")
    assert "items[0].context" in text and "422 validation_error" in text
    assert _by_id(page, "define-error").get_attribute("role") == "alert"


def test_a_batch_of_pasted_lines_gives_a_table_to_download(page, server, downloads):
    _set(page, "context", "")
    lines = ["bank | she sat on the bank of the river", "tree", "", "loan\ta loan with high interest", "engine"]
    page.execute_script("document.getElementById('batch-text').value = arguments[0]", "\n".join(lines))
    _by_id(page, "batch-button").click()
    status = _wait_text(page, "batch-status", "rows defined")
    assert status == "4 of 4 rows defined."
    table = [[td.text for td in tr.find_elements("css selector", "td")]
             for tr in page.find_elements("css selector", "#batch-table tbody tr")]
    items = [{"term": "bank", "context": "she sat on the bank of the river"}, {"term": "tree", "context": ""},
             {"term": "loan", "context": "a loan with high interest"}, {"term": "engine", "context": ""}]
    expected = _api_define(server, [{**it, "lang": "en"} for it in items])
    assert [r[0] for r in table] == ["1", "2", "4", "5"]  # input line numbers
    assert [r[1] for r in table] == [it["term"] for it in items]
    assert [r[3] for r in table] == [e["definition"] for e in expected]
    assert [r[4] for r in table] == [str(e["domain"]) for e in expected]

    _by_id(page, "batch-download").click()
    target = downloads / "definitions.csv"
    _wait(page, lambda d: target.is_file() and target.stat().st_size > 0, "the CSV download", timeout=30)
    rows = list(csv.DictReader(target.open(encoding="utf-8")))
    assert [r["term"] for r in rows] == ["bank", "tree", "loan", "engine"]
    assert [r["definition"] for r in rows] == [e["definition"] for e in expected]
    assert {r["status"] for r in rows} == {"ok"} and rows[0]["context"] == "she sat on the bank of the river"
    target.unlink()


def test_an_uploaded_csv_defines_the_good_rows_and_lists_the_rejected_ones(page, tmp_path):
    src = tmp_path / "terms.csv"
    with src.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerows([["term", "context", "lang"], ["river", "", "en"], ["", "no term here", "en"],
                     ["perro", "", "xx"], ["cloud", "a grey cloud, low", ""]])
    page.execute_script("document.getElementById('batch-text').value = ''")
    _by_id(page, "batch-file").send_keys(str(src))
    _by_id(page, "batch-button").click()
    status = _wait_text(page, "batch-status", "rows defined")
    assert status.startswith("2 of 4 rows defined, 2 rejected")
    defined = [tr.find_elements("css selector", "td")[1].text
               for tr in page.find_elements("css selector", "#batch-table tbody tr")]
    rejected = [[td.text for td in tr.find_elements("css selector", "td")]
                for tr in page.find_elements("css selector", "#batch-rejected tbody tr")]
    assert defined == ["river", "cloud"]
    assert rejected[0] == ["3", "", "missing or empty term"]  # CSV lines count the header
    assert rejected[1][:2] == ["4", "perro"] and "unknown language 'xx'" in rejected[1][2]
    assert _by_id(page, "batch-error").text == ""


def test_screenshot_of_the_page(page, shots):
    path = _screenshot(page, shots, "web-page.png")
    width, height = _png_size(path)
    assert width >= 1000 and height > 1000


def test_with_auth_on_the_page_asks_for_the_token(page, server):
    from selenium.webdriver.common.keys import Keys

    server["redeploy"](auth_token=TOKEN)
    deadline = time.time() + 60
    while time.time() < deadline and httpx.get(server["url"] + "v1/model").status_code != 401:
        time.sleep(0.5)
    page.get(server["url"])
    _wait(page, lambda d: _by_id(d, "token-panel").is_displayed(), "the token panel")
    assert _by_id(page, "model-info").text == "This server needs an API token."
    assert page.execute_script("return document.activeElement.id") == "token"

    _by_id(page, "token").send_keys("wrong" + Keys.ENTER)
    error = _wait_text(page, "token-error", "refused")
    assert "401 unauthorized" in error and _by_id(page, "token-panel").is_displayed()

    _by_id(page, "token").send_keys(TOKEN + Keys.ENTER)
    _wait(page, lambda d: not _by_id(d, "token-panel").is_displayed(), "the token to be accepted")
    assert _by_id(page, "token-status").is_displayed() and "domain experts" in _by_id(page, "model-info").text
    _set(page, "term", "tree")
    _set(page, "n", "1")
    page.execute_script("document.getElementById('context').value = ''")
    _by_id(page, "define-button").click()
    _wait(page, lambda d: _by_id(d, "definition").text.strip() and "greedy" in _by_id(d, "define-result").text,
          "a definition with the token")
    expected = _api_define(server, [{"term": "tree", "context": ""}], token=TOKEN)[0]
    assert _by_id(page, "definition").text == (expected["definition"] or "(empty definition)")

    _by_id(page, "token-forget").click()
    _wait(page, lambda d: _by_id(d, "token-panel").is_displayed(), "the token panel after forgetting the token")
    assert page.execute_script("return sessionStorage.getItem('lm-lexicon-token')") is None


# =================================================================================================== the report
def test_report_html_is_self_contained_and_complete(driver, micro_run, shots):
    report = micro_run["out"] / "evaluate" / "report.html"
    driver.get(report.as_uri())
    _wait(driver, lambda d: d.execute_script("return document.readyState") == "complete", "the report")
    assert driver.title.startswith("Evaluation: tiny on test (6 rows")
    headings = [h.text for h in driver.find_elements("css selector", "h2")]
    assert headings == ["Plots", "Against the constant floor", "By domain (Protocol A BLEU / ROUGE-L)",
                        "Example rows", "Metric settings"]
    assert [a.get_attribute("hash") for a in driver.find_elements("css selector", "nav a")] == \
        ["#" + h.get_attribute("id") for h in driver.find_elements("css selector", "h2")]
    first = [[c.text for c in tr.find_elements("css selector", "th, td")]
             for tr in driver.find_elements("css selector", "table")[0].find_elements("css selector", "tr")]
    metrics = json.loads((micro_run["out"] / "evaluate" / "metrics.json").read_text())["results"]
    assert first[0] == ["model", *metrics["constant"]] and [r[0] for r in first[1:]] == list(metrics)
    assert first[2][1].startswith(f"{metrics['moe']['bleu_a']['value']:.2f}")
    images = driver.execute_script(
        "return [...document.images].map(i => [i.currentSrc.slice(0, 22), i.complete && i.naturalWidth])")
    assert len(images) == 2 and all(src == "data:image/png;base64," and w > 100 for src, w in images), images
    examples = driver.find_elements("css selector", "table.example")
    moe = [json.loads(line) for line in (micro_run["out"] / "evaluate" / "predictions" / "moe.jsonl").open()]
    assert [e.find_element("css selector", "caption .term").text for e in examples] == [p["term"] for p in moe]
    rows = [[th.text for th in e.find_elements("css selector", "th")] for e in examples]
    assert rows == [["gold", "constant", "moe"]] * 6
    assert [e.find_elements("css selector", "td")[2].text for e in examples] == [p["prediction"].strip() for p in moe]
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0  # nothing fetched
    path = _screenshot(driver, shots, "report-html.png")
    assert _png_size(path)[1] > 1000
