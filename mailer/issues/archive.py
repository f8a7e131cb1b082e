"""The public archive: the issues that were sent, as the web app lists and shows them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from mailer.db.engine import reading
from mailer.db.schema import issues


@dataclass(frozen=True)
class ArchivedIssue:
    """A sent issue as the public archive lists it."""

    id: int
    digest: str
    subject: str
    scheduled_for: datetime


def sent_issues(engine: sa.Engine, *, limit: int, offset: int) -> list[ArchivedIssue]:
    """Sent issues, newest first."""
    with reading(engine) as conn:
        rows = conn.execute(
            sa.select(issues.c.id, issues.c.digest, issues.c.subject, issues.c.scheduled_for)
            .where(issues.c.status == "sent")
            .order_by(issues.c.scheduled_for.desc(), issues.c.id.desc())
            .limit(limit)
            .offset(offset)
        ).all()
    return [ArchivedIssue(r.id, r.digest, r.subject, r.scheduled_for) for r in rows]


def is_sent(conn: sa.Connection, issue_id: int) -> bool:
    """Whether the issue exists and was sent (only those are public)."""
    status = conn.scalar(sa.select(issues.c.status).where(issues.c.id == issue_id))
    return status == "sent"
