"""The bytes on the wire: SmtpPool's fast transaction path against aiosmtplib's own sendmail.

``_Connection.send_one`` builds the commands and the dot-stuffed message itself and pipelines
MAIL, RCPT and DATA when the server offers PIPELINING. These tests record everything the
client sends to a small SMTP server and compare it, byte for byte, with what aiosmtplib's
``sendmail`` sends for the same messages; then check the pipelined replies, refusals, drops
and timeouts, and the helpers against aiosmtplib's own functions.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field, replace
from typing import Any

import aiosmtplib
import pytest
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import PERIOD_REGEX, SMTPProtocol, normalize_message_line_endings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.compose.wire import CrlfOnly, SmtpReady
from mailer.config.load import parse_settings
from mailer.delivery.pipeline import _Replies, data_payload
from mailer.delivery.policy import Outcome, SendResult, Stage
from mailer.delivery.pool import SmtpPool
from mailer.text import is_plain_address
from tests.factories import config_dict

SENDER = "bounces@news.example.org"
HOSTNAME = "client.test"
DROP = "DROP"  # a scripted action: close the connection instead of replying
HANG = "HANG"  # a scripted action: never reply


def message(n: int, body: bytes) -> bytes:
    return (
        b"From: Digest <digest@news.example.org>\r\n"
        b"To: <reader%d@example.org>\r\n"
        b"Subject: Digest %d\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"\r\n" % (n, n)
    ) + body


MESSAGES = [
    message(1, b"plain line\r\nanother\r\n"),
    message(2, b".leading dot\r\n..two dots\r\n.\r\nmiddle . dot\r\n.\r\n"),
    message(3, "caf\u00e9 \u2014 8-bit\r\n.\r\n".encode()),
    message(4, b"no final line break"),
    message(5, b"ends with a dot line\r\n."),
    b".starts with a dot\r\n\r\nbody\r\n",
    b"",
    message(6, b"x" * 70_000 + b"\r\n" + b".\r\n" * 100),  # larger than a socket write
]


@dataclass
class Connection:
    received: bytearray = field(default_factory=bytearray)
    chunks: list[bytes] = field(default_factory=list)  # as read from the socket
    messages: list[bytes] = field(default_factory=list)  # dot-stuffing undone


def unstuff(raw: bytes) -> bytes:
    return (raw[1:] if raw.startswith(b"..") else raw).replace(b"\r\n..", b"\r\n.")


class WireServer:
    """A minimal SMTP server on 127.0.0.1 that records every byte each client sends.

    ``extensions`` are advertised in EHLO. Replies are scripted per command (``"MAIL"``,
    ``"RCPT"``, ``"DATA"``, ``"END"`` for the end of the message): a reply line, DROP or HANG;
    otherwise it answers as Postfix does (503 to RCPT without MAIL, 554 to DATA without a
    valid recipient) and closes after a 421. ``together`` sends the replies to everything
    read at once in one write (as Postfix does for pipelined commands); otherwise each reply
    goes out alone, in pieces of five bytes.
    """

    def __init__(self, extensions: tuple[str, ...], *, together: bool = True) -> None:
        self.extensions = extensions
        self.together = together
        self.connections: list[Connection] = []
        self.scripts: dict[str, collections.deque[str]] = collections.defaultdict(collections.deque)
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._stop = asyncio.Event()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def __aenter__(self) -> WireServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._stop.set()
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    def _reply(self, verb: str, default: str) -> str:
        queue = self.scripts.get(verb)
        return queue.popleft() if queue else default

    async def _send(self, writer: asyncio.StreamWriter, replies: list[str]) -> None:
        if self.together:
            writer.write("".join(replies).encode())
            await writer.drain()
            return
        for reply in replies:
            data = reply.encode()
            for i in range(0, len(data), 5):  # in pieces: a reply may arrive split
                writer.write(data[i : i + 5])
                await writer.drain()
                await asyncio.sleep(0.001)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        conn = Connection()
        self.connections.append(conn)
        writer.write(b"220 wire.test ESMTP\r\n")
        buffer = b""
        in_data = mail_ok = rcpt_ok = False
        try:
            while chunk := await reader.read(65536):
                conn.received += chunk
                conn.chunks.append(chunk)
                buffer += chunk
                replies: list[str] = []
                action = ""
                while True:
                    if in_data:
                        if buffer.startswith(b".\r\n"):
                            raw, buffer = b"", buffer[3:]
                        elif (end := buffer.find(b"\r\n.\r\n")) >= 0:
                            raw, buffer = buffer[: end + 2], buffer[end + 5 :]
                        else:
                            break
                        in_data = mail_ok = rcpt_ok = False
                        reply = self._reply("END", "250 2.0.0 Ok: queued")
                        if reply.startswith("2"):
                            conn.messages.append(unstuff(raw))
                    else:
                        eol = buffer.find(b"\r\n")
                        if eol < 0:
                            break
                        line, buffer = buffer[:eol].decode(), buffer[eol + 2 :]
                        verb = line.split(" ", 1)[0].upper()
                        if verb == "EHLO":
                            lines = ["wire.test", *self.extensions]
                            reply = "".join(
                                f"250{'-' if i < len(lines) - 1 else ' '}{text}\r\n"
                                for i, text in enumerate(lines)
                            )
                        elif verb == "QUIT":
                            replies.append("221 2.0.0 Bye\r\n")
                            action = DROP
                            break
                        elif verb == "MAIL":
                            reply = self._reply("MAIL", "250 2.1.0 Ok")
                            mail_ok = reply.startswith("2")
                        elif verb == "RCPT":
                            default = "250 2.1.5 Ok" if mail_ok else "503 5.5.1 Need MAIL"
                            reply = self._reply("RCPT", default)
                            rcpt_ok = rcpt_ok or reply.startswith("2")
                        elif verb == "DATA":
                            default = "354 End data" if rcpt_ok else "554 5.5.1 No recipients"
                            reply = self._reply("DATA", default)
                            in_data = reply.startswith("354")
                        else:  # RSET, NOOP
                            mail_ok = rcpt_ok = False
                            reply = "250 2.0.0 Ok"
                    if reply in (DROP, HANG):
                        action = reply
                        break
                    replies.append(reply if reply.endswith("\r\n") else reply + "\r\n")
                    if reply.startswith("421"):
                        action = DROP
                        break
                await self._send(writer, replies)
                if action == DROP:
                    break
                if action == HANG:
                    await self._stop.wait()
        finally:
            writer.close()


def pool_for(server: WireServer, **overrides: Any) -> SmtpPool:
    base = parse_settings(config_dict(), env={}).smtp
    values: dict[str, Any] = {"host": "127.0.0.1", "port": server.port, "timeout": 5.0}
    values.update({"connections": 1, **overrides})
    return SmtpPool(replace(base, **values), local_hostname=HOSTNAME)


def options_for(extensions: tuple[str, ...], data: bytes) -> list[str]:
    """The MAIL options SmtpPool adds (8BITMIME for 8-bit data when offered)."""
    return ["BODY=8BITMIME"] if "8BITMIME" in extensions and not data.isascii() else []


EXTENSIONS = [
    pytest.param(("PIPELINING", "SIZE 10240000", "8BITMIME"), id="pipelining-size"),
    pytest.param(("PIPELINING", "8BITMIME"), id="pipelining"),
    pytest.param(("SIZE 10240000", "8BITMIME"), id="size"),
    pytest.param((), id="plain"),
]


@pytest.mark.parametrize("extensions", EXTENSIONS)
async def test_the_bytes_on_the_wire_are_aiosmtplibs(extensions: tuple[str, ...]) -> None:
    recipients = [f"reader{i}@example.org" for i in range(len(MESSAGES))]
    async with WireServer(extensions) as reference:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=reference.port, local_hostname=HOSTNAME, start_tls=False
        )
        async with client:
            for rcpt, data in zip(recipients, MESSAGES, strict=True):
                await client.sendmail(
                    SENDER, [rcpt], data, mail_options=options_for(extensions, data)
                )
    async with WireServer(extensions) as ours, pool_for(ours) as pool:
        for rcpt, data in zip(recipients, MESSAGES, strict=True):
            assert (await pool.send(SENDER, rcpt, data)).outcome is Outcome.SENT
    assert len(ours.connections) == len(reference.connections) == 1
    assert bytes(ours.connections[0].received) == bytes(reference.connections[0].received)
    # And the server got each message back exactly (a final CRLF added where it lacked one).
    expected = [normalize_message_line_endings(data) for data in MESSAGES]
    assert ours.connections[0].messages == expected


async def test_the_null_sender_and_an_address_that_needs_parsing_match_too() -> None:
    # A quoted local part, a comment, a domain literal: no dot-atom, so aiosmtplib parses
    # them (and drops the comment) on its own path, as before.
    cases = [
        ("", "reader@example.org"),
        (SENDER, '"odd"@example.org'),
        (SENDER, "a(comment)@example.org"),
        (SENDER, "x@[127.0.0.1]"),
    ]
    transcripts = []
    for use_pool in (False, True):
        async with WireServer(("PIPELINING", "SIZE 1000000")) as server:
            if use_pool:
                async with pool_for(server) as pool:
                    for sender, rcpt in cases:
                        await pool.send(sender, rcpt, MESSAGES[0])
            else:
                client = aiosmtplib.SMTP(
                    hostname="127.0.0.1", port=server.port, local_hostname=HOSTNAME
                )
                async with client:
                    for sender, rcpt in cases:
                        await client.sendmail(sender, [rcpt], MESSAGES[0])
            transcripts.append(bytes(server.connections[0].received))
    assert transcripts[0] == transcripts[1]
    assert b"MAIL FROM:<> size=" in transcripts[1]
    assert b"RCPT TO:<a@example.org>" in transcripts[1]


async def test_a_message_with_bare_line_feeds_goes_through_aiosmtplibs_normalization() -> None:
    data = b"Subject: bare\n\n.line one\rline two\n"
    transcripts = []
    for use_pool in (False, True):
        async with WireServer(("PIPELINING",)) as server:
            if use_pool:
                async with pool_for(server) as pool:
                    await pool.send(SENDER, "reader@example.org", data)
            else:
                client = aiosmtplib.SMTP(
                    hostname="127.0.0.1", port=server.port, local_hostname=HOSTNAME
                )
                async with client:
                    await client.sendmail(SENDER, ["reader@example.org"], data)
            transcripts.append(bytes(server.connections[0].received))
    assert transcripts[0] == transcripts[1]


@pytest.mark.parametrize("together", [True, False], ids=["replies-together", "replies-split"])
async def test_pipelined_commands_go_out_in_one_write_and_every_reply_is_read(
    together: bool,
) -> None:
    server = WireServer(("PIPELINING",), together=together)
    async with server, pool_for(server, connections=2) as pool:
        results = await asyncio.gather(
            *(pool.send(SENDER, f"r{i}@example.org", MESSAGES[i % 3]) for i in range(20))
        )
    assert {r.outcome for r in results} == {Outcome.SENT}
    for conn in server.connections:
        # Each transaction's envelope came in one write: MAIL, RCPT and DATA together.
        envelopes = [c for c in conn.chunks if b"MAIL FROM:" in c]
        assert len(envelopes) == len(conn.messages)
        assert all(c.endswith(b">\r\nDATA\r\n") and b"\r\nRCPT TO:<" in c for c in envelopes)
    assert sum(len(c.messages) for c in server.connections) == 20


REFUSALS = [
    pytest.param("MAIL", "451 4.3.0 Try again", Outcome.DEFERRED, Stage.MAIL, id="mail-4xx"),
    pytest.param("MAIL", "553 5.7.1 Sender not owned", Outcome.DEFERRED, Stage.MAIL, id="mail-5xx"),
    pytest.param("RCPT", "451 4.7.1 Greylisted", Outcome.DEFERRED, Stage.RCPT, id="rcpt-4xx"),
    pytest.param("RCPT", "550 5.1.1 No such user", Outcome.BOUNCED, Stage.RCPT, id="rcpt-5xx"),
    pytest.param("DATA", "554 5.5.1 No valid recipients", Outcome.BOUNCED, Stage.DATA, id="data"),
    pytest.param("END", "552 5.3.4 Message too big", Outcome.BOUNCED, Stage.DATA, id="end-5xx"),
    pytest.param("END", "452 4.3.1 Insufficient storage", Outcome.DEFERRED, Stage.DATA, id="end"),
]


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "lockstep"])
@pytest.mark.parametrize(("verb", "reply", "outcome", "stage"), REFUSALS)
async def test_refusals_are_classified_and_the_session_stays_in_step(
    pipelining: bool, verb: str, reply: str, outcome: Outcome, stage: Stage
) -> None:
    extensions = ("PIPELINING", "SIZE 1000000") if pipelining else ("SIZE 1000000",)
    async with WireServer(extensions) as server:
        server.scripts[verb].append(reply)
        async with pool_for(server) as pool:
            result = await pool.send(SENDER, "refused@example.org", MESSAGES[1])
            after = await pool.send(SENDER, "next@example.org", MESSAGES[2])
    assert result == SendResult(outcome, int(reply[:3]), reply[4:], stage)
    assert after.outcome is Outcome.SENT
    assert len(server.connections) == 1  # the refused transaction was reset, not abandoned
    assert server.connections[0].messages == [MESSAGES[2]]
    assert b"RSET\r\n" in server.connections[0].received


async def test_a_server_taking_data_after_refusing_the_recipient_gets_a_lone_dot() -> None:
    # RFC 2920 §3.1: a (broken) server that answers the pipelined DATA with 354 although it
    # refused every recipient gets the empty message, a lone dot, and nothing of ours.
    async with WireServer(("PIPELINING",)) as server:
        server.scripts["RCPT"].append("550 5.1.1 No such user")
        server.scripts["DATA"].append("354 go ahead anyway")
        async with pool_for(server) as pool:
            result = await pool.send(SENDER, "refused@example.org", MESSAGES[1])
            after = await pool.send(SENDER, "next@example.org", MESSAGES[2])
    assert result.outcome is Outcome.BOUNCED and result.stage is Stage.RCPT
    assert after.outcome is Outcome.SENT
    assert server.connections[0].messages == [b"", MESSAGES[2]]


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "lockstep"])
async def test_421_to_mail_closes_and_the_next_send_uses_a_new_connection(
    pipelining: bool,
) -> None:
    extensions = ("PIPELINING",) if pipelining else ()
    async with WireServer(extensions) as server, pool_for(server) as pool:
        first = await pool.send(SENDER, "a@example.org", MESSAGES[0])
        server.scripts["MAIL"].append("421 4.3.2 Shutting down")
        # A reused connection answering 421 to MAIL: retried once on a fresh one.
        second = await pool.send(SENDER, "b@example.org", MESSAGES[0])
    assert (first.outcome, second.outcome) == (Outcome.SENT, Outcome.SENT)
    assert len(server.connections) == 2


@pytest.mark.parametrize("verb", ["MAIL", "RCPT", "DATA", "END"])
async def test_a_dropped_connection_defers_at_the_stage_it_reached(verb: str) -> None:
    stages = {"MAIL": Stage.MAIL, "RCPT": Stage.RCPT, "DATA": Stage.DATA, "END": Stage.DATA}
    async with WireServer(("PIPELINING",)) as server, pool_for(server) as pool:
        server.scripts[verb].append(DROP)
        result = await pool.send(SENDER, "a@example.org", MESSAGES[0])  # fresh: no retry
        after = await pool.send(SENDER, "b@example.org", MESSAGES[0])
    assert result.outcome is Outcome.DEFERRED
    assert result.code is None
    assert result.stage is stages[verb]
    assert after.outcome is Outcome.SENT
    assert len(server.connections) == 2


async def test_a_server_that_stops_answering_defers_within_the_timeout() -> None:
    async with WireServer(("PIPELINING",)) as server:
        server.scripts["END"].append(HANG)
        async with pool_for(server, timeout=0.3) as pool:
            started = asyncio.get_running_loop().time()
            result = await pool.send(SENDER, "a@example.org", MESSAGES[0])
            waited = asyncio.get_running_loop().time() - started
            after = await pool.send(SENDER, "b@example.org", MESSAGES[0])
    assert result.outcome is Outcome.DEFERRED and result.stage is Stage.DATA
    assert "timed out" in result.reply
    assert 0.25 < waited < 3
    assert after.outcome is Outcome.SENT


# --- the helpers against aiosmtplib's own functions ------------------------------------------

_ATOM = st.text(
    alphabet="abcXYZ019!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=8
)  # every atext class
_LABEL = st.text(alphabet="abcXYZ019-", min_size=1, max_size=8)
PLAIN = st.builds(
    lambda local, domain: ".".join(local) + "@" + ".".join(domain),
    st.lists(_ATOM, min_size=1, max_size=3),
    st.lists(_LABEL, min_size=1, max_size=3),
)


@given(PLAIN)
def test_a_plain_address_is_what_aiosmtplib_would_put_on_the_command_line(address: str) -> None:
    assert is_plain_address(address)
    assert quote_address(address) == f"<{address}>"


@given(st.text(alphabet='ab.@"()<>,;:[]\\ -\u00e9', max_size=20))
def test_only_plain_addresses_skip_aiosmtplibs_parsing(address: str) -> None:
    if is_plain_address(address):
        assert quote_address(address) == f"<{address}>"


_LINE = st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@given(
    st.lists(st.one_of(_LINE, st.sampled_from([b".", b"..", b".x", b""])), max_size=12),
    st.booleans(),
)
def test_the_payload_is_aiosmtplibs_normalized_and_dot_stuffed_message(
    lines: list[bytes], final_crlf: bool
) -> None:
    data = b"\r\n".join(lines) + (b"\r\n" if final_crlf else b"")
    normalized = normalize_message_line_endings(data)
    assert data_payload(data) == (len(normalized), PERIOD_REGEX.sub(b"..", normalized) + b".\r\n")


@given(st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))))
def test_a_message_marked_crlf_only_gets_the_same_payload(lines: list[bytes]) -> None:
    data = b"\r\n".join(lines)
    assert data_payload(CrlfOnly(data)) == data_payload(data)


@given(st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))))
def test_a_message_marked_ready_gets_the_same_payload(lines: list[bytes]) -> None:
    data = b"\r\n".join(line.lstrip(b".") for line in lines)
    assert data_payload(SmtpReady(data)) == data_payload(data)


def test_the_ready_mark_is_what_skips_dot_stuffing() -> None:
    # Only a mark that lies shows the skip: unmarked, the dot is doubled.
    assert data_payload(b"a\r\n.b\r\n") == (7, b"a\r\n..b\r\n.\r\n")
    assert data_payload(SmtpReady(b"a\r\n.b\r\n")) == (7, b"a\r\n.b\r\n.\r\n")


def test_the_mark_is_what_skips_the_line_break_check() -> None:
    # Only a mark that lies shows the skip: unmarked, a bare LF goes to aiosmtplib's path.
    assert data_payload(b"a\nb\r\n") is None
    assert data_payload(CrlfOnly(b"a\nb\r\n")) is not None


@given(st.binary(max_size=40))
def test_data_with_a_bare_cr_or_lf_is_left_to_aiosmtplib(data: bytes) -> None:
    payload = data_payload(data)
    bare = data.replace(b"\r\n", b"").count(b"\r") + data.replace(b"\r\n", b"").count(b"\n")
    assert (payload is None) == (bare > 0)
    if payload is not None:
        normalized = normalize_message_line_endings(data)
        assert payload == (len(normalized), PERIOD_REGEX.sub(b"..", normalized) + b".\r\n")


_REPLY = st.tuples(
    st.integers(200, 599),
    st.lists(st.text(alphabet="abc XYZ.-0\u00e9", max_size=10), min_size=1, max_size=3),
)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_REPLY, min_size=1, max_size=4), st.data())
def test_replies_are_parsed_as_aiosmtplib_parses_them(
    replies: list[tuple[int, list[str]]], data: st.DataObject
) -> None:
    wire = b"".join(
        b"".join(
            b"%d%s%s\r\n" % (code, b"-" if i < len(lines) - 1 else b" ", line.encode())
            for i, line in enumerate(lines)
        )
        for code, lines in replies
    )
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=5)))
    loop = asyncio.new_event_loop()
    try:
        reader = _Replies(asyncio.BaseProtocol(), timeout=None)
        for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
            if end > start:
                reader.data_received(wire[start:end])
        expected = []
        for code, lines in replies:  # aiosmtplib's protocol, fed one reply at a time
            one = b"".join(
                b"%d%s%s\r\n" % (code, b"-" if i < len(lines) - 1 else b" ", line.encode())
                for i, line in enumerate(lines)
            )
            protocol = SMTPProtocol(loop=loop)
            protocol._buffer.extend(one)
            expected.append(protocol._read_response_from_buffer())
        assert list(reader.replies) == expected
    finally:
        loop.close()
