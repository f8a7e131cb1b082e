"""Outages of the database and of the SMTP relay: waited out, and logged once each.

An outage is logged at ERROR when it is first seen (staff must hear of it; a WARNING is not
enough), then not again while it lasts, then once at WARNING with its duration when it ends.
A database outage is waited out by probing with backoff (1 s doubling to 30 s), for ever in
``run`` and ``worker``, up to ``[database].outage_wait_seconds`` in a foreground ``digest send``.
A relay outage needs no waiting here: each message it refuses is deferred by the ledger's retry
rules, and only the logging is done here (``SmtpPool``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import sqlalchemy as sa

from mailer.db.engine import probe, safe_url
from mailer.errors import DatabaseUnavailable
from mailer.signals import stopped_within

log = logging.getLogger(__name__)

BACKOFF_START = 1.0
BACKOFF_MAX = 30.0


class OutageLog:
    """The log of ``what``'s outages: one ERROR when one starts, one WARNING when it ends."""

    def __init__(
        self,
        what: str,
        *,
        meanwhile: str = "waiting for it to come back",
        clock: Callable[[], float] = time.monotonic,
        on_start: Callable[[str], None] | None = None,
        **fields: object,
    ) -> None:
        self.what = what
        self.meanwhile = meanwhile
        self.clock = clock
        # Told the reason when an outage starts (once per outage: the service raises its
        # staff alert there, at no cost while the outage lasts or while there is none).
        self.on_start = on_start
        self.fields = fields
        self.since: float | None = None
        self.failures = 0

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, reason: str) -> None:
        """Note one failure; the first of an outage is logged at ERROR, the rest at DEBUG."""
        self.failures += 1
        if self.since is not None:
            log.debug(f"{self.what} still unreachable", extra={"reason": reason, **self.fields})
            return
        self.since = self.clock()
        log.error(
            f"{self.what} is unreachable; {self.meanwhile}",
            extra={"reason": reason, **self.fields},
        )
        if self.on_start is not None:
            self.on_start(reason)

    def recovered(self) -> float | None:
        """Note a success; ends the outage (logged with its duration) if there was one."""
        if self.since is None:
            return None
        seconds = self.clock() - self.since
        log.warning(
            f"{self.what} is reachable again after {seconds:.1f} s",
            extra={"seconds": round(seconds, 3), "failures": self.failures, **self.fields},
        )
        self.since = None
        self.failures = 0
        return seconds


class DatabaseOutages:
    """Waits out the database's outages for the callers of one engine.

    Callers that fail together (the committer, a claim ahead) wait for one probe loop and log
    one outage. ``give_up_after`` seconds (None: never) ends the wait with
    ``DatabaseUnavailable`` carrying how long it was waited; so does ``stop``.
    """

    def __init__(
        self,
        engine: sa.Engine,
        *,
        give_up_after: float | None = None,
        hint: str | None = None,
        backoff: tuple[float, float] = (BACKOFF_START, BACKOFF_MAX),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.backoff = backoff  # the first pause between probes, and the longest
        self.url = safe_url(engine.url)
        self.give_up_after = give_up_after
        self.hint = hint
        self.clock = clock
        self.log = OutageLog(f"the database at {self.url}", clock=clock)
        self._lock = asyncio.Lock()
        self._generation = 0  # outages waited out so far
        self._final: DatabaseUnavailable | None = None

    async def wait(self, error: DatabaseUnavailable, stop: asyncio.Event | None = None) -> None:
        """Return once the database answers again after ``error``; raise when the wait ends."""
        generation = self._generation
        async with self._lock:
            if self._final is not None:
                raise self._final from error
            if generation != self._generation:
                return  # another caller waited this outage out meanwhile: try again
            try:
                await self._probe_until_back(error, stop)
            except DatabaseUnavailable as final:
                self._final = final
                raise
            self._generation += 1

    async def _probe_until_back(
        self, error: DatabaseUnavailable, stop: asyncio.Event | None
    ) -> None:
        self.log.failed(error.reason)
        since = self.log.since
        assert since is not None
        delay, longest = self.backoff
        while True:
            waited = self.clock() - since
            if self.give_up_after is not None and waited >= self.give_up_after:
                raise self._giving_up(error, since, self.hint) from error
            pause = delay
            if self.give_up_after is not None:
                pause = min(pause, self.give_up_after - waited)
            if await stopped_within(stop, pause):
                raise self._giving_up(error, since, "stopped while waiting for it") from error
            delay = min(delay * 2, longest)
            try:
                await asyncio.to_thread(probe, self.engine)
            except DatabaseUnavailable as again:
                error = again
                self.log.failed(again.reason)
                continue
            self.log.recovered()
            return

    def _giving_up(
        self, error: DatabaseUnavailable, since: float, hint: str | None
    ) -> DatabaseUnavailable:
        waited = self.clock() - since
        return DatabaseUnavailable(self.url, error.reason, since=since, waited=waited, hint=hint)
