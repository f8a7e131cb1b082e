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
from mailer.issues.create import IssueCreated, create_issue
from mailer.issues.nextissue import next_issue


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
        upcoming = next_issue(conn, digest, now=now, render_subject=renderer.render_subject)
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
