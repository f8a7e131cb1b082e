"""A real headless Chromium for the tests that look at pages and mail (Playwright for Python).

Debian's chromium is used (``playwright install`` cannot download a browser here); without it
a test asking for ``browser`` is skipped, unless ``MAILER_REQUIRE_BROWSER=1`` makes that a
failure. Screenshots go to ``$MAILER_SCREENSHOTS`` when it is set (kept after the run), else to
the test's tmp dir. The fixtures reach every test module through ``tests/conftest.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
REQUIRE = os.environ.get("MAILER_REQUIRE_BROWSER") == "1"
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PHONE = {"width": 390, "height": 844}
# The width most mail clients give a message column (and the width mail is designed for).
MAIL_COLUMN = {"width": 600, "height": 900}
DESKTOP = {"width": 1280, "height": 800}


def _playwright() -> Any:
    """Playwright's sync API, or a skip (a failure under ``MAILER_REQUIRE_BROWSER=1``)."""
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)"
        if REQUIRE:
            raise RuntimeError(reason + " (MAILER_REQUIRE_BROWSER=1)")
        pytest.skip(reason)
    if REQUIRE:
        import playwright.sync_api as sync_api

        return sync_api
    return pytest.importorskip("playwright.sync_api", reason="Playwright for Python is missing")


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where screenshots go: ``$MAILER_SCREENSHOTS`` if set, else the test's tmp dir."""
    directory = Path(os.environ.get("MAILER_SCREENSHOTS") or tmp_path / "screenshots")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One Chromium for the module (starting it is most of a test's time)."""
    with _playwright().sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context (no cookies, no cache) at phone size."""
    context = browser.new_context(viewport=PHONE, device_scale_factor=1)
    context.set_default_timeout(10_000)
    yield context.new_page()
    context.close()


def page_at(browser: Any, viewport: dict[str, int], *, javascript: bool = True) -> Any:
    """A fresh context at ``viewport``; close it with ``page.context.close()``."""
    context = browser.new_context(
        viewport=viewport, device_scale_factor=1, java_script_enabled=javascript
    )
    context.set_default_timeout(10_000)
    return context.new_page()


def fits(page: Any) -> bool:
    """Nothing on the page is wider than the window (no sideways scrolling)."""
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))
