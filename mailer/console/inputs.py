"""What the console reads from a request: ids in paths and forms, and page numbers.

One parser for every id the console takes, so each page bounds it the same way: digits only,
and at most ``MAX_ID_DIGITS`` of them before they are converted (Starlette's ``int``
convertor would turn thousands of digits into a ValueError, that is a 500). What an id that is
not one means (a 404 page naming the kind of record, a 400 for a form) is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

# Every id is a BIGINT (at most 19 digits); 18 digits always fit.
MAX_ID_DIGITS = 18
# Page numbers past this are not asked for by any link: they are page 1, as any other junk.
MAX_PAGE_DIGITS = 6


def parse_id(text: object) -> int | None:
    """``text`` as a record's id (ASCII digits, at most ``MAX_ID_DIGITS``), or None."""
    if not isinstance(text, str) or not text.isascii() or not text.isdigit():
        return None
    if len(text) > MAX_ID_DIGITS:
        return None
    return int(text)


def path_id(request: Request, name: str) -> int | None:
    """The id the path parameter ``name`` holds, or None if it is not one."""
    return parse_id(request.path_params.get(name))


def page_number(request: Request) -> int:
    """The ``page`` a listing asks for, from 1; anything else is page 1."""
    text = request.query_params.get("page", "1")
    if text.isascii() and text.isdigit() and 0 < len(text) <= MAX_PAGE_DIGITS:
        return max(1, int(text))
    return 1


def last_page(total: int, per_page: int) -> int:
    """How many pages ``total`` rows fill, ``per_page`` a page; 1 when there are none."""
    return max(1, -(-total // per_page))


class Counted(Protocol):
    """A page of rows that knows how many rows there are in all."""

    @property
    def total(self) -> int: ...


PageT = TypeVar("PageT", bound=Counted)


async def fetch_page(
    request: Request, fetch: Callable[[int], PageT], per_page: int
) -> tuple[int, PageT]:
    """The page the request asks for and its rows, read by ``fetch(page)`` in a thread; a
    page past the end (an old link, a typed number) is the last page there is."""
    page = page_number(request)
    found = await run_in_threadpool(fetch, page)
    pages = last_page(found.total, per_page)
    if page > pages:
        page = pages
        found = await run_in_threadpool(fetch, page)
    return page, found
