"""Who is asking: the staff member behind a request, their role, and each form's CSRF token.

Every console view starts with one call here. A page without a session redirects to the login
page (``LoginRequired``, answered by the app with a 303); an action (a POST, or a JSON read)
without one is a 401; a role too low is a 403; a POST whose CSRF token is missing or wrong is a
403 and changes nothing. The CSRF token is the session's own (random, server-side), compared in
constant time; SameSite=Strict on the cookie is a second wall, not the only one.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import sqlalchemy as sa
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request

from mailer.console import sessions
from mailer.web.context import read_form

Role = Literal["editor", "admin"]
RANK: dict[str, int] = {"editor": 1, "admin": 2}
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
NO_STORE = {"Cache-Control": "no-store"}


@dataclass(frozen=True)
class StaffMember:
    """The logged-in staff member of one request."""

    account_id: int
    email: str
    role: str
    csrf: str  # the token every form of this session carries
    session_hash: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def by(self) -> str:
        """Who did it, as the audit events and the issue history record it."""
        return self.email

    def may(self, role: Role) -> bool:
        return RANK.get(self.role, 0) >= RANK[role]


class ReadRefused(HTTPException):
    """A script's read refused (401 or 403): the app answers it as JSON, not as a page."""


class LoginRequired(Exception):
    """A page was asked for without a session: the app redirects to the login page, which
    comes back to ``next_path`` afterwards."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


@dataclass(frozen=True)
class Guard:
    """Checks sessions, roles and CSRF tokens for the console's views."""

    engine: sa.Engine
    secret: bytes
    rules: sessions.Rules
    clock: Callable[[], datetime]

    async def member(self, request: Request, *, touch: bool = True) -> StaffMember | None:
        """The staff member whose session cookie came with the request, or None; ``touch``
        restarts the session's idle clock (pages and actions do, scripts' reads do not)."""
        session_id = sessions.session_id_from(
            self.secret, request.cookies.get(sessions.COOKIE_NAME)
        )
        if session_id is None:
            return None
        found = await run_in_threadpool(
            lambda: sessions.find_session(
                self.engine, session_id, now=self.clock(), rules=self.rules, touch=touch
            )
        )
        if found is None:
            return None
        return StaffMember(found.account_id, found.email, found.role, found.csrf, found.id_hash)

    async def page(self, request: Request, role: Role = "editor") -> StaffMember:
        """The member for a page: a redirect to the login page without a session, a 403 page
        when their role is too low."""
        member = await self.member(request)
        if member is None:
            path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise LoginRequired(path)
        _require(member, role)
        return member

    async def reader(self, request: Request, role: Role = "editor") -> StaffMember:
        """The member for a read a script makes (JSON): 401 without a session, 403 below
        ``role``, both answered as JSON. It does not restart the idle clock: a dashboard left
        polling does not keep its session alive."""
        member = await self.member(request, touch=False)
        if member is None:
            raise ReadRefused(401, "Your session has ended: log in to the staff console again.")
        if not member.may(role):
            raise ReadRefused(403, f"This needs the {role} role.")
        return member

    async def action(self, request: Request, role: Role = "editor") -> tuple[StaffMember, FormData]:
        """The member and the form of a POST: 401 without a session, 403 below ``role`` or
        without this session's CSRF token (form field ``csrf`` or header X-CSRF-Token)."""
        member = await self.member(request)
        if member is None:
            raise HTTPException(
                401,
                "Your session has ended: log in to the staff console again.",
                headers=NO_STORE,
            )
        _require(member, role)
        form = await read_form(request)
        sent = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER) or ""
        if not isinstance(sent, str) or not hmac.compare_digest(sent, member.csrf):
            raise HTTPException(
                403,
                "This form has expired or did not come from the staff console: nothing was"
                " changed. Reload the page and try again.",
                headers=NO_STORE,
            )
        return member, form


def _require(member: StaffMember, role: Role) -> None:
    # The page names no address (a screenshot or a shared screen shows no one's), and is
    # not kept by the browser's cache.
    if not member.may(role):
        raise HTTPException(
            403, f"This needs the {role} role; your account is an {member.role}.", headers=NO_STORE
        )
