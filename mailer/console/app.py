"""The console's routes, mounted under ``/staff`` by the web app (``mailer.web.app``).

Each group of pages is a module with ``routes(console)``; this module puts them together.
"""

from __future__ import annotations

from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route

from mailer.console import (
    accountpages,
    article_pages,
    chartviews,
    dashboard,
    issues,
    login,
    source_pages,
    subscriber_pages,
)
from mailer.console.context import (
    CONSOLE_HEADERS,
    CONSOLE_TEMPLATES,
    PREFIX,
    Console,
    ConsolePages,
)
from mailer.console.guard import Guard, LoginRequired
from mailer.console.sessions import Rules
from mailer.web.context import WebContext

LOGIN_PATH = "/login"
STATIC_HEADERS = {"Cache-Control": "public, max-age=3600"}


def build_console(web: WebContext, rules: Rules | None = None) -> Console:
    """The console's shared state for one app."""
    guard = Guard(
        engine=web.engine,
        secret=web.settings.site.require_secret(),
        rules=rules
        or Rules(idle=web.settings.staff_web.idle, lifetime=web.settings.staff_web.lifetime),
        clock=web.clock,
    )
    return Console(web=web, guard=guard, pages=ConsolePages(web))


def console_mount(console: Console) -> Mount:
    """Every console route, under ``/staff``."""

    routes: list[Route] = [
        static_file("console.css", console.pages.stylesheet, "text/css"),
        static_file(
            "console.js", (CONSOLE_TEMPLATES / "console.js").read_bytes(), "text/javascript"
        ),
        *dashboard.routes(console),
        *issues.routes(console),
        *subscriber_pages.routes(console),
        *article_pages.routes(console),
        *source_pages.routes(console),
        *login.routes(console),
        *accountpages.routes(console),
        *chartviews.routes(console),
    ]
    return Mount(PREFIX, routes=routes)


def static_file(name: str, body: bytes, media_type: str) -> Route:
    """``/static/NAME``: one of the console's own files, the same for everyone (no session)."""

    async def serve(request: Request) -> Response:
        return Response(body, media_type=media_type, headers=STATIC_HEADERS)

    return Route(f"/static/{name}", serve, methods=["GET"])


def login_redirect(console: Console, exc: LoginRequired) -> Response:
    """A page asked for without a session: to the login page, and back here afterwards."""
    target = console.pages.url(LOGIN_PATH) + "?" + urlencode({"next": exc.next_path})
    return RedirectResponse(target, status_code=303, headers=CONSOLE_HEADERS)
