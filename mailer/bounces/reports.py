"""Bounces and complaints: VERP addresses, DSN and ARF parsing, and what each does to a subscriber.

A bounce (a DSN, RFC 3464, inside a multipart/report of RFC 6522) goes to the envelope sender.
With VERP that is ``bounces+<uid>@domain``, so the address a bounce is delivered to names the
subscriber even when the report itself is vague. A complaint (an ARF report, RFC 5965) comes
from a mailbox provider's feedback loop and carries the headers of the message complained of.

What each report does (``classify``; RFC 3463 names the status codes):

================================  ============  ===========================================
Action / Status / Feedback-Type   Outcome       Effect on the subscriber
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

Every applied report leaves an event keyed by the report's Message-ID, so processing the same
mailbox twice changes nothing the second time.
"""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import logging
import mailbox
import quopri
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import Message
from email.parser import BytesHeaderParser
from email.utils import getaddresses, parsedate_to_datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa

from mailer.db import events
from mailer.db.schema import deliveries, subscribers
from mailer.db.schema import events as events_table
from mailer.errors import AddressError, MailerError
from mailer.subscribers.addresses import normalize_address
from mailer.subscribers.store import change_status, suppress, suppression_reason
from mailer.subscribers.tokens import UID_RE

log = logging.getLogger(__name__)

DEFAULT_SOFT_LIMIT = 3
DEFAULT_SOFT_WINDOW = timedelta(days=30)
MAX_LOCAL_PART = 64  # RFC 5321 §4.5.3.1.1
DIAGNOSTIC_LIMIT = 300
EVENT_KINDS = ("bounce", "complaint")

# RFC 3463 §3.1: class.subject.detail. A Status field may carry a comment after the code.
_STATUS_RE = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_BASIC_CODE_RE = re.compile(r"\b([245])\d\d\b")
# The signed token we put in List-Unsubscribe: /unsubscribe/<uid>.<mac> (subscribers.links)
# and
# mailto:...?subject=unsubscribe-<uid>.<mac> (mailer.compose.messages).
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


class MailboxError(MailerError, OSError):
    """A mailbox path cannot be read; ``path`` names it."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class Outcome(StrEnum):
    """What a report means for the subscriber it is about (see the module's table)."""

    HARD = "hard"
    SOFT = "soft"
    BLOCKED = "blocked"
    DELAYED = "delayed"
    DELIVERED = "delivered"
    COMPLAINT = "complaint"
    IGNORED = "ignored"


COUNTED = frozenset({Outcome.HARD, Outcome.SOFT, Outcome.BLOCKED, Outcome.COMPLAINT})


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
    outcome: Outcome
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


@dataclass
class BounceSummary:
    """What a run did: one count per report read (``total``), plus ``suppressed``."""

    hard: int = 0
    soft: int = 0
    complaints: int = 0
    blocked: int = 0
    unmatched: int = 0  # a bounce or complaint about nobody we know
    ignored: int = 0  # not a report, or delayed / delivered / a feedback type we ignore
    duplicates: int = 0  # already applied in an earlier run
    suppressed: int = 0  # subscribers newly put on the suppression list by this run

    @property
    def total(self) -> int:
        return (
            self.hard
            + self.soft
            + self.complaints
            + self.blocked
            + self.unmatched
            + self.ignored
            + self.duplicates
        )

    def __str__(self) -> str:
        return (
            f"{_n(self.total, 'message')}: {_n(self.hard, 'hard bounce')}, "
            f"{_n(self.soft, 'soft bounce')}, {_n(self.complaints, 'complaint')}, "
            f"{self.blocked} blocked, {self.unmatched} unmatched, {self.ignored} ignored, "
            f"{self.duplicates} already processed; "
            f"{_n(self.suppressed, 'subscriber')} suppressed"
        )


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


# --- VERP ------------------------------------------------------------------------------------


def verp_address(envelope_from: str, uid: str) -> str:
    """The per-subscriber envelope sender: ``bounces@d`` and uid ``U`` give ``bounces+U@d``.

    The uid is a tag after ``+``, the sub-address delimiter most MTAs deliver to the base
    mailbox (Postfix ``recipient_delimiter = +``). A local part already holding a ``+`` tag
    keeps it (``bounces+news@d`` gives ``bounces+news+U@d``).
    """
    local, at, domain = envelope_from.strip().rpartition("@")
    if not at or not local or not domain:
        raise AddressError(envelope_from, "an envelope sender must be a plain local@domain")
    if not UID_RE.match(uid):
        raise AddressError(envelope_from, f"{uid!r} is not a subscriber uid")
    tagged = f"{local}+{uid}"
    if len(tagged) > MAX_LOCAL_PART:
        raise AddressError(
            envelope_from,
            f"the local part with a VERP tag ({tagged!r}) passes {MAX_LOCAL_PART} characters "
            "(RFC 5321 §4.5.3.1.1): use a shorter local part such as 'bounces'",
        )
    return f"{tagged}@{domain}"


def uid_from_verp(address: str, *, envelope_from: str | None = None) -> str | None:
    """The uid tagged in a VERP address, or None if ``address`` is not one.

    With ``envelope_from``, the address must also have its local part and domain (compared
    without case), so a tagged address of someone else's is never read as ours.
    """
    _name, addr = _parse_one(address)
    local, at, domain = addr.rpartition("@")
    base, plus, tag = local.rpartition("+")
    if not at or not plus or not UID_RE.match(tag):
        return None
    if envelope_from is not None:
        own_local, _, own_domain = envelope_from.strip().rpartition("@")
        if base.lower() != own_local.lower() or domain.lower() != own_domain.lower():
            return None
    return tag


def _parse_one(value: str) -> tuple[str, str]:
    pairs = getaddresses([value])
    return pairs[0] if pairs else ("", "")


# --- classification --------------------------------------------------------------------------


def classify(action: str, status: str) -> Outcome:
    """The outcome of one DSN recipient block (the module docstring has the table)."""
    action = action.strip().lower()
    if action in ("delivered", "relayed", "expanded"):
        return Outcome.DELIVERED
    if action == "delayed":
        return Outcome.DELAYED  # RFC 3464 §2.3.3: still trying; must never count
    match = _STATUS_RE.search(status)
    if action not in ("failed", ""):
        return Outcome.IGNORED
    if match is None:
        # RFC 3464 makes Status mandatory; a failure without one is counted, cautiously.
        return Outcome.SOFT if action == "failed" else Outcome.IGNORED
    klass, subject, detail = match.groups()
    if klass == "2":
        return Outcome.DELIVERED
    if klass == "4":
        return Outcome.SOFT
    if (subject, detail) in _HARD_POLICY_CODES:
        return Outcome.HARD
    if subject in _BLOCKED_SUBJECTS or (subject, detail) in _BLOCKED_CODES:
        return Outcome.BLOCKED
    if (subject, detail) in _SOFT_CODES:
        return Outcome.SOFT
    return Outcome.HARD


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
    Outcome.HARD: 0,
    Outcome.BLOCKED: 1,
    Outcome.SOFT: 2,
    Outcome.DELAYED: 3,
    Outcome.DELIVERED: 4,
    Outcome.IGNORED: 5,
}


# --- parsing ---------------------------------------------------------------------------------


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
        outcome=Outcome.COMPLAINT if feedback_type in _COMPLAINT_TYPES else Outcome.IGNORED,
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
    diagnostic = _one_line(_header(block, "Diagnostic-Code") or "")
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
    value = msg.get(name)
    return None if value is None else _one_line(str(value))


def _one_line(value: str) -> str:
    # Header text of hostile mail lands in a JSON column: control characters and the lone
    # surrogates that undecodable bytes become (category Cs) are not printable, and PostgreSQL
    # refuses both \u0000 and unpaired surrogates in JSON.
    return " ".join("".join(ch if ch.isprintable() else " " for ch in value).split())


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


# --- reading mailboxes -----------------------------------------------------------------------


def read_mailbox(path: Path) -> Iterator[bytes]:
    """Every message in a Maildir (``cur/`` and ``new/``), an mbox file, or one message file.

    A file that does not start with an mbox ``From `` line is read as a single message. The
    mailbox is only read: nothing is moved, flagged or deleted (reprocessing is harmless).
    Raises ``MailboxError`` naming the path when it cannot be read.
    """
    path = Path(path)
    if path.is_dir():
        if not ((path / "cur").is_dir() or (path / "new").is_dir()):
            raise MailboxError(path, "is a directory but not a Maildir (no cur/ or new/)")
        yield from _read_maildir(path)
        return
    try:
        with path.open("rb") as file:
            head = file.read(5)
    except OSError as exc:
        raise MailboxError(path, f"cannot be read: {exc.strerror}") from exc
    if head == b"From ":
        yield from _read_mbox(path)
        return
    try:
        yield path.read_bytes()
    except OSError as exc:
        raise MailboxError(path, f"cannot be read: {exc.strerror}") from exc


def _read_maildir(path: Path) -> Iterator[bytes]:
    box = mailbox.Maildir(path, factory=None, create=False)
    try:
        keys = sorted(box.iterkeys())
    except OSError as exc:
        raise MailboxError(path, f"cannot be listed: {exc.strerror}") from exc
    for key in keys:
        if key.startswith("."):
            continue  # not a message: the Maildir convention for editors' and tools' files
        try:
            yield box.get_bytes(key)
        except KeyError:
            # Moved or deleted by a mail client since the listing: not ours to process now.
            log.info("message %s left %s while it was read", key, path)
        except OSError as exc:
            raise MailboxError(path, f"message {key} cannot be read: {exc.strerror}") from exc


def _read_mbox(path: Path) -> Iterator[bytes]:
    box = mailbox.mbox(path, factory=None, create=False)
    try:
        keys = list(box.iterkeys())
        for key in keys:
            yield box.get_bytes(key)
    except OSError as exc:
        raise MailboxError(path, f"cannot be read: {exc.strerror}") from exc
    finally:
        box.close()


# --- applying reports ------------------------------------------------------------------------


def apply_reports(
    engine: sa.Engine,
    reports: Iterable[Report],
    *,
    now: datetime,
    soft_limit: int = DEFAULT_SOFT_LIMIT,
    soft_window: timedelta = DEFAULT_SOFT_WINDOW,
) -> BounceSummary:
    """Apply reports to the subscribers they are about, one transaction per report.

    The subscriber is found by, in order: a VERP uid, the uid in the original's
    List-Unsubscribe token, a recipient address the report names, the original Message-ID (a
    delivery's, or a confirmation email's). A report already applied (same report Message-ID,
    or the same outcome for the same original message) is counted as a duplicate and changes
    nothing.
    """
    if soft_limit < 1:
        raise ValueError(f"soft_limit must be at least 1, got {soft_limit}")
    summary = BounceSummary()
    for report in reports:
        if report.outcome not in COUNTED:
            summary.ignored += 1
            continue
        with engine.begin() as conn:
            result = _apply(conn, report, now, soft_limit, soft_window)
        if result is None:
            summary.unmatched += 1
        elif result.duplicate:
            summary.duplicates += 1
        else:
            _count(summary, report.outcome)
            summary.suppressed += result.suppressed
    return summary


def process_path(
    engine: sa.Engine,
    path: Path,
    *,
    now: datetime,
    soft_limit: int = DEFAULT_SOFT_LIMIT,
    soft_window: timedelta = DEFAULT_SOFT_WINDOW,
    envelope_from: str | None = None,
) -> BounceSummary:
    """Read a Maildir, mbox or message file and apply every report in it (``mailer bounces
    process PATH``). Mail that is not a report is counted as ignored."""
    not_reports = 0

    def reports() -> Iterator[Report]:
        nonlocal not_reports
        for raw in read_mailbox(path):
            report = parse_report(raw, envelope_from=envelope_from)
            if report is None:
                not_reports += 1
            else:
                yield report

    summary = apply_reports(
        engine, reports(), now=now, soft_limit=soft_limit, soft_window=soft_window
    )
    summary.ignored += not_reports
    return summary


def apply_send_bounce(
    conn: sa.Connection,
    subscriber_id: int,
    *,
    code: int | None,
    reply: str,
    stage: str,
    message_id: str,
    now: datetime,
    soft_limit: int = DEFAULT_SOFT_LIMIT,
    soft_window: timedelta = DEFAULT_SOFT_WINDOW,
) -> Outcome:
    """Apply a 5xx answer our own SMTP server gave at send time, inside the caller's
    transaction, with the same rules as a DSN.

    A refusal at MAIL FROM or before (``stage`` "connect" or "mail") is about our sender, not
    the recipient, and counts as blocked; so does a 5.7.x policy refusal at any stage.
    """
    status = status_from_reply(code, reply)
    outcome = Outcome.BLOCKED if stage in ("connect", "mail") else classify("failed", status)
    report = Report(
        report_id=f"smtp:{message_id}",
        kind="dsn",
        outcome=outcome,
        date=now,
        status=status,
        action="failed",
        diagnostic=_one_line(f"{code or ''} {reply}")[:DIAGNOSTIC_LIMIT],
        message_id=message_id,
    )
    _apply_to(conn, subscriber_id, "smtp", report, now, soft_limit, soft_window)
    return outcome


@dataclass(frozen=True)
class _Applied:
    duplicate: bool
    suppressed: int = 0


def _count(summary: BounceSummary, outcome: Outcome) -> None:
    if outcome is Outcome.HARD:
        summary.hard += 1
    elif outcome is Outcome.SOFT:
        summary.soft += 1
    elif outcome is Outcome.COMPLAINT:
        summary.complaints += 1
    else:
        summary.blocked += 1


def _apply(
    conn: sa.Connection, report: Report, now: datetime, soft_limit: int, soft_window: timedelta
) -> _Applied | None:
    found = _find_subscriber(conn, report)
    if found is None:
        return None
    sid, matched_by = found
    return _apply_to(conn, sid, matched_by, report, now, soft_limit, soft_window)


def _apply_to(
    conn: sa.Connection,
    sid: int,
    matched_by: str,
    report: Report,
    now: datetime,
    soft_limit: int,
    soft_window: timedelta,
) -> _Applied:
    # Lock the row (PostgreSQL; SQLite serializes writers anyway) so that two concurrent runs
    # over the same mailbox cannot both decide a report is new.
    row = conn.execute(
        sa.select(subscribers.c.email, subscribers.c.status)
        .where(subscribers.c.id == sid)
        .with_for_update()
    ).one()
    past = conn.execute(
        sa.select(events_table.c.at, events_table.c.detail).where(
            events_table.c.subscriber_id == sid, events_table.c.kind.in_(EVENT_KINDS)
        )
    ).all()
    outcome = report.outcome
    for _at, detail in past:
        if not isinstance(detail, dict):
            continue
        if detail.get("report") == report.report_id or (
            report.message_id is not None
            and detail.get("message_id") == report.message_id
            and detail.get("type") == outcome.value
        ):
            return _Applied(duplicate=True)
    at = min(report.date or now, now)  # when it happened; a report dated in the future is not
    kind = "complaint" if outcome is Outcome.COMPLAINT else "bounce"
    events.record(conn, sid, kind, at, **_detail(report, matched_by))
    if outcome in (Outcome.HARD, Outcome.SOFT):
        conn.execute(
            subscribers.update()
            .where(subscribers.c.id == sid)
            .values(bounce_count=subscribers.c.bounce_count + 1, updated_at=now)
        )
    if outcome is not Outcome.COMPLAINT and report.message_id is not None:
        # The message was accepted by our relay ("sent") and bounced later: say so.
        conn.execute(
            deliveries.update()
            .where(
                deliveries.c.message_id == report.message_id,
                deliveries.c.subscriber_id == sid,
                deliveries.c.status == "sent",
            )
            .values(
                status="bounced",
                last_reply=f"{report.status} {report.diagnostic}".strip()[:500] or None,
                updated_at=now,
            )
        )
    source = {"report": report.report_id}
    status, email_address = row.status, row.email
    if outcome is Outcome.COMPLAINT:
        if status != "complained":
            change_status(conn, sid, "complained", now=now, source="complaint", **source)
        return _Applied(False, _suppress(conn, email_address, "complained", now))
    since = now - soft_window
    if outcome is Outcome.HARD or (
        outcome is Outcome.SOFT
        and _recent_soft(past, since) + (1 if at >= since else 0) >= soft_limit
    ):
        if status in ("active", "pending"):
            change_status(conn, sid, "bounced", now=now, source="bounce", **source)
        return _Applied(False, _suppress(conn, email_address, "bounced", now))
    return _Applied(False)


def _recent_soft(past: Iterable[Any], since: datetime) -> int:
    return sum(
        1
        for at, detail in past
        if isinstance(detail, dict) and detail.get("type") == Outcome.SOFT.value and at >= since
    )


def _suppress(conn: sa.Connection, email_address: str, reason: str, now: datetime) -> int:
    if suppression_reason(conn, email_address) is not None:
        return 0
    suppress(conn, email_address, reason, now)
    return 1


def _detail(report: Report, matched_by: str) -> dict[str, str]:
    detail = {
        "report": report.report_id,
        "type": report.outcome.value,
        "source": report.kind,
        "matched_by": matched_by,
        "status": report.status,
        "action": report.action,
        "diagnostic": report.diagnostic,
        "feedback_type": report.feedback_type or "",
        "message_id": report.message_id or "",
    }
    return {k: v for k, v in detail.items() if v}


def _find_subscriber(conn: sa.Connection, report: Report) -> tuple[int, str] | None:
    for uid in report.verp_uids:
        sid = _by_uid(conn, uid)
        if sid is not None:
            return sid, "verp"
    if report.unsubscribe_uid is not None:
        sid = _by_uid(conn, report.unsubscribe_uid)
        if sid is not None:
            return sid, "list-unsubscribe"
    for address in report.addresses:
        sid = conn.scalar(sa.select(subscribers.c.id).where(subscribers.c.email == address))
        if sid is not None:
            return sid, "recipient"
    if report.message_id is not None:
        sid = conn.scalar(
            sa.select(deliveries.c.subscriber_id)
            .where(deliveries.c.message_id == report.message_id)
            .limit(1)
        )
        if sid is None:
            sid = conn.scalar(
                sa.select(subscribers.c.id)
                .where(subscribers.c.confirmation_message_id == report.message_id)
                .limit(1)
            )
        if sid is not None:
            return sid, "message-id"
    return None


def _by_uid(conn: sa.Connection, uid: str) -> int | None:
    sid: int | None = conn.scalar(sa.select(subscribers.c.id).where(subscribers.c.uid == uid))
    if sid is None and uid == uid.lower():
        # Some MTAs lower-case the address they deliver a bounce to; uids are base64url, so
        # look again without case (≈ 115 bits are left: a clash is not a real risk).
        rows = conn.scalars(
            sa.select(subscribers.c.id).where(sa.func.lower(subscribers.c.uid) == uid).limit(2)
        ).all()
        sid = rows[0] if len(rows) == 1 else None
    return sid


__all__ = [
    "BounceSummary",
    "MailboxError",
    "Outcome",
    "RecipientStatus",
    "Report",
    "apply_reports",
    "apply_send_bounce",
    "classify",
    "parse_report",
    "process_path",
    "read_mailbox",
    "status_from_reply",
    "uid_from_verp",
    "verp_address",
]
