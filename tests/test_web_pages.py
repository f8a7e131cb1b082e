"""Every public page in a real headless Chromium, at phone and desktop widths.

The app is served by uvicorn on an ephemeral port (as in ``test_web_browser``); each page is
opened at 390 px, where nothing may scroll sideways, and photographed there and at 1280 px
into ``shots``. The archived issue's sign-up box is used as a reader would: type an address,
press the button, land on the sign-up page with the address filled in.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from mailer.subscribers.tokens import Purpose, make_token
from tests.browser import DESKTOP, PHONE, page_at
from tests.factories import ALERTS, BASE_CONFIG, SECRET, make_settings, make_subscriber
from tests.served import at, serve
from tests.test_web import make_issue

pytestmark = pytest.mark.browser

LONG_TITLE = "Supercalifragilisticexpialidocious-road-closure-announcement-for-Holcomb-Boulevard"


@dataclass(frozen=True)
class Site:
    """The served app and the paths of one page of each kind."""

    url: str
    paths: dict[str, str]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path) -> Iterator[Site]:
    """The app with two digests, three archived weekly issues and one alert, and a pending,
    an active reader whose links the pages need."""
    database = tmp_path_factory.mktemp("pages") / "mailer.db"
    shutil.copy(sqlite_template, database)
    url = f"sqlite:///{database}"
    digests = [BASE_CONFIG["digests"][0], ALERTS]
    with serve(lambda base: make_settings(url, digests=digests, **at(base))) as (
        server,
        engine,
        _settings,
    ):
        yield Site(server.url, _pages(engine))


def _pages(engine: sa.Engine) -> dict[str, str]:
    """Three archived weekly issues and one alert, a pending and an active reader;
    the path of each page to look at."""
    issues = [
        make_issue(engine, status="sent", days_ago=days, title=title)
        for days, title in ((21, "Gate 5 closed"), (14, LONG_TITLE), (7, "Air show Saturday"))
    ]
    make_issue(engine, status="sent", days_ago=3, title="Storm warning", digest="alerts")
    pending = make_subscriber(engine, email="pending@example.org", status="pending")
    active = make_subscriber(engine, email="a.very.long.address.for.testing@example.org")

    def link(purpose: Purpose, uid: str) -> str:
        return make_token(SECRET.encode(), purpose, uid)

    paths = {
        "signup": "/",
        "privacy": "/privacy",
        "archive": "/archive",
        "archived-issue": f"/archive/{issues[1]}",
        "embed": "/embed",
        "confirm": "/confirm/" + link(Purpose.CONFIRM, pending.uid),
        "preferences": "/preferences/" + link(Purpose.PREFERENCES, active.uid),
        "unsubscribe": "/unsubscribe/" + link(Purpose.UNSUBSCRIBE, active.uid),
    }
    return paths


# Every element with text of its own: its colour against the first opaque background behind
# it (WCAG 2.1 relative luminance); below AA (4.5:1, or 3:1 for large text) it is listed.
LOW_CONTRAST_JS = """() => {
  const rgb = (c) => (c.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => {
    const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const background = (el) => {
    for (let e = el; e; e = e.parentElement) {
      const c = rgb(getComputedStyle(e).backgroundColor);
      if (c.length === 3 || c[3] === 1) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const low = [];
  for (const el of document.body.querySelectorAll("*")) {
    const own = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
    const box = el.getBoundingClientRect();
    if (!own || box.width <= 1 || box.height <= 1) continue;
    const style = getComputedStyle(el);
    if (style.visibility === "hidden") continue;
    const a = lum(rgb(style.color)), b = lum(background(el));
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    const size = parseFloat(style.fontSize), bold = parseInt(style.fontWeight, 10) >= 700;
    const needed = size >= 24 || (bold && size >= 18.66) ? 3 : 4.5;
    const text = el.textContent.trim().slice(0, 30);
    if (ratio < needed) low.push(`${el.tagName} "${text}" ${ratio.toFixed(2)}`);
  }
  return low;
}"""


def watch(page: Any) -> list[str]:
    """The page's console errors and CSP reports, as they happen."""
    seen: list[str] = []
    page.on(
        "console",
        lambda m: (
            seen.append(f"{m.text} at {m.location.get('url', '')}") if m.type == "error" else None
        ),
    )
    page.on("pageerror", lambda error: seen.append(f"pageerror: {error}"))
    return seen


@pytest.mark.parametrize(
    "name",
    [
        "signup",
        "privacy",
        "archive",
        "archived-issue",
        "embed",
        "confirm",
        "preferences",
        "unsubscribe",
    ],
)
def test_every_public_page_fits_a_phone_and_is_photographed(
    browser: Any, site: Site, shots: Path, name: str
) -> None:
    for viewport in (PHONE, DESKTOP):
        page = page_at(browser, viewport)
        try:
            errors = watch(page)
            response = page.goto(site.url + site.paths[name])
            assert response is not None and response.status == 200, name
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= viewport["width"], f"{name} scrolls sideways at {viewport}: {width}"
            assert page.locator("h1").count() == 1, name
            assert page.evaluate("document.documentElement.lang") == "en"
            assert page.evaluate(LOW_CONTRAST_JS) == [], name
            # Nothing the CSP refused, nothing broken (the browser's own favicon try aside).
            assert [e for e in errors if not e.endswith("/favicon.ico")] == [], name
            page.screenshot(path=shots / f"page-{name}-{viewport['width']}.png", full_page=True)
        finally:
            page.context.close()


def test_the_archived_issue_sign_up_box_opens_the_sign_up_page_with_the_address(
    browser: Any, site: Site, shots: Path
) -> None:
    page = page_at(browser, PHONE)
    try:
        errors = watch(page)
        page.goto(site.url + site.paths["archived-issue"])
        page.get_by_label("Your email address").fill("reader@example.org")
        page.screenshot(path=shots / "page-archived-issue-signup-box.png", full_page=True)
        page.get_by_role("button", name="Sign up").click()
        page.wait_for_url(site.url + "/?email=reader%40example.org")
        assert page.locator("h1").inner_text().startswith("Get ")
        assert page.input_value("#email") == "reader@example.org"
        assert errors == []
    finally:
        page.context.close()


def test_the_archived_issue_bar_walks_the_digest(browser: Any, site: Site) -> None:
    page = page_at(browser, DESKTOP)
    try:
        page.goto(site.url + site.paths["archived-issue"])
        page.click("a[rel=next]")
        page.wait_for_selector("text=Air show Saturday")
        assert page.locator("a[rel=next]").count() == 0  # the newest weekly issue
        page.click("a[rel=prev]")
        page.click("a[rel=prev]")
        page.wait_for_selector("text=Gate 5 closed")
        assert page.locator("a[rel=prev]").count() == 0  # the first weekly issue
        page.click("text=All past issues")
        page.wait_for_selector("h1:text('Past issues')")
        page.click("a.chip:text('Base alerts')")
        page.wait_for_selector("text=Alerts: Storm warning")
        assert page.locator(".issue").count() == 1
    finally:
        page.context.close()


def test_focus_is_visible_on_the_pages(browser: Any, site: Site) -> None:
    """Tabbing from the top reaches the skip link, then the masthead, each with an outline."""
    page = page_at(browser, PHONE)
    try:
        page.goto(site.url + "/archive")
        for expected in ("skip", "brand"):
            page.keyboard.press("Tab")
            focused = page.evaluate(
                "() => { const e = document.activeElement; const s = getComputedStyle(e);"
                " return [e.className, s.outlineStyle, s.outlineWidth]; }"
            )
            assert focused[0] == expected and focused[1] == "solid" and focused[2] == "3px"
    finally:
        page.context.close()
