"""The next scheduled issue of a digest, as content: what ``digest preview`` and ``digest test``
show and send a copy of.

Two cases. An issue already made for a coming slot and waiting there (in review, approved or
held) has its articles fixed: it is shown as it is, without the articles staff dropped from
it, with its own subject. Otherwise the next slot's issue is not made yet, and it is shown
with what ``create.articles_for`` takes now (the call that makes the issue), under the
subject rendered for the slot's local date, as ``create_issue`` will render it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from mailer.compose.rendering import SubjectRenderer, leads
from mailer.config.settings import Digest, Settings
from mailer.db.schema import WAITING_ISSUE_STATUSES, issues
from mailer.issues import notes, schedule
from mailer.issues.create import articles_for
from mailer.issues.progress import kept_articles
from mailer.models import Article, IssueContent
from mailer.sandbox import Lead


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
    note: str = ""
    note_by: str = ""


def waiting_issue(conn: sa.Connection, digest_key: str) -> WaitingIssue | None:
    """The digest's oldest issue in review, approved or held: what its next issue is while a
    review window is open (a preview or test copy of "the next issue" should show it)."""
    row = conn.execute(
        sa.select(
            issues.c.id,
            issues.c.status,
            issues.c.scheduled_for,
            issues.c.subject,
            issues.c.note,
            issues.c.note_by,
        )
        .where(issues.c.digest == digest_key, issues.c.status.in_(WAITING_ISSUE_STATUSES))
        # A held issue whose slot passed waits for staff: it still goes out before the next.
        .order_by(issues.c.scheduled_for)
        .limit(1)
    ).first()
    if row is None:
        return None
    slot, note, by = row.scheduled_for, row.note or "", row.note_by or ""
    return WaitingIssue(row.id, row.status, slot, row.subject, note, by)


def next_issue(
    conn: sa.Connection,
    digest: Digest,
    *,
    now: datetime,
    render_subject: SubjectRenderer,
    settings: Settings | None = None,
) -> NextIssue:
    """The next issue of ``digest`` after ``now``: the one waiting if there is one, else the
    next slot's as it would be made now. With ``settings``, a next issue not made yet has
    the subject's topic names and the digest's waiting note file, as ``create_issue`` will."""
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
            note=waiting.note,
            note_by=waiting.note_by,
        )
        return NextIssue(waiting.slot, content, waiting.id, waiting.status)
    slot = _next_open_slot(conn, digest, now)
    date = (slot or now).astimezone(zone)
    selection = articles_for(conn, digest, now=now)
    chosen = tuple(selection.articles)
    note = notes.waiting_file(settings, digest) if settings is not None else None
    content = IssueContent(
        issue_id=0,  # not made yet: the web copy's address is not known
        digest_key=digest.key,
        digest_name=digest.name,
        subject=render_subject(digest, date, _leads(settings, chosen)),
        date=date,
        articles=chosen,
        note=note.text if note else "",
        note_by=note.by if note else "",
    )
    return NextIssue(slot, content, left_over=selection.left_over)


def _leads(settings: Settings | None, chosen: tuple[Article, ...]) -> tuple[Lead, ...]:
    if settings is not None:
        return leads(settings, chosen)
    return tuple(Lead(a.title, a.topic) for a in chosen)


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
