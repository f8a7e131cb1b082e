"""Sending across processes: this process's delivery loop with its helper processes beside it
(``[smtp].processes``), and one report of what they sent together.

The command line starts these and prints their report; the helpers themselves are
``mailer.delivery.processes``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

import sqlalchemy as sa

from mailer.config.settings import Settings
from mailer.delivery.foreground import deliver_issue
from mailer.delivery.ledger import Holding
from mailer.delivery.pacing import SharedSchedule
from mailer.delivery.processes import HelperExit, Helpers, Job
from mailer.delivery.worker import Totals
from mailer.errors import MailerError
from mailer.issues.progress import unfinished
from mailer.signals import stop_on_signals

if TYPE_CHECKING:
    from mailer.compose.rendering import Renderer
    from mailer.service import Parts

Sign = Callable[[bytes], bytes] | None
OnWait = Callable[[Sequence[Holding], datetime], None]


@dataclass
class SendReport:
    """What every process sent together; ``elapsed`` and ``processes`` for a timed send."""

    counts: dict[str, int] = field(default_factory=dict)
    failed: list[HelperExit] = field(default_factory=list)
    elapsed: float | None = None
    processes: int = 1

    def summary(self) -> str:
        """The one line a send ends with: counts by outcome, and for a timed send the
        cancelled ones, the time and the rate."""
        return summary(self.counts, elapsed=self.elapsed, processes=self.processes)


def summary(counts: Mapping[str, int], *, elapsed: float | None = None, processes: int = 1) -> str:
    """Counts by outcome (``sent 3, deferred 0, bounced 0, failed 0``); with ``elapsed``, also
    the cancelled ones, the time and the rate (and the processes, when more than one)."""
    c = counts
    line = (
        f"sent {c.get('sent', 0)}, deferred {c.get('deferred', 0)}, "
        f"bounced {c.get('bounced', 0)}, failed {c.get('failed', 0)}"
    )
    if elapsed is None:
        return line
    rate = c.get("sent", 0) / elapsed if elapsed > 0 else 0.0
    spread = f", {processes} processes" if processes > 1 else ""
    return f"{line}, cancelled {c.get('cancelled', 0)} in {elapsed:.2f}s ({rate:.0f} msg/s{spread})"


def serve(
    engine: sa.Engine,
    settings: Settings,
    parts: Parts,
    *,
    drain: bool,
    sign: Sign,
    web_socket: socket.socket | None = None,
    on_started: Callable[[], None] | None = None,
    on_wait: OnWait | None = None,
) -> SendReport:
    """Run the service here and its helper processes beside it, until stopped (or, with
    ``drain``, until nothing is due); raises when a helper ended badly."""
    # Here, not at the top: `digest send` imports this module too, and must not load the
    # scheduler, the web server and the feed stack it never uses (138 more modules, and 7 MB
    # more peak memory in every sending process).
    from mailer.service import Service

    helpers = Helpers(settings, Job(None, drain=drain))
    service = Service(
        engine,
        settings,
        parts=parts,
        sign=sign,
        web_socket=web_socket,
        on_wait=on_wait,
        schedule=helpers.schedule,
    )
    with helpers:
        totals = asyncio.run(service.run(drain=drain, on_started=on_started))
        if service.stop.is_set():
            helpers.stop()
    totals.add(helpers.report.counts)
    check_helpers(helpers.report.failed, settings)
    return SendReport(totals.counts, helpers.report.failed)


def send_issue(
    engine: sa.Engine,
    settings: Settings,
    issue_id: int,
    helpers: Helpers,
    sign: Sign,
    *,
    on_batch: Callable[[dict[str, int]], None],
    on_wait: OnWait | None = None,
    renderer: Renderer | None = None,
) -> Totals:
    """Deliver an issue here and in the (started, waiting) helpers; this process's totals.
    SIGTERM/SIGINT stop this process after its current messages, and the helpers with it.
    ``renderer``: this process's (default: a new one)."""
    helpers.assign(Job(issue_id, drain=True), on_batch=on_batch)
    totals, stopped = asyncio.run(
        _deliver_here(
            engine, settings, issue_id, on_batch, sign, on_wait, helpers.schedule, renderer
        )
    )
    if stopped:
        helpers.stop()
    return totals


async def _deliver_here(
    engine: sa.Engine,
    settings: Settings,
    issue_id: int,
    on_batch: Callable[[dict[str, int]], None],
    sign: Sign,
    on_wait: OnWait | None,
    schedule: SharedSchedule | None,
    renderer: Renderer | None,
) -> tuple[Totals, bool]:
    stop = asyncio.Event()
    with stop_on_signals(stop):
        totals = await deliver_issue(
            engine,
            settings,
            issue_id,
            on_batch=on_batch,
            sign=sign,
            stop=stop,
            on_wait=on_wait,
            schedule=schedule,
            renderer=renderer,
        )
    return totals, stop.is_set()


def issue_report(totals: Totals, helpers: Helpers, elapsed: float) -> SendReport:
    """This process's totals and the (ended) helpers' together, timed."""
    totals.add(helpers.report.counts)
    return SendReport(
        totals.counts,
        helpers.report.failed,
        elapsed=elapsed,
        processes=helpers.settings.smtp.processes,
    )


def check_issue(
    engine: sa.Engine, settings: Settings, issue_id: int, report: SendReport, *, at: datetime
) -> None:
    """Raise when the issue is not done (as of ``at``) or a helper died; a sending process
    that died is reported, and so is what is left of the issue (the sending command took over
    the dead process's deliveries, so often nothing is)."""
    died = [f.describe() for f in report.failed]
    left = unfinished(engine, issue_id)
    if left is not None:
        raise MailerError("; ".join([*died, left.describe(settings.site.timezone, at)]))
    if died:
        raise MailerError(
            "; ".join(died) + f": issue {issue_id} is complete all the same"
            " (this command sent the deliveries it held)"
        )


def check_helpers(failed: Sequence[HelperExit], settings: Settings) -> None:
    """Raise when a helper process ended badly, saying where its deliveries go."""
    if failed:
        raise MailerError(
            "; ".join(f.describe() for f in failed)
            + ": the deliveries it held go back to the queue at once for a worker on this host,"
            f" elsewhere when their lease ends ([smtp].lease_seconds ="
            f" {settings.smtp.lease_seconds:g}); then a worker or another `mailer digest send`"
            " sends them"
        )
