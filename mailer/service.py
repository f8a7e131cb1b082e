"""The long-running service: scheduler, delivery worker and web app in one event loop.

Every process builds its scheduler from the config (memory job store: the config is the
truth). A firing calls ``fire``, which creates the issue for the slot idempotently, so any
number of processes sharing one database create each issue exactly once, without a leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
import uvicorn
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from mailer.clock import now as clock_now
from mailer.config import Digest, Settings
from mailer.delivery import Deliverer, Totals
from mailer.issues import IssueCreated, create_issue, last_scheduled
from mailer.ledger import Holding
from mailer.rendering import render_subject
from mailer.schedule import latest_slot, missed_slots, trigger_for
from mailer.signals import stop_on_signals
from mailer.smtp import SmtpPool
from mailer.sources import fetch_sources, log_results

log = logging.getLogger(__name__)

SHUTDOWN_SECONDS = 30.0


@dataclass(frozen=True)
class Parts:
    scheduler: bool = True
    worker: bool = True
    web: bool = True


class Service:
    """What ``mailer run`` and ``mailer worker`` run until ``stop`` is set."""

    def __init__(
        self,
        engine: sa.Engine,
        settings: Settings,
        *,
        parts: Parts = Parts(),
        clock: Callable[[], datetime] = clock_now,
        sign: Callable[[bytes], bytes] | None = None,
        on_wait: Callable[[Sequence[Holding], datetime], None] | None = None,
    ) -> None:
        self.engine = engine
        self.on_wait = on_wait  # told what a draining worker waits for (other workers' leases)
        self.settings = settings
        self.parts = parts
        self.clock = clock
        self.sign = sign
        self.stop = asyncio.Event()
        self.work = asyncio.Event()  # set when an issue was created: deliver without waiting

    def fire(self, digest: Digest, slot: datetime | None = None) -> IssueCreated | None:
        """Create the issue for ``slot`` (default: the slot that just came due)."""
        now = self.clock()
        grace = timedelta(seconds=self.settings.scheduler.misfire_grace_seconds + 60)
        slot = slot or latest_slot(digest, now, within=grace)
        if slot is None:
            return None
        issue = create_issue(
            self.engine,
            self.settings,
            digest,
            scheduled_for=slot,
            now=now,
            render_subject=render_subject,
        )
        if issue.created:
            lag = (now - slot).total_seconds()
            log.info(
                "issue created for slot",
                extra={
                    "digest": digest.key,
                    "issue": issue.issue_id,
                    "slot": slot.isoformat(),
                    "lag_s": f"{lag:.3f}",
                },
            )
            self.work.set()
        return issue

    def catch_up(self) -> list[IssueCreated]:
        """Create the issues of slots missed while no process was running."""
        made = []
        cfg = self.settings.scheduler
        for digest in self.settings.digests:
            now = self.clock()
            for slot in missed_slots(
                digest,
                last_issue=last_scheduled(self.engine, digest.key),
                now=now,
                window=timedelta(hours=cfg.catch_up_hours),
                catch_up=cfg.catch_up,
            ):
                issue = self.fire(digest, slot)
                if issue is not None:
                    made.append(issue)
        return made

    def scheduler(self) -> AsyncIOScheduler:
        scheduler = AsyncIOScheduler(timezone="UTC")
        for digest in self.settings.digests:
            scheduler.add_job(
                self._fire_async,
                trigger=trigger_for(digest),
                args=[digest],
                id=f"digest:{digest.key}",
                name=f"digest {digest.key}",
                coalesce=True,
                max_instances=1,
                misfire_grace_time=self.settings.scheduler.misfire_grace_seconds,
            )
        feeds = self.settings.feeds
        if self.settings.sources and feeds.interval_minutes > 0:
            scheduler.add_job(
                self.fetch_sources,
                trigger=IntervalTrigger(minutes=feeds.interval_minutes, timezone="UTC"),
                id="sources:fetch",
                name="fetch sources",
                coalesce=True,
                max_instances=1,  # a slow run is never overlapped by the next one
                misfire_grace_time=max(1, int(feeds.interval_minutes * 60)),
                # At start-up too, not one interval later: a restart must not leave news waiting.
                next_run_time=self.clock(),
            )
        return scheduler

    async def fetch_sources(self) -> None:
        """Fetch every source once (the scheduler's job); failures are logged, never raised."""
        feeds = self.settings.feeds
        try:
            results = await fetch_sources(
                self.engine,
                self.settings,
                now=self.clock(),
                concurrency=feeds.concurrency,
                read_timeout=feeds.timeout,
                max_bytes=feeds.max_bytes,
            )
        except Exception:
            # What fails every source (the database) must not kill the scheduler; the next
            # interval tries again. One broken feed is a result, not an exception.
            log.exception("fetching sources failed")
            return
        log_results(results)

    async def _fire_async(self, digest: Digest) -> None:
        try:
            await asyncio.to_thread(self.fire, digest)
        except Exception:
            # A failed firing must not kill the scheduler; the next start catches the slot up.
            log.exception("creating the issue failed", extra={"digest": digest.key})

    async def deliver_forever(self, *, drain: bool = False) -> Totals:
        """Deliver due mail until stopped (or, with ``drain``, until nothing is due)."""
        totals = Totals()
        async with SmtpPool(self.settings.smtp) as pool:
            deliverer = Deliverer(
                self.engine, self.settings, pool, clock=self.clock, sign=self.sign
            )
            async with deliverer.leases_kept(self.stop):
                while not self.stop.is_set():
                    self.work.clear()
                    counts = await deliverer.run_batch(stop=self.stop)
                    if counts is not None:
                        totals.add(counts)
                        continue
                    if drain:
                        if await deliverer.wait_for_others(on_wait=self.on_wait, stop=self.stop):
                            continue
                        break
                    if await deliverer.take_over_dead():
                        continue
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            _first(self.stop, self.work),
                            timeout=self.settings.scheduler.poll_seconds,
                        )
        return totals

    async def run(self, *, drain: bool = False) -> Totals:
        """Run the configured parts until SIGTERM/SIGINT (or drained); returns delivery totals."""
        tasks: list[asyncio.Task[object]] = []
        scheduler = None
        with stop_on_signals(self.stop):
            if self.parts.scheduler:
                await asyncio.to_thread(self.catch_up)
                scheduler = self.scheduler()
                scheduler.start()
            server = self._web_server() if self.parts.web else None
            if server is not None:
                tasks.append(asyncio.create_task(server.serve(), name="web"))
            totals = Totals()
            log.info(
                "service running",
                extra={
                    "scheduler": self.parts.scheduler,
                    "worker": self.parts.worker,
                    "web": self.parts.web,
                },
            )
            try:
                if self.parts.worker:
                    totals = await self.deliver_forever(drain=drain)
                else:
                    await self.stop.wait()
            finally:
                if scheduler is not None:
                    scheduler.shutdown(wait=False)
                if server is not None:
                    server.should_exit = True
                if tasks:
                    await asyncio.wait(tasks, timeout=SHUTDOWN_SECONDS)
        return totals

    def _web_server(self) -> uvicorn.Server:
        from mailer.web.app import create_app
        from mailer.web.sender import SmtpConfirmationSender
        from mailer.web.server import server_config

        app = create_app(
            self.settings, self.engine, SmtpConfirmationSender(self.settings, sign=self.sign)
        )
        config = server_config(app, host=self.settings.web.host, port=self.settings.web.port)
        return _QuietServer(config)


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the service owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
