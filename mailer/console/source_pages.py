"""The sources page (editors and admins): each ``[[sources]]`` entry with its last fetch, last
success, failures in a row, last error, when it is fetched next and its WebSub hub; the facts
``mailer articles sources`` prints, from the same reading (``source_status``).
"""

from __future__ import annotations

import functools

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mailer.console.context import Console
from mailer.content.source_status import hub_state, next_attempt, source_statuses
from mailer.issues.schedule import local_time


class SourcePages:
    """The view; it starts with the guard (role editor)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.web = console.web

    async def sources(self, request: Request) -> Response:
        """``GET /staff/sources``."""
        member = await self.console.guard.page(request, "editor")
        settings = self.web.settings
        now = self.web.clock()
        found = await run_in_threadpool(lambda: source_statuses(self.web.engine, settings, now=now))
        at = functools.partial(local_time, zone=settings.site.timezone)
        return self.console.render(
            request,
            "sources.html",
            member,
            section="sources",
            sources=[
                {
                    "status": s,
                    "next": next_attempt(s, settings, at) if s.state is not None else "",
                    "hub": hub_state(s.subscription, now, at) if s.subscription else "",
                }
                for s in found
            ],
            topic_names=dict(self.web.topic_choices),
        )


def routes(console: Console) -> list[Route]:
    views = SourcePages(console)
    return [Route("/sources", views.sources, methods=["GET"])]
