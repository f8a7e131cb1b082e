"""The welcome mail owed to a reader who confirmed: sent once, never silently lost.

``subscribers.welcomed_at`` is NULL while the welcome is owed and is set once it is settled:
accepted by the relay, refused for good (a 5xx), given up (the reader confirmed more than
``GIVE_UP_AFTER`` ago: a welcome weeks late is no welcome), or not owed at all (``[welcome]
enabled = false``). The events say which. Only readers who confirmed a sign-up owe one (their
row has a ``confirmation_message_id``): staff adding or importing subscribers welcome nobody.

Right after the confirm response the web app sends it (``send_welcome``); when the relay is
down or defers it, the service's staff round sends what is owed (``send_owed``), each reader's
attempts 1 min apart doubling to an hour (``staff.outbox.retry_delay``), so a dead relay is not
asked every round. Each attempt is claimed first (``claim``: a conditional UPDATE of the
subscriber row, then a ``welcome_claimed`` event, in one transaction), so two processes, or the
web app and a round, never send the same welcome twice; the event then becomes the attempt's
outcome (``welcomed``, ``welcome_deferred``, ``welcome_refused``). A process that dies between
the send and its record leaves a claim that lapses after ``staff.outbox.CLAIM_LEASE``, and the
welcome is sent again then: twice at worst, never not at all. A reader who unsubscribed before
it went is not active any more, so no claim is made.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import sqlalchemy as sa

from mailer.compose.rendering import Renderer
from mailer.compose.welcome import Welcome, build_welcome, welcome_message_id
from mailer.config.settings import Settings
from mailer.db import audit
from mailer.db.engine import reading, writing
from mailer.db.schema import events, subscribers
from mailer.delivery.policy import Outcome, SendResult
from mailer.models import Recipient
from mailer.staff.outbox import CLAIM_LEASE, retry_delay
from mailer.subscribers.welcome import welcome_for
from mailer.text import one_line

if TYPE_CHECKING:
    from mailer.web.sender import ConfirmationSender

log = logging.getLogger(__name__)

# A reader who confirmed longer ago than this is not welcomed any more.
GIVE_UP_AFTER = timedelta(days=7)

CLAIMED = "welcome_claimed"
DEFERRED = "welcome_deferred"
SENT = "welcomed"
REFUSED = "welcome_refused"
ABANDONED = "welcome_abandoned"
NOT_OWED = "welcome_not_owed"


def _owed() -> sa.ColumnElement[bool]:
    """An active reader who confirmed a sign-up and whose welcome is not settled."""
    return sa.and_(
        subscribers.c.status == "active",
        subscribers.c.welcomed_at.is_(None),
        subscribers.c.confirmed_at.is_not(None),
        subscribers.c.confirmation_message_id.is_not(None),
    )


@dataclass(frozen=True)
class Claim:
    """One attempt at one reader's welcome, claimed: whom, and which attempt it is."""

    subscriber_id: int
    recipient: Recipient
    attempt: int
    event_id: int  # the attempt's event: "welcome_claimed" until its outcome is recorded


def _due(conn: sa.Connection, sid: int, confirmed_at: datetime, now: datetime) -> int | None:
    """The number of this attempt if one is due at ``now``, else None: not while another
    attempt's claim holds, nor before the retry delay after a deferral (counted from that
    attempt's claim) has passed."""
    rows = conn.execute(
        sa.select(events.c.kind, events.c.at)
        .where(
            events.c.subscriber_id == sid,
            events.c.kind.in_((CLAIMED, DEFERRED)),
            events.c.at >= confirmed_at,  # attempts of this subscription, not of an earlier one
        )
        .order_by(events.c.id)
    ).all()
    attempts = len(rows)  # every attempt is one event, claimed or deferred
    if rows:
        last = rows[-1]
        wait = CLAIM_LEASE if last.kind == CLAIMED else retry_delay(attempts)
        if now < last.at + wait:
            return None
    return attempts + 1


def claim(engine: sa.Engine, settings: Settings, sid: int, *, now: datetime) -> Claim | None:
    """Claim the next attempt at ``sid``'s welcome, or None when none is owed or due.

    The conditional UPDATE re-checks that the welcome is owed and holds the row (PostgreSQL;
    the write lock on SQLite) until this transaction ends, so a second claimer waits and then
    finds this claim's event.
    """
    with writing(engine) as conn:
        row = conn.execute(
            subscribers.update()
            .where(
                subscribers.c.id == sid, _owed(), subscribers.c.confirmed_at > now - GIVE_UP_AFTER
            )
            .values(updated_at=subscribers.c.updated_at)
            .returning(
                subscribers.c.uid,
                subscribers.c.email,
                subscribers.c.name,
                subscribers.c.confirmed_at,
            )
        ).first()
        if row is None:
            return None
        attempt = _due(conn, sid, row.confirmed_at, now)
        if attempt is None:
            return None
        message_id = welcome_message_id(settings, now, secrets.token_hex(8))
        event_id = conn.execute(
            events.insert()
            .values(
                subscriber_id=sid,
                kind=CLAIMED,
                at=now,
                detail={"message_id": message_id, "attempt": attempt},
            )
            .returning(events.c.id)
        ).scalar_one()
    recipient = Recipient(email=row.email, name=row.name, uid=row.uid, message_id=message_id)
    return Claim(sid, recipient, attempt, int(event_id))


def record(engine: sa.Engine, claim: Claim, result: SendResult, *, now: datetime) -> None:
    """Record what the relay said: accepted or refused for good settles the welcome; anything
    else leaves it owed, to be tried again after ``retry_delay``."""
    uid = claim.recipient.uid
    reply = one_line(f"{result.code or ''} {result.reply}")[:300]
    fields = {"uid": uid, "attempt": claim.attempt, "code": result.code}
    detail = {"message_id": claim.recipient.message_id, "attempt": claim.attempt}
    kind = {Outcome.SENT: SENT, Outcome.DEFERRED: DEFERRED, Outcome.BOUNCED: REFUSED}
    with writing(engine) as conn:
        conn.execute(
            events.update()
            .where(events.c.id == claim.event_id)
            .values(
                kind=kind[result.outcome],
                detail=detail if result.outcome is Outcome.SENT else {**detail, "reply": reply},
            )
        )
        if result.outcome is Outcome.DEFERRED:
            retry_at = now + retry_delay(claim.attempt)
            log.warning(
                "welcome mail not sent (%s); it will be retried at %s",
                reply,
                retry_at.isoformat(timespec="seconds"),
                extra=fields,
            )
            return
        conn.execute(
            subscribers.update()
            .where(subscribers.c.id == claim.subscriber_id, subscribers.c.welcomed_at.is_(None))
            .values(welcomed_at=now)
        )
    if result.outcome is Outcome.SENT:
        log.info("welcome mail sent", extra=fields)
    else:
        log.warning(
            "welcome mail refused by the relay for good (%s); it is not sent again",
            reply,
            extra=fields,
        )


def not_owed(engine: sa.Engine, sid: int, *, now: datetime) -> None:
    """Settle ``sid``'s welcome without one (``[welcome] enabled = false`` at confirmation)."""
    with writing(engine) as conn:
        settled = conn.execute(
            subscribers.update().where(subscribers.c.id == sid, _owed()).values(welcomed_at=now)
        ).rowcount
        if settled:
            audit.record(conn, sid, NOT_OWED, now, why="[welcome] enabled = false")


async def send_welcome(
    engine: sa.Engine,
    settings: Settings,
    sender: ConfirmationSender,
    sid: int,
    *,
    now: datetime,
    renderer: Renderer,
) -> SendResult | None:
    """Claim, build, send and record one reader's welcome: what the relay said, or None when
    none was owed or due.

    Never raises for the relay or the template: what fails is a deferral, logged and tried
    again by the staff round.
    """
    taken = await asyncio.to_thread(claim, engine, settings, sid, now=now)
    if taken is None:
        return None
    try:
        welcome = await asyncio.to_thread(_welcome, engine, settings, sid, now)
        message = build_welcome(settings, welcome, taken.recipient, now, renderer=renderer)
        result = await sender.send(taken.recipient, message)
    except Exception as exc:
        # Deliberately broad, as the staff outbox: a template staff broke, a DKIM key that
        # cannot sign, a login refused. The welcome stays owed and is tried again.
        result = SendResult(Outcome.DEFERRED, None, one_line(str(exc)) or type(exc).__name__)
    await asyncio.to_thread(record, engine, taken, result, now=now)
    return result


def _welcome(engine: sa.Engine, settings: Settings, sid: int, now: datetime) -> Welcome:
    with reading(engine) as conn:
        return welcome_for(conn, settings, sid, now=now)


def abandon_stale(engine: sa.Engine, *, now: datetime) -> int:
    """Settle, with one ERROR line each, the welcomes owed to readers who confirmed more than
    ``GIVE_UP_AFTER`` ago (the relay refused them all that time): they are not mailed late."""
    with writing(engine) as conn:
        rows = conn.execute(
            subscribers.update()
            .where(_owed(), subscribers.c.confirmed_at <= now - GIVE_UP_AFTER)
            .values(welcomed_at=now)
            .returning(subscribers.c.id, subscribers.c.uid, subscribers.c.confirmed_at)
        ).all()
        for row in rows:
            audit.record(conn, row.id, ABANDONED, now, confirmed_at=row.confirmed_at.isoformat())
    for row in rows:
        log.error(
            "welcome mail given up: not accepted by the relay since the reader confirmed at %s",
            row.confirmed_at.isoformat(timespec="minutes"),
            extra={"uid": row.uid},
        )
    return len(rows)


def owed_ids(engine: sa.Engine, *, now: datetime) -> list[int]:
    """The readers whose welcome is owed and still worth sending at ``now``, oldest first."""
    with reading(engine) as conn:
        return list(
            conn.scalars(
                sa.select(subscribers.c.id)
                .where(_owed(), subscribers.c.confirmed_at > now - GIVE_UP_AFTER)
                .order_by(subscribers.c.confirmed_at, subscribers.c.id)
            )
        )


async def send_owed(
    engine: sa.Engine,
    settings: Settings,
    sender: ConfirmationSender,
    *,
    now: datetime,
    renderer: Renderer,
) -> Counter[str]:
    """The staff round's step: give up on stale welcomes, then send each owed one that is due.

    A relay that cannot be reached (no SMTP reply at all) ends the step: the next reader's
    attempt would only wait out the same timeout, and each is tried again after its delay.
    Returns how many of each outcome (``sent``, ``deferred``, ``bounced``, ``abandoned``).
    With ``[welcome] enabled = false`` nothing is sent.
    """
    done: Counter[str] = Counter()
    if not settings.welcome.enabled:
        return done
    done["abandoned"] = await asyncio.to_thread(abandon_stale, engine, now=now)
    for sid in await asyncio.to_thread(owed_ids, engine, now=now):
        result = await send_welcome(engine, settings, sender, sid, now=now, renderer=renderer)
        if result is None:
            continue
        done[result.outcome.value] += 1
        if result.outcome is Outcome.DEFERRED and result.code is None:
            break
    return +done
