"""Delivery policy: what an SMTP reply means, when to try again, what a delivery becomes.

Pure functions of their arguments: no database, no network, no clock (``now`` is given). The
pool turns each server reply into a ``SendResult`` with ``classify``; the worker slows every
lane down on ``is_throttle``; the ledger records what ``settle`` decides.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import NamedTuple

from mailer.config.settings import SmtpSettings
from mailer.text import one_line

# The longest server reply kept in a SendResult (one line, see mailer.text.one_line).
REPLY_LIMIT = 500
# The width of deliveries.last_reply.
LAST_REPLY_LIMIT = 500
# No retry waits longer than this, however many attempts came before.
RETRY_MAX_SECONDS = 6 * 3600
# A relay that says it is overloaded or rate-limiting us: a 421 (closing), or a 4xx whose text
# says so (Gmail 421 4.7.28 / 451 4.7.0, Yahoo 421 4.7.0 [TSS04], Outlook 451 4.7.500, 454).
THROTTLE_TEXT = re.compile(
    r"too many|rate|throttl|try again later|slow down|temporarily deferred", re.I
)


class Outcome(StrEnum):
    """What became of one attempt to hand a message to the SMTP server."""

    SENT = "sent"
    DEFERRED = "deferred"
    BOUNCED = "bounced"


class Stage(StrEnum):
    """How far the SMTP session got when the attempt ended.

    Only ``rcpt`` and ``data`` answers bounce. A bounce at ``rcpt`` is about the recipient; one
    at ``data`` may be about the message (content, size), which a caller may prefer not to
    count against the subscriber. Refusals at ``connect`` and ``mail`` always defer.
    """

    CONNECT = "connect"  # TCP, TLS, greeting, EHLO, STARTTLS, AUTH
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"


@dataclass(frozen=True)
class SendResult:
    """The outcome of one ``SmtpPool.send``: the server's code and words, or what went wrong.

    ``code`` is None when no SMTP reply explains the outcome (a connection failure, a timeout).
    ``reply`` is one line of at most ``REPLY_LIMIT`` characters.
    """

    outcome: Outcome
    code: int | None
    reply: str
    stage: Stage = Stage.DATA


def classify(code: int, message: str, stage: Stage) -> SendResult:
    """Classify an SMTP error reply: a 5xx to RCPT or DATA bounces, anything else defers.

    Only RCPT and DATA answers can be about this recipient or this message. A refusal during
    the connect (greeting, EHLO, STARTTLS) or of MAIL FROM (our sender, our session, the size
    we announced) says nothing about the subscriber, so it defers even when permanent: a
    misconfigured sender must never get a whole list suppressed as bounced. A code outside
    100–599 (aiosmtplib says -1 for a reply it could not read) is no code at all.
    """
    known = code if 100 <= code <= 599 else None
    permanent = known is not None and known >= 500 and stage in (Stage.RCPT, Stage.DATA)
    outcome = Outcome.BOUNCED if permanent else Outcome.DEFERRED
    return SendResult(outcome, known, one_line(message, limit=REPLY_LIMIT), stage)


def is_throttle(result: SendResult) -> bool:
    """Whether a deferral is the provider pushing back (slow everyone) rather than one mailbox."""
    if result.outcome is not Outcome.DEFERRED or result.code is None:
        return False
    return result.code == 421 or bool(THROTTLE_TEXT.search(result.reply))


def retry_delay(settings: SmtpSettings, attempts: int, rng: random.Random) -> timedelta:
    """Exponential backoff with ±25% jitter, so deferred mail does not return in one wave."""
    base = settings.retry_base_seconds * (2 ** max(attempts - 1, 0))
    return timedelta(seconds=min(base, RETRY_MAX_SECONDS) * rng.uniform(0.75, 1.25))


class Verdict(NamedTuple):
    """What a delivery becomes after an attempt: its status, its ``last_reply`` and when it is
    due again (``now`` unless it is deferred)."""

    status: str  # sent, bounced, deferred, failed or cancelled
    reply: str | None
    next_attempt: datetime


def settle(
    result: SendResult | None,
    *,
    error: str | None,
    attempts: int,
    created_at: datetime,
    now: datetime,
    settings: SmtpSettings,
    rng: random.Random,
) -> Verdict:
    """The verdict on one attempt, ``attempts`` counting it.

    ``error``: the message could not be built for this recipient (failed). ``result`` None:
    there was nothing to send (cancelled). A deferral that comes ``[smtp].retry_max_age_hours``
    after the delivery was created fails instead of waiting again.
    """
    if error is not None:
        return Verdict("failed", error[:LAST_REPLY_LIMIT], now)
    if result is None:
        return Verdict("cancelled", "nothing new in the subscriber's topics", now)
    reply = ((f"{result.code} " if result.code else "") + result.reply)[:LAST_REPLY_LIMIT] or None
    if result.outcome is Outcome.SENT:
        return Verdict("sent", reply, now)
    if result.outcome is Outcome.BOUNCED:
        return Verdict("bounced", reply, now)
    if now - created_at >= timedelta(hours=settings.retry_max_age_hours):
        return Verdict("failed", reply, now)
    return Verdict("deferred", reply, now + retry_delay(settings, attempts, rng))
