"""Articles by arrival: each issue takes what its digest has not taken yet, within the lookback.

Every case of issue 12 "What was seen" 1–2 with a fixed clock, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from mailer.compose.rendering import Renderer
from mailer.config.settings import Settings
from mailer.content.article import ParsedArticle
from mailer.content.feeds.parse import parse_feed
from mailer.content.files import parse_article
from mailer.content.selection import taken_by
from mailer.content.store import upsert_articles
from mailer.db.engine import create_engine, migrate
from mailer.db.schema import articles, issue_articles, metadata
from mailer.errors import ArticleError
from mailer.issues.create import IssueCreated
from mailer.issues.progress import cancel, list_issues, summarize
from mailer.issues.staff import preview_next
from tests.factories import (
    ALERTS,
    TOPICS,
    config_dict,
    make_issue,
    make_settings,
    make_subscriber,
)

NEW_YORK = ZoneInfo("America/New_York")
WEEKLY = config_dict()["digests"][0] | {"timezone": "America/New_York"}
_counter = iter(range(1, 10**9))


def settings_for(db_url: str) -> Settings:
    return make_settings(db_url, digests=[WEEKLY, ALERTS])


def store(
    engine: sa.Engine, *, published: datetime, arrived: datetime, **overrides: Any
) -> ParsedArticle:
    n = next(_counter)
    values: dict[str, Any] = {
        "guid": f"urn:test:arrival:{n}",
        "topic": "base-alerts",
        "title": f"Alert {n}",
        "summary": f"Summary {n}.",
        "why_it_matters": "",
        "body": f"Body {n}.",
        "link": None,
        "published_at": published,
    }
    values.update(overrides)
    item = ParsedArticle(**values)
    assert upsert_articles(engine, [item], now=arrived).added == 1
    return item


def taken(engine: sa.Engine, issue_id: int) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.scalars(
                sa.select(articles.c.guid)
                .join(issue_articles, issue_articles.c.article_id == articles.c.id)
                .where(issue_articles.c.issue_id == issue_id)
                .order_by(issue_articles.c.position)
            )
        )


def at(hour: int, minute: int, second: float = 0.0, day: int = 20) -> datetime:
    """A UTC instant on November ``day``, 2026."""
    whole = int(second)
    micro = round((second - whole) * 1_000_000)
    return datetime(2026, 11, day, hour, minute, whole, micro, tzinfo=UTC)


# ------------------------------------------------------------------ "What was seen" 1


def test_an_alert_fetched_after_its_slot_goes_in_the_next_alert_issue_once(
    engine: sa.Engine, db_url: str
) -> None:
    settings = settings_for(db_url)
    make_subscriber(engine, email="ann@example.org", topics=["base-alerts"])
    made_1730 = make_issue(engine, settings, "alerts", at(17, 30), at(17, 30, 0.02))
    # Published 17:27, fetched 17:30, after the 17:30 slot's issue was made.
    late = store(engine, published=at(17, 27), arrived=at(17, 30, 4))
    made_1740 = make_issue(engine, settings, "alerts", at(17, 40), at(17, 40, 0.02))
    made_1750 = make_issue(engine, settings, "alerts", at(17, 50), at(17, 50, 0.02))
    assert taken(engine, made_1730.issue_id) == []
    assert taken(engine, made_1740.issue_id) == [late.guid]
    assert taken(engine, made_1750.issue_id) == []
    assert made_1740.recipients == 1
    assert summarize(engine, made_1730.issue_id).status == "empty"


def test_issues_are_listed_newest_slot_first_each_with_its_own_counts(
    engine: sa.Engine, db_url: str
) -> None:
    settings = settings_for(db_url)
    make_subscriber(engine, email="ann@example.org", topics=["base-alerts"])
    make_subscriber(engine, email="bob@example.org", topics=["base-alerts"])
    empty = make_issue(engine, settings, "alerts", at(17, 30))
    store(engine, published=at(17, 31), arrived=at(17, 32))
    full = make_issue(engine, settings, "alerts", at(17, 40))
    listed = list_issues(engine, digest="alerts")
    assert [s.id for s in listed] == [full.issue_id, empty.issue_id]
    assert listed == [summarize(engine, full.issue_id), summarize(engine, empty.issue_id)]
    assert [s.counts for s in listed] == [{"queued": 2}, {}]
    assert list_issues(engine, digest="alerts", limit=1) == listed[:1]
    assert list_issues(engine, digest="weekly") == []


@pytest.mark.parametrize(
    ("published", "arrived"),
    [(0.0, 0.1), (-0.4, 0.1), (0.0, 0.0)],
    ids=["stored-0.1s-after-the-slot", "same-second-as-the-slot", "same-instant-as-the-slot"],
)
def test_an_article_stored_just_after_its_slot_was_built_goes_in_the_next_issue_once(
    engine: sa.Engine, db_url: str, published: float, arrived: float
) -> None:
    settings = settings_for(db_url)
    slot = at(17, 30)
    first = make_issue(engine, settings, "alerts", slot)  # built at the slot's instant
    item = store(
        engine,
        published=slot + timedelta(seconds=published),
        arrived=slot + timedelta(seconds=arrived),
    )
    nxt = make_issue(engine, settings, "alerts", at(17, 40))
    after = make_issue(engine, settings, "alerts", at(17, 50))
    assert taken(engine, first.issue_id) == []
    assert taken(engine, nxt.issue_id) == [item.guid]
    assert taken(engine, after.issue_id) == []


def test_a_weekly_article_fetched_after_the_friday_issue_goes_in_next_fridays(
    engine: sa.Engine, db_url: str
) -> None:
    settings = settings_for(db_url)
    friday = datetime(2026, 11, 20, 7, 0, tzinfo=NEW_YORK)
    thursday_night = datetime(2026, 11, 19, 23, 30, tzinfo=NEW_YORK)
    this_week = make_issue(engine, settings, "weekly", friday)
    item = store(
        engine,
        topic="military-news",
        published=thursday_night,
        arrived=friday + timedelta(minutes=5),
    )
    next_week = make_issue(engine, settings, "weekly", friday + timedelta(days=7))
    week_after = make_issue(engine, settings, "weekly", friday + timedelta(days=14))
    assert taken(engine, this_week.issue_id) == []
    assert taken(engine, next_week.issue_id) == [item.guid]
    assert taken(engine, week_after.issue_id) == []


# ------------------------------------------------------------------ "What was seen" 2


def test_a_first_issue_takes_only_the_lookback(engine: sa.Engine, db_url: str) -> None:
    settings = settings_for(db_url)
    now = at(17, 30)
    by_age = {
        days: store(engine, published=now - timedelta(days=days), arrived=now - timedelta(hours=1))
        for days in (1, 3, 6, 8, 30)
    }
    weekly = make_issue(engine, settings, "weekly", now)
    alerts = make_issue(engine, settings, "alerts", now)  # lookback_days = 2
    assert set(taken(engine, weekly.issue_id)) == {by_age[d].guid for d in (1, 3, 6)}
    assert taken(engine, alerts.issue_id) == [by_age[1].guid]
    # What the lookback left out never comes back in a later issue.
    later = make_issue(engine, settings, "weekly", now + timedelta(days=7))
    assert taken(engine, later.issue_id) == []


def test_an_updated_article_is_not_taken_again(engine: sa.Engine, db_url: str) -> None:
    settings = make_settings(
        db_url, digests=[WEEKLY | {"include_updates": True}, ALERTS | {"include_updates": True}]
    )
    item = store(engine, published=at(17, 0), arrived=at(17, 1))
    first = make_issue(engine, settings, "alerts", at(17, 10))
    edited = ParsedArticle(**{**item.__dict__, "title": "Alert (corrected)"})
    assert upsert_articles(engine, [edited], now=at(17, 12)).updated == 1
    second = make_issue(engine, settings, "alerts", at(17, 20))
    assert taken(engine, first.issue_id) == [item.guid]
    assert taken(engine, second.issue_id) == []


def test_expired_articles_and_events_that_are_over_never_go_out(
    engine: sa.Engine, db_url: str
) -> None:
    settings = settings_for(db_url)
    now = at(17, 30)
    store(engine, published=now - timedelta(days=1), arrived=now, expires_at=now)
    event = parse_article(
        '+++\ntitle = "Riverwalk market"\ntopic = "local-events"\n'
        "published = 2026-11-18T12:00:00Z\nevent_end = 2026-11-19T22:00:00Z\n+++\nBody.\n",
        source="market.md",
        known_topics=TOPICS,
        now=now,
    )
    ongoing = parse_article(
        "---\ntitle: Makers market\ntopic: local-events\npublished: 2026-11-18T12:00:00Z\n"
        "ends: 2026-11-21T22:00:00Z\n---\nBody.\n",
        source="makers.md",
        known_topics=TOPICS,
        now=now,
    )
    upsert_articles(engine, [event, ongoing], now=now)
    weekly = make_issue(engine, settings, "weekly", now)
    assert taken(engine, weekly.issue_id) == [ongoing.guid]
    # Over by the next issue: that one takes nothing either (and never takes them later).
    assert (
        taken(engine, make_issue(engine, settings, "weekly", now + timedelta(days=2)).issue_id)
        == []
    )


def test_event_end_is_read_from_front_matter_and_feeds(caplog: pytest.LogCaptureFixture) -> None:
    def front(extra: str) -> ParsedArticle:
        text = f'+++\ntitle = "T"\npublished = 2026-11-18T12:00:00Z\n{extra}+++\nBody.\n'
        return parse_article(
            text, source="e.md", default_topic="local-events", known_topics=TOPICS, now=at(12, 0)
        )

    assert front("event_end = 2026-11-21\n").expires_at == datetime(2026, 11, 21, tzinfo=UTC)
    assert front("ends = 2026-11-21T18:00:00Z\n").expires_at == at(18, 0, day=21)
    both = front("expires = 2026-11-22\nevent_end = 2026-11-21\n")
    assert both.expires_at == datetime(2026, 11, 21, tzinfo=UTC)
    with pytest.raises(ArticleError, match="give 'event_end' or 'ends', not both"):
        front("ends = 2026-11-21\nevent_end = 2026-11-21\n")
    with pytest.raises(ArticleError, match=r"e\.md:4: event_end .* is not after published"):
        front("event_end = 2026-11-17\n")
    feed = (
        b'<?xml version="1.0"?><rss version="2.0" '
        b'xmlns:ev="http://purl.org/rss/1.0/modules/event/"><channel><title>Events</title>'
        b"<item><title>Makers market</title><link>https://news.example.org/e/1</link>"
        b"<pubDate>Wed, 18 Nov 2026 12:00:00 GMT</pubDate>"
        b"<ev:enddate>2026-11-21T17:00:00-05:00</ev:enddate></item>"
        b"<item><title>Turkey trot</title><link>https://news.example.org/e/2</link>"
        b"<ev:enddate>2026-11-26</ev:enddate></item>"
        b"<item><title>Parade</title><link>https://news.example.org/e/3</link>"
        b"<ev:enddate>next Tuesday</ev:enddate></item></channel></rss>"
    )
    caplog.set_level(logging.WARNING)
    parsed = parse_feed(feed, url="https://news.example.org/f", topic="local-events", now=at(12, 0))
    assert [a.expires_at for a in parsed.articles] == [
        at(22, 0, day=21),
        datetime(2026, 11, 26, 23, 59, 59, tzinfo=UTC),
        None,  # kept, and said
    ]
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage().startswith("event end date not understood")
    assert getattr(warning, "value", None) == "next Tuesday"


# ------------------------------------------------------------------ across digests, leftovers


def test_an_alert_is_still_taken_once_by_the_weekly_digest(engine: sa.Engine, db_url: str) -> None:
    settings = settings_for(db_url)
    item = store(engine, published=at(9, 0), arrived=at(9, 1))
    alert = make_issue(engine, settings, "alerts", at(9, 10))
    weekly = make_issue(engine, settings, "weekly", at(12, 0))
    weekly_after = make_issue(engine, settings, "weekly", at(12, 0) + timedelta(days=7))
    assert taken(engine, alert.issue_id) == [item.guid]
    assert taken(engine, weekly.issue_id) == [item.guid]
    assert taken(engine, weekly_after.issue_id) == []


def test_what_max_articles_leaves_goes_in_the_next_issue_oldest_arrival_first(
    engine: sa.Engine, db_url: str
) -> None:
    settings = settings_for(db_url)  # alerts: max_articles = 5
    # Seven alerts, arriving a minute apart, the newest published first in arrival order.
    items = [
        store(engine, published=at(16, 50) - timedelta(minutes=n), arrived=at(17, 0 + n))
        for n in range(7)
    ]
    preview = preview_next(
        engine, settings, settings.digest("alerts"), now=at(17, 10), renderer=Renderer()
    )
    first = make_issue(engine, settings, "alerts", at(17, 10))
    assert (first.articles, first.left_over) == (5, 2)
    # Shown newest published first; taken by arrival.
    assert taken(engine, first.issue_id) == [i.guid for i in items[:5]]
    late = store(engine, published=at(17, 12), arrived=at(17, 15))
    second = make_issue(engine, settings, "alerts", at(17, 20))
    assert (second.articles, second.left_over) == (3, 0)
    assert taken(engine, second.issue_id) == [late.guid, items[5].guid, items[6].guid]
    assert (preview.articles, preview.left_over) == (5, 2)


def test_a_cancelled_issue_gives_its_articles_to_the_next_one(
    engine: sa.Engine, db_url: str
) -> None:
    settings = settings_for(db_url)
    make_subscriber(engine, email="ann@example.org", topics=["base-alerts"])
    item = store(engine, published=at(9, 0), arrived=at(9, 1))
    first = make_issue(engine, settings, "alerts", at(9, 10))
    cancel(engine, first.issue_id, now=at(9, 11))
    second = make_issue(engine, settings, "alerts", at(9, 20))
    third = make_issue(engine, settings, "alerts", at(9, 30))
    assert taken(engine, first.issue_id) == [item.guid]
    assert taken(engine, second.issue_id) == [item.guid]
    assert taken(engine, third.issue_id) == []


def test_preview_shows_exactly_what_the_next_issue_takes(engine: sa.Engine, db_url: str) -> None:
    settings = settings_for(db_url)
    digest = settings.digest("alerts")
    old = store(engine, published=at(9, 0), arrived=at(9, 1))
    make_issue(engine, settings, "alerts", at(9, 10))
    store(engine, published=at(8, 0), arrived=at(9, 12), title="Backdated alert")
    for n in range(5):
        store(engine, published=at(9, 13 + n), arrived=at(9, 14 + n))
    store(engine, published=at(9, 20), arrived=at(9, 21), expires_at=at(9, 25))
    when = at(9, 30)
    preview = preview_next(engine, settings, digest, now=when, renderer=Renderer())
    created = make_issue(engine, settings, "alerts", when)
    with engine.connect() as conn:
        ids = list(
            conn.scalars(
                sa.select(issue_articles.c.article_id)
                .where(issue_articles.c.issue_id == created.issue_id)
                .order_by(issue_articles.c.position)
            )
        )
    assert list(preview.article_ids) == ids
    assert (preview.articles, preview.left_over) == (created.articles, created.left_over) == (5, 1)
    assert "Backdated alert" in preview.text
    assert old.title not in preview.text


# ------------------------------------------------------------------ concurrency and plans


@pytest.fixture
def pg_url(postgres_url: str) -> Iterator[str]:
    engine = create_engine(postgres_url)
    with engine.begin() as conn:
        names = ", ".join(f'"{t.name}"' for t in metadata.sorted_tables)
        conn.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
    engine.dispose()
    yield postgres_url


@pytest.mark.postgres
def test_two_issues_of_one_digest_made_at_once_never_share_an_article(pg_url: str) -> None:
    settings = settings_for(pg_url)
    engine_a, engine_b = create_engine(pg_url), create_engine(pg_url)
    try:
        item = store(engine_a, published=at(9, 0), arrived=at(9, 1))
        selected, release = threading.Event(), threading.Event()

        @sa.event.listens_for(engine_a, "after_cursor_execute")
        def pause(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
            if statement.startswith("INSERT INTO issue_articles"):
                selected.set()
                release.wait(timeout=30)

        results: dict[str, IssueCreated] = {}

        def make(name: str, engine: sa.Engine, slot: datetime) -> None:
            results[name] = make_issue(engine, settings, "alerts", slot)

        a = threading.Thread(target=make, args=("a", engine_a, at(9, 10)))
        a.start()
        assert selected.wait(timeout=30)
        b = threading.Thread(target=make, args=("b", engine_b, at(9, 20)))
        b.start()
        # Hold A's transaction open until B waits for the digest's lock (or, without it, ends).
        deadline = time.monotonic() + 20
        with engine_a.connect() as probe:
            while b.is_alive() and time.monotonic() < deadline:
                waiting = probe.execute(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'"
                    )
                ).scalar_one()
                probe.rollback()
                if waiting:
                    break
                time.sleep(0.02)
        release.set()
        a.join(timeout=30)
        b.join(timeout=30)
        assert taken(engine_a, results["a"].issue_id) == [item.guid]
        assert taken(engine_a, results["b"].issue_id) == []
    finally:
        engine_a.dispose()
        engine_b.dispose()


def test_sqlite_probes_whether_a_digest_took_an_article_through_its_index(
    tmp_path: Path,
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'plan.db'}")
    try:
        migrate(engine)
        query = (
            sa.select(articles.c.id)
            .where(taken_by("alerts"))
            .compile(engine, compile_kwargs={"literal_binds": True})
        )
        with engine.connect() as conn:
            plan = " ".join(row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {query}"))
    finally:
        engine.dispose()
    assert "ix_issue_articles_article" in plan
