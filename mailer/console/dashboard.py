"""The dashboard (``/staff/``): what each digest sends next, the sends in progress (kept live
by ``console.js`` polling ``/staff/progress.json``), the last issues and the open alerts.

Every figure comes from the functions the CLI prints: ``issues.upcoming`` (``digest
upcoming``), ``progress.sending_now`` and ``progress.list_issues`` (``issues list``),
``staff.alerts.open_alerts``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mailer.console.chartviews import charts_for_dashboard
from mailer.console.context import CONSOLE_HEADERS, Console
from mailer.console.outcomes import (
    countdown,
    no_slot,
    progress_json,
    rate_text,
    segments,
    time_left,
)
from mailer.issues.progress import list_issues, sending_now
from mailer.issues.upcoming import MadeIssue, upcoming
from mailer.staff.alerts import open_alerts

RECENT = 10  # issues the dashboard lists
# The charts the dashboard shows (the rest are on /staff/charts): each costs a few aggregate
# queries per load, so the page an editor opens most stays quick on a large list.
DASHBOARD_CHARTS = ("subscribers", "deliveries")


@dataclass(frozen=True)
class NextIssue:
    """One digest's next issue as the dashboard shows it."""

    key: str
    name: str
    at: datetime | None  # when it goes out (None: no slot left, or made on arrival)
    countdown: str
    state: str  # review, approved, held, or "" for an issue not made yet
    decided: str  # "approved by ana", or ""
    decided_at: datetime | None
    issue_id: int | None
    if_nobody: str  # what happens at the slot if nobody decides; "" without review
    no_slot: str  # why there is no time to count down to ("" when there is one)
    review_opens: datetime | None
    waiting: tuple[MadeIssue, ...]  # issues held past their slot


def routes(console: Console) -> list[Route]:
    """The dashboard and its JSON (its script is one of the console's static files, ``app``)."""
    views = DashboardViews(console)
    return [
        Route("/", views.dashboard, methods=["GET"]),
        Route("/progress.json", views.progress, methods=["GET"]),
    ]


class DashboardViews:
    def __init__(self, console: Console) -> None:
        self.console = console

    async def dashboard(self, request: Request) -> Response:
        console = self.console
        member = await console.guard.page(request)
        web = console.web
        now = web.clock()
        nexts = await run_in_threadpool(self._next_issues, now)
        sending = await run_in_threadpool(sending_now, web.engine, now=now)
        recent = await run_in_threadpool(list_issues, web.engine, limit=RECENT)
        alerts = await run_in_threadpool(open_alerts, web.engine, now=now)
        charts = await run_in_threadpool(charts_for_dashboard, console, now, DASHBOARD_CHARTS)
        return console.render(
            request,
            "dashboard.html",
            member,
            section="dashboard",
            now=now,
            nexts=nexts,
            sending=sending,
            recent=recent,
            alerts=alerts,
            charts=charts,
            segments=segments,
            rate_text=rate_text,
            time_left=time_left,
        )

    async def progress(self, request: Request) -> Response:
        console = self.console
        await console.guard.reader(request)
        now = console.web.clock()
        found = await run_in_threadpool(sending_now, console.web.engine, now=now)
        as_of = console.pages.env.filters["local_time"](now)
        return JSONResponse(progress_json(found, now, as_of), headers=CONSOLE_HEADERS)

    def _next_issues(self, now: datetime) -> list[NextIssue]:
        web = self.console.web
        found = []
        for coming in upcoming(web.engine, web.settings, now=now, count=1):
            digest = web.settings.find_digest(coming.key)
            slot = coming.slots[0] if coming.slots else None
            made = slot.issue if slot else None
            at = slot.goes_out if slot else None
            if_nobody = ""
            if digest is not None and digest.review_minutes > 0:
                if digest.on_unreviewed == "send":
                    if_nobody = "goes out as it is if nobody decides"
                else:
                    if_nobody = "is held if nobody approves it"
            found.append(
                NextIssue(
                    no_slot="" if at else no_slot(digest),
                    key=coming.key,
                    name=coming.name,
                    at=at,
                    countdown=countdown(at, now) if at else "",
                    state=made.status if made else "",
                    decided=made.acted if made else "",
                    decided_at=made.acted_at if made else None,
                    issue_id=made.id if made else None,
                    if_nobody=if_nobody,
                    review_opens=slot.review_opens if slot and not made else None,
                    waiting=coming.waiting,
                )
            )
        return found
