"""The public archive: the issues someone received, as the web app lists and shows them.

An issue is public when its status is "sent" and at least one of its deliveries was sent: an
issue that went to nobody (no subscriber matched its topics) or whose every delivery failed
was never read by anyone, so it is not shown as if it had been. ``RECEIVED`` is that rule,
the one clause every query here uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from mailer.db.engine import reading
from mailer.db.schema import deliveries, issues

# Sent, and received by at least one reader (the deliveries' (issue_id, …) index answers it).
RECEIVED = sa.and_(
    issues.c.status == "sent",
    sa.exists().where(deliveries.c.issue_id == issues.c.id, deliveries.c.status == "sent"),
)


@dataclass(frozen=True)
class ArchivedIssue:
    """A sent issue as the public archive lists it."""

    id: int
    digest: str
    subject: str
    scheduled_for: datetime


@dataclass(frozen=True)
class Neighbours:
    """The archived issues of the same digest just before and just after one issue."""

    previous: ArchivedIssue | None
    next: ArchivedIssue | None


_COLUMNS = (issues.c.id, issues.c.digest, issues.c.subject, issues.c.scheduled_for)


def _issue(row: sa.Row[Any, Any, Any, Any] | None) -> ArchivedIssue | None:
    return (
        None if row is None else ArchivedIssue(row.id, row.digest, row.subject, row.scheduled_for)
    )


def sent_issues(
    engine: sa.Engine, *, limit: int, offset: int, digests: Sequence[str] | None = None
) -> list[ArchivedIssue]:
    """Archived issues, newest first; only those of ``digests`` when given."""
    query = sa.select(*_COLUMNS).where(RECEIVED)
    if digests is not None:
        query = query.where(issues.c.digest.in_(list(digests)))
    with reading(engine) as conn:
        rows = conn.execute(
            query.order_by(issues.c.scheduled_for.desc(), issues.c.id.desc())
            .limit(limit)
            .offset(offset)
        ).all()
    return [ArchivedIssue(r.id, r.digest, r.subject, r.scheduled_for) for r in rows]


def is_sent(conn: sa.Connection, issue_id: int, *, digests: Sequence[str] | None = None) -> bool:
    """Whether the issue exists and is public (``RECEIVED``), and is of ``digests`` when
    given."""
    query = sa.select(issues.c.id).where(issues.c.id == issue_id, RECEIVED)
    if digests is not None:
        query = query.where(issues.c.digest.in_(list(digests)))
    return conn.scalar(query) is not None


def neighbours(conn: sa.Connection, issue_id: int) -> Neighbours:
    """The archived issues of ``issue_id``'s digest just before and after it, in the archive's
    order (date, then number), so that "previous" and "next" walk the list one by one."""
    this = conn.execute(
        sa.select(issues.c.digest, issues.c.scheduled_for).where(issues.c.id == issue_id)
    ).first()
    if this is None:
        return Neighbours(None, None)
    same = sa.select(*_COLUMNS).where(RECEIVED, issues.c.digest == this.digest)
    at, number = issues.c.scheduled_for, issues.c.id
    before = conn.execute(
        same.where(
            sa.or_(at < this.scheduled_for, sa.and_(at == this.scheduled_for, number < issue_id))
        )
        .order_by(at.desc(), number.desc())
        .limit(1)
    ).first()
    after = conn.execute(
        same.where(
            sa.or_(at > this.scheduled_for, sa.and_(at == this.scheduled_for, number > issue_id))
        )
        .order_by(at, number)
        .limit(1)
    ).first()
    return Neighbours(_issue(before), _issue(after))


@dataclass(frozen=True)
class IssueLink:
    """A link to an archived issue, as the web copy's top bar shows it."""

    url: str
    subject: str
    date: str  # already in the site's time zone, e.g. "20 February 2027"


@dataclass(frozen=True)
class WebCopy:
    """What an archived issue's web page adds to the mail (``email/_web_copy.html``): the bar
    with the previous and next issue of its digest and the archive, and the sign-up box."""

    heading: str  # the page's one h1: the digest's name and the issue's date
    archive_url: str
    signup_url: str  # the sign-up page; the box's email field is sent to it as ?email=
    digest_name: str
    previous: IssueLink | None
    next: IssueLink | None
