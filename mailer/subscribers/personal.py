"""A person's data: all of it as JSON (GDPR Art. 15 and 20), and its erasure (Art. 17)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from mailer.db import audit
from mailer.db.engine import reading
from mailer.db.schema import deliveries, events, issues, subscriber_digests, subscribers
from mailer.errors import SubscriberError
from mailer.subscribers import store
from mailer.subscribers.addresses import address_hash, normalize_address


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def export(engine: sa.Engine, uid: str) -> dict[str, Any] | None:
    """Everything held about one subscriber, as JSON-ready data (GDPR Art. 15 and 20)."""
    with reading(engine) as conn:
        row = conn.execute(sa.select(subscribers).where(subscribers.c.uid == uid)).first()
        if row is None:
            return None
        m = row._mapping
        topics = store.topics_of(conn, [m["id"]])[m["id"]]
        chosen = conn.execute(
            sa.select(
                subscriber_digests.c.digest,
                subscriber_digests.c.chosen_at,
                subscriber_digests.c.paused_until,
            )
            .where(subscriber_digests.c.subscriber_id == m["id"])
            .order_by(subscriber_digests.c.digest)
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
                "bounce_count",
            )
        },
        "topics": list(topics),
        # The emails (digests) chosen, when, and until when each is paused.
        "digests": [
            {
                "digest": d.digest,
                "chosen_at": _plain(d.chosen_at),
                "paused_until": _plain(d.paused_until),
            }
            for d in chosen
        ],
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


def document(
    engine: sa.Engine, uid: str, *, newsletter: str, publisher: str, now: datetime
) -> str | None:
    """``export`` as the JSON file a person downloads (from their preferences page, or staff
    for them in the console): who holds the data, when it was exported, then the data."""
    data = export(engine, uid)
    if data is None:
        return None
    body = {"newsletter": newsletter, "publisher": publisher, "exported_at": now.isoformat()}
    return json.dumps(body | data, indent=2, ensure_ascii=False) + "\n"


def erase(
    engine: sa.Engine,
    email: str,
    *,
    now: datetime,
    reason: str = "erased",
    by: str | None = None,
) -> None:
    """Delete everything held about a person; keep only the address hash on the suppression list.

    Their deliveries and events go too (cascade); issue totals keep counting them nowhere.
    ``by`` (a staff member) is recorded with the erasure when staff did it.
    """
    address = normalize_address(email)
    with engine.begin() as conn:
        sid = store.id_by_email(conn, address)
        if sid is None and store.suppression_reason(conn, address) is None:
            raise SubscriberError(f"no subscriber {address}", email=address)
        if sid is not None:
            conn.execute(subscribers.delete().where(subscribers.c.id == sid))
        store.suppress(conn, address, reason, now)
        who = {} if by is None else {"by": by}
        audit.record(conn, None, "erased", now, email_hash=address_hash(address), **who)


def erase_by_uid(engine: sa.Engine, uid: str, *, now: datetime) -> bool:
    """Erase everything about the subscriber (as ``mailer subscribers erase``); False if gone."""
    found = store.find(engine, uid)
    if found is None:
        return False
    erase(engine, found.email, now=now, reason="erased")
    return True
