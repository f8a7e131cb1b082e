"""Logging in and out of the console, and setting a password from a one-time link.

``GET|POST /staff/login``, ``GET|POST /staff/welcome/{token}``, ``POST /staff/logout``.

A login form is posted before there is a session, so the session's CSRF token cannot protect
it. It carries a signed pre-session token instead: the login (or welcome) page sets a random
nonce in a cookie of its own (``Secure``, ``HttpOnly``, ``SameSite=Strict``) and puts
``nonce.issued.HMAC`` in the form; the POST is taken only if the signature holds, the token is
less than ``FORM_LIFETIME`` old and its nonce is the cookie's. Another site can neither read
the token nor send the cookie (SameSite=Strict), so it cannot log a browser into an account of
its choosing. (An Origin/Referer check was not chosen: the console's pages send no referrer,
and browsers then send ``Origin: null`` with a form.)

Logging in always opens a new session (a new id) and closes the one the old cookie named.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mailer.console import accounts, logins, sessions
from mailer.console.context import Console
from mailer.console.wording import sentence
from mailer.db import audit
from mailer.errors import PasswordRejected, StaffLinkError
from mailer.web.context import client_ip, read_form

FORM_COOKIE = "mailer_staff_form"
FORM_FIELD = "form_token"
FORM_LIFETIME = timedelta(hours=1)
NONCE = re.compile(r"[A-Za-z0-9_-]{22}")

log = logging.getLogger(__name__)


def routes(console: Console) -> list[Route]:
    views = LoginViews(console)
    return [
        Route("/login", views.login_page, methods=["GET"]),
        Route("/login", views.login, methods=["POST"]),
        Route("/logout", views.logout, methods=["POST"]),
        Route("/welcome/{token}", views.welcome_page, methods=["GET"]),
        Route("/welcome/{token}", views.welcome, methods=["POST"]),
    ]


class LoginViews:
    """The login, logout and welcome (set a password) views."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.web = console.web
        self.secret = console.web.settings.site.require_secret()
        limits = console.web.limits
        self.limits = logins.Limits(
            per_account=limits.staff_login_per_account,
            per_address=limits.staff_login_per_address,
            window=timedelta(seconds=limits.staff_login_window),
        )
        self.cookie_path = console.pages.url("")

    # -- the pre-session form token --------------------------------------------------------

    def _form_mac(self, nonce: str, issued: int) -> str:
        message = f"staff-form:{nonce}.{issued}".encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()

    def _form_page(
        self, request: Request, template: str, *, status: int = 200, **context: Any
    ) -> Response:
        """A login or welcome page, with a fresh form token and its cookie."""
        # The browser's nonce is kept while it has one, so a page in another tab (or the
        # page a refused login answers with) does not void the form it already shows.
        nonce = request.cookies.get(FORM_COOKIE, "")
        if not NONCE.fullmatch(nonce):
            nonce = secrets.token_urlsafe(16)
        issued = int(self.web.clock().timestamp())
        token = f"{nonce}.{issued}.{self._form_mac(nonce, issued)}"
        context.setdefault("notice", self.console.notice(request))
        response = self.console.pages.render(
            template, None, status=status, form_token=token, form_field=FORM_FIELD, **context
        )
        response.set_cookie(
            FORM_COOKIE,
            nonce,
            max_age=int(FORM_LIFETIME.total_seconds()),
            path=self.cookie_path,
            secure=True,
            httponly=True,
            samesite="strict",
        )
        return response

    def _form_ok(self, request: Request, form: FormData) -> bool:
        sent = form.get(FORM_FIELD)
        if not isinstance(sent, str) or len(sent) > 200:
            return False
        nonce, _, rest = sent.partition(".")
        issued_text, _, mac = rest.partition(".")
        if (
            not nonce
            or not (issued_text.isascii() and issued_text.isdigit())
            or len(issued_text) > 12
        ):
            return False
        issued = int(issued_text)
        if not hmac.compare_digest(mac, self._form_mac(nonce, issued)):
            return False
        age = self.web.clock().timestamp() - issued
        if not 0 <= age <= FORM_LIFETIME.total_seconds():
            return False
        cookie = request.cookies.get(FORM_COOKIE, "")
        return hmac.compare_digest(cookie.encode(), nonce.encode())

    # -- login -----------------------------------------------------------------------------

    def safe_next(self, value: object) -> str:
        """Where to go after login: a path under /staff/ on this host, else the dashboard."""
        home = self.console.pages.url("/")
        if not isinstance(value, str) or not value or len(value) > 2000:
            return home
        if any(ch in value for ch in "\\\r\n\t") or value.startswith("//"):
            return home
        # Encoded dots, slashes and backslashes have no place in a console path: a server or
        # proxy that decodes them could read /staff/%2e%2e/ as a path outside the console.
        if any(code in value.lower() for code in ("%2e", "%2f", "%5c")):
            return home
        parts = urlsplit(value)
        if parts.scheme or parts.netloc or not parts.path.startswith(home):
            return home
        if "//" in parts.path or any(seg in (".", "..") for seg in parts.path.split("/")):
            return home
        return value

    async def login_page(self, request: Request) -> Response:
        return self._form_page(
            request,
            "login.html",
            next=self.safe_next(request.query_params.get("next")),
            email="",
            error=None,
        )

    async def login(self, request: Request) -> Response:
        form = await read_form(request)
        typed = str(form.get("email") or "")[:320]
        password = str(form.get("password") or "")
        target = self.safe_next(form.get("next"))
        now = self.web.clock()
        client = client_ip(request)

        def refused(error: str, status: int) -> Response:
            return self._form_page(
                request, "login.html", status=status, next=target, email=typed, error=error
            )

        if not self._form_ok(request, form):
            # Anyone can post this: a log line, not an audit event per request.
            log.info("staff login refused: form token missing or wrong", extra={"ip": client})
            return refused(
                "This login form had expired or did not come from this page. Try again.", 403
            )
        account_key = logins.account_key(typed)
        address = logins.address_key(client)
        # Recorded as a failure before the password is checked, and counted with it: logins
        # sent at once cannot all slip under the limit.
        attempt = await run_in_threadpool(
            lambda: logins.attempt(
                self.web.engine, account_key, address, now=now, limits=self.limits
            )
        )
        if attempt.blocked is not None:
            blocked = attempt.blocked
            log.warning(
                "staff login refused: too many failures",
                extra={"limit": blocked.by, "ip": client},
            )
            whose = "this account" if blocked.by == "account" else "your network address"
            plural = "" if blocked.minutes == 1 else "s"
            return refused(
                f"Too many failed logins for {whose}. Wait {blocked.minutes} minute{plural}"
                " and try again.",
                429,
            )
        account = await run_in_threadpool(accounts.verify, self.web.engine, typed, password, now)
        if account is None:
            await run_in_threadpool(self._audit_refused, account_key, "password", request)
            return refused("Wrong address or password.", 401)
        await run_in_threadpool(logins.succeeded, self.web.engine, attempt.id)
        session_id = await run_in_threadpool(self._open, request, account.id, account.email)
        response = self.console.redirect(target.removeprefix(self.console.pages.url("")))
        # A browser-session cookie (no Max-Age or Expires): it goes when the browser closes,
        # and the server ends the session at its idle time or lifetime whatever the cookie.
        response.set_cookie(
            sessions.COOKIE_NAME,
            sessions.cookie_value(self.secret, session_id),
            path=self.cookie_path,
            secure=True,
            httponly=True,
            samesite="strict",
        )
        response.delete_cookie(
            FORM_COOKIE, path=self.cookie_path, secure=True, httponly=True, samesite="strict"
        )
        return response

    def _open(self, request: Request, account_id: int, email: str) -> str:
        """Close the session the old cookie named (rotation), open a new one, record it."""
        now = self.web.clock()
        old = sessions.session_id_from(self.secret, request.cookies.get(sessions.COOKIE_NAME))
        if old is not None:
            sessions.close_session(self.web.engine, old)
        with self.web.engine.begin() as conn:
            sessions.close_ended(conn, account_id, now=now, rules=self.console.guard.rules)
            session_id = sessions.open_session(
                conn, account_id, now=now, rules=self.console.guard.rules, ip=client_ip(request)
            )
            audit.record(conn, None, "staff.login", now, by=email, ip=client_ip(request))
        return session_id

    def _audit_refused(self, who: str, reason: str, request: Request) -> None:
        with self.web.engine.begin() as conn:
            audit.record(
                conn,
                None,
                "staff.login_refused",
                self.web.clock(),
                by=who,
                reason=reason,
                ip=client_ip(request),
            )

    async def logout(self, request: Request) -> Response:
        member, _ = await self.console.guard.action(request)
        session_id = sessions.session_id_from(
            self.secret, request.cookies.get(sessions.COOKIE_NAME)
        )

        def close() -> None:
            if session_id is not None:
                sessions.close_session(self.web.engine, session_id)
            with self.web.engine.begin() as conn:
                audit.record(conn, None, "staff.logout", self.web.clock(), by=member.by)

        await run_in_threadpool(close)
        response = self.console.redirect("/login", notice="You are logged out.")
        response.delete_cookie(
            sessions.COOKIE_NAME,
            path=self.cookie_path,
            secure=True,
            httponly=True,
            samesite="strict",
        )
        return response

    # -- welcome: set a password from the one-time link ------------------------------------

    async def welcome_page(self, request: Request) -> Response:
        # Only looks the link up: using it takes the POST.
        token = request.path_params["token"]
        try:
            account = await run_in_threadpool(
                accounts.link_account, self.web.engine, token, self.web.clock()
            )
        except StaffLinkError as exc:
            return self._link_error(exc)
        return self._form_page(
            request,
            "welcome.html",
            account=account,
            error=None,
            min_length=accounts.MIN_LENGTH,
            action=self.console.pages.url("/welcome/" + token),
        )

    def _link_error(self, exc: StaffLinkError) -> Response:
        return self.console.pages.render(
            "welcome_invalid.html",
            None,
            status=410 if exc.reason == "expired" else 404,
            expired=exc.reason == "expired",
            message=sentence(exc),
            notice=None,
        )

    async def welcome(self, request: Request) -> Response:
        token = request.path_params["token"]
        form = await read_form(request)
        now = self.web.clock()
        try:
            account = await run_in_threadpool(accounts.link_account, self.web.engine, token, now)
        except StaffLinkError as exc:
            return self._link_error(exc)

        def again(error: str, status: int) -> Response:
            return self._form_page(
                request,
                "welcome.html",
                status=status,
                account=account,
                error=error,
                min_length=accounts.MIN_LENGTH,
                action=self.console.pages.url("/welcome/" + token),
            )

        if not self._form_ok(request, form):
            return again("This form had expired or did not come from this page. Try again.", 403)
        password = str(form.get("password") or "")
        if password != str(form.get("confirm") or ""):
            return again("The two passwords are not the same.", 400)
        try:
            await run_in_threadpool(accounts.set_password, self.web.engine, token, password, now)
        except PasswordRejected as exc:
            return again(str(exc)[:1].upper() + str(exc)[1:] + ".", 400)
        except StaffLinkError as exc:
            return self._link_error(exc)
        return self.console.redirect("/login", notice="Your password is set: log in with it.")
