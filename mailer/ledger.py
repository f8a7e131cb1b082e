"""The delivery ledger: claim due deliveries with a lease, record outcomes in group commits.

A delivery moves queued → sending (claimed, leased) → sent | deferred | bounced | failed |
cancelled. Claims take a batch at once (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, the
``BEGIN IMMEDIATE`` write lock on SQLite) so that concurrent workers never share a row, and
results are written per batch, not per message: a transaction per message was measured at
about 200 messages per second.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from mailer.config import SmtpSettings
from mailer.schema import deliveries, subscriber_topics, subscribers
from mailer.smtp import Outcome, SendResult

CLAIMABLE = ("queued", "deferred")


@dataclass(frozen=True)
class Claimed:
    """A delivery this worker holds the lease on, with what it needs to build the message."""

    id: int
    issue_id: int
    subscriber_id: int
    email: str
    name: str
    uid: str
    topics: tuple[str, ...]
    message_id: str
    attempts: int
    created_at: datetime


@dataclass(frozen=True)
class Result:
    delivery: Claimed
    outcome: SendResult | None  # None: nothing to send (no article in the subscriber's topics)


def claim(
    engine: sa.Engine,
    *,
    owner: str,
    limit: int,
    lease: timedelta,
    now: datetime,
    issue_id: int | None = None,
) -> list[Claimed]:
    """Lease up to ``limit`` due deliveries to ``owner``.

    Due means queued or deferred with ``next_attempt_at`` passed, or still "sending" under an
    expired lease (its worker died): such a message may have reached the server, and is sent
    again with the same Message-ID so that receivers can tell the copies apart.
    """
    due = sa.or_(
        sa.and_(deliveries.c.status.in_(CLAIMABLE), deliveries.c.next_attempt_at <= now),
        sa.and_(deliveries.c.status == "sending", deliveries.c.lease_expires_at < now),
    )
    query = (
        sa.select(deliveries.c.id)
        .where(due)
        .order_by(deliveries.c.next_attempt_at, deliveries.c.id)
    )
    if issue_id is not None:
        query = query.where(deliveries.c.issue_id == issue_id)
    with engine.begin() as conn:
        ids = conn.scalars(query.limit(limit).with_for_update(skip_locked=True)).all()
        if not ids:
            return []
        conn.execute(
            deliveries.update()
            .where(deliveries.c.id.in_(ids))
            .values(
                status="sending",
                lease_owner=owner,
                lease_expires_at=now + lease,
                attempts=deliveries.c.attempts + 1,
                updated_at=now,
            )
        )
        rows = conn.execute(
            sa.select(
                deliveries.c.id,
                deliveries.c.issue_id,
                deliveries.c.subscriber_id,
                deliveries.c.message_id,
                deliveries.c.attempts,
                deliveries.c.created_at,
                subscribers.c.email,
                subscribers.c.name,
                subscribers.c.uid,
                subscribers.c.status,
                subscribers.c.paused_until,
            )
            .join(subscribers, subscribers.c.id == deliveries.c.subscriber_id)
            .where(deliveries.c.id.in_(ids))
            .order_by(deliveries.c.id)
        ).all()
        # Someone who unsubscribed or paused after the snapshot gets nothing more.
        gone = [r.id for r in rows if not _receiving(r.status, r.paused_until, now)]
        if gone:
            conn.execute(
                deliveries.update()
                .where(deliveries.c.id.in_(gone))
                .values(
                    status="cancelled",
                    last_reply="subscriber no longer active",
                    lease_owner=None,
                    updated_at=now,
                )
            )
        live = [r for r in rows if _receiving(r.status, r.paused_until, now)]
        topics: dict[int, list[str]] = {r.subscriber_id: [] for r in live}
        for sid, topic in conn.execute(
            sa.select(subscriber_topics.c.subscriber_id, subscriber_topics.c.topic)
            .where(subscriber_topics.c.subscriber_id.in_(list(topics)))
            .order_by(subscriber_topics.c.topic)
        ):
            topics[sid].append(topic)
    return [
        Claimed(
            id=r.id,
            issue_id=r.issue_id,
            subscriber_id=r.subscriber_id,
            email=r.email,
            name=r.name,
            uid=r.uid,
            topics=tuple(topics[r.subscriber_id]),
            message_id=r.message_id,
            attempts=r.attempts,
            created_at=r.created_at,
        )
        for r in live
    ]


def _receiving(status: str, paused_until: datetime | None, now: datetime) -> bool:
    return status == "active" and (paused_until is None or paused_until <= now)


def retry_delay(settings: SmtpSettings, attempts: int, rng: random.Random) -> timedelta:
    """Exponential backoff with ±25% jitter, so deferred mail does not return in one wave."""
    base = settings.retry_base_seconds * (2 ** max(attempts - 1, 0))
    return timedelta(seconds=min(base, 6 * 3600) * rng.uniform(0.75, 1.25))


def record(
    engine: sa.Engine,
    results: Sequence[Result],
    *,
    settings: SmtpSettings,
    now: datetime,
    rng: random.Random | None = None,
) -> dict[str, int]:
    """Write a batch of outcomes in one transaction; returns counts by new status."""
    rng = rng or random.Random()
    give_up = timedelta(hours=settings.retry_max_age_hours)
    rows: list[dict[str, Any]] = []
    bounced: list[int] = []
    for result in results:
        d = result.delivery
        row: dict[str, Any] = {
            "_id": d.id,
            "_status": "sent",
            "_reply": None,
            "_sent_at": None,
            "_next": now,
        }
        outcome = result.outcome
        if outcome is None:
            row.update(_status="cancelled", _reply="no article in the subscriber's topics")
        else:
            row["_reply"] = (f"{outcome.code} " if outcome.code else "") + outcome.reply
            if outcome.outcome is Outcome.SENT:
                row["_sent_at"] = now
            elif outcome.outcome is Outcome.BOUNCED:
                row["_status"] = "bounced"
                bounced.append(d.subscriber_id)
            elif now - d.created_at >= give_up:
                row["_status"] = "failed"
            else:
                row.update(_status="deferred", _next=now + retry_delay(settings, d.attempts, rng))
        row["_reply"] = (row["_reply"] or "")[:500] or None
        rows.append(row)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["_status"]] = counts.get(row["_status"], 0) + 1
    if not rows:
        return counts
    with engine.begin() as conn:
        conn.execute(
            deliveries.update()
            .where(deliveries.c.id == sa.bindparam("_id"))
            .values(
                status=sa.bindparam("_status"),
                last_reply=sa.bindparam("_reply"),
                sent_at=sa.bindparam("_sent_at"),
                next_attempt_at=sa.bindparam("_next"),
                lease_owner=None,
                lease_expires_at=None,
                updated_at=now,
            ),
            rows,
        )
        if bounced:
            conn.execute(
                subscribers.update()
                .where(subscribers.c.id.in_(bounced))
                .values(bounce_count=subscribers.c.bounce_count + 1, updated_at=now)
            )
    return counts
