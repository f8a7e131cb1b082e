"""The audit trail: one row per change of a subscriber's state or consent."""

from __future__ import annotations

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
