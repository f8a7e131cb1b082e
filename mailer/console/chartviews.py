"""The charts in the console: ``/staff/charts`` shows them all, ``/staff/charts/NAME.svg`` is
one of them, and ``charts_for_dashboard`` hands them to any page that includes
``staff/_charts.html``.

A chart is its own response, shown with ``<img>``: the console's CSP forbids inline style in
its pages, and an SVG shown as an image runs no script. Each has a text table behind it with
the numbers it draws (the same figures, the same formatting), and a sentence saying what it
shows, for those who do not see it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property, partial
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mailer.console import charts, figures
from mailer.console.figures import (
    COMPLAINT_LIMIT,
    HARD_BOUNCE_LIMIT,
    OUTCOMES,
    RATE_MIN_MESSAGES,
    DayRates,
    IssueOutcomes,
    Week,
)

if TYPE_CHECKING:
    # Only named: the console's context imports the web app, which mounts these routes.
    from mailer.console.context import Console

# The SVG itself may style itself (pygal writes its CSS inside it) and nothing else: no
# script, no fetch, wherever it is opened.
SVG_CSP = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"
SVG_HEADERS = {
    "Content-Security-Policy": SVG_CSP,
    "Cache-Control": "no-store",
    "X-Robots-Tag": "noindex",
}


@dataclass(frozen=True)
class ChartView:
    """One chart as a page shows it: the image, what it shows in a sentence, and its table
    (the first column names the row)."""

    name: str
    title: str
    svg_url: str
    summary: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    @property
    def alt(self) -> str:
        table = " The table below gives its numbers." if self.rows else ""
        return f"Chart: {self.title}. {self.summary}{table}"


@dataclass(frozen=True)
class Figured:
    """A chart's figures, computed once: what a page shows (title, sentence, table) and how
    to draw its picture from the same figures (``picture()``, for the ``.svg`` only: a page
    shows the picture by URL, so it never draws one)."""

    title: str
    summary: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    picture: Callable[[], bytes]


def _day(moment: datetime, zone: ZoneInfo) -> str:
    return moment.astimezone(zone).strftime("%-d %b %Y")


def percent(rate: float) -> str:
    """A rate as its chart writes it."""
    return charts.percent_text(100 * rate)


number = charts.count_text


class Source:
    """The figures of one page or picture as of ``now``, each read from the store once however
    many charts need it (the complaint and hard-bounce charts share the days' rates)."""

    def __init__(self, engine: sa.Engine, now: datetime) -> None:
        self.engine = engine
        self.now = now

    @cached_property
    def weeks(self) -> list[Week]:
        return figures.subscriber_weeks(self.engine, now=self.now)

    @cached_property
    def outcomes(self) -> list[IssueOutcomes]:
        return figures.issue_outcomes(self.engine)

    @cached_property
    def days(self) -> list[DayRates]:
        return figures.rates_by_day(self.engine, now=self.now)


def _subscribers(source: Source, zone: ZoneInfo) -> Figured:
    weeks = source.weeks
    first, last = weeks[0], weeks[-1]
    change = last.active - first.active
    joined = sum(w.signups for w in weeks)
    left = sum(w.unsubscribes for w in weeks)
    summary = (
        f"{last.active:,} active subscribers now, {change:+,d} since {_day(first.end, zone)};"
        f" {joined:,} sign-ups and {left:,} unsubscribes in the last {len(weeks)} weeks."
    )
    rows = tuple(
        (_day(w.end, zone), number(w.active), number(w.signups), number(w.unsubscribes))
        for w in weeks
    )
    if not any(w.active or w.signups or w.unsubscribes for w in weeks):
        summary, rows = "No confirmed subscribers yet.", ()
    return Figured(
        f"Active subscribers, last {len(weeks)} weeks",
        summary,
        ("Week ending", "Active", "Sign-ups", "Unsubscribes"),
        rows,
        partial(charts.subscribers_chart, weeks, zone),
    )


def _deliveries(source: Source, zone: ZoneInfo) -> Figured:
    found = source.outcomes
    if found:
        latest = found[-1]
        c = latest.counts
        summary = (
            f"Issue {latest.issue_id} ({latest.digest}, {_day(latest.scheduled_for, zone)}):"
            f" {c['sent']:,} of {latest.total:,} sent, {c['deferred']:,} deferred,"
            f" {c['bounced']:,} bounced, {c['failed']:,} failed."
        )
    else:
        summary = "No issue has gone out yet."
    return Figured(
        f"Deliveries by outcome, last {figures.ISSUES} issues",
        summary,
        ("Issue", "Slot", *(charts.OUTCOME_LABELS[o] for o in OUTCOMES)),
        tuple(
            (
                f"#{issue.issue_id} {issue.digest}",
                _day(issue.scheduled_for, zone),
                *(number(issue.counts[o]) for o in OUTCOMES),
            )
            for issue in found
        ),
        partial(charts.deliveries_chart, found, zone),
    )


def _rates(source: Source, zone: ZoneInfo, *, complaints: bool) -> Figured:
    days = source.days
    limit = COMPLAINT_LIMIT if complaints else HARD_BOUNCE_LIMIT
    what = "complaint rate" if complaints else "hard-bounce rate"
    today = days[-1].rates
    count, base = (
        (today.complaints, today.accepted) if complaints else (today.hard_bounces, today.attempted)
    )
    rate = today.complaint_rate if complaints else today.hard_bounce_rate
    drawn = any(day.rates.attempted for day in days)
    if not drawn:
        summary = f"No mail sent in the last 30 days: no {what} to show."
    elif not today.attempted:
        summary = f"No mail sent in the last 30 days, so no {what} now; the days before had some."
    else:
        side = "above" if rate > limit else "below"
        summary = (
            f"The {what} over the last 30 days is {percent(rate)} ({count:,} of {base:,}"
            f" messages), {side} the {100 * limit:g} % limit of Gmail and Yahoo."
        )
        if today.attempted < RATE_MIN_MESSAGES:
            summary += (
                f" With fewer than {RATE_MIN_MESSAGES} messages the rate says little, and no"
                " alert is raised."
            )
    return Figured(
        f"{what.capitalize()} over 30 days, against the {100 * limit:g} % limit",
        summary,
        (
            "Day",
            "Complaints" if complaints else "Hard bounces",
            "Messages accepted" if complaints else "Messages sent",
            "30-day rate",
        ),
        tuple(
            (
                _day(day.at, zone),
                number(day.rates.complaints if complaints else day.rates.hard_bounces),
                number(day.rates.accepted if complaints else day.rates.attempted),
                percent(day.rates.complaint_rate if complaints else day.rates.hard_bounce_rate)
                if day.rates.attempted
                else "—",
            )
            for day in days
            if drawn
        ),
        partial(charts.rate_chart, days, zone, complaints=complaints),
    )


def _complaints(source: Source, zone: ZoneInfo) -> Figured:
    return _rates(source, zone, complaints=True)


def _bounces(source: Source, zone: ZoneInfo) -> Figured:
    return _rates(source, zone, complaints=False)


CHARTS: dict[str, Callable[[Source, ZoneInfo], Figured]] = {
    "subscribers": _subscribers,
    "deliveries": _deliveries,
    "complaints": _complaints,
    "bounces": _bounces,
}


def figure(console: Console, name: str, source: Source) -> Figured:
    """Chart ``name`` (a key of ``CHARTS``) from ``source``: its figures and table, its
    picture not drawn yet."""
    zone = ZoneInfo(console.web.settings.site.timezone)
    return CHARTS[name](source, zone)


def draw(console: Console, name: str, now: datetime) -> bytes:
    """Chart ``name``'s picture as of ``now`` (the SVG's bytes)."""
    return figure(console, name, Source(console.web.engine, now)).picture()


def _view(console: Console, name: str, figured: Figured) -> ChartView:
    return ChartView(
        name=name,
        title=figured.title,
        svg_url=console.pages.url(f"/charts/{name}.svg"),
        summary=figured.summary,
        columns=figured.columns,
        rows=figured.rows,
    )


def charts_for_dashboard(
    console: Console, now: datetime, names: Sequence[str] = tuple(CHARTS)
) -> list[ChartView]:
    """The views of the charts ``names`` (all of them by default) as of ``now``, for a page
    that includes ``staff/_charts.html`` with them as ``charts``: each chart's figures once,
    no picture drawn (the page's ``<img>`` asks ``/charts/NAME.svg`` for it). Sync: call it
    in a thread."""
    source = Source(console.web.engine, now)
    return [_view(console, name, figure(console, name, source)) for name in names]


def routes(console: Console) -> list[Route]:
    """``/charts`` (every chart with its table) and ``/charts/NAME.svg`` (one picture)."""

    async def page(request: Request) -> Response:
        member = await console.guard.page(request, "editor")
        now = console.web.clock()
        views = await run_in_threadpool(charts_for_dashboard, console, now)
        return console.render(
            request, "charts.html", member, section="charts", charts=views, now=now
        )

    async def picture(request: Request) -> Response:
        await console.guard.reader(request, "editor")
        name = request.path_params["name"]
        if name not in CHARTS:
            raise HTTPException(404, f"There is no chart named {name!r}.")
        svg = await run_in_threadpool(draw, console, name, console.web.clock())
        return Response(svg, media_type="image/svg+xml", headers=SVG_HEADERS)

    return [
        Route("/charts", page, methods=["GET"]),
        Route("/charts/{name}.svg", picture, methods=["GET"]),
    ]
