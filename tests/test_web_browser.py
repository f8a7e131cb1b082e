"""End to end in a real headless Chromium: the app served by uvicorn, mail to a real aiosmtpd.

Sign up on the page → the confirmation mail arrives → follow its link → active; then a digest
→ follow its unsubscribe link → press the button → unsubscribed; and RFC 8058 one-click POSTs
(urlencoded and multipart) over real HTTP. Every page is photographed into
``$MAILER_SCREENSHOTS`` (default: the test's tmp dir), at phone size.

Debian's chromium is used (``playwright install`` cannot download a browser here); without it
the module is skipped, unless ``MAILER_REQUIRE_BROWSER=1`` makes that a failure.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, cast

import pytest
import sqlalchemy as sa

from mailer.compose.messages import DigestComposer
from mailer.compose.rendering import Renderer
from mailer.db.schema import subscribers as subscriber_table
from mailer.delivery.policy import Outcome
from mailer.delivery.pool import SmtpPool
from mailer.issues.progress import load_content
from mailer.models import Recipient
from mailer.subscribers.tokens import Purpose, make_token
from mailer.web.pages import Pages
from mailer.web.server import ServerThread
from tests.browser import PHONE
from tests.factories import NOW, SECRET, make_settings, make_subscriber
from tests.served import at, serve
from tests.smtp_server import FaultServer, smtp_server  # noqa: F401
from tests.test_web import make_issue

pytestmark = pytest.mark.browser


@pytest.fixture
def site(
    tmp_path: Path,
    sqlite_template: Path,
    smtp_server: FaultServer,  # noqa: F811
) -> Iterator[tuple[ServerThread, sa.Engine, Any]]:
    """The app on 127.0.0.1 and an ephemeral port, its base_url that very address."""
    database = tmp_path / "mailer.db"
    shutil.copy(sqlite_template, database)
    url = f"sqlite:///{database}"
    with serve(lambda base: make_settings(url, smtp__port=smtp_server.port, **at(base))) as site:
        yield site


def status_of(engine: sa.Engine, email: str) -> str | None:
    with engine.connect() as conn:
        status: str | None = conn.scalar(
            sa.select(subscriber_table.c.status).where(subscriber_table.c.email == email)
        )
    return status


def text_part(data: bytes) -> str:
    message = cast(EmailMessage, message_from_bytes(data, policy=policy.default))
    body = message.get_body(preferencelist=("plain",))
    assert body is not None
    return str(body.get_content())


def send_digest(settings: Any, engine: sa.Engine, email: str) -> None:
    """One real digest for ``email``, built by the composer and sent over SMTP."""
    issue_id = make_issue(engine, status="sent", days_ago=1, title="Gate 5 closed")
    with engine.connect() as conn:
        content = load_content(conn, issue_id, settings)
        uid = conn.scalar(
            sa.select(subscriber_table.c.uid).where(subscriber_table.c.email == email)
        )
    recipient = Recipient(email, "", uid, f"<weekly.{issue_id}.{uid}@news.example.org>")
    data = DigestComposer(settings, content, renderer=Renderer()).message(
        recipient, settings.topic_keys, NOW
    )
    assert data is not None

    async def send() -> Outcome:
        async with SmtpPool(settings.smtp, local_hostname="client.test") as pool:
            return (await pool.send("digest@news.example.org", email, data)).outcome

    # Playwright's sync API runs an event loop in this thread: send from another one.
    with ThreadPoolExecutor(1) as executor:
        assert executor.submit(lambda: asyncio.run(send())).result() is Outcome.SENT


def test_sign_up_confirm_and_unsubscribe_in_a_real_browser(
    site: tuple[ServerThread, sa.Engine, Any],
    page: Any,
    smtp_server: FaultServer,  # noqa: F811
    shots: Path,
) -> None:
    server, engine, settings = site
    email = "browser@example.org"

    page.goto(server.url + "/")
    assert page.title() == "Get Camp Lejeune & New River Updates"
    page.screenshot(path=shots / "01-signup.png", full_page=True)

    # Submitting without the consent box shows the server's errors (the box's `required`
    # is removed first: the browser would otherwise refuse to submit at all).
    page.fill("#email", email)
    page.check("#topic-base-alerts")
    page.check("#topic-local-events")
    page.check("#digest-weekly")
    page.locator("#consent").evaluate("e => e.removeAttribute('required')")
    page.click("button[type=submit]")
    assert page.locator(".error-summary").is_visible()
    assert "Tick the box to agree" in page.inner_text(".error-summary")
    page.screenshot(path=shots / "02-signup-error.png", full_page=True)
    assert status_of(engine, email) is None

    page.check("#consent")
    page.click("button[type=submit]")
    page.wait_for_selector("text=Check your inbox")
    page.screenshot(path=shots / "03-check-inbox.png", full_page=True)
    assert status_of(engine, email) == "pending"

    [received] = smtp_server.received_for(email)
    link = re.search(r"http://127\.0\.0\.1:\d+/confirm/\S+", text_part(received.data))
    assert link and link.group(0).startswith(server.url)
    page.goto(link.group(0))
    page.wait_for_selector("h1:text('Confirm your subscription')")
    assert status_of(engine, email) == "pending"  # opening the link changes nothing
    page.click("button:text('Confirm my subscription')")
    page.wait_for_selector("text=Your subscription is confirmed")
    page.screenshot(path=shots / "04-welcome.png", full_page=True)
    assert status_of(engine, email) == "active"

    page.click("text=Manage your preferences")
    page.wait_for_selector("h1:text('Your preferences')")
    page.screenshot(path=shots / "05-preferences.png", full_page=True)
    page.click("text=Delete my data")
    page.wait_for_selector("h1:text('Delete your data?')")
    page.screenshot(path=shots / "06-delete-confirm.png", full_page=True)

    send_digest(settings, engine, email)
    digest = smtp_server.received_for(email)[-1]
    unsubscribe = re.search(r"http://127\.0\.0\.1:\d+/unsubscribe/\S+", text_part(digest.data))
    assert unsubscribe
    page.goto(unsubscribe.group(0))
    page.wait_for_selector("h1:text('Unsubscribe from')")
    page.screenshot(path=shots / "07-unsubscribe.png", full_page=True)
    assert status_of(engine, email) == "active"  # opening the page changes nothing

    page.click("button:text('Unsubscribe')")
    page.wait_for_selector("h1:text('You are unsubscribed')")
    assert page.url == unsubscribe.group(0)  # answered in place: no redirect
    page.screenshot(path=shots / "08-unsubscribed.png", full_page=True)
    assert status_of(engine, email) == "unsubscribed"

    for path, name in (
        ("/privacy", "09-privacy"),
        ("/archive", "10-archive"),
        ("/embed", "11-embed"),
    ):
        page.goto(server.url + path)
        page.screenshot(path=shots / f"{name}.png", full_page=True)
    page.goto(server.url + "/archive")
    page.click("a:text('Weekly: Gate 5 closed')")
    page.wait_for_selector("text=Gate 5 closed")
    page.screenshot(path=shots / "12-archived-issue.png", full_page=True)


@pytest.mark.parametrize(
    "viewport", [PHONE, {"width": 1280, "height": 800}], ids=["390px", "1280px"]
)
def test_embed_snippet_wraps_in_its_box_and_the_button_copies_it(
    browser: Any,
    site: tuple[ServerThread, sa.Engine, Any],
    shots: Path,
    viewport: dict[str, int],
) -> None:
    server, _, settings = site
    context = browser.new_context(viewport=viewport, device_scale_factor=1)
    context.set_default_timeout(10_000)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    try:
        page = context.new_page()
        console: list[str] = []
        page.on(
            "console",
            lambda m: console.append(f"{m.type}: {m.text} at {m.location.get('url', '')}"),
        )
        page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
        page.goto(server.url + "/embed")
        box = page.locator("pre.snippet")
        sizes = box.evaluate("el => [el.scrollWidth, el.clientWidth]")
        assert sizes[0] <= sizes[1], f"the snippet overflows its box: {sizes}"
        page_width = page.evaluate("document.documentElement.scrollWidth")
        assert page_width <= viewport["width"]
        page.screenshot(path=shots / f"13-embed-{viewport['width']}.png", full_page=True)

        page.click("button:text('Copy')")
        page.wait_for_selector("text=Copied the snippet to the clipboard.")
        copied = page.evaluate("navigator.clipboard.readText()")
        snippet = Pages(settings).embed_snippet
        assert copied == snippet
        assert not [line for line in console if "Content Security Policy" in line]
        # The browser's own /favicon.ico request may miss (the site has no icon); nothing else.
        errors = [line for line in console if line.startswith(("error", "pageerror"))]
        assert [line for line in errors if not line.endswith("/favicon.ico")] == []
    finally:
        context.close()


def test_embed_snippet_stays_selectable_without_script(
    browser: Any, site: tuple[ServerThread, sa.Engine, Any]
) -> None:
    server, _, settings = site
    context = browser.new_context(viewport=PHONE, java_script_enabled=False)
    try:
        page = context.new_page()
        page.goto(server.url + "/embed")
        assert not page.locator("#copy-snippet").is_visible()  # no button that cannot work
        snippet = Pages(settings).embed_snippet
        assert page.locator("#snippet").text_content() == snippet
        assert page.locator("pre.snippet").evaluate("el => getComputedStyle(el).userSelect") != (
            "none"
        )
    finally:
        context.close()


@pytest.mark.parametrize("encoding", ["form", "multipart"])
def test_one_click_unsubscribe_over_real_http(
    site: tuple[ServerThread, sa.Engine, Any], page: Any, encoding: str
) -> None:
    """RFC 8058 §3.2 as a mail provider sends it: a POST with no cookie, to the served app."""
    server, engine, _settings = site
    sub = make_subscriber(engine, email=f"oneclick-{encoding}@example.org")
    url = f"{server.url}/unsubscribe/{make_token(SECRET.encode(), Purpose.UNSUBSCRIBE, sub.uid)}"
    body = {encoding: {"List-Unsubscribe": "One-Click"}}
    response = page.request.post(url, max_redirects=0, **body)
    assert response.status == 200
    assert "location" not in response.headers and "set-cookie" not in response.headers
    assert response.headers["referrer-policy"] == "no-referrer"
    assert status_of(engine, sub.email) == "unsubscribed"
