"""The console's record pages: subscribers (admins), articles and sources (editors and admins).

Each page calls the library the command line calls (``mailer subscribers``, ``mailer articles``);
a library error becomes a page naming what is wrong, never a 500.
"""

from __future__ import annotations

from starlette.routing import Route

from mailer.console import article_pages, source_pages, subscriber_pages
from mailer.console.context import Console


def routes(console: Console) -> list[Route]:
    """The subscribers, articles and sources pages."""
    return [
        *subscriber_pages.routes(console),
        *article_pages.routes(console),
        *source_pages.routes(console),
    ]
