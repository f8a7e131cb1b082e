"""What the console's charts cost on a production-sized store.

``/staff/charts`` (and every dashboard that shows the charts) reads three figures: active
subscribers, sign-ups and unsubscribes over 12 weeks, the deliveries of the last 12 issues by
outcome, and the 30-day complaint and hard-bounce rates at the end of each of the last 30
days. Each is a few aggregate queries; this times them, and the drawing of each chart, on the
store ``bench.staff_round`` fills (``--n`` active subscribers, a month of weekly issues of
``n`` deliveries each with their bounce, complaint and unsubscribe events), with a
confirmation event per subscriber spread over 16 weeks added. It prints the median and range
of ``--runs`` runs of each.

Run from the repository root (PostgreSQL: a database ``mailer_bench_console_figures`` is
created on the server of ``MAILER_BENCH_PG`` and dropped at the end)::

    .venv/bin/python -m bench.console_figures --n 100000 --db both --runs 5
"""

from __future__ import annotations

import time
from datetime import timedelta
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from bench._lib import median_range
from bench.staff_round import NOW, _json, _spread, _timed, fill, run_on_both
from mailer.console import charts, figures
from mailer.db.engine import create_engine, refresh_statistics
from mailer.db.schema import deliveries, events, subscribers
from mailer.staff.checks import measure_rates

PG_NAME = "mailer_bench_console_figures"
ZONE = ZoneInfo("Europe/Berlin")


def add_confirmations(engine: sa.Engine) -> None:
    """Confirmed over the 16 weeks before ``NOW``, each with its ``confirmed`` event."""
    s = subscribers.c
    with engine.begin() as conn:
        conn.execute(
            subscribers.update().values(
                confirmed_at=_spread(s.id, NOW - timedelta(weeks=16), timedelta(weeks=16), 112)
            )
        )
        conn.execute(
            events.insert().from_select(
                ["subscriber_id", "kind", "at", "detail"],
                sa.select(s.id, sa.literal("confirmed"), s.confirmed_at, _json(conn, source="web")),
            )
        )
    refresh_statistics(engine, events)
    refresh_statistics(engine, subscribers)


def measure(name: str, url: str, n: int, runs: int) -> None:
    engine = create_engine(url)
    try:
        t0 = time.perf_counter()
        fill(engine, n)
        add_confirmations(engine)
        filled = time.perf_counter() - t0
        with engine.connect() as conn:
            n_deliveries = conn.scalar(sa.select(sa.func.count()).select_from(deliveries))
            n_events = conn.scalar(sa.select(sa.func.count()).select_from(events))
        print(
            f"\n== {name}: {n:,} subscribers, {n_deliveries:,} deliveries, {n_events:,} events"
            f" (filled in {filled:.1f} s)"
        )
        weeks = figures.subscriber_weeks(engine, now=NOW)
        found = figures.issue_outcomes(engine)
        days = figures.rates_by_day(engine, now=NOW)
        rows = [
            ("subscriber_weeks (12 weeks)", lambda: figures.subscriber_weeks(engine, now=NOW)),
            ("issue_outcomes (12 issues)", lambda: figures.issue_outcomes(engine)),
            ("rates_by_day (30 days)", lambda: figures.rates_by_day(engine, now=NOW)),
            ("measure_rates (the staff check: now only)", lambda: measure_rates(engine, now=NOW)),
            ("draw: subscribers", lambda: charts.subscribers_chart(weeks, ZONE)),
            ("draw: deliveries", lambda: charts.deliveries_chart(found, ZONE)),
            ("draw: complaint rate", lambda: charts.rate_chart(days, ZONE, complaints=True)),
        ]
        width = max(len(label) for label, _ in rows)
        for label, call in rows:
            print(f"{label:<{width}}  {median_range(_timed(call, runs), '{:,.1f}') + ' ms':>28}")
        print(
            f"(today: {weeks[-1].active:,} active; last issue {found[-1].counts};"
            f" complaint rate {days[-1].rates.complaint_rate:.3%},"
            f" hard-bounce rate {days[-1].rates.hard_bounce_rate:.3%})"
        )
    finally:
        engine.dispose()


def main() -> None:
    run_on_both(__doc__.split("\n", 1)[0], measure, PG_NAME)


if __name__ == "__main__":
    main()
