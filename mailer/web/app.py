"""The subscriber web app: ``create_app(settings, engine, mailer)`` returns a Starlette app.

Routes (DESIGN.md "URLs"):

====================================  ========================================================
``GET /``                             sign-up page
``POST /subscribe``                   sign-up form target (double opt-in; same page for all)
``GET /confirm/{token}``              confirmation page with one button; never confirms by itself
``POST /confirm/{token}``             the button: confirms, records the evidence, welcome page
``GET /unsubscribe/{token}``          a page with one button; never unsubscribes by itself
``POST /unsubscribe/{token}``         RFC 8058 one-click (urlencoded or multipart) and button
``GET|POST /preferences/{token}``     topics, pause, one-topic unsubscribe, leave
``POST /preferences/{token}/export``  "download my data" (JSON)
``GET|POST /preferences/{token}/delete``  "delete my data" (confirmation form, then erase)
``GET|POST /test/unsubscribe/{token}``  a test copy's inert links: a page, never a change
``GET|POST /test/preferences/{token}``
``GET /privacy``                      the privacy policy and its version
``GET /archive``, ``/archive/{id}``   sent issues, and one as its readers saw it
``GET /embed``                        the embeddable sign-up snippet, for staff to copy
``POST /hooks/articles``              the site pushes one signed article (JSON; mailer.web.hooks)
``GET|POST /websub/{token}``          a WebSub hub's verification and content (mailer.web.websub)
``GET /healthz``                      database check, JSON
``GET /static/style.css``             the one stylesheet
``GET /static/embed.js``              the /embed page's "Copy" button (its only script)
``/staff/…``                          the staff console, behind a login (mailer.console)
====================================  ========================================================
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Literal
from urllib.parse import urlsplit

import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from mailer.clock import now as clock_now
from mailer.compose.rendering import Renderer
from mailer.config.settings import Settings
from mailer.console.app import build_console, console_mount, login_redirect
from mailer.console.context import CONSOLE_HEADERS, PREFIX
from mailer.console.guard import LoginRequired, ReadRefused
from mailer.db.engine import safe_url
from mailer.db.outages import OutageLog
from mailer.errors import DatabaseUnavailable
from mailer.web.account import AccountViews
from mailer.web.context import WebContext
from mailer.web.hooks import HOOK_PATH, HookViews
from mailer.web.pages import Pages
from mailer.web.public import PublicViews
from mailer.web.ratelimit import Limits, RateLimiter
from mailer.web.security import (
    PAGE_CSP,
    BodyLimitMiddleware,
    SecurityHeadersMiddleware,
    page_csp,
)
from mailer.web.sender import ConfirmationSender
from mailer.web.signup import SignupViews
from mailer.web.testlinks import TestLinkViews
from mailer.web.websub import WEBSUB_PATH, WebSubViews

log = logging.getLogger(__name__)


class WebApp(Starlette):
    """Starlette with the security headers outside even its own error middleware, so that a
    500 page carries them too."""

    hsts = False
    csp = PAGE_CSP

    def build_middleware_stack(self) -> ASGIApp:
        return SecurityHeadersMiddleware(
            super().build_middleware_stack(), hsts=self.hsts, csp=self.csp
        )


async def to_console(request: Request) -> Response:
    """``/`` of the console's own listener."""
    return RedirectResponse(PREFIX + "/", status_code=303)


def create_app(
    settings: Settings,
    engine: sa.Engine,
    mailer: ConfirmationSender,
    *,
    limits: Limits | None = None,
    clock: Callable[[], datetime] = clock_now,
    pages: Pages | None = None,
    renderer: Renderer | None = None,
    on_article: Callable[[], None] | None = None,
    part: Literal["all", "public", "staff"] | None = None,
) -> Starlette:
    """The web app. ``mailer`` sends the confirmation mails (``SmtpConfirmationSender`` in
    production); ``clock`` is the one clock; ``limits`` the abuse limits; ``renderer`` renders
    the confirmation mails and the archive (default: the app's own); ``on_article`` is called
    on the event loop after a push stored an article (the service's arrival watch).

    ``part``: ``"all"`` serves the subscriber pages and the staff console under /staff;
    ``"public"`` leaves /staff out; ``"staff"`` is the console alone (its own listener, with
    ``/`` leading to /staff/). Default: ``"public"`` when ``[staff_web]`` gives the console a
    port of its own, else ``"all"``.

    Raises ``ConfigError`` now, not at the first request, if the site secret is missing or the
    privacy policy file cannot be read or rendered.
    """
    if part is None:
        part = "public" if settings.staff_web.separate else "all"
    settings.site.require_secret()
    limits = limits or Limits()
    pages = pages or Pages(settings)
    web = WebContext(
        settings=settings,
        engine=engine,
        sender=mailer,
        pages=pages,
        renderer=renderer or Renderer(),
        limits=limits,
        clock=clock,
        per_ip=RateLimiter(limits.per_ip, limits.per_ip_window),
        per_address=RateLimiter(limits.per_address, limits.per_address_window),
        on_article=on_article,
    )
    signup = SignupViews(web)
    account = AccountViews(web)
    public = PublicViews(web)
    test_links = TestLinkViews(web)
    hooks = HookViews(web)
    websub = WebSubViews(web)
    console = build_console(web)
    if settings.hooks.configured and settings.hooks.secret is None:
        # Said once, when the app starts: the site expects to push, and every push will be 503.
        log.warning(
            "[hooks] is configured but its secret is not set: export %s (named by"
            " [hooks].secret_env) or set [hooks].secret_file; POST %s answers 503 until then",
            settings.hooks.secret_env,
            HOOK_PATH,
        )
    routes: list[BaseRoute] = [
        Route("/", signup.home, methods=["GET"]),
        Route("/subscribe", signup.subscribe, methods=["POST"]),
        Route("/confirm/{token}", signup.confirm_page, methods=["GET"]),
        Route("/confirm/{token}", signup.confirm, methods=["POST"]),
        Route("/embed", signup.embed, methods=["GET"]),
        Route("/unsubscribe/{token}", account.unsubscribe_page, methods=["GET"]),
        Route("/unsubscribe/{token}", account.unsubscribe, methods=["POST"]),
        Route("/preferences/{token}", account.preferences_page, methods=["GET"]),
        Route("/preferences/{token}", account.preferences, methods=["POST"]),
        Route("/preferences/{token}/export", account.export, methods=["POST"]),
        Route("/preferences/{token}/delete", account.delete_page, methods=["GET"]),
        Route("/preferences/{token}/delete", account.delete, methods=["POST"]),
        Route("/test/unsubscribe/{token}", test_links.unsubscribe, methods=["GET", "POST"]),
        Route("/test/preferences/{token}", test_links.preferences, methods=["GET", "POST"]),
        Route("/privacy", public.privacy, methods=["GET"]),
        Route("/archive", public.archive, methods=["GET"]),
        # A plain segment, bounded in the view before it is converted: Starlette's int
        # convertor would turn 5,000 digits into a ValueError (Python refuses to convert more
        # than 4,300), that is a 500.
        Route("/archive/{issue_id}", public.archived_issue, methods=["GET"]),
        # Machine to machine: signed, not a form; caps its own body (see the middleware below).
        Route(HOOK_PATH, hooks.articles, methods=["POST"]),
        # A hub's callback: signed token in the path; content caps its own body too.
        Route(WEBSUB_PATH, websub.verify, methods=["GET"]),
        Route(WEBSUB_PATH, websub.content, methods=["POST"]),
        Route("/healthz", public.healthz, methods=["GET"]),
        Route("/static/style.css", public.stylesheet, methods=["GET"]),
        Route("/static/embed.js", public.embed_script, methods=["GET"]),
    ]
    if part != "public":  # "public": /staff is not there at all (404 like any unknown path)
        routes.append(console_mount(console))
    if part == "staff":
        # The console's own listener: the console, the health check and the stylesheet its
        # error pages use; nothing a subscriber would come for.
        routes = [
            Route("/", to_console, methods=["GET"]),
            Route("/healthz", public.healthz, methods=["GET"]),
            Route("/static/style.css", public.stylesheet, methods=["GET"]),
            console_mount(console),
        ]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if isinstance(exc, ReadRefused):
            # A script's read (the dashboard's poll): JSON it can act on, not an HTML page.
            return JSONResponse(
                {"error": exc.detail, "status": exc.status_code},
                status_code=exc.status_code,
                headers={**CONSOLE_HEADERS, **(exc.headers or {})},
            )
        return pages.error(exc.status_code, exc.detail, headers=exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        # Starlette re-raises the exception after this page is sent, and uvicorn logs it.
        return pages.error(500)

    async def disconnected(request: Request, exc: Exception) -> Response:
        # The client went away before its request body arrived (a dropped connection, or a
        # body uvicorn could not parse): nothing was read, so nothing was done. No one is
        # left to read a response; uvicorn discards it.
        route = request.scope.get("route")
        log.info(
            "client disconnected before sending the whole request",
            extra={"method": request.method, "route": getattr(route, "path", "?")},
        )
        return Response(status_code=400)

    # A database outage is logged once when it starts (however many readers meet it) and once
    # when the first new connection opens again, not once per request.
    outage = OutageLog(
        f"the database at {safe_url(engine.url)}",
        meanwhile="web pages answer 503 until it is back",
    )

    def reachable(*_: object) -> None:
        if outage.down:
            outage.recovered()

    sa.event.listen(engine, "connect", reachable)

    async def unavailable(request: Request, exc: Exception) -> Response:
        # An outage is a 503 page, not a 500 with a traceback.
        assert isinstance(exc, DatabaseUnavailable)
        outage.failed(exc.reason)
        return pages.error(503, headers={"Retry-After": "30"})

    async def login_required(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, LoginRequired)
        return login_redirect(console, exc)

    async def too_large(scope: Scope, receive: Receive, send: Send) -> None:
        await pages.error(413)(scope, receive, send)

    app = WebApp(
        routes=routes,
        middleware=[
            Middleware(
                BodyLimitMiddleware,
                limit=limits.max_body_bytes,
                reject=too_large,
                exempt=(HOOK_PATH,),
                exempt_under=(WEBSUB_PATH.split("{", 1)[0],),
            )
        ],
        exception_handlers={
            HTTPException: http_error,
            ClientDisconnect: disconnected,
            DatabaseUnavailable: unavailable,
            LoginRequired: login_required,
            Exception: server_error,
        },
    )
    app.hsts = urlsplit(settings.site.base_url).scheme == "https"
    app.csp = page_csp(web.image_origin)
    app.state.web = web
    app.state.console = console
    return app
