"""Headless Chromium for the browser tests (tests/test_browser.py) and bench/screenshots.py.

Debian's ``chromium`` and ``chromium-driver`` (``make browser-deps`` installs them), driven by Selenium from pip:
Playwright's and Selenium Manager's browser downloads cannot work offline, so the driver is given both paths.
Chromium on a closed network needs its background services off, or its connections (even to 127.0.0.1) are refused.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1")
INSTALL = ("the browser tests need Debian's chromium and chromium-driver: `make browser-deps` (as root: apt-get "
           "install chromium chromium-driver), and selenium (pip install -e '.[dev]')")


def find_chromium() -> tuple[str, str]:
    """``(browser, driver)`` paths; a RuntimeError saying how to install them when either is missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        raise RuntimeError(INSTALL)
    return browser, driver


def chromium_driver(width: int = 1280, height: int = 1000, download_dir: Optional[Path] = None):
    """A Selenium WebDriver on a new, empty Chromium profile (removed by the caller's ``quit()``: it lives under
    the system temp dir)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        raise RuntimeError(INSTALL) from e
    browser, driver = find_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*FLAGS, f"--user-data-dir={tempfile.mkdtemp(prefix='lmlx-chromium-')}",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    if download_dir is not None:
        options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                                  "download.prompt_for_download": False})
    return webdriver.Chrome(service=Service(driver), options=options)
