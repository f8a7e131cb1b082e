"""The pipelined fast path: one mail transaction over aiosmtplib's transport, for less CPU.

``_Connection.send_one`` puts on the wire the bytes aiosmtplib's ``sendmail`` would, command for
command, but builds them with far less work and pipelines MAIL, RCPT and DATA (RFC 2920) when
the server offers it; ``_Replies`` reads the pipelined replies as aiosmtplib parses them.
Anything this path does not cover goes through aiosmtplib unchanged. tests/test_smtp_wire.py
holds it to aiosmtplib: transcripts, parser and helpers compared byte for byte.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable
from typing import Any, Literal

import aiosmtplib
from aiosmtplib.protocol import MAX_LINE_LENGTH, MAX_RESPONSE_LENGTH, SMTPProtocol
from aiosmtplib.typing import Default

from mailer.compose.wire import CrlfOnly, SmtpReady, is_crlf_only
from mailer.delivery.policy import Stage
from mailer.errors import DeliveryError
from mailer.text import is_plain_address

# Whether this message may go out: a lane's start, being written in the group commit while
# the envelope goes out (mailer.delivery.worker). Nothing of the message itself is sent
# before it says yes.
Gate = Awaitable[bool]


class StartRefused(DeliveryError):
    """The message's start was not written (another worker holds its delivery now): nothing of
    it was sent, and the connection, left in the middle of a transaction, is closed."""


class GateFailed(Exception):
    """The gate itself raised ``error``: carried past the handlers that turn an SMTP or network
    error into a result (``OSError`` among them), since the gate's error is not the relay's
    whatever its class: ``DatabaseUnavailable`` is a ``ConnectionError``. ``SmtpPool.send``
    raises ``error`` itself, as it was."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


async def _through(gate: Gate | None) -> None:
    """Wait for ``gate``; raise ``StartRefused`` if it says no, ``GateFailed`` if it raised."""
    if gate is None:
        return
    try:
        passed = await gate
    except Exception as exc:
        raise GateFailed(exc) from exc
    if not passed:
        raise StartRefused("the delivery's start was not written: not sent")


def data_payload(data: bytes) -> tuple[int, bytes] | None:
    """What aiosmtplib sends after DATA for ``data``, and its RFC 1870 SIZE; None if ``data``
    has a bare CR or LF (aiosmtplib's own path then normalizes it).

    For CRLF-only data aiosmtplib's line-ending pass changes nothing but a missing final CRLF,
    and its dot-stuffing pass (a "." at the start of a line gets one more, RFC 5321 §4.5.2)
    is one ``bytes.replace``: three quick passes instead of three regular expression passes.
    SIZE counts the message before dot-stuffing, as aiosmtplib does. A ``CrlfOnly`` message
    (the digest composer's) is not checked again, and a ``SmtpReady`` one has no dot to stuff.
    """
    if not isinstance(data, CrlfOnly) and not is_crlf_only(data):
        return None
    ready = isinstance(data, SmtpReady)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if ready:
        return len(data), data + b".\r\n"
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return len(data), stuffed + b".\r\n"


class _Replies(asyncio.Protocol):
    """Stands in for aiosmtplib's protocol on a connection during one mail transaction.

    aiosmtplib's protocol delivers one reply per command and drops data that arrives while no
    command waits, so it cannot read the replies of pipelined commands (RFC 2920), which may
    arrive together. This reader queues every complete reply, parsed as aiosmtplib parses them
    (tests/test_smtp_wire.py holds it to aiosmtplib's parser). ``_Connection.send_one`` swaps
    it in with ``transport.set_protocol`` (asyncio's public API) and back when the transaction
    ends; a lost connection is passed on to aiosmtplib's protocol so that the client knows.
    """

    def __init__(self, inner: asyncio.BaseProtocol, timeout: float | None) -> None:
        self.inner = inner
        self.timeout = timeout
        self.replies: collections.deque[aiosmtplib.SMTPResponse] = collections.deque()
        self.error: aiosmtplib.SMTPException | None = None
        self._buffer = b""
        self._waiter: asyncio.Future[None] | None = None
        self._since = 0.0  # loop time the current wait began
        self._timer: asyncio.TimerHandle | None = None  # one per transaction, re-armed

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data
        if len(buffer) > MAX_RESPONSE_LENGTH:
            self._fail(aiosmtplib.SMTPResponseException(-1, "Response too long"))
            return
        done = 0  # where the first incomplete reply starts
        scan = 0
        message = bytearray()
        while (end := buffer.find(b"\n", scan)) >= 0:
            line = buffer[scan : end + 1]
            scan = end + 1
            if len(line) > MAX_LINE_LENGTH:
                self._fail(aiosmtplib.SMTPResponseException(-1, "Response too long"))
                return
            try:
                code = int(line[:3])
            except ValueError:
                text = line.decode("utf-8", errors="ignore")
                self._fail(
                    aiosmtplib.SMTPResponseException(-1, f"Malformed SMTP response line: {text}")
                )
                return
            if message:  # exactly as aiosmtplib joins the lines of a reply
                message += b"\n"
            message += line[4:].strip(b" \t\r\n")
            if line[3:4] != b"-":  # the last line of a reply
                text = message.decode("utf-8", "surrogateescape")
                self.replies.append(aiosmtplib.SMTPResponse(code, text))
                message = bytearray()
                done = scan
        self._buffer = buffer[done:]
        if self.replies:
            self._wake()

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False  # let the transport close; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        error = aiosmtplib.SMTPServerDisconnected("Connection lost")
        error.__cause__ = exc
        self._fail(error)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def _fail(self, error: aiosmtplib.SMTPException) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _check_timeout(self) -> None:
        # One timer serves every wait of the transaction (a timer per reply cost as much as
        # parsing it): when it fires early for the current wait, it is set again for the rest.
        self._timer = None
        if self._waiter is None or self._waiter.done() or self.timeout is None:
            return
        loop = asyncio.get_running_loop()
        deadline = self._since + self.timeout
        if loop.time() >= deadline:
            self._fail(aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response"))
        else:
            self._timer = loop.call_at(deadline, self._check_timeout)

    def close(self) -> None:
        """The transaction is over: no timer may outlive it."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def next(self) -> aiosmtplib.SMTPResponse:
        """The next reply, in order; raises when the connection fails or ``timeout`` seconds
        pass without one."""
        if not self.replies and self.error is None:
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            self._since = loop.time()
            if self._timer is None and self.timeout:
                self._timer = loop.call_at(self._since + self.timeout, self._check_timeout)
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.replies:
            return self.replies.popleft()
        assert self.error is not None
        raise self.error


class _Connection(aiosmtplib.SMTP):
    """An aiosmtplib client that remembers how far the current transaction got.

    aiosmtplib's exceptions say which reply failed, but a dropped connection or a timeout does
    not say during which command; the stage decides whether a retry may duplicate a message.
    """

    stage: Stage = Stage.CONNECT

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lost = asyncio.Event()

    def _on_connection_lost(self, protocol: SMTPProtocol) -> None:
        # aiosmtplib's own hook for its protocol's connection_lost (private, stable since 2.0).
        # close() only starts closing: TLS still exchanges close_notify. Knowing when the
        # socket is really gone lets aclose() wait for it instead of leaving it to the garbage
        # collector when the event loop ends.
        self.lost.set()
        super()._on_connection_lost(protocol)

    async def execute_command(
        self,
        *args: bytes,
        timeout: float | Literal[Default.token] | None = Default.token,  # noqa: ASYNC109 (aiosmtplib's signature)
    ) -> aiosmtplib.SMTPResponse:
        verb = args[0].upper() if args else b""
        if verb == b"MAIL":
            self.stage = Stage.MAIL
        elif verb == b"RCPT":
            self.stage = Stage.RCPT
        return await super().execute_command(*args, timeout=timeout)

    async def data(
        self,
        message: str | bytes,
        /,
        *,
        timeout: float | Literal[Default.token] | None = Default.token,  # noqa: ASYNC109 (aiosmtplib's signature)
    ) -> aiosmtplib.SMTPResponse:
        """Send DATA and the message: aiosmtplib's own path, for what ``send_one`` leaves to it.

        aiosmtplib normalizes line endings and dot-stuffs every message with two regular
        expression passes (≈430 µs for 30 KB on the reference machine, DESIGN.md "Performance
        facts"); ``send_one`` does the same for CRLF-only messages with one ``bytes.replace``.
        """
        self.stage = Stage.DATA
        return await super().data(message, timeout=timeout)

    async def send_one(
        self,
        sender: str,
        recipient: str,
        data: bytes,
        options: list[str],
        gate: Gate | None = None,
    ) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
        """``sendmail(sender, [recipient], data, mail_options=options)``, for far less CPU.

        The one adaptation of aiosmtplib's sending path (DESIGN.md "Performance facts": its
        ``sendmail`` costs ≈880 µs of CPU per 30 KB message, more than building the message).
        The bytes on the wire are aiosmtplib's, command for command (tests/test_smtp_wire.py
        compares transcripts); what changes is how they are made:

        * the addresses go on the command line as given when they are plain dot-atoms, which
          ``quote_address`` would return unchanged, instead of being parsed four times;
        * the message, checked to use CRLF line endings only (the bytes we build do), is
          dot-stuffed with one ``bytes.replace`` instead of aiosmtplib's two regular
          expression passes, and SIZE is its length instead of a third pass;
        * when the server offers PIPELINING (RFC 2920), MAIL, RCPT and DATA go out in one
          write and their replies are read together (``_Replies``): two round trips per
          message instead of four. The message itself is sent only after the 354.

        ``gate``: the message goes out only once it says yes. On the pipelined path MAIL, RCPT
        and DATA go out first and the message waits after the 354, so that what the gate waits
        for (the group commit of the delivery's start) runs while the envelope is answered; a
        no closes the connection mid-transaction, which delivers nothing, and raises
        ``StartRefused``. Elsewhere the gate is waited for before anything is sent.

        Anything else (bare CR or LF in the message, an address that needs parsing, SMTPUTF8,
        a session without EHLO) goes through aiosmtplib's ``sendmail`` unchanged. Errors are
        aiosmtplib's: the same exception classes, the same RSET after a refusal, the client
        closed after a timeout, a lost connection or a 421 to MAIL or RCPT.
        """
        transport = self.transport
        if (
            transport is None
            or self.protocol is None
            or self.is_ehlo_or_helo_needed
            or not isinstance(transport, asyncio.WriteTransport)
            # A plain dot-atom address is what aiosmtplib's quote_address (email.utils.parseaddr,
            # ≈50 µs per call, four calls per message) returns unchanged inside "<" and ">":
            # tests/test_smtp_wire.py checks that claim. is_plain_address is one fullmatch.
            or not (sender == "" or is_plain_address(sender))
            or not is_plain_address(recipient)
            or not all(o.isascii() and o.isprintable() and " " not in o for o in options)
            or any(o.lower() == "smtputf8" for o in options)
        ):
            await _through(gate)
            return await self.sendmail(sender, [recipient], data, mail_options=options)
        payload = data_payload(data)
        if payload is None:
            await _through(gate)
            return await self.sendmail(sender, [recipient], data, mail_options=options)
        size, message = payload
        if self.supports_extension("size"):
            options = [f"size={size}", *options]
        mail = b" ".join([b"MAIL FROM:<" + sender.encode() + b">", *(o.encode() for o in options)])
        rcpt = b"RCPT TO:<" + recipient.encode() + b">"
        inner = transport.get_protocol()
        replies = _Replies(inner, self.timeout)
        transport.set_protocol(replies)
        try:
            try:
                reply = await self._exchange(
                    transport, replies, sender, recipient, mail, rcpt, message, gate
                )
            finally:
                replies.close()
                transport.set_protocol(inner)
        except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused) as exc:
            # As sendmail does: reset the envelope, and let the refusal speak for the attempt.
            with contextlib.suppress(ConnectionError, aiosmtplib.SMTPResponseException):
                await self.rset()
            raise exc
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
            # The session is out of step (a late reply may still come): never reuse it.
            self.close()
            raise
        return {}, reply.message

    async def _exchange(
        self,
        transport: asyncio.WriteTransport,
        replies: _Replies,
        sender: str,
        recipient: str,
        mail: bytes,
        rcpt: bytes,
        message: bytes,
        gate: Gate | None = None,
    ) -> aiosmtplib.SMTPResponse:
        """MAIL, RCPT, DATA and the message (once ``gate`` says yes); the final reply, or the
        first refusal raised."""
        pipelined = self.supports_extension("pipelining")
        self.stage = Stage.MAIL
        if pipelined:
            transport.write(mail + b"\r\n" + rcpt + b"\r\nDATA\r\n")
        else:
            transport.write(mail + b"\r\n")
        answer = await replies.next()
        if answer.code != 250:
            await self._refused(answer, replies, transport, pending=2 if pipelined else 0)
            raise aiosmtplib.SMTPSenderRefused(answer.code, answer.message, sender)
        self.stage = Stage.RCPT
        if not pipelined:
            transport.write(rcpt + b"\r\n")
        answer = await replies.next()
        if answer.code not in (250, 251):
            await self._refused(answer, replies, transport, pending=1 if pipelined else 0)
            refused = aiosmtplib.SMTPRecipientRefused(answer.code, answer.message, recipient)
            raise aiosmtplib.SMTPRecipientsRefused([refused])
        self.stage = Stage.DATA
        if not pipelined:
            transport.write(b"DATA\r\n")
        answer = await replies.next()
        if answer.code != 354:
            raise aiosmtplib.SMTPDataError(answer.code, answer.message)
        try:
            await _through(gate)
        except BaseException:
            # Mid-DATA there is no way back but to hang up: the server then drops the message.
            self.close()
            raise
        transport.write(message)
        answer = await replies.next()
        if answer.code != 250:
            raise aiosmtplib.SMTPDataError(answer.code, answer.message)
        return answer

    async def _refused(
        self,
        answer: aiosmtplib.SMTPResponse,
        replies: _Replies,
        transport: asyncio.WriteTransport,
        *,
        pending: int,
    ) -> None:
        """After a refused MAIL or RCPT: close on 421 as aiosmtplib does (RFC 5321 §3.8), else
        read the replies to the ``pending`` commands pipelined behind it, so that the session
        stays in step for the RSET. Should the server take DATA anyway (354 with no valid
        recipient), the empty message is ended with a lone dot (RFC 2920 §3.1)."""
        if answer.code == 421:
            self.close()
            return
        try:
            for _ in range(pending):
                last = await replies.next()
            if pending and last.code == 354:
                transport.write(b".\r\n")
                await replies.next()
        except aiosmtplib.SMTPException:
            self.close()  # the refusal is the answer; the session is no use any more
