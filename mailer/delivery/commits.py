"""The group commit's handoff: lanes hand over their outcomes and next starts, one writer
writes whatever is waiting in one transaction.

Apart from the delivery loop (mailer.delivery.worker) because it is the one piece that pairs the
lanes with the database: the ordering it keeps (a lane sends a message's content only after its
start is written) is what bounds a crash to one in-doubt message per connection
(mailer.delivery.ledger). What a collection's transaction writes is the worker's
``Deliverer.commit``.

How big a collection is. A commit costs about as much CPU for 32 handoffs as for 8, ours and
the database server's alike (``bench/parts.py``: 480 µs of PostgreSQL's CPU per commit of 8,
764 µs per commit of 32), and a send keeps every core busy, so that CPU is what the send rate
is made of. Writing as soon as one handoff waited made commits of about 8 at 32 connections.
So a collection is written once ``FILL`` of the lanes still running have handed off, or
``LINGER`` seconds after its first handoff, whichever comes first: at most that much longer
before a lane may send its next message, for a fifth less CPU per message (bench/README.md).
"""

from __future__ import annotations

import asyncio
import math
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


# The share of the running lanes whose handoffs a collection waits for, and how long at most
# (seconds, from its first handoff).
FILL = 1.0
LINGER = 0.005

# Writes one collection of handoffs: the counts by new status, and the ids actually started.
WriteCall = Callable[[list[Handoff]], Awaitable[tuple[dict[str, int], set[int]]]]


class Committer:
    """Collects the handoffs of ``lanes`` lanes and writes each collection in one transaction
    (``write``); ``on_counts`` is told each transaction's counts by new status. A collection
    is written once ``fill`` of the lanes still running have handed off, or ``linger``
    seconds after its first handoff."""

    def __init__(
        self,
        write: WriteCall,
        on_counts: Callable[[dict[str, int]], None],
        *,
        lanes: int = 1,
        fill: float = FILL,
        linger: float = LINGER,
    ) -> None:
        self.write = write
        self.on_counts = on_counts
        self.lanes = lanes  # still running: a lane's last handoff ends it
        self._ending = 0  # last handoffs among the pending ones: their lanes count here once
        self.fill = fill
        self.linger = linger
        self.pending: list[Handoff] = []
        self.wake = asyncio.Event()
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None  # the linger of the waiting collection

    async def handoff(
        self, result: ledger.Result | None, start: int | None, *, last: bool = False
    ) -> bool:
        """Record ``result``, mark ``start`` in flight; True once ``start`` may be sent.
        ``last``: the lane ends with this handoff, and no collection waits for it again."""
        return await self.submit(result, start, last=last)

    def submit(
        self, result: ledger.Result | None, start: int | None, *, last: bool = False
    ) -> asyncio.Future[bool]:
        """``handoff`` without waiting: the future says, once the collection is written,
        whether ``start`` may be sent (or raises what the write raised)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        self.pending.append(Handoff(result, start, done))
        if last:
            self.lanes -= 1
            self._ending += 1
        wanted = max(1, math.ceil((self.lanes + self._ending) * self.fill))
        if self.closed or len(self.pending) >= wanted:
            self.wake.set()
        elif self._timer is None:
            self._timer = loop.call_later(self.linger, self.wake.set)
        return done

    async def run(self) -> None:
        """Write what is waiting, collection after collection, until closed and drained."""
        while not (self.closed and not self.pending):
            await self.wake.wait()
            self.wake.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            batch, self.pending, self._ending = self.pending, [], 0
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
