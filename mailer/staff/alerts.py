"""Alerts to staff: each cause raised at most once an hour, always logged at ERROR.

A cause is a stable string naming what is wrong and where (``stall:issue:42``,
``feed:https://…``): the same trouble seen again within the hour, by this process or another,
is neither logged again nor mailed again. The claim is one statement on ``staff_alerts``, so
two processes never both raise it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from mailer.config.settings import Settings
from mailer.db.engine import reading, upsert_insert, writing
from mailer.db.schema import staff_alerts
from mailer.staff.outbox import enqueue

log = logging.getLogger(__name__)

ALERT_EVERY = timedelta(hours=1)
# An alert raised within this long is open: what is wrong is likely still wrong (a cause seen
# again is raised again each ``ALERT_EVERY``).
OPEN_FOR = timedelta(hours=24)


def raise_alert(
    engine: sa.Engine,
    settings: Settings,
    *,
    cause: str,
    subject: str,
    text: str,
    now: datetime,
) -> bool:
    """Log and mail the alert unless its cause was raised within the hour; True if raised.

    ``subject`` is one line naming what is wrong; ``text`` says what it means and what to do.
    """
    with writing(engine) as conn:
        if not _claim(conn, cause, subject, now):
            return False
        log.error("alert: %s", subject, extra={"cause": cause})
        enqueue(
            conn,
            kind="alert",
            cause=cause,
            to=settings.staff.alert_emails,
            subject=f"[{settings.site.name}] alert: {subject}",
            text=text,
            html=None,
            now=now,
        )
    return True


def _claim(conn: sa.Connection, cause: str, message: str, now: datetime) -> bool:
    """Record that ``cause`` is raised now, unless it was within ``ALERT_EVERY``."""
    insert = upsert_insert(conn, staff_alerts)
    raised = conn.execute(
        insert.values(cause=cause[:200], last_raised_at=now, times=1, message=message)
        .on_conflict_do_update(
            index_elements=["cause"],
            set_={
                "last_raised_at": now,
                "times": staff_alerts.c.times + 1,
                "message": message,
            },
            where=staff_alerts.c.last_raised_at <= now - ALERT_EVERY,
        )
        .returning(staff_alerts.c.cause)
    ).scalar_one_or_none()
    return raised is not None


@dataclass(frozen=True)
class OpenAlert:
    """An alert raised within ``OPEN_FOR``: its cause, its last subject, when and how often."""

    cause: str
    message: str
    last_raised_at: datetime
    times: int


def open_alerts(
    engine: sa.Engine, *, now: datetime, within: timedelta = OPEN_FOR
) -> list[OpenAlert]:
    """The alerts raised within ``within`` of ``now``, the latest first."""
    with reading(engine) as conn:
        rows = conn.execute(
            sa.select(staff_alerts)
            .where(staff_alerts.c.last_raised_at >= now - within)
            .order_by(staff_alerts.c.last_raised_at.desc(), staff_alerts.c.cause)
        ).all()
    return [OpenAlert(r.cause, r.message, r.last_raised_at, r.times) for r in rows]
