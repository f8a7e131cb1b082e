"""What the record pages (subscribers, articles, sources) share: the page size and the
problem page (ids and page numbers are read by ``mailer.console.inputs``)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from mailer.console.context import Console
from mailer.console.guard import StaffMember

PER_PAGE = 25


def problem(
    console: Console,
    request: Request,
    member: StaffMember,
    *,
    status: int,
    title: str,
    text: str,
    section: str,
    back: tuple[str, str],
) -> Response:
    """A page saying what is wrong (a record that is gone, a library refusal) and where to go."""
    return console.render(
        request,
        "record_problem.html",
        member,
        status=status,
        section=section,
        title=title,
        text=text,
        back=back,
    )
