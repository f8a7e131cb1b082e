"""When digests are due: pure functions of a digest's cron schedule and a given ``now``.

APScheduler's CronTrigger does the calendar arithmetic (time zones, DST); this module only asks
it questions, so the same answers serve the live scheduler, start-up catch-up and the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from apscheduler.triggers.cron import CronTrigger

from mailer.config.cron import CronError, parse_cron
from mailer.config.settings import Digest
from mailer.errors import ConfigError

MAX_SLOTS = 10_000  # a bound on any walk over slots, whatever the schedule


def trigger_for(digest: Digest) -> CronTrigger:
    """The digest's cron trigger in its own time zone (checked when the config loaded)."""
    try:
        return parse_cron(digest.schedule, digest.timezone)
    except CronError as exc:
        raise ConfigError(f"[[digests]] {digest.key}: schedule {exc}") from exc


def slots_between(digest: Digest, start: datetime, end: datetime) -> list[datetime]:
    """Nominal fire times in (start, end], in UTC, oldest first (none for an arrival digest:
    it has no slots)."""
    if digest.on_arrival:
        return []
    trigger = trigger_for(digest)
    slots: list[datetime] = []
    previous: datetime | None = None
    cursor = start + timedelta(microseconds=1)
    while len(slots) < MAX_SLOTS:
        fire = trigger.get_next_fire_time(previous, cursor)
        if fire is None or fire > end:
            break
        slots.append(fire.astimezone(UTC))
        previous = fire
        # In UTC: local wall-clock arithmetic loses track of the repeated hour at a DST fall-back.
        cursor = fire.astimezone(UTC) + timedelta(microseconds=1)
    return slots


def latest_slot(digest: Digest, now: datetime, *, within: timedelta) -> datetime | None:
    """The most recent fire time at or before ``now``, if one falls within ``within``."""
    # Look back over a growing span: walking every slot of the whole window costs ~90 ms for a
    # two-second schedule, all of it added to the firing's lag.
    span = min(within, timedelta(seconds=1))
    while True:
        slots = slots_between(digest, now - span, now)
        if slots or span >= within:
            return slots[-1] if slots else None
        span = min(span * 8, within)


def missed_slots(
    digest: Digest,
    *,
    last_issue: datetime | None,
    now: datetime,
    window: timedelta,
    catch_up: str = "latest",
) -> list[datetime]:
    """Slots that passed without an issue, to create at start-up.

    ``catch_up`` is "latest" (only the most recent missed slot: one late digest beats a burst
    of stale ones), "all" (every slot in the window) or "none".
    """
    if catch_up == "none":
        return []
    start = now - window
    if last_issue is not None and last_issue > start:
        start = last_issue
    slots = slots_between(digest, start, now)
    return slots[-1:] if catch_up == "latest" else slots


def quiet_until(quiet: tuple[time, time] | None, zone: str, now: datetime) -> datetime | None:
    """The end of the quiet window ``now`` falls in (UTC), or None outside it.

    A window may cross midnight (21:00-06:00). Its end is the first local ``end`` time after
    ``now``; on a DST change day the wall-clock time is resolved by zoneinfo.
    """
    if quiet is None:
        return None
    start, end = quiet
    local = now.astimezone(ZoneInfo(zone))
    clock = local.time().replace(tzinfo=None)
    inside = start <= clock < end if start < end else (clock >= start or clock < end)
    if not inside:
        return None
    day = local.date() if clock < end else local.date() + timedelta(days=1)
    return datetime.combine(day, end, tzinfo=ZoneInfo(zone)).astimezone(UTC)


def local_time(moment: datetime, zone: str, *, year: bool = True) -> str:
    """``moment`` as staff read it: ``Fri 11 Dec 2026 07:00 EST`` in ``zone``.

    A zone without an abbreviation (zoneinfo gives ``-03``) is named in full after it.
    """
    local = moment.astimezone(ZoneInfo(zone))
    name = local.tzname() or zone
    if name[0] in "+-":
        name = f"{name} ({zone})"
    day = f"{local:%a} {local.day} {local:%b}" + (f" {local.year}" if year else "")
    return f"{day} {local:%H:%M} {name}"


def upcoming(digests: Sequence[Digest], now: datetime) -> list[tuple[Digest, datetime]]:
    """Each scheduled digest with its next slot after ``now`` (UTC), soonest first; an arrival
    digest has none."""
    pairs: list[tuple[Digest, datetime]] = []
    for digest in digests:
        if digest.on_arrival:
            continue
        fire = trigger_for(digest).get_next_fire_time(None, now + timedelta(microseconds=1))
        if fire is not None:
            pairs.append((digest, fire.astimezone(UTC)))
    return sorted(pairs, key=lambda pair: pair[1])
