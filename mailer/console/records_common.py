"""What the record pages (``records``) share: ids in paths, page numbers, the problem page."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from mailer.console.context import Console
from mailer.console.guard import StaffMember

# A record's id in a path: digits, bounded before they are converted (Starlette's int
# convertor would turn thousands of digits into a ValueError, that is a 500).
MAX_ID_DIGITS = 18
PER_PAGE = 25


def record_id(request: Request, name: str = "record_id") -> int | None:
    """The id a path names, or None if it is not one (the view answers 404)."""
    text = str(request.path_params.get(name, ""))
    if not text.isascii() or not text.isdigit() or len(text) > MAX_ID_DIGITS:
        return None
    return int(text)


def page_number(request: Request) -> int:
    """The ``page`` a listing asks for, from 1; anything else is page 1."""
    text = request.query_params.get("page", "1")
    if text.isascii() and text.isdigit() and 0 < len(text) <= 6:
        return max(1, int(text))
    return 1


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
