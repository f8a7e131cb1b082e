"""SMTP delivery: a pool of persistent aiosmtplib connections and what each reply means.

One recipient per message; the message bytes go out unchanged, through ``_Connection.send_one``
(aiosmtplib's ``sendmail``, the same bytes on the wire for far less CPU, pipelined). Every SMTP
reply and every network failure becomes a ``SendResult`` (sent, deferred or bounced); only
configuration and usage errors raise, as ``DeliveryError`` subclasses.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import socket
import ssl
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any, Literal, Protocol, Self

import aiosmtplib
from aiosmtplib.protocol import MAX_LINE_LENGTH, MAX_RESPONSE_LENGTH, SMTPProtocol
from aiosmtplib.typing import Default

from mailer.compose.wire import CrlfOnly, SmtpReady, is_crlf_only
from mailer.config import SmtpSettings
from mailer.db.outages import OutageLog
from mailer.errors import DeliveryError

log = logging.getLogger(__name__)

REPLY_LIMIT = 500
# Characters that cannot appear in a bare ASCII addr-spec on an SMTP command line: whitespace and
# controls would end the command or smuggle parameters, angle brackets would close the path.
_ADDRESS_FORBIDDEN = re.compile(r"[\x00-\x20\x7f<>]")
_HOSTNAME_FORBIDDEN = re.compile(r"[\x00-\x20\x7f]")
# "Authentication required" and "encryption required for the mechanism" (RFC 4954 §6): the
# server refuses us, not the recipient, whatever stage it says so at.
_AUTH_REQUIRED = frozenset({530, 538})


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


class SmtpUsageError(DeliveryError, ValueError):
    """``send`` was given something no server could be asked to take (a malformed address)."""


class PoolClosedError(DeliveryError, RuntimeError):
    """The pool is used outside its ``async with`` block."""


class SmtpAuthError(DeliveryError):
    """The server refused our login: a configuration error that no retry can fix.

    ``code`` and ``reply`` are the server's words (``code`` is None when the server offers no
    AUTH at all). Once raised, the pool raises it again for every send instead of logging in
    over and over, which would lock the account at many providers.
    """

    def __init__(self, message: str, *, code: int | None, reply: str) -> None:
        self.code = code
        self.reply = reply
        super().__init__(message)


class SharedSchedule(Protocol):
    """A ``multiprocessing.Value("d")``: the next free slot, shared by processes."""

    value: float

    def get_lock(self) -> AbstractContextManager[Any]: ...


# The schedule every RateLimiter of this process reserves its slots from, when several
# processes send together (mailer.delivery.processes); None: each limiter keeps its own.
_shared_schedule: SharedSchedule | None = None


def share_schedule(schedule: SharedSchedule | None) -> None:
    """Make this process's rate limiters take their slots from ``schedule``."""
    global _shared_schedule
    _shared_schedule = schedule


class RateLimiter:
    """Lets at most ``rate_per_second`` callers through per second, across all tasks sharing it.

    Pacing rather than a bucket: each caller reserves the next free slot of a schedule kept in
    absolute monotonic time, so a late wake-up never accumulates into drift and no burst
    exceeds the rate. A caller that comes after its slot has passed is let through at once
    (the schedule restarts from now; there is no catching up). 0 means unlimited. With a
    shared schedule (``share_schedule``) the slots are those of every sending process: the
    clock is the system's monotonic clock, the same in each of them.
    """

    def __init__(self, rate_per_second: float) -> None:
        if rate_per_second < 0:
            raise ValueError(f"rate_per_second must be >= 0, got {rate_per_second}")
        self._interval = 1.0 / rate_per_second if rate_per_second else 0.0
        self._next = 0.0
        self._shared = _shared_schedule

    async def acquire(self) -> None:
        """Wait for this caller's slot."""
        if not self._interval:
            return
        now = time.monotonic()
        if self._shared is None:
            slot = max(now, self._next)
            self._next = slot + self._interval
        else:
            with self._shared.get_lock():
                slot = max(now, self._shared.value)
                self._shared.value = slot + self._interval
        if slot > now:
            await asyncio.sleep(slot - now)


# An addr-spec made of dot-atoms only (RFC 5321 §4.1.2 Dot-string, ASCII domain labels): for
# these, aiosmtplib's quote_address (email.utils.parseaddr, ≈50 µs per call, four calls per
# message) returns "<" + address + ">" unchanged; tests/test_smtp_wire.py checks that claim.
_ATEXT = r"[-A-Za-z0-9!#$%&'*+/=?^_`{|}~]+"
_PLAIN_ADDRESS = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")


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
        self, sender: str, recipient: str, data: bytes, options: list[str]
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
            or not (sender == "" or _PLAIN_ADDRESS.fullmatch(sender))
            or not _PLAIN_ADDRESS.fullmatch(recipient)
            or not all(o.isascii() and o.isprintable() and " " not in o for o in options)
            or any(o.lower() == "smtputf8" for o in options)
        ):
            return await self.sendmail(sender, [recipient], data, mail_options=options)
        payload = data_payload(data)
        if payload is None:
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
                    transport, replies, sender, recipient, mail, rcpt, message
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
    ) -> aiosmtplib.SMTPResponse:
        """MAIL, RCPT, DATA and the message; the final reply, or the first refusal raised."""
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


@dataclass
class _Slot:
    """One of the pool's ``connections`` places; holds a client while it is connected."""

    client: _Connection | None = None


class SmtpPool:
    """Up to ``settings.connections`` persistent SMTP connections, shared by concurrent senders.

    Use as ``async with SmtpPool(settings) as pool: await pool.send(...)``. Connections open on
    first use, are reused message after message, are replaced when the server drops them or
    answers 421, and are closed with QUIT when the block ends. Each in-flight ``send`` uses one
    connection exclusively; senders beyond ``connections`` wait for a free one.

    ``security``: ``tls`` is implicit TLS, ``starttls`` requires STARTTLS (a server that does not
    offer it is a failure, never a fallback to plain text), both verify the server's certificate
    and host name against ``tls_context`` (default: ``ssl.create_default_context()``, the system
    trust store; COMPLIANCE.md 3.6). ``none`` is plain text and never upgrades opportunistically
    with an unverified context. ``local_hostname`` is the EHLO name (default: this host's FQDN).
    """

    def __init__(
        self,
        settings: SmtpSettings,
        *,
        local_hostname: str | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        if settings.security not in ("none", "starttls", "tls"):
            raise SmtpUsageError(
                f"[smtp].security must be none, starttls or tls, got {settings.security!r}"
            )
        if settings.connections < 1:
            raise SmtpUsageError(
                f"[smtp].connections must be at least 1, got {settings.connections}"
            )
        if local_hostname is not None and (
            not local_hostname or _HOSTNAME_FORBIDDEN.search(local_hostname)
        ):
            raise SmtpUsageError(f"local_hostname {local_hostname!r} is not a host name")
        self.settings = settings
        self._local_hostname = local_hostname
        self._tls_context: ssl.SSLContext | None = None
        if settings.security != "none":
            # Never context=None: aiosmtplib would build its own, and the stdlib's default for
            # smtplib does not verify certificates at all (COMPLIANCE.md 3.6).
            self._tls_context = tls_context or ssl.create_default_context()
        self._limiter = RateLimiter(settings.rate_per_second)
        self._slots = [_Slot() for _ in range(settings.connections)]
        # Last in, first out: the connection used last is the one most likely still open, and
        # a light load keeps reusing one connection instead of opening all of them in turn.
        self._idle: asyncio.LifoQueue[_Slot] = asyncio.LifoQueue()
        for slot in self._slots:
            self._idle.put_nowait(slot)
        self._state: Literal["new", "open", "closed"] = "new"
        self._fatal: SmtpAuthError | None = None
        self._closing: set[_Connection] = set()  # discarded, their sockets not yet closed
        # A relay that refuses connections defers every message (the ledger retries them): its
        # outage is logged once when it starts and once when a connection opens again.
        self.outage = OutageLog(
            f"the SMTP relay at {settings.host}:{settings.port}",
            meanwhile="deliveries are deferred until it answers",
        )

    @property
    def open_connections(self) -> int:
        """How many connections are currently established."""
        return sum(1 for s in self._slots if s.client is not None and s.client.is_connected)

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise PoolClosedError("an SmtpPool can be opened only once")
        if self._local_hostname is None:
            self._local_hostname = await _local_fqdn(self.settings.timeout)
        self._state = "open"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Wait for in-flight sends (each step is bounded by the timeout), then QUIT every
        connection. Sends waiting for a connection get ``PoolClosedError``."""
        if self._state == "closed":
            return
        self._state = "closed"
        slots = [await self._idle.get() for _ in self._slots]
        await asyncio.gather(*(self._quit(slot) for slot in slots))
        await self._closed()
        for slot in slots:
            self._idle.put_nowait(slot)

    async def send(self, envelope_from: str, recipient: str, data: bytes) -> SendResult:
        """Hand one message for one recipient to the server; never raises for an SMTP answer.

        ``data`` is the complete message with CRLF line endings, sent as is (aiosmtplib only
        dot-stuffs it and would turn a lone CR or LF into CRLF). ``envelope_from`` may be empty
        (the null reverse-path). Raises ``SmtpUsageError`` for a malformed address,
        ``PoolClosedError`` outside ``async with`` and ``SmtpAuthError`` when the server refuses
        our credentials; everything the server or the network does becomes a ``SendResult``.
        """
        _check_address(envelope_from, "envelope sender", allow_empty=True)
        _check_address(recipient, "recipient", allow_empty=False)
        self._check_usable()
        slot = await self._idle.get()
        try:
            self._check_usable()  # closed, or the login refused, while this send waited
        except DeliveryError:
            self._idle.put_nowait(slot)  # the connection itself is fine: aclose() QUITs it
            raise
        try:
            return await self._send_on(slot, envelope_from, recipient, data)
        except BaseException:
            # Cancelled or failed mid-transaction: the session's state is unknown, so the next
            # message must not inherit it.
            self._discard(slot)
            raise
        finally:
            self._idle.put_nowait(slot)

    async def probe(self) -> SendResult | None:
        """Open one connection as a send would (connect, TLS, EHLO, AUTH where set) and leave
        it for ``aclose`` to QUIT: None when the relay answered, else the DEFERRED result
        saying why. Raises ``SmtpAuthError`` when the server refuses the login."""
        self._check_usable()
        slot = await self._idle.get()
        try:
            # Not logged: the caller reports the failure itself, once.
            opened = await self._open(log_failure=False)
            if isinstance(opened, SendResult):
                return opened
            slot.client = opened
            return None
        finally:
            self._idle.put_nowait(slot)

    def _check_usable(self) -> None:
        if (fatal := self._fatal) is not None:
            # A fresh exception each time: re-raising one instance would grow its traceback.
            raise SmtpAuthError(str(fatal), code=fatal.code, reply=fatal.reply)
        if self._state != "open":
            raise PoolClosedError("SmtpPool.send called outside `async with SmtpPool(...)`")

    async def _send_on(
        self, slot: _Slot, envelope_from: str, recipient: str, data: bytes
    ) -> SendResult:
        await self._limiter.acquire()
        for attempt in (1, 2):
            fresh = slot.client is None or not slot.client.is_connected
            if fresh:
                self._discard(slot)  # closed by the server while idle, after a 421 or a timeout
                opened = await self._open()
                if isinstance(opened, SendResult):
                    return opened
                slot.client = opened
            assert slot.client is not None
            result, retry = await self._transaction(slot.client, envelope_from, recipient, data)
            if not retry or fresh or attempt == 2:
                return result
            # A reused connection that the server had already closed (or answers MAIL with 421)
            # fails before anything was accepted: one retry on a fresh connection is safe.
            log.info(
                "reused SMTP connection unusable, retrying on a new one",
                extra={"reply": result.reply, "code": result.code},
            )
            self._discard(slot)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _open(self, *, log_failure: bool = True) -> _Connection | SendResult:
        """Connect, secure, greet and log in; a failure is a DEFERRED result for this message."""
        s = self.settings
        client = _Connection(
            hostname=s.host,
            port=s.port,
            local_hostname=self._local_hostname,
            timeout=s.timeout,
            use_tls=s.security == "tls",
            # False, not None, for "none": None would STARTTLS whenever the server offers it.
            start_tls=s.security == "starttls",
            tls_context=self._tls_context,
        )
        try:
            await client.connect()
            if client.is_ehlo_or_helo_needed:
                await _greet(client)
            if s.username:
                await self._login(client, s.username, s.password or "")
        except SmtpAuthError:
            client.close()
            raise
        except (aiosmtplib.SMTPException, OSError) as exc:  # OSError covers ssl.SSLError
            client.close()
            result = _failure(exc, Stage.CONNECT)
            if log_failure:
                # One ERROR when the outage starts, DEBUG for each failure while it lasts: a
                # WARNING per message would repeat the outage once per deferred delivery.
                self.outage.failed(f"{result.code} {result.reply}" if result.code else result.reply)
            return result
        except ValueError as exc:
            client.close()
            raise SmtpUsageError(f"cannot connect to {s.host}:{s.port}: {exc}") from exc
        log.debug("SMTP connection opened", extra={"host": s.host, "port": s.port})
        self.outage.recovered()
        return client

    async def _login(self, client: _Connection, username: str, password: str) -> None:
        try:
            await client.login(username, password)
        except aiosmtplib.SMTPAuthenticationError as exc:
            if 400 <= exc.code < 500:
                raise  # a temporary failure (454): deferred like any other
            self._fatal = SmtpAuthError(
                f"the SMTP server refused the login for {username!r}: {exc.code} "
                f"{_one_line(exc.message)} (check [smtp].username and the password "
                "in the variable named by [smtp].password_env)",
                code=exc.code,
                reply=_one_line(exc.message),
            )
            raise self._fatal from exc
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
            raise
        except aiosmtplib.SMTPException as exc:
            # aiosmtplib raises a bare SMTPException when the server offers no AUTH (or none
            # we speak): no retry fixes that either.
            self._fatal = SmtpAuthError(
                f"cannot log in to the SMTP server as {username!r}: {exc.message} "
                "(set [smtp].security, or remove [smtp].username)",
                code=None,
                reply=_one_line(exc.message),
            )
            raise self._fatal from exc

    async def _transaction(
        self, client: _Connection, envelope_from: str, recipient: str, data: bytes
    ) -> tuple[SendResult, bool]:
        """One MAIL/RCPT/DATA transaction; returns the result and whether a retry is safe."""
        client.stage = Stage.MAIL
        options: list[str] = []
        if client.supports_extension("8bitmime") and not data.isascii():
            options.append("BODY=8BITMIME")
        try:
            refused, reply = await client.send_one(envelope_from, recipient, data, options)
        except (aiosmtplib.SMTPException, OSError) as exc:
            stage = client.stage
            result = _failure(exc, stage)
            retry = stage in (Stage.MAIL, Stage.RCPT) and (
                isinstance(exc, aiosmtplib.SMTPServerDisconnected)
                or (stage is Stage.MAIL and result.code == 421)
            )
        except ValueError as exc:
            # aiosmtplib refuses an address or option it cannot send safely; the addresses
            # were checked already, so this is the caller's data, not the server's answer.
            raise SmtpUsageError(f"cannot send to {recipient!r}: {exc}") from exc
        else:
            if not refused:
                return SendResult(Outcome.SENT, 250, _one_line(reply), Stage.DATA), False
            # sendmail reports refused recipients as data when another one was accepted; with
            # one recipient per message that cannot happen, but a refusal is never a success.
            answer = refused.get(recipient) or next(iter(refused.values()))
            result, retry = _from_reply(answer.code, answer.message, Stage.RCPT), False
        if result.code in _AUTH_REQUIRED:
            self._fatal = SmtpAuthError(
                f"the SMTP server demands what we did not do: {result.code} {result.reply} "
                "(set [smtp].username and [smtp].password_env, or [smtp].security)",
                code=result.code,
                reply=result.reply,
            )
            raise self._fatal
        if client.is_connected:
            await _reset(client)
        return result, retry

    def _discard(self, slot: _Slot) -> None:
        """Drop a slot's connection without QUIT: its session state is unknown or gone."""
        client, slot.client = slot.client, None
        if client is None:
            return
        client.close()
        self._closing = {c for c in self._closing if not c.lost.is_set()}
        if not client.lost.is_set():
            self._closing.add(client)

    async def _quit(self, slot: _Slot) -> None:
        client = slot.client
        if client is not None and client.is_connected:
            # The server may have gone or answer oddly: we are closing the connection regardless.
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await client.quit(timeout=self.settings.timeout)
        self._discard(slot)

    async def _closed(self) -> None:
        """Wait (bounded by the timeout) until every discarded connection's socket is closed."""
        waits = [c.lost.wait() for c in self._closing if not c.lost.is_set()]
        self._closing.clear()
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), self.settings.timeout)


async def _greet(client: _Connection) -> None:
    """EHLO now rather than inside sendmail, so that its failure counts as a connect failure."""
    try:
        await client.ehlo()
    except aiosmtplib.SMTPHeloError:
        if not client.is_connected:
            raise
        await client.helo()


async def _reset(client: _Connection) -> None:
    """Leave the session clean for the next message, or close it.

    sendmail sends RSET after a refusal but ignores whether it worked; a second, checked RSET
    is the only way to know. Failures are rare, so the extra round trip costs nothing.
    """
    try:
        await client.rset()
    except (aiosmtplib.SMTPException, OSError):
        client.close()


async def _local_fqdn(seconds: float) -> str:
    """This host's FQDN for EHLO, looked up once per pool (aiosmtplib would ask on every
    connect, with no bound on how long a slow resolver takes)."""
    try:
        name = await asyncio.wait_for(asyncio.to_thread(socket.getfqdn), seconds)
    except TimeoutError:
        name = socket.gethostname()
    name = name.strip()
    if not name or _HOSTNAME_FORBIDDEN.search(name) or not name.isascii():
        return "localhost"
    return name


def _check_address(address: str, what: str, *, allow_empty: bool) -> None:
    if not address and allow_empty:
        return
    local, _, domain = address.rpartition("@")
    if not (local and domain) or not address.isascii() or _ADDRESS_FORBIDDEN.search(address):
        raise SmtpUsageError(f"{what} {address!r} is not a plain ASCII address (local@domain)")


def _from_reply(code: int, message: str, stage: Stage) -> SendResult:
    """Classify an SMTP error reply: a 5xx to RCPT or DATA bounces, anything else defers.

    Only RCPT and DATA answers can be about this recipient or this message. A refusal during
    the connect (greeting, EHLO, STARTTLS) or of MAIL FROM (our sender, our session, the size
    we announced) says nothing about the subscriber, so it defers even when permanent: a
    misconfigured sender must never get a whole list suppressed as bounced.
    """
    known = code if 100 <= code <= 599 else None
    permanent = known is not None and known >= 500 and stage in (Stage.RCPT, Stage.DATA)
    outcome = Outcome.BOUNCED if permanent else Outcome.DEFERRED
    return SendResult(outcome, known, _one_line(message), stage)


def _failure(exc: BaseException, stage: Stage) -> SendResult:
    """Turn whatever aiosmtplib or the network raised into a result."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
        first = exc.recipients[0]
        return _from_reply(first.code, first.message, Stage.RCPT)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _from_reply(exc.code, exc.message, stage)
    context = exc.__context__
    if isinstance(context, aiosmtplib.SMTPResponseException | aiosmtplib.SMTPRecipientsRefused):
        # sendmail's own RSET after a refusal timed out: the refusal is the server's answer.
        return _failure(context, stage)
    if (cert_error := _cert_error(exc)) is not None:
        detail = f"TLS certificate verification failed: {cert_error.verify_message}"
    elif isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
        detail = f"timed out ({_message(exc)})"
    elif isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        detail = f"connection lost ({_message(exc)})"
    else:
        detail = _message(exc)
    return SendResult(Outcome.DEFERRED, None, _one_line(f"{stage}: {detail}"), stage)


def _cert_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate failure behind ``exc``: aiosmtplib wraps it for implicit TLS only."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__
    return None


def _message(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPException):
        return exc.message
    return str(exc) or type(exc).__name__


def _one_line(text: str) -> str:
    """Server words for a log or a database column: one line, no controls, bounded."""
    line = " ".join(text.split())
    if not line.isprintable():  # rare: filter character by character only when needed
        line = "".join(ch for ch in line if ch.isprintable())
    if len(line) > REPLY_LIMIT:
        line = line[: REPLY_LIMIT - 1] + "…"
    return line
