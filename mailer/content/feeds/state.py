"""Feed state: one ``feed_state`` row per feed URL, the table's only writer (validators for the
next conditional GET, the last error, consecutive failures).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from mailer.db.engine import reading, upsert_insert
from mailer.db.schema import feed_state
from mailer.errors import FeedError


@dataclass(frozen=True)
class FeedState:
    """What the last fetches of one feed left behind."""

    url: str
    etag: str | None
    last_modified: str | None
    last_status: int | None
    last_fetched_at: datetime | None
    last_success_at: datetime | None
    last_error: str | None
    consecutive_failures: int


MAX_ERROR_TEXT = 2_000


def load_feed_states(engine: sa.Engine) -> dict[str, FeedState]:
    """Every feed's state, by URL."""
    with reading(engine) as conn:
        rows = conn.execute(sa.select(feed_state))
        return {row.url: FeedState(**row._mapping) for row in rows}


def _upsert(conn: sa.Connection, values: dict[str, Any], on_conflict: dict[str, Any]) -> None:
    statement = upsert_insert(conn, feed_state).values(values)
    conn.execute(statement.on_conflict_do_update(index_elements=["url"], set_=on_conflict))


def record_success(
    engine: sa.Engine,
    url: str,
    *,
    status: int,
    etag: str | None,
    last_modified: str | None,
    now: datetime,
) -> None:
    """Store a fetch that worked: the validators to send next time, failures reset.

    Call it only after the articles are stored: a validator saved for a response that was not
    ingested would turn every later fetch into a 304 and lose that response for good.
    """
    # A validator too long for its column is dropped: without it the next fetch is a plain GET.
    values = {
        "etag": etag if etag and len(etag) <= 500 else None,
        "last_modified": last_modified if last_modified and len(last_modified) <= 100 else None,
        "last_status": status,
        "last_fetched_at": now,
        "last_success_at": now,
        "last_error": None,
        "consecutive_failures": 0,
    }
    with engine.begin() as conn:
        _upsert(conn, {"url": url, **values}, values)


def record_failure(engine: sa.Engine, url: str, error: FeedError, *, now: datetime) -> None:
    """Store a failed fetch: the error text and status, one more consecutive failure.

    The validators are kept: the feed is unchanged as far as we know.
    """
    text = str(error)[:MAX_ERROR_TEXT]
    values = {"last_status": error.status, "last_fetched_at": now, "last_error": text}
    with engine.begin() as conn:
        _upsert(
            conn,
            {"url": url, **values, "consecutive_failures": 1},
            values | {"consecutive_failures": feed_state.c.consecutive_failures + 1},
        )
