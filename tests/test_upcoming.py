"""``mailer digest upcoming``: the coming slots, and what the next issue would take now, equal
what the issue then takes (fixed clock, SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from mailer.cli import main
from mailer.content.store import upsert_articles
from mailer.db.engine import create_engine
from mailer.db.schema import (
    deliveries,
    issue_articles,
    subscriber_digests,
    subscriber_topics,
)
from mailer.errors import ConfigError
from mailer.issues.schedule import local_time
from mailer.issues.upcoming import upcoming
from tests.factories import (
    ALERTS,
    BASE_CONFIG,
    SECRET,
    make_article,
    make_issue,
    make_settings,
    make_subscriber,
    write_config,
)

ZONE = "America/New_York"
WEEKLY = BASE_CONFIG["digests"][0]
# A Wednesday before the fall-back of Sunday 1 November 2026 in New York.
BEFORE_DST_END = datetime(2026, 10, 28, 12, 0, tzinfo=UTC)


def test_slots_across_the_dst_change_keep_local_time(engine: sa.Engine, db_url: str) -> None:
    settings = make_settings(db_url, digests=[WEEKLY | {"timezone": ZONE}])
    (weekly,) = upcoming(engine, settings, now=BEFORE_DST_END, count=3)
    assert [local_time(s.at, ZONE) for s in weekly.slots] == [
        "Fri 30 Oct 2026 07:00 EDT",
        "Fri 6 Nov 2026 07:00 EST",
        "Fri 13 Nov 2026 07:00 EST",
    ]
    assert [s.at.astimezone(UTC).hour for s in weekly.slots] == [11, 12, 12]
    assert not any(s.held for s in weekly.slots)
    assert weekly.name == "Weekly digest"


def test_the_articles_listed_are_those_the_issue_takes(engine: sa.Engine, db_url: str) -> None:
    settings = make_settings(
        db_url, digests=[WEEKLY | {"timezone": ZONE, "topics": ["base-alerts"], "max_articles": 2}]
    )
    now = BEFORE_DST_END
    upsert_articles(
        engine,
        [
            make_article(published_at=now - timedelta(days=3)),
            make_article(published_at=now - timedelta(days=2)),
            make_article(published_at=now - timedelta(days=1), topic="local-events"),
        ],
        now=now - timedelta(hours=5),
    )
    upsert_articles(engine, [make_article(published_at=now - timedelta(hours=2))], now=now)
    (weekly,) = upcoming(engine, settings, now=now)
    assert len(weekly.articles) == 2 and weekly.left_over == 1
    assert {a.topic for a in weekly.articles} == {"base-alerts"}
    assert {a.arrived for a in weekly.articles} <= {now, now - timedelta(hours=5)}

    created = make_issue(engine, settings, at=weekly.slots[0].at, made=now)
    with engine.connect() as conn:
        taken = conn.execute(
            sa.select(issue_articles.c.article_id)
            .where(issue_articles.c.issue_id == created.issue_id)
            .order_by(issue_articles.c.position)
        ).scalars()
        assert list(taken) == [a.id for a in weekly.articles]


def test_recipient_counts_by_topic_set_equal_the_snapshot(engine: sa.Engine, db_url: str) -> None:
    digest = WEEKLY | {"timezone": ZONE, "topics": ["base-alerts", "local-events"]}
    settings = make_settings(db_url, digests=[digest])
    now = BEFORE_DST_END
    upsert_articles(engine, [make_article(published_at=now - timedelta(days=1))], now=now)
    make_subscriber(engine, topics=["base-alerts"])
    make_subscriber(engine, topics=["base-alerts", "local-events", "military-news"])
    make_subscriber(engine, topics=["base-alerts", "local-events"])
    make_subscriber(engine, topics=["local-events"])  # no article in their topics
    make_subscriber(engine, topics=["base-alerts"], status="unsubscribed")
    paused = make_subscriber(engine, topics=["base-alerts"])
    with engine.begin() as conn:
        conn.execute(
            subscriber_digests.update()
            .where(
                subscriber_digests.c.subscriber_id == paused.id,
                subscriber_digests.c.digest == settings.digests[0].key,
            )
            .values(paused_until=now + timedelta(days=9))
        )

    (weekly,) = upcoming(engine, settings, now=now)
    assert dict(weekly.recipients) == {
        ("base-alerts", "local-events"): 2,
        ("base-alerts",): 1,
    }

    created = make_issue(engine, settings, at=weekly.slots[0].at, made=now)
    assert created.recipients == weekly.total_recipients == 3
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(subscriber_topics.c.subscriber_id, subscriber_topics.c.topic)
            .join(deliveries, deliveries.c.subscriber_id == subscriber_topics.c.subscriber_id)
            .where(
                deliveries.c.issue_id == created.issue_id,
                subscriber_topics.c.topic.in_(digest["topics"]),
            )
        ).all()
    sets: dict[int, list[str]] = {}
    for row in rows:
        sets.setdefault(row.subscriber_id, []).append(row.topic)
    snapshot = Counter(tuple(sorted(t)) for t in sets.values())
    assert snapshot == Counter(dict(weekly.recipients))


def test_no_articles_means_no_recipients(engine: sa.Engine, db_url: str) -> None:
    settings = make_settings(db_url)
    make_subscriber(engine)
    (weekly,) = upcoming(engine, settings, now=BEFORE_DST_END)
    assert weekly.articles == () and weekly.recipients == ()
    assert make_issue(engine, settings, at=weekly.slots[0].at).recipients == 0


def test_a_slot_in_quiet_hours_says_when_it_goes_out(engine: sa.Engine, db_url: str) -> None:
    nightly = WEEKLY | {
        "schedule": "0 22 * * *",
        "timezone": ZONE,
        "quiet_hours": "21:00-06:00",
    }
    alerts = ALERTS | {"schedule": "0 22 * * *", "timezone": ZONE, "quiet_hours": "21:00-06:00"}
    settings = make_settings(db_url, digests=[nightly, alerts])
    bulk, alert = upcoming(engine, settings, now=BEFORE_DST_END, count=2)
    assert [local_time(s.goes_out, ZONE) for s in bulk.slots] == [
        "Thu 29 Oct 2026 06:00 EDT",
        "Fri 30 Oct 2026 06:00 EDT",
    ]
    assert all(s.held for s in bulk.slots)
    # An alert never waits for quiet hours.
    assert [s.goes_out for s in alert.slots] == [s.at for s in alert.slots]


def test_only_the_key_asked_for(engine: sa.Engine, db_url: str) -> None:
    settings = make_settings(db_url, digests=[WEEKLY, ALERTS])
    (alerts,) = upcoming(engine, settings, now=BEFORE_DST_END, key="alerts", count=5)
    assert alerts.key == "alerts" and len(alerts.slots) == 5
    with pytest.raises(ConfigError, match="known: weekly, alerts"):
        upcoming(engine, settings, now=BEFORE_DST_END, key="nope")


def test_upcoming_does_not_wait_for_a_writer_on_sqlite(
    tmp_path: Path, sqlite_template: Path
) -> None:
    path = tmp_path / "mailer.db"
    path.write_bytes(sqlite_template.read_bytes())
    engine = create_engine(f"sqlite:///{path}")
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # a send or an ingest, its write transaction open
        started = time.monotonic()
        (weekly,) = upcoming(engine, make_settings(f"sqlite:///{path}"), now=BEFORE_DST_END)
        assert time.monotonic() - started < 1.0  # a listing reads beside the writer
        assert weekly.key == "weekly"
    finally:
        other.execute("ROLLBACK")
        other.close()
        engine.dispose()


@pytest.fixture
def config(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MAILER_SECRET_KEY", SECRET)
    return write_config(tmp_path / "mailer.toml", db_url)


def test_cli_unknown_key_is_one_line_and_exit_1(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "digest", "upcoming", "nope"])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "no digest 'nope'" in lines[0] and "known: weekly" in lines[0]


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_cli_prints_each_format(
    config: Path, engine: sa.Engine, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Commands run on the real clock: an article of the last hour is within the lookback.
    real_now = datetime.now(UTC)
    upsert_articles(
        engine,
        [make_article(title="Gate 3 closed", published_at=real_now - timedelta(hours=1))],
        now=real_now,
    )
    make_subscriber(engine)
    main(["--config", str(config), "digest", "upcoming", "--count", "2", "--format", fmt])
    output = capsys.readouterr().out
    assert "Gate 3 closed" in output
    if fmt == "json":
        (weekly,) = json.loads(output)
        assert len(weekly["slots"]) == 2 and weekly["recipients"][0]["count"] == 1
    elif fmt == "table":
        assert "later slots show no articles yet" in output
