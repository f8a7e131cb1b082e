"""What staff run on a digest's next issue (``digest preview`` and ``digest send``): preview it
as it would go out now, open it (resume the unfinished one, else make one for now), deliver it.

Not the scheduler's path: that one makes issues at their slots (``mailer.service``) and leaves
them to the running workers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from mailer.compose.messages import DigestComposer
from mailer.compose.rendering import Renderer
from mailer.config.settings import Digest, Settings
from mailer.db.outages import DatabaseOutages
from mailer.db.schema import issues
from mailer.delivery.ledger import Holding
from mailer.delivery.pacing import SharedSchedule
from mailer.delivery.pool import SmtpPool
from mailer.delivery.worker import Deliverer, Totals
from mailer.issues.create import IssueCreated, articles_for, create_issue
from mailer.models import IssueContent


@dataclass(frozen=True)
class Preview:
    subject: str
    html: str
    text: str
    articles: int
    # Articles past max_articles, which the issue after the next one takes.
    left_over: int = 0
    article_ids: tuple[int, ...] = ()  # what the issue would take, in its order


def preview_next(
    engine: sa.Engine, settings: Settings, digest: Digest, *, now: datetime, renderer: Renderer
) -> Preview:
    """The next issue as it would go out now, with neutral links, without creating it.

    The same selection ``create_issue`` makes at ``now``: the articles the digest has not taken
    yet, within its lookback, oldest arrival first up to max_articles.
    """
    with engine.connect() as conn:
        selection = articles_for(conn, digest, now=now)
    chosen = selection.articles
    date = now.astimezone(ZoneInfo(digest.timezone))
    subject = renderer.render_subject(digest, date)
    content = IssueContent(
        issue_id=0,
        digest_key=digest.key,
        digest_name=digest.name,
        subject=subject,
        date=date,
        articles=tuple(chosen),
    )
    html, text = DigestComposer(settings, content, renderer=renderer).preview(digest.topics)
    ids = tuple(a.id for a in chosen)
    return Preview(subject, html, text, len(chosen), selection.left_over, ids)


def open_issue(
    engine: sa.Engine, settings: Settings, digest: Digest, *, now: datetime, renderer: Renderer
) -> IssueCreated:
    """The digest's unfinished issue if there is one (resume it), else a new issue for now.

    Resuming instead of starting over is what makes a second ``digest send`` after a crash
    send nothing twice; a new issue holds only the articles no issue of the digest took yet.
    """
    with engine.connect() as conn:
        unfinished = conn.execute(
            sa.select(issues.c.id)
            .where(issues.c.digest == digest.key, issues.c.status == "sending")
            .order_by(issues.c.scheduled_for)
            .limit(1)
        ).scalar_one_or_none()
    if unfinished is not None:
        return IssueCreated(unfinished, False, 0, 0)
    return create_issue(
        engine,
        settings,
        digest,
        scheduled_for=now,
        now=now,
        render_subject=renderer.render_subject,
    )


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
