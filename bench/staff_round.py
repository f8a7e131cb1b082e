"""What the staff round and an issue's report cost on a production-sized store.

``mailer run`` runs the staff round every ``[scheduler].poll_seconds`` (5 s by default): the
review windows, the slots after review, the reports of issues that ended, missed slots,
stalled issues, failing feeds, the 30-day rates. ``mailer issues report ID`` builds one
issue's report. Both read the ledger, which grows by one row per recipient per issue.

This fills a fresh database with ``--n`` active subscribers (seven topic variants), a month of
history (four weekly issues of ``n`` deliveries each, mostly sent, some bounced, failed or
cancelled with a few distinct replies; bounce, complaint and unsubscribe events after each),
the alert digest's issues of the last two hours, three feeds (one failing), and one weekly
issue still sending with rows waiting. Then, with a fixed ``now``, it times each step of
one round (every step run, as in the first round of a process), the whole round, and
``build_report`` of the last full issue, ``--runs`` times each, and prints the median and
range; and the plans of the slowest queries.

Run from the repository root (PostgreSQL: a database ``mailer_bench_staff_round`` is created
on the server of ``MAILER_BENCH_PG`` and dropped at the end)::

    .venv/bin/python -m bench.staff_round --n 100000 --db both --runs 5
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench._lib import VARIANTS, machine, median_range
from mailer.compose.rendering import Renderer
from mailer.config.settings import Settings
from mailer.db.engine import create_engine, migrate, refresh_statistics
from mailer.db.schema import (
    SENDING_ROW,
    WAITING_ROW,
    deliveries,
    events,
    feed_state,
    issues,
    subscriber_digests,
    subscriber_topics,
    subscribers,
)
from mailer.issues import report
from mailer.issues.progress import load_content, reasons
from mailer.issues.report import build_report
from mailer.issues.review import round_steps
from mailer.staff.reports import queue_reports
from mailer.staff.rounds import staff_steps
from tests.factories import ALERTS, make_settings

PG_URL = os.environ.get("MAILER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
PG_NAME = "mailer_bench_staff_round"
# A Friday 13:00 UTC: the weekly issue of 12:00 (07:00 in New York) is still going out.
NOW = datetime(2026, 11, 27, 13, 0, tzinfo=UTC)
WEEKS = 4  # full weekly issues before this one
FEEDS = (
    "https://feeds.example.org/base-alerts.rss",
    "https://feeds.example.org/local-events.rss",
    "https://feeds.example.org/military-news.rss",
)
# Per 1,000 recipients of a full issue (by subscriber id modulo 1,000).
BOUNCED = 12  # 1.2 %: refused at send time (no sent_at) or bounced later by a DSN
FAILED = 5
CANCELLED = 3
REPLIES = {
    "bounced": ("550 5.1.1 <r@example.org>: user unknown", "552 5.2.2 mailbox full"),
    "failed": ("421 4.7.0 try again later", "451 4.3.0 temporary local problem"),
    "deferred": ("450 4.2.1 rate limited, slow down",),
}


def settings_for(url: str) -> Settings:
    return make_settings(
        url,
        digests=[
            {
                "key": "weekly",
                "name": "Weekly digest",
                "subject": "Weekly",
                "schedule": "0 7 * * fri",
                "topics": ["base-alerts", "local-events", "military-news"],
                "max_articles": 20,
                "review_minutes": 120,
            },
            ALERTS,
        ],
        staff={"emails": ["editor@news.example.org"]},
        sources=[{"type": "feed", "url": u, "topic": "base-alerts"} for u in FEEDS],
    )


# ------------------------------------------------------------------ the fill


def _at(dt: datetime) -> Any:
    return sa.literal(dt, deliveries.c.sent_at.type)


def _spread(key: Any, start: datetime, span: timedelta, buckets: int = 60) -> Any:
    """A timestamp from ``start`` over ``span`` chosen by ``key % buckets`` (portable SQL:
    neither database's date arithmetic is the other's)."""
    step = span / buckets
    return sa.case(
        *((key % buckets == b, _at(start + step * b)) for b in range(buckets)),
        else_=_at(start),
    )


def _json(conn: sa.Connection, **pairs: Any) -> Any:
    """A JSON object built in SQL."""
    args: list[Any] = []
    for k, v in pairs.items():
        args += [sa.literal(k), v]
    name = "json_build_object" if conn.dialect.name == "postgresql" else "json_object"
    return getattr(sa.func, name)(*args)


def fill(engine: sa.Engine, n: int) -> None:
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(
            subscribers.insert(),
            [
                {
                    "id": i + 1,
                    "uid": f"{i:032d}",
                    "email": f"reader{i}@example.org",
                    "status": "active",
                    "created_at": NOW - timedelta(days=60),
                    "updated_at": NOW - timedelta(days=60),
                    "confirmed_at": NOW - timedelta(days=60),
                }
                for i in range(n)
            ],
        )
        conn.execute(
            subscriber_digests.insert(),
            [
                {"subscriber_id": i + 1, "digest": key, "chosen_at": NOW - timedelta(days=60)}
                for i in range(n)
                for key in ("weekly", "alerts")
            ],
        )
        conn.execute(
            subscriber_topics.insert(),
            [
                {"subscriber_id": i + 1, "topic": t}
                for i in range(n)
                for t in VARIANTS[i % len(VARIANTS)]
            ],
        )
        issue_rows = []
        for w in range(WEEKS, -1, -1):
            slot = NOW - timedelta(hours=1) - timedelta(weeks=w)
            final = w > 0
            issue_rows.append(
                {
                    "digest": "weekly",
                    "scheduled_for": slot,
                    "window_end": slot,
                    "subject": f"Weekly of {slot:%d %B}",
                    "topics": "base-alerts,local-events,military-news",
                    "status": "sent" if final else "sending",
                    "created_at": slot - timedelta(hours=2),
                    "completed_at": slot + timedelta(hours=1) if final else None,
                    "reported_at": slot + timedelta(hours=1) if final else None,
                }
            )
        # The alert digest's slots of the last two hours, all made (empty): nothing missed.
        slot = NOW - timedelta(hours=2)
        while slot <= NOW:
            issue_rows.append(
                {
                    "digest": "alerts",
                    "scheduled_for": slot,
                    "window_end": slot,
                    "subject": "Base alert",
                    "topics": "base-alerts",
                    "status": "empty",
                    "created_at": slot,
                    "completed_at": slot,
                    "reported_at": None,
                }
            )
            slot += timedelta(minutes=10)
        conn.execute(issues.insert(), issue_rows)
        weekly = conn.execute(
            sa.select(issues.c.id, issues.c.scheduled_for, issues.c.status)
            .where(issues.c.digest == "weekly")
            .order_by(issues.c.id)
        ).all()
        for issue_id, slot, status in weekly:
            _deliveries(conn, issue_id, slot, final=status == "sent")
        for issue_id, _slot, status in weekly:
            if status == "sent":
                _events(conn, issue_id)
        conn.execute(
            feed_state.insert(),
            [
                {
                    "url": url,
                    "last_status": 200 if i else 503,
                    "last_fetched_at": NOW - timedelta(minutes=3),
                    "last_success_at": NOW - timedelta(minutes=3 if i else 200),
                    "last_error": None if i else "HTTP 503 Service Unavailable",
                    "consecutive_failures": 0 if i else 40,
                }
                for i, url in enumerate(FEEDS)
            ],
        )
    for table in (subscribers, subscriber_topics, issues, deliveries, events, feed_state):
        refresh_statistics(engine, table)
    if engine.dialect.name == "sqlite":
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")


def _deliveries(conn: sa.Connection, issue_id: int, slot: datetime, *, final: bool) -> None:
    """One row per subscriber, by INSERT … SELECT: statuses and replies by id modulo 1,000."""
    s = subscribers.c.id
    k = s % 1000
    sent_at = _spread(s, slot, timedelta(minutes=50))
    if final:
        status = sa.case(
            (k < BOUNCED, "bounced"),
            (k < BOUNCED + FAILED, "failed"),
            (k < BOUNCED + FAILED + CANCELLED, "cancelled"),
            else_="sent",
        )
        reply = sa.case(
            (
                k < BOUNCED,
                sa.case((k % 2 == 0, REPLIES["bounced"][0]), else_=REPLIES["bounced"][1]),
            ),
            (
                k < BOUNCED + FAILED,
                sa.case((k % 2 == 0, REPLIES["failed"][0]), else_=REPLIES["failed"][1]),
            ),
            (k < BOUNCED + FAILED + CANCELLED, sa.null()),
            else_="250 2.0.0 Ok: queued",
        )
        # Half the bounces were refused at send time (no sent_at), half bounced by a DSN.
        sent = sa.case(
            (k < BOUNCED / 2, sa.null()),
            (k < BOUNCED, sent_at),
            (k < BOUNCED + FAILED + CANCELLED, sa.null()),
            else_=sent_at,
        )
        attempts = sa.case((k < BOUNCED + FAILED, 3), (k % 50 == 0, 2), else_=1)
        lease = sa.null()
        next_at = _at(slot)
    else:
        # Going out: the first 60 % sent, then 5 % deferred, then the rest queued.
        status = sa.case((k < 600, "sent"), (k < 650, "deferred"), else_="queued")
        reply = sa.case(
            (k < 600, "250 2.0.0 Ok: queued"), (k < 650, REPLIES["deferred"][0]), else_=sa.null()
        )
        sent = sa.case((k < 600, _spread(s, slot, timedelta(minutes=55))), else_=sa.null())
        attempts = sa.case((k < 600, 1), (k < 650, 1), else_=0)
        lease = sa.null()
        next_at = sa.case((k < 650, _at(slot)), else_=_at(NOW - timedelta(minutes=1)))
    updated = sa.func.coalesce(sent, _at(slot + timedelta(minutes=55)))
    message_id = (
        sa.literal(f"<{issue_id}.") + sa.cast(s, sa.String) + sa.literal("@news.example.org>")
    )
    conn.execute(
        deliveries.insert().from_select(
            [
                "issue_id",
                "subscriber_id",
                "status",
                "attempts",
                "next_attempt_at",
                "lease_expires_at",
                "message_id",
                "last_reply",
                "created_at",
                "updated_at",
                "sent_at",
            ],
            sa.select(
                sa.literal(issue_id),
                s,
                status,
                attempts,
                next_at,
                lease,
                message_id,
                reply,
                _at(slot),
                updated,
                sent,
            ).order_by(s),
        )
    )


def _events(conn: sa.Connection, issue_id: int) -> None:
    """After an issue: a bounce event per bounced delivery (and the subscriber's status
    change naming it), complaints naming a message, reader unsubscribes, within 72 hours."""
    d = deliveries.c
    k = (d.subscriber_id + issue_id) % 1000
    of_issue = d.issue_id == issue_id
    report = sa.literal("smtp:") + d.message_id
    cols = ["subscriber_id", "kind", "at", "detail"]
    bounced = sa.and_(of_issue, d.status == "bounced")
    conn.execute(
        events.insert().from_select(
            cols,
            sa.select(
                d.subscriber_id,
                sa.literal("bounce"),
                d.updated_at,
                _json(conn, type="hard", message_id=d.message_id, report=report),
            ).where(bounced),
        )
    )
    conn.execute(
        events.insert().from_select(
            cols,
            sa.select(
                d.subscriber_id, sa.literal("bounced"), d.updated_at, _json(conn, report=report)
            ).where(bounced),
        )
    )
    # One complaint in 2,000 recipients naming its message; one unsubscribe in 200.
    conn.execute(
        events.insert().from_select(
            cols,
            sa.select(
                d.subscriber_id,
                sa.literal("complaint"),
                d.updated_at,
                _json(conn, message_id=d.message_id, report=sa.literal("arf:") + d.message_id),
            ).where(of_issue, d.status == "sent", d.subscriber_id % 2000 == 777),
        )
    )
    conn.execute(
        events.insert().from_select(
            cols,
            sa.select(
                d.subscriber_id,
                sa.literal("unsubscribed"),
                d.updated_at,
                _json(conn, source=sa.literal("web")),
            ).where(of_issue, d.status == "sent", k % 200 == 99),
        )
    )


# ------------------------------------------------------------------ the measurements


def _timed(call: Callable[[], object], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def steps(engine: sa.Engine, settings: Settings) -> list[tuple[str, Callable[[datetime], object]]]:
    """The round of ``Service``: the two review steps, then ``staff_steps``."""
    open_reviews, release_slots = round_steps(
        engine,
        settings,
        renderer=Renderer(),
        render_subject=lambda digest, slot, articles: digest.name,
    )
    return [
        ("review windows", open_reviews),
        ("slots after review", release_slots),
        *((s.name, s.call) for s in staff_steps(engine, settings)),
    ]


def last_full_issue(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.scalar(
                sa.select(sa.func.max(issues.c.id)).where(
                    issues.c.digest == "weekly", issues.c.status == "sent"
                )
            )
        )


def explain(engine: sa.Engine, statement: sa.Select[Any, Any]) -> str:
    query = str(statement.compile(engine, compile_kwargs={"literal_binds": True}))
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {query}").all()
            return "\n".join(str(r[-1]) for r in rows)
        rows = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {query}").all()
        return "\n".join(r[0] for r in rows)


def rates_query() -> sa.Select[Any, Any]:
    """The first statement of ``checks.measure_rates``: a month of deliveries."""
    since = NOW - timedelta(days=30)
    accepted = sa.and_(deliveries.c.sent_at >= since, deliveries.c.sent_at <= NOW)
    refused = sa.and_(
        deliveries.c.status == "bounced",
        deliveries.c.sent_at.is_(None),
        deliveries.c.updated_at >= since,
        deliveries.c.updated_at <= NOW,
    )
    return sa.select(
        sa.func.count().filter(accepted), sa.func.count().filter(sa.or_(accepted, refused))
    ).where(sa.or_(accepted, refused))


def stall_scan_query(engine: sa.Engine) -> sa.Select[Any, Any]:
    """The last statement of ``checks.find_stalls``, run for a sending issue with rows due
    and no live lease: its rows' latest change, which reads every row of the issue."""
    with engine.connect() as conn:
        issue_id = conn.scalar(sa.select(issues.c.id).where(issues.c.status == "sending"))
    remaining = sa.or_(WAITING_ROW, SENDING_ROW)
    return sa.select(sa.func.max(deliveries.c.updated_at), sa.func.count().filter(remaining)).where(
        deliveries.c.issue_id == issue_id
    )


def report_parts(
    engine: sa.Engine, settings: Settings, issue_id: int, runs: int
) -> list[tuple[str, list[float]]]:
    """``build_report``'s statements one by one (ms per run), to say which one it waits on."""
    with engine.connect() as conn:
        content = load_content(conn, issue_id, settings)
        first, last = conn.execute(
            sa.select(sa.func.min(deliveries.c.sent_at), sa.func.max(deliveries.c.sent_at)).where(
                deliveries.c.issue_id == issue_id
            )
        ).one()
        made = conn.execute(
            sa.select(issues.c.created_at).where(issues.c.id == issue_id)
        ).scalar_one()
        about = report._about_its_messages(conn, issue_id)
        parts: list[tuple[str, Callable[[], object]]] = [
            ("outcomes", lambda: report._outcomes(conn, issue_id)),
            ("topic sets", lambda: report.topic_sets_of(conn, settings, issue_id, content)),
            (
                "first and last sent",
                lambda: conn.execute(
                    sa.select(
                        sa.func.min(deliveries.c.sent_at), sa.func.max(deliveries.c.sent_at)
                    ).where(deliveries.c.issue_id == issue_id)
                ).all(),
            ),
            (
                "bounces and complaints naming it",
                lambda: report._about_its_messages(conn, issue_id),
            ),
            ("aftermath", lambda: report._aftermath(conn, issue_id, first, last, about, NOW)),
            ("suppressions", lambda: report._suppressions(conn, issue_id, made, set())),
            ("reasons", lambda: reasons(engine, issue_id)),
        ]
        return [(name, _timed(call, runs)) for name, call in parts]


def measure(name: str, url: str, n: int, runs: int) -> list[tuple[str, str]]:
    engine = create_engine(url)
    settings = settings_for(url)
    rows: list[tuple[str, str]] = []
    try:
        t0 = time.perf_counter()
        fill(engine, n)
        filled = time.perf_counter() - t0
        with engine.connect() as conn:
            count = conn.scalar(sa.select(sa.func.count()).select_from(deliveries))
            n_events = conn.scalar(sa.select(sa.func.count()).select_from(events))
        print(
            f"\n== {name}: {n:,} subscribers, {count:,} deliveries, {n_events:,} events"
            f" (filled in {filled:.1f} s)"
        )
        rows.append(("fill", f"{filled:.1f} s"))
        round_ = steps(engine, settings)
        for step_name, call in round_:
            times = _timed(lambda c=call: c(NOW), runs)  # type: ignore[misc]
            rows.append((step_name, median_range(times, "{:,.1f}") + " ms"))

        def whole() -> None:
            for _, call in round_:
                call(NOW)

        rows.append(("whole round", median_range(_timed(whole, runs), "{:,.1f}") + " ms"))
        # Most rounds: the steps with an ``every`` (1 or 5 minutes) wait for their turn.
        limited = {s.name for s in staff_steps(engine, settings) if s.every is not None}
        common = [call for step_name, call in round_ if step_name not in limited]

        def most() -> None:
            for call in common:
                call(NOW)

        rows.append(
            (
                "round without the 1- and 5-minute steps",
                median_range(_timed(most, runs), "{:,.1f}") + " ms",
            )
        )
        rows.append(
            (
                "queue_reports, nothing due",
                median_range(
                    _timed(lambda: queue_reports(engine, settings, now=NOW), runs), "{:,.1f}"
                )
                + " ms",
            )
        )
        last = last_full_issue(engine)
        rows.append(
            (
                f"build_report (issue {last}, {n:,} deliveries)",
                median_range(
                    _timed(lambda: build_report(engine, settings, last, now=NOW), runs),
                    "{:,.1f}",
                )
                + " ms",
            )
        )
        for part, times in report_parts(engine, settings, last, runs):
            rows.append((f"  build_report: {part}", median_range(times, "{:,.1f}") + " ms"))
        width = max(len(r[0]) for r in rows)
        for label, value in rows:
            print(f"{label:<{width}}  {value:>30}")
        print(f"\nplan of the rates check's deliveries count ({name}):")
        print(explain(engine, rates_query()))
        print(f"\nplan of the stall check's scan of the sending issue ({name}):")
        print(explain(engine, stall_scan_query(engine)))
    finally:
        engine.dispose()
    return rows


def run_on_both(
    description: str, measure: Callable[[str, str, int, int], object], pg_name: str
) -> None:
    """The command line of a benchmark that fills a database of ``--n`` subscribers and times
    ``measure(label, url, n, runs)`` on SQLite, PostgreSQL (a database of its own, dropped
    after) or both."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--n", type=int, default=100_000, help="active subscribers")
    parser.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(machine())
    if args.db in ("sqlite", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            measure("SQLite", f"sqlite:///{Path(tmp) / 'bench.db'}", args.n, args.runs)
    if args.db in ("postgres", "both"):
        admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')
                conn.exec_driver_sql(f'CREATE DATABASE "{pg_name}"')
            measure("PostgreSQL", PG_URL.rsplit("/", 1)[0] + "/" + pg_name, args.n, args.runs)
        finally:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')
            admin.dispose()


def main() -> None:
    run_on_both(__doc__.split("\n", 1)[0], measure, PG_NAME)


if __name__ == "__main__":
    main()
