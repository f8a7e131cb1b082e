"""One issue delivered in the foreground: ``digest send``, its helper processes and the demo.

The scheduler's path is different: the service makes issues at their slots and its worker
drains whatever is due (``mailer.service``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import datetime

import sqlalchemy as sa

from mailer.compose.rendering import Renderer
from mailer.config.settings import Settings
from mailer.db.outages import DatabaseOutages
from mailer.delivery.ledger import Holding
from mailer.delivery.pacing import SharedSchedule
from mailer.delivery.pool import SmtpPool
from mailer.delivery.worker import Deliverer, Totals


async def deliver_issue(
    engine: sa.Engine,
    settings: Settings,
    issue_id: int,
    *,
    on_batch: Callable[[dict[str, int]], None] | None = None,
    pool: SmtpPool | None = None,
    sign: Callable[[bytes], bytes] | None = None,
    stop: asyncio.Event | None = None,
    on_wait: Callable[[Sequence[Holding], datetime], None] | None = None,
    renderer: Renderer | None = None,
    schedule: SharedSchedule | None = None,
) -> Totals:
    """Send every due delivery of one issue over a fresh pool (or the one given), paced on
    ``schedule`` when other processes send with this one.

    When ``stop`` is set, lanes finish the message they are on and the rest is released.
    Deliveries of the issue that another live worker holds are waited for (``on_wait`` says
    which) and finished here if that worker's lease ends first. A database outage is waited
    out for ``[database].outage_wait_seconds``, then raises ``DatabaseUnavailable``.
    ``renderer`` renders the messages (default: the Deliverer's own).
    """
    wait = settings.database.outage_wait_seconds
    outages = DatabaseOutages(
        engine,
        give_up_after=wait,
        hint=f"gave up after [database].outage_wait_seconds = {wait:g}; once it is back, "
        f"`mailer digest send` resumes the issue, or a running worker sends it",
    )
    if pool is not None:
        deliverer = Deliverer(engine, settings, pool, sign=sign, outages=outages, renderer=renderer)
        return await deliverer.drain(
            issue_id=issue_id, on_batch=on_batch, stop=stop, on_wait=on_wait
        )
    async with SmtpPool(settings.smtp, schedule=schedule) as own:
        deliverer = Deliverer(engine, settings, own, sign=sign, outages=outages, renderer=renderer)
        return await deliverer.drain(
            issue_id=issue_id, on_batch=on_batch, stop=stop, on_wait=on_wait
        )
