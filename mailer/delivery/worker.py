"""The delivery loop: claim a batch, send it over the pool's connections, commit in groups.

One *lane* per SMTP connection takes the batch's deliveries one at a time. As a lane takes a
message it hands the previous message's outcome and the new message's id to the committer
(mailer.delivery.commits): the committer writes what the lanes handed it in one transaction
(a group commit), which both records the outcomes and marks the new messages in flight.
Meanwhile the lane builds the message and sends its envelope (MAIL, RCPT, DATA); the message
itself goes out only once its start is written. That ordering is what bounds a crash to at
most one in-doubt message per connection (see mailer.delivery.ledger): a transaction cut off
before its message carries nothing. Claims are mailer.delivery.claims', the leases this worker
holds mailer.delivery.leases'.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import ParamSpec, TypeVar

import sqlalchemy as sa

from mailer.bounces.apply import apply_send_bounce
from mailer.bounces.verp import verp_address
from mailer.clock import now as clock_now
from mailer.compose.rendering import Renderer
from mailer.config.settings import Settings
from mailer.db.engine import writing
from mailer.db.outages import DatabaseOutages
from mailer.delivery import claims, ledger
from mailer.delivery.commits import Committer, Handoff
from mailer.delivery.composers import Composers
from mailer.delivery.holders import Holders, OnWait
from mailer.delivery.leases import Leases
from mailer.delivery.pacing import Backpressure
from mailer.delivery.pipeline import StartRefused
from mailer.delivery.policy import SendResult
from mailer.delivery.pool import SmtpPool
from mailer.errors import AddressError, DatabaseUnavailable, DeliveryError, TokenError
from mailer.issues.progress import NOT_BUILT, finish_if_done
from mailer.issues.schedule import quiet_until
from mailer.models import Recipient

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


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
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def rate(self) -> float:
        return self.counts.get("sent", 0) / self.elapsed if self.elapsed > 0 else 0.0


def worker_name() -> str:
    """A lease owner name unique to this process."""
    return f"{socket.gethostname()}:{os.getpid()}"[:64]


def apply_bounce(
    conn: sa.Connection, delivery: claims.Claimed, result: SendResult, now: datetime
) -> None:
    """A 5xx at send time is a bounce like a DSN's: same events, same suppression rules;
    5.7.x (policy) and MAIL-stage refusals never suppress the subscriber. Run inside the
    group commit that records the delivery bounced (``ledger.BounceHook``)."""
    apply_send_bounce(
        conn,
        delivery.subscriber_id,
        code=result.code,
        reply=result.reply,
        stage=result.stage.value,
        message_id=delivery.message_id,
        now=now,
    )


class Deliverer:
    """Drains due deliveries over one pool, composing each message (``Composers``).

    ``renderer`` renders every issue's templates (default: a Renderer of the package's own
    templates, this Deliverer's).
    """

    def __init__(
        self,
        engine: sa.Engine,
        settings: Settings,
        pool: SmtpPool,
        *,
        owner: str | None = None,
        clock: Callable[[], datetime] = clock_now,
        sign: Callable[[bytes], bytes] | None = None,
        outages: DatabaseOutages | None = None,
        renderer: Renderer | None = None,
    ) -> None:
        self.engine = engine
        self.renderer = renderer or Renderer()
        # A database outage is waited out (for ever by default) where a call fails, and the
        # call made again: see db().
        self.outages = outages or DatabaseOutages(engine)
        self._stop: asyncio.Event | None = None
        self.settings = settings
        self.pool = pool
        self.owner = owner or worker_name()
        self.clock = clock
        self.sign = sign
        self.lease = timedelta(seconds=settings.smtp.lease_seconds)
        self.leases = Leases(engine, self.owner, lease=self.lease, clock=clock)
        self.holders = Holders(
            engine, self.owner, db=self.db, heartbeat_seconds=self.leases.heartbeat_seconds
        )
        self._claimed_at: datetime | None = None  # when the latest claim chose its rows
        # Parsed once: parseaddr of the From: address costs about 100 µs, per message a sixth
        # of what sending one took (bench/README.md).
        self._sender = settings.envelope_from
        self.composers = Composers(engine, settings, clock, self.renderer)
        self._digests = {d.key: d for d in settings.digests}
        self.backpressure = Backpressure()
        # The next batch, claimed ahead while the current one drains: (issue_id, its claim).
        self._ahead: tuple[int | None, asyncio.Task[list[claims.Claimed]]] | None = None

    async def db(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``call`` in a thread; through a database outage, waited out and made again.

        Every call made this way is safe to make twice: a claim whose commit was lost leases
        rows that return to the queue when the lease ends; a group commit made again writes
        the same outcomes, and starts only rows whose lease this worker still holds. A message
        whose start was written is never sent again here: its lane waits for the commit.
        """
        while True:
            try:
                return await asyncio.to_thread(call, *args, **kwargs)
            except DatabaseUnavailable as exc:
                await self.outages.wait(exc, self._stop)

    def quiet(self, claimed: list[claims.Claimed]) -> list[claims.Claimed]:
        """Hand back bulk deliveries that fall in their digest's quiet hours; returns the rest."""
        now = self.clock()
        waiting: dict[datetime, list[int]] = {}
        ready = []
        for d in claimed:
            digest = self._digests.get(d.digest)
            until = None
            if digest is not None and digest.priority != "alert":
                until = quiet_until(digest.quiet_hours, digest.timezone, now)
            if until is None:
                ready.append(d)
            else:
                waiting.setdefault(until, []).append(d.id)
        for until, ids in waiting.items():
            claims.postpone(self.engine, ids, owner=self.owner, until=until, now=now)
        return ready

    def commit(self, batch: list[Handoff]) -> tuple[dict[str, int], set[int]]:
        """Write one group commit of the lanes' handoffs (``Committer``); the counts by new
        status and the ids started."""
        results = [h.result for h in batch if h.result is not None]
        starts = [h.start for h in batch if h.start is not None]
        with self.leases.writes:
            # The heartbeat rides on a group commit when one falls due: no extra transaction.
            renew = self.leases.renewal()
            try:
                counts, started = ledger.commit_progress(
                    self.engine,
                    results=results,
                    starts=starts,
                    owner=self.owner,
                    settings=self.settings.smtp,
                    now=self.clock(),
                    lease=self.lease,
                    on_bounce=apply_bounce,
                    renew=renew,
                )
            except BaseException:
                # Rolled back with the commit: the renewal is still owed, not a heartbeat away.
                if renew:
                    self.leases.renew_soon()
                raise
        self.leases.let_go(
            [r.delivery.id for r in results] + [i for i in starts if i not in started]
        )
        return counts, started

    async def take_over_dead(self, issue_id: int | None = None) -> bool:
        """End now the leases held by dead processes of this host on due deliveries (of
        ``issue_id``); True if there were any."""
        return await self.holders.take_over_dead(issue_id, now=self.clock())

    async def wait_for_others(
        self,
        issue_id: int | None = None,
        *,
        on_wait: OnWait | None = None,
        stop: asyncio.Event | None = None,
    ) -> bool:
        """Once nothing is claimable: whether other workers hold due deliveries (of
        ``issue_id``), after taking over the dead's or waiting a while for the living's
        (``Holders.wait``); the caller then claims again."""
        now = self.clock()
        # What another worker held when the latest claim chose its rows is waited for (or
        # taken) even if its lease ended since, before this worker could claim it.
        since = min(now, self._claimed_at or now)
        return await self.holders.wait(issue_id, now=now, since=since, on_wait=on_wait, stop=stop)

    def claim(self, issue_id: int | None) -> list[claims.Claimed]:
        now = self._claimed_at = self.clock()
        resend = self.settings.smtp.in_doubt == "resend"
        if not resend:
            claims.hold_in_doubt(self.engine, now=now)
        while True:
            claimed = claims.claim(
                self.engine,
                owner=self.owner,
                limit=self.settings.smtp.batch_size,
                lease=self.lease,
                now=now,
                issue_id=issue_id,
                resend_in_doubt=resend,
            )
            if not claimed:
                return []
            # Postponed rows are due later, so this loop ends.
            ready = self.quiet(claimed)
            if ready:
                self.leases.hold(d.id for d in ready)
                return ready

    async def run_batch(
        self, *, issue_id: int | None = None, stop: asyncio.Event | None = None
    ) -> dict[str, int] | None:
        """Claim, send and record one batch; None when nothing was due.

        When ``stop`` is set, lanes finish the message they are on and the rest of the batch
        is released to the queue. A database outage is waited out (``self.outages``); when
        that wait ends, ``DatabaseUnavailable`` is raised, and what this worker held returns
        to the queue by the ledger's rules (leases, in-doubt).
        """
        self._stop = stop
        try:
            return await self._run_batch(issue_id, stop)
        except DatabaseUnavailable:
            self._forget_prefetched()
            raise

    def _forget_prefetched(self) -> None:
        """Drop the claim ahead after an outage ended the batch (its rows' leases run out)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead[1].cancel()
            # Retrieved, so that its failure is not reported again when it is collected.
            ahead[1].add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _run_batch(
        self, issue_id: int | None, stop: asyncio.Event | None
    ) -> dict[str, int] | None:
        claimed = await self._claimed(issue_id)
        if not claimed:
            return None
        # Checked as each batch starts sending, not when it was claimed: a batch claimed ahead
        # was claimed before the previous one finished, maybe before an article was removed.
        await self.db(self.composers.refresh, {d.issue_id for d in claimed})
        queue = deque(claimed)
        totals = Totals()
        lanes_count = min(self.settings.smtp.connections, len(claimed))
        committer = Committer(
            lambda batch: self.db(self.commit, batch), totals.add, lanes=lanes_count
        )
        commit_task = asyncio.create_task(committer.run(), name="delivery-committer")
        # Claim the next batch while this one's last messages go out, so that no lane waits
        # for a claim (tens of milliseconds, and a bigger share of a small batch).
        low_water = max(2 * lanes_count, self.settings.smtp.batch_size // 4)
        lanes = [
            asyncio.create_task(
                self._lane(
                    queue, committer, stop, lambda: self._prefetch(queue, issue_id, low_water, stop)
                ),
                name=f"delivery-lane-{i}",
            )
            for i in range(lanes_count)
        ]
        try:
            await asyncio.gather(*lanes)
        finally:
            committer.close()
            await commit_task
        if queue:
            await self._release(list(queue))
        # An issue with rows in the next claim is not done: counting what is left of it
        # (a scan of the issue's rows) can wait for the batch that sends its last message.
        ahead = {d.issue_id for d in await self._peek_prefetched(issue_id)}
        done = {d.issue_id for d in claimed} - ahead
        if done:
            await self.db(self._finish, done)
        if stop is not None and stop.is_set():
            # Checked last: if it is not set here, the caller cannot see it set before its
            # next run_batch, which takes the claim ahead; if it is, those rows go back.
            await self._release_prefetched()
        log.info("batch delivered", extra={"owner": self.owner, "counts": totals.counts})
        return totals.counts

    async def _claimed(self, issue_id: int | None) -> list[claims.Claimed]:
        """The next batch: the one claimed ahead if it was for the same issue, else a claim."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            claimed = await ahead[1]
            if ahead[0] == issue_id:
                return claimed
            await self._release(claimed)
        return await self.db(self.claim, issue_id)

    def _prefetch(
        self,
        queue: deque[claims.Claimed],
        issue_id: int | None,
        low_water: int,
        stop: asyncio.Event | None,
    ) -> None:
        """Start claiming the next batch once ``queue`` runs low (once per batch)."""
        if self._ahead is None and len(queue) <= low_water and not (stop and stop.is_set()):
            task = asyncio.create_task(self.db(self.claim, issue_id), name="claim-ahead")
            self._ahead = (issue_id, task)

    async def _peek_prefetched(self, issue_id: int | None) -> list[claims.Claimed]:
        """The batch claimed ahead (kept for the next ``run_batch``), or [] if there is none."""
        if self._ahead is None or self._ahead[0] != issue_id:
            return []
        return await self._ahead[1]

    async def _release_prefetched(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            await self._release(await ahead[1])

    async def _release(self, claimed: list[claims.Claimed]) -> None:
        if claimed:
            ids = [d.id for d in claimed]
            await self.db(self._release_now, ids)

    def _release_now(self, ids: list[int]) -> None:
        with self.leases.writes:
            ledger.release(self.engine, ids, owner=self.owner, now=self.clock())
        self.leases.let_go(ids)

    async def _lane(
        self,
        queue: deque[claims.Claimed],
        committer: Committer,
        stop: asyncio.Event | None,
        popped: Callable[[], None] = lambda: None,
    ) -> None:
        previous: ledger.Result | None = None
        while True:
            if queue and self.backpressure.paused():
                # Record what we have, then pause with nothing marked in flight: a pause (up to
                # a minute) may outlast the lease, and a row still "sending" would then be
                # taken over and sent twice.
                if previous is not None:
                    await committer.handoff(previous, None)
                    previous = None
                await self.backpressure.wait()
            nxt = queue.popleft() if queue and not (stop and stop.is_set()) else None
            popped()
            if nxt is None:
                await committer.handoff(previous, None, last=True)
                return
            # The start is written while the message is built and its envelope goes out; the
            # message itself waits for it (``SmtpPool.send``'s gate).
            previous = await self._deliver(nxt, committer.submit(previous, nxt.id))
            if previous is not None and previous.outcome is not None:
                self.backpressure.observe(previous.outcome)

    def _finish(self, issue_ids: set[int]) -> None:
        now = self.clock()
        with writing(self.engine) as conn:
            for issue_id in issue_ids:
                if finish_if_done(conn, issue_id, now):
                    log.info("issue sent", extra={"issue": issue_id})

    async def _deliver(
        self, d: claims.Claimed, started: asyncio.Future[bool]
    ) -> ledger.Result | None:
        """Build and send ``d``, its message once ``started`` says its start was written; what
        became of it, or None when the start was refused (another worker holds the delivery
        now, and nothing of it was sent)."""
        try:
            result = await self._build_and_send(d, started)
        except StartRefused:
            return None
        # Asked again: a message not built, or a send that ended before its message was due
        # (no connection), never asked the gate.
        return result if await started else None

    async def _build_and_send(self, d: claims.Claimed, gate: asyncio.Future[bool]) -> ledger.Result:
        recipient = Recipient(email=d.email, name=d.name, uid=d.uid, message_id=d.message_id)
        try:
            composers = self.composers
            composer = composers.composer(d.issue_id, *composers.left_out(d))
            data = composer.message(recipient, d.topics, self.clock())
        except (AddressError, DeliveryError, TokenError) as exc:
            # One recipient's data is unusable: fail that delivery, not the batch. A template
            # error is the issue's, not the recipient's, and stops the run instead.
            log.warning("message not built", extra={"delivery": d.id, "error": str(exc)})
            return ledger.Result(d, None, error=f"{NOT_BUILT} {exc}")
        if data is None:
            return ledger.Result(d, None)
        if self.sign is not None:
            data = self.sign(data)
        sender = verp_address(self._sender, d.uid) if self.settings.smtp.verp else self._sender
        return ledger.Result(d, await self.pool.send(sender, d.email, data, gate=gate))

    async def drain(
        self,
        *,
        issue_id: int | None = None,
        on_batch: Callable[[dict[str, int]], None] | None = None,
        stop: asyncio.Event | None = None,
        on_wait: OnWait | None = None,
    ) -> Totals:
        """Deliver until nothing is due (or ``stop`` is set); deferred mail waits for later.

        Due deliveries another live worker holds are waited for (``on_wait`` is told who holds
        what) and sent here if their lease ends unfinished; a dead worker's are taken at once.
        """
        totals = Totals()
        stop = stop or asyncio.Event()
        async with self.leases.kept(stop):
            while not stop.is_set():
                counts = await self.run_batch(issue_id=issue_id, stop=stop)
                if counts is None:
                    if await self.wait_for_others(issue_id, on_wait=on_wait, stop=stop):
                        continue
                    break
                totals.add(counts)
                if on_batch is not None:
                    on_batch(counts)
        totals.finished = time.monotonic()
        return totals
