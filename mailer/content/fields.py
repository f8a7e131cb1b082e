"""What an article file gives before it is checked, whichever its format: the raw fields, each
with the line it came from, and the context its errors are raised in.

``mailer.content.site_text`` and ``mailer.content.front_matter`` fill ``RawFields``;
``mailer.content.files`` checks them into a ``ParsedArticle``.
"""

from __future__ import annotations

import reprlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from mailer.errors import ArticleError

# A summary may run over several paragraphs when "Why this matters" follows within this many;
# otherwise it is one paragraph, so a stray heading deep in the body cannot swallow the body.
MAX_SUMMARY_PARAGRAPHS = 5


@dataclass(frozen=True)
class FileContext:
    """Where a file's errors point (``path``) and what its fields are checked against."""

    path: str | None
    default_topic: str | None
    known_topics: Sequence[str]
    now: datetime

    def error(self, message: str, line: int | None = None) -> ArticleError:
        return ArticleError(message, path=self.path, line=line)


class RawFields(NamedTuple):
    """Raw fields from either format, each with the line it came from (None if unknown)."""

    title: tuple[str, int | None]
    summary: tuple[str, int | None]
    why: tuple[str, int | None]
    body: tuple[str, int | None]
    topic: tuple[str | None, int | None]
    link: tuple[str | None, int | None]
    guid: tuple[str | None, int | None]
    published: tuple[datetime | None, int | None]
    expires: tuple[datetime | None, int | None]
    # When the event an article announces is over: the article's life ends with it.
    event_end: tuple[datetime | None, int | None] = (None, None)
    # "alert" or "bulk" (the default): an alert leads every issue that takes it.
    priority: tuple[str | None, int | None] = (None, None)


# Bounded: a plain repr() of a YAML value built from nested aliases can run to gigabytes.
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 2


def short(value: object) -> str:
    """``value`` as a bounded repr for an error message."""
    return _REPR.repr(value)


def section_kind(name: str) -> str:
    """ "summary" for a Summary heading's name, else "why" (Why this / it matters)."""
    return "summary" if name.casefold() == "summary" else "why"
