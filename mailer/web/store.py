"""What the web app does to the database: sign-up, confirmation, and a link holder's changes.

Synchronous Core statements, each operation one transaction; the views call them in a thread
(``starlette.concurrency.run_in_threadpool``) so the event loop never waits on the database.
Every state change records an event (the audit trail, GDPR Art. 7(1) and 30).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa

from mailer.db import events as audit
from mailer.db.engine import upsert_insert
from mailer.db.schema import deliveries, events, issues, subscriber_topics, subscribers
from mailer.models import Recipient
from mailer.subscribers import store
from mailer.subscribers.tokens import new_uid

log = logging.getLogger(__name__)

UNCONFIRMED_TTL = timedelta(days=7)  # GDPR Art. 5(1)(e): unconfirmed sign-ups do not linger
CONFIRMATION_SENT = "confirmation_sent"
MAX_USER_AGENT = 500
MAX_IP = 64
# Statuses a link holder can still leave from; bounced and complained already get nothing.
LEAVABLE = ("active", "pending")


@dataclass(frozen=True)
class Consent:
    """The evidence recorded with a sign-up (COMPLIANCE.md 6.2)."""

    source: str
    ip: str | None
    user_agent: str | None
    policy_version: str


@dataclass(frozen=True)
class Account:
    """A subscriber as the token pages see them."""

    id: int
    uid: str
    email: str
    name: str
    status: str
    topics: tuple[str, ...]
    paused_until: datetime | None

    def paused(self, now: datetime) -> bool:
        return self.paused_until is not None and self.paused_until > now


class Confirmed(StrEnum):
    """What following a confirmation link did."""

    ACTIVATED = "activated"
    ALREADY = "already"  # active before: the link is idempotent
    INACTIVE = "inactive"  # unsubscribed, bounced or complained: an old link changes nothing
    UNKNOWN = "unknown"  # no such subscriber (purged unconfirmed, or erased)


def _clip(value: str | None, limit: int) -> str | None:
    if value is None:
        return None
    value = "".join(ch for ch in value if ch.isprintable())
    return value[:limit]


def _load(
    conn: sa.Connection, where: sa.ColumnElement[bool], *, lock: bool = False
) -> Account | None:
    query = sa.select(subscribers).where(where)
    if lock:
        # Serializes concurrent sign-ups of one address on PostgreSQL (the daily cap is a
        # count-then-insert); SQLite's BEGIN IMMEDIATE already serializes every writer.
        query = query.with_for_update()
    row = conn.execute(query).first()
    if row is None:
        return None
    topics = conn.scalars(
        sa.select(subscriber_topics.c.topic)
        .where(subscriber_topics.c.subscriber_id == row.id)
        .order_by(subscriber_topics.c.topic)
    ).all()
    return Account(
        id=row.id,
        uid=row.uid,
        email=row.email,
        name=row.name,
        status=row.status,
        topics=tuple(topics),
        paused_until=row.paused_until,
    )


def account(engine: sa.Engine, uid: str) -> Account | None:
    """The subscriber a link token names, or None if there is none (purged or erased)."""
    with engine.connect() as conn:
        return _load(conn, subscribers.c.uid == uid)


# --- sign-up and confirmation ---------------------------------------------------------------


def record_signup(
    engine: sa.Engine,
    email: str,
    topics: Sequence[str],
    consent: Consent,
    *,
    now: datetime,
    domain: str,
    daily_cap: int,
) -> Recipient | None:
    """Store a sign-up; returns who to send the confirmation mail to, or None to send nothing.

    New address: a pending subscriber with the consent evidence. Pending: the latest form wins
    (topics, evidence) and the mail goes again. Unsubscribed: the form is a fresh consent, so
    back to pending, to be confirmed like a new one. Active, bounced, complained or on the
    suppression list: nothing changes and nothing is sent. The caller shows the same page in
    every case (no address enumeration). At most ``daily_cap`` confirmation mails go to one
    address in 24 hours, counted from the recorded events.
    """
    evidence = {
        "consent_source": consent.source,
        "consent_at": now,
        "consent_ip": _clip(consent.ip, MAX_IP),
        "consent_user_agent": _clip(consent.user_agent, MAX_USER_AGENT),
        "consent_policy_version": consent.policy_version,
        "updated_at": now,
    }
    with engine.begin() as conn:
        if store.suppression_reason(conn, email) is not None:
            return None
        sid = conn.execute(
            upsert_insert(conn, subscribers)
            .values(
                uid=new_uid(),
                email=email,
                name="",
                status="pending",
                created_at=now,
                **evidence,
            )
            .on_conflict_do_nothing(index_elements=["email"])
            .returning(subscribers.c.id)
        ).scalar_one_or_none()
        if sid is not None:
            conn.execute(
                subscriber_topics.insert(), [{"subscriber_id": sid, "topic": t} for t in topics]
            )
            audit.record(
                conn,
                sid,
                "subscribed",
                now,
                source=consent.source,
                status="pending",
                topics=list(topics),
                policy_version=consent.policy_version,
            )
        else:
            current = _load(conn, subscribers.c.email == email, lock=True)
            assert current is not None  # the insert conflicted on this address
            if current.status not in ("pending", "unsubscribed"):
                return None
            sid = current.id
            conn.execute(
                subscribers.update()
                .where(subscribers.c.id == sid)
                .values(status="pending", **evidence)
            )
            store._set_topics(conn, sid, topics)
            audit.record(
                conn,
                sid,
                "subscribed",
                now,
                source=consent.source,
                status="pending",
                previous=current.status,
                topics=list(topics),
                policy_version=consent.policy_version,
            )
        sent_today = conn.execute(
            sa.select(sa.func.count())
            .select_from(events)
            .where(
                events.c.subscriber_id == sid,
                events.c.kind == CONFIRMATION_SENT,
                events.c.at > now - timedelta(days=1),
            )
        ).scalar_one()
        if sent_today >= daily_cap:
            log.info("confirmation cap reached", extra={"subscriber": sid, "sent": sent_today})
            return None
        message_id = f"<confirm.{now:%Y%m%d%H%M%S}.{secrets.token_hex(8)}@{domain}>"
        conn.execute(
            subscribers.update()
            .where(subscribers.c.id == sid)
            .values(confirmation_message_id=message_id, confirmation_sent_at=now)
        )
        audit.record(conn, sid, CONFIRMATION_SENT, now, message_id=message_id)
        row = conn.execute(
            sa.select(subscribers.c.uid, subscribers.c.name).where(subscribers.c.id == sid)
        ).one()
    return Recipient(email=email, name=row.name, uid=row.uid, message_id=message_id)


def record_send_failure(
    engine: sa.Engine, uid: str, message_id: str, reply: str, *, now: datetime
) -> None:
    """Note that a confirmation mail was not accepted (the person can ask again)."""
    with engine.begin() as conn:
        sid = conn.scalar(sa.select(subscribers.c.id).where(subscribers.c.uid == uid))
        if sid is not None:
            audit.record(
                conn, sid, "confirmation_failed", now, message_id=message_id, reply=reply[:300]
            )


def confirm(
    engine: sa.Engine, uid: str, *, ip: str | None, user_agent: str | None, now: datetime
) -> tuple[Confirmed, Account | None]:
    """Activate a pending subscriber from their confirmation link, recording the evidence."""
    with engine.begin() as conn:
        current = _load(conn, subscribers.c.uid == uid, lock=True)
        if current is None:
            return Confirmed.UNKNOWN, None
        if current.status == "active":
            return Confirmed.ALREADY, current
        if current.status != "pending":
            return Confirmed.INACTIVE, current
        conn.execute(
            subscribers.update()
            .where(subscribers.c.id == current.id, subscribers.c.status == "pending")
            .values(
                status="active",
                confirmed_at=now,
                confirm_ip=_clip(ip, MAX_IP),
                confirm_user_agent=_clip(user_agent, MAX_USER_AGENT),
                paused_until=None,
                updated_at=now,
            )
        )
        audit.record(conn, current.id, "confirmed", now, source="web")
        return Confirmed.ACTIVATED, _load(conn, subscribers.c.id == current.id)


def purge_unconfirmed(
    engine: sa.Engine, older_than: timedelta = UNCONFIRMED_TTL, *, now: datetime
) -> int:
    """Delete pending subscribers whose last sign-up is older than ``older_than``.

    Their topics and events go with them (ON DELETE CASCADE). One anonymous event records how
    many were purged. Returns that number.
    """
    cutoff = now - older_than
    with engine.begin() as conn:
        deleted = conn.execute(
            subscribers.delete().where(
                subscribers.c.status == "pending",
                sa.func.coalesce(subscribers.c.consent_at, subscribers.c.created_at) < cutoff,
            )
        ).rowcount
        if deleted:
            audit.record(
                conn,
                None,
                "purged_unconfirmed",
                now,
                count=deleted,
                older_than_days=older_than.days,
            )
    if deleted:
        log.info("purged unconfirmed subscribers", extra={"count": deleted})
    return deleted


# --- a link holder's changes ----------------------------------------------------------------


def unsubscribe(engine: sa.Engine, uid: str, *, now: datetime, via: str) -> Account | None:
    """Unsubscribe at once (RFC 8058 asks for it; COMPLIANCE.md 1.15). Idempotent."""
    with engine.begin() as conn:
        current = _load(conn, subscribers.c.uid == uid, lock=True)
        if current is None:
            return None
        if current.status in LEAVABLE:
            store.change_status(conn, current.id, "unsubscribed", now=now, source="web", via=via)
        return _load(conn, subscribers.c.id == current.id)


def set_topics(
    engine: sa.Engine, uid: str, topics: Sequence[str], *, now: datetime
) -> Account | None:
    with engine.begin() as conn:
        current = _load(conn, subscribers.c.uid == uid, lock=True)
        if current is None:
            return None
        if tuple(topics) != current.topics:
            store._set_topics(conn, current.id, topics)
            conn.execute(
                subscribers.update().where(subscribers.c.id == current.id).values(updated_at=now)
            )
            audit.record(conn, current.id, "preferences", now, source="web", topics=list(topics))
        return _load(conn, subscribers.c.id == current.id)


def drop_topic(
    engine: sa.Engine, uid: str, topic: str, *, now: datetime
) -> tuple[Account | None, bool]:
    """Stop one topic; dropping the last one unsubscribes. Returns (account, unsubscribed)."""
    with engine.begin() as conn:
        current = _load(conn, subscribers.c.uid == uid, lock=True)
        if current is None:
            return None, False
        left = tuple(t for t in current.topics if t != topic)
        if not left:
            if current.status in LEAVABLE:
                store.change_status(
                    conn,
                    current.id,
                    "unsubscribed",
                    now=now,
                    source="web",
                    via="last-topic",
                    topic=topic,
                )
            return _load(conn, subscribers.c.id == current.id), True
        if left != current.topics:
            store._set_topics(conn, current.id, left)
            conn.execute(
                subscribers.update().where(subscribers.c.id == current.id).values(updated_at=now)
            )
            audit.record(
                conn, current.id, "preferences", now, source="web", topics=list(left), dropped=topic
            )
        return _load(conn, subscribers.c.id == current.id), False


def pause(engine: sa.Engine, uid: str, until: datetime | None, *, now: datetime) -> Account | None:
    """Pause digests until ``until`` (None resumes them now)."""
    with engine.begin() as conn:
        current = _load(conn, subscribers.c.uid == uid, lock=True)
        if current is None:
            return None
        conn.execute(
            subscribers.update()
            .where(subscribers.c.id == current.id)
            .values(paused_until=until, updated_at=now)
        )
        if until is None:
            audit.record(conn, current.id, "resumed", now, source="web")
        else:
            audit.record(conn, current.id, "paused", now, source="web", until=until.isoformat())
        return _load(conn, subscribers.c.id == current.id)


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def export(engine: sa.Engine, uid: str) -> dict[str, Any] | None:
    """Everything held about one subscriber, as JSON-ready data (GDPR Art. 15 and 20)."""
    with engine.connect() as conn:
        row = conn.execute(sa.select(subscribers).where(subscribers.c.uid == uid)).first()
        if row is None:
            return None
        m = row._mapping
        topics = conn.scalars(
            sa.select(subscriber_topics.c.topic)
            .where(subscriber_topics.c.subscriber_id == m["id"])
            .order_by(subscriber_topics.c.topic)
        ).all()
        trail = conn.execute(
            sa.select(events.c.kind, events.c.at, events.c.detail)
            .where(events.c.subscriber_id == m["id"])
            .order_by(events.c.at, events.c.id)
        ).all()
        sent = conn.execute(
            sa.select(
                deliveries.c.issue_id,
                issues.c.subject,
                deliveries.c.status,
                deliveries.c.message_id,
                deliveries.c.sent_at,
            )
            .join(issues, issues.c.id == deliveries.c.issue_id)
            .where(deliveries.c.subscriber_id == m["id"])
            .order_by(deliveries.c.id)
        ).all()
    return {
        "subscriber": {
            key: _plain(m[key])
            for key in (
                "email",
                "name",
                "status",
                "created_at",
                "updated_at",
                "confirmed_at",
                "unsubscribed_at",
                "paused_until",
                "bounce_count",
            )
        },
        "topics": list(topics),
        "consent": {
            "source": m["consent_source"],
            "given_at": _plain(m["consent_at"]),
            "ip": m["consent_ip"],
            "user_agent": m["consent_user_agent"],
            "privacy_policy_version": m["consent_policy_version"],
            "confirmation_message_id": m["confirmation_message_id"],
            "confirmation_sent_at": _plain(m["confirmation_sent_at"]),
            "confirmed_at": _plain(m["confirmed_at"]),
            "confirm_ip": m["confirm_ip"],
            "confirm_user_agent": m["confirm_user_agent"],
        },
        "events": [{"kind": e.kind, "at": _plain(e.at), "detail": e.detail} for e in trail],
        "deliveries": [
            {
                "issue": d.issue_id,
                "subject": d.subject,
                "status": d.status,
                "message_id": d.message_id,
                "sent_at": _plain(d.sent_at),
            }
            for d in sent
        ],
    }


def erase(engine: sa.Engine, uid: str, *, now: datetime) -> bool:
    """Erase everything about the subscriber (as ``mailer subscribers erase``); False if gone."""
    found = account(engine, uid)
    if found is None:
        return False
    store.erase(engine, found.email, now=now, reason="erased")
    return True


# --- the public archive ---------------------------------------------------------------------


@dataclass(frozen=True)
class ArchivedIssue:
    id: int
    digest: str
    subject: str
    scheduled_for: datetime


def sent_issues(engine: sa.Engine, *, limit: int, offset: int) -> list[ArchivedIssue]:
    """Sent issues, newest first."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(issues.c.id, issues.c.digest, issues.c.subject, issues.c.scheduled_for)
            .where(issues.c.status == "sent")
            .order_by(issues.c.scheduled_for.desc(), issues.c.id.desc())
            .limit(limit)
            .offset(offset)
        ).all()
    return [ArchivedIssue(r.id, r.digest, r.subject, r.scheduled_for) for r in rows]


def is_sent(conn: sa.Connection, issue_id: int) -> bool:
    status = conn.scalar(sa.select(issues.c.status).where(issues.c.id == issue_id))
    return status == "sent"


def ping(engine: sa.Engine) -> None:
    """SELECT 1: raises if the database cannot be reached."""
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
