"""The delivery loop: claim a batch, build each message, send over the pool, record the batch."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa

from mailer import ledger
from mailer.clock import now as clock_now
from mailer.config import Settings
from mailer.issues import finish_if_done, load_content
from mailer.messages import DigestComposer
from mailer.models import Recipient
from mailer.smtp import SmtpPool

log = logging.getLogger(__name__)

LEASE = timedelta(minutes=5)


@dataclass
class Totals:
    """What a delivery run did, for the summary line and the progress bar."""

    counts: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    def add(self, counts: dict[str, int]) -> None:
        for status, n in counts.items():
            self.counts[status] = self.counts.get(status, 0) + n

    @property
    def handled(self) -> int:
        return sum(self.counts.values())

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def rate(self) -> float:
        return self.counts.get("sent", 0) / self.elapsed if self.elapsed > 0 else 0.0


def worker_name() -> str:
    """A lease owner name unique to this process."""
    return f"{socket.gethostname()}:{os.getpid()}"[:64]


def envelope_sender(settings: Settings) -> str:
    """The envelope sender (Return-Path): configured, else the From: address."""
    from email.utils import parseaddr

    return settings.smtp.envelope_from or parseaddr(settings.site.from_address)[1]


class Deliverer:
    """Drains due deliveries for one pool; composers are cached per issue."""

    def __init__(
        self,
        engine: sa.Engine,
        settings: Settings,
        pool: SmtpPool,
        *,
        owner: str | None = None,
        clock: Callable[[], datetime] = clock_now,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.pool = pool
        self.owner = owner or worker_name()
        self.clock = clock
        self.sender = envelope_sender(settings)
        self._composers: dict[int, DigestComposer] = {}

    def composer(self, issue_id: int) -> DigestComposer:
        composer = self._composers.get(issue_id)
        if composer is None:
            with self.engine.connect() as conn:
                content = load_content(conn, issue_id, self.settings)
            composer = self._composers[issue_id] = DigestComposer(self.settings, content)
        return composer

    async def run_batch(self, *, issue_id: int | None = None) -> dict[str, int] | None:
        """Claim, send and record one batch; None when nothing was due."""
        claimed = await asyncio.to_thread(
            ledger.claim,
            self.engine,
            owner=self.owner,
            limit=self.settings.smtp.batch_size,
            lease=LEASE,
            now=self.clock(),
            issue_id=issue_id,
        )
        if not claimed:
            return None
        results = await asyncio.gather(*(self._deliver(d) for d in claimed))
        now = self.clock()
        counts = await asyncio.to_thread(
            ledger.record, self.engine, results, settings=self.settings.smtp, now=now
        )
        issues = {d.issue_id for d in claimed}
        await asyncio.to_thread(self._finish, issues, now)
        log.info("batch delivered", extra={"owner": self.owner, "counts": counts})
        return counts

    def _finish(self, issue_ids: set[int], now: datetime) -> None:
        with self.engine.begin() as conn:
            for issue_id in issue_ids:
                if finish_if_done(conn, issue_id, now):
                    log.info("issue sent", extra={"issue": issue_id})

    async def _deliver(self, d: ledger.Claimed) -> ledger.Result:
        recipient = Recipient(email=d.email, name=d.name, uid=d.uid, message_id=d.message_id)
        data = self.composer(d.issue_id).message(recipient, d.topics, self.clock())
        if data is None:
            return ledger.Result(d, None)
        return ledger.Result(d, await self.pool.send(self.sender, d.email, data))

    async def drain(
        self,
        *,
        issue_id: int | None = None,
        on_batch: Callable[[dict[str, int]], None] | None = None,
    ) -> Totals:
        """Deliver until nothing is due; deferred deliveries wait for a later run."""
        totals = Totals()
        while (counts := await self.run_batch(issue_id=issue_id)) is not None:
            totals.add(counts)
            if on_batch is not None:
                on_batch(counts)
        totals.finished = time.monotonic()
        return totals
