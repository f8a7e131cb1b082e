"""The console's subscribers, articles and sources pages, driven by Starlette's TestClient on
SQLite and PostgreSQL; one look in a real Chromium at phone and desktop width."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from html import unescape
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning

from mailer.clock import now as clock_now
from mailer.console import sessions
from mailer.content.feeds.state import record_failure
from mailer.content.store import feed_origin, file_origin, upsert_articles
from mailer.db.schema import articles, deliveries, events, issues, subscribers, suppressions
from mailer.errors import FeedError
from mailer.subscribers import store
from mailer.subscribers.addresses import address_hash
from mailer.subscribers.lifecycle import Consent, confirm, record_signup
from mailer.web import SmtpConfirmationSender, create_app
from tests.browser import DESKTOP, PHONE, fits, page_at
from tests.console import StaffClient, add_account, staff_client
from tests.factories import (
    NOW,
    SECRET,
    TOPICS,
    make_article,
    make_issue,
    make_settings,
    make_subscriber,
    write_config,
)
from tests.served import at, serve

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient  # noqa: F401  (the clients staff_client makes)

FEED = "https://news.example.org/feed.xml"
SOURCES = [
    {"type": "feed", "url": FEED, "topic": "base-alerts"},
    {"type": "feed", "url": "https://news.example.org/events.xml", "topic": "local-events"},
]


@dataclass
class Console:
    """One app, its database and the time it runs at."""

    app: Starlette
    engine: sa.Engine
    settings: Any

    def client(self, role: str = "admin") -> StaffClient:
        return staff_client(self.app, self.engine, now=NOW, role=role)


def make_console(engine: sa.Engine, db_url: str) -> Console:
    settings = make_settings(db_url, sources=SOURCES)
    sender = SmtpConfirmationSender(settings, local_hostname="client.test")
    app = create_app(settings, engine, sender, clock=lambda: NOW)
    return Console(app, engine, settings)


@pytest.fixture
def console(engine: sa.Engine, db_url: str) -> Iterator[Console]:
    yield make_console(engine, db_url)


def text_of(html: str) -> str:
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", html)).split())


def signed_up(engine: sa.Engine, email: str) -> store.Subscriber:
    """A reader who signed up on the web form and confirmed: consent evidence and events."""
    consent = Consent("web:/", "203.0.113.9", "Mozilla/5.0 (Test)", "2026-01")
    recipient = record_signup(
        engine, email, TOPICS, consent, ("weekly",), now=NOW, domain="news.example.org", daily_cap=3
    )
    assert recipient is not None
    confirm(engine, recipient.uid, ip="203.0.113.10", user_agent="Mozilla/5.0 (Phone)", now=NOW)
    return store.get(engine, email)


def staff_events(engine: sa.Engine) -> list[tuple[str, dict[str, Any]]]:
    with engine.connect() as conn:
        return [
            (kind, detail)
            for kind, detail in conn.execute(
                sa.select(events.c.kind, events.c.detail).order_by(events.c.id)
            )
        ]


# --- subscribers ------------------------------------------------------------------------------


def test_search_finds_by_address_and_by_name_in_any_case(console: Console) -> None:
    make_subscriber(console.engine, email="ada@lovelace.example", name="Ada Lovelace")
    make_subscriber(console.engine, email="grace@navy.example", name="Grace Hopper")
    make_subscriber(console.engine, email="left@navy.example", name="Left", status="pending")
    admin = console.client()

    by_address = admin.get("/staff/subscribers?q=LOVELACE.EX")
    assert by_address.status_code == 200
    assert "ada@lovelace.example" in by_address.text
    assert "grace@navy.example" not in by_address.text

    by_name = text_of(admin.get("/staff/subscribers?q=grace hop").text)
    assert "grace@navy.example" in by_name and "ada@lovelace.example" not in by_name

    navy_pending = text_of(admin.get("/staff/subscribers?q=navy&status=pending").text)
    assert "left@navy.example" in navy_pending and "grace@navy.example" not in navy_pending

    # A LIKE wildcard is taken literally.
    assert "No subscriber matches" in text_of(admin.get("/staff/subscribers?q=%25").text)


def test_search_pages_through_many(console: Console) -> None:
    for n in range(30):
        make_subscriber(console.engine, email=f"p{n:02}@many.example")
    admin = console.client()
    first = text_of(admin.get("/staff/subscribers?q=many.example").text)
    assert "30 subscribers" in first and "page 1 of 2" in first
    assert "p00@many.example" in first and "p25@many.example" not in first
    second = text_of(admin.get("/staff/subscribers?q=many.example&page=2").text)
    assert "p25@many.example" in second and "p00@many.example" not in second


def test_the_record_shows_consent_digests_and_events_newest_first(console: Console) -> None:
    sub = signed_up(console.engine, "reader@example.org")
    page = console.client().get(f"/staff/subscribers/{sub.id}")
    assert page.status_code == 200
    assert page.headers["cache-control"] == "no-store"
    text = text_of(page.text)
    for shown in (
        "active",
        "Base alerts",
        "Weekly digest",
        "web:/",
        "203.0.113.9",
        "Mozilla/5.0 (Test)",
        "2026-01",
        "203.0.113.10",
    ):
        assert shown in text, shown
    # The audit trail, newest first: confirmed before confirmation_sent before subscribed.
    trail = text[text.index("Events") :]
    assert trail.index("confirmed") < trail.index("confirmation_sent") < trail.index("subscribed")
    assert "0 deliveries" in text


def test_export_is_the_persons_own_json_and_records_who_asked(console: Console) -> None:
    sub = signed_up(console.engine, "reader@example.org")
    admin = console.client()
    response = admin.post(f"/staff/subscribers/{sub.id}/export")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert "attachment" in response.headers["content-disposition"]
    data = json.loads(response.text)
    assert data["newsletter"] == console.settings.site.name
    assert data["subscriber"]["email"] == "reader@example.org"
    assert data["consent"]["ip"] == "203.0.113.9"
    assert [e["kind"] for e in data["events"]] == ["subscribed", "confirmation_sent", "confirmed"]
    # The same document the reader downloads from the preferences page.
    from mailer.subscribers.tokens import Purpose, make_token

    token = make_token(console.settings.site.require_secret(), Purpose.PREFERENCES, sub.uid)
    own = json.loads(admin.client.post(f"/preferences/{token}/export").text)
    assert own == data
    assert ("staff.subscriber_exported", {"subscriber": sub.id, "by": admin.email}) in (
        staff_events(console.engine)
    )
    # Without the CSRF token: refused, nothing exported.
    refused = admin.client.post(f"/staff/subscribers/{sub.id}/export", follow_redirects=False)
    assert refused.status_code == 403


def test_unsubscribe_needs_the_confirm_post_and_records_by(console: Console) -> None:
    sub = make_subscriber(console.engine, email="leaving@example.org")
    admin = console.client()
    confirm_page = admin.get(f"/staff/subscribers/{sub.id}/unsubscribe")
    assert confirm_page.status_code == 200
    assert "no further issue" in text_of(confirm_page.text)
    assert store.get(console.engine, sub.email).status == "active"  # a GET changes nothing

    done = admin.post(f"/staff/subscribers/{sub.id}/unsubscribe")
    assert done.status_code == 303
    assert store.get(console.engine, sub.email).status == "unsubscribed"
    with console.engine.connect() as conn:
        detail = conn.execute(
            sa.select(events.c.detail).where(
                events.c.subscriber_id == sub.id, events.c.kind == "unsubscribed"
            )
        ).scalar_one()
    assert detail == {"source": "staff", "by": admin.email}
    shown = admin.get(done.headers["location"])
    assert "is unsubscribed" in text_of(shown.text)


def test_erase_needs_the_confirm_post_says_what_stays_and_records_by(console: Console) -> None:
    sub = signed_up(console.engine, "erase.me@example.org")
    admin = console.client()
    page = text_of(admin.get(f"/staff/subscribers/{sub.id}/erase").text)
    assert "suppression list" in page and "hash" in page
    assert store.get(console.engine, sub.email)  # still there

    without_token = admin.client.post(f"/staff/subscribers/{sub.id}/erase", follow_redirects=False)
    assert without_token.status_code == 403
    assert store.get(console.engine, sub.email)

    done = admin.post(f"/staff/subscribers/{sub.id}/erase")
    assert done.status_code == 303
    assert "erase.me" not in done.headers["location"]  # the address is not put in a URL
    with console.engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(subscribers)) == 0
        assert conn.scalar(sa.select(suppressions.c.reason)) == "erased"
    assert ("erased", {"email_hash": address_hash(sub.email), "by": admin.email}) in (
        staff_events(console.engine)
    )
    gone = admin.get(f"/staff/subscribers/{sub.id}")
    assert gone.status_code == 404
    assert "No such subscriber" in gone.text


def test_an_editor_gets_403_on_every_subscriber_page(console: Console) -> None:
    sub = make_subscriber(console.engine)
    editor = console.client("editor")
    base = f"/staff/subscribers/{sub.id}"
    for path in ("/staff/subscribers", base, base + "/unsubscribe", base + "/erase"):
        assert editor.get(path).status_code == 403, path
    for path in (base + "/export", base + "/unsubscribe", base + "/erase"):
        assert editor.post(path).status_code == 403, path
    assert store.get(console.engine, sub.email).status == "active"
    assert "/staff/subscribers" not in editor.get("/staff/articles").text  # not in the nav


def test_a_malformed_or_unknown_id_is_a_404_page(console: Console) -> None:
    admin = console.client()
    for path in (
        "/staff/subscribers/x",
        "/staff/subscribers/" + "9" * 5000,
        "/staff/subscribers/77",
    ):
        assert admin.get(path).status_code == 404, path[:40]
    assert admin.get("/staff/articles/" + "9" * 5000).status_code == 404


# --- articles ---------------------------------------------------------------------------------


def test_articles_list_shows_the_source_arrival_and_issues(console: Console) -> None:
    engine = console.engine
    upsert_articles(
        engine, [make_article(title="From the feed")], now=NOW, origin=feed_origin(FEED)
    )
    upsert_articles(
        engine,
        [make_article(title="From a file", topic="local-events")],
        now=NOW + timedelta(minutes=1),
        origin=file_origin("/srv/articles"),
    )
    make_subscriber(engine)
    issue = make_issue(engine, console.settings, at=NOW + timedelta(hours=1))
    editor = console.client("editor")
    page = editor.get("/staff/articles")
    assert page.status_code == 200
    text = text_of(page.text)
    assert "From the feed" in text and f"feed {FEED}" in text
    assert "From a file" in text and "file /srv/articles" in text
    assert f"{issue.issue_id} (weekly" in text
    only_events = text_of(editor.get("/staff/articles?topic=local-events").text)
    assert "From a file" in only_events and "From the feed" not in only_events


def sent_article(console: Console) -> tuple[int, int]:
    """An article a weekly issue sent to one reader: (article id, reader id)."""
    engine = console.engine
    upsert_articles(engine, [make_article(title="Gate 3 closed")], now=NOW, origin="push")
    reader = make_subscriber(engine, email="got.it@example.org")
    made = make_issue(engine, console.settings, at=NOW + timedelta(hours=1))
    with engine.begin() as conn:
        conn.execute(
            deliveries.update()
            .where(deliveries.c.issue_id == made.issue_id)
            .values(status="sent", sent_at=NOW + timedelta(hours=1))
        )
        conn.execute(issues.update().where(issues.c.id == made.issue_id).values(status="sent"))
        article_id = conn.scalar(
            sa.select(articles.c.id).where(articles.c.title == "Gate 3 closed")
        )
    assert article_id is not None
    return article_id, reader.id


def test_retract_says_who_gets_the_correction_and_makes_the_correction_issue(
    console: Console,
) -> None:
    article_id, reader = sent_article(console)
    editor = console.client("editor")
    detail = text_of(editor.get(f"/staff/articles/{article_id}").text)
    assert "pushed by the site" in detail and "Gate 3 closed" in detail
    confirm_page = text_of(editor.get(f"/staff/articles/{article_id}/retract").text)
    assert "1 reader received it" in confirm_page and "all 1" in confirm_page

    done = editor.post(
        f"/staff/articles/{article_id}/retract", {"correction": "The gate reopened at noon."}
    )
    assert done.status_code == 303
    with console.engine.connect() as conn:
        correction = conn.execute(
            sa.select(issues.c.id, issues.c.note, issues.c.note_by).where(
                issues.c.kind == "correction", issues.c.corrects_article == article_id
            )
        ).one()
        queued = conn.scalars(
            sa.select(deliveries.c.subscriber_id).where(deliveries.c.issue_id == correction.id)
        ).all()
    assert correction.note == "The gate reopened at noon."
    assert correction.note_by == editor.email
    assert queued == [reader]
    shown = text_of(editor.get(done.headers["location"]).text)
    assert f"Correction queued as issue {correction.id}" in shown
    assert "retracted" in shown
    kinds = {kind: detail for kind, detail in staff_events(console.engine)}
    assert kinds["article_removed"]["by"] == editor.email
    assert kinds["correction_made"]["by"] == editor.email
    again = text_of(editor.get(f"/staff/articles/{article_id}/retract").text)
    assert f"issue {correction.id}" in again and "none is sent again" in again


def test_retract_with_too_long_a_correction_says_so_and_changes_nothing(
    console: Console,
) -> None:
    article_id, _ = sent_article(console)
    editor = console.client("editor")
    refused = editor.post(f"/staff/articles/{article_id}/retract", {"correction": "x" * 2001})
    assert refused.status_code == 400
    assert "the limit is 2,000" in text_of(refused.text)
    with console.engine.connect() as conn:
        assert conn.scalar(sa.select(issues.c.id).where(issues.c.kind == "correction")) is None


# --- sources ----------------------------------------------------------------------------------


def test_sources_page_shows_a_failing_feeds_error_and_backoff(console: Console) -> None:
    for minutes in (0, 1, 2):
        record_failure(
            console.engine,
            FEED,
            FeedError(FEED, "HTTP 503 Service Unavailable", status=503),
            now=NOW - timedelta(minutes=10 - minutes),
        )
    page = console.client("editor").get("/staff/sources")
    assert page.status_code == 200
    text = text_of(page.text)
    assert FEED in text
    assert "failing: 3 in a row" in text
    assert "HTTP 503 Service Unavailable" in text
    assert "backing off after 3 failures" in text
    assert "never fetched" in text  # the second feed
    assert "no hub" in text


# --- in a browser -----------------------------------------------------------------------------


def test_search_and_open_a_record_in_chromium_at_phone_and_desktop(
    browser: Any, db_url: str, shots: Path
) -> None:
    with serve(lambda base: make_settings(db_url, sources=SOURCES, **at(base))) as (
        _server,
        engine,
        settings,
    ):
        sub = signed_up(engine, "maria.long-address.for-a-phone-screen@example.org")
        make_subscriber(engine, email="other@example.org", name="Someone Else")
        account = add_account(engine, "admin@news.example.org", "admin", now=NOW)
        upsert_articles(
            engine,
            [make_article(title="Main gate closed for a long while today")],
            now=NOW,
            origin=feed_origin(FEED),
        )
        record_failure(engine, FEED, FeedError(FEED, "HTTP 503 Service Unavailable"), now=NOW)
        base = settings.site.base_url
        for name, viewport in (("phone", PHONE), ("desktop", DESKTOP)):
            # The served app runs on the real clock: the session opens now.
            with engine.begin() as conn:
                session_id = sessions.open_session(
                    conn, account, now=clock_now(), rules=sessions.Rules(), ip=None
                )
            cookie = sessions.cookie_value(settings.site.require_secret(), session_id)
            page = page_at(browser, viewport)
            page.context.add_cookies([{"name": sessions.COOKIE_NAME, "value": cookie, "url": base}])
            page.goto(base + "/staff/subscribers")
            page.fill("#q", "MARIA")
            page.click("button:has-text('Search')")
            page.wait_for_url("**/staff/subscribers?q=MARIA*")
            assert "other@example.org" not in page.content()
            page.screenshot(path=str(shots / f"console-subscribers-search-{name}.png"))
            assert fits(page), f"sideways scroll on the search page at {name} width"
            page.click(f"text={sub.email}")
            page.wait_for_url(f"**/staff/subscribers/{sub.id}")
            assert page.is_visible("text=Consent evidence")
            assert page.is_visible("text=203.0.113.9")
            page.screenshot(
                path=str(shots / f"console-subscriber-record-{name}.png"), full_page=True
            )
            assert fits(page), f"sideways scroll on the record page at {name} width"
            for what in ("articles", "sources"):
                page.goto(f"{base}/staff/{what}")
                assert page.is_visible(f"text={FEED}")
                page.screenshot(path=str(shots / f"console-{what}-{name}.png"), full_page=True)
                assert fits(page), f"sideways scroll on the {what} page at {name} width"
            page.context.close()


def test_subscribers_show_json_is_the_document_the_console_exports(
    console: Console, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from mailer.cli import cli

    monkeypatch.setenv("MAILER_SECRET_KEY", SECRET)
    monkeypatch.setattr("mailer.cli.subscribers.now", lambda: NOW)
    config = write_config(tmp_path / "mailer.toml", db_url)
    sub = signed_up(console.engine, "reader@example.org")
    result = CliRunner().invoke(
        cli,
        ["--config", str(config), "subscribers", "show", sub.email, "--format", "json"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    exported = console.client().post(f"/staff/subscribers/{sub.id}/export")
    assert json.loads(result.output) == json.loads(exported.text)


def test_each_way_in_records_its_origin_once(console: Console) -> None:
    from mailer.content.store import CLI_ORIGIN, Origin, latest, store_one

    engine = console.engine
    store_one(engine, make_article(title="Pushed"), now=NOW)
    typed = make_article(title="Typed")
    upsert_articles(engine, [typed], now=NOW, origin=CLI_ORIGIN)
    upsert_articles(engine, [make_article(title="Other")], now=NOW, origin=feed_origin(FEED))
    # An update of a stored article is not a new arrival: its origin stays the first one.
    edited = replace(typed, body="The body, corrected.")
    report = upsert_articles(engine, [edited], now=NOW + timedelta(hours=1), origin="feed:x")
    assert report.updated == 1
    found = {item.article.title: item.origin for item in latest(engine).articles}
    assert found == {
        "Pushed": Origin("push"),
        "Typed": Origin("cli"),
        "Other": Origin("feed", FEED),
    }
    assert str(found["Other"]) == f"feed {FEED}"
