"""How fast messages go out: the configured rate, and the relay's pushback.

``Pacer`` holds every send of a pool to ``[smtp].rate_per_second``, across the sending
processes when they share a ``SharedSchedule`` (mailer.delivery.processes makes one and hands
it down to each pool). ``Backpressure`` pauses every lane of a worker when the relay says it is
overloaded (``policy.is_throttle``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

from mailer.delivery.policy import Outcome, SendResult, is_throttle

log = logging.getLogger(__name__)

BACKOFF_START = 1.0
BACKOFF_MAX = 60.0


class SharedSchedule(Protocol):
    """A ``multiprocessing.Value("d")``: the next free slot, shared by processes."""

    value: float

    def get_lock(self) -> AbstractContextManager[Any]: ...


class Pacer:
    """Lets at most ``rate_per_second`` callers through per second, across all tasks sharing it.

    Pacing rather than a bucket: each caller reserves the next free slot of a schedule kept in
    absolute monotonic time, so a late wake-up never accumulates into drift and no burst
    exceeds the rate. A caller that comes after its slot has passed is let through at once
    (the schedule restarts from now; there is no catching up). 0 means unlimited. With a
    ``schedule`` shared by several processes, the slots are those of every sending process:
    the clock is the system's monotonic clock, the same in each of them; without one, this
    pacer keeps its own.
    """

    def __init__(self, rate_per_second: float, schedule: SharedSchedule | None = None) -> None:
        if rate_per_second < 0:
            raise ValueError(f"rate_per_second must be >= 0, got {rate_per_second}")
        self._interval = 1.0 / rate_per_second if rate_per_second else 0.0
        self._next = 0.0
        self._shared = schedule

    async def acquire(self) -> None:
        """Wait for this caller's slot."""
        if not self._interval:
            return
        now = time.monotonic()
        if self._shared is None:
            slot = max(now, self._next)
            self._next = slot + self._interval
        else:
            with self._shared.get_lock():
                slot = max(now, self._shared.value)
                self._shared.value = slot + self._interval
        if slot > now:
            await asyncio.sleep(slot - now)


class Backpressure:
    """One pause shared by every lane: doubles per throttle reply, resets after a success."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.delay = 0.0
        self.until = 0.0

    def observe(self, result: SendResult) -> None:
        """Take one attempt's result into account."""
        if is_throttle(result):
            self.delay = min(BACKOFF_MAX, max(BACKOFF_START, self.delay * 2))
            self.until = max(self.until, self.clock() + self.delay)
            log.warning(
                "relay throttling: pausing sends",
                extra={"seconds": self.delay, "reply": result.reply},
            )
        elif result.outcome is Outcome.SENT:
            self.delay = 0.0

    def paused(self) -> bool:
        """Whether sends are paused now."""
        return self.until > self.clock()

    async def wait(self) -> None:
        """Wait out the pause, if there is one."""
        pause = self.until - self.clock()
        if pause > 0:
            await asyncio.sleep(pause)
