"""The capture sink: what a client sends lands on disk, byte for byte, as a parseable .eml."""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
from dataclasses import replace
from pathlib import Path

import aiosmtplib
import pytest

from mailer.config.load import parse_settings
from mailer.delivery.policy import Outcome
from mailer.delivery.pool import SmtpPool
from mailer.devtools.sink import Captured, Sink, SinkError, serve_forever
from tests.factories import config_dict

SENDER = "bounces@news.example.org"
MESSAGE = (
    b"From: Camp Lejeune & New River Updates <digest@news.example.org>\r\n"
    b"To: <reader@example.org>\r\n"
    b"Subject: =?utf-8?q?Weekly_digest_=E2=80=94_20_November?=\r\n"
    b"Message-ID: <abc.1@news.example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="b1"\r\n'
    b"\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b".A line that starts with a dot, and caf=C3=A9\r\n"
    b"..two dots\r\n"
    b"--b1\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b"<p>Hello</p>\r\n"
    b"--b1--\r\n"
)


async def send_via_pool(port: int, recipient: str) -> Outcome:
    settings = replace(parse_settings(config_dict(), env={}).smtp, port=port, timeout=5.0)
    async with SmtpPool(settings, local_hostname="client.test") as pool:
        return (await pool.send(SENDER, recipient, MESSAGE)).outcome


async def test_a_message_lands_as_an_identical_parseable_eml(tmp_path: Path) -> None:
    out = tmp_path / "mail"
    with Sink("127.0.0.1", 0, out) as sink:
        assert sink.port > 0
        assert await send_via_pool(sink.port, "reader@example.org") is Outcome.SENT
    [captured] = sink.messages
    assert captured.envelope_from == SENDER
    assert captured.rcpt_tos == ("reader@example.org",)
    assert captured.path.parent == out
    assert captured.path.name.endswith("-000001-reader@example.org.eml")
    assert captured.path.read_bytes() == MESSAGE  # CRLF kept, dot-stuffing undone
    parsed = email.message_from_bytes(captured.path.read_bytes(), policy=email.policy.default)
    assert parsed["Subject"] == "Weekly digest — 20 November"
    assert [part.get_content_type() for part in parsed.iter_parts()] == ["text/plain", "text/html"]
    assert list(out.iterdir()) == [captured.path]  # no partial files left behind


async def test_several_recipients_get_one_file_each_with_safe_names(tmp_path: Path) -> None:
    recipients = ["one@example.org", "o'brien/../x@example.org"]
    with Sink("127.0.0.1", 0, tmp_path) as sink:
        async with aiosmtplib.SMTP(
            hostname="127.0.0.1", port=sink.port, local_hostname="client.test", start_tls=False
        ) as client:
            refused, _ = await client.sendmail(SENDER, recipients, MESSAGE)
    assert refused == {}
    assert [c.rcpt_tos for c in sink.messages] == [tuple(recipients)] * 2
    names = sorted(c.path.name for c in sink.messages)
    assert names[0].endswith("-000001-one@example.org.eml")
    assert names[1].endswith("-000002-o_brien_.._x@example.org.eml")
    assert all(c.path.parent == tmp_path for c in sink.messages)
    assert all(c.path.read_bytes() == MESSAGE for c in sink.messages)


async def test_serve_forever_runs_in_the_loop_until_stopped(tmp_path: Path) -> None:
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    seen: list[Captured] = []
    server = asyncio.create_task(
        serve_forever(
            "127.0.0.1",
            0,
            tmp_path / "out",
            on_message=seen.append,
            on_ready=ready.set_result,
            stop=stop,
        )
    )
    port = await asyncio.wait_for(ready, 5)
    assert await send_via_pool(port, "reader@example.org") is Outcome.SENT
    stop.set()
    await asyncio.wait_for(server, 5)
    assert [c.path.read_bytes() for c in seen] == [MESSAGE]


def test_a_taken_port_is_a_sink_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        sink = Sink("127.0.0.1", taken.getsockname()[1], tmp_path)
        with pytest.raises(SinkError, match=r"cannot listen on 127\.0\.0\.1"):
            sink.start()
