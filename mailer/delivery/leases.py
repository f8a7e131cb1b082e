"""The leases one worker holds, and the heartbeat that keeps them alive.

A worker holds a lease on every delivery it claimed and has not yet recorded or handed back;
if it stopped renewing them, another worker would take the rows and send them twice. The set
is changed from the event loop and from the threads that claim and commit, so it lives apart
from the delivery loop (mailer.delivery.worker) behind its own lock, with the lock that orders
every write to held rows. Other workers' leases are mailer.delivery.holders'.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from datetime import datetime, timedelta

import sqlalchemy as sa

from mailer.delivery import ledger
from mailer.errors import DatabaseUnavailable

log = logging.getLogger(__name__)


class Leases:
    """The deliveries ``owner`` holds a lease on, renewed to ``lease`` from now every
    ``heartbeat_seconds`` (a third of the lease)."""

    def __init__(
        self,
        engine: sa.Engine,
        owner: str,
        *,
        lease: timedelta,
        clock: Callable[[], datetime],
    ) -> None:
        self.engine = engine
        self.owner = owner
        self.lease = lease
        self.clock = clock
        # Leases are renewed three times per lease: two renewals can fail (a slow commit, a
        # database hiccup) before another worker may take the rows.
        self.heartbeat_seconds = lease.total_seconds() / 3
        # The ids this worker holds a lease on (claimed, not yet recorded or released); changed
        # from the loop and from the threads that claim and commit.
        self._held: set[int] = set()
        self._held_lock = threading.Lock()
        # Taken by every write to held rows (group commits, renewals, releases): two of them
        # at once, from two threads, could lock the same rows in opposite orders (PostgreSQL
        # would abort one as a deadlock).
        self.writes = threading.Lock()
        self._renew_due = time.monotonic() + self.heartbeat_seconds

    @property
    def held(self) -> frozenset[int]:
        """The deliveries this worker holds a lease on."""
        with self._held_lock:
            return frozenset(self._held)

    def hold(self, ids: Iterable[int]) -> None:
        """Note leases just taken (a claim)."""
        with self._held_lock:
            self._held.update(ids)

    def let_go(self, ids: Iterable[int]) -> None:
        """Forget leases that ended (recorded, refused or handed back)."""
        with self._held_lock:
            self._held.difference_update(ids)

    def renewal(self) -> list[int]:
        """The held ids if a renewal is due (and mark it done), else []: a group commit that
        falls due renews them in its own transaction."""
        if time.monotonic() < self._renew_due:
            return []
        self._renew_due = time.monotonic() + self.heartbeat_seconds
        return sorted(self.held)

    def renew_soon(self) -> None:
        """A renewal failed (its transaction did not commit): due again within a second, not
        a whole heartbeat later."""
        self._renew_due = time.monotonic() + min(1.0, self.heartbeat_seconds)

    def renew(self, ids: Sequence[int] | None = None) -> int:
        """Extend every lease this worker holds (or those of ``ids``) to now + lease, in one
        UPDATE; returns how many rows it still held."""
        ids = sorted(self.held) if ids is None else ids
        with self.writes:
            held = ledger.renew(
                self.engine, ids, owner=self.owner, lease=self.lease, now=self.clock()
            )
        # Rows recorded by a group commit meanwhile are no longer held, and not lost.
        lost = len(self.held.intersection(ids)) - held
        if lost > 0:
            log.warning(
                "leases lost: another worker took over rows this one held",
                extra={"owner": self.owner, "lost": lost},
            )
        return held

    async def _heartbeat(self) -> None:
        """Renew the held leases every ``heartbeat_seconds`` that no group commit did it."""
        while True:
            delay = self._renew_due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            ids = self.renewal()
            if not ids:
                continue
            try:
                await asyncio.to_thread(self.renew, ids)
            except DatabaseUnavailable:
                # An outage: the lanes' own calls wait it out and log it once (Deliverer.db);
                # while it lasts nothing new goes in flight. Renew again soon.
                self.renew_soon()
            except sa.exc.SQLAlchemyError as exc:
                # Any other database error: the next group commit fails the same way, and
                # while it lasts nothing new goes in flight. Try again soon.
                log.warning("lease renewal failed", extra={"owner": self.owner, "error": str(exc)})
                self.renew_soon()

    @contextlib.asynccontextmanager
    async def kept(self, stop: asyncio.Event | None = None) -> AsyncIterator[None]:
        """Keep these leases alive for the block (a named background task).

        If the heartbeat dies (a bug, not an outage), ``stop`` is set so the lanes finish
        their messages and the rest is released, and the error is raised at the block's end.
        """

        def watch(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                log.error("lease heartbeat failed", exc_info=task.exception())
                if stop is not None:
                    stop.set()

        task = asyncio.create_task(self._heartbeat(), name=f"lease-heartbeat:{self.owner}")
        task.add_done_callback(watch)
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
