"""The web app served by uvicorn on 127.0.0.1 and an ephemeral port, its ``base_url`` that very
address, for the tests that speak real HTTP to it (Chromium, raw requests)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from mailer.config.settings import Settings
from mailer.db.engine import create_engine
from mailer.web import SmtpConfirmationSender, create_app
from mailer.web.server import ServerThread, bind_ephemeral


def at(base_url: str) -> dict[str, Any]:
    """The ``make_settings`` sections that put the site at ``base_url``."""
    return {"site__base_url": base_url, "site__privacy_policy_url": base_url + "/privacy"}


@contextmanager
def serve(
    settings_for: Callable[[str], Settings],
    engine: sa.Engine | None = None,
    *,
    clock: Callable[[], datetime] | None = None,
) -> Iterator[tuple[ServerThread, sa.Engine, Settings]]:
    """Serve the app whose settings ``settings_for(base_url)`` gives (``at(base_url)`` puts
    the site there) on ``engine``, or on an engine of its own that is disposed after."""
    sock = bind_ephemeral()
    host, port = sock.getsockname()[:2]
    settings = settings_for(f"http://{host}:{port}")
    own = engine is None
    engine = engine if engine is not None else create_engine(settings.database.url)
    sender = SmtpConfirmationSender(settings, local_hostname="client.test")
    app = (
        create_app(settings, engine, sender)
        if clock is None
        else create_app(settings, engine, sender, clock=clock)
    )
    try:
        with ServerThread(app, sock=sock) as server:
            yield server, engine, settings
    finally:
        if own:
            engine.dispose()
