"""Checks a command makes before it creates or claims anything.

``run``, ``worker``, ``digest send`` and ``web`` each start only when what they will need is
there: the site secret, a database at the schema head, an SMTP relay that answers, a free web
port. A failure is a ``PreflightError`` naming the check and the fix, which the CLI prints as
one line (exit 1): better than a service that starts and dies at its first issue, or keeps
running without its web app.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from mailer.config.settings import Settings, SmtpSettings
from mailer.db.engine import SCHEMA_HEAD, create_engine, current_revision, safe_url
from mailer.errors import ConfigError, DatabaseUnavailable, MailerError
from mailer.text import one_line

if TYPE_CHECKING:
    from mailer.delivery.policy import SendResult

Check = Literal["secret", "database", "smtp", "web"]
DATABASE_TIMEOUT = 10.0  # seconds to connect and read the schema revision


class PreflightError(MailerError):
    """A check before start failed; ``check`` names which, ``target`` what was checked."""

    def __init__(self, check: Check, message: str, *, target: str = "") -> None:
        self.check = check
        self.target = target
        super().__init__(message)


def preflight(settings: Settings, checks: Sequence[Check]) -> socket.socket | None:
    """Run ``checks`` in order (cheapest first); the web socket, bound, when "web" is one.

    The caller serves on the returned socket: checking the port by binding it, and keeping
    it, leaves no moment in which another process could take the port after the check.
    """
    sock = None
    try:
        for check in checks:
            if check == "secret":
                check_secret(settings)
            elif check == "database":
                check_database(settings.database.url)
            elif check == "smtp":
                check_relay(settings.smtp)
            else:
                sock = claim_port(settings.web.host, settings.web.port)
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    return sock


def check_secret(settings: Settings) -> None:
    """The site secret signs every link: without it no message can be built."""
    try:
        settings.site.require_secret()
    except ConfigError as exc:
        raise PreflightError("secret", str(exc), target=settings.site.secret_key_env) from exc


def check_database(url: str, *, timeout: float = DATABASE_TIMEOUT) -> str:
    """Connect (within ``timeout``) and require the schema head; returns the revision.

    A missing SQLite file is reported, not created: opening it would make an empty database.
    """
    shown = safe_url(url)
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not Path(database).exists():
            raise PreflightError(
                "database",
                f"the database {database} does not exist: run `mailer init`",
                target=shown,
            )
        engine = create_engine(url, poolclass=NullPool)
    else:
        # libpq's connect_timeout bounds reaching the server; statement_timeout the query.
        options = f"-c statement_timeout={int(timeout * 1000)}"
        engine = create_engine(
            url,
            poolclass=NullPool,
            connect_args={"connect_timeout": max(1, round(timeout)), "options": options},
        )
    try:
        revision = current_revision(engine)
    except (sa.exc.DBAPIError, DatabaseUnavailable) as exc:
        # The engine reports a refused or lost connection as DatabaseUnavailable; anything else
        # the driver raises (authentication, a missing database) is a DBAPIError.
        reason = one_line(exc.reason if isinstance(exc, DatabaseUnavailable) else str(exc.orig))
        raise PreflightError(
            "database",
            f"cannot reach the database {shown}: {reason} (check [database].url)",
            target=shown,
        ) from exc
    finally:
        engine.dispose()
    if revision != SCHEMA_HEAD:
        state = "not initialized" if revision is None else f"at revision {revision}"
        raise PreflightError(
            "database",
            f"the database {shown} is {state}, this version needs {SCHEMA_HEAD}: run `mailer init`",
            target=shown,
        )
    return revision


def check_relay(smtp: SmtpSettings) -> None:
    """Connect to the relay as delivery will (TLS, EHLO, AUTH where set), then QUIT."""
    from mailer.delivery.pool import SmtpAuthError  # aiosmtplib: only for the commands that send

    where = f"{smtp.host}:{smtp.port}"
    try:
        result = asyncio.run(_probe(smtp))
    except SmtpAuthError as exc:
        raise PreflightError("smtp", f"the SMTP relay {where}: {exc}", target=where) from exc
    except TimeoutError as exc:
        raise PreflightError(
            "smtp",
            f"the SMTP relay {where} does not answer within {smtp.timeout * 4:g} s: start it, "
            "or check [smtp].host, port and security",
            target=where,
        ) from exc
    if result is not None:
        raise PreflightError(
            "smtp",
            f"the SMTP relay {where} does not answer ({result.reply}): start it, or check "
            "[smtp].host, port and security",
            target=where,
        )


async def _probe(smtp: SmtpSettings) -> SendResult | None:
    from mailer.delivery.pool import SmtpPool

    # Each step (connect, TLS, EHLO, AUTH, QUIT) has its own [smtp].timeout; this bounds all.
    async with asyncio.timeout(smtp.timeout * 4):
        async with SmtpPool(replace(smtp, connections=1)) as pool:
            return await pool.probe()


def claim_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` for the web app to serve on (not listening yet)."""
    where = f"{host}:{port}"
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise PreflightError(
            "web", f"cannot listen on {where}: {exc} (check [web].host)", target=where
        ) from exc
    sock = socket.socket(family, kind, proto)
    # As uvicorn does: a port left in TIME_WAIT by the previous run is free to take.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise PreflightError(
            "web",
            f"cannot listen on {where}: {exc.strerror or exc} (is another `mailer run` or "
            "`mailer web` running? stop it, or set [web].port)",
            target=where,
        ) from exc
    return sock
