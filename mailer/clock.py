"""The one clock. Code takes ``now`` as an argument where it decides things; edges call this."""

from __future__ import annotations

from datetime import UTC, datetime


def now() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)
