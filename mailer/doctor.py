"""``mailer doctor``: what a send will use, why, and whether each part answers.

Each item is one line of the report: the sending processes and where their number came from,
the connections, the rate limit, the database and its driver, DKIM and its key, the relay and
whether it answers EHLO within ``[smtp].timeout``, and the site secret. An item that would stop
a send (or break it on its first message) carries a ``problem``: one line naming the fix, the
same line the command that needs the part would print.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from importlib import metadata

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import rsa

from mailer.config.sections import DEFAULT_CONNECTIONS, usable_cpus
from mailer.config.settings import Settings
from mailer.db.engine import SCHEMA_HEAD, normalize_url, safe_url
from mailer.errors import ConfigError
from mailer.preflight import PreflightError, check_database, check_relay, check_secret

# Postfix's default smtpd_client_connection_count_limit: more connections from one client are
# refused unless the client is exempt (in $mynetworks by default).
RELAY_CONNECTION_LIMIT = 50


@dataclass(frozen=True)
class Item:
    """One line of the report: ``label``, what it says, and the problem if there is one."""

    label: str
    said: str
    problem: str | None = None


def diagnose(settings: Settings) -> list[Item]:
    """Every item of the report, in the order a send meets them. Reaches the database and the
    relay (each within its timeout); changes nothing."""
    return [
        processes_item(settings),
        connections_item(settings),
        rate_item(settings),
        database_item(settings),
        dkim_item(settings),
        relay_item(settings),
        secret_item(settings),
    ]


def processes_item(settings: Settings) -> Item:
    smtp = settings.smtp
    said = f"{smtp.processes} ({smtp.processes_from})"
    usable, _machine = usable_cpus()
    if not smtp.processes_auto and smtp.processes > usable:
        said += f"; more than the {usable} CPUs this process may use: they will share them"
    return Item("processes", said)


def connections_item(settings: Settings) -> Item:
    smtp = settings.smtp
    total = smtp.connections * smtp.processes
    said = f"{smtp.connections} per process, {total} in all (default {DEFAULT_CONNECTIONS})"
    if total > RELAY_CONNECTION_LIMIT:
        said += (
            f"; a relay may refuse more than {RELAY_CONNECTION_LIMIT} from one client (Postfix:"
            " smtpd_client_connection_count_limit, unless the client is in $mynetworks)"
        )
    return Item("connections", said)


def rate_item(settings: Settings) -> Item:
    rate = settings.smtp.rate_per_second
    if not rate:
        return Item("rate limit", "none ([smtp].rate_per_second = 0)")
    return Item("rate limit", f"{rate:g} messages per second across all processes")


def database_item(settings: Settings) -> Item:
    url = settings.database.url
    shown = safe_url(url)
    parsed = sa.make_url(normalize_url(url))
    if parsed.get_backend_name() == "sqlite":
        driver = f"SQLite {sqlite3.sqlite_version} through Python's sqlite3"
    else:
        name = parsed.get_driver_name()
        driver = f"PostgreSQL through {name} {_version(name)}"
    try:
        revision = check_database(url)
    except PreflightError as exc:
        return Item("database", f"{shown}: {driver}", problem=str(exc))
    return Item("database", f"{shown}: {driver}, schema {revision} (current: {SCHEMA_HEAD})")


def dkim_item(settings: Settings) -> Item:
    from mailer.compose.dkim import load_private_key

    dkim = settings.dkim
    if dkim is None:
        return Item("DKIM", "off (no [dkim] table): messages are not signed")
    where = f"d={dkim.domain} s={dkim.selector}, {dkim.private_key_file}"
    try:
        key = load_private_key(dkim.private_key_file)
    except ConfigError as exc:
        return Item("DKIM", f"on: {where}", problem=str(exc))
    if isinstance(key, rsa.RSAPrivateKey):
        kind = f"RSA-{key.key_size} (rsa-sha256)"
    else:
        kind = "Ed25519 (ed25519-sha256)"
    return Item("DKIM", f"on: {kind}, {where}")


def relay_item(settings: Settings) -> Item:
    smtp = settings.smtp
    where = f"{smtp.host}:{smtp.port} (security {smtp.security})"
    steps = {"none": "EHLO", "starttls": "EHLO, STARTTLS, EHLO", "tls": "TLS, EHLO"}[
        smtp.security
    ] + (", AUTH" if smtp.username else "")
    started = time.monotonic()
    try:
        check_relay(smtp)
    except PreflightError as exc:
        return Item("relay", where, problem=str(exc))
    took = (time.monotonic() - started) * 1000
    return Item(
        "relay",
        f"{where}: answers {steps} in {took:.0f} ms (timeout {smtp.timeout:g} s per step)",
    )


def secret_item(settings: Settings) -> Item:
    name = settings.site.secret_key_env
    try:
        check_secret(settings)
    except PreflightError as exc:
        return Item("site secret", "not set", problem=str(exc))
    return Item("site secret", f"set ({name} or [site].secret_key_file)")


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "(version unknown)"
