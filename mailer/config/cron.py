"""Cron expressions, read by APScheduler's own parser: what loads is exactly what will fire.

Five fields as in crontab (``CronTrigger.from_crontab``), or six with seconds first (alert
lanes and tests). Day-of-week must use names: APScheduler 3 counts Monday as 0 where cron
counts Sunday as 0, so a numeric weekday would silently fire on the wrong day.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from apscheduler.triggers.cron import CronTrigger

CRON_FIELDS = ("minute", "hour", "day", "month", "day_of_week")
DAY_NUMBER_RE = re.compile(r"\d")
# Any date will do: a schedule that fires at all fires within a few years of it.
_PROBE_FROM = datetime(2026, 1, 1, tzinfo=UTC)


class CronError(ValueError):
    """A schedule that cannot be used; the message says why (APScheduler's words where its)."""


def parse_cron(expression: str, timezone: str) -> CronTrigger:
    """The trigger for ``expression`` in ``timezone``, or CronError saying what is wrong."""
    fields = expression.split()
    if len(fields) not in (5, 6):
        raise CronError(
            "must be a 5-field cron expression (minute hour day month day_of_week), "
            f"or 6 fields with seconds first, got {expression!r}"
        )
    if DAY_NUMBER_RE.search(fields[-1]):
        raise CronError(
            f"day of week must use names mon..sun, not numbers (got {fields[-1]!r}): "
            "numeric weekdays count differently in cron and in the scheduler"
        )
    try:
        if len(fields) == 5:
            return CronTrigger.from_crontab(expression, timezone=timezone)
        return CronTrigger(
            timezone=timezone, **dict(zip(("second", *CRON_FIELDS), fields, strict=True))
        )
    except ValueError as exc:
        raise CronError(f"is not a valid cron expression ({expression!r}): {exc}") from exc


def first_fire(trigger: CronTrigger, expression: str) -> datetime:
    """A fire time of ``trigger`` (in its time zone): a sample slot for checking a digest.

    Refuses a schedule that never fires (``0 7 31 2 *``: there is no 31 February).
    """
    fire: datetime | None = trigger.get_next_fire_time(None, _PROBE_FROM)
    if fire is None:
        raise CronError(f"never fires ({expression!r} names no date that exists)")
    return fire


def shortest_gap(trigger: CronTrigger, samples: int) -> timedelta | None:
    """The shortest time between two of the first ``samples`` fire times from the probe date
    (None if it fires fewer than twice): what a window before each slot must stay under."""
    gaps: list[timedelta] = []
    previous: datetime | None = None
    cursor = _PROBE_FROM
    for _ in range(samples):
        fire: datetime | None = trigger.get_next_fire_time(previous, cursor)
        if fire is None:
            break
        if previous is not None:
            gaps.append(fire.astimezone(UTC) - previous.astimezone(UTC))
        previous = fire
        cursor = fire.astimezone(UTC) + timedelta(microseconds=1)
    return min(gaps) if gaps else None


def gap_minutes(gap: timedelta) -> str:
    """A gap as staff read it in an error: whole minutes, or seconds below one."""
    seconds = gap.total_seconds()
    return f"{seconds / 60:g}" if seconds >= 60 else f"{seconds / 60:.2f}"
