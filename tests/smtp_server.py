"""A scriptable, fault-injecting SMTP server for tests: real aiosmtpd, real sockets, port 0.

The server runs in a background thread on its own event loop
(``mailer.devtools.sink.ServerThread``), so it serves async tests in the pytest-asyncio loop
and synchronous code alike, and a reply delayed on the server never stalls the client under
test. Load the fixtures (``smtp_server``, ``make_smtp_server``, ``test_certificates``) as a
plugin, or import them by name::

    pytest_plugins = ["tests.smtp_server"]  # or: from tests.smtp_server import smtp_server

    async def test_something(smtp_server: FaultServer) -> None:
        smtp_server.script("b@example.org", ["451 4.7.1 try later"])  # first RCPT attempt
        smtp_server.script("c@example.org", [DROP], stage="data")       # cut at end of DATA
        smtp_server.script("d@example.org", [Delay(5)], stage="data")   # a server that hangs
        smtp_server.script_greeting(["421 4.3.2 busy"])                  # the next connection
        smtp_server.close_after(3)                                       # every connection
        ...
        assert smtp_server.received[0].data == expected_bytes

Scripted actions are consumed one per attempt, in order; once a script runs out the server
behaves normally (accepts). An action is a reply line (``"250 ok"`` accepts, anything else
refuses with exactly that line), ``DROP`` (close the connection without a reply) or
``Delay(seconds, then=None)`` (wait, then perform ``then``; None means the normal behaviour).

PYTEST_DONT_REWRITE: a test module may import this module and then load it as a plugin, too
late for assertion rewriting; its few asserts are plain invariants that need none.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import ipaddress
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mailer.devtools.sink import ServerThread

Stage = Literal["mail", "rcpt", "data"]


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


DROP = _Drop()
"""Close the connection at this point without sending a reply."""


@dataclass(frozen=True)
class Delay:
    """Wait ``seconds``, then perform ``then`` (None: behave normally)."""

    seconds: float
    then: str | _Drop | None = None


Action = str | _Drop | Delay


@dataclass(frozen=True)
class Received:
    """A message the server accepted."""

    envelope_from: str
    recipients: tuple[str, ...]
    data: bytes
    connection: int  # 1-based number of the connection it came on
    tls: bool
    login: str | None
    at: float  # time.monotonic() when it was accepted


class _ScriptedSMTP(SMTP):
    """aiosmtpd's SMTP with per-connection bookkeeping and a scriptable greeting."""

    def __init__(self, owner: FaultServer, **kwargs: Any) -> None:
        super().__init__(owner._handler, **kwargs)
        self.owner = owner
        self.number = 0
        self.accepted = 0
        self._counted = False

    async def _handle_client(self) -> None:
        self.number = self.owner._connection_opened()
        self._counted = True
        action = self.owner._next_greeting()
        if action is not None:
            reply = await _act(self, action)
            if reply is not None and not reply.startswith("2"):
                await self.push(reply)
                await _drop(self)
        await super()._handle_client()

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self.owner._connection_closed()
        super().connection_lost(error)

    def tls_in_use(self) -> bool:
        assert self.session is not None
        transport = self.transport
        implicit = transport is not None and transport.get_extra_info("sslcontext") is not None
        return self.session.ssl is not None or implicit

    def close_soon(self) -> None:
        """Close after the reply being sent now has gone out."""
        if self.transport is not None:
            self.loop.call_soon(self.transport.close)


async def _drop(smtp: SMTP) -> None:
    """Close the connection and wait for aiosmtpd to cancel this session (it does so when the
    connection is lost); returning normally would make it send a reply on a dead transport."""
    if smtp.transport is not None:
        smtp.transport.close()
    await asyncio.Event().wait()


async def _act(smtp: SMTP, action: Action) -> str | None:
    """Perform a scripted action; returns the reply to send, or None for the normal one."""
    if isinstance(action, Delay):
        await asyncio.sleep(action.seconds)
        if action.then is None:
            return None
        action = action.then
    if isinstance(action, _Drop):
        await _drop(smtp)
        return None  # not reached: _drop ends in cancellation
    return action


class _Handler:
    """The aiosmtpd handler (hooks only: aiosmtpd treats every ``handle_*`` and ``auth_*``
    attribute of a handler as a hook, so nothing else lives here)."""

    def __init__(self, owner: FaultServer) -> None:
        self.owner = owner

    async def handle_MAIL(
        self,
        server: _ScriptedSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        owner = self.owner
        if owner.users is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        limit, limit_reply = owner._close_after
        if limit and limit_reply is not None and server.accepted >= limit:
            server.close_soon()
            return limit_reply
        reply = await owner._scripted(server, "mail", [address])
        if reply is None or reply.startswith("2"):
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
            return reply or "250 OK"
        return reply

    async def handle_RCPT(
        self,
        server: _ScriptedSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        reply = await self.owner._scripted(server, "rcpt", [address])
        if reply is None or reply.startswith("2"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            return reply or "250 OK"
        return reply

    async def handle_DATA(self, server: _ScriptedSMTP, session: Session, envelope: Envelope) -> str:
        owner = self.owner
        reply = await owner._scripted(server, "data", envelope.rcpt_tos)
        if reply is not None and not reply.startswith("2"):
            return reply
        server.accepted += 1
        owner._arrived(
            Received(
                envelope_from=envelope.mail_from or "",
                recipients=tuple(envelope.rcpt_tos),
                data=envelope.original_content or b"",
                connection=server.number,
                tls=server.tls_in_use(),
                login=session.auth_data if isinstance(session.auth_data, str) else None,
                at=time.monotonic(),
            )
        )
        limit, limit_reply = owner._close_after
        if limit and limit_reply is None and server.accepted >= limit:
            server.close_soon()
        return reply or "250 2.0.0 OK: queued"

    async def handle_RSET(self, server: _ScriptedSMTP, session: Session, envelope: Envelope) -> str:
        self.owner.resets += 1
        return "250 OK"

    async def handle_QUIT(self, server: _ScriptedSMTP, session: Session, envelope: Envelope) -> str:
        self.owner.quits += 1
        return "221 Bye"


class FaultServer:
    """A real SMTP server on 127.0.0.1, port 0, whose replies a test scripts.

    ``tls_context`` (a server context) enables STARTTLS, or implicit TLS with
    ``implicit_tls=True``. ``users`` ({login: password}) enables AUTH PLAIN/LOGIN and requires
    it before MAIL. Everything observed is recorded: ``received`` (accepted messages),
    ``connections`` (opened so far), ``max_concurrent``, ``resets`` (RSET commands), ``quits``
    and ``logins`` (AUTH mechanisms that succeeded).
    """

    def __init__(
        self,
        *,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        require_starttls: bool = False,
        users: dict[str, str] | None = None,
        auth_require_tls: bool = False,
        data_size_limit: int | None = 32 * 1024 * 1024,
        port: int = 0,
    ) -> None:
        self.users = users
        self.received: list[Received] = []
        self.connections = 0
        self.max_concurrent = 0
        self.resets = 0
        self.quits = 0
        self.logins: list[str] = []
        self._active = 0
        self._lock = threading.Lock()
        self._arrival = threading.Condition()
        self._scripts: dict[tuple[str, str], collections.deque[Action]] = {}
        self._greetings: collections.deque[Action] = collections.deque()
        self._close_after: tuple[int, str | None] = (0, None)
        self._handler = _Handler(self)
        smtp_kwargs: dict[str, Any] = {
            "hostname": "smtp.test",  # not socket.getfqdn(), which may wait on DNS
            "data_size_limit": data_size_limit,
            "auth_require_tls": auth_require_tls,
            "authenticator": self._authenticate if users is not None else None,
        }
        if tls_context is not None and not implicit_tls:
            smtp_kwargs.update(tls_context=tls_context, require_starttls=require_starttls)

        def factory(loop: asyncio.AbstractEventLoop) -> SMTP:
            return _ScriptedSMTP(self, loop=loop, **smtp_kwargs)

        self._thread = ServerThread(
            factory,
            "127.0.0.1",
            port,  # 0: any free port; a given one to start a server again where one was
            ssl_context=tls_context if implicit_tls else None,
            name="fault-smtp-server",
        )

    host = "127.0.0.1"

    @property
    def port(self) -> int:
        return self._thread.port

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._thread.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- scripting (called from the test's thread)

    def script(self, address: str, actions: Iterable[Action], *, stage: Stage = "rcpt") -> None:
        """Queue actions for successive attempts at ``stage`` for ``address``.

        ``address`` is the recipient for "rcpt" and "data" (the end of DATA), the envelope
        sender for "mail".
        """
        with self._lock:
            queue = self._scripts.setdefault((stage, address.lower()), collections.deque())
            queue.extend(actions)

    def script_greeting(self, actions: Iterable[Action]) -> None:
        """Queue greeting actions for the next connections (a non-2xx reply is sent and the
        connection closed, like a server answering 421 at connect)."""
        with self._lock:
            self._greetings.extend(actions)

    def close_after(self, messages: int, *, reply: str | None = None) -> None:
        """Per connection, after ``messages`` accepted messages: close the connection right
        after the last 250 (``reply=None``), or answer the next MAIL with ``reply`` (a 421)
        and close."""
        self._close_after = (messages, reply)

    def received_for(self, recipient: str) -> list[Received]:
        return [r for r in self.received if recipient in r.recipients]

    def wait_for(self, recipient: str, count: int = 1, timeout: float = 10) -> list[Received]:
        """The messages for ``recipient`` once ``count`` have arrived: for mail sent after an
        HTTP response (a background task), which the response cannot be used to wait for.
        Raises ``TimeoutError`` naming what did not arrive."""
        with self._arrival:
            if not self._arrival.wait_for(
                lambda: len(self.received_for(recipient)) >= count, timeout
            ):
                raise TimeoutError(f"{count} message(s) to {recipient} within {timeout} s")
        return self.received_for(recipient)

    def _arrived(self, received: Received) -> None:
        with self._arrival:
            self.received.append(received)
            self._arrival.notify_all()

    # -- server side (called in the server thread)

    def _connection_opened(self) -> int:
        with self._lock:
            self.connections += 1
            self._active += 1
            self.max_concurrent = max(self.max_concurrent, self._active)
            return self.connections

    def _connection_closed(self) -> None:
        with self._lock:
            self._active -= 1

    def _next_greeting(self) -> Action | None:
        with self._lock:
            return self._greetings.popleft() if self._greetings else None

    async def _scripted(self, smtp: SMTP, stage: Stage, addresses: Iterable[str]) -> str | None:
        action: Action | None = None
        with self._lock:
            for address in addresses:
                queue = self._scripts.get((stage, address.lower()))
                if queue:
                    action = queue.popleft()
                    break
        return None if action is None else await _act(smtp, action)

    def _authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        if isinstance(auth_data, LoginPassword) and self.users is not None:
            login = auth_data.login.decode("utf-8", "replace")
            if self.users.get(login) == auth_data.password.decode("utf-8", "replace"):
                self.logins.append(mechanism)
                return AuthResult(success=True, auth_data=login)
        return AuthResult(success=False, handled=False)


# -- certificates for TLS tests


@dataclass(frozen=True)
class TestCertificates:
    """A throwaway CA and a server certificate it signed, for localhost and 127.0.0.1."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    ca_pem: bytes
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context (hostname checked) that trusts only this CA."""
        context = ssl.create_default_context(cadata=self.ca_pem.decode("ascii"))
        return context


def make_certificates(directory: Path) -> TestCertificates:
    """Generate a CA and a server certificate (EC P-256: milliseconds, not seconds)."""
    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailer test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_file = directory / "server.pem"
    key_file = directory / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return TestCertificates(
        ca_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
        cert_file=cert_file,
        key_file=key_file,
    )


# -- fixtures


@pytest.fixture
def smtp_server() -> Iterator[FaultServer]:
    """A plain fault-injecting server, stopped after the test."""
    with FaultServer() as server:
        yield server


@pytest.fixture
def make_smtp_server() -> Iterator[Callable[..., FaultServer]]:
    """Start servers with options (``FaultServer`` keyword arguments); all stopped after."""
    started: list[FaultServer] = []

    def make(**options: Any) -> FaultServer:
        server = FaultServer(**options).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def test_certificates(tmp_path_factory: pytest.TempPathFactory) -> TestCertificates:
    """A CA and a server certificate for localhost/127.0.0.1, made once per session."""
    return make_certificates(tmp_path_factory.mktemp("certs"))
