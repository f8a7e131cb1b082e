"""The HTML pages: autoescaped Jinja2 templates (``mailer/templates/web``) and the privacy policy.

Everything that depends only on the settings (the privacy policy, the embeddable snippet, the
stylesheet) is rendered once here, when the app is built, so that a broken policy file stops
the server at start with a message naming the file, not at the first visitor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from email.utils import parseaddr
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import jinja2
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from jinja2.sandbox import SandboxedEnvironment
from markdown_it import MarkdownIt
from starlette.background import BackgroundTask
from starlette.responses import HTMLResponse

from mailer.compose.rendering import TEMPLATE_DIR, site_view
from mailer.config.settings import Settings
from mailer.errors import ConfigError
from mailer.subscribers.lifecycle import UNCONFIRMED_TTL

WEB_TEMPLATES = TEMPLATE_DIR / "web"
DEFAULT_PRIVACY_POLICY = WEB_TEMPLATES / "privacy.md"

ERROR_TITLES = {
    400: "Something is wrong with that request",
    404: "Page not found",
    405: "That is not how this page works",
    409: "That cannot be done now",
    413: "That was too much data",
    429: "Too many requests",
    500: "Something went wrong on our side",
    503: "Temporarily unavailable",
}
ERROR_TEXTS = {
    404: "There is nothing at this address. Check the link, or start from the sign-up page.",
    405: "This page does not accept that kind of request.",
    413: "The form sent more data than any of our forms needs.",
    429: "Please wait a few minutes and try again.",
    500: "Please try again in a few minutes.",
    503: "We cannot reach our records just now. Please try again in a minute or two; if you"
    " were sending a form, send it again then.",
}


@dataclass(frozen=True)
class TopicOption:
    """A topic as a form shows it: its key, name and description."""

    key: str
    name: str
    description: str


def local_date(value: datetime, zone: ZoneInfo) -> str:
    """``20 February 2027`` in the site's time zone (no platform-specific ``%-d``)."""
    local = value.astimezone(zone)
    return f"{local.day} {local:%B %Y}"


def mask_address(email: str) -> str:
    """``re•••@example.org``: enough to recognize one's address on a page scanners may fetch."""
    local, _, domain = email.partition("@")
    return f"{local[:2]}•••@{domain}"


def render_privacy_policy(settings: Settings) -> str:
    """The privacy policy as HTML: the Markdown file, with the site's details filled in.

    The file (``[site].privacy_policy_file``, else ``mailer/templates/web/privacy.md``) may use
    ``{{ site.name }}``, ``{{ site.publisher }}``, ``{{ site.postal_address }}``,
    ``{{ site.street_address }}`` (the address less a leading publisher's name),
    ``{{ contact }}``, ``{{ version }}`` and ``{{ unconfirmed_days }}``; it runs in Jinja's
    sandbox. Raw HTML in the
    Markdown is not rendered (markdown-it ``html: False``), so the page needs no sanitizer.
    """
    path = settings.site.privacy_policy_file or DEFAULT_PRIVACY_POLICY
    where = str(settings.path) if settings.path else None
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read the privacy policy {path}: {exc}",
            path=where,
            key="site.privacy_policy_file",
        ) from exc
    env = SandboxedEnvironment(
        undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True
    )
    site = settings.site
    try:
        text = env.from_string(source).render(
            site=site_view(settings),
            contact=parseaddr(site.reply_to or site.from_address)[1],
            version=site.privacy_policy_version,
            unconfirmed_days=UNCONFIRMED_TTL.days,
        )
    except jinja2.TemplateError as exc:
        raise ConfigError(
            f"the privacy policy {path} cannot be rendered: {exc}",
            path=where,
            key="site.privacy_policy_file",
        ) from exc
    html: str = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
    return html


class Pages:
    """Renders the web pages; one instance per app."""

    def __init__(self, settings: Settings, template_dir: Path = WEB_TEMPLATES) -> None:
        self.template_dir = template_dir
        self.env = Environment(
            loader=FileSystemLoader(template_dir),
            autoescape=True,
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        prefix = urlsplit(settings.site.base_url).path.rstrip("/")
        self.env.globals.update(
            site=site_view(settings),
            topics=tuple(TopicOption(t.key, t.name, t.description) for t in settings.topics),
            # The public digests offered beside the topics, never pre-ticked (COMPLIANCE.md
            # 6.1); ``default`` is what a sign-up from a form that offers none receives.
            digests=tuple(d for d in settings.digests if d.public),
            policy_version=settings.site.privacy_policy_version,
            base_url=settings.site.base_url,
            unconfirmed_days=UNCONFIRMED_TTL.days,
            logo_url=settings.site.logo_url,
            logo_alt=settings.site.logo_alt or settings.site.name,
        )
        self._prefix = prefix
        self.env.globals["url"] = self.url
        zone = ZoneInfo(settings.site.timezone)
        self.env.filters["local_date"] = lambda value: local_date(value, zone)
        self.privacy_html = render_privacy_policy(settings)
        self.stylesheet = (template_dir / "style.css").read_bytes()
        self.embed_script = (template_dir / "embed.js").read_bytes()
        self.embed_snippet = self.env.get_template("embed.html").render().strip() + "\n"

    def url(self, path: str) -> str:
        """An absolute path on this site (``base_url`` may put the app under a prefix)."""
        return self._prefix + path

    def text(self, name: str, **context: Any) -> str:
        errors = context.get("errors") or []
        # The first message per field, for the message next to its input.
        by_field: dict[str, str] = {}
        for error in errors:
            by_field.setdefault(error.field, error.message)
        context.setdefault("by_field", by_field)
        # base.html leaves the tagline out of the masthead on the page that leads with it.
        context.setdefault("template", name)
        html: str = self.env.get_template(name).render(**context)
        return html

    def render(
        self,
        name: str,
        *,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        background: BackgroundTask | None = None,
        **context: Any,
    ) -> HTMLResponse:
        return HTMLResponse(
            self.text(name, **context),
            status_code=status,
            headers=dict(headers or {}),
            background=background,
        )

    def message(
        self,
        title: str,
        text: str,
        *,
        status: int = 200,
        links: tuple[tuple[str, str], ...] = (),
        headers: Mapping[str, str] | None = None,
    ) -> HTMLResponse:
        """A page with a heading, a paragraph and optional links: (label, href)."""
        return self.render(
            "message.html", status=status, headers=headers, title=title, text=text, links=links
        )

    def error(
        self, status: int, detail: str | None = None, *, headers: Mapping[str, str] | None = None
    ) -> HTMLResponse:
        title = ERROR_TITLES.get(status, "Something is wrong with that request")
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        # Starlette's own errors carry the bare status phrase: say something more useful.
        text = detail if detail and detail != phrase else ERROR_TEXTS.get(status, "")
        return self.message(
            title,
            text,
            status=status,
            headers=headers,
            links=(("Go to the sign-up page", self.url("/")),),
        )
