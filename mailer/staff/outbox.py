"""The staff outbox: review mails, reports and alerts, queued where they are decided.

``enqueue`` adds a row in the caller's transaction, so the mail exists exactly when the
decision that raised it was committed (an issue moved to review, a report claimed, an alert
claimed). Sending is ``deliver_due``: transactional mail through the relay and DKIM key the
subscribers' mail uses, never through the subscriber ledger; a relay that is down leaves the
row pending for the next round.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Literal

import sqlalchemy as sa

from mailer.compose.staffmail import build_staff_message, staff_message_id
from mailer.config.settings import Settings
from mailer.db.engine import writing
from mailer.db.schema import staff_mail
from mailer.delivery.policy import Outcome, SendResult
from mailer.errors import MailerError
from mailer.text import one_line

if TYPE_CHECKING:
    from mailer.staff.transport import Outgoing

log = logging.getLogger(__name__)

StaffMailKind = Literal["review", "report", "alert"]


def enqueue(
    conn: sa.Connection,
    *,
    kind: StaffMailKind,
    cause: str,
    to: Sequence[str],
    subject: str,
    text: str,
    html: str | None,
    now: datetime,
) -> int | None:
    """Queue one mail to ``to`` in the caller's transaction; None when ``to`` is empty (no
    staff address configured: the caller's log line is all there is)."""
    if not to:
        return None
    mail_id = conn.execute(
        staff_mail.insert()
        .values(
            kind=kind,
            cause=cause[:200],
            recipients=";".join(to),
            subject=one_line(subject)[:500],
            text=text,
            html=html,
            status="pending",
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
        .returning(staff_mail.c.id)
    ).scalar_one()
    log.info("staff mail queued", extra={"kind": kind, "cause": cause, "mail": mail_id})
    return int(mail_id)


# A claimed row is due again after this long, in case the process that claimed it died before
# recording what became of it: the mail may then go out twice, never not at all. Far longer
# than a send takes (each SMTP step is bounded by [smtp].timeout).
CLAIM_LEASE = timedelta(minutes=10)
# Rows one call sends at most: staff mail comes a few at a time.
CLAIM_LIMIT = 100
# A deferred row waits 1 min, 2, 4 ... at most an hour, and fails after three days of trying.
RETRY_FIRST = timedelta(minutes=1)
RETRY_MAX = timedelta(hours=1)
GIVE_UP_AFTER = timedelta(days=3)

Send = Callable[[Sequence["Outgoing"]], Awaitable[list[SendResult]]]


@dataclass
class OutboxResult:
    """What one ``deliver_due`` did, by row (``dropped`` counts refused addresses)."""

    sent: int = 0
    deferred: int = 0
    failed: int = 0
    dropped: int = 0

    @property
    def claimed(self) -> int:
        return self.sent + self.deferred + self.failed


@dataclass(frozen=True)
class _Row:
    id: int
    kind: str
    cause: str
    recipients: tuple[str, ...]
    subject: str
    text: str
    html: str | None
    attempts: int
    created_at: datetime


@dataclass
class _Outcome:
    """What became of one row's recipients in this attempt."""

    sent: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (address, reply)
    deferred: list[str] = field(default_factory=list)
    error: str | None = None  # why the deferred ones were deferred


async def deliver_due(
    engine: sa.Engine, settings: Settings, *, now: datetime, send: Send
) -> OutboxResult:
    """Send the staff mail due at ``now``, one message per recipient, and record the outcome.

    ``send`` hands messages to the relay (``transport.send_on`` bound to a pool, or
    ``transport.send_now``) and returns a result for each. Rows are claimed first (their next
    attempt moved a lease ahead in one UPDATE), so two processes never send the same row; a
    crash between the send and its record sends the row again when the lease ends.
    All accepted: sent. A recipient refused with a 5xx: dropped from the row, logged at ERROR.
    Deferred (the relay down, a 4xx, the login refused): tried again after 1 min, doubling to at
    most an hour, logged at ERROR each time with when; after three days of trying: failed.
    """
    rows = await asyncio.to_thread(_claim, engine, now)
    result = OutboxResult()
    if not rows:
        return result
    outcomes = await asyncio.gather(*(_attempt(settings, row, now, send) for row in rows))
    await asyncio.to_thread(_record, engine, list(zip(rows, outcomes, strict=True)), now, result)
    return result


def _claim(engine: sa.Engine, now: datetime) -> list[_Row]:
    """Take the due rows for ``CLAIM_LEASE`` in one statement: a second claimer, blocked on the
    same rows (PostgreSQL) or the write lock (SQLite), finds them no longer due."""
    due = sa.and_(staff_mail.c.status == "pending", staff_mail.c.next_attempt_at <= now)
    ids = sa.select(staff_mail.c.id).where(due).order_by(staff_mail.c.id).limit(CLAIM_LIMIT)
    with writing(engine) as conn:
        claimed = conn.execute(
            staff_mail.update()
            .where(staff_mail.c.id.in_(ids.scalar_subquery()), due)
            .values(next_attempt_at=now + CLAIM_LEASE)
            .returning(
                staff_mail.c.id,
                staff_mail.c.kind,
                staff_mail.c.cause,
                staff_mail.c.recipients,
                staff_mail.c.subject,
                staff_mail.c.text,
                staff_mail.c.html,
                staff_mail.c.attempts,
                staff_mail.c.created_at,
            )
        ).all()
    return sorted(
        (
            _Row(
                id=int(r.id),
                kind=r.kind,
                cause=r.cause,
                recipients=tuple(a for a in r.recipients.split(";") if a),
                subject=r.subject,
                text=r.text,
                html=r.html,
                attempts=int(r.attempts),
                created_at=r.created_at,
            )
            for r in claimed
        ),
        key=lambda row: row.id,
    )


async def _attempt(settings: Settings, row: _Row, now: datetime, send: Send) -> _Outcome:
    """Build and send one message per recipient of ``row``; never raises for the relay."""
    from mailer.staff.transport import Outgoing  # aiosmtplib: only where mail is sent

    outcome = _Outcome()
    messages = []
    for address in row.recipients:
        try:
            data = build_staff_message(
                settings,
                to=address,
                subject=row.subject,
                text=row.text,
                html=row.html,
                message_id=staff_message_id(settings, row.kind),
                now=now,
            )
        except MailerError as exc:
            outcome.refused.append((address, one_line(str(exc))))
            continue
        messages.append(Outgoing(address, data))
    if not messages:
        return outcome
    try:
        results = await send(messages)
    except Exception as exc:
        # The login refused (SmtpAuthError), the pool closed, the DKIM signature that could
        # not be made: nothing of this row was accepted that the relay told us of, so all of
        # it waits for the next attempt, counted, and is given up after three days like any.
        outcome.deferred = [m.recipient for m in messages]
        outcome.error = one_line(str(exc))
        return outcome
    errors = []
    for message, sent in zip(messages, results, strict=True):
        reply = one_line(f"{sent.code or ''} {sent.reply}")
        if sent.outcome is Outcome.SENT:
            outcome.sent.append(message.recipient)
        elif sent.outcome is Outcome.BOUNCED:
            outcome.refused.append((message.recipient, reply))
        else:
            outcome.deferred.append(message.recipient)
            errors.append(reply)
    if errors:
        outcome.error = errors[0]
    return outcome


def retry_delay(attempts: int) -> timedelta:
    """The wait after the ``attempts``-th failed attempt: 1 min doubling, at most an hour."""
    doubled: timedelta = RETRY_FIRST * 2 ** min(max(attempts - 1, 0), 20)
    return min(doubled, RETRY_MAX)


def _record(
    engine: sa.Engine,
    done: list[tuple[_Row, _Outcome]],
    now: datetime,
    result: OutboxResult,
) -> None:
    with writing(engine) as conn:
        for row, outcome in done:
            _record_row(conn, row, outcome, now, result)


def _record_row(
    conn: sa.Connection, row: _Row, outcome: _Outcome, now: datetime, result: OutboxResult
) -> None:
    where = staff_mail.update().where(staff_mail.c.id == row.id, staff_mail.c.status == "pending")
    fields = {"kind": row.kind, "mail": row.id, "cause": row.cause}
    for address, reply in outcome.refused:
        log.error(
            "staff mail to %s refused: %s; the address is dropped from this mail",
            address,
            reply,
            extra=fields,
        )
        result.dropped += 1
    if not outcome.deferred:
        if outcome.sent:
            conn.execute(
                where.values(status="sent", sent_at=now, recipients=";".join(outcome.sent))
            )
            result.sent += 1
            log.info("staff mail sent", extra={**fields, "recipients": len(outcome.sent)})
            return
        # Every address refused: nobody can get it.
        conn.execute(where.values(status="failed", last_error="every recipient refused"))
        result.failed += 1
        log.error("staff mail not sent: every recipient refused it", extra=fields)
        return
    attempts = row.attempts + 1
    error = (outcome.error or "deferred")[:500]
    waiting = ";".join(outcome.deferred)  # the others have it, or never will
    if now - row.created_at >= GIVE_UP_AFTER:
        conn.execute(
            where.values(status="failed", attempts=attempts, last_error=error, recipients=waiting)
        )
        result.failed += 1
        log.error(
            "staff mail %r to %s not sent: given up after %d attempts since %s: %s",
            row.subject,
            waiting.replace(";", ", "),
            attempts,
            row.created_at.isoformat(timespec="minutes"),
            error,
            extra=fields,
        )
        return
    retry_at = now + retry_delay(attempts)
    conn.execute(
        where.values(
            attempts=attempts, next_attempt_at=retry_at, last_error=error, recipients=waiting
        )
    )
    result.deferred += 1
    log.error(
        "staff mail %r to %s not sent (%s); it will be retried at %s",
        row.subject,
        waiting.replace(";", ", "),
        error,
        retry_at.isoformat(timespec="seconds"),
        extra=fields,
    )
