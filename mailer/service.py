"""The long-running service: scheduler, delivery worker and web app in one event loop.

Every process builds its scheduler from the config (memory job store: the config is the
truth). A firing calls ``fire``, which creates the issue for the slot idempotently, so any
number of processes sharing one database create each issue exactly once, without a leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from mailer.clock import now as clock_now
from mailer.compose.rendering import Renderer, SubjectRenderer
from mailer.config.settings import Digest, Settings
from mailer.content.sources import fetch_sources, log_results
from mailer.delivery.ledger import Holding
from mailer.delivery.pacing import SharedSchedule
from mailer.delivery.pool import SmtpAuthError, SmtpPool
from mailer.delivery.worker import Deliverer, Totals
from mailer.errors import DatabaseUnavailable, MailerError
from mailer.issues import arrival
from mailer.issues.create import IssueCreated, create_issue, last_scheduled
from mailer.issues.review import MISSED_WINDOW, alert_held, release, round_steps
from mailer.issues.schedule import latest_slot, local_time, missed_slots, trigger_for
from mailer.logs import describe_error
from mailer.signals import stop_on_signals, stopped_within
from mailer.staff import checks
from mailer.staff.rounds import StaffRound, Step, staff_steps
from mailer.text import one_line

if TYPE_CHECKING:
    from mailer.web.server import QuietServer

log = logging.getLogger(__name__)

SHUTDOWN_SECONDS = 30.0
# A failed scheduled firing is retried after 30 s, 1 min, 2 min ... at most 10 min apart,
# until the slot's [scheduler].misfire_grace_seconds has passed.
RETRY_FIRST_SECONDS = 30.0
RETRY_MAX_SECONDS = 600.0


@dataclass(frozen=True)
class Parts:
    """Which parts of the service this process runs: the scheduler, the delivery worker, the
    web app."""

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
        renderer: Renderer | None = None,
        render_subject: SubjectRenderer | None = None,
        retry_seconds: float = RETRY_FIRST_SECONDS,
        web_socket: socket.socket | None = None,
        on_wait: Callable[[Sequence[Holding], datetime], None] | None = None,
        schedule: SharedSchedule | None = None,
    ) -> None:
        self.engine = engine
        self.schedule = schedule  # the rate schedule shared with other sending processes
        self.on_wait = on_wait  # told what a draining worker waits for (other workers' leases)
        self.settings = settings
        self.parts = parts
        self.clock = clock
        self.sign = sign
        # One Renderer for all the service composes (issues, messages, web mails); the subject
        # may be given apart (tests give one that fails).
        self.renderer = renderer or Renderer()
        self.render_subject = render_subject or self.renderer.render_subject
        self.retry_seconds = retry_seconds  # the first wait before a failed firing is retried
        self.web_socket = web_socket  # bound by the caller (mailer.preflight.claim_port)
        self.stop = asyncio.Event()
        self.work = asyncio.Event()  # set when an issue was created: deliver without waiting
        # Set by the web app's push hook when it stored an article: look for arrivals now
        # rather than at the next poll (other paths are found by the poll).
        self.arrived = asyncio.Event()
        self.firings: set[asyncio.Task[IssueCreated | None]] = set()  # retrying a failed slot
        # The delivery worker's pool while it is open: the staff round sends staff mail on it.
        self.pool: SmtpPool | None = None
        open_reviews, release_slots = self.review_steps()
        self.staff = StaffRound(
            engine,
            settings,
            sign=sign,
            pool=lambda: self.pool,
            # Reviews first: a slot released or held this round is not then seen as missed.
            steps=[
                Step("review windows", open_reviews),
                Step("slots after review", release_slots),
                *staff_steps(engine, settings, sign=sign),
            ],
        )
        # Arrival digests: an issue as soon as articles of their topics are stored.
        self.arrivals = arrival.ArrivalWatch(
            engine,
            settings,
            render_subject=self.render_subject,
            retry_seconds=retry_seconds,
            retry_max_seconds=RETRY_MAX_SECONDS,
            shown=self._shown,
        )
        self.alerting: set[asyncio.Task[None]] = set()  # alerts raised from the event loop
        self.web_server: QuietServer | None = None  # while ``run`` serves the web app
        # Why the web app stopped on its own while the service ran (it then stops too).
        self.web_failure: str | None = None

    def fire(self, digest: Digest, slot: datetime | None = None) -> IssueCreated | None:
        """Create the issue for ``slot`` (default: the slot that just came due).

        An issue made before the slot for review is released instead (``review.release``):
        approved, or unreviewed under ``on_unreviewed``, it goes out on time.
        """
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
            render_subject=self.render_subject,
        )
        if not issue.created:
            # Made earlier for review: its slot has come, so it goes out (or is held) now.
            released = release(self.engine, self.settings, issue.issue_id, now=now)
            if released is not None and released.status == "sending":
                self.work.set()
            return issue
        if issue.status == "held":
            alert_held(
                self.engine,
                self.settings,
                issue_id=issue.issue_id,
                digest_key=digest.key,
                scheduled_for=slot,
                why=MISSED_WINDOW,
                now=now,
            )
        lag = (now - slot).total_seconds()
        log.info(
            "issue created for slot",
            extra={
                "digest": digest.key,
                "issue": issue.issue_id,
                "slot": self._shown(slot),
                "lag_s": f"{lag:.3f}",
            },
        )
        self.work.set()
        return issue

    def review_steps(self) -> list[Callable[[datetime], None]]:
        """The review window's steps for the periodic staff round (``review.round_steps``):
        open due review windows, release the slots that came; a release wakes the worker."""
        return round_steps(
            self.engine,
            self.settings,
            renderer=self.renderer,
            render_subject=self.render_subject,
            on_release=self.work.set,
        )

    def catch_up(self) -> list[IssueCreated]:
        """Create the issues of slots missed while no process was running."""
        made = []
        cfg = self.settings.scheduler
        for digest in self.settings.digests:
            now = self.clock()
            for slot in missed_slots(
                digest,
                last_issue=last_scheduled(self.engine, digest.key, until=now),
                now=now,
                window=timedelta(hours=cfg.catch_up_hours),
                catch_up=cfg.catch_up,
            ):
                issue = self.fire(digest, slot)
                if issue is not None:
                    made.append(issue)
        return made

    def watch_arrivals(self) -> arrival.Step:
        """One look at the store for the arrival digests (``ArrivalWatch.step``) at the
        clock's now, on the event loop's thread; a made issue wakes the worker."""
        step = self.arrivals.step(self.clock())
        self._arrivals_seen(step)
        return step

    def _arrivals_seen(self, step: arrival.Step) -> float:
        """After a look at the store: wake the worker for the issues it made (on the event
        loop: an asyncio.Event is not safe from a thread); how long to wait before the next
        look (the poll, or less when a debounce ends first)."""
        if step.made:
            self.work.set()
        wait = arrival.POLL_SECONDS
        if step.next_due is not None:
            until_due = (step.next_due - self.clock()).total_seconds()
            wait = min(wait, max(until_due, 0.0))
        return wait

    async def arrivals_forever(self) -> None:
        """Watch for arrivals until stopped: every ``arrival.POLL_SECONDS``, sooner when a
        debounce ends first or the web app's push hook stored an article (``arrived``). Every
        failure is logged and retried by the watch itself."""
        while not self.stop.is_set():
            # Cleared before the look, so that a push stored during it wakes the next one.
            self.arrived.clear()
            try:
                step = await asyncio.to_thread(self.arrivals.step, self.clock())
                wait = self._arrivals_seen(step)
            except Exception as exc:
                # What the watch did not catch (a thread that could not start): next poll.
                log.error(
                    "watching for arrivals failed: %s",
                    one_line(describe_error(exc)) or type(exc).__name__,
                )
                wait = arrival.POLL_SECONDS
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_first(self.stop, self.arrived), timeout=wait)

    def scheduler(self) -> AsyncIOScheduler:
        scheduler = AsyncIOScheduler(timezone="UTC")
        for digest in self.settings.digests:
            if digest.on_arrival:
                continue  # no slots: made by ``arrivals_forever``
            scheduler.add_job(
                self.fire_scheduled,
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
        scheduler.add_job(
            self.staff_round,
            trigger=IntervalTrigger(seconds=self.settings.scheduler.poll_seconds, timezone="UTC"),
            id="staff:round",
            name="staff round",
            coalesce=True,
            max_instances=1,  # a slow round (a relay that hangs) is never overlapped
            misfire_grace_time=max(1, int(self.settings.scheduler.poll_seconds * 2)),
        )
        return scheduler

    async def staff_round(self) -> None:
        """The scheduler's job: alert checks, reviews and reports due, then the staff outbox
        (mailer.staff.rounds); every failure is logged there, never raised."""
        await self.staff.run(self.clock())

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
                honour_backoff=True,
            )
        except DatabaseUnavailable as exc:
            # An outage is one line (the delivery loop logs when it ends); the next interval
            # tries again.
            log.error("fetching sources failed", extra={"error": str(exc)})
            return
        except Exception:
            # What fails every source (the database) must not kill the scheduler; the next
            # interval tries again. One broken feed is a result, not an exception.
            log.exception("fetching sources failed")
            return
        log_results(results)

    async def fire_scheduled(self, digest: Digest) -> None:
        """The scheduler's job: make the issue of the slot that just came due.

        A firing that fails is retried in a task of its own (``firings``), so that the job
        returns at once and the digest's next slot is never skipped as "still running".
        """
        grace = timedelta(seconds=self.settings.scheduler.misfire_grace_seconds + 60)
        slot = await asyncio.to_thread(latest_slot, digest, self.clock(), within=grace)
        if slot is None:
            return
        if await self._try_fire(digest, slot, attempt=1) is not None:
            return
        task = asyncio.create_task(
            self.retry_firing(digest, slot), name=f"retry {digest.key} {slot.isoformat()}"
        )
        self.firings.add(task)
        task.add_done_callback(self.firings.discard)

    async def retry_firing(self, digest: Digest, slot: datetime) -> IssueCreated | None:
        """Retry a failed firing with a doubling wait until it succeeds, the service stops, or
        the slot's misfire grace has passed; each failure and the end are logged at ERROR."""
        deadline = slot + timedelta(seconds=self.settings.scheduler.misfire_grace_seconds)
        delay = self.retry_seconds
        attempt = 1
        while True:
            remaining = (deadline - self.clock()).total_seconds()
            if remaining <= 0:
                log.error(
                    "issue not made: given up, the slot's misfire grace has passed"
                    " (make it with `mailer digest send`)",
                    extra={"digest": digest.key, "slot": self._shown(slot), "attempts": attempt},
                )
                await self._alert(
                    partial(checks.alert_missed_slots, self.engine, self.settings, digest, [slot])
                )
                return None
            # The last wait is cut short, so that a last attempt is made within the grace.
            if await stopped_within(self.stop, min(delay, remaining)):
                log.error(
                    "issue not made: the service stopped before it could be retried"
                    " (the next start catches the slot up)",
                    extra={"digest": digest.key, "slot": self._shown(slot), "attempts": attempt},
                )
                return None
            attempt += 1
            issue = await self._try_fire(digest, slot, attempt=attempt)
            if issue is not None:
                log.info(
                    "issue made on retry",
                    extra={"digest": digest.key, "slot": self._shown(slot), "attempt": attempt},
                )
                return issue
            delay = min(delay * 2, RETRY_MAX_SECONDS)

    async def _try_fire(
        self, digest: Digest, slot: datetime, *, attempt: int
    ) -> IssueCreated | None:
        """One attempt at the slot's issue; a failure is logged at ERROR and returns None."""
        try:
            issue = await asyncio.to_thread(self.fire, digest, slot)
        except Exception as exc:
            # Anything (the database, a template, a bug): logged and retried by the caller,
            # never dropped. The traceback only with -v: the message says what failed.
            log.error(
                "creating the issue failed: %s",
                one_line(describe_error(exc)) or type(exc).__name__,
                extra={"digest": digest.key, "slot": self._shown(slot), "attempt": attempt},
                exc_info=log.isEnabledFor(logging.INFO),
            )
            return None
        assert issue is not None  # the slot was given
        return issue

    def _shown(self, slot: datetime) -> str:
        return local_time(slot, self.settings.site.timezone)

    async def deliver_forever(self, *, drain: bool = False) -> Totals:
        """Deliver due mail until stopped (or, with ``drain``, until nothing is due)."""
        totals = Totals()
        async with SmtpPool(self.settings.smtp, schedule=self.schedule) as pool:
            pool.outage.on_start = self._relay_down
            self.pool = pool
            try:
                return await self._deliver_on(pool, totals, drain=drain)
            except SmtpAuthError as exc:
                # The service ends on it (no retry fixes a refused login); staff hear of it.
                await self._alert(
                    partial(checks.relay_auth_alert, self.engine, self.settings, str(exc))
                )
                raise
            finally:
                self.pool = None

    async def _deliver_on(self, pool: SmtpPool, totals: Totals, *, drain: bool) -> Totals:
        """The delivery loop on ``pool`` (``deliver_forever``'s body)."""
        deliverer = Deliverer(
            self.engine,
            self.settings,
            pool,
            clock=self.clock,
            sign=self.sign,
            renderer=self.renderer,
        )
        if drain:
            return await deliverer.drain(stop=self.stop, on_wait=self.on_wait)
        async with deliverer.leases.kept(self.stop):
            while not self.stop.is_set():
                self.work.clear()
                counts = await deliverer.run_batch(stop=self.stop)
                if counts is not None:
                    totals.add(counts)
                    continue
                if await deliverer.take_over_dead():
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        _first(self.stop, self.work),
                        timeout=self.settings.scheduler.poll_seconds,
                    )
        return totals

    def _web_ended(self, web: asyncio.Task[object]) -> None:
        """The web app's task ended. Unless the service is stopping, that is a failure: the
        sign-up page and every unsubscribe link are down, so the service stops (the worker
        finishes its batch) and ``run`` raises it, staff alerted, rather than sending mail
        whose links lead nowhere."""
        if self.stop.is_set():
            return
        failure = None if web.cancelled() else web.exception()
        reason = (
            one_line(describe_error(failure)) or type(failure).__name__
            if failure is not None
            else "it exited without an error"
        )
        self.web_failure = reason
        log.error("the web app stopped: %s", reason)
        task = asyncio.create_task(
            self._alert(partial(checks.web_stopped_alert, self.engine, self.settings, reason)),
            name="alert web:stopped",
        )
        self.alerting.add(task)
        task.add_done_callback(self.alerting.discard)
        self.stop.set()

    def _relay_down(self, reason: str) -> None:
        """The worker's pool saw the relay refuse a connection after answering (an outage
        starts): alert staff, from a task, without delaying the send that saw it."""
        task = asyncio.create_task(
            self._alert(partial(checks.relay_down_alert, self.engine, self.settings, reason)),
            name="alert relay:down",
        )
        self.alerting.add(task)
        task.add_done_callback(self.alerting.discard)

    async def _alert(self, raise_it: Callable[..., bool]) -> None:
        """``raise_it(now=...)`` in a thread; its own failure (the database) is one line."""
        try:
            await asyncio.to_thread(raise_it, now=self.clock())
        except Exception as exc:
            log.error(
                "raising a staff alert failed: %s",
                one_line(describe_error(exc)) or type(exc).__name__,
            )

    async def run(
        self, *, drain: bool = False, on_started: Callable[[], None] | None = None
    ) -> Totals:
        """Run the configured parts until SIGTERM/SIGINT (or drained); returns delivery totals.

        ``on_started`` is called once the scheduler runs and the web app listens.
        """
        tasks: list[asyncio.Task[object]] = []
        watch: asyncio.Task[None] | None = None
        scheduler = None
        with stop_on_signals(self.stop):
            if self.parts.scheduler:
                await asyncio.to_thread(self.catch_up)
                scheduler = self.scheduler()
                scheduler.start()
                if self.arrivals.digests:
                    watch = asyncio.create_task(self.arrivals_forever(), name="arrivals")
                    tasks.append(watch)
            server = self._web_server() if self.parts.web else None
            self.web_server = server
            totals = Totals()
            staff: tuple[QuietServer, socket.socket] | None = None
            try:
                if server is not None:
                    sockets = [self.web_socket] if self.web_socket is not None else None
                    web = asyncio.create_task(server.serve(sockets=sockets), name="web")
                    tasks.append(web)
                    await _first(server.listening, _done(web))
                    if not server.listening.is_set():
                        web.result()  # what stopped it, if it raised
                        raise MailerError("the web app stopped before it listened")
                    web.add_done_callback(self._web_ended)
                    staff = self._console_server()
                    if staff is not None:
                        # [staff_web] gives the console a listener of its own.
                        staff_server, staff_sock = staff
                        staff_web = await staff_server.serve_listening([staff_sock])
                        tasks.append(staff_web)
                        staff_web.add_done_callback(self._web_ended)
                if on_started is not None:
                    on_started()
                log.info(
                    "service running",
                    extra={
                        "scheduler": self.parts.scheduler,
                        "worker": self.parts.worker,
                        "web": self.parts.web,
                    },
                )
                if self.parts.worker:
                    totals = await self.deliver_forever(drain=drain)
                else:
                    await self.stop.wait()
                if self.web_failure is not None:
                    raise MailerError(f"the web app stopped: {self.web_failure}")
            finally:
                if scheduler is not None:
                    scheduler.shutdown(wait=False)
                if server is not None:
                    server.should_exit = True
                if staff is not None:
                    staff[0].should_exit = True
                if watch is not None and not self.stop.is_set():
                    watch.cancel()  # the service failed; after SIGTERM it ends on its own
                tasks.extend(self.alerting)
                for firing in self.firings:
                    if not self.stop.is_set():
                        firing.cancel()  # the service failed: that failure is what is reported
                    tasks.append(firing)  # after SIGTERM: each logs its slot as not made
                if tasks:
                    await asyncio.wait(tasks, timeout=SHUTDOWN_SECONDS)
                if staff is not None:
                    staff[1].close()
        return totals

    def _console_server(self) -> tuple[QuietServer, socket.socket] | None:
        from mailer.web.sender import SmtpConfirmationSender
        from mailer.web.server import console_server

        return console_server(
            self.settings,
            self.engine,
            SmtpConfirmationSender(self.settings, sign=self.sign),
            renderer=self.renderer,
        )

    def _web_server(self) -> QuietServer:
        from mailer.web.app import create_app
        from mailer.web.sender import SmtpConfirmationSender
        from mailer.web.server import QuietServer, server_config

        app = create_app(
            self.settings,
            self.engine,
            SmtpConfirmationSender(self.settings, sign=self.sign),
            renderer=self.renderer,
            on_article=self.arrived.set,
        )
        config = server_config(app, host=self.settings.web.host, port=self.settings.web.port)
        return QuietServer(config)


def _done(task: asyncio.Task[Any]) -> asyncio.Event:
    """An event set when ``task`` ends, however it ends."""
    event = asyncio.Event()
    task.add_done_callback(lambda _task: event.set())
    return event


async def _first(*events: asyncio.Event) -> None:
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
