"""When a failing feed is fetched next: the delay doubles with each consecutive failure.

A feed that is down (or refuses us) is not hammered every interval: after its first failure
it waits one fetch interval (at least ``MIN_DELAY``), then twice that, four times, … up to
``MAX_DELAY``; one success resets it. Nothing is stored for this: ``feed_state`` already holds
``consecutive_failures`` and ``last_fetched_at``, and ``next_fetch_at`` is the one place that
turns them into a time, read by the fetch round and by ``mailer articles sources``.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from mailer.content.feeds.state import FeedState

MIN_DELAY = timedelta(minutes=1)
MAX_DELAY = timedelta(hours=1)
# The scheduler's round starts a moment late or early; a feed due within this much of the
# round's start is fetched in that round rather than one interval later.
ROUND_SLACK = timedelta(seconds=10)


def retry_delay(failures: int, interval: timedelta) -> timedelta:
    """The wait after ``failures`` consecutive failures (0 for none): ``max(interval,
    MIN_DELAY)`` doubled ``failures - 1`` times, capped at ``MAX_DELAY``."""
    if failures <= 0:
        return timedelta(0)
    base = max(interval, MIN_DELAY)
    if base >= MAX_DELAY:
        return MAX_DELAY
    # Doubling stops at the cap; no 2**failures of a feed failing for a year.
    delay = base
    for _ in range(failures - 1):
        delay *= 2
        if delay >= MAX_DELAY:
            return MAX_DELAY
    return delay


def next_fetch_at(state: FeedState | None, interval: timedelta) -> datetime | None:
    """When the fetch round may try this feed again; None when it is not backing off
    (never fetched, or its last fetch worked) and the next round takes it."""
    if state is None or state.consecutive_failures <= 0 or state.last_fetched_at is None:
        return None
    return state.last_fetched_at + retry_delay(state.consecutive_failures, interval)


def is_due(state: FeedState | None, interval: timedelta, now: datetime) -> bool:
    """True when the fetch round starting at ``now`` should fetch the feed."""
    due = next_fetch_at(state, interval)
    return due is None or due <= now + ROUND_SLACK
