"""An article the site pushes as JSON (``POST /hooks/articles``), read into a ``ParsedArticle``.

The JSON gives the fields an article file gives, by name; they are checked by the same code
that checks a file (``mailer.content.files.build_article``: limits, topic, link, dates,
priority), so a pushed article and a file article cannot disagree on what is valid. What JSON
adds is checked here: the body is one object, every required field is there and is text,
nothing unknown rides along.

Every refusal is a ``PushError`` naming the field, for the 400 answer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from mailer.content.article import ParsedArticle
from mailer.content.fields import FileContext, RawFields, short
from mailer.content.files import build_article
from mailer.content.front_matter import to_datetime
from mailer.errors import ArticleError, MailerError

# Every field of a pushed article, in this order: the order also numbers them, so that an
# ArticleError's "line" (see ``_line``) names the field it is about.
REQUIRED = ("guid", "title", "topic", "summary", "why_it_matters", "body", "link", "published")
OPTIONAL = ("expires", "priority")
FIELDS = REQUIRED + OPTIONAL
# May be empty: an alert is often a title and a summary. The others must say something.
MAY_BE_EMPTY = ("why_it_matters", "body")


class PushError(MailerError, ValueError):
    """A pushed article refused; ``field`` names the field at fault (None: the whole body)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        self.field = field
        self.message = message
        super().__init__(message)


def _line(name: str) -> int:
    return FIELDS.index(name) + 1


def parse_pushed(body: bytes, *, known_topics: Sequence[str], now: datetime) -> ParsedArticle:
    """The article in a pushed JSON ``body``; PushError naming the field if it is not one.

    ``published`` and ``expires`` are ISO 8601 (a date-time without a zone is UTC);
    ``priority`` is "alert" or "bulk" (the default).
    """
    try:
        text = body.decode("utf-8")  # RFC 8259: JSON between systems is UTF-8
    except UnicodeDecodeError as exc:
        raise PushError(f"the body is not UTF-8 (byte {exc.start})") from exc
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise PushError(f"the body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise PushError(f"the body must be one JSON object, got {_kind(data)}")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        names = ", ".join(short(name) for name in unknown[:10])
        raise PushError(
            f"unknown field{'s' if len(unknown) > 1 else ''} {names} (known: {', '.join(FIELDS)})",
            unknown[0],
        )
    for name in REQUIRED:
        if name not in data:
            raise PushError(f"{name} is missing", name)
    for name in FIELDS:
        value = data.get(name)
        if name in OPTIONAL and value is None:
            continue
        if not isinstance(value, str):
            raise PushError(f"{name} must be a string, got {_kind(value)}", name)
        if name not in MAY_BE_EMPTY and not value.strip():
            raise PushError(f"{name} is blank", name)
    ctx = FileContext(None, None, known_topics, now)
    try:
        fields = RawFields(
            title=(data["title"], _line("title")),
            summary=(data["summary"], _line("summary")),
            why=(data["why_it_matters"], _line("why_it_matters")),
            body=(data["body"], _line("body")),
            topic=(data["topic"], _line("topic")),
            link=(data["link"], _line("link")),
            guid=(data["guid"], _line("guid")),
            published=(_date(data, "published", ctx), _line("published")),
            expires=(_date(data, "expires", ctx), _line("expires")),
            priority=(data.get("priority"), _line("priority")),
        )
        return build_article(fields, ctx)
    except ArticleError as exc:
        field = FIELDS[exc.line - 1] if exc.line is not None and exc.line <= len(FIELDS) else None
        raise PushError(exc.reason, field) from exc


def _date(data: dict[str, Any], name: str, ctx: FileContext) -> datetime | None:
    value = data.get(name)
    return None if value is None else to_datetime(value, name, ctx, _line(name))


def _kind(value: object) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return kinds.get(type(value), "a number")
