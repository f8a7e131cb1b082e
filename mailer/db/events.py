"""The audit trail: one row per change of a subscriber's state or consent."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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


def record_many(conn: sa.Connection, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append many events in one statement; each row has subscriber_id, kind, at, detail."""
    batch = list(rows)
    if batch:
        conn.execute(events.insert(), batch)
