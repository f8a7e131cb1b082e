"""Scanner-safe confirmation, on SQLite and PostgreSQL, with a real aiosmtpd server.

Mail scanners fetch every link in a message, so opening the confirmation link only shows a
page; its button (a POST to the same URL) confirms and records that request as the evidence.
No GET route of the web app may write to the database or send mail: one test walks them all.
The "check your inbox" page repeats the address typed. Chromium presses the button at phone
and desktop widths.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import sqlalchemy as sa
from starlette.routing import Route

from mailer.db.schema import metadata
from mailer.subscribers.tokens import Purpose, make_test_token
from mailer.web.server import ServerThread
from tests.browser import fits
from tests.factories import NOW, SECRET, TOPICS, make_settings, make_subscriber
from tests.served import at, serve
from tests.smtp_server import FaultServer, smtp_server  # noqa: F401
from tests.test_web import Web, confirm_link, make_issue, make_web, path_of, token


@pytest.fixture
def web(engine: sa.Engine, db_url: str, smtp_server: FaultServer) -> Web:  # noqa: F811
    return make_web(engine, db_url, smtp_server)


def everything(engine: sa.Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (subscribers, events, deliveries, issues, …), in key order."""
    with engine.connect() as conn:
        return {
            table.name: [
                tuple(row)
                for row in conn.execute(sa.select(table).order_by(*table.primary_key.columns))
            ]
            for table in metadata.sorted_tables
        }


def form_action(html: str) -> str:
    found = re.search(r'<form method="post" action="([^"]+)"', html)
    assert found, html
    return found.group(1)


# --- the link opens a page; the button confirms ---------------------------------------------


def test_opening_the_confirmation_link_shows_a_button_and_leaves_the_subscriber_pending(
    web: Web,
) -> None:
    web.subscribe("ann@example.org", topics=("base-alerts", "local-events"))
    link = path_of(confirm_link(web.mails_to("ann@example.org")[0]))
    before = everything(web.engine)
    for method in ("GET", "HEAD"):  # scanners use both
        response = web.client.request(method, link)
        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-store"
    page = web.client.get(link)
    assert "<h1>Confirm your subscription to Camp Lejeune &amp; New River Updates</h1>" in page.text
    assert "with: Base alerts, Local events." in page.text
    assert "Military news" not in page.text
    assert form_action(page.text) == link  # the button posts to the same URL
    assert "Confirm my subscription</button>" in page.text
    assert everything(web.engine) == before
    assert web.row("ann@example.org").status == "pending"
    assert web.kinds("ann@example.org") == ["subscribed", "confirmation_sent"]


def test_the_button_confirms_and_records_time_ip_and_user_agent(web: Web) -> None:
    web.subscribe("ann@example.org")
    link = path_of(confirm_link(web.mails_to("ann@example.org")[0]))
    web.client.get(link, headers={"User-Agent": "Scanner/1"})
    web.clock.now = NOW + timedelta(minutes=7)
    response = web.client.post(link, headers={"User-Agent": "Reader/2"})
    assert response.status_code == 200
    assert "Welcome! Your subscription is confirmed" in response.text
    row = web.row("ann@example.org")
    assert row.status == "active"
    assert row.confirmed_at == NOW + timedelta(minutes=7)
    assert (row.confirm_ip, row.confirm_user_agent) == ("testclient", "Reader/2")
    assert web.kinds("ann@example.org") == [
        "subscribed",
        "confirmation_sent",
        "confirmed",
        "welcomed",
    ]


@pytest.mark.parametrize(
    "forged",
    [
        pytest.param(lambda uid: "not-a-token", id="garbage"),
        pytest.param(lambda uid: token(Purpose.CONFIRM, uid)[:-3], id="truncated"),
        pytest.param(lambda uid: token(Purpose.UNSUBSCRIBE, uid), id="foreign-purpose"),
        pytest.param(
            lambda uid: token(Purpose.CONFIRM, uid, secret="another-secret-0123456789abcd"),
            id="other-secret",
        ),
    ],
)
def test_a_post_with_a_forged_token_is_400_and_changes_nothing(web: Web, forged: Any) -> None:
    web.subscribe("ann@example.org")
    uid = web.row("ann@example.org").uid
    before = everything(web.engine)
    mails = len(web.smtp.received)
    response = web.client.post(f"/confirm/{forged(uid)}")
    assert response.status_code == 400
    assert "This link is not valid" in response.text
    assert everything(web.engine) == before
    assert len(web.smtp.received) == mails
    assert web.row("ann@example.org").status == "pending"


def test_the_confirmation_mail_says_the_link_opens_a_page_with_a_button(web: Web) -> None:
    web.subscribe("ann@example.org")
    [mail] = web.mails_to("ann@example.org")
    text = mail.get_body(preferencelist=("plain",))
    html = mail.get_body(preferencelist=("html",))
    assert text is not None and html is not None
    assert "press the button on the page it opens" in " ".join(text.get_content().split())
    assert "Open the confirmation page" in html.get_content()
    assert "one click" not in html.get_content()


# --- no GET has a side effect ---------------------------------------------------------------

PURPOSES = {
    "/confirm/": Purpose.CONFIRM,
    "/unsubscribe/": Purpose.UNSUBSCRIBE,
    "/preferences/": Purpose.PREFERENCES,
}


def get_paths(web: Web, uid: str, issue_id: int) -> list[str]:
    """Every GET route of the app, its parameters filled with valid values for ``uid``."""
    paths = []
    routes = [r for r in web.client.app.routes if isinstance(r, Route)]  # type: ignore[attr-defined]
    for route in routes:
        if route.methods is None or "GET" not in route.methods:
            continue
        if route.path.startswith("/websub/"):
            # Not a reader's page: the WebSub spec has the hub verify by GET, and it records a
            # lease only for a request of ours (tests/test_websub.py); any other GET is a 404.
            continue
        path = route.path.replace("{issue_id}", str(issue_id))
        if "{token}" in path:
            if path.startswith("/test/"):
                value = make_test_token(SECRET.encode(), uid)
            else:
                [purpose] = [p for prefix, p in PURPOSES.items() if path.startswith(prefix)]
                value = token(purpose, uid)
            path = path.replace("{token}", value)
        assert "{" not in path, f"no value for a parameter of {route.path}"
        paths.append(path)
    return paths


@pytest.mark.parametrize("status", ["pending", "active", "unsubscribed", "bounced"])
def test_no_get_route_writes_to_the_database_or_sends_mail(web: Web, status: str) -> None:
    web.subscribe("ann@example.org")  # a pending sign-up with its confirmation mail sent
    sub = make_subscriber(web.engine, email="bea@example.org", status=status)
    issue_id = make_issue(web.engine, status="sent", days_ago=1, title="Gate 5 closed")
    paths = get_paths(web, sub.uid, issue_id)
    assert len(paths) >= 13 and any(p.startswith("/confirm/") for p in paths)
    before = everything(web.engine)
    mails = len(web.smtp.received)
    assert before["subscribers"] and before["events"] and before["issues"]
    for path in [*paths, "/archive?page=1"]:
        for method in ("GET", "HEAD"):
            response = web.client.request(method, path, headers={"User-Agent": "Scanner/1"})
            assert response.status_code == 200, (method, path, response.text[:300])
    assert everything(web.engine) == before
    assert len(web.smtp.received) == mails
    assert web.row("bea@example.org").status == status


# --- the check-your-inbox page --------------------------------------------------------------


def test_check_your_inbox_repeats_the_address_escaped_and_says_how_to_fix_a_typo(
    web: Web,
) -> None:
    response = web.subscribe("o'brien&co@exmaple.org")
    assert response.status_code == 200
    assert '<strong class="address">o&#39;brien&amp;co@exmaple.org</strong>' in response.text
    assert "o'brien&co" not in response.text
    text = " ".join(re.sub(r"<[^>]+>", " ", response.text).split())
    assert "Not your address, or a typo?" in text
    assert "sign up again with the right address" in text


# --- the evidence over real HTTP, behind a proxy --------------------------------------------


@pytest.fixture
def served(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> Iterator[tuple[ServerThread, sa.Engine, FaultServer]]:
    """The app served by uvicorn on 127.0.0.1 (its own base_url), on the test's database."""
    with serve(
        lambda base: make_settings(db_url, smtp__port=smtp_server.port, **at(base)),
        engine,
        clock=lambda: NOW,
    ) as (server, _engine, _settings):
        yield server, engine, smtp_server


def row_of(engine: sa.Engine, email: str) -> Any:
    table = metadata.tables["subscribers"]
    with engine.connect() as conn:
        return conn.execute(sa.select(table).where(table.c.email == email)).one()


def mailed_link(smtp: FaultServer, email: str, base: str) -> str:
    [received] = smtp.wait_for(email)
    message = cast(EmailMessage, message_from_bytes(received.data, policy=policy.default))
    body = message.get_body(preferencelist=("plain",))
    assert body is not None
    found = re.search(re.escape(base) + r"/confirm/\S+", body.get_content())
    assert found
    return found.group(0)


def test_the_confirming_ip_is_the_one_a_trusted_proxy_forwards(
    served: tuple[ServerThread, sa.Engine, FaultServer],
) -> None:
    server, engine, smtp = served
    with httpx.Client(base_url=server.url, timeout=10) as client:
        data = {"email": "ann@example.org", "topic": list(TOPICS), "consent": "yes"}
        assert client.post("/subscribe", data=data).status_code == 200
        link = mailed_link(smtp, "ann@example.org", server.url)
        # uvicorn believes X-Forwarded-For from 127.0.0.1 only (server.server_config).
        response = client.post(
            link, headers={"X-Forwarded-For": "203.0.113.7", "User-Agent": "Reader/3"}
        )
    assert response.status_code == 200
    row = row_of(engine, "ann@example.org")
    assert (row.status, row.confirm_ip, row.confirm_user_agent) == (
        "active",
        "203.0.113.7",
        "Reader/3",
    )
    assert row.confirmed_at == NOW


# --- in Chromium, at phone and desktop widths -----------------------------------------------


@pytest.mark.browser
@pytest.mark.parametrize("width", [390, 1280], ids=["phone", "desktop"])
def test_in_a_browser_the_link_shows_a_page_and_the_button_confirms(
    served: tuple[ServerThread, sa.Engine, FaultServer],
    browser: Any,
    shots: Path,
    width: int,
    db_url: str,
) -> None:
    server, engine, smtp = served
    email = "o'brien&co@example.org"
    context = browser.new_context(viewport={"width": width, "height": 844})
    context.set_default_timeout(10_000)
    page = context.new_page()
    name = f"confirm-{'sqlite' if db_url.startswith('sqlite') else 'postgres'}-{width}"
    try:
        page.goto(server.url + "/")
        page.fill("#email", email)
        page.check("#topic-base-alerts")
        page.check("#digest-weekly")
        page.check("#consent")
        page.click("button[type=submit]")
        page.wait_for_selector("h1:text('Check your inbox')")
        assert page.inner_text(".address") == email
        assert fits(page)
        page.screenshot(path=shots / f"{name}-1-check-inbox.png", full_page=True)

        link = mailed_link(smtp, email, server.url)
        page.goto(link)
        page.wait_for_selector("h1:text('Confirm your subscription')")
        assert "Base alerts" in page.inner_text("main")
        assert fits(page)
        page.screenshot(path=shots / f"{name}-2-confirm.png", full_page=True)
        row = row_of(engine, email)
        assert (row.status, row.confirmed_at, row.confirm_ip) == ("pending", None, None)

        page.click("button:text('Confirm my subscription')")
        page.wait_for_selector("text=Your subscription is confirmed")
        assert page.url == link  # answered in place
        assert fits(page)
        page.screenshot(path=shots / f"{name}-3-confirmed.png", full_page=True)
        row = row_of(engine, email)
        assert row.status == "active"
        assert row.confirmed_at == NOW
        assert row.confirm_ip == "127.0.0.1"
        assert row.confirm_user_agent == page.evaluate("navigator.userAgent")
    finally:
        context.close()
