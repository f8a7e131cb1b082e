"""The next scheduled issue of a digest, as content: what ``digest preview`` and ``digest test``
show and send a copy of.

Two cases. An issue already made for a coming slot and waiting there (in review, approved or
held) has its articles fixed: it is shown as it is, without the articles staff dropped from
it, with its own subject. Otherwise the next slot's issue is not made yet, and it is shown
with what ``create.articles_for`` takes now (the call that makes the issue), under the
subject rendered for the slot's local date, as ``create_issue`` will render it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from mailer.config.settings import Digest
from mailer.db.schema import WAITING_ISSUE_STATUSES, issues
from mailer.issues import schedule
from mailer.issues.create import articles_for
from mailer.issues.progress import kept_articles
from mailer.models import IssueContent


@dataclass(frozen=True)
class NextIssue:
    """The digest's next issue: its slot (UTC), its content, and, once made, its id and status.

    ``slot`` is None only for a schedule whose last firing has passed: the content is then
    what an issue made now (``digest send``) would hold. ``left_over`` counts the articles past
    max_articles that the issue after it takes (0 for an issue already made).
    """

    slot: datetime | None
    content: IssueContent
    issue_id: int | None = None
    status: str | None = None
    left_over: int = 0

    @property
    def made(self) -> bool:
        """The issue exists already (its articles are fixed)."""
        return self.issue_id is not None


@dataclass(frozen=True)
class WaitingIssue:
    """An issue of a digest made for review and not released yet."""

    id: int
    status: str  # review, approved or held
    slot: datetime
    subject: str


def waiting_issue(conn: sa.Connection, digest_key: str) -> WaitingIssue | None:
    """The digest's oldest issue in review, approved or held: what its next issue is while a
    review window is open (a preview or test copy of "the next issue" should show it)."""
    row = conn.execute(
        sa.select(issues.c.id, issues.c.status, issues.c.scheduled_for, issues.c.subject)
        .where(issues.c.digest == digest_key, issues.c.status.in_(WAITING_ISSUE_STATUSES))
        # A held issue whose slot passed waits for staff: it still goes out before the next.
        .order_by(issues.c.scheduled_for)
        .limit(1)
    ).first()
    return None if row is None else WaitingIssue(row.id, row.status, row.scheduled_for, row.subject)


def next_issue(
    conn: sa.Connection,
    digest: Digest,
    *,
    now: datetime,
    render_subject: Callable[[Digest, datetime], str],
) -> NextIssue:
    """The next issue of ``digest`` after ``now``: the one waiting if there is one, else the
    next slot's as it would be made now."""
    waiting = waiting_issue(conn, digest.key)
    zone = ZoneInfo(digest.timezone)
    if waiting is not None:
        content = IssueContent(
            issue_id=waiting.id,
            digest_key=digest.key,
            digest_name=digest.name,
            subject=waiting.subject,
            date=waiting.slot.astimezone(zone),
            articles=kept_articles(conn, waiting.id),
        )
        return NextIssue(waiting.slot, content, waiting.id, waiting.status)
    slot = _next_open_slot(conn, digest, now)
    date = (slot or now).astimezone(zone)
    selection = articles_for(conn, digest, now=now)
    content = IssueContent(
        issue_id=0,  # not made yet: the web copy's address is not known
        digest_key=digest.key,
        digest_name=digest.name,
        subject=render_subject(digest, date),
        date=date,
        articles=tuple(selection.articles),
    )
    return NextIssue(slot, content, left_over=selection.left_over)


# Slots already made that the next open slot may lie beyond (a review window opens a slot's
# issue before it; an empty one stays made): more than any schedule makes ahead of time.
MADE_AHEAD = 10


def _next_open_slot(conn: sa.Connection, digest: Digest, now: datetime) -> datetime | None:
    """The first slot after ``now`` whose issue is not made yet: one made already (empty,
    or sending early) is not what the next issue holds."""
    after = now
    for _ in range(MADE_AHEAD):
        found = schedule.upcoming([digest], after)
        if not found:
            return None
        slot = found[0][1]
        made = conn.execute(
            sa.select(issues.c.id).where(
                issues.c.digest == digest.key, issues.c.scheduled_for == slot
            )
        ).first()
        if made is None:
            return slot
        after = slot
    return None
