"""What staff run on a digest's next issue (``digest preview`` and ``digest send``): preview it
as it would go out at its slot, and open it (resume the unfinished one, else make one for
now). The send itself is ``mailer.delivery.foreground.deliver_issue``.

Not the scheduler's path: that one makes issues at their slots (``mailer.service``) and leaves
them to the running workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from mailer.compose.messages import DigestComposer
from mailer.compose.rendering import Renderer
from mailer.config.settings import Digest, Settings
from mailer.db.engine import reading
from mailer.db.schema import issues
from mailer.errors import DigestError
from mailer.issues.create import IssueCreated, create_issue
from mailer.issues.nextissue import next_issue, waiting_issue
from mailer.issues.schedule import local_time


@dataclass(frozen=True)
class Preview:
    """The next issue as it would go out now: its subject and the HTML and text of one variant."""

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
    """The next scheduled issue (``nextissue.next_issue``) with neutral links, every topic
    of the digest shown, without creating it.

    Not made yet, it holds what ``create_issue`` would take at ``now``: the articles the
    digest has not taken yet, within its lookback, oldest arrival first up to max_articles.
    """
    with reading(engine) as conn:
        upcoming = next_issue(
            conn, digest, now=now, render_subject=renderer.render_subject, settings=settings
        )
    content = upcoming.content
    html, text = DigestComposer(settings, content, renderer=renderer).preview(digest.topics)
    ids = tuple(a.id for a in content.articles)
    return Preview(content.subject, html, text, len(ids), upcoming.left_over, ids)


def open_issue(
    engine: sa.Engine, settings: Settings, digest: Digest, *, now: datetime, renderer: Renderer
) -> IssueCreated:
    """The digest's unfinished issue if there is one (resume it), else a new issue for now.

    Resuming instead of starting over is what makes a second ``digest send`` after a crash
    send nothing twice; a new issue holds only the articles no issue of the digest took yet.
    Staff sending by hand review what they send, so the issue is not made in review; but an
    issue of the digest waiting in review, approved or held is refused (DigestError naming
    it), rather than a second issue made beside it with the articles it did not take.
    """
    with reading(engine) as conn:
        unfinished = conn.execute(
            sa.select(issues.c.id)
            .where(issues.c.digest == digest.key, issues.c.status == "sending")
            .order_by(issues.c.scheduled_for)
            .limit(1)
        ).scalar_one_or_none()
        waiting = waiting_issue(conn, digest.key)
    if unfinished is not None:
        return IssueCreated(unfinished, False, 0, 0)
    if waiting is not None:
        slot = local_time(waiting.slot, settings.site.timezone)
        skip = f"`mailer issues skip {waiting.id}`"
        if waiting.status == "approved":
            then = f"it goes out then; {skip} first to send another now"
        else:
            then = f"`mailer issues approve {waiting.id}` sends it, {skip} drops it"
        raise DigestError(
            f"{digest.key} has issue {waiting.id} {waiting.status} for {slot}: {then}"
        )
    return create_issue(
        engine,
        settings,
        digest,
        scheduled_for=now,
        now=now,
        render_subject=renderer.render_subject,
        reviewed=False,
    )
