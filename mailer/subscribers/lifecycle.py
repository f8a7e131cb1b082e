"""A subscriber's lifecycle: sign-up, confirmation, and a link holder's changes.

Sign-up and confirmation (double opt-in), the purge of sign-ups never confirmed, and what the
holder of a subscriber's link may do: unsubscribe, choose topics, pause. Each operation is one
transaction and records an event (the audit trail, GDPR Art. 7(1) and 30). The web app calls
them in a thread (``starlette.concurrency.run_in_threadpool``) so the event loop never waits on
the database; the CLI calls the purge.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

import sqlalchemy as sa

from mailer.db import audit
from mailer.db.engine import upsert_insert
from mailer.db.schema import events, subscriber_topics, subscribers
from mailer.models import Recipient
from mailer.subscribers import editions, store
from mailer.subscribers.store import Subscriber
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


class Confirmed(StrEnum):
    """What pressing the confirmation page's button did."""

    ACTIVATED = "activated"
    ALREADY = "already"  # active before: the link is idempotent
    INACTIVE = "inactive"  # unsubscribed, bounced or complained: an old link changes nothing
    UNKNOWN = "unknown"  # no such subscriber (purged unconfirmed, or erased)


def _clip(value: str | None, limit: int) -> str | None:
    # Consent evidence is kept as the browser sent it (spaces and all), less what cannot be
    # shown; text.one_line would fold its whitespace and mark a cut with an ellipsis.
    if value is None:
        return None
    value = "".join(ch for ch in value if ch.isprintable())
    return value[:limit]


# --- sign-up and confirmation ---------------------------------------------------------------


def record_signup(
    engine: sa.Engine,
    email: str,
    topics: Sequence[str],
    consent: Consent,
    digests: Sequence[str] = (),
    *,
    now: datetime,
    domain: str,
    daily_cap: int,
) -> Recipient | None:
    """Store a sign-up; returns who to send the confirmation mail to, or None to send nothing.

    New address: a pending subscriber with the consent evidence and the ``digests`` chosen.
    Pending: the latest form wins (topics, digests, evidence) and the mail goes again.
    Unsubscribed: the form is a fresh consent, so back to pending, to be confirmed like a new
    one. Active, bounced, complained or on the suppression list: nothing changes and nothing
    is sent. The caller shows the same page in every case (no address enumeration). At most
    ``daily_cap`` confirmation mails go to one address in 24 hours, counted from the recorded
    events.
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
            editions.replace(conn, sid, digests, now=now)
            audit.record(
                conn,
                sid,
                "subscribed",
                now,
                source=consent.source,
                status="pending",
                topics=list(topics),
                digests=list(digests),
                policy_version=consent.policy_version,
            )
        else:
            current = store.load_by_email(conn, email, lock=True)
            assert current is not None  # the insert conflicted on this address
            if current.status not in ("pending", "unsubscribed"):
                return None
            sid = current.id
            conn.execute(
                subscribers.update()
                .where(subscribers.c.id == sid)
                .values(status="pending", **evidence)
            )
            store.replace_topics(conn, sid, topics)
            editions.replace(conn, sid, digests, now=now)
            # A fresh consent starts unpaused, as a new sign-up does.
            editions.pause(conn, sid, digests, None)
            audit.record(
                conn,
                sid,
                "subscribed",
                now,
                source=consent.source,
                status="pending",
                previous=current.status,
                topics=list(topics),
                digests=list(digests),
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
        sid = store.id_by_uid(conn, uid)
        if sid is not None:
            audit.record(
                conn, sid, "confirmation_failed", now, message_id=message_id, reply=reply[:300]
            )


def confirm(
    engine: sa.Engine, uid: str, *, ip: str | None, user_agent: str | None, now: datetime
) -> tuple[Confirmed, Subscriber | None]:
    """Activate a pending subscriber (the confirmation page's POST), recording its evidence."""
    with engine.begin() as conn:
        current = store.load_by_uid(conn, uid, lock=True)
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
                # A new subscription owes a welcome, even to a reader welcomed once before.
                welcomed_at=None,
                updated_at=now,
            )
        )
        audit.record(conn, current.id, "confirmed", now, source="web")
        return Confirmed.ACTIVATED, store.load_by_id(conn, current.id)


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


def unsubscribe(engine: sa.Engine, uid: str, *, now: datetime, via: str) -> Subscriber | None:
    """Unsubscribe at once (RFC 8058 asks for it; COMPLIANCE.md 1.15). Idempotent."""
    with engine.begin() as conn:
        current = store.load_by_uid(conn, uid, lock=True)
        if current is None:
            return None
        if current.status in LEAVABLE:
            store.change_status(conn, current.id, "unsubscribed", now=now, source="web", via=via)
        return store.load_by_id(conn, current.id)


def set_topics(
    engine: sa.Engine, uid: str, topics: Sequence[str], *, now: datetime
) -> Subscriber | None:
    """Make ``topics`` the link holder's topics (recorded only if they change)."""
    with engine.begin() as conn:
        current = store.load_by_uid(conn, uid, lock=True)
        if current is None:
            return None
        if tuple(topics) != current.topics:
            store.replace_topics(conn, current.id, topics)
            store.touch(conn, current.id, now=now)
            audit.record(conn, current.id, "preferences", now, source="web", topics=list(topics))
        return store.load_by_id(conn, current.id)


def drop_topic(
    engine: sa.Engine, uid: str, topic: str, *, now: datetime
) -> tuple[Subscriber | None, bool]:
    """Stop one topic; dropping the last one unsubscribes. Returns (subscriber, unsubscribed)."""
    with engine.begin() as conn:
        current = store.load_by_uid(conn, uid, lock=True)
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
            return store.load_by_id(conn, current.id), True
        if left != current.topics:
            store.replace_topics(conn, current.id, left)
            store.touch(conn, current.id, now=now)
            audit.record(
                conn, current.id, "preferences", now, source="web", topics=list(left), dropped=topic
            )
        return store.load_by_id(conn, current.id), False


def set_digests(
    engine: sa.Engine, uid: str, digests: Sequence[str], *, now: datetime
) -> Subscriber | None:
    """Make ``digests`` the link holder's digests (recorded only if they change); a digest
    kept keeps its pause."""
    with engine.begin() as conn:
        current = store.load_by_uid(conn, uid, lock=True)
        if current is None:
            return None
        if editions.replace(conn, current.id, digests, now=now):
            store.touch(conn, current.id, now=now)
            audit.record(conn, current.id, "preferences", now, source="web", digests=list(digests))
        return store.load_by_id(conn, current.id)


def pause(
    engine: sa.Engine,
    uid: str,
    digests: Sequence[str] | None,
    until: datetime | None,
    *,
    now: datetime,
) -> Subscriber | None:
    """Pause the link holder's ``digests`` (None: every one they receive) until ``until``;
    ``until`` None resumes them now."""
    with engine.begin() as conn:
        current = store.load_by_uid(conn, uid, lock=True)
        if current is None:
            return None
        keys = current.digest_keys if digests is None else digests
        changed = editions.pause(conn, current.id, keys, until)
        if changed:
            store.touch(conn, current.id, now=now)
            if until is None:
                audit.record(conn, current.id, "resumed", now, source="web", digests=changed)
            else:
                audit.record(
                    conn,
                    current.id,
                    "paused",
                    now,
                    source="web",
                    until=until.isoformat(),
                    digests=changed,
                )
        return store.load_by_id(conn, current.id)
