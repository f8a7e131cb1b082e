"""A capture SMTP server for development and the demo: every message lands in a directory.

Each message is written, once per envelope recipient, to
``OUT_DIR/<UTC timestamp>-<sequence>-<recipient>.eml`` with exactly the bytes the client sent
in DATA (CRLF line endings as received, dot-stuffing undone), so the file is what a mail client
or ``email.message_from_binary_file`` expects. The envelope is not written into the file; it is
kept in ``Sink.messages``.

``Sink`` runs in a background thread with its own event loop, so synchronous code (the demo)
and any asyncio loop can send to it alike. ``serve_forever`` runs in the caller's loop and
``run_sink`` is the blocking entry point for ``mailer sink``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import re
import signal
import ssl
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self

from aiosmtpd.smtp import SMTP, Envelope, Session

from mailer.clock import now
from mailer.errors import MailerError

log = logging.getLogger(__name__)

# Large enough for any digest with images inlined; advertised in EHLO as SIZE.
DATA_SIZE_LIMIT = 64 * 1024 * 1024
# How long start() and stop() wait for the server thread before giving up.
THREAD_DEADLINE = 10.0
_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9@._+=-]")

ProtocolFactory = Callable[[asyncio.AbstractEventLoop], SMTP]


class SinkError(MailerError, OSError):
    """The capture server cannot listen (port in use, address not available)."""


class Captured(NamedTuple):
    """One file written: the envelope it came with and where it is."""

    envelope_from: str
    rcpt_tos: tuple[str, ...]
    path: Path


class _CaptureHandler:
    """aiosmtpd handler: writes every accepted message, one file per recipient."""

    def __init__(self, out_dir: Path, on_message: Callable[[Captured], None] | None) -> None:
        self.out_dir = out_dir
        self.on_message = on_message
        self.messages: list[Captured] = []
        self._sequence = itertools.count(1)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        sender = envelope.mail_from or ""
        recipients = tuple(envelope.rcpt_tos)
        stamp = now().strftime("%Y%m%dT%H%M%S%fZ")
        for recipient in recipients:
            name = f"{stamp}-{next(self._sequence):06d}-{_safe_name(recipient)}.eml"
            path = self.out_dir / name
            # Write then rename, so nobody watching the directory reads half a message. The
            # write blocks the sink's own loop only: fine for a development server.
            partial = path.with_name(path.name + ".part")
            partial.write_bytes(data)
            os.replace(partial, path)
            captured = Captured(sender, recipients, path)
            self.messages.append(captured)
            log.info(
                "captured message",
                extra={"envelope_from": sender, "to": recipient, "file": name, "bytes": len(data)},
            )
            if self.on_message is not None:
                self.on_message(captured)
        return "250 2.0.0 OK: captured"


def _safe_name(recipient: str) -> str:
    return _UNSAFE_FILENAME.sub("_", recipient)[:120] or "unknown"


def _sink_factory(handler: _CaptureHandler) -> ProtocolFactory:
    def factory(loop: asyncio.AbstractEventLoop) -> SMTP:
        return SMTP(
            handler,
            loop=loop,
            hostname="mailer-sink",  # not socket.getfqdn(): that may wait on DNS per connection
            ident="mailer sink",
            data_size_limit=DATA_SIZE_LIMIT,
            enable_SMTPUTF8=False,
        )

    return factory


class _Listener:
    """An aiosmtpd server on the running loop, tracking its connections so stop() ends them."""

    def __init__(
        self,
        factory: ProtocolFactory,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.factory = factory
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self._server: asyncio.Server | None = None
        self._live: weakref.WeakSet[SMTP] = weakref.WeakSet()

    async def start(self) -> int:
        """Listen; returns the real port (the one the OS chose for port 0)."""
        loop = asyncio.get_running_loop()

        def protocol() -> SMTP:
            smtp = self.factory(loop)
            self._live.add(smtp)
            return smtp

        try:
            self._server = await loop.create_server(
                protocol, self.host, self.port, ssl=self.ssl_context
            )
        except OSError as exc:
            raise SinkError(
                f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from exc
        port: int = self._server.sockets[0].getsockname()[1]
        self.port = port
        return port

    async def stop(self) -> None:
        """Stop listening, cut every open session and wait for their tasks to end."""
        if self._server is None:
            return
        self._server.close()
        handlers: list[asyncio.Task[None]] = []
        for smtp in list(self._live):
            # aiosmtpd clears .transport when a connection is lost: these are still open.
            if isinstance(smtp.transport, asyncio.Transport):
                smtp.transport.abort()
            elif smtp.transport is not None:
                smtp.transport.close()
            task = smtp._handler_coroutine  # aiosmtpd keeps no public handle on the session task
            if task is not None and not task.done():
                task.cancel()
                handlers.append(task)
        await asyncio.gather(*handlers, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None


class ServerThread:
    """Runs an aiosmtpd server in a daemon thread on its own event loop.

    ``factory(loop)`` builds the ``aiosmtpd.smtp.SMTP`` protocol for each connection, in the
    server thread. Being off the caller's loop, the server serves synchronous callers and any
    asyncio loop alike, and a handler that sleeps never stalls the client under test.
    """

    def __init__(
        self,
        factory: ProtocolFactory,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        ssl_context: ssl.SSLContext | None = None,
        name: str = "smtp-server",
    ) -> None:
        self._listener = _Listener(factory, host, port, ssl_context)
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started: concurrent.futures.Future[int] = concurrent.futures.Future()

    @property
    def host(self) -> str:
        return self._listener.host

    @property
    def port(self) -> int:
        """The port listened on (the real one once started, even if 0 was asked for)."""
        return self._listener.port

    def start(self) -> int:
        """Start listening; returns the port. Raises ``SinkError`` if the port is taken."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._started = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        try:
            return self._started.result(timeout=THREAD_DEADLINE)
        except BaseException:
            self._thread.join(THREAD_DEADLINE)
            self._thread = None
            raise

    def stop(self) -> None:
        """Close every connection and the listener, then end the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        stopped = asyncio.run_coroutine_threadsafe(self._listener.stop(), loop)
        try:
            stopped.result(timeout=THREAD_DEADLINE)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(THREAD_DEADLINE)
            self._thread = None
            self._loop = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            try:
                port = loop.run_until_complete(self._listener.start())
            except BaseException as exc:  # reported to start(), which re-raises it
                self._started.set_exception(exc)
                return
            self._loop = loop
            self._started.set_result(port)
            loop.run_forever()
            # stop() ended the sessions; anything left (a handler's stray task) is cancelled
            # here so that closing the loop destroys no pending task.
            loop.run_until_complete(_cancel_leftovers())
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


async def _cancel_leftovers() -> None:
    leftovers = asyncio.all_tasks() - {asyncio.current_task()}
    for task in leftovers:
        task.cancel()
    await asyncio.gather(*leftovers, return_exceptions=True)


class Sink:
    """A capture SMTP server in a background thread: ``Sink(host, port, out_dir)``.

    ``start()`` listens (port 0 picks a free port, then ``.port`` is the real one), ``stop()``
    closes; or use it as a context manager. ``messages`` lists every file written, in order.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        out_dir: Path | str = "mail",
        *,
        on_message: Callable[[Captured], None] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self._handler = _CaptureHandler(self.out_dir, on_message)
        self._thread = ServerThread(_sink_factory(self._handler), host, port, name="mailer-sink")

    @property
    def host(self) -> str:
        return self._thread.host

    @property
    def port(self) -> int:
        return self._thread.port

    @property
    def messages(self) -> list[Captured]:
        return self._handler.messages

    def start(self) -> None:
        """Create the output directory and start listening."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        log.info(
            "sink listening", extra={"host": self.host, "port": self.port, "out": self.out_dir}
        )

    def stop(self) -> None:
        self._thread.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


async def serve_forever(
    host: str,
    port: int,
    out_dir: Path,
    *,
    on_message: Callable[[Captured], None] | None = None,
    on_ready: Callable[[int], Any] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Capture mail on the running loop until cancelled or until ``stop`` is set.

    ``on_ready(port)`` is called once listening (with the real port when 0 was asked for).
    """
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    listener = _Listener(_sink_factory(_CaptureHandler(out_dir, on_message)), host, port)
    real_port = await listener.start()
    log.info("sink listening", extra={"host": host, "port": real_port, "out": out_dir})
    if on_ready is not None:
        on_ready(real_port)
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        await listener.stop()


def run_sink(
    host: str,
    port: int,
    out_dir: Path,
    *,
    on_message: Callable[[Captured], None] | None = None,
    on_ready: Callable[[int], Any] | None = None,
) -> None:
    """Run the capture server in the foreground until Ctrl-C or SIGTERM (``mailer sink``).

    Each message is logged (logger ``mailer.devtools.sink``) and passed to ``on_message``.
    """
    # aiosmtpd logs every SMTP command at INFO on "mail.log"; one line per message is ours.
    logging.getLogger("mail.log").setLevel(logging.WARNING)

    async def main() -> None:
        stop = asyncio.Event()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            # Not available on Windows or outside the main thread; Ctrl-C still works there.
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await serve_forever(
            host, port, out_dir, on_message=on_message, on_ready=on_ready, stop=stop
        )

    # asyncio.run turns Ctrl-C into cancelling main() (whose finally closes the server) and
    # then re-raises KeyboardInterrupt: for this command that is the normal way to end.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
