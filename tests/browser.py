"""Headless Chromium for the tests, through Debian's `chromium` and `chromium-driver` (installed
by scripts/browser_local.sh, which scripts/test.sh runs) and the `selenium` library.

Without a browser the tests that need one skip, saying why; with ``GRADPROJ_BROWSER_REQUIRED=1``
(CI, see .ci/run) they fail instead, so that they never skip there.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# Flags that work in containers and offline: no sandbox (root), no GPU, no network side traffic.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")  # fmt: skip


def missing_browser() -> str | None:
    """Why no browser can be driven here, or None."""
    for program in ("chromium", "chromedriver"):
        if shutil.which(program) is None:
            return f"{program} is not installed (scripts/browser_local.sh installs it)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (pip install -r requirements.txt)"
    return None


def start_chromium(width: int = 1400, height: int = 900):
    """A headless Chromium WebDriver with a fresh, empty profile; quit() it when done."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='gradproj-chromium-')}")
    options.add_argument(f"--window-size={width},{height}")
    # the Debian driver, never a download by selenium-manager
    service = Service(executable_path=shutil.which("chromedriver"))
    return webdriver.Chrome(options=options, service=service)


@pytest.fixture(scope="session")
def chromium():
    reason = missing_browser()
    if reason:
        if os.environ.get("GRADPROJ_BROWSER_REQUIRED") == "1":
            pytest.fail(f"GRADPROJ_BROWSER_REQUIRED=1, but {reason}")
        pytest.skip(reason)
    driver = start_chromium()
    yield driver
    driver.quit()
