"""The staff outbox: review mails, reports and alerts, queued where they are decided.

``enqueue`` adds a row in the caller's transaction, so the mail exists exactly when the
decision that raised it was committed (an issue moved to review, a report claimed, an alert
claimed). Sending is ``deliver_due``: transactional mail through the relay and DKIM key the
subscribers' mail uses, never through the subscriber ledger; a relay that is down leaves the
row pending for the next round.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Literal

import sqlalchemy as sa

from mailer.db.schema import staff_mail
from mailer.text import one_line

log = logging.getLogger(__name__)

StaffMailKind = Literal["review", "report", "alert"]


def enqueue(
    conn: sa.Connection,
    *,
    kind: StaffMailKind,
    cause: str,
    to: Sequence[str],
    subject: str,
    text: str,
    html: str | None,
    now: datetime,
) -> int | None:
    """Queue one mail to ``to`` in the caller's transaction; None when ``to`` is empty (no
    staff address configured: the caller's log line is all there is)."""
    if not to:
        return None
    mail_id = conn.execute(
        staff_mail.insert()
        .values(
            kind=kind,
            cause=cause[:200],
            recipients=";".join(to),
            subject=one_line(subject)[:500],
            text=text,
            html=html,
            status="pending",
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
        .returning(staff_mail.c.id)
    ).scalar_one()
    log.info("staff mail queued", extra={"kind": kind, "cause": cause, "mail": mail_id})
    return int(mail_id)
