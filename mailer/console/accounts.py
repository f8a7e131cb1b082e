"""Staff accounts: add, list, remove, reset; a password set from a one-time link; login checks.

An account starts without a password. ``add`` and ``reset`` hand back a one-time link token,
valid for ``LINK_LIFETIME``; the table keeps only its SHA-256, so a copy of the table sets no
password. Setting the password uses the link up and ends every session of the account.

Passwords are hashed with Argon2id (argon2-cffi's ``PasswordHasher`` defaults), must be at least
``MIN_LENGTH`` characters, must not contain the address's local part, and must score at least
``MIN_SCORE`` with zxcvbn, which estimates how guessable a password is from lists of common and
breached passwords, names, words and keyboard patterns.

``verify`` costs one Argon2 verification whether the account exists or not (a fixed dummy hash
stands in for a missing one), so its timing does not tell which addresses have accounts.

The command line (``mailer staff``) and the console's pages call these same functions.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from zxcvbn import zxcvbn

from mailer.console import sessions
from mailer.db import audit
from mailer.db.engine import reading
from mailer.db.schema import STAFF_ROLES, staff_accounts
from mailer.errors import AddressError, PasswordRejected, StaffAccountError, StaffLinkError
from mailer.subscribers.addresses import normalize_address

if TYPE_CHECKING:
    from mailer.config.settings import Settings

LINK_LIFETIME = timedelta(hours=24)
MIN_LENGTH = 12
# Long enough for any passphrase; bounds the work zxcvbn and Argon2 do for one request.
MAX_LENGTH = 256
MIN_SCORE = 3  # zxcvbn: 3 is "safely unguessable: moderate protection from offline attacks"
# A local part this short ("al") is inside too many good passwords to refuse them all.
MIN_LOCAL_PART = 3
WELCOME_PATH = "/staff/welcome/"

_hasher = PasswordHasher()


@dataclass(frozen=True)
class Account:
    """A staff account as the pages and the command line show it."""

    id: int
    email: str
    role: str
    created_at: datetime
    password_set_at: datetime | None
    link_expires_at: datetime | None
    has_password: bool

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class Link:
    """A one-time link to set a password: the token (shown once, never stored) and its end."""

    email: str
    token: str
    expires_at: datetime


def link_url(settings: Settings, token: str) -> str:
    """The link staff open: the console's public address + /staff/welcome/TOKEN."""
    base = settings.staff_web.base_url or settings.site.base_url
    return base.rstrip("/") + WELCOME_PATH + token


def normalize(email: str) -> str:
    """An address as accounts store it (as subscribers' are); AddressError if it is not one."""
    return normalize_address(email)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _account(row: Any) -> Account:
    return Account(
        id=row.id,
        email=row.email,
        role=row.role,
        created_at=row.created_at,
        password_set_at=row.password_set_at,
        link_expires_at=row.link_expires_at,
        has_password=row.password_hash is not None,
    )


def _check_role(role: str) -> None:
    if role not in STAFF_ROLES:
        raise StaffAccountError(
            f"role must be one of {', '.join(STAFF_ROLES)}, got {role!r}", reason="role"
        )


def _new_link(conn: sa.Connection, account_id: int, email: str, now: datetime) -> Link:
    token = secrets.token_urlsafe(32)
    expires = now + LINK_LIFETIME
    conn.execute(
        staff_accounts.update()
        .where(staff_accounts.c.id == account_id)
        .values(link_hash=_digest(token), link_expires_at=expires)
    )
    return Link(email, token, expires)


def add(engine: sa.Engine, email: str, role: str, now: datetime, *, by: str | None = None) -> Link:
    """Add an account without a password; the one-time link that sets it."""
    address = normalize(email)
    _check_role(role)
    with engine.begin() as conn:
        exists = conn.scalar(
            sa.select(staff_accounts.c.id).where(staff_accounts.c.email == address)
        )
        if exists is not None:
            raise StaffAccountError(
                f"{address} already has a staff account (mailer staff reset sends a new link)",
                email=address,
                reason="exists",
            )
        account_id = conn.execute(
            staff_accounts.insert()
            .values(email=address, role=role, created_at=now)
            .returning(staff_accounts.c.id)
        ).scalar_one()
        link = _new_link(conn, account_id, address, now)
        audit.record(conn, None, "staff.added", now, by=by, email=address, role=role)
    return link


def list_accounts(engine: sa.Engine) -> list[Account]:
    """Every account, in address order."""
    with reading(engine) as conn:
        rows = conn.execute(sa.select(staff_accounts).order_by(staff_accounts.c.email))
        return [_account(row) for row in rows]


def find(engine: sa.Engine, email: str) -> Account | None:
    """The account of this address, or None (also for what is not an address)."""
    try:
        address = normalize(email)
    except AddressError:
        return None
    with reading(engine) as conn:
        row = conn.execute(
            sa.select(staff_accounts).where(staff_accounts.c.email == address)
        ).first()
    return _account(row) if row is not None else None


def get(engine: sa.Engine, account_id: int) -> Account:
    """The account with this id; StaffAccountError if there is none."""
    with reading(engine) as conn:
        row = conn.execute(
            sa.select(staff_accounts).where(staff_accounts.c.id == account_id)
        ).first()
    if row is None:
        raise StaffAccountError(f"no staff account {account_id}", reason="unknown")
    return _account(row)


def _existing(conn: sa.Connection, email: str) -> Any:
    address = normalize(email)
    row = conn.execute(sa.select(staff_accounts).where(staff_accounts.c.email == address)).first()
    if row is None:
        raise StaffAccountError(
            f"no staff account for {address} (mailer staff list shows them)",
            email=address,
            reason="unknown",
        )
    return row


def remove(engine: sa.Engine, email: str, now: datetime, *, by: str | None = None) -> Account:
    """Delete an account, and with it every session (the foreign key cascades).

    Refused for the last admin (nobody could manage staff in the console any more), and for
    the account named by ``by`` (an admin does not remove themselves by a slip of the mouse).
    """
    with engine.begin() as conn:
        row = _existing(conn, email)
        if by is not None and row.email == by:
            raise StaffAccountError(
                "you cannot remove your own account: ask another admin",
                email=row.email,
                reason="self",
            )
        if row.role == "admin":
            # The admins' rows are locked while counted: two admins removing each other at
            # once on PostgreSQL would otherwise each count two and leave none. (SQLite's
            # BEGIN IMMEDIATE already lets one writer in at a time.)
            admins = conn.scalars(
                sa.select(staff_accounts.c.id)
                .where(staff_accounts.c.role == "admin")
                .order_by(staff_accounts.c.id)
                .with_for_update()
            ).all()
            if len(admins) <= 1:
                raise StaffAccountError(
                    f"{row.email} is the last admin: add another admin first",
                    email=row.email,
                    reason="last_admin",
                )
        # Sessions go with the account through ON DELETE CASCADE; SQLite enforces it because
        # the engine turns foreign keys on. Closed explicitly as well, so that no database
        # setting can leave a session of a removed account open.
        sessions.close_all(conn, row.id)
        conn.execute(staff_accounts.delete().where(staff_accounts.c.id == row.id))
        audit.record(conn, None, "staff.removed", now, by=by, email=row.email, role=row.role)
    return _account(row)


def reset(engine: sa.Engine, email: str, now: datetime, *, by: str | None = None) -> Link:
    """Clear the password, end every session, and hand back a new one-time link."""
    with engine.begin() as conn:
        row = _existing(conn, email)
        conn.execute(
            staff_accounts.update()
            .where(staff_accounts.c.id == row.id)
            .values(password_hash=None, password_set_at=None)
        )
        closed = sessions.close_all(conn, row.id)
        link = _new_link(conn, row.id, row.email, now)
        audit.record(conn, None, "staff.reset", now, by=by, email=row.email, sessions=closed)
    return link


def link_account(engine: sa.Engine, token: str, now: datetime) -> Account:
    """The account a one-time link is for, without using it; StaffLinkError if it cannot
    be used (unknown, used, replaced or expired)."""
    with reading(engine) as conn:
        row = conn.execute(
            sa.select(staff_accounts).where(staff_accounts.c.link_hash == _digest(token))
        ).first()
    if row is None:
        raise StaffLinkError("unknown")
    if row.link_expires_at is None or now >= row.link_expires_at:
        raise StaffLinkError("expired")
    return _account(row)


def check_password(password: str, email: str) -> None:
    """PasswordRejected, with zxcvbn's own warning and suggestions, unless the password is
    long enough, not built on the address, and hard enough to guess."""
    if len(password) < MIN_LENGTH:
        raise PasswordRejected(
            f"the password must be at least {MIN_LENGTH} characters long; a few unrelated"
            " words make a long one that is easy to remember",
            reason="short",
        )
    if len(password) > MAX_LENGTH:
        raise PasswordRejected(
            f"the password must be at most {MAX_LENGTH} characters long", reason="long"
        )
    local, _, domain = email.partition("@")
    if len(local) >= MIN_LOCAL_PART and local.lower() in password.lower():
        raise PasswordRejected(
            f"the password must not contain your address's name part ({local!r})",
            reason="local_part",
        )
    estimate = zxcvbn(password, user_inputs=[email, local, *domain.split(".")])
    if int(estimate["score"]) < MIN_SCORE:
        feedback = estimate.get("feedback") or {}
        warning = str(feedback.get("warning") or "")
        suggestions = tuple(str(s) for s in feedback.get("suggestions") or ())
        words = " ".join(part for part in (warning, *suggestions) if part)
        raise PasswordRejected(
            "this password is too easy to guess" + (f": {words}" if words else ""),
            reason="weak",
            warning=warning,
            suggestions=suggestions,
        )


def set_password(engine: sa.Engine, token: str, password: str, now: datetime) -> Account:
    """Set the password from a one-time link: the link is used up (it works once) and every
    session of the account ends. StaffLinkError if the link cannot be used, PasswordRejected
    (the link still valid) if the password is refused."""
    account = link_account(engine, token, now)
    check_password(password, account.email)
    hashed = _hasher.hash(password)
    with engine.begin() as conn:
        # The link's hash and expiry in the WHERE: of two requests racing with one link, one
        # updates the row and the other finds nothing.
        done = conn.execute(
            staff_accounts.update()
            .where(
                staff_accounts.c.id == account.id,
                staff_accounts.c.link_hash == _digest(token),
                staff_accounts.c.link_expires_at > now,
            )
            .values(password_hash=hashed, password_set_at=now, link_hash=None, link_expires_at=None)
        )
        if done.rowcount != 1:
            raise StaffLinkError("unknown")
        closed = sessions.close_all(conn, account.id)
        audit.record(
            conn,
            None,
            "staff.password_set",
            now,
            by=account.email,
            email=account.email,
            sessions=closed,
        )
    return get(engine, account.id)


# Made once, at import, with the same parameters as real hashes: verifying against it costs
# what verifying a real one does, and the first unknown address is no slower than the next.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def verify(engine: sa.Engine, email: str, password: str, now: datetime) -> Account | None:
    """The account whose address and password these are, or None. Takes one Argon2
    verification whether or not the account exists or has a password yet."""
    try:
        address = normalize(email)
    except AddressError:
        address = None
    row = None
    if address is not None:
        with reading(engine) as conn:
            row = conn.execute(
                sa.select(staff_accounts).where(staff_accounts.c.email == address)
            ).first()
    stored = row.password_hash if row is not None and row.password_hash else None
    # A password longer than any that can be set is checked against the dummy too: the same
    # time, the same answer (no).
    too_long = len(password) > MAX_LENGTH
    try:
        _hasher.verify(
            _DUMMY_HASH if stored is None or too_long else stored,
            password[:MAX_LENGTH],
        )
    except (VerificationError, InvalidHashError):
        return None
    if row is None or stored is None or too_long:
        return None
    if _hasher.check_needs_rehash(stored):
        with engine.begin() as conn:
            conn.execute(
                staff_accounts.update()
                .where(staff_accounts.c.id == row.id, staff_accounts.c.password_hash == stored)
                .values(password_hash=_hasher.hash(password))
            )
    return _account(row)
