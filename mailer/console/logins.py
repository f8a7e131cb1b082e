"""Login limits, kept in the database (``staff_login_attempts``) so every instance counts the
same attempts: at most ``Limits.per_account`` failures per ``Limits.window`` for the address
typed (whether or not it has an account), and ``Limits.per_address`` for one client address.

Over a limit, the login page says so and how long to wait, without checking the password. A
success is recorded too but forgives nothing: clearing the count at a success would let an
attacker who owns one account reset the per-address count at will. Rows older than the window
are deleted as new ones are recorded.

Two instances checking at the same instant may both let one more attempt through; the limit
is a brake on guessing, and one attempt more in a race does not loosen it.
"""

from __future__ import annotations

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
    return (client or UNKNOWN_ADDRESS)[:45]


def _wait(
    conn: sa.Connection,
    column: sa.ColumnElement[str],
    value: str,
    limit: int,
    *,
    now: datetime,
    limits: Limits,
) -> timedelta | None:
    recent = list(
        conn.scalars(
            sa.select(staff_login_attempts.c.at)
            .where(
                column == value,
                staff_login_attempts.c.succeeded.is_(False),
                staff_login_attempts.c.at > now - limits.window,
            )
            .order_by(staff_login_attempts.c.at.desc())
            .limit(limit)
        )
    )
    if len(recent) < limit:
        return None
    # The oldest of the last ``limit`` failures must leave the window before one more is let in.
    oldest: datetime = recent[-1]
    return oldest + limits.window - now


def check(
    engine: sa.Engine, account: str, address: str, *, now: datetime, limits: Limits
) -> Blocked | None:
    """None if a login for ``account`` from ``address`` may be tried now, else why not and
    for how long."""
    with engine.connect() as conn:
        wait = _wait(
            conn,
            staff_login_attempts.c.account,
            account,
            limits.per_account,
            now=now,
            limits=limits,
        )
        if wait is not None:
            return Blocked("account", wait)
        wait = _wait(
            conn,
            staff_login_attempts.c.address,
            address,
            limits.per_address,
            now=now,
            limits=limits,
        )
        if wait is not None:
            return Blocked("address", wait)
    return None


def record(
    engine: sa.Engine,
    account: str,
    address: str,
    *,
    succeeded: bool,
    now: datetime,
    limits: Limits,
) -> None:
    """Record one attempt, and forget those that have left the window."""
    with engine.begin() as conn:
        conn.execute(
            staff_login_attempts.delete().where(staff_login_attempts.c.at <= now - limits.window)
        )
        conn.execute(
            staff_login_attempts.insert().values(
                account=account, address=address, at=now, succeeded=succeeded
            )
        )
