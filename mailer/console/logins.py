"""Login limits, kept in the database (``staff_login_attempts``) so every instance counts the
same attempts: at most ``Limits.per_account`` failures per ``Limits.window`` for the address
typed (whether or not it has an account), and ``Limits.per_address`` for one client address.

Every attempt is recorded as a failure before its password is checked (``attempt``), in the
same transaction that counts the failures: an attempt whose count, itself included, is over a
limit is refused without checking the password (and its row deleted again: an attempt that
checked no password guessed nothing), and the login page says so and how long to wait. Only a
correct password turns its row into a success (``succeeded``). So logins sent at once cannot
all pass the count before any of them is recorded: the transactions take turns (SQLite's
BEGIN IMMEDIATE; on PostgreSQL a table lock that only other attempts wait for), and at most
``per_account`` of them reach a password check per window.

A success forgives nothing: clearing the count at a success would let an attacker who owns
one account reset the per-address count at will. Rows older than the window are deleted as new
ones are recorded.

IPv6 clients are counted by their /64: one host usually holds a whole /64, and could otherwise
take a fresh address for every attempt.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import sqlalchemy as sa

from mailer.db.schema import staff_login_attempts
from mailer.errors import AddressError
from mailer.subscribers.addresses import normalize_address

UNKNOWN_ADDRESS = "unknown"


@dataclass(frozen=True)
class Limits:
    """Failures allowed per account and per client address within ``window``."""

    per_account: int = 5
    per_address: int = 20
    window: timedelta = timedelta(minutes=15)


@dataclass(frozen=True)
class Blocked:
    """A login refused before its password is checked: ``by`` which limit, for ``wait``."""

    by: Literal["account", "address"]
    wait: timedelta

    @property
    def minutes(self) -> int:
        """Whole minutes to wait, at least 1."""
        return max(1, math.ceil(self.wait.total_seconds() / 60))


def account_key(typed: str) -> str:
    """The account an attempt counts against: the address normalized as accounts store it,
    or what was typed (trimmed, lower-cased, bounded) when it is not an address."""
    try:
        return normalize_address(typed)
    except AddressError:
        return typed.strip().lower()[:320]


def address_key(client: str | None) -> str:
    """The client address an attempt counts against: an IPv6 address as its /64
    (``2001:db8:1:2::/64``), an IPv4 address (or an IPv4-mapped IPv6 one) as itself."""
    if not client:
        return UNKNOWN_ADDRESS
    try:
        ip = ipaddress.ip_address(client)
    except ValueError:
        return client[:45]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(frozen=True)
class Attempt:
    """One login attempt, recorded as a failure: its row, and why it is refused (None: the
    password may be checked)."""

    id: int
    blocked: Blocked | None


def _over(
    conn: sa.Connection,
    column: sa.ColumnElement[str],
    value: str,
    limit: int,
    *,
    now: datetime,
    limits: Limits,
) -> timedelta | None:
    """How long until the failures for ``value`` (the new one included) are within ``limit``
    again, or None if they are now."""
    recent = list(
        conn.scalars(
            sa.select(staff_login_attempts.c.at)
            .where(
                column == value,
                staff_login_attempts.c.succeeded.is_(False),
                staff_login_attempts.c.at > now - limits.window,
            )
            .order_by(staff_login_attempts.c.at.desc())
            .limit(limit + 1)
        )
    )
    if len(recent) <= limit:
        return None
    # The oldest of the last ``limit`` + 1 failures must leave the window first.
    oldest: datetime = recent[-1]
    return max(oldest + limits.window - now, timedelta(0))


def attempt(
    engine: sa.Engine, account: str, address: str, *, now: datetime, limits: Limits
) -> Attempt:
    """Record a login attempt as a failure and, in the same transaction, count: the attempt
    is refused (``blocked``) when the failures for ``account`` or ``address``, this one
    included, are over their limit; a refused attempt's row is deleted again in the same
    transaction. Call ``succeeded`` once the password proves right."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # READ COMMITTED would let concurrent attempts each count without the others'
            # rows; this lock mode conflicts with itself only, so plain reads go on.
            conn.exec_driver_sql("LOCK TABLE staff_login_attempts IN SHARE ROW EXCLUSIVE MODE")
        conn.execute(
            staff_login_attempts.delete().where(staff_login_attempts.c.at <= now - limits.window)
        )
        attempt_id = conn.execute(
            staff_login_attempts.insert()
            .values(account=account, address=address, at=now, succeeded=False)
            .returning(staff_login_attempts.c.id)
        ).scalar_one()
        wait = _over(
            conn,
            staff_login_attempts.c.account,
            account,
            limits.per_account,
            now=now,
            limits=limits,
        )
        blocked = Blocked("account", wait) if wait is not None else None
        if blocked is None:
            wait = _over(
                conn,
                staff_login_attempts.c.address,
                address,
                limits.per_address,
                now=now,
                limits=limits,
            )
            blocked = Blocked("address", wait) if wait is not None else None
        if blocked is not None:
            # Refused without a password check: it guessed nothing, so it does not count, and
            # knocking on a locked account does not keep it locked longer.
            conn.execute(
                staff_login_attempts.delete().where(staff_login_attempts.c.id == attempt_id)
            )
    return Attempt(attempt_id, blocked)


def succeeded(engine: sa.Engine, attempt_id: int) -> None:
    """Mark an attempt a success (its password was right): it no longer counts as a failure."""
    with engine.begin() as conn:
        conn.execute(
            staff_login_attempts.update()
            .where(staff_login_attempts.c.id == attempt_id)
            .values(succeeded=True)
        )
