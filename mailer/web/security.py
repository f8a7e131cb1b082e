"""Two pure ASGI middlewares: security headers on every response, and a request body cap.

Pure ASGI rather than ``BaseHTTPMiddleware``: they see every response, including Starlette's
own error pages and streamed ones, and cost one dict update per response.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

import h11
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def page_csp(image_origin: str | None = None, *, script: bool = False) -> str:
    """The pages' CSP: no script at all, styles only from our stylesheet, images from us (and
    the masthead logo's ``image_origin``), forms only to ourselves, never framed. ``script``:
    /embed's "Copy" button, a script from our own origin only (never inline)."""
    images = "'self' data:" + (f" {image_origin}" if image_origin else "")
    scripts = " script-src 'self';" if script else ""
    return (
        f"default-src 'none';{scripts} style-src 'self'; img-src {images}; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    )


def image_origin(logo_url: str | None) -> str | None:
    """The origin (``https://host[:port]``) of ``[site].logo_url``, for the pages' img-src; the
    origin, not the URL, because a path may hold characters a CSP cannot quote."""
    if not logo_url:
        return None
    parts = urlsplit(logo_url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}" if parts.netloc else None


PAGE_CSP = page_csp()
# The archive shows an email as its readers saw it: inline styles (css-inlined for mail
# clients) and remote images, still no script, sandboxed into an opaque origin. Its one form,
# the sign-up box, may go to our own sign-up page only.
ARCHIVE_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src https: data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; "
    "sandbox allow-forms allow-popups allow-popups-to-escape-sandbox"
)

log = logging.getLogger(__name__)


def security_headers(*, hsts: bool, csp: str = PAGE_CSP) -> dict[str, str]:
    """The headers every page carries (``hsts`` when served over HTTPS)."""
    headers = {
        "Content-Security-Policy": csp,
        # Links carry capability tokens: never send them on to another site (or our own logs).
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Cross-Origin-Resource-Policy": "same-origin",
        "Permissions-Policy": "camera=(), microphone=(), geolocation=(), interest-cohort=()",
    }
    if hsts:
        headers["Strict-Transport-Security"] = "max-age=31536000"
    return headers


class SecurityHeadersMiddleware:
    """Adds the security headers to every HTTP response; a route may set its own CSP."""

    def __init__(self, app: ASGIApp, *, hsts: bool = False, csp: str = PAGE_CSP) -> None:
        self.app = app
        self.headers = security_headers(hsts=hsts, csp=csp)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        dropped = False

        async def send_with_headers(message: Message) -> None:
            nonlocal dropped
            if dropped:
                return
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.headers.items():
                    if name not in headers:
                        headers[name] = value
            try:
                await send(message)
            except h11.LocalProtocolError:
                # uvicorn already answered 400 to a request it could not parse (a bad chunk
                # size) and closed the connection before a route that does not read the body
                # answered it: nothing was read, so nothing was done, and no one is left to
                # read this response. One turn of the loop lets uvicorn see the connection
                # closed, so it does not report the response as unfinished either.
                dropped = True
                log.info(
                    "response dropped: the request was malformed and already refused",
                    extra={"method": scope.get("method"), "status": message.get("status")},
                )
                await asyncio.sleep(0)

        await self.app(scope, receive, send_with_headers)


class BodyTooLarge(HTTPException):
    """A request body over the app's limit: answered 413, never read further."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"A request body may hold at most {limit} bytes.")


class BodyLimitMiddleware:
    """Refuses request bodies over ``limit`` bytes: by Content-Length before the app runs,
    and by counting while the app reads a body that did not declare its length. The paths in
    ``exempt`` cap their bodies themselves (``POST /hooks/articles``: one article's JSON, larger
    than any form, answered in JSON), and so do the paths under ``exempt_under`` (a WebSub
    hub's feed content, ``/websub/…``)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        limit: int,
        reject: ASGIApp,
        exempt: tuple[str, ...] = (),
        exempt_under: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.limit = limit
        self.reject = reject  # the 413 page
        self.exempt = frozenset(exempt)
        self.exempt_under = exempt_under

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in self.exempt or path.startswith(self.exempt_under):
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.limit
            except ValueError:
                too_large = True
            if too_large:
                await self.reject(scope, receive, send)
                return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counting_receive, send)
