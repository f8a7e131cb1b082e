"""Making an issue when the store is old: the by-arrival selection over 100,000 issue_articles rows.

An issue takes the articles its digest has not taken yet (``selection.select_for_issue``): for
each candidate article in the lookback, a probe into ``issue_articles`` joined to ``issues``.
This fills a database with a year of history (50,000 articles, 2,500 alert and 2,500 weekly
issues of 20 articles each: 100,000 issue_articles rows, every article taken twice, and the
alert digest's 52,559 empty issues of a year at one every 10 minutes), leaves the last day's
150 alerts untaken, and reports, on SQLite and PostgreSQL:

* the selection's plan (EXPLAIN QUERY PLAN / EXPLAIN ANALYZE);
* the median time of ``select_for_issue`` (the alert digest, 2 days of lookback) over 30 runs;
* the time of ``create_issue`` for the alert digest (1,000 subscribers), taking 5 of them.

Run from the repository root (PostgreSQL: a database ``mailer_selection`` is created on the
server of ``MAILER_BENCH_PG`` and dropped at the end)::

    .venv/bin/python -m bench.issue_selection
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from mailer.compose.rendering import Renderer
from mailer.content.selection import select_for_issue, taken_by
from mailer.db.engine import create_engine, migrate, refresh_statistics
from mailer.db.schema import (
    articles,
    issue_articles,
    issues,
    subscriber_digests,
    subscriber_topics,
    subscribers,
)
from mailer.issues.create import create_issue
from tests.factories import TOPICS, make_settings

PG_URL = os.environ.get("MAILER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
NOW = datetime(2026, 11, 20, 17, 30, tzinfo=UTC)
FRESH = 150  # the last day's alerts, not taken yet
ARTICLES = 50_000 + FRESH
PER_ISSUE = 20
ALERTS = {
    "key": "alerts",
    "name": "Base alerts",
    "subject": "Base alert",
    "schedule": "*/10 * * * *",
    "topics": ["base-alerts"],
    "max_articles": 5,
    "lookback_days": 2,
}


def fill(engine: sa.Engine) -> None:
    """A year of articles, each taken by one alert issue and one weekly issue."""
    migrate(engine)
    step = timedelta(days=365) / ARTICLES
    rows = []
    for n in range(ARTICLES):
        at = NOW - step * (ARTICLES - n)
        rows.append(
            {
                "guid": f"urn:bench:selection:{n}",
                "topic": TOPICS[0] if n % 3 == 0 or n >= ARTICLES - FRESH else TOPICS[n % 3],
                "title": f"Article {n}",
                "summary": "",
                "why_it_matters": "",
                "body": "",
                "link": None,
                "published_at": at,
                "expires_at": None,
                "content_hash": f"{n:064d}",
                "created_at": at,
                "updated_at": at,
            }
        )
    taken = ARTICLES - FRESH
    with engine.begin() as conn:
        conn.execute(articles.insert(), rows)
        issue_rows = []
        links = []
        issue_id = 0
        for digest in ("alerts", "weekly"):
            for start in range(0, taken, PER_ISSUE):
                issue_id += 1
                made = rows[min(start + PER_ISSUE, taken) - 1]["published_at"]
                issue_rows.append(
                    {
                        "id": issue_id,
                        "digest": digest,
                        "scheduled_for": made + timedelta(seconds=issue_id),
                        "window_start": None,
                        "window_end": made,
                        "subject": "s",
                        "topics": "base-alerts",
                        "status": "sent",
                        "created_at": made,
                    }
                )
                links += [
                    {"issue_id": issue_id, "article_id": a + 1, "position": a - start}
                    for a in range(start, min(start + PER_ISSUE, taken))
                ]
        # The alert digest's empty issues: one every 10 minutes for the year.
        slot = NOW - timedelta(days=365)
        while slot < NOW - timedelta(minutes=10):
            issue_id += 1
            issue_rows.append(
                {
                    "id": issue_id,
                    "digest": "alerts",
                    "scheduled_for": slot,
                    "window_start": None,
                    "window_end": slot,
                    "subject": "s",
                    "topics": "base-alerts",
                    "status": "empty",
                    "created_at": slot,
                }
            )
            slot += timedelta(minutes=10)
        conn.execute(issues.insert(), issue_rows)
        conn.execute(issue_articles.insert(), links)
        conn.execute(
            subscribers.insert(),
            [
                {
                    "uid": f"{n:032d}",
                    "email": f"r{n}@example.org",
                    "status": "active",
                    "created_at": NOW,
                    "updated_at": NOW,
                }
                for n in range(1_000)
            ],
        )
        conn.execute(
            subscriber_topics.insert(),
            [{"subscriber_id": n + 1, "topic": "base-alerts"} for n in range(1_000)],
        )
        conn.execute(
            subscriber_digests.insert(),
            [{"subscriber_id": n + 1, "digest": "alerts", "chosen_at": NOW} for n in range(1_000)],
        )
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(
                "SELECT setval(pg_get_serial_sequence('issues', 'id'),"
                " (SELECT max(id) FROM issues))"
            )
    for table in (articles, issues, issue_articles, subscribers, subscriber_topics):
        refresh_statistics(engine, table)
    if engine.dialect.name == "sqlite":
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")


def plan(engine: sa.Engine) -> str:
    query = (
        sa.select(articles.c.id)
        .where(
            articles.c.topic.in_(["base-alerts"]),
            articles.c.published_at > NOW - timedelta(days=2),
            articles.c.published_at <= NOW,
            articles.c.removed_at.is_(None),
            ~taken_by("alerts"),
        )
        .compile(engine, compile_kwargs={"literal_binds": True})
    )
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            return "\n".join(r[-1] for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {query}"))
        return "\n".join(r[0] for r in conn.exec_driver_sql(f"EXPLAIN ANALYZE {query}"))


def time_selection(engine: sa.Engine) -> tuple[float, Any]:
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        with engine.connect() as conn:
            chosen = select_for_issue(
                conn,
                digest_key="alerts",
                topics=["base-alerts"],
                lookback=timedelta(days=2),
                limit=5,
                now=NOW,
            )
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, chosen


def measure(name: str, url: str) -> None:
    engine = create_engine(url)
    try:
        started = time.perf_counter()
        fill(engine)
        with engine.connect() as conn:
            count = conn.execute(sa.select(sa.func.count()).select_from(issue_articles)).scalar()
        filled = time.perf_counter() - started
        print(f"\n== {name}: {count:,} issue_articles rows (filled in {filled:.1f} s)")
        print(plan(engine))
        median, chosen = time_selection(engine)
        print(
            f"select_for_issue: {len(chosen.articles)} taken, {chosen.left_over} left over; "
            f"median {median:.2f} ms over 30"
        )
        settings = make_settings(url, digests=[ALERTS])
        t0 = time.perf_counter()
        made = create_issue(
            engine,
            settings,
            settings.digest("alerts"),
            scheduled_for=NOW,
            now=NOW,
            render_subject=Renderer().render_subject,
        )
        print(
            f"create_issue: {made.articles} articles, {made.recipients} recipients "
            f"in {(time.perf_counter() - t0) * 1000:.1f} ms"
        )
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP INDEX ix_issue_articles_article")
        if engine.dialect.name == "sqlite":
            with engine.begin() as conn:
                conn.exec_driver_sql("ANALYZE")
        median, _ = time_selection(engine)
        print(f"without ix_issue_articles_article: select_for_issue median {median:.2f} ms")
    finally:
        engine.dispose()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        measure("SQLite", f"sqlite:///{Path(tmp) / 'selection.db'}")
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    name = "mailer_selection"
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        measure("PostgreSQL", PG_URL.rsplit("/", 1)[0] + "/" + name)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


if __name__ == "__main__":
    main()


__all__: list[Any] = []
