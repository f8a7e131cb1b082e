"""The URLs a subscriber receives: signed, per person, and stable forever."""

from __future__ import annotations

from dataclasses import dataclass

from mailer.config import SiteSettings
from mailer.tokens import Purpose, make_token


@dataclass(frozen=True)
class Links:
    unsubscribe: str
    preferences: str
    confirm: str


def links_for(site: SiteSettings, uid: str) -> Links:
    """Every per-subscriber link for ``uid``, under the site's base URL."""
    secret = site.require_secret()
    base = site.base_url
    return Links(
        unsubscribe=f"{base}/unsubscribe/{make_token(secret, Purpose.UNSUBSCRIBE, uid)}",
        preferences=f"{base}/preferences/{make_token(secret, Purpose.PREFERENCES, uid)}",
        confirm=f"{base}/confirm/{make_token(secret, Purpose.CONFIRM, uid)}",
    )


def archive_url(site: SiteSettings, issue_id: int) -> str:
    """The public, personal-data-free web copy of an issue."""
    return f"{site.base_url}/archive/{issue_id}"
