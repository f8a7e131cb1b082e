"""The subscriber web app, driven in process by Starlette's TestClient, on SQLite and PostgreSQL.

Confirmation mail goes through the real SMTP client to a real aiosmtpd server; the tests read
the confirm link out of the message it received and follow it.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from html import unescape
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa
from starlette.exceptions import StarletteDeprecationWarning

from mailer.compose.messages import DigestComposer
from mailer.compose.rendering import Renderer
from mailer.db.engine import create_engine
from mailer.db.schema import articles, events, issue_articles, issues, suppressions
from mailer.db.schema import deliveries as delivery_table
from mailer.db.schema import subscribers as subscriber_table
from mailer.errors import ConfigError
from mailer.issues.progress import load_content
from mailer.subscribers import personal, store
from mailer.subscribers.editions import Choice
from mailer.subscribers.lifecycle import purge_unconfirmed
from mailer.subscribers.tokens import Purpose, make_token
from mailer.web import Limits, SmtpConfirmationSender, create_app
from mailer.web.forms import PAUSE_CHOICE
from mailer.web.ratelimit import RateLimiter
from mailer.web.security import ARCHIVE_CSP, PAGE_CSP, page_csp
from tests.factories import (
    ALERTS,
    BASE_CONFIG,
    NOW,
    SECRET,
    TOPICS,
    make_settings,
    make_subscriber,
)
from tests.smtp_server import FaultServer, smtp_server  # noqa: F401

with warnings.catch_warnings():
    # Starlette 1.x prefers httpx2 for its TestClient and warns when it falls back to httpx.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

BASE = "https://news.example.org"
CHECK_INBOX = "Check your inbox"


@dataclass
class Clock:
    now: datetime = NOW

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Web:
    """One app under test, its database, its mail server and its clock."""

    client: TestClient
    engine: sa.Engine
    smtp: FaultServer
    clock: Clock
    settings: Any
    limits: Limits = field(default_factory=Limits)

    def subscribe(
        self,
        email: str,
        topics: tuple[str, ...] = TOPICS,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> Any:
        data: dict[str, Any] = {"email": email, "topic": list(topics), "consent": "yes"}
        data.update(extra)
        return self.client.post("/subscribe", data=data, headers=headers)

    def mails_to(self, email: str) -> list[EmailMessage]:
        return [
            cast(EmailMessage, message_from_bytes(r.data, policy=policy.default))
            for r in self.smtp.received_for(email)
        ]

    def row(self, email: str) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(
                sa.select(subscriber_table).where(subscriber_table.c.email == email)
            ).first()

    def kinds(self, email: str) -> list[str]:
        with self.engine.connect() as conn:
            sid = conn.scalar(
                sa.select(subscriber_table.c.id).where(subscriber_table.c.email == email)
            )
            return list(
                conn.scalars(
                    sa.select(events.c.kind)
                    .where(events.c.subscriber_id == sid)
                    .order_by(events.c.id)
                )
            )

    def snapshot(self) -> tuple[list[Any], list[Any], list[Any]]:
        """Every subscriber, event and suppression row: to prove a request changed nothing."""
        with self.engine.connect() as conn:
            return (
                [
                    tuple(r)
                    for r in conn.execute(
                        sa.select(subscriber_table).order_by(subscriber_table.c.id)
                    )
                ],
                [tuple(r) for r in conn.execute(sa.select(events).order_by(events.c.id))],
                [tuple(r) for r in conn.execute(sa.select(suppressions))],
            )


def make_web(engine: sa.Engine, db_url: str, server: FaultServer, **options: Any) -> Web:
    settings = make_settings(db_url, smtp__port=server.port, **options.pop("config", {}))
    limits = options.pop("limits", Limits())
    clock = Clock()
    sender = SmtpConfirmationSender(settings, local_hostname="client.test")
    app = create_app(settings, engine, sender, limits=limits, clock=clock)
    return Web(TestClient(app), engine, server, clock, settings, limits)


@pytest.fixture
def web(engine: sa.Engine, db_url: str, smtp_server: FaultServer) -> Web:  # noqa: F811
    return make_web(engine, db_url, smtp_server)


def token(purpose: Purpose, uid: str, secret: str = SECRET) -> str:
    return make_token(secret.encode(), purpose, uid)


def path_of(url: str) -> str:
    return urlsplit(url).path


def confirm_link(message: EmailMessage) -> str:
    body = message.get_body(preferencelist=("plain",))
    assert body is not None
    found = re.search(r"https://news\.example\.org/confirm/\S+", body.get_content())
    assert found, body.get_content()
    return found.group(0)


def visible_text(html: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


# --- the sign-up page -----------------------------------------------------------------------


def test_signup_page_has_title_tagline_topics_unticked_consent_and_privacy_line(web: Web) -> None:
    response = web.client.get("/")
    assert response.status_code == 200
    html = response.text
    assert "<title>Get Camp Lejeune &amp; New River Updates</title>" in html
    assert "<h1>Get Camp Lejeune &amp; New River Updates</h1>" in html
    assert "Essential base alerts, local events, and military news delivered to your inbox." in html
    assert 'action="/subscribe"' in html and 'method="post"' in html
    assert 'type="email"' in html and 'autocomplete="email"' in html
    for key in TOPICS:
        assert f'value="{key}"' in html
    consent = re.search(r"<input id=\"consent\"[^>]*>", html, re.S)
    assert consent and "checked" not in consent.group(0)
    assert "checked" not in html  # no box is pre-ticked (GDPR Recital 32)
    assert re.search(r"<div class=\"honeypot\" hidden>.*name=\"website\"", html, re.S)
    assert 'We don\'t spam! Read our <a href="/privacy">privacy policy</a> for more info.' in html
    assert "<script" not in html
    assert 'name="viewport"' in html and '<html lang="en">' in html
    assert '<label for="email">' in html


def test_stylesheet_is_served_as_css(web: Web) -> None:
    response = web.client.get("/static/style.css")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/css")
    assert ".button" in response.text


# --- double opt-in --------------------------------------------------------------------------


def test_signup_stores_pending_with_consent_evidence_and_mails_a_link_that_confirms(
    web: Web,
) -> None:
    response = web.subscribe(
        "  Reader@Example.ORG ",
        topics=("base-alerts", "military-news"),
        headers={"User-Agent": "TestBrowser/1.0"},
    )
    assert response.status_code == 200
    assert CHECK_INBOX in response.text
    assert response.headers["cache-control"] == "no-store"
    row = web.row("reader@example.org")
    assert row.status == "pending"
    assert row.consent_at == NOW
    assert row.consent_ip == "testclient"
    assert row.consent_user_agent == "TestBrowser/1.0"
    assert row.consent_source == "web:form"
    assert row.consent_policy_version == "1"
    assert store.get(web.engine, "reader@example.org").topics == (
        "base-alerts",
        "military-news",
    )

    [mail] = web.mails_to("reader@example.org")
    assert mail["To"] == "reader@example.org"
    assert mail["Message-ID"] == row.confirmation_message_id
    assert row.confirmation_sent_at == NOW
    assert mail["Subject"] == "Confirm your subscription to Camp Lejeune & New River Updates"
    assert web.smtp.received[0].envelope_from == "digest@news.example.org"

    web.clock.now = NOW + timedelta(minutes=5)
    welcome = web.client.post(path_of(confirm_link(mail)), headers={"User-Agent": "Phone/2"})
    assert welcome.status_code == 200
    assert "Your subscription is confirmed" in welcome.text
    preferences = re.search(r'href="(/preferences/[^"]+)"', welcome.text)
    assert preferences and web.client.get(preferences.group(1)).status_code == 200
    row = web.row("reader@example.org")
    assert row.status == "active"
    assert row.confirmed_at == NOW + timedelta(minutes=5)
    assert (row.confirm_ip, row.confirm_user_agent) == ("testclient", "Phone/2")
    assert web.kinds("reader@example.org") == [
        "subscribed",
        "confirmation_sent",
        "confirmed",
        "welcomed",
    ]


def test_confirm_link_is_idempotent(web: Web) -> None:
    web.subscribe("ann@example.org")
    link = path_of(confirm_link(web.mails_to("ann@example.org")[0]))
    assert web.client.post(link).status_code == 200
    again = web.client.post(link)
    assert again.status_code == 200
    assert "You are already subscribed" in again.text
    page = web.client.get(link)
    assert "You are already subscribed" in page.text and "<form" not in page.text
    assert web.kinds("ann@example.org").count("confirmed") == 1


def test_confirm_link_does_not_reactivate_an_unsubscribed_subscriber(web: Web) -> None:
    web.subscribe("ann@example.org")
    link = path_of(confirm_link(web.mails_to("ann@example.org")[0]))
    web.client.post(link)
    uid = web.row("ann@example.org").uid
    web.client.post(f"/unsubscribe/{token(Purpose.UNSUBSCRIBE, uid)}")
    for method in ("GET", "POST"):
        response = web.client.request(method, link)
        assert response.status_code == 200
        assert "This subscription has ended" in response.text
        assert "<form" not in response.text  # no button that would re-subscribe them
    assert web.row("ann@example.org").status == "unsubscribed"


def test_confirm_link_of_a_purged_signup_is_404(web: Web) -> None:
    web.subscribe("ann@example.org")
    link = path_of(confirm_link(web.mails_to("ann@example.org")[0]))
    assert purge_unconfirmed(web.engine, now=NOW + timedelta(days=8)) == 1
    for method in ("GET", "POST"):
        response = web.client.request(method, link)
        assert response.status_code == 404
        assert "This link has expired" in response.text


@pytest.mark.parametrize(
    ("state", "mailed"),
    [
        ("new", True),
        ("pending", True),
        ("unsubscribed", True),
        ("active", False),
        ("bounced", False),
        ("complained", False),
        ("suppressed", False),
    ],
    ids=lambda v: str(v),
)
def test_signup_answers_the_same_page_whatever_the_address_state(
    web: Web, state: str, mailed: bool
) -> None:
    reference = web.subscribe("someone-new@example.org")
    email = "known@example.org"
    if state == "suppressed":
        make_subscriber(web.engine, email=email)
        personal.erase(web.engine, email, now=NOW)
    elif state != "new":
        make_subscriber(web.engine, email=email, status=state)
    before = len(web.smtp.received)
    response = web.subscribe(email)
    assert response.status_code == reference.status_code == 200
    # The page repeats the address typed, and nothing else differs.
    assert email in response.text
    assert response.text.replace(email, "ADDRESS") == reference.text.replace(
        "someone-new@example.org", "ADDRESS"
    )
    assert (len(web.smtp.received) == before + 1) is mailed
    row = web.row(email)
    if state == "suppressed":
        assert row is None
    elif state in ("new", "pending", "unsubscribed"):
        assert row.status == "pending"
    else:
        assert row.status == state


def test_signup_again_while_pending_takes_the_latest_topics(web: Web) -> None:
    web.subscribe("ann@example.org", topics=("base-alerts",))
    web.clock.now = NOW + timedelta(hours=1)
    web.subscribe("ann@example.org", topics=("local-events",))
    assert store.get(web.engine, "ann@example.org").topics == ("local-events",)
    assert web.row("ann@example.org").consent_at == NOW + timedelta(hours=1)
    assert len(web.mails_to("ann@example.org")) == 2


def test_confirmation_mails_are_capped_per_address_per_day(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    web = make_web(
        engine, db_url, smtp_server, limits=Limits(per_address=100, confirmations_per_day=3)
    )
    for minute in range(5):
        web.clock.now = NOW + timedelta(minutes=minute)
        assert CHECK_INBOX in web.subscribe("ann@example.org").text
    assert len(web.mails_to("ann@example.org")) == 3
    web.clock.now = NOW + timedelta(days=1, minutes=1)
    web.subscribe("ann@example.org")
    assert len(web.mails_to("ann@example.org")) == 4


def test_signup_from_the_embedded_form_records_the_page_it_was_on(web: Web) -> None:
    response = web.subscribe(
        "ann@example.org",
        source="embed",
        headers={"Referer": "https://news.example.org/2026/11/gate-closures?utm=x&token=secret"},
    )
    assert response.status_code == 200
    source = web.row("ann@example.org").consent_source
    assert source == "web:embed https://news.example.org/2026/11/gate-closures"


def test_signup_accepts_a_multipart_form(web: Web) -> None:
    response = web.client.post(
        "/subscribe",
        files=[
            ("email", (None, "ann@example.org")),
            ("topic", (None, "local-events")),
            ("consent", (None, "yes")),
        ],
    )
    assert response.status_code == 200
    assert web.row("ann@example.org").status == "pending"


def test_smtp_refusal_of_the_confirmation_is_recorded_and_the_page_is_the_same(web: Web) -> None:
    web.smtp.script("ann@example.org", ["550 5.1.1 no such mailbox"])
    response = web.subscribe("ann@example.org")
    assert response.status_code == 200 and CHECK_INBOX in response.text
    assert web.kinds("ann@example.org") == [
        "subscribed",
        "confirmation_sent",
        "confirmation_failed",
    ]


BAD_SIGNUPS = [
    pytest.param({"email": ""}, "Enter your email address.", id="empty-email"),
    pytest.param({"email": None}, "Enter your email address.", id="missing-email"),
    pytest.param({"email": "not-an-address"}, "Enter a valid email address", id="no-at-sign"),
    pytest.param({"email": "ann@"}, "Enter a valid email address", id="no-domain"),
    pytest.param(
        {"email": "ann@example.org\r\nBcc: x@y.org"},
        "Enter a valid email address",
        id="header-injection",
    ),
    pytest.param(
        {"email": "a" * 300 + "@example.org"}, "Enter a valid email address", id="too-long"
    ),
    pytest.param(
        {"email": "a" * 600 + "@example.org"}, "The email address is too long", id="far-too-long"
    ),
    pytest.param(
        {"email": "ännä@exämple.org"}, "Enter a valid email address", id="non-ascii-local-part"
    ),
    pytest.param(
        {"email": ["a@example.org", "b@example.org"]}, "Send one email address", id="two-emails"
    ),
    pytest.param({"topic": []}, "Choose at least one topic.", id="no-topic"),
    pytest.param(
        {"topic": ["astrology"]}, "“astrology” is not one of our topics", id="unknown-topic"
    ),
    pytest.param({"consent": None}, "Tick the box to agree", id="consent-not-ticked"),
    pytest.param({"consent": "on"}, "Tick the box to agree", id="consent-wrong-value"),
    pytest.param(
        {"website": "http://spam.example"}, "Leave the field marked", id="honeypot-filled"
    ),
]


@pytest.mark.parametrize(("fields", "message"), BAD_SIGNUPS)
def test_bad_signup_is_a_400_page_naming_the_problem_and_stores_nothing(
    web: Web, fields: dict[str, Any], message: str
) -> None:
    data: dict[str, Any] = {"email": "ann@example.org", "topic": ["base-alerts"], "consent": "yes"}
    for key, value in fields.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    response = web.client.post("/subscribe", data=data)
    assert response.status_code == 400
    assert message in response.text
    assert 'role="alert"' in response.text
    assert "<title>Error: " in response.text
    with web.engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(subscriber_table)) == 0
        assert conn.scalar(sa.select(sa.func.count()).select_from(events)) == 0
    assert web.smtp.received == []


def test_bad_signup_page_escapes_what_was_typed(web: Web) -> None:
    response = web.client.post(
        "/subscribe", data={"email": '"><script>alert(1)</script>', "consent": "yes"}
    )
    assert response.status_code == 400
    assert "<script>" not in response.text
    assert "&#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in response.text


def test_bad_signup_keeps_the_ticked_topics_but_never_the_consent(web: Web) -> None:
    response = web.client.post(
        "/subscribe", data={"email": "x", "topic": ["local-events"], "consent": "yes"}
    )
    assert response.status_code == 400
    assert re.search(r'value="local-events"\s*checked', response.text)
    consent = re.search(r"<input id=\"consent\"[^>]*>", response.text, re.S)
    assert consent and "checked" not in consent.group(0)


def test_signup_is_rate_limited_per_client_ip(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    web = make_web(engine, db_url, smtp_server, limits=Limits(per_ip=3))
    for n in range(3):
        assert web.subscribe(f"reader{n}@example.org").status_code == 200
    refused = web.subscribe("reader9@example.org")
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) > 0
    assert "Too many sign-up attempts" in refused.text
    assert web.row("reader9@example.org") is None


def test_signup_is_rate_limited_per_address(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    web = make_web(engine, db_url, smtp_server, limits=Limits(per_address=2))
    assert web.subscribe("ann@example.org").status_code == 200
    assert web.subscribe("ANN@example.org").status_code == 200
    assert web.subscribe("ann@example.org").status_code == 429
    assert web.subscribe("bob@example.org").status_code == 200


def test_purge_unconfirmed_deletes_only_old_pending_signups(web: Web) -> None:
    web.subscribe("old@example.org")
    web.clock.now = NOW + timedelta(days=6)
    web.subscribe("recent@example.org")
    make_subscriber(web.engine, email="active@example.org")
    assert (
        purge_unconfirmed(web.engine, timedelta(days=7), now=NOW + timedelta(days=7, hours=1)) == 1
    )
    assert web.row("old@example.org") is None
    assert web.row("recent@example.org").status == "pending"
    assert web.row("active@example.org").status == "active"
    assert purge_unconfirmed(web.engine, now=NOW + timedelta(days=7, hours=1)) == 0


# --- unsubscribe ----------------------------------------------------------------------------


@pytest.fixture
def reader(web: Web) -> Any:
    return make_subscriber(web.engine, email="reader@example.org")


def test_unsubscribe_get_shows_one_button_and_never_unsubscribes(web: Web, reader: Any) -> None:
    path = f"/unsubscribe/{token(Purpose.UNSUBSCRIBE, reader.uid)}"
    for _ in range(3):  # link scanners fetch, and fetch again
        response = web.client.get(path)
        assert response.status_code == 200
    assert web.client.head(path).status_code == 200
    html = response.text
    assert re.search(rf'<form method="post" action="{re.escape(path)}"', html)
    assert html.count("<button") == 1
    assert "re•••@example.org" in html
    assert "reader@example.org" not in html
    assert web.row("reader@example.org").status == "active"
    assert "unsubscribed" not in web.kinds("reader@example.org")


ONE_CLICK_BODIES = [
    pytest.param(
        {
            "content": b"List-Unsubscribe=One-Click",
            "headers": {"Content-Type": "application/x-www-form-urlencoded"},
        },
        id="urlencoded",
    ),
    pytest.param({"files": {"List-Unsubscribe": (None, "One-Click")}}, id="multipart"),
]


@pytest.mark.parametrize("body", ONE_CLICK_BODIES)
def test_one_click_post_unsubscribes_at_once_without_redirect_or_cookie(
    web: Web, reader: Any, body: dict[str, Any]
) -> None:
    path = f"/unsubscribe/{token(Purpose.UNSUBSCRIBE, reader.uid)}"
    response = web.client.post(path, follow_redirects=False, **body)
    assert response.status_code == 200
    assert "location" not in response.headers
    assert "set-cookie" not in response.headers
    assert "You are unsubscribed" in response.text
    row = web.row("reader@example.org")
    assert row.status == "unsubscribed" and row.unsubscribed_at == NOW
    with web.engine.connect() as conn:
        detail = conn.scalar(
            sa.select(events.c.detail).where(
                events.c.subscriber_id == reader.id, events.c.kind == "unsubscribed"
            )
        )
    assert detail == {"source": "web", "via": "one-click"}


@pytest.mark.parametrize("body", ONE_CLICK_BODIES)
def test_one_click_post_is_idempotent(web: Web, reader: Any, body: dict[str, Any]) -> None:
    path = f"/unsubscribe/{token(Purpose.UNSUBSCRIBE, reader.uid)}"
    for _ in range(2):
        response = web.client.post(path, **body)
        assert response.status_code == 200 and "You are unsubscribed" in response.text
    assert web.kinds("reader@example.org").count("unsubscribed") == 1


def test_unsubscribe_button_on_the_page_unsubscribes(web: Web, reader: Any) -> None:
    path = f"/unsubscribe/{token(Purpose.UNSUBSCRIBE, reader.uid)}"
    page = web.client.get(path).text
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]+)">', page))
    assert fields == {"List-Unsubscribe": "One-Click", "via": "page"}
    response = web.client.post(path, data=fields)
    assert response.status_code == 200
    assert web.row("reader@example.org").status == "unsubscribed"


def test_one_click_post_with_an_empty_or_odd_body_still_unsubscribes(web: Web, reader: Any) -> None:
    path = f"/unsubscribe/{token(Purpose.UNSUBSCRIBE, reader.uid)}"
    response = web.client.post(
        path, content=b"--broken", headers={"Content-Type": "multipart/form-data; boundary=x"}
    )
    assert response.status_code == 200
    assert web.row("reader@example.org").status == "unsubscribed"


def test_unsubscribe_of_an_erased_subscriber_answers_200_and_changes_nothing(
    web: Web, reader: Any
) -> None:
    personal.erase(web.engine, "reader@example.org", now=NOW)
    before = web.snapshot()
    path = f"/unsubscribe/{token(Purpose.UNSUBSCRIBE, reader.uid)}"
    assert "You are not subscribed" in web.client.get(path).text
    response = web.client.post(path, data={"List-Unsubscribe": "One-Click"})
    assert response.status_code == 200
    assert web.snapshot() == before


def test_unsubscribe_keeps_a_bounced_status(web: Web) -> None:
    sub = make_subscriber(web.engine, email="gone@example.org", status="bounced")
    response = web.client.post(f"/unsubscribe/{token(Purpose.UNSUBSCRIBE, sub.uid)}")
    assert response.status_code == 200
    assert web.row("gone@example.org").status == "bounced"


# --- forged tokens --------------------------------------------------------------------------

TOKEN_ROUTES = [
    pytest.param("GET", "/confirm/{}", Purpose.CONFIRM, id="confirm-page"),
    pytest.param("POST", "/confirm/{}", Purpose.CONFIRM, id="confirm-post"),
    pytest.param("GET", "/unsubscribe/{}", Purpose.UNSUBSCRIBE, id="unsubscribe-page"),
    pytest.param("POST", "/unsubscribe/{}", Purpose.UNSUBSCRIBE, id="unsubscribe-post"),
    pytest.param("GET", "/preferences/{}", Purpose.PREFERENCES, id="preferences-page"),
    pytest.param("POST", "/preferences/{}", Purpose.PREFERENCES, id="preferences-post"),
    pytest.param("POST", "/preferences/{}/export", Purpose.PREFERENCES, id="export"),
    pytest.param("GET", "/preferences/{}/delete", Purpose.PREFERENCES, id="delete-page"),
    pytest.param("POST", "/preferences/{}/delete", Purpose.PREFERENCES, id="delete-post"),
]


def _other(purpose: Purpose) -> Purpose:
    return Purpose.PREFERENCES if purpose is not Purpose.PREFERENCES else Purpose.UNSUBSCRIBE


FORGERIES = {
    "garbage": lambda uid, purpose: "not-a-token",
    "truncated": lambda uid, purpose: token(purpose, uid)[:-4],
    "uid-only": lambda uid, purpose: uid,
    "one-char-changed": lambda uid, purpose: (
        token(purpose, uid)[:-1] + ("A" if token(purpose, uid)[-1] != "A" else "B")
    ),
    "extra-char": lambda uid, purpose: token(purpose, uid) + "x",
    "other-secret": lambda uid, purpose: token(
        purpose, uid, secret="another-secret-0123456789abcd"
    ),
    "foreign-purpose": lambda uid, purpose: token(_other(purpose), uid),
    "dot-only": lambda uid, purpose: ".",
}


@pytest.mark.parametrize("forgery", list(FORGERIES))
@pytest.mark.parametrize(("method", "route", "purpose"), TOKEN_ROUTES)
def test_forged_tokens_get_a_400_page_and_change_nothing(
    web: Web, method: str, route: str, purpose: Purpose, forgery: str
) -> None:
    sub = make_subscriber(web.engine, email="victim@example.org", status="pending")
    bad = FORGERIES[forgery](sub.uid, purpose)
    before = web.snapshot()
    data = {
        "action": "leave",
        "confirm": "yes",
        "List-Unsubscribe": "One-Click",
    }
    response = web.client.request(
        method, route.format(bad), data=data if method == "POST" else None
    )
    assert response.status_code in (400, 404)
    assert "text/html" in response.headers["content-type"]
    if response.status_code == 400:
        assert "This link is not valid" in response.text
    assert web.snapshot() == before
    assert web.row("victim@example.org").status == "pending"


# --- preferences ----------------------------------------------------------------------------


def prefs(sub: Any) -> str:
    return f"/preferences/{token(Purpose.PREFERENCES, sub.uid)}"


def test_preferences_page_shows_the_choices_as_post_forms(web: Web, reader: Any) -> None:
    response = web.client.get(prefs(reader))
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    html = response.text
    assert "reader@example.org" in html
    for key in TOPICS:
        assert re.search(rf'value="{key}"\s*checked', html)
    forms = re.findall(r"<form [^>]*>", html)
    assert forms and all('method="post"' in f for f in forms)
    assert "Download my data" in html and "Delete my data" in html
    assert "Pause" in html and "Unsubscribe from everything" in html


def test_preferences_change_topics(web: Web, reader: Any) -> None:
    response = web.client.post(prefs(reader), data={"action": "topics", "topic": ["local-events"]})
    assert response.status_code == 200
    assert "Saved. You will get: Local events." in response.text
    assert store.get(web.engine, "reader@example.org").topics == ("local-events",)
    assert web.kinds("reader@example.org")[-1] == "preferences"


@pytest.mark.parametrize(
    ("days", "until"),
    [("7", "27 November 2026"), ("30", "20 December 2026"), ("90", "18 February 2027")],
)
def test_preferences_pause_and_resume(web: Web, reader: Any, days: str, until: str) -> None:
    response = web.client.post(prefs(reader), data={"action": "pause", "days": days})
    assert response.status_code == 200
    assert f"Everything: paused for {days} days, until {until}." in response.text
    assert f"Paused until {until}." in response.text
    assert "every email paused for now" in response.text
    choice = store.get(web.engine, "reader@example.org").choice("weekly")
    assert choice is not None and choice.paused_until == NOW + timedelta(days=int(days))
    assert web.row("reader@example.org").status == "active"
    resumed = web.client.post(prefs(reader), data={"action": "resume"})
    assert "Resumed" in resumed.text
    assert store.get(web.engine, "reader@example.org").choice("weekly") == Choice("weekly")
    assert web.kinds("reader@example.org")[-2:] == ["paused", "resumed"]


def test_preferences_unsubscribe_from_one_topic_only(web: Web, reader: Any) -> None:
    response = web.client.post(
        prefs(reader), data={"action": "drop-topic", "topic": "local-events"}
    )
    assert response.status_code == 200
    assert "You will get no more Local events." in response.text
    assert store.get(web.engine, "reader@example.org").topics == (
        "base-alerts",
        "military-news",
    )
    assert web.row("reader@example.org").status == "active"


def test_preferences_dropping_the_last_topic_unsubscribes(web: Web) -> None:
    sub = make_subscriber(web.engine, email="one@example.org", topics=["base-alerts"])
    response = web.client.post(prefs(sub), data={"action": "drop-topic", "topic": "base-alerts"})
    assert response.status_code == 200
    assert "That was your last topic" in response.text
    assert web.row("one@example.org").status == "unsubscribed"


def test_preferences_leave_unsubscribes(web: Web, reader: Any) -> None:
    response = web.client.post(prefs(reader), data={"action": "leave"}, follow_redirects=False)
    assert response.status_code == 200
    assert "You are unsubscribed." in response.text
    assert web.row("reader@example.org").status == "unsubscribed"
    again = web.client.post(prefs(reader), data={"action": "topics", "topic": ["base-alerts"]})
    assert again.status_code == 409
    assert "You are unsubscribed, so there is nothing to change" in again.text


BAD_PREFERENCES = [
    pytest.param({}, "Choose one of the buttons on the page.", id="no-action"),
    pytest.param(
        {"action": "explode"}, "Choose one of the buttons on the page.", id="unknown-action"
    ),
    pytest.param({"action": ["topics", "leave"]}, "Send one action", id="two-actions"),
    pytest.param({"action": "topics"}, "Choose at least one topic, or unsubscribe", id="no-topics"),
    pytest.param(
        {"action": "topics", "topic": ["astrology"]}, "is not one of our topics", id="unknown-topic"
    ),
    pytest.param({"action": "pause", "days": "5"}, PAUSE_CHOICE, id="pause-5-days"),
    pytest.param({"action": "pause"}, PAUSE_CHOICE, id="pause-no-days"),
    pytest.param({"action": "pause", "days": "-30"}, PAUSE_CHOICE, id="pause-negative"),
    pytest.param(
        {"action": "pause", "digest": "monthly", "days": "7"},
        "Choose an email from the list.",
        id="pause-unknown-digest",
    ),
    pytest.param(
        {"action": "digests"}, "Choose at least one email, or unsubscribe", id="no-digests"
    ),
    pytest.param(
        {"action": "digests", "digest": "monthly"},
        "“monthly” is not one of our emails",
        id="unknown-digest",
    ),
    pytest.param(
        {"action": "drop-topic", "topic": "astrology"},
        "Choose a topic from the list.",
        id="drop-unknown-topic",
    ),
    pytest.param({"action": "drop-topic"}, "Choose a topic from the list.", id="drop-no-topic"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_PREFERENCES)
def test_bad_preferences_input_is_a_400_page_and_changes_nothing(
    web: Web, reader: Any, fields: dict[str, Any], message: str
) -> None:
    before = web.snapshot()
    response = web.client.post(prefs(reader), data=fields)
    assert response.status_code == 400
    assert message in response.text
    assert 'role="alert"' in response.text
    assert web.snapshot() == before


def test_preferences_of_an_erased_subscriber_is_404(web: Web, reader: Any) -> None:
    personal.erase(web.engine, "reader@example.org", now=NOW)
    assert web.client.get(prefs(reader)).status_code == 404
    assert web.client.post(prefs(reader), data={"action": "leave"}).status_code == 404
    assert web.client.post(prefs(reader) + "/export").status_code == 404


# --- your data ------------------------------------------------------------------------------


def test_download_my_data_is_json_with_the_record_topics_consent_and_events(web: Web) -> None:
    web.subscribe("ann@example.org", topics=("base-alerts",), headers={"User-Agent": "UA/1"})
    web.client.post(path_of(confirm_link(web.mails_to("ann@example.org")[0])))
    uid = web.row("ann@example.org").uid
    response = web.client.post(f"/preferences/{token(Purpose.PREFERENCES, uid)}/export")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["content-disposition"].startswith("attachment;")
    assert response.headers["cache-control"] == "no-store"
    data = response.json()
    assert data["subscriber"]["email"] == "ann@example.org"
    assert data["subscriber"]["status"] == "active"
    assert data["topics"] == ["base-alerts"]
    consent = data["consent"]
    assert consent["ip"] == "testclient" and consent["user_agent"] == "UA/1"
    assert consent["privacy_policy_version"] == "1"
    assert consent["source"] == "web:form"
    assert consent["confirmation_message_id"].endswith("@news.example.org>")
    assert consent["confirmed_at"] == NOW.isoformat()
    assert [e["kind"] for e in data["events"]] == [
        "subscribed",
        "confirmation_sent",
        "confirmed",
        "welcomed",
    ]
    assert data["deliveries"] == []


def test_export_is_not_a_get(web: Web, reader: Any) -> None:
    response = web.client.get(prefs(reader) + "/export")
    assert response.status_code == 405
    assert "text/html" in response.headers["content-type"]


def test_delete_my_data_asks_first_then_erases(web: Web, reader: Any) -> None:
    page = web.client.get(prefs(reader) + "/delete")
    assert page.status_code == 200
    assert re.search(r'<form method="post" action="[^"]+/delete"', page.text)
    assert re.search(r'<input id="confirm" name="confirm" type="checkbox" value="yes"', page.text)
    assert web.row("reader@example.org") is not None  # a GET deletes nothing

    refused = web.client.post(prefs(reader) + "/delete", data={})
    assert refused.status_code == 400
    assert "Tick the box to confirm" in refused.text
    assert web.row("reader@example.org") is not None

    done = web.client.post(prefs(reader) + "/delete", data={"confirm": "yes"})
    assert done.status_code == 200
    assert "Your data has been deleted" in done.text
    assert web.row("reader@example.org") is None
    with web.engine.connect() as conn:
        assert store.suppression_reason(conn, "reader@example.org") == "erased"
    assert CHECK_INBOX in web.subscribe("reader@example.org").text
    assert web.smtp.received_for("reader@example.org") == []


# --- privacy policy -------------------------------------------------------------------------


def test_privacy_policy_default_covers_what_the_law_asks(web: Web) -> None:
    response = web.client.get("/privacy")
    assert response.status_code == 200
    text = visible_text(response.text)
    for phrase in (
        "Privacy policy",
        "version 1",
        "Example Media",
        "100 Main Street, Jacksonville, NC 28540",
        "controller",
        "consent",
        "Evidence of your consent",
        "IP address",
        "How long we keep it",
        "7 days",
        "Withdraw consent",
        "Download my data",
        "Delete my data",
        "editor@news.example.org",
    ):
        assert phrase in text, phrase
    assert "Policy version 1." in text


@pytest.mark.parametrize(
    "postal_address",
    [
        "Example Media, 100 Main Street, Jacksonville, NC 28540, USA",
        "100 Main Street, Jacksonville, NC 28540, USA",
        "Example Media\n100 Main Street\nJacksonville, NC 28540, USA",
    ],
    ids=["address-starts-with-publisher", "address-without-publisher", "address-on-lines"],
)
def test_privacy_policy_names_the_publisher_once(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
    postal_address: str,
) -> None:
    web = make_web(engine, db_url, smtp_server, config={"site__postal_address": postal_address})
    html = web.client.get("/privacy").text
    street = "100 Main Street, Jacksonville, NC 28540, USA"
    assert f"personal data is <strong>Example Media</strong>, {street}.\n" in html
    assert f"<p>Example Media, {street}, <a href=" in html
    assert "Example Media, Example Media" not in visible_text(html)
    body = html.split("<h1>", 1)[1].split("Policy version", 1)[0]
    assert body.count("Example Media") == 2  # the two sentences that name the controller


def test_privacy_policy_file_renders_markdown_without_raw_html(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    policy_file = tmp_path / "policy.md"
    policy_file.write_text(
        "# Our policy\n\nRun by **{{ site.publisher }}**, version {{ version }}.\n\n"
        "<script>alert(1)</script>\n\n[bad](javascript:alert(1))\n",
        encoding="utf-8",
    )
    web = make_web(
        engine,
        db_url,
        smtp_server,
        config={
            "site__privacy_policy_file": str(policy_file),
            "site__privacy_policy_version": "2026-11-01",
        },
    )
    html = web.client.get("/privacy").text
    assert "<h1>Our policy</h1>" in html
    assert "<strong>Example Media</strong>, version 2026-11-01." in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert 'href="javascript:' not in html
    assert "Policy version 2026-11-01." in html


def test_unreadable_privacy_policy_file_stops_the_app_at_start(
    engine: sa.Engine, db_url: str, tmp_path: Path
) -> None:
    settings = make_settings(db_url, site__privacy_policy_file=str(tmp_path / "missing.md"))
    with pytest.raises(ConfigError, match=r"privacy_policy_file.*missing\.md"):
        create_app(settings, engine, SmtpConfirmationSender(settings))


# --- archive --------------------------------------------------------------------------------


def make_issue(
    engine: sa.Engine,
    *,
    status: str,
    days_ago: float,
    title: str,
    digest: str = "weekly",
    deliveries: tuple[str, ...] | None = None,
) -> int:
    """An issue of one article; ``deliveries`` are its rows' statuses, one reader each
    (default: one "sent" row for a sent issue, none otherwise)."""
    at = NOW - timedelta(days=days_ago)
    if deliveries is None:
        deliveries = ("sent",) if status == "sent" else ()
    readers = [make_subscriber(engine).id for _ in deliveries]
    with engine.begin() as conn:
        article_id = conn.execute(
            articles.insert()
            .values(
                guid=f"https://news.example.org/{title}",
                topic="base-alerts",
                title=title,
                summary="Gate 5 closes for repairs.",
                why_it_matters="Plan an extra 20 minutes.",
                body="Body.",
                link="https://news.example.org/a",
                published_at=at - timedelta(hours=1),
                content_hash="0" * 64,
                created_at=at,
                updated_at=at,
            )
            .returning(articles.c.id)
        ).scalar_one()
        issue_id = conn.execute(
            issues.insert()
            .values(
                digest=digest,
                scheduled_for=at,
                window_end=at,
                subject=f"{digest.capitalize()}: {title}",
                topics=";".join(TOPICS),
                status=status,
                created_at=at,
            )
            .returning(issues.c.id)
        ).scalar_one()
        conn.execute(
            issue_articles.insert().values(issue_id=issue_id, article_id=article_id, position=0)
        )
        for reader, delivery_status in zip(readers, deliveries, strict=True):
            conn.execute(
                delivery_table.insert().values(
                    issue_id=issue_id,
                    subscriber_id=reader,
                    status=delivery_status,
                    next_attempt_at=at,
                    message_id=f"<{digest}.{issue_id}.{reader}@news.example.org>",
                    created_at=at,
                    updated_at=at,
                    sent_at=at if delivery_status == "sent" else None,
                )
            )
    return int(issue_id)


def test_archive_lists_sent_issues_newest_first(web: Web) -> None:
    older = make_issue(web.engine, status="sent", days_ago=14, title="Older")
    newer = make_issue(web.engine, status="sent", days_ago=7, title="Newer")
    make_issue(web.engine, status="sending", days_ago=0, title="Unfinished")
    make_issue(web.engine, status="cancelled", days_ago=3, title="Cancelled")
    html = web.client.get("/archive").text
    assert html.index(f'href="/archive/{newer}"') < html.index(f'href="/archive/{older}"')
    assert "Unfinished" not in html and "Cancelled" not in html


def test_archive_shows_an_issue_as_readers_saw_it_without_personal_links(web: Web) -> None:
    issue = make_issue(web.engine, status="sent", days_ago=7, title="Gate 5 closed")
    response = web.client.get(f"/archive/{issue}")
    assert response.status_code == 200
    assert "Gate 5 closed" in response.text
    assert "/unsubscribe/" not in response.text and "/preferences/" not in response.text
    assert response.headers["content-security-policy"] == ARCHIVE_CSP
    assert "script-src" not in ARCHIVE_CSP and "default-src 'none'" in ARCHIVE_CSP


def two_digests(engine: sa.Engine, db_url: str, server: FaultServer) -> Web:
    """The app with the base weekly digest and the alert digest beside it."""
    return make_web(engine, db_url, server, config={"digests": [BASE_CONFIG["digests"][0], ALERTS]})


def test_archive_lists_only_issues_someone_received(web: Web) -> None:
    read = make_issue(web.engine, status="sent", days_ago=7, title="Read by one")
    nobody = make_issue(
        web.engine, status="sent", days_ago=6, title="Sent to nobody", deliveries=()
    )
    failed = make_issue(
        web.engine, status="sent", days_ago=5, title="All failed", deliveries=("failed", "bounced")
    )
    html = web.client.get("/archive").text
    assert f'href="/archive/{read}"' in html and "Read by one" in html
    assert "Sent to nobody" not in html and "All failed" not in html
    # The single-issue page follows the same rule.
    assert web.client.get(f"/archive/{read}").status_code == 200
    for hidden in (nobody, failed):
        response = web.client.get(f"/archive/{hidden}")
        assert response.status_code == 404, hidden
        assert "There is no sent issue with this number." in response.text


def test_archive_labels_issues_by_digest_and_filters_one_digest(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    web = two_digests(engine, db_url, smtp_server)
    weekly = make_issue(web.engine, status="sent", days_ago=7, title="Gate 5 closed")
    alert = make_issue(web.engine, status="sent", days_ago=2, title="Storm", digest="alerts")
    everything = web.client.get("/archive").text
    listed = visible_text(everything)
    assert "Base alerts 18 November 2026 Alerts: Storm" in listed
    assert "Weekly digest 13 November 2026 Weekly: Gate 5 closed" in listed
    assert 'href="/archive?digest=alerts" aria-current' not in everything

    alerts_only = web.client.get("/archive", params={"digest": "alerts"})
    assert alerts_only.status_code == 200
    assert f'href="/archive/{alert}"' in alerts_only.text
    assert f'href="/archive/{weekly}"' not in alerts_only.text
    assert '<a class="chip" href="/archive?digest=alerts" aria-current="page">' in alerts_only.text
    assert "<h1>Past issues: Base alerts</h1>" in alerts_only.text

    unknown = web.client.get("/archive", params={"digest": "daily"})
    assert unknown.status_code == 404
    assert "There is no digest “daily” in the archive (known: weekly, alerts)." in unknown.text


def test_a_digest_readers_are_not_offered_is_not_in_the_public_archive(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    private = {**ALERTS, "public": False, "default": False}
    web = make_web(
        engine, db_url, smtp_server, config={"digests": [BASE_CONFIG["digests"][0], private]}
    )
    weekly = make_issue(web.engine, status="sent", days_ago=7, title="Gate 5 closed")
    alert = make_issue(web.engine, status="sent", days_ago=2, title="Storm", digest="alerts")
    listed = web.client.get("/archive").text
    assert f'href="/archive/{weekly}"' in listed
    assert f'href="/archive/{alert}"' not in listed and "Base alerts" not in listed
    assert web.client.get(f"/archive/{alert}").status_code == 404
    assert web.client.get("/archive", params={"digest": "alerts"}).status_code == 404


def test_archive_pages_keep_the_digest_filter(web: Web) -> None:
    for n in range(31):
        make_issue(web.engine, status="sent", days_ago=40 - n, title=f"Issue {n}")
    html = web.client.get("/archive", params={"digest": "weekly"}).text
    assert 'href="/archive?page=2&amp;digest=weekly" rel="next"' in html
    second = web.client.get("/archive", params={"digest": "weekly", "page": "2"}).text
    assert 'href="/archive?page=1&amp;digest=weekly" rel="prev"' in second
    assert "Weekly: Issue 0" in second


def issue_bar(html: str) -> dict[str, str]:
    """The web copy's previous/next links: rel → path."""
    return {
        rel: path_of(unescape(href))
        for href, rel in re.findall(r'<a\s+href="([^"]+)"\s+rel="(prev|next)"', html)
    }


def test_archived_issues_link_to_the_previous_and_next_of_their_digest(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    web = two_digests(engine, db_url, smtp_server)
    first = make_issue(web.engine, status="sent", days_ago=21, title="First")
    between = make_issue(
        web.engine, status="sent", days_ago=17, title="Alert between", digest="alerts"
    )
    make_issue(web.engine, status="sent", days_ago=16, title="Failed", deliveries=("failed",))
    second = make_issue(web.engine, status="sent", days_ago=14, title="Second")
    make_issue(web.engine, status="sending", days_ago=10, title="Going out")
    third = make_issue(web.engine, status="sent", days_ago=7, title="Third")
    lone_alert = make_issue(web.engine, status="sent", days_ago=1, title="Lone", digest="alerts")

    assert issue_bar(web.client.get(f"/archive/{first}").text) == {"next": f"/archive/{second}"}
    assert issue_bar(web.client.get(f"/archive/{second}").text) == {
        "prev": f"/archive/{first}",
        "next": f"/archive/{third}",
    }
    assert issue_bar(web.client.get(f"/archive/{third}").text) == {"prev": f"/archive/{second}"}
    # Alerts walk among alerts only: never to or from a weekly issue.
    assert issue_bar(web.client.get(f"/archive/{lone_alert}").text) == {
        "prev": f"/archive/{between}"
    }
    assert issue_bar(web.client.get(f"/archive/{between}").text) == {
        "next": f"/archive/{lone_alert}"
    }
    middle = visible_text(web.client.get(f"/archive/{second}").text)
    assert "Previous issue: Weekly: First, 30 October 2026" in middle
    assert "Next issue: Weekly: Third, 13 November 2026" in middle


def test_archived_issue_carries_one_h1_and_a_sign_up_box_only_on_the_web(web: Web) -> None:
    issue = make_issue(web.engine, status="sent", days_ago=7, title="Gate 5 closed")
    html = web.client.get(f"/archive/{issue}").text
    assert html.count("<h1") == 1
    assert "Weekly digest, 13 November 2026" in visible_text(html)
    form = re.search(r"<form[^>]*>.*?</form>", html, re.S)
    assert form, "no sign-up box"
    assert 'action="https://news.example.org/"' in form.group(0)
    assert 'method="get"' in form.group(0)
    assert re.search(r'<input id="web-copy-email" name="email" type="email"', form.group(0))
    assert '<label for="web-copy-email"' in form.group(0)
    assert f"Get {web.settings.site.name} in your inbox".replace("&", "&amp;") in html
    # The CSP lets that form go to our own sign-up page, and nothing run.
    csp = web.client.get(f"/archive/{issue}").headers["content-security-policy"]
    assert "form-action 'self'" in csp and "allow-forms" in csp and "script-src" not in csp
    # The mail itself never carries it.
    with web.engine.connect() as conn:
        content = load_content(conn, issue, web.settings)
    mail_html, _ = DigestComposer(web.settings, content, renderer=Renderer()).preview(
        web.settings.topic_keys
    )
    assert "web-copy-email" not in mail_html and "<form" not in mail_html
    assert "<h1" not in mail_html


def test_sign_up_page_fills_in_the_address_from_the_link(web: Web) -> None:
    html = web.client.get("/", params={"email": " ann@example.org "}).text
    assert 'value="ann@example.org"' in html
    hostile = web.client.get("/", params={"email": '"><b>x</b>' + "a" * 400}).text
    assert "<b>x</b>" not in hostile and 'value="&#34;&gt;&lt;b&gt;x&lt;/b&gt;' in hostile
    shown = re.search(r'id="email"[^>]*value="([^"]*)"', hostile)
    assert shown and len(unescape(shown.group(1))) == 254  # cut to the form's maxlength
    assert 'value=""' in web.client.get("/").text


def test_masthead_shows_the_logo_and_the_pages_allow_its_origin(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    web = make_web(
        engine,
        db_url,
        smtp_server,
        config={
            "site__logo_url": "https://cdn.example.net:8443/brand/logo.png?v=2",
            "site__logo_alt": "Camp Lejeune Updates",
        },
    )
    page = web.client.get("/privacy")
    assert (
        '<img class="logo" src="https://cdn.example.net:8443/brand/logo.png?v=2" '
        'alt="Camp Lejeune Updates">'
    ) in page.text
    assert (
        "img-src 'self' data: https://cdn.example.net:8443;"
        in page.headers["content-security-policy"]
    )
    embed = web.client.get("/embed").headers["content-security-policy"]
    assert "img-src 'self' data: https://cdn.example.net:8443;" in embed
    assert "script-src 'self';" in embed
    plain = web.client.get("/privacy")
    assert plain.text.count("<h1") == 1


@pytest.mark.parametrize(
    "path",
    [
        "/archive/999",
        "/archive/{unsent}",
        "/archive/abc",
        "/archive/99999999999999999999999",
        "/archive/" + "9" * 5000,
        "/archive/²",
    ],
    ids=["unknown", "unsent", "not-a-number", "huge", "5000-digits", "superscript-digit"],
)
def test_archive_unknown_or_unsent_issue_is_404(web: Web, path: str) -> None:
    unsent = make_issue(web.engine, status="sending", days_ago=0, title="Unfinished")
    response = web.client.get(path.format(unsent=unsent))
    assert response.status_code == 404
    assert "text/html" in response.headers["content-type"]


@pytest.mark.parametrize("page", ["0", "-1", "x", "1e3", "100001", "9" * 5000, "²"])
def test_archive_bad_page_number_is_400(web: Web, page: str) -> None:
    response = web.client.get("/archive", params={"page": page})
    assert response.status_code == 400
    assert "The page number must be a whole number" in response.text


# --- embed, health, headers, limits ---------------------------------------------------------


def test_embed_page_shows_a_plain_form_posting_to_subscribe(web: Web) -> None:
    response = web.client.get("/embed")
    assert response.status_code == 200
    html = response.text
    assert (
        "&lt;form class=&#34;clnr-signup&#34; method=&#34;post&#34; action=&#34;https://news.example.org/subscribe&#34;&gt;"
        in html
    )
    snippet = web.client.app.state.web.pages.embed_snippet
    assert "<script" not in snippet
    assert 'name="consent" type="checkbox" value="yes" required>' in snippet
    assert '<input type="hidden" name="source" value="embed">' in snippet
    assert "<div hidden>" in snippet and 'name="website"' in snippet
    assert 'Read our <a href="https://news.example.org/privacy">privacy policy</a>' in snippet
    # The "Copy" button shows only once its script runs; without script the snippet stays text.
    assert '<button type="button" class="button secondary" id="copy-snippet" hidden>Copy' in html
    script = web.client.get("/static/embed.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert "navigator.clipboard.writeText" in script.text


def test_healthz_checks_the_database(web: Web) -> None:
    response = web.client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok"}


def test_healthz_is_503_when_the_database_is_down(tmp_path: Path, smtp_server: FaultServer) -> None:  # noqa: F811
    url = f"sqlite:///{tmp_path}/missing-dir/mailer.db"
    broken = create_engine(url)
    try:
        web = make_web(broken, url, smtp_server)
        response = web.client.get("/healthz")
    finally:
        broken.dispose()
    assert response.status_code == 503
    assert response.json() == {"status": "error", "database": "unavailable"}


def test_a_server_error_is_an_html_page_with_the_security_headers(
    tmp_path: Path,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    # A file that is not a database: an error of ours to fix, not an outage to wait out (a
    # database that cannot be reached is a 503, see test_web_edges.py).
    (tmp_path / "mailer.db").write_bytes(b"not a database\n" * 512)
    url = f"sqlite:///{tmp_path}/mailer.db"
    broken = create_engine(url)
    try:
        web = make_web(broken, url, smtp_server)
        client = TestClient(web.client.app, raise_server_exceptions=False)
        response = client.get("/archive")
    finally:
        broken.dispose()
    assert response.status_code == 500
    assert "Something went wrong on our side" in response.text
    assert response.headers["content-security-policy"] == PAGE_CSP
    assert response.headers["referrer-policy"] == "no-referrer"
    assert "Traceback" not in response.text


SECURITY_HEADERS = {
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
}


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/", 200),
        ("POST", "/subscribe", 400),
        ("GET", "/privacy", 200),
        ("GET", "/archive", 200),
        ("GET", "/embed", 200),
        ("GET", "/healthz", 200),
        ("GET", "/static/style.css", 200),
        ("GET", "/static/embed.js", 200),
        ("GET", "/no-such-page", 404),
        ("GET", "/subscribe", 405),
        ("GET", "/unsubscribe/forged", 400),
        ("POST", "/unsubscribe/forged", 400),
    ],
    ids=lambda v: str(v),
)
def test_every_response_carries_the_security_headers(
    web: Web, method: str, path: str, status: int
) -> None:
    response = web.client.request(method, path)
    assert response.status_code == status
    for name, value in SECURITY_HEADERS.items():
        assert response.headers[name] == value
    csp = response.headers["content-security-policy"]
    if path == "/embed":  # its "Copy" button: a script of ours, from our origin only
        assert csp == page_csp(script=True) and "script-src 'self';" in csp
    else:
        assert csp == PAGE_CSP
        assert "script-src" not in csp  # default-src 'none'
    assert "'unsafe-inline'" not in csp
    assert "frame-ancestors 'none'" in csp
    assert "set-cookie" not in response.headers


def test_pages_have_no_inline_script_or_style(web: Web, reader: Any) -> None:
    for path in (
        "/",
        "/privacy",
        "/archive",
        "/embed",
        prefs(reader),
        prefs(reader) + "/delete",
        f"/unsubscribe/{token(Purpose.UNSUBSCRIBE, reader.uid)}",
    ):
        html = web.client.get(path).text
        scripts = re.findall(r"<script[^>]*>.*?</script>", html, re.S)
        if path == "/embed":
            assert scripts == ['<script src="/static/embed.js" defer></script>']
            assert html.count("<script") == 1
        else:
            assert "<script" not in html, path
        assert " style=" not in html and "<style" not in html, path
        assert not re.search(r"<[^>]*\son[a-z]+\s*=", html), path
        assert "javascript:" not in html, path


def test_a_body_over_the_limit_is_refused_with_413(web: Web) -> None:
    big = {
        "email": "ann@example.org",
        "consent": "yes",
        "topic": ["base-alerts"],
        "pad": "x" * 20_000,
    }
    response = web.client.post("/subscribe", data=big)
    assert response.status_code == 413
    assert "text/html" in response.headers["content-type"]
    assert web.row("ann@example.org") is None


def test_a_chunked_body_over_the_limit_is_refused_with_413(web: Web) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"email=ann%40example.org&consent=yes&topic=base-alerts&pad="
        for _ in range(40):
            yield b"x" * 1024

    response = web.client.post(
        "/subscribe",
        content=chunks(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 413
    assert web.row("ann@example.org") is None


def test_a_file_upload_is_refused(web: Web) -> None:
    response = web.client.post(
        "/subscribe",
        data={"email": "ann@example.org", "consent": "yes", "topic": "base-alerts"},
        files={"attachment": ("a.txt", b"hello", "text/plain")},
    )
    assert response.status_code == 400
    assert web.row("ann@example.org") is None


def test_too_many_multipart_fields_are_refused(web: Web) -> None:
    fields = [(f"f{n}", (None, "x")) for n in range(60)] + [
        ("email", (None, "ann@example.org")),
        ("consent", (None, "yes")),
        ("topic", (None, "base-alerts")),
    ]
    response = web.client.post("/subscribe", files=fields)
    assert response.status_code == 400
    assert web.row("ann@example.org") is None


def test_rate_limiter_forgets_hits_after_the_window() -> None:
    now = [0.0]
    limiter = RateLimiter(2, 10.0, clock=lambda: now[0])
    assert limiter.hit("a") and limiter.hit("a")
    assert not limiter.hit("a")
    assert limiter.hit("b")
    assert limiter.retry_after("a") == 11
    now[0] = 10.5
    assert limiter.hit("a")


def test_rate_limiter_memory_is_bounded() -> None:
    limiter = RateLimiter(1, 60.0, max_keys=100, clock=lambda: 0.0)
    for n in range(1_000):
        limiter.hit(f"ip-{n}")
    assert len(limiter) == 100
