"""The SMTP pool: persistent aiosmtplib connections shared by concurrent sending tasks.

One recipient per message; the message bytes go out unchanged, through ``_Connection.send_one``
(mailer.delivery.pipeline: aiosmtplib's ``sendmail``, the same bytes on the wire for far less
CPU, pipelined). Every SMTP reply and every network failure becomes a ``SendResult`` (sent,
deferred or bounced, mailer.delivery.policy); only configuration and usage errors raise, as
``DeliveryError`` subclasses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import ssl
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

import aiosmtplib

from mailer.config.settings import SmtpSettings
from mailer.db.outages import OutageLog
from mailer.delivery.pacing import Pacer, SharedSchedule
from mailer.delivery.pipeline import Gate, GateFailed, _Connection
from mailer.delivery.policy import REPLY_LIMIT, Outcome, SendResult, Stage, classify
from mailer.errors import DeliveryError
from mailer.text import one_line

log = logging.getLogger(__name__)

# Characters that cannot appear in a bare ASCII addr-spec on an SMTP command line: whitespace and
# controls would end the command or smuggle parameters, angle brackets would close the path.
_ADDRESS_FORBIDDEN = re.compile(r"[\x00-\x20\x7f<>]")
_HOSTNAME_FORBIDDEN = re.compile(r"[\x00-\x20\x7f]")
# "Authentication required" and "encryption required for the mechanism" (RFC 4954 §6): the
# server refuses us, not the recipient, whatever stage it says so at.
_AUTH_REQUIRED = frozenset({530, 538})


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


@dataclass
class _Slot:
    """One of the pool's ``connections`` places; holds a client while it is connected."""

    client: _Connection | None = None


class SmtpPool:
    """Up to ``settings.connections`` persistent SMTP connections, shared by sending tasks.

    Use as ``async with SmtpPool(settings) as pool: await pool.send(...)``. Connections open on
    first use, are reused message after message, are replaced when the server drops them or
    answers 421, and are closed with QUIT when the block ends. Each in-flight ``send`` uses one
    connection exclusively; tasks beyond ``connections`` wait for a free one.

    ``security``: ``tls`` is implicit TLS, ``starttls`` requires STARTTLS (a server that does not
    offer it is a failure, never a fallback to plain text), both verify the server's certificate
    and host name against ``tls_context`` (default: ``ssl.create_default_context()``, the system
    trust store; COMPLIANCE.md 3.6). ``none`` is plain text and never upgrades opportunistically
    with an unverified context. ``local_hostname`` is the EHLO name (default: this host's FQDN).
    ``schedule``: the rate schedule shared with the other sending processes, if any
    (mailer.delivery.pacing); without one the pool paces itself alone.
    """

    def __init__(
        self,
        settings: SmtpSettings,
        *,
        local_hostname: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        schedule: SharedSchedule | None = None,
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
        self._pacer = Pacer(settings.rate_per_second, schedule)
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

    async def send(
        self, envelope_from: str, recipient: str, data: bytes, gate: Gate | None = None
    ) -> SendResult:
        """Hand one message for one recipient to the server; never raises for an SMTP answer.

        ``data`` is the complete message with CRLF line endings, sent as is (aiosmtplib only
        dot-stuffs it and would turn a lone CR or LF into CRLF). ``envelope_from`` may be empty
        (the null reverse-path). Raises ``SmtpUsageError`` for a malformed address,
        ``PoolClosedError`` outside ``async with`` and ``SmtpAuthError`` when the server refuses
        our credentials; everything the server or the network does becomes a ``SendResult``.
        ``gate``: nothing of the message itself goes out until it says yes (``send_one``); a
        no raises ``StartRefused``, and the connection is not reused.
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
            return await self._send_on(slot, envelope_from, recipient, data, gate)
        except GateFailed as failed:
            self._discard(slot)  # hung up mid-DATA
            gate_error = failed.error
        except BaseException:
            # Cancelled or failed mid-transaction: the session's state is unknown, so the next
            # message must not inherit it.
            self._discard(slot)
            raise
        finally:
            self._idle.put_nowait(slot)
        # Raised here, outside the handler, so that it goes on exactly as the gate raised it
        # (its own cause kept, no carrier in its context).
        raise gate_error

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
        self, slot: _Slot, envelope_from: str, recipient: str, data: bytes, gate: Gate | None
    ) -> SendResult:
        await self._pacer.acquire()
        for attempt in (1, 2):
            fresh = slot.client is None or not slot.client.is_connected
            if fresh:
                self._discard(slot)  # closed by the server while idle, after a 421 or a timeout
                opened = await self._open()
                if isinstance(opened, SendResult):
                    return opened
                slot.client = opened
            assert slot.client is not None
            result, retry = await self._transaction(
                slot.client, envelope_from, recipient, data, gate
            )
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
            reply = one_line(exc.message, limit=REPLY_LIMIT)
            self._fatal = SmtpAuthError(
                f"the SMTP server refused the login for {username!r}: {exc.code} {reply} "
                "(check [smtp].username and the password in the variable named by "
                "[smtp].password_env)",
                code=exc.code,
                reply=reply,
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
                reply=one_line(exc.message, limit=REPLY_LIMIT),
            )
            raise self._fatal from exc

    async def _transaction(
        self,
        client: _Connection,
        envelope_from: str,
        recipient: str,
        data: bytes,
        gate: Gate | None = None,
    ) -> tuple[SendResult, bool]:
        """One MAIL/RCPT/DATA transaction; returns the result and whether a retry is safe."""
        client.stage = Stage.MAIL
        options: list[str] = []
        if client.supports_extension("8bitmime") and not data.isascii():
            options.append("BODY=8BITMIME")
        try:
            refused, reply = await client.send_one(envelope_from, recipient, data, options, gate)
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
                words = one_line(reply, limit=REPLY_LIMIT)
                return SendResult(Outcome.SENT, 250, words, Stage.DATA), False
            # sendmail reports refused recipients as data when another one was accepted; with
            # one recipient per message that cannot happen, but a refusal is never a success.
            answer = refused.get(recipient) or next(iter(refused.values()))
            result, retry = classify(answer.code, answer.message, Stage.RCPT), False
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


def _failure(exc: BaseException, stage: Stage) -> SendResult:
    """Turn whatever aiosmtplib or the network raised into a result."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
        first = exc.recipients[0]
        return classify(first.code, first.message, Stage.RCPT)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return classify(exc.code, exc.message, stage)
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
    reply = one_line(f"{stage}: {detail}", limit=REPLY_LIMIT)
    return SendResult(Outcome.DEFERRED, None, reply, stage)


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
