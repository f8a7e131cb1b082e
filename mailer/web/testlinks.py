"""The pages behind a test copy's inert links (``subscribers.links.InertLinks``).

A test copy is the message a reader would get, sent to staff; its unsubscribe and preferences
links carry a token signed for tests, not the reader's. Whatever arrives here (a GET, the
button-less RFC 8058 one-click POST a mailbox provider sends, any form) gets the same page
saying so, with 200 and no redirect: the body is never read, nothing is looked up, nothing
changes. A forged or cut-short token gets the same 400 page as every other link.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from mailer.web.context import NO_STORE, WebContext

# What the link would open in a real copy, by the path segment after /test/.
PAGES = {"unsubscribe": "unsubscribe page", "preferences": "preferences (topics, pause, data)"}


class TestLinkViews:
    """GET and POST on ``/test/unsubscribe/{token}`` and ``/test/preferences/{token}``."""

    __test__ = False  # not a test class, whatever its name says to pytest

    def __init__(self, web: WebContext) -> None:
        self.web = web

    async def unsubscribe(self, request: Request) -> Response:
        return self._page(request, "unsubscribe")

    async def preferences(self, request: Request) -> Response:
        return self._page(request, "preferences")

    def _page(self, request: Request, kind: str) -> Response:
        self.web.test_uid(request.path_params["token"])
        return self.web.pages.render("test_copy.html", headers=NO_STORE, page=PAGES[kind])
