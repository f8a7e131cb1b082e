"""What every console view needs, and how a console page is answered.

A console page carries the site's security headers with a CSP of its own: scripts from our
own origin only (``/staff/static/console.js``, never inline), images from us (the charts), no
frames of other origins; and ``Cache-Control: no-store``, so a shared computer's back button
shows nobody's record after logout.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse

from mailer.compose.rendering import TEMPLATE_DIR, site_view
from mailer.console.guard import CSRF_FIELD, Guard, StaffMember
from mailer.web.context import WebContext
from mailer.web.pages import local_date

CONSOLE_TEMPLATES = TEMPLATE_DIR / "staff"
PREFIX = "/staff"
# The console's pages may run our own script and frame our own issue previews (sandboxed).
CONSOLE_CSP = (
    "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self'; "
    "img-src 'self' data:; frame-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'"
)
CONSOLE_HEADERS = {
    "Content-Security-Policy": CONSOLE_CSP,
    "Cache-Control": "no-store",
    "X-Robots-Tag": "noindex",
}


class ConsolePages:
    """Renders the console's templates (``mailer/templates/staff``)."""

    def __init__(self, web: WebContext, template_dir: Path = CONSOLE_TEMPLATES) -> None:
        self.env = Environment(
            loader=FileSystemLoader(template_dir),
            autoescape=True,
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        zone = ZoneInfo(web.settings.site.timezone)
        self.env.globals.update(
            site=site_view(web.settings),
            url=self.url,
            csrf_field_name=CSRF_FIELD,
        )
        self.env.filters["local_date"] = lambda value: local_date(value, zone)
        self.env.filters["local_time"] = lambda value: (
            value.astimezone(zone).strftime("%a %-d %b %Y, %H:%M %Z") if value else "—"
        )
        self.url_prefix = web.pages.url("")
        self.stylesheet = (template_dir / "console.css").read_bytes()

    def url(self, path: str) -> str:
        """An absolute path inside the console (``url('/issues/4')`` is /staff/issues/4)."""
        return self.url_prefix + PREFIX + path

    def render(
        self,
        name: str,
        member: StaffMember | None,
        *,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        **context: Any,
    ) -> HTMLResponse:
        """A console page; ``member`` is None only on the login pages."""
        html = self.env.get_template(name).render(member=member, template=name, **context)
        return HTMLResponse(
            html, status_code=status, headers={**CONSOLE_HEADERS, **(headers or {})}
        )


@dataclass(frozen=True)
class Console:
    """The console's views share this: the web app's context, the guard and the pages."""

    web: WebContext
    guard: Guard
    pages: ConsolePages

    def render(
        self, request: Request, name: str, member: StaffMember | None, **context: Any
    ) -> HTMLResponse:
        """A console page, with the notice a redirect left for it."""
        context.setdefault("notice", self.notice(request, member))
        return self.pages.render(name, member, **context)

    def redirect(
        self, path: str, *, notice: str | None = None, member: StaffMember | None = None
    ) -> RedirectResponse:
        """A 303 to a console path (after a POST, so a reload does not post again), with a
        one-line ``notice`` the next page shows ("Issue 4 approved."). The notice is signed,
        and for a ``member`` the signature includes their session: a link made elsewhere, or
        copied from another session, cannot put words on a console page. A notice travels in
        a URL (history, logs), so it names records by number, never a person's address."""
        target = self.pages.url(path)
        if notice:
            signed = urlencode({"notice": notice, "ns": self._sign(notice, member)})
            target += ("&" if "?" in target else "?") + signed
        return RedirectResponse(target, status_code=303, headers=CONSOLE_HEADERS)

    def notice(self, request: Request, member: StaffMember | None = None) -> str | None:
        """The notice a redirect passed to this page, if its signature holds for this
        ``member``'s session (None: the login pages, without a session)."""
        text = request.query_params.get("notice")
        signature = request.query_params.get("ns", "")
        if not text or not hmac.compare_digest(signature, self._sign(text, member)):
            return None
        return text

    def _sign(self, text: str, member: StaffMember | None) -> str:
        secret = self.web.settings.site.require_secret()
        session = member.session_hash if member is not None else ""
        message = b"staff-notice:" + session.encode() + b":" + text.encode()
        return hmac.new(secret, message, hashlib.sha256).hexdigest()[:32]
