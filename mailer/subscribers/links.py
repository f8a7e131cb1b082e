"""The URLs a subscriber receives: signed, per person, and stable forever."""

from __future__ import annotations

from functools import cached_property

from mailer.config.settings import SiteSettings
from mailer.subscribers.tokens import Purpose, make_test_token, make_token


class Links:
    """Every per-subscriber link for one uid, each signed only when first asked for.

    A digest needs two of the three; an HMAC is a third of the per-message cost of a message.
    """

    def __init__(self, site: SiteSettings, uid: str) -> None:
        self._secret = site.require_secret()
        self._base = site.base_url
        self._uid = uid

    def _url(self, path: str, purpose: Purpose) -> str:
        return f"{self._base}/{path}/{make_token(self._secret, purpose, self._uid)}"

    @cached_property
    def unsubscribe(self) -> str:
        return self._url("unsubscribe", Purpose.UNSUBSCRIBE)

    @cached_property
    def preferences(self) -> str:
        return self._url("preferences", Purpose.PREFERENCES)

    @cached_property
    def confirm(self) -> str:
        return self._url("confirm", Purpose.CONFIRM)


def links_for(site: SiteSettings, uid: str) -> Links:
    """The links for ``uid``, under the site's base URL."""
    return Links(site, uid)


class InertLinks:
    """The personal links of a test copy: shaped like the reader's, leading to a page that says
    it is a test copy and changes nothing (``mailer.web.testlinks``)."""

    def __init__(self, site: SiteSettings, uid: str) -> None:
        token = make_test_token(site.require_secret(), uid)
        self.unsubscribe = f"{site.base_url}/test/unsubscribe/{token}"
        self.preferences = f"{site.base_url}/test/preferences/{token}"


def inert_links_for(site: SiteSettings, uid: str) -> InertLinks:
    """The inert links standing in for ``uid``'s in a test copy."""
    return InertLinks(site, uid)


def archive_url(site: SiteSettings, issue_id: int) -> str:
    """The public, personal-data-free web copy of an issue."""
    return f"{site.base_url}/archive/{issue_id}"
