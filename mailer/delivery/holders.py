"""Due deliveries that other workers hold: a dead process's are taken over, a live one's waited for.

A worker that finds nothing to claim asks who holds what is left (``ledger.held_elsewhere``).
A holder that is a dead process of this host (``owners.owner_gone``) has its leases ended at
once; a live one is waited for until the earliest of its leases could end, looking again
sooner while it makes progress.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa

from mailer.delivery import ledger
from mailer.delivery.owners import owner_gone
from mailer.signals import stopped_within

log = logging.getLogger(__name__)

T = TypeVar("T")

# A drain waiting for another worker's deliveries looks again after this long while their
# holder makes progress, doubling (up to a heartbeat) while it does not.
WAIT_FIRST = 0.2

# Told what a waiting worker waits for: the holdings, and when they were seen.
OnWait = Callable[[Sequence[ledger.Holding], datetime], None]


class DbCall(Protocol):
    """How a worker makes a database call (``Deliverer.db``: in a thread, through outages)."""

    async def __call__(self, call: Callable[..., T], /, *args: Any, **kwargs: Any) -> T: ...


class Holders:
    """What ``owner`` does about due deliveries other workers hold."""

    def __init__(
        self, engine: sa.Engine, owner: str, *, db: DbCall, heartbeat_seconds: float
    ) -> None:
        self.engine = engine
        self.owner = owner
        self.db = db
        self.heartbeat_seconds = heartbeat_seconds
        # What they held at the last look, when it was last told, and how long the next wait is.
        self._seen_held: tuple[tuple[str, int], ...] | None = None
        self._told: tuple[frozenset[str], datetime] | None = None  # holders told, and when
        self._wait_step = WAIT_FIRST

    async def take_over_dead(self, issue_id: int | None = None, *, now: datetime) -> bool:
        """End now the leases held by dead processes of this host on due deliveries (of
        ``issue_id``); True if there were any."""
        holdings = await self.db(
            ledger.held_elsewhere, self.engine, owner=self.owner, now=now, issue_id=issue_id
        )
        return await self._take_over(holdings, now)

    async def _take_over(self, holdings: Sequence[ledger.Holding], now: datetime) -> bool:
        dead = [h for h in holdings if owner_gone(h.owner, alive_at=h.seen)]
        if not dead:
            return False
        owners = [h.owner for h in dead]
        count = await self.db(ledger.end_leases, self.engine, owners, now=now)
        log.warning(
            "took over the claims of workers that are gone",
            extra={"owners": owners, "deliveries": count},
        )
        return True

    async def wait(
        self,
        issue_id: int | None,
        *,
        now: datetime,
        since: datetime,
        on_wait: OnWait | None = None,
        stop: asyncio.Event | None = None,
    ) -> bool:
        """Whether other workers hold due deliveries (of ``issue_id``) that were held at
        ``since``. Claims of dead processes of this host are taken over at once; for live ones
        this waits until the earliest of their leases could end, or less while their holders
        make progress (``WAIT_FIRST``, doubling up to a heartbeat interval while nothing
        changes). ``on_wait`` is told when the holders change, and once per heartbeat interval
        otherwise."""
        holdings = await self.db(
            ledger.held_elsewhere, self.engine, owner=self.owner, now=since, issue_id=issue_id
        )
        if not holdings:
            self._seen_held = None
            self._told = None
            return False
        if await self._take_over(holdings, now):
            return True
        held = tuple((h.owner, h.count) for h in holdings)
        # Progress (their counts fall with every batch they send) makes the next look sooner;
        # what is told changes only with the holders, else once per heartbeat interval.
        changed = held != self._seen_held
        owners = frozenset(h.owner for h in holdings)
        told = self._told
        every = timedelta(seconds=self.heartbeat_seconds)
        if told is None or told[0] != owners or now - told[1] >= every:
            log.info(
                "waiting for deliveries held by other workers",
                extra={"holders": dict(held)},
            )
            if on_wait is not None:
                on_wait(holdings, now)
            self._told = (owners, now)
        self._wait_step = (
            WAIT_FIRST if changed else min(2 * self._wait_step, self.heartbeat_seconds)
        )
        self._seen_held = held
        earliest = min(h.expires for h in holdings)
        # Just past the earliest lease end: if its owner stopped renewing, the rows are ours.
        delay = min(max(0.0, (earliest - now).total_seconds()) + 0.05, self._wait_step)
        await stopped_within(stop, delay)
        return True
