"""What every view needs, built once by ``create_app``, and small request helpers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request

from mailer.compose.rendering import Renderer
from mailer.config.settings import Settings
from mailer.errors import TokenError
from mailer.subscribers.tokens import Purpose, read_test_token, read_token
from mailer.web.pages import Pages
from mailer.web.ratelimit import Limits, RateLimiter
from mailer.web.security import image_origin
from mailer.web.sender import ConfirmationSender

MAX_FORM_FIELDS = 50
NO_STORE = {"Cache-Control": "no-store", "X-Robots-Tag": "noindex"}
INVALID_LINK = (
    "This link is not valid. Check that you opened the whole link from the email; "
    "if it was split over two lines, copy both parts."
)


@dataclass(frozen=True)
class WebContext:
    """What every view needs: settings, engine, the confirmation sender, pages, renderer and
    request limits."""

    settings: Settings
    engine: sa.Engine
    sender: ConfirmationSender
    pages: Pages
    renderer: Renderer
    limits: Limits
    clock: Callable[[], datetime]
    per_ip: RateLimiter
    per_address: RateLimiter
    # Called on the event loop when a push stored an article (``mailer run`` wakes its arrival
    # watch with it, instead of finding the article at its next poll); None: nobody listens.
    on_article: Callable[[], None] | None = None

    @property
    def image_origin(self) -> str | None:
        """Where the masthead logo comes from, for the pages' CSP (None: no logo)."""
        return image_origin(self.settings.site.logo_url)

    @property
    def topic_choices(self) -> tuple[tuple[str, str], ...]:
        return tuple((t.key, t.name) for t in self.settings.topics)

    @property
    def offered_digests(self) -> tuple[str, ...]:
        """The keys of the digests readers may choose (``public``), in config order."""
        return tuple(d.key for d in self.settings.digests if d.public)

    def uid(self, token: str, purpose: Purpose) -> str:
        """The uid a link token stands for; a 400 page if it is forged, cut short or foreign."""
        try:
            return read_token(self.settings.site.require_secret(), purpose, token)
        except TokenError as exc:
            raise HTTPException(400, INVALID_LINK) from exc

    def test_uid(self, token: str) -> str:
        """The uid a test copy's link token stands for; the same 400 page as ``uid``."""
        try:
            return read_test_token(self.settings.site.require_secret(), token)
        except TokenError as exc:
            raise HTTPException(400, INVALID_LINK) from exc


def client_ip(request: Request) -> str | None:
    """The peer address (uvicorn rewrites it from X-Forwarded-For only for trusted proxies)."""
    return request.client.host if request.client else None


def user_agent(request: Request) -> str | None:
    """The request's User-Agent header, if it sent one (recorded as consent evidence)."""
    return request.headers.get("user-agent")


async def read_form(request: Request) -> FormData:
    """The submitted form: urlencoded or multipart, no files, a bounded number of fields.

    A malformed body becomes a 400 page (Starlette raises HTTPException for it); a body over
    the limit a 413 page (``BodyLimitMiddleware``).
    """
    return await request.form(max_files=0, max_fields=MAX_FORM_FIELDS)
