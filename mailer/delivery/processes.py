"""More sending processes: ``[smtp].processes``.

A Python process sends on one core: composing, DKIM's RSA step and the SMTP client all hold
the GIL, so threads add no core (bench/README.md). ``processes = N`` starts N − 1 helper
processes beside the command that runs the delivery loop (``digest send``, ``worker``,
``run``). Each has its own database engine, SMTP pool (``[smtp].connections`` connections)
and DKIM signer, and runs the same loop on the same database: claims lease disjoint rows, so
each message still goes out once, and a crash still leaves at most one in-doubt message per
open connection. ``[smtp].rate_per_second`` holds for all of them together: their rate
pacers reserve slots from one schedule in shared memory (``Helpers.schedule``, handed to each
process's pool: ``mailer.delivery.pacing.Pacer``).

Helpers are spawned: a new interpreter that imports what it needs (about 0.4 s). ``digest
send`` starts them first thing, before it opens a connection, a thread or an event loop, and
there they are forked instead: ready in milliseconds with every module already imported
(at 10,000 recipients the second process then sends from the start, not from the middle of
the run). Either way a helper prepares while the issue is being made and waits for its job
on a pipe. They report per-batch counts and their totals on a queue; SIGTERM/SIGINT stop
them the way they stop the parent (lanes finish the message they are on, unstarted claims go
back to the queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from mailer.config.settings import Settings
from mailer.delivery.pacing import SharedSchedule
from mailer.errors import MailerError

if TYPE_CHECKING:
    from mailer.compose.rendering import Renderer

log = logging.getLogger(__name__)

# How long a stopped helper gets to finish its message and give its claims back.
STOP_GRACE_SECONDS = 45.0
# How often a helper waiting for its job checks that the command that started it still runs.
JOB_POLL_SECONDS = 0.5
# How long the command waits for the helpers' last events once they have all ended.
END_SECONDS = 5.0


@dataclass(frozen=True)
class Job:
    """What a helper delivers: one issue's deliveries, or every due one (a worker)."""

    issue_id: int | None = None
    drain: bool = False  # end when nothing is due, instead of waiting for more


@dataclass(frozen=True)
class HelperExit:
    """How one helper process ended."""

    pid: int
    exitcode: int | None  # None: still running when given up on; negative: killed by a signal

    @property
    def ok(self) -> bool:
        return self.exitcode == 0

    def describe(self) -> str:
        if self.exitcode is None:
            return f"sending process {self.pid} did not stop"
        if self.exitcode < 0:
            return f"sending process {self.pid} was killed by signal {-self.exitcode}"
        return f"sending process {self.pid} exited with status {self.exitcode}"


@dataclass
class HelperReport:
    """What the helper processes did together: their summed delivery counts, and how each
    one ended."""

    counts: dict[str, int] = field(default_factory=dict)
    exits: list[HelperExit] = field(default_factory=list)

    @property
    def failed(self) -> list[HelperExit]:
        """The helpers that did not exit with status 0 (killed, failed, or not stopped)."""
        return [e for e in self.exits if not e.ok]


class Helpers:
    """``with Helpers(settings, job):`` runs ``[smtp].processes`` − 1 helpers for the block.

    Without a job they start, prepare and wait until ``assign`` gives them one; a block left
    without one ends them. Leaving the block waits for them when ``job.drain`` (they end when
    nothing is due) and stops them otherwise; ``report`` then holds their counts and how each
    one ended.

    ``fork=True`` is the caller's word that it has opened nothing yet (no connection, thread
    or event loop): the helpers are then forked, where the platform forks safely.
    """

    def __init__(
        self,
        settings: Settings,
        job: Job | None = None,
        *,
        on_batch: Callable[[dict[str, int]], None] | None = None,
        fork: bool = False,
    ) -> None:
        self.settings = settings
        self.job = job
        self.on_batch = on_batch
        self.report = HelperReport()
        forks = fork and sys.platform == "linux" and threading.active_count() == 1
        self._ctx: Any = multiprocessing.get_context("fork" if forks else "spawn")
        # One pipe per helper for what it reports (batches sent, its totals), read by one
        # thread here. Not one shared queue: a helper killed while writing to it (SIGKILL, the
        # OOM killer) left the queue's lock held for ever, and every other process's next
        # write, this command's included, waited for it.
        self._event_pipes: list[Any] = []
        self._jobs: list[Any] = []  # the sending end of each helper's job pipe
        self._assigned = False
        self._processes: list[multiprocessing.process.BaseProcess] = []
        # The pacers' next free slot (monotonic seconds), for every process.
        self._schedule: Any = self._ctx.Value("d", 0.0)
        self._reader: threading.Thread | None = None
        self._stopping = False

    @property
    def count(self) -> int:
        return self.settings.smtp.processes - 1

    @property
    def schedule(self) -> SharedSchedule | None:
        """The rate schedule this process's pool shares with the helpers; None without any."""
        return self._schedule if self.count >= 1 else None

    def __enter__(self) -> Helpers:
        if self.count < 1:
            return self
        level = logging.getLogger().getEffectiveLevel()
        for _ in range(self.count):
            receive, send = self._ctx.Pipe(duplex=False)
            events_in, events_out = self._ctx.Pipe(duplex=False)
            process = self._ctx.Process(
                target=_helper_main,
                args=(
                    self.settings,
                    receive,
                    os.getpid(),
                    Events(events_out),
                    self._schedule,
                    level,
                ),
                name="mailer-sender",
                daemon=False,
            )
            process.start()
            receive.close()
            # Only the helper writes to it: its exit (or death) is the end of its events.
            events_out.close()
            self._event_pipes.append(events_in)
            self._jobs.append(send)
            self._processes.append(process)
        self._reader = threading.Thread(target=self._read, name="sender-events", daemon=True)
        self._reader.start()
        log.info("sending processes started", extra={"pids": [p.pid for p in self._processes]})
        if self.job is not None:
            self.assign(self.job)
        return self

    def assign(self, job: Job, *, on_batch: Callable[[dict[str, int]], None] | None = None) -> None:
        """Give the waiting helpers their job (once)."""
        self.job = job
        if on_batch is not None:
            self.on_batch = on_batch
        self._hand_out(job)

    def _hand_out(self, job: Job | None) -> None:
        if self._assigned:
            return
        self._assigned = True
        for send in self._jobs:
            # A helper that has already gone is reported by _join, with how it ended.
            with contextlib.suppress(OSError):
                send.send(job)
            send.close()

    def stop(self) -> None:
        """Ask every helper to stop (SIGTERM, once): each finishes its message and releases the
        rest."""
        if not self._stopping:
            self._stopping = True
            self._signal(signal.SIGTERM)

    def _signal(self, sig: signal.Signals) -> None:
        for process in self._processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, sig)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._processes:
            return
        if not self._assigned:
            self._hand_out(None)  # no job: each helper ends as soon as it reads this
        elif exc_type is not None or self.job is None or not self.job.drain:
            self.stop()
        self._join()
        # Every helper has ended, so each of their pipes ends once its last event is read.
        if self._reader is not None:
            self._reader.join(timeout=END_SECONDS)

    def _join(self) -> None:
        for process in self._processes:
            # A draining helper ends by itself; a stopped one gets a grace period, then one
            # more SIGTERM (in case the first came before its loop listened, or a connection
            # hangs), then SIGKILL.
            process.join(STOP_GRACE_SECONDS if self._stopping else None)
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
                process.join(STOP_GRACE_SECONDS)
            if process.is_alive():
                process.kill()
                process.join(5)
                self.report.exits.append(HelperExit(process.pid or 0, None))
            else:
                code = process.exitcode
                if self._stopping and code == -signal.SIGTERM:
                    # Our own SIGTERM ended it before it set its handler, i.e. before it held
                    # anything (a spawned helper still importing): a stop, not a failure.
                    code = 0
                self.report.exits.append(HelperExit(process.pid or 0, code))
            process.close()

    def _read(self) -> None:
        pending: list[Any] = list(self._event_pipes)
        while pending:
            ready: list[Any] = multiprocessing.connection.wait(pending)
            for pipe in ready:
                try:
                    event: tuple[str, int, dict[str, int]] = pipe.recv()
                    kind, _pid, counts = event
                except (EOFError, OSError):
                    # The helper has ended (a helper killed mid-write ends its pipe here too).
                    pending.remove(pipe)
                    pipe.close()
                    continue
                if kind == "batch" and self.on_batch is not None:
                    self.on_batch(counts)
                elif kind == "done":
                    for status, n in counts.items():
                        self.report.counts[status] = self.report.counts.get(status, 0) + n


class Events:
    """A helper's end of its events pipe: ``put((kind, pid, counts))``."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    def put(self, event: tuple[str, int, dict[str, int]]) -> None:
        self.pipe.send(event)


def _helper_main(
    settings: Settings, jobs: Any, parent: int, events: Any, schedule: Any, level: int
) -> None:
    """A helper process: prepares, waits for its job, then runs the delivery loop on its own
    engine, pool and signer."""
    from mailer import logs
    from mailer.compose.dkim import signer_for
    from mailer.compose.rendering import Renderer, digest_templates
    from mailer.db.engine import create_engine
    from mailer.delivery.foreground import deliver_issue  # noqa: F401  (imported while nothing is due yet)

    logs.configure(level)
    # A stop signal before the delivery loop listens (or after it is done) is noted, not
    # fatal: nothing is claimed then, and the loop starts already stopped.
    requested = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _sig, _frame: requested.set())
    sign = signer_for(settings)
    # While the command makes the issue: compiled here, the templates cost its first message
    # nothing.
    renderer = Renderer()
    renderer.warm(digest_templates(settings))
    job = _wait_for_job(jobs, parent)
    if job is None:
        events.put(("done", os.getpid(), {}))
        return
    engine = create_engine(settings.database.url)
    try:
        counts = asyncio.run(
            _deliver(engine, settings, job, events, requested, sign, schedule, renderer)
        )
    except MailerError as exc:
        # A database outage that outlasted its wait, or a stop during one: one line in the
        # log, not a traceback; the command that started this process reports the exit.
        log.error("sending process stopped", extra={"error": str(exc)})
        events.put(("done", os.getpid(), {}))
        sys.exit(1)
    finally:
        engine.dispose()
    events.put(("done", os.getpid(), counts))


def _wait_for_job(jobs: Any, parent: int) -> Job | None:
    """The job the command hands out; None when it ends without one, or when it is gone (its
    end of the pipe may live on in a forked sibling, so its exit is watched, not the pipe)."""
    while not jobs.poll(JOB_POLL_SECONDS):
        if os.getppid() != parent:
            return None
    try:
        job: Job | None = jobs.recv()
    except EOFError:
        return None
    return job


async def _deliver(
    engine: Any,
    settings: Settings,
    job: Job,
    events: Any,
    requested: threading.Event,
    sign: Callable[[bytes], bytes] | None,
    schedule: SharedSchedule,
    renderer: Renderer,
) -> dict[str, int]:
    from mailer.delivery.foreground import deliver_issue

    if job.issue_id is None:
        from mailer.service import Parts, Service

        parts = Parts(scheduler=False, web=False)
        service = Service(engine, settings, parts=parts, sign=sign, schedule=schedule)
        if requested.is_set():
            service.stop.set()
        return (await service.run(drain=job.drain)).counts
    from mailer.signals import stop_on_signals

    stop = asyncio.Event()
    if requested.is_set():
        stop.set()
    with stop_on_signals(stop):
        totals = await deliver_issue(
            engine,
            settings,
            job.issue_id,
            on_batch=lambda counts: events.put(("batch", os.getpid(), counts)),
            sign=sign,
            stop=stop,
            schedule=schedule,
            renderer=renderer,
        )
    return totals.counts
