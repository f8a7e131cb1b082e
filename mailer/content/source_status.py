"""What each ``[[sources]]`` entry last did and does next: ``mailer articles sources`` prints it
and the staff console's sources page shows it, from this one reading.

When a feed is next fetched is the fetch round's own rule (``sources.deferred``): backing off
after failures in a row, or polled rarely while its WebSub hub delivers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from mailer.config.settings import Settings, Source
from mailer.content.feeds.state import FeedState, load_feed_states
from mailer.content.feeds.websub import Subscription, load_subscriptions
from mailer.content.sources import Deferred, deferred


@dataclass(frozen=True)
class SourceStatus:
    """One configured source: its fetch history (feeds only) and when it is fetched next."""

    source: Source
    state: FeedState | None  # None: a folder, or a feed never fetched
    later: Deferred | None  # None: the next fetch round fetches it
    subscription: Subscription | None  # its WebSub hub, if it has one

    @property
    def is_feed(self) -> bool:
        return self.source.type != "directory"

    @property
    def backing_off(self) -> bool:
        return self.later is not None and self.later.backing_off


def source_statuses(engine: sa.Engine, settings: Settings, *, now: datetime) -> list[SourceStatus]:
    """Every ``[[sources]]`` entry in config order, as the round starting ``now`` sees it."""
    states = load_feed_states(engine)
    hubs = load_subscriptions(engine)
    interval = timedelta(minutes=settings.feeds.interval_minutes)
    poll_every = timedelta(minutes=settings.feeds.websub_poll_minutes)
    found = []
    for source in settings.sources:
        if source.type == "directory":
            found.append(SourceStatus(source, None, None, None))
            continue
        url = source.url or ""
        state = states.get(url)
        later = (
            None
            if state is None
            else deferred(state, hubs.get(url), interval=interval, poll_every=poll_every, now=now)
        )
        found.append(SourceStatus(source, state, later, hubs.get(url)))
    return found


def next_attempt(status: SourceStatus, settings: Settings, at: Callable[[datetime], str]) -> str:
    """When the feed is fetched next, in words (``at`` shows a time)."""
    later = status.later
    if settings.feeds.interval_minutes == 0:
        return "only by mailer articles fetch ([feeds].interval_minutes = 0)"
    if later is None:
        return "next fetch round"
    if later.backing_off:
        failures = status.state.consecutive_failures if status.state else 0
        return (
            f"{at(later.until)} (backing off after {failures}"
            f" failure{'' if failures == 1 else 's'})"
        )
    return f"{at(later.until)} (its hub delivers; polled rarely)"


def hub_state(subscription: Subscription, moment: datetime, at: Callable[[datetime], str]) -> str:
    """One line: the hub, and whether it delivers (subscribed until …), waits or refused."""
    hub = subscription.hub
    if subscription.live(moment) and subscription.lease_expires_at is not None:
        heard = subscription.last_content_at
        last = f", last content {at(heard)}" if heard else ", no content yet"
        return f"subscribed until {at(subscription.lease_expires_at)} ({hub}{last})"
    if subscription.state == "denied":
        return f"denied ({hub})"
    if subscription.state == "verified":
        return f"lease lapsed, renewal pending ({hub})"
    return f"pending: waiting for the hub to verify ({hub})"
