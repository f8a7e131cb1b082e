"""The group commit's handoff: lanes hand over their outcomes and next starts, one writer
writes whatever is waiting in one transaction.

Apart from the delivery loop (mailer.delivery.worker) because it is the one piece that pairs
the lanes with the database: the ordering it keeps (a lane sends only after its start is
written) is what bounds a crash to one in-doubt message per connection (mailer.delivery.ledger).
What a collection's transaction writes is the worker's ``Deliverer.commit``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mailer.delivery import ledger


@dataclass
class Handoff:
    """One lane's turn: the outcome to record (if any), the delivery to start (if any), and
    the future that tells the lane whether that start was written."""

    result: ledger.Result | None
    start: int | None
    done: asyncio.Future[bool]


# Writes one collection of handoffs: the counts by new status, and the ids actually started.
WriteCall = Callable[[list[Handoff]], Awaitable[tuple[dict[str, int], set[int]]]]


class Committer:
    """Collects lanes' handoffs and writes each collection in one transaction (``write``);
    ``on_counts`` is told each transaction's counts by new status."""

    def __init__(self, write: WriteCall, on_counts: Callable[[dict[str, int]], None]) -> None:
        self.write = write
        self.on_counts = on_counts
        self.pending: list[Handoff] = []
        self.wake = asyncio.Event()
        self.closed = False

    async def handoff(self, result: ledger.Result | None, start: int | None) -> bool:
        """Record ``result``, mark ``start`` in flight; True once ``start`` may be sent."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.pending.append(Handoff(result, start, done))
        self.wake.set()
        return await done

    async def run(self) -> None:
        """Write what is waiting, collection after collection, until closed and drained."""
        while not (self.closed and not self.pending):
            await self.wake.wait()
            self.wake.clear()
            batch, self.pending = self.pending, []
            if not batch:
                continue
            try:
                counts, started = await self.write(batch)
            except BaseException as exc:
                for handoff in batch:
                    if not handoff.done.done():
                        handoff.done.set_exception(exc)
                raise
            self.on_counts(counts)
            for handoff in batch:
                handoff.done.set_result(handoff.start in started)

    def close(self) -> None:
        """No more handoffs: ``run`` ends once what is pending is written."""
        self.closed = True
        self.wake.set()
