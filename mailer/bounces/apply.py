"""Applying bounce and complaint reports, and our own server's 5xx answers, to subscribers.

A report is matched to its subscriber (VERP uid, List-Unsubscribe token, recipient address,
original Message-ID), recorded as an event, and may make the subscriber bounced or complained
and put the address on the suppression list: all through the subscriber store. Every applied
report leaves an event keyed by the report's Message-ID, so processing the same mailbox twice
changes nothing the second time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from mailer.bounces.mailbox import read_mailbox
from mailer.bounces.reports import (
    COUNTED,
    DIAGNOSTIC_LIMIT,
    BounceKind,
    Report,
    classify,
    parse_report,
    status_from_reply,
)
from mailer.db import audit
from mailer.db.schema import deliveries, events
from mailer.errors import SubscriberError
from mailer.subscribers import store
from mailer.text import one_line

DEFAULT_SOFT_LIMIT = 3
DEFAULT_SOFT_WINDOW = timedelta(days=30)
EVENT_KINDS = ("bounce", "complaint")


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
) -> BounceKind:
    """Apply a 5xx answer our own SMTP server gave at send time, inside the caller's
    transaction, with the same rules as a DSN.

    A refusal at MAIL FROM or before (``stage`` "connect" or "mail") is about our sender, not
    the recipient, and counts as blocked; so does a 5.7.x policy refusal at any stage.
    """
    status = status_from_reply(code, reply)
    outcome = BounceKind.BLOCKED if stage in ("connect", "mail") else classify("failed", status)
    report = Report(
        report_id=f"smtp:{message_id}",
        kind="dsn",
        outcome=outcome,
        date=now,
        status=status,
        action="failed",
        diagnostic=one_line(f"{code or ''} {reply}")[:DIAGNOSTIC_LIMIT],
        message_id=message_id,
    )
    _apply_to(conn, subscriber_id, "smtp", report, now, soft_limit, soft_window)
    return outcome


@dataclass(frozen=True)
class _Applied:
    duplicate: bool
    suppressed: int = 0


def _count(summary: BounceSummary, outcome: BounceKind) -> None:
    if outcome is BounceKind.HARD:
        summary.hard += 1
    elif outcome is BounceKind.SOFT:
        summary.soft += 1
    elif outcome is BounceKind.COMPLAINT:
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
    subscriber = store.load_by_id(conn, sid, lock=True)
    if subscriber is None:  # found in this transaction, or the ledger's own row: not expected
        raise SubscriberError(f"no subscriber with id {sid}")
    past = conn.execute(
        sa.select(events.c.at, events.c.detail).where(
            events.c.subscriber_id == sid, events.c.kind.in_(EVENT_KINDS)
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
    kind = "complaint" if outcome is BounceKind.COMPLAINT else "bounce"
    audit.record(conn, sid, kind, at, **_detail(report, matched_by))
    if outcome in (BounceKind.HARD, BounceKind.SOFT):
        store.count_bounce(conn, sid, now=now)
    if outcome is not BounceKind.COMPLAINT and report.message_id is not None:
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
    status, email_address = subscriber.status, subscriber.email
    if outcome is BounceKind.COMPLAINT:
        if status != "complained":
            store.change_status(conn, sid, "complained", now=now, source="complaint", **source)
        return _Applied(False, _suppress(conn, email_address, "complained", now))
    since = now - soft_window
    if outcome is BounceKind.HARD or (
        outcome is BounceKind.SOFT
        and _recent_soft(past, since) + (1 if at >= since else 0) >= soft_limit
    ):
        if status in ("active", "pending"):
            store.change_status(conn, sid, "bounced", now=now, source="bounce", **source)
        return _Applied(False, _suppress(conn, email_address, "bounced", now))
    return _Applied(False)


def _recent_soft(past: Iterable[Any], since: datetime) -> int:
    return sum(
        1
        for at, detail in past
        if isinstance(detail, dict) and detail.get("type") == BounceKind.SOFT.value and at >= since
    )


def _suppress(conn: sa.Connection, email_address: str, reason: str, now: datetime) -> int:
    if store.suppression_reason(conn, email_address) is not None:
        return 0
    store.suppress(conn, email_address, reason, now)
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
        sid = store.id_by_uid(conn, uid)
        if sid is not None:
            return sid, "verp"
    if report.unsubscribe_uid is not None:
        sid = store.id_by_uid(conn, report.unsubscribe_uid)
        if sid is not None:
            return sid, "list-unsubscribe"
    for address in report.addresses:
        sid = store.id_by_email(conn, address)
        if sid is not None:
            return sid, "recipient"
    if report.message_id is not None:
        sid = conn.scalar(
            sa.select(deliveries.c.subscriber_id)
            .where(deliveries.c.message_id == report.message_id)
            .limit(1)
        )
        if sid is None:
            sid = store.id_by_confirmation(conn, report.message_id)
        if sid is not None:
            return sid, "message-id"
    return None
