"""The audit trail: one row per change of a subscriber's state or consent."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from mailer.db.schema import events


def record(
    conn: sa.Connection, subscriber_id: int | None, kind: str, at: datetime, **detail: Any
) -> None:
    """Append one event inside the caller's transaction."""
    conn.execute(
        events.insert().values(subscriber_id=subscriber_id, kind=kind, at=at, detail=detail)
    )


def record_each(
    conn: sa.Connection,
    kind: str,
    at: datetime,
    details: Iterable[tuple[int | None, dict[str, Any]]],
) -> None:
    """Append one event per (subscriber id, detail), in order, in one statement."""
    rows = [
        {"subscriber_id": subscriber_id, "kind": kind, "at": at, "detail": detail}
        for subscriber_id, detail in details
    ]
    if rows:
        conn.execute(events.insert(), rows)
