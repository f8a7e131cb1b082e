"""SmtpPool against a real SMTP server (aiosmtpd) with faults injected from the server side."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Generator
from dataclasses import replace
from typing import Any

import pytest

from mailer.config.load import parse_settings
from mailer.config.settings import SmtpSettings
from mailer.delivery.pipeline import StartRefused
from mailer.delivery.policy import Outcome, SendResult, Stage
from mailer.delivery.pool import PoolClosedError, SmtpAuthError, SmtpPool, SmtpUsageError
from tests.factories import config_dict
from tests.smtp_server import DROP, Action, Delay, FaultServer, TestCertificates

# The fixtures (smtp_server, make_smtp_server, test_certificates) live with the server helper;
# as a plugin they need no import that linters would see as unused or shadowed.
pytest_plugins = ["tests.smtp_server"]

SENDER = "bounces@news.example.org"
MakeServer = Callable[..., FaultServer]


def smtp_settings(server: FaultServer, **overrides: Any) -> SmtpSettings:
    """Valid settings from the config parser, pointed at the test server."""
    base = parse_settings(config_dict(), env={}).smtp
    values: dict[str, Any] = {"host": server.host, "port": server.port, "timeout": 5.0}
    values.update(overrides)
    return replace(base, **values)


def pool_for(server: FaultServer, tls_context: Any = None, **overrides: Any) -> SmtpPool:
    return SmtpPool(
        smtp_settings(server, **overrides), local_hostname="client.test", tls_context=tls_context
    )


def message(n: int, *, lines: int = 40) -> bytes:
    """A CRLF message whose body has lines starting with dots (dot-stuffing) and 8-bit text."""
    body = b"".join(
        b".leading dot %d\r\n" % i if i % 7 == 0 else b"line %d of message %d\r\n" % (i, n)
        for i in range(lines)
    )
    return (
        (
            b"From: Digest <digest@news.example.org>\r\n"
            b"To: <reader%d@example.org>\r\n"
            b"Subject: Digest %d\r\n"
            b"Message-ID: <%d@news.example.org>\r\n"
            b"MIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n"
            b"\r\n" % (n, n, n)
        )
        + body
        + "caf\u00e9 \u2014 .\r\n..\r\n.\r\n".encode()
    )


async def test_many_concurrent_messages_arrive_byte_exact_over_few_persistent_connections(
    smtp_server: FaultServer,
) -> None:
    messages = {f"reader{n}@example.org": message(n) for n in range(60)}
    async with pool_for(smtp_server, connections=3) as pool:
        results = await asyncio.gather(
            *(pool.send(SENDER, rcpt, data) for rcpt, data in messages.items())
        )
        assert pool.open_connections <= 3
    assert {r.outcome for r in results} == {Outcome.SENT}
    assert all(r.code == 250 for r in results)
    received = {r.recipients: r for r in smtp_server.received}
    assert len(received) == 60
    for rcpt, data in messages.items():
        assert received[(rcpt,)].data == data
        assert received[(rcpt,)].envelope_from == SENDER
    assert smtp_server.connections <= 3
    assert smtp_server.max_concurrent <= 3
    assert smtp_server.quits == smtp_server.connections  # closed with QUIT on exit


async def test_sequential_sends_reuse_one_connection(smtp_server: FaultServer) -> None:
    async with pool_for(smtp_server, connections=4) as pool:
        for n in range(5):
            assert (
                await pool.send(SENDER, f"r{n}@example.org", message(n))
            ).outcome is Outcome.SENT
    assert smtp_server.connections == 1


REPLY_CASES = [
    pytest.param("rcpt", "451 4.7.1 Greylisted, try later", Outcome.DEFERRED, 451, id="rcpt-4xx"),
    pytest.param("rcpt", "550 5.1.1 No such user", Outcome.BOUNCED, 550, id="rcpt-5xx"),
    pytest.param("data", "452 4.3.1 Insufficient storage", Outcome.DEFERRED, 452, id="data-4xx"),
    pytest.param("data", "554 5.7.1 Message rejected", Outcome.BOUNCED, 554, id="data-5xx"),
    pytest.param("mail", "451 4.3.0 Try again", Outcome.DEFERRED, 451, id="mail-4xx"),
    # A refused MAIL FROM is about us, never the subscriber: it defers even when permanent.
    pytest.param("mail", "553 5.7.1 Sender not owned", Outcome.DEFERRED, 553, id="mail-5xx"),
]


@pytest.mark.parametrize(("stage", "reply", "outcome", "code"), REPLY_CASES)
async def test_server_replies_are_classified_and_the_connection_stays_clean(
    smtp_server: FaultServer, stage: str, reply: str, outcome: Outcome, code: int
) -> None:
    address = SENDER if stage == "mail" else "refused@example.org"
    smtp_server.script(address, [reply], stage=stage)  # type: ignore[arg-type]
    async with pool_for(smtp_server, connections=1) as pool:
        result = await pool.send(SENDER, "refused@example.org", message(1))
        after = await pool.send(SENDER, "next@example.org", message(2))
    assert result == SendResult(outcome, code, reply[4:], Stage(stage))
    # The refused transaction was reset: the next message goes over the same session.
    assert after.outcome is Outcome.SENT
    assert smtp_server.connections == 1
    assert [r.recipients for r in smtp_server.received] == [("next@example.org",)]


async def test_multiline_and_long_replies_become_one_bounded_line(smtp_server: FaultServer) -> None:
    smtp_server.script("x@example.org", ["550-5.1.1 first line\r\n550 5.1.1 " + "y" * 2000])
    async with pool_for(smtp_server) as pool:
        result = await pool.send(SENDER, "x@example.org", message(1))
    assert result.outcome is Outcome.BOUNCED
    assert result.reply.startswith("5.1.1 first line 5.1.1 yyy")
    assert "\n" not in result.reply
    assert len(result.reply) <= 500


async def test_dropped_connection_defers_and_the_next_send_reconnects(
    smtp_server: FaultServer,
) -> None:
    smtp_server.script("dropped@example.org", [DROP], stage="data")
    async with pool_for(smtp_server, connections=1) as pool:
        dropped = await pool.send(SENDER, "dropped@example.org", message(1))
        after = await pool.send(SENDER, "after@example.org", message(2))
    assert dropped.outcome is Outcome.DEFERRED
    assert dropped.code is None
    assert dropped.stage is Stage.DATA
    assert "connection lost" in dropped.reply
    assert after.outcome is Outcome.SENT
    assert smtp_server.connections == 2


async def test_a_server_that_closes_after_each_message_costs_no_message(
    smtp_server: FaultServer,
) -> None:
    smtp_server.close_after(1)
    async with pool_for(smtp_server, connections=1) as pool:
        results = [await pool.send(SENDER, f"r{n}@example.org", message(n)) for n in range(4)]
    assert [r.outcome for r in results] == [Outcome.SENT] * 4
    assert smtp_server.connections == 4


async def test_421_to_mail_on_a_reused_connection_is_retried_on_a_new_one(
    smtp_server: FaultServer,
) -> None:
    smtp_server.close_after(2, reply="421 4.7.0 Too many messages on this connection")
    async with pool_for(smtp_server, connections=1) as pool:
        results = [await pool.send(SENDER, f"r{n}@example.org", message(n)) for n in range(5)]
    assert [r.outcome for r in results] == [Outcome.SENT] * 5
    assert smtp_server.connections == 3
    assert len(smtp_server.received) == 5


async def test_421_greeting_defers_and_the_next_send_connects(smtp_server: FaultServer) -> None:
    smtp_server.script_greeting(["421 4.3.2 Service shutting down"])
    async with pool_for(smtp_server) as pool:
        refused = await pool.send(SENDER, "a@example.org", message(1))
        after = await pool.send(SENDER, "a@example.org", message(1))
    assert refused == SendResult(
        Outcome.DEFERRED, 421, "4.3.2 Service shutting down", Stage.CONNECT
    )
    assert after.outcome is Outcome.SENT


async def test_a_5xx_greeting_defers_rather_than_bouncing(smtp_server: FaultServer) -> None:
    smtp_server.script_greeting(["554 5.7.1 Client host blocked"])
    async with pool_for(smtp_server) as pool:
        result = await pool.send(SENDER, "a@example.org", message(1))
    assert (result.outcome, result.code, result.stage) == (Outcome.DEFERRED, 554, Stage.CONNECT)


HANG_CASES = [
    pytest.param("greeting", Stage.CONNECT, id="greeting"),
    pytest.param("rcpt", Stage.RCPT, id="rcpt"),
    pytest.param("data", Stage.DATA, id="end-of-data"),
]


@pytest.mark.parametrize(("where", "stage"), HANG_CASES)
async def test_a_hanging_server_defers_within_the_timeout(
    smtp_server: FaultServer, where: str, stage: Stage
) -> None:
    hang: list[Action] = [Delay(30)]
    if where == "greeting":
        smtp_server.script_greeting(hang)
    else:
        smtp_server.script("slow@example.org", hang, stage=where)  # type: ignore[arg-type]
    async with pool_for(smtp_server, timeout=0.5) as pool:
        started = time.monotonic()
        result = await pool.send(SENDER, "slow@example.org", message(1))
        elapsed = time.monotonic() - started
        after = await pool.send(SENDER, "fine@example.org", message(2))
    assert (result.outcome, result.code, result.stage) == (Outcome.DEFERRED, None, stage)
    assert "timed out" in result.reply
    assert elapsed < 1.5
    assert after.outcome is Outcome.SENT


async def test_a_refused_connection_defers() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = replace(parse_settings(config_dict(), env={}).smtp, port=port, timeout=1.0)
    async with SmtpPool(settings, local_hostname="client.test") as pool:
        result = await pool.send(SENDER, "a@example.org", message(1))
    assert (result.outcome, result.code, result.stage) == (Outcome.DEFERRED, None, Stage.CONNECT)
    assert str(port) in result.reply


async def test_a_cancelled_send_does_not_leave_its_session_to_the_next_message(
    smtp_server: FaultServer,
) -> None:
    smtp_server.script("slow@example.org", [Delay(30)], stage="data")
    async with pool_for(smtp_server, connections=1) as pool:
        task = asyncio.create_task(pool.send(SENDER, "slow@example.org", message(1)))
        await asyncio.sleep(0.2)  # let it reach the end of DATA, where the server hangs
        assert smtp_server.connections == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        after = await pool.send(SENDER, "next@example.org", message(2))
    assert after.outcome is Outcome.SENT
    assert smtp_server.connections == 2


async def test_rate_limit_paces_the_whole_pool(smtp_server: FaultServer) -> None:
    def send_all(pool: SmtpPool, names: range) -> asyncio.Future[list[SendResult]]:
        return asyncio.gather(
            *(pool.send(SENDER, f"r{n}@example.org", message(n, lines=5)) for n in names)
        )

    async with pool_for(smtp_server, connections=4, rate_per_second=100) as pool:
        # Open the four connections first: a connect's latency would delay only the first
        # messages' arrival and make the measured rate look higher than the pacing.
        await send_all(pool, range(4))
        results = await send_all(pool, range(4, 54))
    assert {r.outcome for r in results} == {Outcome.SENT}
    assert smtp_server.connections == 4
    times = sorted(r.at for r in smtp_server.received[4:])
    rate = (len(times) - 1) / (times[-1] - times[0])
    # Never above the limit (+5% for timer jitter). How close to it a loaded machine gets is a
    # benchmark figure (bench/), not something a test can promise.
    assert rate <= 105


# -- TLS (COMPLIANCE.md 3.6: certificates are verified)


async def test_starttls_with_a_trusted_certificate_sends_encrypted(
    make_smtp_server: MakeServer, test_certificates: TestCertificates
) -> None:
    server = make_smtp_server(tls_context=test_certificates.server_context(), require_starttls=True)
    pool = pool_for(server, test_certificates.client_context(), security="starttls")
    async with pool:
        result = await pool.send(SENDER, "a@example.org", message(1))
    assert result.outcome is Outcome.SENT
    assert server.received[0].tls
    assert server.received[0].data == message(1)


async def test_starttls_with_an_untrusted_certificate_fails_verification(
    make_smtp_server: MakeServer, test_certificates: TestCertificates
) -> None:
    server = make_smtp_server(tls_context=test_certificates.server_context())
    async with pool_for(server, security="starttls") as pool:  # system trust store only
        result = await pool.send(SENDER, "a@example.org", message(1))
    assert (result.outcome, result.code, result.stage) == (Outcome.DEFERRED, None, Stage.CONNECT)
    assert "certificate verification failed" in result.reply
    assert server.received == []


async def test_starttls_required_but_not_offered_never_falls_back_to_plain_text(
    smtp_server: FaultServer,
) -> None:
    async with pool_for(smtp_server, security="starttls") as pool:
        result = await pool.send(SENDER, "a@example.org", message(1))
    assert (result.outcome, result.stage) == (Outcome.DEFERRED, Stage.CONNECT)
    assert "STARTTLS" in result.reply
    assert smtp_server.received == []


async def test_security_none_does_not_upgrade_opportunistically(
    make_smtp_server: MakeServer, test_certificates: TestCertificates
) -> None:
    # The server offers STARTTLS with a certificate nobody trusts: an opportunistic client
    # would either fail or (unverified) upgrade; "none" must do neither.
    server = make_smtp_server(tls_context=test_certificates.server_context())
    async with pool_for(server, security="none") as pool:
        result = await pool.send(SENDER, "a@example.org", message(1))
    assert result.outcome is Outcome.SENT
    assert not server.received[0].tls


async def test_implicit_tls_verifies_the_certificate(
    make_smtp_server: MakeServer, test_certificates: TestCertificates
) -> None:
    server = make_smtp_server(tls_context=test_certificates.server_context(), implicit_tls=True)
    async with pool_for(server, test_certificates.client_context(), security="tls") as pool:
        trusted = await pool.send(SENDER, "a@example.org", message(1))
    async with pool_for(server, security="tls") as pool:
        untrusted = await pool.send(SENDER, "b@example.org", message(2))
    assert trusted.outcome is Outcome.SENT
    assert server.received[0].tls
    assert (untrusted.outcome, untrusted.stage) == (Outcome.DEFERRED, Stage.CONNECT)
    assert "certificate verification failed" in untrusted.reply
    assert len(server.received) == 1


# -- AUTH


async def test_auth_plain_logs_in_before_sending(make_smtp_server: MakeServer) -> None:
    server = make_smtp_server(users={"alice": "s3cret"})
    async with pool_for(server, username="alice", password="s3cret") as pool:
        results = [await pool.send(SENDER, f"r{n}@example.org", message(n)) for n in range(3)]
    assert [r.outcome for r in results] == [Outcome.SENT] * 3
    assert [r.login for r in server.received] == ["alice"] * 3
    assert server.logins == ["PLAIN"]  # once: the connection persisted


async def test_rejected_credentials_raise_once_and_stop_the_pool_logging_in(
    make_smtp_server: MakeServer,
) -> None:
    server = make_smtp_server(users={"alice": "s3cret"})
    async with pool_for(server, username="alice", password="wrong") as pool:
        with pytest.raises(SmtpAuthError) as caught:
            await pool.send(SENDER, "a@example.org", message(1))
        connections = server.connections
        with pytest.raises(SmtpAuthError):
            await pool.send(SENDER, "b@example.org", message(2))
    assert caught.value.code == 535
    assert "[smtp].username" in str(caught.value)
    assert server.connections == connections  # no second login attempt
    assert server.received == []


async def test_a_server_demanding_auth_is_a_configuration_error_not_a_bounce(
    make_smtp_server: MakeServer,
) -> None:
    server = make_smtp_server(users={"alice": "s3cret"})
    async with pool_for(server) as pool:
        with pytest.raises(SmtpAuthError) as caught:
            await pool.send(SENDER, "a@example.org", message(1))
    assert caught.value.code == 530


# -- usage


@pytest.mark.parametrize(
    "recipient",
    [
        "",
        "no-at-sign",
        "a@example.org\r\nRCPT TO:<b@example.org>",
        "a b@example.org",
        "ü@example.org",
    ],
    ids=["empty", "no-at", "injection", "space", "non-ascii"],
)
async def test_malformed_recipients_are_usage_errors(
    smtp_server: FaultServer, recipient: str
) -> None:
    async with pool_for(smtp_server) as pool:
        with pytest.raises(SmtpUsageError):
            await pool.send(SENDER, recipient, message(1))
    assert smtp_server.connections == 0


async def test_null_reverse_path_is_allowed(smtp_server: FaultServer) -> None:
    async with pool_for(smtp_server) as pool:
        assert (await pool.send("", "a@example.org", message(1))).outcome is Outcome.SENT
    assert smtp_server.received[0].envelope_from == "<>"


async def test_sending_outside_the_context_manager_is_an_error(smtp_server: FaultServer) -> None:
    pool = pool_for(smtp_server)
    with pytest.raises(PoolClosedError):
        await pool.send(SENDER, "a@example.org", message(1))
    async with pool:
        pass
    with pytest.raises(PoolClosedError):
        await pool.send(SENDER, "a@example.org", message(1))


async def test_closing_waits_for_in_flight_sends_and_refuses_waiting_ones(
    smtp_server: FaultServer,
) -> None:
    smtp_server.script("slow@example.org", [Delay(0.3)], stage="data")
    pool = pool_for(smtp_server, connections=1)
    await pool.__aenter__()
    in_flight = asyncio.create_task(pool.send(SENDER, "slow@example.org", message(1)))
    await asyncio.sleep(0.1)
    waiting = asyncio.create_task(pool.send(SENDER, "later@example.org", message(2)))
    await asyncio.sleep(0)
    await pool.aclose()
    assert (await in_flight).outcome is Outcome.SENT
    with pytest.raises(PoolClosedError):
        await waiting
    assert smtp_server.quits == smtp_server.connections == 1


class Gate:
    """A send's gate that says when it was asked, and answers when the test says."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def __await__(self) -> Generator[Any, None, bool]:
        self.asked.set()
        return self.answer.__await__()


async def test_a_gated_message_goes_out_only_once_its_gate_says_yes(
    smtp_server: FaultServer,
) -> None:
    async with pool_for(smtp_server, connections=1) as pool:
        gate = Gate()
        sending = asyncio.create_task(pool.send(SENDER, "r1@example.org", message(1), gate=gate))
        # Asked after the server's 354: the envelope is through, the message not sent.
        await asyncio.wait_for(gate.asked.wait(), 5)
        assert not sending.done()
        assert smtp_server.received == []
        gate.answer.set_result(True)
        result = await asyncio.wait_for(sending, 5)
    assert result.outcome is Outcome.SENT
    assert [r.data for r in smtp_server.received] == [message(1)]


@pytest.mark.parametrize("refusal", ["no", "error"])
async def test_a_gate_that_says_no_or_fails_sends_nothing_and_hangs_up(
    smtp_server: FaultServer, refusal: str
) -> None:
    async with pool_for(smtp_server, connections=1) as pool:
        gate = Gate()
        sending = asyncio.create_task(pool.send(SENDER, "r1@example.org", message(1), gate=gate))
        await asyncio.wait_for(gate.asked.wait(), 5)
        if refusal == "no":
            gate.answer.set_result(False)
            with pytest.raises(StartRefused):
                await asyncio.wait_for(sending, 5)
        else:
            # A ConnectionError, as DatabaseUnavailable is: not to be taken for the relay's.
            driver = RuntimeError("server closed the connection unexpectedly")
            failure = ConnectionError("the database went away")
            failure.__cause__ = driver
            gate.answer.set_exception(failure)
            with pytest.raises(ConnectionError, match="the database went away") as raised:
                await asyncio.wait_for(sending, 5)
            # The gate's own error, as it was raised: its cause kept for the log.
            assert raised.value is failure and raised.value.__cause__ is driver
        # Mid-DATA the only way back is to hang up: the next message takes a new connection.
        after = await pool.send(SENDER, "r2@example.org", message(2))
    assert after.outcome is Outcome.SENT
    assert [r.recipients for r in smtp_server.received] == [("r2@example.org",)]
    assert smtp_server.connections == 2
