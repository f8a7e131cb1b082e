"""The welcome mail and the confirmed page, on SQLite and PostgreSQL, with a real aiosmtpd server.

A reader confirms through the app (Starlette's TestClient runs the response's background task,
which sends the welcome); when the relay does not take it, the staff round's "welcomes" step
sends it later, once, however many rounds run at the same time. The clock is fixed: NOW is
Friday 20 November 2026, 07:00 in New York, the weekly digest's slot.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dkim
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import rsa

from mailer.compose.dkim import DkimSigner
from mailer.compose.rendering import Renderer
from mailer.config.load import parse_settings
from mailer.config.settings import Settings
from mailer.content.store import upsert_articles
from mailer.db.engine import create_engine
from mailer.errors import ConfigError
from mailer.staff.rounds import staff_steps
from mailer.subscribers import lifecycle
from mailer.subscribers.tokens import Purpose
from mailer.subscribers.welcome import reader_time
from mailer.subscribers.welcome_mail import send_owed
from mailer.web import SmtpConfirmationSender, create_app
from mailer.web.server import ServerThread
from tests.browser import PHONE, fits, page_at
from tests.compliance import assert_compliant, parse
from tests.factories import (
    ALERTS,
    BASE_CONFIG,
    NOW,
    SECRET,
    config_dict,
    make_article,
    make_settings,
    make_subscriber,
)
from tests.served import at, serve
from tests.smtp_server import FaultServer, smtp_server  # noqa: F401
from tests.test_web import Clock, TestClient, Web, make_web, path_of, token, visible_text

WEEKLY = BASE_CONFIG["digests"][0]
DIGESTS = [WEEKLY, ALERTS]
CONFIRMED_AT = NOW + timedelta(minutes=7)  # 07:07 EST: the alerts digest's next slot is 07:10
ALERTS_NEXT = "Base alerts: next on Friday 20 November, 7:10 AM EST"
WEEKLY_NEXT = "Weekly digest: next on Friday 27 November, 7:00 AM EST"
SUBJECT = "Welcome to Camp Lejeune & New River Updates"
WELCOME_LOG = "mailer.subscribers.welcome_mail"


def seen(html: str) -> str:
    """The words of ``html`` as a reader sees them: inline tags add no space."""
    return visible_text(re.sub(r"</?(?:strong|a|span)\b[^>]*>", "", html))


def closed_port() -> int:
    """A loopback port nothing listens on: a relay that is down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def web_for(engine: sa.Engine, db_url: str, server: FaultServer, **config: Any) -> Web:
    return make_web(engine, db_url, server, config={"digests": DIGESTS, **config})


def web_with(engine: sa.Engine, settings: Settings, server: FaultServer, sender: Any) -> Web:
    clock = Clock()
    app = create_app(settings, engine, sender, clock=clock)
    return Web(TestClient(app), engine, server, clock, settings)


def web_without_relay(engine: sa.Engine, db_url: str, server: FaultServer) -> Web:
    """The app with its relay down (nothing listens on its port); ``server`` is where the
    staff round's settings send once the relay is back."""
    settings = make_settings(db_url, digests=DIGESTS, smtp__port=closed_port())
    sender = SmtpConfirmationSender(settings, local_hostname="client.test")
    return web_with(engine, settings, server, sender)


@pytest.fixture
def web(engine: sa.Engine, db_url: str, smtp_server: FaultServer) -> Web:  # noqa: F811
    return web_for(engine, db_url, smtp_server)


def add_stories(engine: sa.Engine) -> None:
    """Stories in every topic: the reader of base alerts and local events gets the newest
    three of theirs, not the expired one, not the removed one, not the military news."""
    hour = timedelta(hours=1)
    upsert_articles(
        engine,
        [
            make_article(topic="base-alerts", title="Gate 5 closed", published_at=NOW - hour),
            make_article(
                topic="local-events",
                title="Harvest fair",
                summary="Saturday at the fairgrounds.\n\nParking is free.",
                published_at=NOW - 2 * hour,
            ),
            make_article(topic="military-news", title="Deployment", published_at=NOW - hour / 2),
            make_article(
                topic="base-alerts",
                title="Road work over",
                published_at=NOW - hour / 4,
                expires_at=NOW - timedelta(minutes=1),
            ),
            make_article(topic="local-events", title="Concert", published_at=NOW - 3 * hour),
            make_article(topic="base-alerts", title="Older alert", published_at=NOW - 5 * hour),
        ],
        now=NOW - hour / 8,
    )


def confirm(web: Web, email: str, topics: tuple[str, ...], **form: Any) -> Any:
    """Sign up and press the confirmation page's button at CONFIRMED_AT; the response."""
    web.subscribe(email, topics=topics, **form)
    uid = web.row(email).uid
    web.clock.now = CONFIRMED_AT
    return web.client.post(f"/confirm/{token(Purpose.CONFIRM, uid)}")


def welcomes(web: Web, email: str) -> list[EmailMessage]:
    return [m for m in web.mails_to(email) if m["Subject"] == SUBJECT]


def raw_welcomes(web: Web, email: str) -> list[bytes]:
    return [r.data for r in web.smtp.received_for(email) if b"Subject: Welcome to" in r.data]


def parts(message: EmailMessage) -> tuple[str, str]:
    text = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert text is not None and html is not None
    return " ".join(text.get_content().split()), seen(html.get_content())


def round_step(settings: Settings, db_url: str) -> Any:
    """The staff round's "welcomes" step, on an engine of its own (as in another process)."""
    engine = create_engine(db_url)
    [step] = [s for s in staff_steps(engine, settings) if s.name == "welcomes"]
    return step, engine


# --- the mail and the page ------------------------------------------------------------------


def test_confirming_sends_a_welcome_with_next_dates_and_the_latest_stories_in_its_topics(
    web: Web,
) -> None:
    add_stories(web.engine)
    response = confirm(web, "ann@example.org", ("base-alerts", "local-events"))
    assert response.status_code == 200
    [raw] = raw_welcomes(web, "ann@example.org")
    message = assert_compliant(raw, web.settings)  # List-Unsubscribe, one-click, footer
    assert message["Subject"] == SUBJECT
    assert message["To"] == "ann@example.org"
    text, html = parts(message)
    for part in (text, html):
        assert "Welcome! Your subscription is confirmed." in part
        assert "You chose: Base alerts, Local events." in part
        assert ALERTS_NEXT in part and WEEKLY_NEXT in part
        assert part.index(ALERTS_NEXT) < part.index(WEEKLY_NEXT)  # soonest first
        stories = [m for m in ("Gate 5 closed", "Harvest fair", "Concert") if m in part]
        assert stories == ["Gate 5 closed", "Harvest fair", "Concert"]
        assert part.index("Gate 5 closed") < part.index("Harvest fair") < part.index("Concert")
        for absent in ("Deployment", "Road work over", "Older alert", "Military news"):
            assert absent not in part
        assert "Saturday at the fairgrounds." in part
        assert "Parking is free." not in part  # the summary's first paragraph only
        assert "Example Media, 100 Main Street" in part
    assert web.row("ann@example.org").welcomed_at == CONFIRMED_AT
    # The page says the same things.
    page = seen(response.text)
    assert "Welcome! Your subscription is confirmed" in page
    assert ALERTS_NEXT in page and WEEKLY_NEXT in page
    assert "A welcome email is on its way to you, with the latest stories" in page
    assert "Gate 5 closed" in page and "Harvest fair" in page and "Deployment" not in page


def test_the_welcome_is_dkim_signed_by_the_senders_signer(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signer = DkimSigner("news.example.org", "nl2026", key)
    settings = make_settings(db_url, digests=DIGESTS, smtp__port=smtp_server.port)
    web = web_with(
        engine, settings, smtp_server, SmtpConfirmationSender(settings, sign=signer.sign)
    )
    confirm(web, "ann@example.org", ("base-alerts",))
    [raw] = raw_welcomes(web, "ann@example.org")
    assert raw.startswith(b"DKIM-Signature: ")

    def lookup(qname: bytes, timeout: int = 5) -> bytes | None:
        wanted = b"nl2026._domainkey.news.example.org."
        return signer.dns_record().encode() if qname == wanted else None

    assert dkim.verify(raw, dnsfunc=lookup, minkey=1024)
    signed = dkim.rfc822_parse(raw)[0][0][1]
    assert b"list-unsubscribe" in signed.lower().replace(b"\r\n", b"")


def test_a_reader_of_local_events_only_is_told_of_the_weekly_digest_only(web: Web) -> None:
    response = confirm(web, "bea@example.org", ("local-events",))
    [message] = welcomes(web, "bea@example.org")
    text, html = parts(message)
    for part in (text, html, seen(response.text)):
        assert WEEKLY_NEXT in part
        assert "next on Friday 20 November" not in part  # the alerts digest is not theirs


def test_a_reader_who_chose_the_weekly_only_is_not_told_of_alerts(web: Web) -> None:
    response = confirm(web, "cy@example.org", ("base-alerts",), digest=["weekly"])
    [message] = welcomes(web, "cy@example.org")
    text, html = parts(message)
    for part in (text, html, seen(response.text)):
        assert WEEKLY_NEXT in part
        assert ALERTS_NEXT not in part  # base alerts are their topic, but not their choice


def test_a_second_post_of_the_button_sends_no_second_welcome(web: Web) -> None:
    confirm(web, "ann@example.org", ("base-alerts",))
    uid = web.row("ann@example.org").uid
    again = web.client.post(f"/confirm/{token(Purpose.CONFIRM, uid)}")
    assert "You are already subscribed" in again.text
    assert "on its way" not in again.text
    assert len(welcomes(web, "ann@example.org")) == 1


def test_a_reader_who_leaves_and_confirms_again_is_welcomed_again(web: Web) -> None:
    confirm(web, "ann@example.org", ("base-alerts",))
    uid = web.row("ann@example.org").uid
    lifecycle.unsubscribe(web.engine, uid, now=CONFIRMED_AT + timedelta(days=30), via="link")
    web.clock.now = CONFIRMED_AT + timedelta(days=40)
    web.subscribe("ann@example.org", topics=("local-events",))
    response = web.client.post(f"/confirm/{token(Purpose.CONFIRM, uid)}")
    assert "on its way" in response.text
    first, second = welcomes(web, "ann@example.org")
    assert "Local events" in parts(second)[0] and "Local events" not in parts(first)[0]
    assert web.row("ann@example.org").welcomed_at == CONFIRMED_AT + timedelta(days=40)


def test_with_no_articles_configured_the_welcome_lists_no_stories(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    web = web_for(engine, db_url, smtp_server, welcome={"articles": 0})
    add_stories(engine)
    response = confirm(web, "ann@example.org", ("base-alerts",))
    [message] = welcomes(web, "ann@example.org")
    text, html = parts(message)
    for part in (text, html, seen(response.text)):
        assert "The latest in your topics" not in part and "THE LATEST" not in part
        assert "Gate 5 closed" not in part
        assert ALERTS_NEXT in part
    assert "A welcome email is on its way to you." in seen(response.text)


def test_disabled_sends_nothing_and_owes_nothing(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    web = web_for(engine, db_url, smtp_server, welcome={"enabled": False})
    response = confirm(web, "ann@example.org", ("base-alerts",))
    page = seen(response.text)
    assert "on its way" not in page
    assert "Your first email will be the next digest." in page
    assert ALERTS_NEXT in page
    assert welcomes(web, "ann@example.org") == []
    assert web.row("ann@example.org").welcomed_at == CONFIRMED_AT  # settled: nothing owed
    assert web.kinds("ann@example.org")[-1] == "welcome_not_owed"
    step, round_engine = round_step(web.settings, db_url)
    try:
        step.call(CONFIRMED_AT + timedelta(hours=1))
    finally:
        round_engine.dispose()
    assert welcomes(web, "ann@example.org") == []


# --- durable: owed while the relay does not take it -----------------------------------------


def test_relay_down_at_confirm_leaves_it_owed_and_concurrent_rounds_send_it_once(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    web = web_without_relay(engine, db_url, smtp_server)
    add_stories(engine)
    with caplog.at_level(logging.WARNING, logger=WELCOME_LOG):
        response = confirm(web, "ann@example.org", ("base-alerts", "local-events"))
    assert response.status_code == 200
    row = web.row("ann@example.org")
    assert (row.status, row.welcomed_at) == ("active", None)
    assert web.kinds("ann@example.org")[-2:] == ["confirmed", "welcome_deferred"]
    [warning] = [r for r in caplog.records if "welcome mail not sent" in r.getMessage()]
    assert warning.uid == row.uid  # type: ignore[attr-defined]
    assert "ann@example.org" not in warning.getMessage()

    # The relay is back (the round's settings reach the test server).
    settings = make_settings(db_url, digests=DIGESTS, smtp__port=smtp_server.port)
    steps = [round_step(settings, db_url) for _ in range(2)]
    try:
        # Within a minute of the failed attempt: not asked again yet.
        steps[0][0].call(CONFIRMED_AT + timedelta(seconds=30))
        assert smtp_server.received_for("ann@example.org") == []
        # Two rounds (two processes) at once, after the retry delay: one mail.
        later = CONFIRMED_AT + timedelta(minutes=2)
        with ThreadPoolExecutor(2) as pool:
            done = list(pool.map(lambda pair: pair[0].call(later), steps))
        assert sorted(sum(d.values()) for d in done) == [0, 1]
        steps[1][0].call(later + timedelta(hours=2))  # and a later round: nothing more
    finally:
        for _, round_engine in steps:
            round_engine.dispose()
    [raw] = smtp_server.received_for("ann@example.org")
    message = assert_compliant(raw.data, settings)
    text, _ = parts(message)
    assert ALERTS_NEXT in text  # the dates as of the round (07:09)
    assert "Gate 5 closed" in text
    row = web.row("ann@example.org")
    assert row.welcomed_at == later
    assert web.kinds("ann@example.org")[-3:] == ["confirmed", "welcome_deferred", "welcomed"]


def test_a_reader_who_unsubscribed_before_the_welcome_went_is_not_welcomed(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    web = web_without_relay(engine, db_url, smtp_server)
    confirm(web, "ann@example.org", ("base-alerts",))
    uid = web.row("ann@example.org").uid
    lifecycle.unsubscribe(engine, uid, now=CONFIRMED_AT + timedelta(minutes=1), via="link")
    settings = make_settings(db_url, digests=DIGESTS, smtp__port=smtp_server.port)
    step, round_engine = round_step(settings, db_url)
    try:
        assert not step.call(CONFIRMED_AT + timedelta(hours=1))
    finally:
        round_engine.dispose()
    assert smtp_server.received_for("ann@example.org") == []


def test_a_permanent_refusal_settles_it_with_a_warning_naming_the_uid(
    web: Web, caplog: pytest.LogCaptureFixture
) -> None:
    web.subscribe("gone@example.org", topics=("base-alerts",))
    web.smtp.script("gone@example.org", ["550 5.1.1 no such mailbox"])
    uid = web.row("gone@example.org").uid
    web.clock.now = CONFIRMED_AT
    with caplog.at_level(logging.INFO, logger=WELCOME_LOG):
        web.client.post(f"/confirm/{token(Purpose.CONFIRM, uid)}")
    assert web.row("gone@example.org").welcomed_at == CONFIRMED_AT
    assert web.kinds("gone@example.org")[-1] == "welcome_refused"
    [warning] = [r for r in caplog.records if r.name == WELCOME_LOG]
    assert "refused by the relay for good" in warning.getMessage()
    assert warning.uid == uid  # type: ignore[attr-defined]
    assert all("gone@example.org" not in r.getMessage() for r in caplog.records)


def test_a_welcome_owed_for_more_than_a_week_is_given_up_with_one_error(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    web = web_without_relay(engine, db_url, smtp_server)
    confirm(web, "ann@example.org", ("base-alerts",))
    settings = make_settings(db_url, digests=DIGESTS, smtp__port=smtp_server.port)
    step, round_engine = round_step(settings, db_url)
    week_later = CONFIRMED_AT + timedelta(days=7, minutes=1)
    try:
        with caplog.at_level(logging.ERROR, logger=WELCOME_LOG):
            assert step.call(week_later) == {"abandoned": 1}
            assert not step.call(week_later + timedelta(hours=1))
    finally:
        round_engine.dispose()
    [error] = [r for r in caplog.records if r.name == WELCOME_LOG and r.levelno == logging.ERROR]
    assert "welcome mail given up" in error.getMessage()
    assert smtp_server.received_for("ann@example.org") == []
    assert web.row("ann@example.org").welcomed_at == week_later
    assert web.kinds("ann@example.org")[-1] == "welcome_abandoned"


async def test_subscribers_added_by_staff_are_not_welcomed(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    settings = make_settings(db_url, smtp__port=smtp_server.port)
    make_subscriber(engine, email="imported@example.org", now=NOW)
    sender = SmtpConfirmationSender(settings)
    done = await send_owed(
        engine, settings, sender, now=NOW + timedelta(hours=1), renderer=Renderer()
    )
    assert not done
    assert smtp_server.received == []


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param({"articles": 11}, "[welcome].articles must be 0–10, got 11", id="too-many"),
        pytest.param({"articles": -1}, "[welcome].articles must be 0–10, got -1", id="negative"),
        pytest.param(
            {"articles": 2.5},
            "[welcome].articles must be a whole number 0–10, got 2.5",
            id="fraction",
        ),
        pytest.param(
            {"enabled": "yes"}, "[welcome].enabled must be true or false, got 'yes'", id="flag"
        ),
        pytest.param(
            {"subject": "Hi"},
            "[welcome].subject is not a known key (known: articles, enabled)",
            id="unknown",
        ),
    ],
)
def test_a_bad_welcome_setting_is_one_error_naming_the_key(
    value: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_settings(config_dict(welcome=value), env={"MAILER_SECRET_KEY": SECRET})
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_welcome_defaults_to_enabled_with_three_stories() -> None:
    settings = make_settings()
    assert (settings.welcome.enabled, settings.welcome.articles) == (True, 3)
    zero = make_settings(welcome={"articles": 0, "enabled": False})
    assert (zero.welcome.enabled, zero.welcome.articles) == (False, 0)


# --- in Chromium, at phone width ------------------------------------------------------------


@pytest.fixture
def served(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> Iterator[ServerThread]:
    with serve(
        lambda base: make_settings(
            db_url, digests=DIGESTS, smtp__port=smtp_server.port, **at(base)
        ),
        engine,
        clock=lambda: CONFIRMED_AT,
    ) as (server, _engine, _settings):
        yield server


@pytest.mark.browser
def test_in_a_phone_browser_the_confirmed_page_and_the_welcome_mail_fit(
    served: ServerThread,
    engine: sa.Engine,
    smtp_server: FaultServer,  # noqa: F811
    browser: Any,
    shots: Path,
    db_url: str,
) -> None:
    server = served
    add_stories(engine)
    name = "sqlite" if db_url.startswith("sqlite") else "postgres"
    page = page_at(browser, PHONE)
    try:
        page.goto(server.url + "/")
        page.fill("#email", "ann@example.org")
        page.check("#topic-base-alerts")
        page.check("#topic-local-events")
        page.check("#digest-weekly")
        page.check("#digest-alerts")
        page.check("#consent")
        page.click("button[type=submit]")
        page.wait_for_selector("h1:text('Check your inbox')")
        [confirmation] = smtp_server.wait_for("ann@example.org")
        link = re.search(rb"http://[^\s]+/confirm/[^\s=]+", confirmation.data)
        assert link is not None
        page.goto(server.url + path_of(link.group(0).decode()))
        page.click("button:text('Confirm my subscription')")
        page.wait_for_selector("text=Your subscription is confirmed")
        main = " ".join(page.inner_text("main").split())
        assert ALERTS_NEXT in main and WEEKLY_NEXT in main
        assert "Gate 5 closed" in main
        assert fits(page)
        page.screenshot(path=shots / f"welcome-{name}-page-390.png", full_page=True)

    finally:
        page.context.close()
    [_, welcome] = smtp_server.wait_for("ann@example.org", count=2)
    message = parse(welcome.data)  # compliance: checked above, for an https site
    html = message.get_body(preferencelist=("html",))
    assert html is not None
    # A page of its own: the app's Content-Security-Policy would block the mail's <style>.
    page = page_at(browser, PHONE)
    try:
        page.set_content(html.get_content())
        body = " ".join(page.inner_text("body").split())
        assert ALERTS_NEXT in body and "Gate 5 closed" in body
        assert fits(page)
        page.screenshot(path=shots / f"welcome-{name}-mail-390.png", full_page=True)
    finally:
        page.context.close()


def test_welcome_dates_name_the_year_when_it_is_not_this_one() -> None:
    new_year = datetime.fromisoformat("2027-01-01T12:00:00+00:00")
    assert reader_time(new_year, "America/New_York", NOW) == "Friday 1 January 2027, 7:00 AM EST"
    assert reader_time(NOW, "America/New_York", NOW) == "Friday 20 November, 7:00 AM EST"
    assert reader_time(NOW, "Europe/London", NOW) == "Friday 20 November, 12:00 PM GMT"
