"""Bounce and complaint processing: hand-written DSN/ARF samples, Maildir and mbox, both databases.

The samples in ``tests/data/bounces`` follow RFC 3464 (DSN), RFC 5965 (ARF) and RFC 6522
(multipart/report), in the shapes Postfix, Sendmail, Gmail and Yahoo send.
"""

from __future__ import annotations

import mailbox
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.bounces.apply import BounceSummary, apply_reports, apply_send_bounce, process_path
from mailer.bounces.mailbox import MailboxError, read_mailbox
from mailer.bounces.reports import (
    BounceKind,
    Report,
    classify,
    parse_report,
    status_from_reply,
)
from mailer.bounces.verp import uid_from_verp, verp_address
from mailer.db.schema import deliveries, events, issues, subscribers, suppressions
from mailer.errors import AddressError, MailerError
from mailer.subscribers.store import suppression_reason
from tests.factories import NOW, make_subscriber

SAMPLES = Path(__file__).parent / "data" / "bounces"
LATER = NOW + timedelta(days=1)
SENDER = "bounces@news.example.org"
GMAIL_MESSAGE_ID = "<weekly.202611201200.42.GmailDsnUid00000000006@news.example.org>"

# The people the samples are about: (address, uid).
PEOPLE = {
    "hard": ("gone@example.net", "HardBounceUid000000001"),
    "soft": ("full@example.com", "SoftBounceUid000000002"),
    "delayed": ("slow@example.com", "DelayedUid000000000003"),
    "complaint": ("angry@example.net", "ComplaintUid0000000004"),
    "yahoo": ("someone@yahoo.com", "YahooArfUid00000000005"),
    "gmail": ("reader@forward.example", "GmailDsnUid00000000006"),
    "blocked": ("strict@gmail.com", "BlockedUid000000000007"),
}


@dataclass(frozen=True)
class Expected:
    person: str | None  # key of PEOPLE the report is about (None: not a report)
    counted: str  # the BounceSummary field that counts it
    status: str  # the subscriber's status afterwards
    suppressed: str | None  # suppression reason afterwards
    matched_by: str | None  # how the subscriber was found (None: no event)
    bounce_count: int = 0


EXPECTED = {
    "hard-5.1.1-postfix.eml": Expected("hard", "hard", "bounced", "bounced", "verp", 1),
    "soft-4.2.2-mailbox-full.eml": Expected("soft", "soft", "active", None, "recipient", 1),
    "delayed-4.4.1.eml": Expected("delayed", "ignored", "active", None, None),
    "arf-abuse.eml": Expected(
        "complaint", "complaints", "complained", "complained", "list-unsubscribe"
    ),
    "arf-yahoo-redacted.eml": Expected("yahoo", "complaints", "complained", "complained", "verp"),
    "gmail-dsn-5.1.1.eml": Expected("gmail", "hard", "bounced", "bounced", "message-id", 1),
    "blocked-5.7.26-dmarc.eml": Expected("blocked", "blocked", "active", None, "verp"),
    "not-a-report-vacation.eml": Expected(None, "ignored", "active", None, None),
    "not-a-report-mdn.eml": Expected(None, "ignored", "active", None, None),
    "not-a-report-truncated.eml": Expected(None, "ignored", "active", None, None),
    "not-a-report-binary.eml": Expected(None, "ignored", "active", None, None),
}
COUNTS = ("hard", "soft", "complaints", "blocked", "unmatched", "ignored", "duplicates")


def test_every_sample_file_has_an_expectation() -> None:
    assert sorted(p.name for p in SAMPLES.iterdir()) == sorted(EXPECTED)


# --- helpers ---------------------------------------------------------------------------------


def people(engine: sa.Engine) -> dict[str, int]:
    """Every person of the samples as an active subscriber with the sample's uid; the Gmail
    reader also gets the delivery that the Gmail DSN names by Message-ID."""
    ids: dict[str, int] = {}
    for key, (address, uid) in PEOPLE.items():
        sub = make_subscriber(engine, email=address)
        set_uid(engine, sub.id, uid)
        ids[key] = sub.id
    add_delivery(engine, ids["gmail"], GMAIL_MESSAGE_ID)
    return ids


def set_uid(engine: sa.Engine, sid: int, uid: str) -> None:
    with engine.begin() as conn:
        conn.execute(subscribers.update().where(subscribers.c.id == sid).values(uid=uid))


def add_delivery(engine: sa.Engine, sid: int, message_id: str, status: str = "sent") -> int:
    with engine.begin() as conn:
        # One issue per delivery: (issue, subscriber) is unique.
        n = conn.scalar(sa.select(sa.func.count()).select_from(issues)) or 0
        issue_id = conn.execute(
            issues.insert()
            .returning(issues.c.id)
            .values(
                digest="weekly",
                scheduled_for=NOW - timedelta(days=7 * n),
                window_end=NOW,
                subject="Weekly",
                topics="base-alerts",
                status="sent",
                created_at=NOW,
            )
        ).scalar_one()
        delivery_id: int = conn.execute(
            deliveries.insert()
            .returning(deliveries.c.id)
            .values(
                issue_id=issue_id,
                subscriber_id=sid,
                status=status,
                next_attempt_at=NOW,
                message_id=message_id,
                created_at=NOW,
                updated_at=NOW,
                sent_at=NOW if status == "sent" else None,
            )
        ).scalar_one()
    return delivery_id


def row(engine: sa.Engine, sid: int) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.select(subscribers).where(subscribers.c.id == sid)).one()


def events_of(engine: sa.Engine, sid: int) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(events.c.kind, events.c.at, events.c.detail)
                .where(events.c.subscriber_id == sid, events.c.kind != "subscribed")
                .order_by(events.c.id)
            )
        )


def reason(engine: sa.Engine, address: str) -> str | None:
    with engine.connect() as conn:
        return suppression_reason(conn, address)


def counts(summary: BounceSummary) -> dict[str, int]:
    return {name: getattr(summary, name) for name in COUNTS if getattr(summary, name)}


def dsn(
    *,
    status: str = "4.2.2",
    action: str = "failed",
    recipient: str = "full@example.com",
    message_id: str = "<orig.1@news.example.org>",
    report_id: str = "<report.1@mx.example.com>",
    date: datetime = NOW,
    to: str = SENDER,
) -> bytes:
    """A minimal RFC 3464 report."""
    return (
        f"From: MAILER-DAEMON@mx.example.com\r\n"
        f"To: {to}\r\n"
        f"Date: {format_datetime(date)}\r\n"
        f"Message-ID: {report_id}\r\n"
        f"MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n'
        f"\r\n--b\r\nContent-Type: text/plain\r\n\r\nDelivery failed.\r\n"
        f"--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; mx.example.com\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; 452 {status} try again\r\n"
        f"\r\n--b\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: digest@news.example.org\r\nMessage-ID: {message_id}\r\n"
        f"\r\n--b--\r\n"
    ).encode()


# --- each sample on both databases -----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_sample_has_its_outcome_and_is_idempotent(engine: sa.Engine, name: str) -> None:
    expected = EXPECTED[name]
    ids = people(engine)
    summary = process_path(engine, SAMPLES / name, now=LATER, envelope_from=SENDER)
    assert counts(summary) == {expected.counted: 1}
    assert summary.total == 1
    for key, (address, _uid) in PEOPLE.items():
        sub = row(engine, ids[key])
        if key != expected.person:  # nobody else is touched
            assert (sub.status, sub.bounce_count, reason(engine, address)) == ("active", 0, None)
            assert events_of(engine, ids[key]) == []
            continue
        assert sub.status == expected.status
        assert sub.bounce_count == expected.bounce_count
        assert reason(engine, address) == expected.suppressed
        recorded = events_of(engine, ids[key])
        if expected.matched_by is None:
            assert recorded == []
        else:
            first = recorded[0]
            assert first.kind == ("complaint" if expected.counted == "complaints" else "bounce")
            assert first.detail["matched_by"] == expected.matched_by
            assert first.detail["report"].startswith("<")
    assert summary.suppressed == (1 if expected.suppressed else 0)

    before = {key: (row(engine, sid), events_of(engine, sid)) for key, sid in ids.items()}
    again = process_path(engine, SAMPLES / name, now=LATER + timedelta(hours=1))
    counted_again = "duplicates" if expected.matched_by else "ignored"
    assert counts(again) == {counted_again: 1}
    assert again.suppressed == 0
    assert {key: (row(engine, sid), events_of(engine, sid)) for key, sid in ids.items()} == before


def test_hard_bounce_event_and_status_change_are_recorded(engine: sa.Engine) -> None:
    ids = people(engine)
    process_path(engine, SAMPLES / "hard-5.1.1-postfix.eml", now=LATER)
    bounce, status_change = events_of(engine, ids["hard"])
    assert bounce.kind == "bounce"
    assert bounce.at == datetime(2026, 11, 20, 12, 5, 11, tzinfo=UTC)  # the report's Date
    assert bounce.detail == {
        "report": "<20261120120511.4Yx7Q2abcd@mx.example.net>",
        "type": "hard",
        "source": "dsn",
        "matched_by": "verp",
        "status": "5.1.1",
        "action": "failed",
        "diagnostic": "550 5.1.1 <gone@example.net>: Recipient address rejected: "
        "User unknown in virtual mailbox table",
        "message_id": "<weekly.202611201200.42.HardBounceUid000000001@news.example.org>",
    }
    assert status_change.kind == "bounced"
    assert status_change.at == LATER
    assert status_change.detail == {"source": "bounce", "report": bounce.detail["report"]}


def test_a_bounce_after_sending_marks_the_delivery_bounced(engine: sa.Engine) -> None:
    ids = people(engine)
    other = add_delivery(engine, ids["gmail"], "<another@news.example.org>")
    process_path(engine, SAMPLES / "gmail-dsn-5.1.1.eml", now=LATER)
    with engine.connect() as conn:
        rows = {
            r.id: r
            for r in conn.execute(
                sa.select(deliveries).where(deliveries.c.subscriber_id == ids["gmail"])
            )
        }
    bounced = [r for r in rows.values() if r.message_id == GMAIL_MESSAGE_ID]
    assert [r.status for r in bounced] == ["bounced"]
    assert bounced[0].last_reply.startswith("5.1.1 550-5.1.1 The email account")
    assert rows[other].status == "sent"


# --- Maildir, mbox, single files -------------------------------------------------------------


ALL_ONCE = {"hard": 2, "soft": 1, "complaints": 2, "blocked": 1, "ignored": 5}
ALL_TWICE = {"duplicates": 6, "ignored": 5}


def sample_bytes() -> list[bytes]:
    return [(SAMPLES / name).read_bytes() for name in sorted(EXPECTED)]


def make_maildir(path: Path) -> Path:
    box = mailbox.Maildir(path, create=True)
    for index, raw in enumerate(sample_bytes()):
        key = box.add(raw)
        if index % 2:  # half of them already seen by a mail client: moved to cur/
            message = box[key]
            message.set_subdir("cur")
            message.add_flag("S")
            box[key] = message
    (path / "new" / ".hidden-editor-file").write_bytes(b"not a message")
    return path


def make_mbox(path: Path) -> Path:
    box = mailbox.mbox(path, create=True)
    for raw in sample_bytes():
        box.add(raw)
    box.flush()
    box.close()
    return path


def test_read_mailbox_reads_maildir_cur_and_new(tmp_path: Path) -> None:
    path = make_maildir(tmp_path / "Maildir")
    assert any((path / "cur").iterdir())
    assert any((path / "new").iterdir())
    read = list(read_mailbox(path))
    assert len(read) == len(EXPECTED)
    assert sorted(parse_report(raw) is None for raw in read).count(True) == 4


def test_read_mailbox_reads_mbox_and_single_files(tmp_path: Path) -> None:
    messages = list(read_mailbox(make_mbox(tmp_path / "bounces.mbox")))
    assert len(messages) == len(EXPECTED)
    reports = [parse_report(raw) for raw in messages]
    assert sum(r is not None for r in reports) == 7
    single = list(read_mailbox(SAMPLES / "arf-abuse.eml"))
    assert single == [(SAMPLES / "arf-abuse.eml").read_bytes()]


@pytest.mark.parametrize("kind", ["maildir", "mbox"])
def test_process_a_whole_mailbox_twice(engine: sa.Engine, tmp_path: Path, kind: str) -> None:
    ids = people(engine)
    path = make_maildir(tmp_path / "Maildir") if kind == "maildir" else make_mbox(tmp_path / "mb")
    first = process_path(engine, path, now=LATER, envelope_from=SENDER)
    assert counts(first) == ALL_ONCE
    assert first.total == len(EXPECTED)
    assert first.suppressed == 4
    statuses = {key: row(engine, sid).status for key, sid in ids.items()}
    assert statuses == {
        "hard": "bounced",
        "soft": "active",
        "delayed": "active",
        "complaint": "complained",
        "yahoo": "complained",
        "gmail": "bounced",
        "blocked": "active",
    }
    second = process_path(engine, path, now=LATER, envelope_from=SENDER)
    assert counts(second) == ALL_TWICE
    assert second.suppressed == 0
    assert "6 already processed" in str(second)


def test_reports_about_nobody_are_counted_unmatched(engine: sa.Engine, tmp_path: Path) -> None:
    make_subscriber(engine, email="bystander@example.org")
    summary = process_path(engine, make_maildir(tmp_path / "Maildir"), now=LATER)
    assert counts(summary) == {"unmatched": 6, "ignored": 5}
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(suppressions)) == 0
        kinds = set(conn.scalars(sa.select(events.c.kind)))
    assert kinds == {"subscribed"}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: tmp / "missing", "cannot be read"),
        (lambda tmp: tmp, "not a Maildir"),
        (lambda tmp: _dangling(tmp), "cannot be read"),
    ],
    ids=["missing path", "plain directory", "dangling symlink"],
)
def test_unreadable_paths_raise_a_clear_mailbox_error(
    engine: sa.Engine, tmp_path: Path, make: Any, message: str
) -> None:
    path = make(tmp_path)
    with pytest.raises(MailboxError, match=message) as caught:
        process_path(engine, path, now=LATER)
    assert isinstance(caught.value, MailerError)
    assert isinstance(caught.value, OSError)
    assert str(path) in str(caught.value)


def _dangling(tmp: Path) -> Path:
    link = tmp / "link"
    link.symlink_to(tmp / "nowhere")
    return link


# --- soft bounces: a count in a window -------------------------------------------------------


def test_soft_bounces_bounce_the_subscriber_at_the_limit_within_the_window(
    engine: sa.Engine,
) -> None:
    sub = make_subscriber(engine, email="full@example.com")
    reports = [
        dsn(report_id=f"<r{n}@mx>", message_id=f"<m{n}@news.example.org>", date=NOW)
        for n in range(3)
    ]
    first_two = apply_reports(engine, [parsed(r) for r in reports[:2]], now=LATER)
    assert counts(first_two) == {"soft": 2}
    assert row(engine, sub.id).status == "active"
    assert row(engine, sub.id).bounce_count == 2
    third = apply_reports(engine, [parsed(reports[2])], now=LATER)
    assert counts(third) == {"soft": 1}
    assert third.suppressed == 1
    assert row(engine, sub.id).status == "bounced"
    assert reason(engine, "full@example.com") == "bounced"


def test_soft_bounces_outside_the_window_do_not_count(engine: sa.Engine) -> None:
    sub = make_subscriber(engine, email="full@example.com")
    old = [
        parsed(dsn(report_id=f"<old{n}@mx>", message_id=f"<o{n}@x>", date=NOW - timedelta(days=40)))
        for n in range(5)
    ]
    recent = parsed(dsn(report_id="<new@mx>", message_id="<n@x>", date=NOW))
    summary = apply_reports(engine, [*old, recent], now=LATER, soft_window=timedelta(days=30))
    assert counts(summary) == {"soft": 6}
    assert row(engine, sub.id).status == "active"
    assert row(engine, sub.id).bounce_count == 6
    tighter = apply_reports(
        engine,
        [parsed(dsn(report_id="<new2@mx>", message_id="<n2@x>", date=NOW))],
        now=LATER,
        soft_limit=2,
    )
    assert tighter.suppressed == 1
    assert row(engine, sub.id).status == "bounced"


def test_two_reports_about_one_message_count_once(engine: sa.Engine) -> None:
    sub = make_subscriber(engine, email="full@example.com")
    same_message = [
        parsed(dsn(report_id=f"<r{n}@mx>", message_id="<one@news.example.org>")) for n in range(3)
    ]
    summary = apply_reports(engine, same_message, now=LATER)
    assert counts(summary) == {"soft": 1, "duplicates": 2}
    assert row(engine, sub.id).bounce_count == 1


def test_delayed_dsns_never_count(engine: sa.Engine) -> None:
    sub = make_subscriber(engine, email="full@example.com")
    delayed = [
        parsed(dsn(action="delayed", status="4.4.1", report_id=f"<d{n}@mx>", message_id=f"<{n}@x>"))
        for n in range(5)
    ]
    summary = apply_reports(engine, delayed, now=LATER, soft_limit=1)
    assert counts(summary) == {"ignored": 5}
    assert row(engine, sub.id).status == "active"
    assert events_of(engine, sub.id) == []


# --- statuses other than active --------------------------------------------------------------


def test_a_bounce_keeps_an_unsubscribed_status_but_suppresses_the_address(
    engine: sa.Engine,
) -> None:
    sub = make_subscriber(engine, email="gone@example.net", status="unsubscribed")
    apply_reports(engine, [parsed(dsn(status="5.1.1", recipient="gone@example.net"))], now=LATER)
    assert row(engine, sub.id).status == "unsubscribed"  # their choice is the record to keep
    assert reason(engine, "gone@example.net") == "bounced"


def test_a_complaint_after_a_bounce_marks_complained(engine: sa.Engine) -> None:
    ids = people(engine)
    process_path(engine, SAMPLES / "hard-5.1.1-postfix.eml", now=LATER)
    complaint = (SAMPLES / "arf-abuse.eml").read_bytes()
    complaint = complaint.replace(b"ComplaintUid0000000004", b"HardBounceUid000000001")
    summary = apply_reports(engine, [parsed(complaint)], now=LATER)
    assert counts(summary) == {"complaints": 1}
    assert summary.suppressed == 0  # already suppressed, as bounced
    assert row(engine, ids["hard"]).status == "complained"


def test_a_bounced_confirmation_email_is_found_by_its_message_id(engine: sa.Engine) -> None:
    sub = make_subscriber(engine, email="typo@exmaple.org", status="pending")
    with engine.begin() as conn:
        conn.execute(
            subscribers.update()
            .where(subscribers.c.id == sub.id)
            .values(confirmation_message_id="<confirm.1@news.example.org>")
        )
    report = dsn(
        status="5.1.2",
        recipient="someone-else@relay.example",
        message_id="<confirm.1@news.example.org>",
    )
    summary = apply_reports(engine, [parsed(report)], now=LATER)
    assert counts(summary) == {"hard": 1}
    assert row(engine, sub.id).status == "bounced"
    assert events_of(engine, sub.id)[0].detail["matched_by"] == "message-id"


def test_a_lower_cased_verp_address_still_finds_the_subscriber(engine: sa.Engine) -> None:
    sub = make_subscriber(engine, email="gone@example.net")
    set_uid(engine, sub.id, "MixedCaseUid_00000000A")
    report = dsn(
        status="5.1.1",
        recipient="other@example.com",
        to=f"bounces+{'mixedcaseuid_00000000a'}@news.example.org",
    )
    summary = apply_reports(engine, [parsed(report)], now=LATER)
    assert counts(summary) == {"hard": 1}
    assert row(engine, sub.id).status == "bounced"


# --- send-time refusals ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, reply, stage, outcome, status",
    [
        (550, "5.1.1 <a@example.org>: user unknown", "rcpt", BounceKind.HARD, "bounced"),
        (550, "5.7.1 Message rejected as spam", "data", BounceKind.BLOCKED, "active"),
        (553, "5.1.8 sender domain does not exist", "mail", BounceKind.BLOCKED, "active"),
        (552, "5.2.2 mailbox full", "rcpt", BounceKind.SOFT, "active"),
        (550, "no such user", "rcpt", BounceKind.HARD, "bounced"),
    ],
    ids=["user unknown", "spam filter", "sender refused", "mailbox full", "no enhanced code"],
)
def test_send_time_refusals_follow_the_same_table(
    engine: sa.Engine, code: int, reply: str, stage: str, outcome: BounceKind, status: str
) -> None:
    sub = make_subscriber(engine, email="a@example.org")
    for _ in range(2):  # the second call for the same message changes nothing
        with engine.begin() as conn:
            got = apply_send_bounce(
                conn,
                sub.id,
                code=code,
                reply=reply,
                stage=stage,
                message_id="<m1@news.example.org>",
                now=LATER,
            )
        assert got is outcome
    after = row(engine, sub.id)
    assert after.status == status
    assert after.bounce_count == (1 if outcome in (BounceKind.HARD, BounceKind.SOFT) else 0)
    assert len([e for e in events_of(engine, sub.id) if e.kind == "bounce"]) == 1


# --- pure parts ------------------------------------------------------------------------------


def parsed(raw: bytes) -> Report:
    report = parse_report(raw)
    assert report is not None
    return report


@pytest.mark.parametrize(
    "action, status, outcome",
    [
        ("failed", "5.1.1", BounceKind.HARD),
        ("failed", "5.1.10", BounceKind.HARD),
        ("failed", "5.0.0", BounceKind.HARD),
        ("failed", "5.2.1", BounceKind.HARD),
        ("failed", "5.4.4", BounceKind.HARD),
        ("failed", "5.7.13", BounceKind.HARD),
        ("Failed", "5.1.1 (bad destination mailbox address)", BounceKind.HARD),
        ("failed", "5.2.2", BounceKind.SOFT),
        ("failed", "5.4.7", BounceKind.SOFT),
        ("failed", "4.2.2", BounceKind.SOFT),
        ("failed", "", BounceKind.SOFT),
        ("failed", "5.7.1", BounceKind.BLOCKED),
        ("failed", "5.7.26", BounceKind.BLOCKED),
        ("failed", "5.6.0", BounceKind.BLOCKED),
        ("failed", "5.3.4", BounceKind.BLOCKED),
        ("failed", "5.1.8", BounceKind.BLOCKED),
        ("delayed", "4.4.1", BounceKind.DELAYED),
        ("delayed", "5.1.1", BounceKind.DELAYED),
        ("delivered", "2.0.0", BounceKind.DELIVERED),
        ("relayed", "2.0.0", BounceKind.DELIVERED),
        ("expanded", "2.0.0", BounceKind.DELIVERED),
        ("", "5.1.1", BounceKind.HARD),
        ("", "", BounceKind.IGNORED),
        ("bogus", "5.1.1", BounceKind.IGNORED),
    ],
)
def test_classification_table(action: str, status: str, outcome: BounceKind) -> None:
    assert classify(action, status) is outcome


def test_status_from_reply() -> None:
    assert status_from_reply(550, "5.1.1 user unknown") == "5.1.1"
    assert status_from_reply(550, "user unknown") == "5.0.0"
    assert status_from_reply(None, "451 later") == "4.0.0"
    assert status_from_reply(None, "connection lost") == ""


def test_verp_round_trip_and_limits() -> None:
    uid = "HardBounceUid000000001"
    assert verp_address(SENDER, uid) == f"bounces+{uid}@news.example.org"
    assert uid_from_verp(f"bounces+{uid}@news.example.org") == uid
    assert uid_from_verp(f"<bounces+{uid}@news.example.org>", envelope_from=SENDER) == uid
    assert uid_from_verp(f"Bounces+{uid}@NEWS.example.org", envelope_from=SENDER) == uid
    assert verp_address("bounces+news@news.example.org", uid).startswith("bounces+news+")
    assert uid_from_verp(verp_address("bounces+news@news.example.org", uid)) == uid
    assert uid_from_verp(f"someone+{uid}@elsewhere.example", envelope_from=SENDER) is None
    assert uid_from_verp("bounces@news.example.org") is None
    assert uid_from_verp("bounces+short@news.example.org") is None
    assert uid_from_verp("not an address") is None
    with pytest.raises(AddressError, match="not a subscriber uid"):
        verp_address(SENDER, "x")
    with pytest.raises(AddressError, match="local@domain"):
        verp_address("bounces", uid)
    with pytest.raises(AddressError, match="64 characters"):
        verp_address("b" * 42 + "@news.example.org", uid)


@pytest.mark.parametrize(
    "name, uid, drop",
    [
        ("arf-yahoo-redacted.eml", "YahooArfUid00000000005", (b"Return-Path:",)),
        (
            "hard-5.1.1-postfix.eml",
            "HardBounceUid000000001",
            (b"X-Original-To:", b"Delivered-To:", b"To:", b"Return-Path:"),
        ),
    ],
    ids=["ARF Original-Mail-From", "X-Postfix-Sender"],
)
def test_the_reported_envelope_sender_names_the_subscriber(
    name: str, uid: str, drop: tuple[bytes, ...]
) -> None:
    lines = (SAMPLES / name).read_bytes().split(b"\n")
    kept = b"\n".join(line for line in lines if not line.startswith(drop))
    report = parsed(kept.replace(b"List-Unsubscribe:", b"X-Dropped:"))
    assert report.verp_uids == (uid,)
    assert report.unsubscribe_uid is None


def test_dsn_with_several_recipients_is_decided_by_the_worst() -> None:
    raw = dsn(status="5.1.1").replace(
        b"Final-Recipient: rfc822; full@example.com",
        b"Final-Recipient: rfc822; fine@example.com\r\nAction: delivered\r\nStatus: 2.0.0\r\n"
        b"\r\nFinal-Recipient: rfc822; full@example.com",
    )
    report = parsed(raw)
    assert [r.action for r in report.recipients] == ["delivered", "failed"]
    assert report.outcome is BounceKind.HARD
    assert report.addresses == ("full@example.com",)


def test_base64_encoded_report_parts_are_read() -> None:
    import base64

    fields = b"Reporting-MTA: dns; mx\r\n\r\nFinal-Recipient: rfc822; a@example.com\r\n"
    fields += b"Action: failed\r\nStatus: 5.1.1\r\n"
    raw = (
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n'
        b"Message-ID: <b64@mx>\r\n\r\n--b\r\nContent-Type: message/delivery-status\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(fields).replace(b"\n", b"\r\n")
        + b"--b--\r\n"
    )
    report = parsed(raw)
    assert report.outcome is BounceKind.HARD
    assert report.addresses == ("a@example.com",)


# --- hostile input ---------------------------------------------------------------------------

FIELD_NAMES = st.sampled_from(
    [
        "Action",
        "Status",
        "Final-Recipient",
        "Original-Recipient",
        "Diagnostic-Code",
        "Feedback-Type",
        "Original-Rcpt-To",
        "Message-ID",
        "Return-Path",
        "List-Unsubscribe",
        "X",
    ]
)
VALUES = st.text(st.characters(codec="utf-8"), max_size=80) | st.sampled_from(
    ["rfc822; ", "failed", "5.1.1", "<a@b>", "abuse", "=?utf-8?q?=00?="]
)


@st.composite
def reports(draw: st.DrawFn) -> bytes:
    """A multipart/report skeleton with random fields, encodings and damage."""
    kind = draw(st.sampled_from(["delivery-status", "feedback-report", "x"]))
    part = "message/" + kind if kind != "x" else "text/plain"
    fields = draw(st.lists(st.tuples(FIELD_NAMES, VALUES), max_size=8))
    block = "".join(f"{name}: {value}\r\n" for name, value in fields)
    blank = draw(st.sampled_from(["\r\n", "\n", ""]))
    text = (
        f'Content-Type: multipart/report; report-type={kind}; boundary="b"\r\n'
        f"To: {draw(VALUES)}\r\nDate: {draw(VALUES)}\r\n\r\n"
        f"--b\r\nContent-Type: {part}\r\n"
        f"Content-Transfer-Encoding: {draw(st.sampled_from(['7bit', 'base64', 'x']))}\r\n\r\n"
        f"{block}{blank}{block}"
        f"--b\r\nContent-Type: {draw(st.sampled_from(_ORIGINALS))}\r\n\r\n{block}\r\n"
    )
    raw = text.encode("utf-8", "surrogateescape")
    cut = draw(st.integers(0, len(raw)))
    return raw[: cut if draw(st.booleans()) else len(raw)]


_ORIGINALS = ["message/rfc822", "text/rfc822-headers", "message/rfc822-headers", "text/plain"]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.one_of(st.binary(max_size=600), reports()))
def test_parse_report_never_raises(raw: bytes) -> None:
    report = parse_report(raw, envelope_from=SENDER)
    assert report is None or isinstance(report.outcome, BounceKind)


@settings(max_examples=40, deadline=None)
@given(raw=reports())
def test_hostile_reports_apply_cleanly_to_the_database(
    sqlite_engine: sa.Engine, raw: bytes
) -> None:
    report = parse_report(raw)
    if report is not None:
        apply_reports(sqlite_engine, [report], now=LATER)


@pytest.fixture(scope="module")
def sqlite_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sa.Engine]:
    """One SQLite database with a subscriber whom hostile reports could match (Hypothesis
    reuses it across examples)."""
    from mailer.db.engine import create_engine, migrate

    engine = create_engine(f"sqlite:///{tmp_path_factory.mktemp('hostile') / 'm.db'}")
    migrate(engine)
    sub = make_subscriber(engine, email="a@b.example")
    with engine.begin() as conn:
        conn.execute(subscribers.update().where(subscribers.c.id == sub.id).values(uid="A" * 22))
    yield engine
    engine.dispose()


def test_hostile_text_is_stored_safely_on_both_databases(engine: sa.Engine) -> None:
    sub = make_subscriber(engine, email="full@example.com")
    raw = dsn(status="5.1.1").replace(
        b"Diagnostic-Code: smtp; 452 5.1.1 try again",
        b"Diagnostic-Code: smtp; 550 5.1.1 \x00\x01 caf\xe9 \xff\xfe \xed\xa0\x80 '; DROP TABLE x",
    )
    summary = apply_reports(engine, [parsed(raw)], now=LATER)
    assert counts(summary) == {"hard": 1}
    diagnostic = events_of(engine, sub.id)[0].detail["diagnostic"]
    assert diagnostic.startswith("550 5.1.1")
    assert "\x00" not in diagnostic
    assert diagnostic.endswith("'; DROP TABLE x")
