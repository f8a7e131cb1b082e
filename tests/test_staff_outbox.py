"""The staff outbox on a real SMTP server: sent signed and transactional, retried while the
relay is down, refused addresses dropped, each row sent once by concurrent senders."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import dkim
import pytest
import sqlalchemy as sa

from mailer.compose.dkim import generate_keypair, signer_for
from mailer.config.settings import Settings
from mailer.db.engine import create_engine, writing
from mailer.db.schema import staff_mail
from mailer.staff import outbox
from mailer.staff.outbox import OutboxResult, deliver_due, enqueue
from mailer.staff.rounds import flush_outbox
from mailer.staff.transport import send_now
from tests.compliance import assert_compliant
from tests.factories import NOW, server_settings
from tests.smtp_server import FaultServer

pytest_plugins = ["tests.smtp_server"]

EDITOR = "editor@news.example.org"
DESK = "desk@news.example.org"


def queue(
    engine: sa.Engine,
    to: tuple[str, ...] = (EDITOR,),
    *,
    subject: str = "alert: the feed failed",
    html: str | None = None,
    now: datetime = NOW,
) -> int:
    with writing(engine) as conn:
        mail_id = enqueue(
            conn,
            kind="alert",
            cause="feed:x",
            to=to,
            subject=subject,
            text="It failed.\n",
            html=html,
            now=now,
        )
    assert mail_id is not None
    return mail_id


def row(engine: sa.Engine, mail_id: int) -> sa.Row[Any]:
    with engine.connect() as conn:
        return conn.execute(sa.select(staff_mail).where(staff_mail.c.id == mail_id)).one()


async def deliver(engine: sa.Engine, settings: Settings, now: datetime) -> OutboxResult:
    send = partial(send_now, settings, sign=signer_for(settings))
    return await deliver_due(engine, settings, now=now, send=send)


def stopped_server() -> FaultServer:
    """A server started and stopped: its port refuses connections, and a server can be started
    there again."""
    server = FaultServer().start()
    server.stop()
    return server


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR and r.name == "mailer.staff.outbox"
    ]


async def test_pending_mail_is_sent_signed_once_per_recipient_without_list_headers(
    engine: sa.Engine, db_url: str, smtp_server: FaultServer, tmp_path: Path
) -> None:
    key = tmp_path / "dkim.pem"
    record = generate_keypair(key)
    settings = server_settings(
        db_url,
        smtp_server,
        dkim={"domain": "news.example.org", "selector": "s1", "private_key_file": str(key)},
    )
    mail_id = queue(engine, (EDITOR, DESK), html="<p>It failed.</p>")
    later = queue(engine, now=NOW + timedelta(minutes=5))  # not due yet

    result = await deliver(engine, settings, NOW)

    assert (result.sent, result.deferred, result.failed) == (1, 0, 0)
    assert sorted(r.recipients for r in smtp_server.received) == [(DESK,), (EDITOR,)]
    received = smtp_server.received_for(EDITOR)[0]
    assert received.envelope_from == settings.envelope_from
    msg = assert_compliant(received.data, settings, list_mail=False)
    assert msg["List-Unsubscribe"] is None and msg["List-Id"] is None
    assert msg["Subject"] == "alert: the feed failed"
    assert msg["To"] == EDITOR
    dns = {b"s1._domainkey.news.example.org.": record.encode()}
    assert dkim.verify(received.data, dnsfunc=lambda name, timeout=5: dns.get(name), minkey=1024)
    sent = row(engine, mail_id)
    assert (sent.status, sent.sent_at, sent.attempts) == ("sent", NOW, 0)
    assert row(engine, later).status == "pending"
    # Sent is sent: nothing more goes out, until the next row is due.
    assert (await deliver(engine, settings, NOW + timedelta(minutes=1))).claimed == 0
    assert (await deliver(engine, settings, NOW + timedelta(minutes=5))).sent == 1
    assert len(smtp_server.received) == 3


async def test_a_relay_that_is_down_is_retried_with_backoff_and_sent_once_back(
    engine: sa.Engine, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = stopped_server()
    settings = server_settings(db_url, server)
    mail_id = queue(engine)

    with caplog.at_level(logging.ERROR):
        first = await deliver(engine, settings, NOW)
    assert (first.sent, first.deferred) == (0, 1)
    waiting = row(engine, mail_id)
    assert (waiting.status, waiting.attempts) == ("pending", 1)
    assert waiting.next_attempt_at == NOW + timedelta(minutes=1)
    assert "refused" in waiting.last_error.lower() or "connect" in waiting.last_error
    [line] = errors(caplog)
    assert EDITOR in line and "retried at 2026-11-20T12:01:00+00:00" in line

    # Not due before its time; then the wait doubles: 1, 2, 4 minutes ... at most an hour.
    assert (await deliver(engine, settings, NOW + timedelta(seconds=59))).claimed == 0
    moment = NOW + timedelta(minutes=1)
    waits = []
    for _ in range(8):
        assert (await deliver(engine, settings, moment)).deferred == 1
        after = row(engine, mail_id).next_attempt_at
        waits.append(int((after - moment).total_seconds() // 60))
        moment = after
    assert waits == [2, 4, 8, 16, 32, 60, 60, 60]

    again = FaultServer(port=server.port).start()
    try:
        assert (await deliver(engine, settings, moment)).sent == 1
        assert (await deliver(engine, settings, moment + timedelta(hours=2))).claimed == 0
    finally:
        again.stop()
    assert [r.recipients for r in again.received] == [(EDITOR,)]
    done = row(engine, mail_id)
    assert (done.status, done.attempts, done.sent_at) == ("sent", 9, moment)


async def test_a_421_greeting_defers_and_the_next_attempt_sends(
    engine: sa.Engine, db_url: str, smtp_server: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    settings = server_settings(db_url, smtp_server)
    mail_id = queue(engine)
    smtp_server.script_greeting(["421 4.3.2 Service not available, closing channel"])
    with caplog.at_level(logging.ERROR):
        assert (await deliver(engine, settings, NOW)).deferred == 1
    assert "421" in row(engine, mail_id).last_error
    assert len(errors(caplog)) == 1
    assert smtp_server.received == []
    assert (await deliver(engine, settings, NOW + timedelta(minutes=1))).sent == 1
    assert len(smtp_server.received_for(EDITOR)) == 1


async def test_a_recipient_deferred_is_retried_alone(
    engine: sa.Engine, db_url: str, smtp_server: FaultServer
) -> None:
    settings = server_settings(db_url, smtp_server)
    mail_id = queue(engine, (EDITOR, DESK))
    smtp_server.script(DESK, ["451 4.7.1 greylisted, try again later"])
    assert (await deliver(engine, settings, NOW)).deferred == 1
    assert row(engine, mail_id).recipients == DESK
    assert (await deliver(engine, settings, NOW + timedelta(minutes=1))).sent == 1
    assert len(smtp_server.received_for(EDITOR)) == 1  # not sent to again
    assert len(smtp_server.received_for(DESK)) == 1


async def test_a_permanently_refused_address_is_dropped_and_logged(
    engine: sa.Engine, db_url: str, smtp_server: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    settings = server_settings(db_url, smtp_server)
    both = queue(engine, (EDITOR, DESK))
    alone = queue(engine, (DESK,))
    smtp_server.script(DESK, ["550 5.1.1 no such user", "550 5.1.1 no such user"])
    with caplog.at_level(logging.ERROR):
        result = await deliver(engine, settings, NOW)
    assert (result.sent, result.failed, result.dropped) == (1, 1, 2)
    sent = row(engine, both)
    assert (sent.status, sent.recipients) == ("sent", EDITOR)
    assert row(engine, alone).status == "failed"
    lines = errors(caplog)
    refused = [line for line in lines if DESK in line]
    assert len(refused) == 2 and all("550 5.1.1 no such user" in line for line in refused)
    assert any("every recipient refused" in line for line in lines)
    # Nothing is retried.
    assert (await deliver(engine, settings, NOW + timedelta(hours=2))).claimed == 0


async def test_a_refused_login_defers_the_mail(
    engine: sa.Engine, db_url: str, make_smtp_server: Any
) -> None:
    server = make_smtp_server(users={"mailer": "secret"})  # we send no AUTH: 530 at MAIL
    settings = server_settings(db_url, server)
    mail_id = queue(engine)
    assert (await deliver(engine, settings, NOW)).deferred == 1
    waiting = row(engine, mail_id)
    assert waiting.status == "pending" and "530" in waiting.last_error


async def test_mail_not_sent_in_three_days_fails_loudly(
    engine: sa.Engine, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = server_settings(db_url, stopped_server())
    mail_id = queue(engine)
    almost = NOW + timedelta(days=3) - timedelta(seconds=1)
    assert (await deliver(engine, settings, almost)).deferred == 1
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert (await deliver(engine, settings, NOW + timedelta(days=3, hours=1))).failed == 1
    assert row(engine, mail_id).status == "failed"
    [line] = errors(caplog)
    assert "given up after 2 attempts" in line and EDITOR in line


async def test_two_senders_at_once_send_each_mail_once(
    db_url: str, smtp_server: FaultServer
) -> None:
    settings = server_settings(db_url, smtp_server)
    engines = [create_engine(db_url), create_engine(db_url)]
    try:
        ids = [queue(engines[0], (f"staff{n}@news.example.org",)) for n in range(6)]
        results = await asyncio.gather(*(deliver(e, settings, NOW) for e in engines))
        assert sum(r.sent for r in results) == 6
        assert sorted(r.recipients[0] for r in smtp_server.received) == sorted(
            f"staff{n}@news.example.org" for n in range(6)
        )
        assert {row(engines[0], i).status for i in ids} == {"sent"}
    finally:
        for engine in engines:
            engine.dispose()


async def test_a_claim_never_recorded_is_sent_again_when_its_lease_ends(
    engine: sa.Engine, db_url: str, smtp_server: FaultServer
) -> None:
    settings = server_settings(db_url, smtp_server)
    mail_id = queue(engine)
    assert [r.id for r in outbox._claim(engine, NOW)] == [mail_id]  # then the process died
    assert (await deliver(engine, settings, NOW + timedelta(minutes=9))).claimed == 0
    assert (await deliver(engine, settings, NOW + outbox.CLAIM_LEASE)).sent == 1
    assert len(smtp_server.received) == 1


def test_a_command_flushing_the_outbox_with_the_relay_down_logs_one_line_per_mail(
    engine: sa.Engine, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = server_settings(db_url, stopped_server())
    mail_id = queue(engine)
    with caplog.at_level(logging.ERROR):
        result = flush_outbox(engine, settings, now=NOW, sign=None)
    assert result is not None and result.deferred == 1
    assert len(errors(caplog)) == 1
    assert row(engine, mail_id).status == "pending"


async def test_a_message_that_cannot_be_signed_is_retried_counted_and_named(
    engine: sa.Engine, db_url: str, smtp_server: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    settings = server_settings(db_url, smtp_server)
    mail_id = queue(engine)

    def broken_key(data: bytes) -> bytes:
        raise ValueError("the DKIM key cannot sign")

    send = partial(send_now, settings, sign=broken_key)
    with caplog.at_level(logging.ERROR):
        await deliver_due(engine, settings, now=NOW, send=send)
    mail = row(engine, mail_id)
    assert mail.status == "pending" and mail.attempts == 1
    assert "the DKIM key cannot sign" in mail.last_error
    assert mail.next_attempt_at == NOW + outbox.retry_delay(1)
    assert any("the DKIM key cannot sign" in line for line in errors(caplog))
    assert smtp_server.received == []
