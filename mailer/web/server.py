"""Serving the web app with uvicorn: in the foreground (``mailer web``), inside another event
loop (``mailer run``, ``mailer demo --serve``), or in a background thread (browser tests)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Self

import sqlalchemy as sa
import uvicorn
from starlette.types import ASGIApp

from mailer.compose.rendering import Renderer
from mailer.config.settings import Settings
from mailer.web.app import create_app
from mailer.web.sender import ConfirmationSender, SmtpConfirmationSender

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_SECONDS = 10


def server_config(
    app: ASGIApp,
    *,
    host: str,
    port: int,
    forwarded_allow_ips: str | None = None,
) -> uvicorn.Config:
    """uvicorn settings for this app.

    ``forwarded_allow_ips``: the reverse proxies whose X-Forwarded-For is believed (the
    client IP is consent evidence and the rate-limit key); default: only 127.0.0.1.
    """
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # the CLI configures logging once (mailer.logs)
        access_log=False,  # the access log would record every capability URL
        server_header=False,
        proxy_headers=True,
        forwarded_allow_ips=forwarded_allow_ips,
        lifespan="off",
        ws="none",  # no websockets here; and importing a websockets library costs start time
        # h11, whatever else is installed: a malformed request (a bad chunk size) is then one
        # WARNING from uvicorn ("Invalid HTTP request received.") and a 400, and the app sees
        # a disconnect, which it logs at INFO (mailer.web.app).
        http="h11",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )


async def serve_async(
    settings: Settings,
    engine: sa.Engine,
    mailer: ConfirmationSender | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    forwarded_allow_ips: str | None = None,
    sock: socket.socket | None = None,
    on_started: Callable[[], None] | None = None,
) -> None:
    """Serve until cancelled, or until uvicorn exits (SIGINT/SIGTERM in the main thread).

    ``sock``: a socket already bound to ``host:port`` (``mailer.preflight.claim_port``);
    ``on_started`` is called once the app listens (and signals are handled).
    """
    sender = mailer or SmtpConfirmationSender(settings)
    app = create_app(settings, engine, sender)
    config = server_config(
        app,
        host=host or settings.web.host,
        port=settings.web.port if port is None else port,
        forwarded_allow_ips=forwarded_allow_ips,
    )
    log.info("web app listening", extra={"host": config.host, "port": config.port})
    server = AnnouncingServer(config, on_started=on_started)
    staff = console_server(settings, engine, sender, forwarded_allow_ips=forwarded_allow_ips)
    if staff is None:
        await server.serve(sockets=[sock] if sock is not None else None)
        return
    console, console_sock = staff
    with console_sock:
        task = await console.serve_listening([console_sock])
        try:
            await server.serve(sockets=[sock] if sock is not None else None)
        finally:
            console.should_exit = True
            await task


def console_server(
    settings: Settings,
    engine: sa.Engine,
    mailer: ConfirmationSender,
    *,
    forwarded_allow_ips: str | None = None,
    renderer: Renderer | None = None,
) -> tuple[QuietServer, socket.socket] | None:
    """The staff console's own server and its bound socket, when ``[staff_web]`` gives it a
    port; None when the web app serves it under /staff/. The port is claimed here, so a port
    in use is one line naming it, not a traceback at start. ``renderer``: as ``create_app``'s
    (the service passes its own, shared with the web app)."""
    from mailer.preflight import claim_port

    staff = settings.staff_web
    if staff.port is None:
        return None
    host = staff.host or settings.web.host
    sock = claim_port(host, staff.port)
    app = create_app(settings, engine, mailer, part="staff", renderer=renderer)
    config = server_config(app, host=host, port=staff.port, forwarded_allow_ips=forwarded_allow_ips)
    log.info("staff console listening", extra={"host": host, "port": staff.port})
    return QuietServer(config), sock


class QuietServer(uvicorn.Server):
    """uvicorn leaving signals to what it runs inside (``mailer run``'s service owns SIGTERM
    and SIGINT; ``serve_async`` leaves them to the web app's server); ``listening`` is set
    once it listens. The service's web app and the console's own listener are both one."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.listening.set()

    async def serve_listening(self, sockets: list[socket.socket]) -> asyncio.Task[None]:
        """Start serving in a task; return it once the server listens (or has ended)."""
        task = asyncio.create_task(self.serve(sockets=sockets), name="staff web")
        waiter = asyncio.create_task(self.listening.wait())
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task.done():
            task.result()  # what stopped it, if it raised
            raise RuntimeError("the staff console's server stopped before it listened")
        return task

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def serve(
    settings: Settings,
    engine: sa.Engine,
    mailer: ConfirmationSender | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    forwarded_allow_ips: str | None = None,
    sock: socket.socket | None = None,
    on_started: Callable[[], None] | None = None,
) -> None:
    """Serve in the foreground until interrupted (``mailer web``)."""
    asyncio.run(
        serve_async(
            settings,
            engine,
            mailer,
            host=host,
            port=port,
            forwarded_allow_ips=forwarded_allow_ips,
            sock=sock,
            on_started=on_started,
        )
    )


class AnnouncingServer(uvicorn.Server):
    """uvicorn calling ``on_started`` once it listens: a start-up line printed before that
    could name an address that then fails, or race a SIGTERM sent on reading it."""

    def __init__(
        self, config: uvicorn.Config, *, on_started: Callable[[], None] | None = None
    ) -> None:
        super().__init__(config)
        self.on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()


def bind_ephemeral(host: str = "127.0.0.1") -> socket.socket:
    """A TCP socket bound to ``host`` on a free port chosen by the kernel."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return sock


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()

    def install_signal_handlers(self) -> None:  # a background thread leaves signals alone
        return


class ServerThread:
    """The app served by uvicorn in a background thread on ``host`` and an ephemeral port.

    ``with ServerThread(app) as server: server.url`` — the socket is bound before the thread
    starts, so the port is known at once and nothing races for it. Pass ``sock`` (from
    ``bind_ephemeral``) to know the URL before building the app, e.g. for its base_url.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        sock: socket.socket | None = None,
        startup_timeout: float = 10,
    ) -> None:
        self._socket = sock or bind_ephemeral()
        address = self._socket.getsockname()
        self.host: str = address[0]
        self.port: int = address[1]
        self._server = _Server(server_config(app, host=self.host, port=self.port))
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            name="web-server",
            daemon=True,
        )
        self._startup_timeout = startup_timeout

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        self._thread.start()
        if not self._server.ready.wait(self._startup_timeout):
            self.stop()
            raise RuntimeError(f"the web server did not start within {self._startup_timeout} s")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(GRACEFUL_SHUTDOWN_SECONDS + 5)
        self._socket.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
