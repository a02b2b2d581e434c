"""The docs' screenshots: the web page on a live Serve app, and the evaluation's report.html, in headless Chromium.

    python bench/screenshots.py runs/tiny   # docs/img/web-page.png, report-html.png, report-html-examples.png

Serves ``<output_dir>`` locally (``lm_lexicon.serving.local.serve_local``, auth off), defines one term with four
alternatives and their reward-model scores, runs a small batch, and takes the page; then opens
``<output_dir>/evaluate/report.html``. Needs Debian's chromium + chromium-driver (``make browser-deps``).
"""
from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the Chromium set-up the browser tests use
sys.path.insert(0, str(REPO / "platform"))

from browser import chromium_driver  # noqa: E402

TERM = ("bank", "they pulled the canoe up on the bank of the river")
BATCH = ["serendipity", "harbor | the ship stayed in the harbor overnight", "ledger | she wrote the sum in the ledger",
         "thunder", "to borrow | can I borrow your pen?"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(driver, predicate, timeout: float = 300):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout, poll_frequency=0.3).until(lambda d: predicate(d))


def _full_page(driver, path: Path, width: int, max_height: int) -> None:
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(width, min(height + 120, max_height))
    time.sleep(0.3)
    driver.save_screenshot(str(path))
    print(f"wrote {path} ({width} x {min(height + 120, max_height)})")


def page_screenshot(driver, url: str, path: Path) -> None:
    from selenium.webdriver.common.by import By

    find = lambda element_id: driver.find_element(By.ID, element_id)  # noqa: E731
    driver.get(url)
    _wait(driver, lambda d: "domain experts" in find("model-info").text)
    find("term").send_keys(TERM[0])
    find("context").send_keys(TERM[1])
    find("n").clear()
    find("n").send_keys("4")
    find("scores").click()
    find("define-button").click()
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#alternatives tbody tr"))
    driver.execute_script("document.getElementById('batch-text').value = arguments[0]", "\n".join(BATCH))
    find("batch-button").click()
    _wait(driver, lambda d: "rows defined" in find("batch-status").text)
    driver.execute_script("window.scrollTo(0, 0)")
    _full_page(driver, path, 1100, 2600)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path, help="a finished pipeline run (e.g. runs/tiny)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img", help="where the PNGs go")
    parser.add_argument("--report-height", type=int, default=1800, help="the report's screenshot is cut here (px)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.output_dir.resolve() / "evaluate" / "report.html"
    if not report.is_file():
        print(f"{report}: missing (run the pipeline's evaluate stage)", file=sys.stderr)
        return 2

    from ray import serve

    from lm_lexicon.serving.local import serve_local

    port = _free_port()
    url = serve_local(args.output_dir, port=port, overrides={"auth_token_env": None}, block=False,
                      log=lambda m: print(m))
    driver = chromium_driver(width=1100, height=1000)
    try:
        page_screenshot(driver, url + "/", args.out / "web-page.png")
        driver.set_window_size(1100, 1000)
        driver.get(report.as_uri())
        _full_page(driver, args.out / "report-html.png", 1100, args.report_height)
        driver.set_window_size(1100, 1000)
        driver.execute_script("document.getElementById('examples').scrollIntoView()")
        driver.save_screenshot(str(args.out / "report-html-examples.png"))
        print(f"wrote {args.out / 'report-html-examples.png'}")
    finally:
        driver.quit()
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
