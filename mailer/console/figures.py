"""The numbers behind the console's charts, read from the store.

Each figure is a few aggregate queries whatever the size of the list: the database places
each row among the weeks or days (``mailer.db.buckets``) and counts the rows by place, on
SQLite and PostgreSQL alike, and the few counts are added up here; no row is loaded. The
rates are the ones the staff check alerts on (``mailer.staff.checks``), measured by its own
definitions; the deliveries per issue are what ``mailer issues list`` counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from mailer.db.buckets import below
from mailer.db.engine import reading
from mailer.db.schema import events, subscribers
from mailer.issues.progress import list_issues
from mailer.staff.checks import (
    COMPLAINT_LIMIT,
    HARD_BOUNCE_LIMIT,
    RATE_MIN_MESSAGES,
    Rates,
    measure_rates_at,
)

WEEKS = 12
ISSUES = 12
RATE_DAYS = 30
WEEK = timedelta(weeks=1)
DAY = timedelta(days=1)
# Issues that have gone out (or began to): one in review or held has no deliveries yet.
RELEASED = ("sending", "sent", "cancelled")
# A delivery's status as the chart groups it: the final outcomes and deferred by name, the
# rest (queued, in flight, unknown after a lost connection) as "other".
OUTCOMES = ("sent", "deferred", "bounced", "failed", "cancelled", "other")
__all__ = [
    "COMPLAINT_LIMIT",
    "HARD_BOUNCE_LIMIT",
    "ISSUES",
    "OUTCOMES",
    "RATE_DAYS",
    "RATE_MIN_MESSAGES",
    "WEEKS",
    "DayRates",
    "IssueOutcomes",
    "Week",
    "issue_outcomes",
    "rates_by_day",
    "subscriber_weeks",
]


@dataclass(frozen=True)
class Week:
    """One week ``(start, end]``: active subscribers at its end, sign-ups and unsubscribes in it."""

    start: datetime
    end: datetime
    active: int
    signups: int
    unsubscribes: int


def subscriber_weeks(engine: sa.Engine, *, now: datetime, weeks: int = WEEKS) -> list[Week]:
    """The ``weeks`` weeks ending at ``now``, oldest first.

    Active at a week's end: confirmed by then and not gone by then. A subscriber is gone at
    ``unsubscribed_at``, or, bounced or complained, when their row last changed (the status
    change is the last write a suppressed row gets). A subscriber who left and came back counts
    from their latest confirmation, and an erased one is in no week (their row and events are
    gone by design). Sign-ups are the confirmations of the week (the ``confirmed`` events, and
    addresses staff added or set active); unsubscribes are its ``unsubscribed`` events.

    Two queries, each placing its rows among the weeks' ends (``mailer.db.buckets``) and
    counting them by place: active at an end = confirmed by then - gone by then.
    """
    ends = [now - WEEK * k for k in range(weeks - 1, -1, -1)]
    s = subscribers.c
    gone = sa.case(
        (s.status == "active", sa.null()),
        (s.status.in_(("bounced", "complained")), s.updated_at),
        else_=sa.func.coalesce(s.unsubscribed_at, s.updated_at),
    )
    confirmed = sa.or_(
        events.c.kind.in_(("confirmed", "active")),
        sa.and_(events.c.kind == "subscribed", events.c.detail["status"].as_string() == "active"),
    )
    people = (
        sa.select(below(s.confirmed_at, ends).label("came"), below(gone, ends).label("went"))
        .where(s.confirmed_at.is_not(None), sa.or_(gone.is_(None), gone >= s.confirmed_at))
        .subquery()
    )
    flows = (
        sa.select(
            below(events.c.at, ends).label("week"),
            sa.case((confirmed, 1), else_=0).label("joined"),
            sa.case((events.c.kind == "unsubscribed", 1), else_=0).label("left"),
        )
        .where(
            events.c.at > ends[0] - WEEK,
            events.c.at <= ends[-1],
            events.c.kind.in_(("confirmed", "active", "subscribed", "unsubscribed")),
        )
        .subquery()
    )
    came = [0] * (weeks + 1)
    went = [0] * (weeks + 1)
    joined = [0] * (weeks + 1)
    left = [0] * (weeks + 1)
    with reading(engine) as conn:
        for at, away, n in conn.execute(
            sa.select(people.c.came, people.c.went, sa.func.count()).group_by(
                people.c.came, people.c.went
            )
        ):
            came[at] += n
            went[away] += n
        for week, j, u in conn.execute(
            sa.select(
                flows.c.week, sa.func.sum(flows.c.joined), sa.func.sum(flows.c.left)
            ).group_by(flows.c.week)
        ):
            joined[week] += int(j or 0)
            left[week] += int(u or 0)
    found = []
    active = 0
    for i, end in enumerate(ends):
        active += came[i] - went[i]
        found.append(Week(end - WEEK, end, active, joined[i], left[i]))
    return found


@dataclass(frozen=True)
class IssueOutcomes:
    """One issue's deliveries counted by outcome (``OUTCOMES``)."""

    issue_id: int
    digest: str
    scheduled_for: datetime
    subject: str
    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def issue_outcomes(engine: sa.Engine, *, limit: int = ISSUES) -> list[IssueOutcomes]:
    """The last ``limit`` issues that went out, oldest first, with their deliveries by
    outcome (``mailer.issues.progress.list_issues``: one count grouped by issue and status)."""
    found = []
    for summary in reversed(list_issues(engine, limit=limit, statuses=RELEASED)):
        counts = dict.fromkeys(OUTCOMES, 0)
        for status, n in summary.counts.items():
            counts[status if status in counts else "other"] += n
        found.append(
            IssueOutcomes(
                summary.id, summary.digest, summary.scheduled_for, summary.subject, counts
            )
        )
    return found


@dataclass(frozen=True)
class DayRates:
    """The 30-day rates as the staff check would have measured them at ``at``."""

    at: datetime
    rates: Rates

    @property
    def enough(self) -> bool:
        """Enough messages for the rate to say something (the check's own floor)."""
        return self.rates.attempted >= RATE_MIN_MESSAGES


def rates_by_day(engine: sa.Engine, *, now: datetime, days: int = RATE_DAYS) -> list[DayRates]:
    """The complaint and hard-bounce rates over the 30 days before each of the last ``days``
    days' ends (the last one is ``now``), oldest first: what ``mailer.staff.checks`` alerts
    on, against the 0.1 % and 2 % limits of Gmail and Yahoo."""
    moments = [now - DAY * k for k in range(days - 1, -1, -1)]
    return [
        DayRates(moment, rates)
        for moment, rates in zip(moments, measure_rates_at(engine, moments), strict=True)
    ]
