"""More sending processes: ``[smtp].processes``.

A Python process sends on one core: composing, DKIM's RSA step and the SMTP client all hold
the GIL, so threads add no core (bench/README.md). ``processes = N`` starts N − 1 helper
processes beside the command that runs the delivery loop (``digest send``, ``worker``,
``run``). Each has its own database engine, SMTP pool (``[smtp].connections`` connections)
and DKIM signer, and runs the same loop on the same database: claims lease disjoint rows, so
each message still goes out once, and a crash still leaves at most one in-doubt message per
open connection. ``[smtp].rate_per_second`` holds for all of them together: their rate
limiters reserve slots from one schedule in shared memory (``mailer.smtp.share_schedule``).

Helpers are spawned, not forked: the parent holds threads, an event loop and open
connections, none of which survive a fork safely. They report per-batch counts and their
totals on a queue; SIGTERM/SIGINT stop them the way they stop the parent (lanes finish the
message they are on, unstarted claims go back to the queue).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from mailer.config import Settings
from mailer.smtp import share_schedule

log = logging.getLogger(__name__)

# How long a stopped helper gets to finish its message and give its claims back.
STOP_GRACE_SECONDS = 45.0


@dataclass(frozen=True)
class Job:
    """What a helper delivers: one issue's deliveries, or every due one (a worker)."""

    issue_id: int | None = None
    drain: bool = False  # end when nothing is due, instead of waiting for more


@dataclass(frozen=True)
class HelperExit:
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
    counts: dict[str, int] = field(default_factory=dict)
    exits: list[HelperExit] = field(default_factory=list)

    @property
    def failed(self) -> list[HelperExit]:
        return [e for e in self.exits if not e.ok]


class Helpers:
    """``with Helpers(settings, job):`` runs ``[smtp].processes`` − 1 helpers for the block.

    Leaving the block waits for them when ``job.drain`` (they end when nothing is due) and
    stops them otherwise; ``report`` then holds their counts and how each one ended.
    """

    def __init__(
        self,
        settings: Settings,
        job: Job,
        *,
        on_batch: Callable[[dict[str, int]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.job = job
        self.on_batch = on_batch
        self.report = HelperReport()
        self._ctx = multiprocessing.get_context("spawn")
        self._events: Any = self._ctx.SimpleQueue()
        self._processes: list[multiprocessing.process.BaseProcess] = []
        # The rate limiters' next free slot (monotonic seconds), for every process.
        self._schedule: Any = self._ctx.Value("d", 0.0)
        self._reader: threading.Thread | None = None
        self._stopping = False

    @property
    def count(self) -> int:
        return self.settings.smtp.processes - 1

    def __enter__(self) -> Helpers:
        if self.count < 1:
            return self
        level = logging.getLogger().getEffectiveLevel()
        share_schedule(self._schedule)
        for _ in range(self.count):
            process = self._ctx.Process(
                target=_helper_main,
                args=(self.settings, self.job, self._events, self._schedule, level),
                name="mailer-sender",
                daemon=False,
            )
            process.start()
            self._processes.append(process)
        self._reader = threading.Thread(target=self._read, name="sender-events", daemon=True)
        self._reader.start()
        log.info("sending processes started", extra={"pids": [p.pid for p in self._processes]})
        return self

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
        share_schedule(None)
        if exc_type is not None or not self.job.drain:
            self.stop()
        self._join()
        self._events.put(("end", 0, {}))
        if self._reader is not None:
            self._reader.join(timeout=5)

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
                self.report.exits.append(HelperExit(process.pid or 0, process.exitcode))
            process.close()

    def _read(self) -> None:
        while True:
            kind, _pid, counts = self._events.get()
            if kind == "end":
                return
            if kind == "batch" and self.on_batch is not None:
                self.on_batch(counts)
            elif kind == "done":
                for status, n in counts.items():
                    self.report.counts[status] = self.report.counts.get(status, 0) + n


def _helper_main(settings: Settings, job: Job, events: Any, schedule: Any, level: int) -> None:
    """A helper process: the delivery loop on its own engine, pool and signer."""
    from mailer import logs
    from mailer.db import create_engine

    logs.configure(level)
    share_schedule(schedule)
    # A stop signal before the delivery loop listens (or after it is done) is noted, not
    # fatal: nothing is claimed then, and the loop starts already stopped.
    requested = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _sig, _frame: requested.set())
    engine = create_engine(settings.database.url)
    try:
        counts = asyncio.run(_deliver(engine, settings, job, events, requested))
    finally:
        engine.dispose()
    events.put(("done", os.getpid(), counts))


async def _deliver(
    engine: Any, settings: Settings, job: Job, events: Any, requested: threading.Event
) -> dict[str, int]:
    from mailer.digests import deliver_issue
    from mailer.dkim import signer_for
    from mailer.service import Parts, Service, stop_on_signals

    sign = signer_for(settings)
    if job.issue_id is None:
        service = Service(engine, settings, parts=Parts(scheduler=False, web=False), sign=sign)
        if requested.is_set():
            service.stop.set()
        return (await service.run(drain=job.drain)).counts
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
        )
    return totals.counts
