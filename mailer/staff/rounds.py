"""The staff round: what ``mailer run`` does for staff every ``[scheduler].poll_seconds``.

A round runs its steps in order, each a function of ``now`` in a thread (they read and write
the store), each guarded: a step that fails is one ERROR line naming it, and the round goes
on. Then the staff outbox is sent: on the delivery worker's SMTP pool when this process runs
one, else on a pool of its own for the round. A step may run less often than every round
(``every``): the 30-day rates read a month of deliveries.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING

import sqlalchemy as sa

from mailer.config.settings import Settings
from mailer.logs import describe_error
from mailer.staff.outbox import OutboxResult, Send, deliver_due
from mailer.text import one_line

if TYPE_CHECKING:
    from mailer.delivery.pool import SmtpPool

log = logging.getLogger(__name__)

Sign = Callable[[bytes], bytes] | None

# How often the checks that read more than a few rows run at most.
RATES_EVERY = timedelta(minutes=5)
STALLS_EVERY = timedelta(minutes=1)
MISSED_EVERY = timedelta(minutes=1)
# Owed welcome mails are looked for this often; each reader's retries are spaced further apart.
WELCOMES_EVERY = timedelta(seconds=30)


@dataclass(frozen=True)
class Step:
    """One thing the round does: ``call(now)``, at most once per ``every`` (None: each round)."""

    name: str
    call: Callable[[datetime], object]
    every: timedelta | None = None


def staff_steps(engine: sa.Engine, settings: Settings, *, sign: Sign = None) -> list[Step]:
    """The round's steps, in order: one line each. ``sign`` signs the welcome mails (DKIM)."""
    from mailer.staff import checks  # the schedules' calendar: only where the round runs

    def on(check: Callable[..., object]) -> Callable[[datetime], object]:
        return lambda now: check(engine, settings, now=now)

    from mailer.staff.reports import queue_reports

    return [
        Step("reports of issues that ended", on(queue_reports)),
        Step("missed slots", on(checks.check_missed_slots), MISSED_EVERY),
        Step("untaken arrivals", on(checks.check_arrivals), MISSED_EVERY),
        Step("stalled issues", on(checks.check_stalls), STALLS_EVERY),
        Step("failing feeds", on(checks.check_feeds)),
        Step("complaint and bounce rates", on(checks.check_rates), RATES_EVERY),
        Step("welcomes", welcomes_step(engine, settings, sign=sign), WELCOMES_EVERY),
    ]


def welcomes_step(
    engine: sa.Engine, settings: Settings, *, sign: Sign = None
) -> Callable[[datetime], object]:
    """The welcome mails owed to readers who confirmed while the relay did not accept them
    (``welcome_mail.send_owed``), through the sender the web app uses. The round runs a step in
    a thread; this one sends from an event loop of its own there."""
    from mailer.compose.rendering import Renderer
    from mailer.subscribers.welcome_mail import send_owed
    from mailer.web.sender import SmtpConfirmationSender

    sender = SmtpConfirmationSender(settings, sign=sign)
    renderer = Renderer()

    def step(now: datetime) -> object:
        return asyncio.run(send_owed(engine, settings, sender, now=now, renderer=renderer))

    return step


class StaffRound:
    """The steps and the outbox; ``pool`` (a callable) names the worker's open pool, if any."""

    def __init__(
        self,
        engine: sa.Engine,
        settings: Settings,
        *,
        sign: Sign,
        steps: Sequence[Step] | None = None,
        pool: Callable[[], SmtpPool | None] = lambda: None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.sign = sign
        self.steps = list(staff_steps(engine, settings) if steps is None else steps)
        self.pool = pool
        self.last_run: dict[str, datetime] = {}  # by step name: when it last ran

    async def run(self, now: datetime) -> OutboxResult | None:
        """One round at ``now``: every step due, then the outbox (None if sending failed)."""
        for step in self.steps:
            last = self.last_run.get(step.name)
            if step.every is not None and last is not None and now - last < step.every:
                continue
            self.last_run[step.name] = now
            try:
                await asyncio.to_thread(step.call, now)
            except Exception as exc:
                # A step's failure (the database, a bug) must not stop the others or the
                # service; the next round tries again.
                log.error(
                    "staff round: %s failed: %s",
                    step.name,
                    one_line(describe_error(exc)) or type(exc).__name__,
                    exc_info=log.isEnabledFor(logging.INFO),
                )
        return await self.deliver(now)

    async def deliver(self, now: datetime) -> OutboxResult | None:
        """Send the due staff mail on the worker's pool if open, else on one of our own."""
        pool = self.pool()
        try:
            return await deliver_due(self.engine, self.settings, now=now, send=self._sender(pool))
        except Exception as exc:
            log.error(
                "staff round: sending staff mail failed: %s",
                one_line(describe_error(exc)) or type(exc).__name__,
                exc_info=log.isEnabledFor(logging.INFO),
            )
            return None

    def _sender(self, pool: SmtpPool | None) -> Send:
        from mailer.staff.transport import send_now, send_on

        if pool is not None:
            return partial(send_on, pool, self.settings, sign=self.sign)
        return partial(send_now, self.settings, sign=self.sign)


async def deliver_outbox_now(
    engine: sa.Engine, settings: Settings, *, now: datetime, sign: Sign
) -> OutboxResult | None:
    """What a command that sent mail does last: the staff mail due (reports, alerts queued
    meanwhile) on a pool of its own. A relay that is down is one ERROR line per mail, which
    stays queued; never raises."""
    return await StaffRound(engine, settings, sign=sign, steps=()).deliver(now)


def flush_outbox(
    engine: sa.Engine, settings: Settings, *, now: datetime, sign: Sign
) -> OutboxResult | None:
    """``deliver_outbox_now`` for a command's last step (outside any event loop)."""
    return asyncio.run(deliver_outbox_now(engine, settings, now=now, sign=sign))
