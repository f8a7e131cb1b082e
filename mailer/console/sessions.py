"""Server-side staff sessions and the signed cookie that names one.

The cookie holds a random session id and its HMAC under the site secret; the table keeps only
the id's SHA-256, so neither a forged cookie nor a copy of the table opens a session. A session
ends when it has been idle longer than ``Rules.idle``, at ``Rules.lifetime`` after login, at
logout, and with its account (removed, or its password set anew). Logging in always opens a
new session (a new id), so an id planted before login is worth nothing after it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from mailer.db.engine import reading
from mailer.db.schema import staff_accounts, staff_sessions

COOKIE_NAME = "mailer_staff"
# last_seen_at is written at most once a minute per session, not on every request.
TOUCH_EVERY = timedelta(minutes=1)


@dataclass(frozen=True)
class Rules:
    """How long a session lasts: ``idle`` without a request, ``lifetime`` in all."""

    idle: timedelta = timedelta(minutes=30)
    lifetime: timedelta = timedelta(hours=12)


@dataclass(frozen=True)
class Session:
    """An open session and the account behind it."""

    id_hash: str
    account_id: int
    email: str
    role: str
    csrf: str
    expires_at: datetime


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def _signature(secret: bytes, session_id: str) -> str:
    mac = hmac.new(secret, b"staff-session:" + session_id.encode(), hashlib.sha256)
    return mac.hexdigest()


def cookie_value(secret: bytes, session_id: str) -> str:
    """``<id>.<HMAC>``: what the browser keeps."""
    return f"{session_id}.{_signature(secret, session_id)}"


def session_id_from(secret: bytes, value: str | None) -> str | None:
    """The session id a cookie names, or None if it is missing, malformed or not ours."""
    if not value or len(value) > 200:
        return None
    session_id, _, signature = value.partition(".")
    if not session_id or not hmac.compare_digest(signature, _signature(secret, session_id)):
        return None
    return session_id


def open_session(
    conn: sa.Connection, account_id: int, *, now: datetime, rules: Rules, ip: str | None
) -> str:
    """Open a new session for the account inside the caller's transaction; its id."""
    session_id = secrets.token_urlsafe(32)
    conn.execute(
        staff_sessions.insert().values(
            id_hash=_digest(session_id),
            account_id=account_id,
            csrf=secrets.token_urlsafe(32),
            created_at=now,
            last_seen_at=now,
            expires_at=now + rules.lifetime,
            ip=(ip or "")[:45] or None,
        )
    )
    return session_id


def find_session(
    engine: sa.Engine, session_id: str, *, now: datetime, rules: Rules, touch: bool = True
) -> Session | None:
    """The open session with this id, or None if there is none or it has ended (an ended one
    is deleted on the way). With ``touch`` (pages and actions) its idle clock restarts;
    without (a script polling JSON) it does not, so a dashboard left open does not keep a
    session alive.

    The lookup only reads (``reading``: no write lock on SQLite, so a console page answers
    while the worker writes); a write transaction is opened only to delete an ended session
    or to write ``last_seen_at``, at most once per ``TOUCH_EVERY``."""
    id_hash = _digest(session_id)
    with reading(engine) as conn:
        row = conn.execute(
            sa.select(
                staff_sessions.c.account_id,
                staff_sessions.c.csrf,
                staff_sessions.c.last_seen_at,
                staff_sessions.c.expires_at,
                staff_accounts.c.email,
                staff_accounts.c.role,
            )
            .join(staff_accounts, staff_accounts.c.id == staff_sessions.c.account_id)
            .where(staff_sessions.c.id_hash == id_hash)
        ).first()
    if row is None:
        return None
    if now >= row.expires_at or now - row.last_seen_at >= rules.idle:
        with engine.begin() as conn:
            conn.execute(staff_sessions.delete().where(staff_sessions.c.id_hash == id_hash))
        return None
    if touch and now - row.last_seen_at >= TOUCH_EVERY:
        with engine.begin() as conn:
            # Only forward: a slower request with an older clock does not move it back.
            conn.execute(
                staff_sessions.update()
                .where(staff_sessions.c.id_hash == id_hash, staff_sessions.c.last_seen_at < now)
                .values(last_seen_at=now)
            )
    return Session(id_hash, row.account_id, row.email, row.role, row.csrf, row.expires_at)


def close_ended(conn: sa.Connection, account_id: int, *, now: datetime, rules: Rules) -> int:
    """Delete the account's sessions that have ended (idle too long or past their lifetime)
    inside the caller's transaction; how many. Login calls it, so ended sessions do not pile
    up for an account whose browser never came back."""
    result = conn.execute(
        staff_sessions.delete().where(
            staff_sessions.c.account_id == account_id,
            sa.or_(
                staff_sessions.c.expires_at <= now,
                staff_sessions.c.last_seen_at <= now - rules.idle,
            ),
        )
    )
    return result.rowcount or 0


def close_session(engine: sa.Engine, session_id: str) -> None:
    """End one session (logout)."""
    with engine.begin() as conn:
        conn.execute(staff_sessions.delete().where(staff_sessions.c.id_hash == _digest(session_id)))


def close_all(conn: sa.Connection, account_id: int) -> int:
    """End every session of an account inside the caller's transaction; how many ended."""
    result = conn.execute(staff_sessions.delete().where(staff_sessions.c.account_id == account_id))
    return result.rowcount or 0
