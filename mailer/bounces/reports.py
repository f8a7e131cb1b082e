"""Bounce and complaint reports: DSN and ARF parsing, and what each means for a subscriber.

A bounce (a DSN, RFC 3464, inside a multipart/report of RFC 6522) goes to the envelope sender.
With VERP that is ``bounces+<uid>@domain`` (``mailer.bounces.verp``), so the address a bounce
is delivered to names the subscriber even when the report itself is vague. A complaint (an ARF
report, RFC 5965) comes from a mailbox provider's feedback loop and carries the headers of the
message complained of.

What each report does (``classify``; RFC 3463 names the status codes):

================================  ============  ===========================================
Action / Status / Feedback-Type   BounceKind    Effect on the subscriber
================================  ============  ===========================================
failed, 5.x.x (default)           hard          status "bounced", suppressed, at once
failed, 5.2.2 (mailbox full),     soft          bounce_count + 1; "bounced" and suppressed
5.4.7 (delivery time expired),                  once ``soft_limit`` soft bounces fall in
any 4.x.x                                       ``soft_window``
failed, 5.7.x (policy: spam       blocked       an event only: the receiver refused *our*
filter, DMARC, reputation),                     mail, the address is fine. Suppressing on
5.6.x, 5.2.3, 5.3.4 (content,                   it would wipe the list after one DNS mistake
size), 5.1.7/5.1.8 (our sender)                 (Gmail's 5.7.26 "unauthenticated").
failed, 5.7.13/17/18 (account     hard          as hard
disabled, owner changed)
delayed                           delayed       nothing (the MTA is still trying)
delivered, relayed, expanded      delivered     nothing
ARF abuse, fraud, other           complaint     status "complained", suppressed, at once
ARF not-spam, auth-failure,       ignored       nothing
virus, anything else
not a report at all               (None)        nothing, counted as ignored
================================  ============  ===========================================

Applying them is ``mailer.bounces.apply``; reading a mailbox, ``mailer.bounces.mailbox``.
"""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import logging
import quopri
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import getaddresses, parsedate_to_datetime
from enum import StrEnum
from typing import Any, Literal

from mailer.bounces.verp import uid_from_verp
from mailer.errors import AddressError
from mailer.subscribers.addresses import normalize_address
from mailer.text import one_line

log = logging.getLogger(__name__)

DIAGNOSTIC_LIMIT = 300

# RFC 3463 §3.1: class.subject.detail. A Status field may carry a comment after the code.
_STATUS_RE = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_BASIC_CODE_RE = re.compile(r"\b([245])\d\d\b")
# The signed token we put in List-Unsubscribe: /unsubscribe/<uid>.<mac> (subscribers.links)
# and mailto:...?subject=unsubscribe-<uid>.<mac> (mailer.compose.messages).
_UNSUB_TOKEN_RE = re.compile(r"unsubscribe[/-]([A-Za-z0-9_-]{22})\.[A-Za-z0-9_-]{22}")
_MSGID_RE = re.compile(r"<[^<>\s]{1,250}>")
# The headers a bounce arrives under: To is the envelope sender we used, the others are added
# by the MTA that delivered it to our mailbox (Postfix: Delivered-To, X-Original-To).
_DELIVERY_HEADERS = ("Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To", "To")
_ORIGINAL_PARTS = ("message/rfc822", "text/rfc822-headers", "message/rfc822-headers")
_COMPLAINT_TYPES = frozenset({"abuse", "fraud", "other"})
# A 5.x.x that is about our message or our sender, not the recipient's address.
_BLOCKED_SUBJECTS = frozenset({"6", "7"})
_BLOCKED_CODES = frozenset({("2", "3"), ("3", "4"), ("1", "7"), ("1", "8")})
# 5.7.13 user account disabled (RFC 7372), 5.7.17/18 mailbox or domain owner changed (RFC 7293).
_HARD_POLICY_CODES = frozenset({("7", "13"), ("7", "17"), ("7", "18")})
# 5.2.2 mailbox full: "useful for both permanent and persistent transient errors" (RFC 3463
# §3.3); 5.4.7 the sending MTA gave up retrying. Both may pass.
_SOFT_CODES = frozenset({("2", "2"), ("4", "7")})


class BounceKind(StrEnum):
    """What a report means for the subscriber it is about (see the module's table)."""

    HARD = "hard"
    SOFT = "soft"
    BLOCKED = "blocked"
    DELAYED = "delayed"
    DELIVERED = "delivered"
    COMPLAINT = "complaint"
    IGNORED = "ignored"


COUNTED = frozenset({BounceKind.HARD, BounceKind.SOFT, BounceKind.BLOCKED, BounceKind.COMPLAINT})


@dataclass(frozen=True)
class RecipientStatus:
    """One per-recipient block of a DSN (RFC 3464 §2.3)."""

    action: str  # lower case: failed, delayed, delivered, relayed, expanded ("" if absent)
    status: str  # "5.1.1", or "" when neither Status nor Diagnostic-Code holds a code
    final_recipient: str | None
    original_recipient: str | None
    diagnostic: str  # Diagnostic-Code, one line, at most DIAGNOSTIC_LIMIT characters


@dataclass(frozen=True)
class Report:
    """A delivery status notification or a complaint, reduced to what we act on.

    ``report_id`` is the report's own Message-ID (or a hash of its bytes): the idempotency key.
    ``verp_uids`` are uids from the VERP addresses it was delivered to (and the original's
    Return-Path), ``unsubscribe_uid`` the uid in the original's List-Unsubscribe token,
    ``addresses`` the recipient addresses it names (Original-Recipient, Final-Recipient,
    Original-Rcpt-To), ``message_id`` the Message-ID of the original message.
    """

    report_id: str
    kind: Literal["dsn", "arf"]
    outcome: BounceKind
    date: datetime | None = None
    status: str = ""
    action: str = ""
    diagnostic: str = ""
    feedback_type: str | None = None
    recipients: tuple[RecipientStatus, ...] = ()
    verp_uids: tuple[str, ...] = ()
    unsubscribe_uid: str | None = None
    addresses: tuple[str, ...] = ()
    message_id: str | None = None


def classify(action: str, status: str) -> BounceKind:
    """The outcome of one DSN recipient block (the module docstring has the table)."""
    action = action.strip().lower()
    if action in ("delivered", "relayed", "expanded"):
        return BounceKind.DELIVERED
    if action == "delayed":
        return BounceKind.DELAYED  # RFC 3464 §2.3.3: still trying; must never count
    match = _STATUS_RE.search(status)
    if action not in ("failed", ""):
        return BounceKind.IGNORED
    if match is None:
        # RFC 3464 makes Status mandatory; a failure without one is counted, cautiously.
        return BounceKind.SOFT if action == "failed" else BounceKind.IGNORED
    klass, subject, detail = match.groups()
    if klass == "2":
        return BounceKind.DELIVERED
    if klass == "4":
        return BounceKind.SOFT
    if (subject, detail) in _HARD_POLICY_CODES:
        return BounceKind.HARD
    if subject in _BLOCKED_SUBJECTS or (subject, detail) in _BLOCKED_CODES:
        return BounceKind.BLOCKED
    if (subject, detail) in _SOFT_CODES:
        return BounceKind.SOFT
    return BounceKind.HARD


def status_from_reply(code: int | None, reply: str) -> str:
    """The enhanced status code (RFC 3463) in an SMTP reply, else one implied by its code."""
    match = _STATUS_RE.search(reply)
    if match is not None:
        return ".".join(match.groups())
    if code is not None and 200 <= code < 600:
        return f"{code // 100}.0.0"
    basic = _BASIC_CODE_RE.search(reply)
    return f"{basic.group(1)}.0.0" if basic else ""


_SEVERITY = {
    BounceKind.HARD: 0,
    BounceKind.BLOCKED: 1,
    BounceKind.SOFT: 2,
    BounceKind.DELAYED: 3,
    BounceKind.DELIVERED: 4,
    BounceKind.IGNORED: 5,
}


def parse_report(raw: bytes, *, envelope_from: str | None = None) -> Report | None:
    """The DSN or ARF report in ``raw``, or None for anything else (never raises).

    ``envelope_from`` (our unsuffixed envelope sender) restricts which VERP addresses count.
    """
    try:
        return _parse(raw, envelope_from)
    except (ValueError, LookupError, TypeError, AttributeError, UnicodeError) as exc:
        # Hostile or broken mail must never stop a run: the email package is lenient, but a
        # header it cannot make sense of can still surface as one of these.
        log.debug("unparsable message skipped: %r", exc)
        return None


def _parse(raw: bytes, envelope_from: str | None) -> Report | None:
    # compat32 keeps header values as the text they are; the default policy would build
    # structured headers, which raise on some malformed input.
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    report = _find_report(msg)
    if report is None:
        return None
    param = report.get_param("report-type")
    report_type = param.lower() if isinstance(param, str) else ""
    payload = report.get_payload()
    if not isinstance(payload, list):
        return None
    parts = [part for part in payload if isinstance(part, Message)]
    kinds = {
        "delivery-status": "message/delivery-status",
        "feedback-report": "message/feedback-report",
    }
    if report_type not in kinds:
        return None
    blocks = next((_blocks(p) for p in parts if p.get_content_type() == kinds[report_type]), None)
    if not blocks:
        return None
    original = _original_headers(parts)
    # The envelope sender of the original as the reporter saw it: Postfix's per-message
    # X-Postfix-Sender, ARF's Original-Mail-From (RFC 5965 §3.2).
    senders = [
        str(value).partition(";")[2] if ";" in str(value) else str(value)
        for name in ("X-Postfix-Sender", "Original-Mail-From")
        for value in blocks[0].get_all(name, [])
    ]
    common: dict[str, Any] = {
        "report_id": _report_id(msg, raw),
        "date": _date(msg),
        "verp_uids": _verp_uids(msg, original, senders, envelope_from),
        "unsubscribe_uid": _unsubscribe_uid(original),
        "message_id": _message_id(original),
    }
    if report_type == "delivery-status":
        return _dsn(blocks, common)
    return _arf(blocks, common)


def _find_report(msg: Message) -> Message | None:
    """The multipart/report part: the message itself, or one forwarded inside it."""
    for part in msg.walk():
        if part.get_content_type() == "multipart/report":
            return part
    return None


def _dsn(blocks: list[Message], common: dict[str, Any]) -> Report | None:
    recipients = tuple(_recipient(block) for block in blocks[1:])  # [0]: per-message fields
    recipients = tuple(r for r in recipients if r.action or r.status or r.final_recipient)
    if not recipients:
        return None
    decisive = min(recipients, key=lambda r: _SEVERITY[classify(r.action, r.status)])
    addresses = [decisive.original_recipient, decisive.final_recipient]
    return Report(
        kind="dsn",
        outcome=classify(decisive.action, decisive.status),
        status=decisive.status,
        action=decisive.action,
        diagnostic=decisive.diagnostic,
        recipients=recipients,
        addresses=tuple(dict.fromkeys(a for a in addresses if a)),
        **common,
    )


def _arf(blocks: list[Message], common: dict[str, Any]) -> Report | None:
    fields = blocks[0]
    feedback_type = (_header(fields, "Feedback-Type") or "").lower()
    if not feedback_type:
        return None
    addresses = [_address(v) for v in fields.get_all("Original-Rcpt-To", [])]
    return Report(
        kind="arf",
        outcome=BounceKind.COMPLAINT if feedback_type in _COMPLAINT_TYPES else BounceKind.IGNORED,
        feedback_type=feedback_type[:40],
        addresses=tuple(dict.fromkeys(a for a in addresses if a)),
        **common,
    )


def _blocks(part: Message) -> list[Message]:
    """The field blocks of a message/delivery-status or message/feedback-report part.

    The email package parses the first kind into blocks and the second as an enclosed
    message, without undoing a transfer encoding; an encoded part is put back together,
    decoded and parsed here.
    """
    payload = part.get_payload()
    encoding = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    if isinstance(payload, list) and encoding not in ("base64", "quoted-printable"):
        return [block for block in payload if isinstance(block, Message)]
    if isinstance(payload, list):
        text = "\n\n".join(b.as_string() for b in payload if isinstance(b, Message))
    else:
        text = payload if isinstance(payload, str) else ""
    data = text.encode("utf-8", "surrogateescape")
    if encoding == "base64":
        data = base64.b64decode(data)  # non-alphabet characters (line breaks) are skipped
    elif encoding == "quoted-printable":
        data = quopri.decodestring(data)
    data = data.replace(b"\r\n", b"\n")
    parser = BytesHeaderParser(policy=email.policy.compat32)
    return [parser.parsebytes(chunk) for chunk in re.split(rb"\n[ \t]*\n", data) if chunk.strip()]


def _recipient(block: Message) -> RecipientStatus:
    diagnostic = _header(block, "Diagnostic-Code") or ""
    diagnostic = re.sub(r"^\s*smtp\s*;\s*", "", diagnostic, flags=re.IGNORECASE)
    status_field = _header(block, "Status") or ""
    match = _STATUS_RE.search(status_field) or _STATUS_RE.search(diagnostic)
    status = ".".join(match.groups()) if match else ""
    if not status:
        basic = _BASIC_CODE_RE.search(diagnostic)
        status = f"{basic.group(1)}.0.0" if basic else ""
    return RecipientStatus(
        action=(_header(block, "Action") or "").strip().lower()[:20],
        status=status,
        final_recipient=_address(_header(block, "Final-Recipient")),
        original_recipient=_address(_header(block, "Original-Recipient")),
        diagnostic=diagnostic[:DIAGNOSTIC_LIMIT],
    )


def _original_headers(parts: list[Message]) -> Message | None:
    """The headers of the message reported on (RFC 6522 §3: the optional third part)."""
    for part in parts:
        kind = part.get_content_type()
        if kind not in _ORIGINAL_PARTS:
            continue
        payload = part.get_payload()
        if isinstance(payload, list) and payload and isinstance(payload[0], Message):
            return payload[0]
        data = part.get_payload(decode=True)
        if isinstance(data, bytes):
            return BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)
    return None


def _header(msg: Message, name: str) -> str | None:
    # Header text of hostile mail lands in a JSON column: one_line drops the control characters
    # and the lone surrogates that undecodable bytes become, and PostgreSQL refuses both
    # \u0000 and unpaired surrogates in JSON.
    value = msg.get(name)
    return None if value is None else one_line(str(value))


def _address(value: str | None) -> str | None:
    """The address of an ``rfc822; user@host`` field (RFC 3464 §2.3.1-2), normalized."""
    if not value:
        return None
    kind, semi, address = value.partition(";")
    if semi and kind.strip().lower() not in ("rfc822", "utf-8"):
        return None
    address = (address if semi else value).strip().strip("<>").strip()
    try:
        return normalize_address(address)
    except AddressError:
        return None


def _report_id(msg: Message, raw: bytes) -> str:
    match = _MSGID_RE.search(_header(msg, "Message-ID") or "")
    if match is not None:
        return match.group(0)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _message_id(original: Message | None) -> str | None:
    if original is None:
        return None
    match = _MSGID_RE.search(_header(original, "Message-ID") or "")
    return match.group(0) if match else None


def _date(msg: Message) -> datetime | None:
    value = _header(msg, "Date")
    if not value:
        return None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _verp_uids(
    msg: Message, original: Message | None, senders: list[str], envelope_from: str | None
) -> tuple[str, ...]:
    """VERP uids, most direct first: where the report was delivered, the original's envelope
    sender as reported, then the original's Return-Path (added by the receiving MTA; it helps
    when a bounce reached us through a forward)."""
    values: list[str] = []
    for name in _DELIVERY_HEADERS:
        values.extend(str(v) for v in msg.get_all(name, []))
    values.extend(senders)
    if original is not None:
        values.extend(str(v) for v in original.get_all("Return-Path", []))
    uids = []
    for _name, address in getaddresses(values):
        uid = uid_from_verp(address, envelope_from=envelope_from)
        if uid is not None:
            uids.append(uid)
    return tuple(dict.fromkeys(uids))


def _unsubscribe_uid(original: Message | None) -> str | None:
    if original is None:
        return None
    match = _UNSUB_TOKEN_RE.search(_header(original, "List-Unsubscribe") or "")
    return match.group(1) if match else None
