"""Article files: the site's text format or Markdown with front matter, read into a
``ParsedArticle``.

Parsing is pure (text and ``now`` in, a ``ParsedArticle`` out). A first line of ``+++`` or
``---`` means Markdown with front matter (``mailer.content.front_matter``); anything else is the
site's text format (``mailer.content.site_text``). Both give the same raw fields, checked here
against the field limits and the configured topics.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path, PurePath
from urllib.parse import urlsplit

from mailer.content.article import (
    MAX_BODY,
    MAX_GUID,
    MAX_LINK,
    MAX_SUMMARY,
    MAX_TITLE,
    MAX_WHY,
    PRIORITIES,
    ParsedArticle,
)
from mailer.content.fields import FileContext, RawFields, short
from mailer.content.front_matter import parse_front_matter
from mailer.content.site_text import parse_site_text
from mailer.errors import ArticleError
from mailer.text import one_line, strip_controls

MAX_TEXT = 1_000_000  # characters in one file
MAX_FILE_BYTES = 4 * MAX_TEXT


def parse_article(
    text: str,
    *,
    source: str | None = None,
    default_topic: str | None = None,
    known_topics: Sequence[str],
    now: datetime,
) -> ParsedArticle:
    """Parse one article in the site's text format or Markdown with front matter.

    ``source`` names the file in error messages, and its base name seeds the guid of an article
    that has neither a ``guid`` nor a ``link``. ``default_topic`` applies when the article names
    none; the topic must be one of ``known_topics``. An article without a date is published
    ``now``. Raises ArticleError (with ``path`` and ``line`` where known) for anything invalid.
    """
    ctx = FileContext(source, default_topic, known_topics, now)
    if len(text) > MAX_TEXT:
        raise ctx.error(f"the file has {len(text):,} characters; the limit is {MAX_TEXT:,}")
    text = strip_controls(text.removeprefix("\ufeff"))
    if not text.strip():
        raise ctx.error("the file is empty")
    first = text.split("\n", 1)[0].strip()
    if first in ("+++", "---"):
        fields = parse_front_matter(text, first, ctx)
    else:
        fields = parse_site_text(text, ctx)
    return build_article(fields, ctx)


def load_article_file(
    path: Path,
    *,
    default_topic: str | None,
    known_topics: Sequence[str],
    now: datetime,
) -> ParsedArticle:
    """Read and parse one UTF-8 article file; a first line of ``+++`` or ``---`` means Markdown.

    Errors name the file. The guid of an article without ``guid`` or ``link`` derives from the
    file's name and title, so adding the same file again finds the same article.
    """
    where = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ArticleError(
                f"the file is {size:,} bytes; the limit is {MAX_FILE_BYTES:,}", path=where
            )
        data = path.read_bytes()
    except OSError as exc:
        raise ArticleError(f"cannot read the file: {exc.strerror or exc}", path=where) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ArticleError(
            f"not UTF-8 (byte 0x{data[exc.start]:02x}); save the file as UTF-8",
            path=where,
            line=line,
        ) from exc
    return parse_article(
        text, source=where, default_topic=default_topic, known_topics=known_topics, now=now
    )


def _checked(value: str, name: str, limit: int, ctx: FileContext, line: int | None) -> str:
    if len(value) > limit:
        raise ctx.error(f"{name} is {len(value):,} characters; the limit is {limit:,}", line)
    return value


def build_article(fields: RawFields, ctx: FileContext) -> ParsedArticle:
    """Check raw fields, from a file or a pushed article (``mailer.content.pushed``), against
    the field limits and the known topics into a ``ParsedArticle``; ArticleError if invalid."""
    title_text, title_line = fields.title
    title = _checked(one_line(title_text), "title", MAX_TITLE, ctx, title_line)
    if not title:
        raise ctx.error("the title is empty", title_line)

    topic, topic_line = fields.topic
    topic = one_line(topic) if topic is not None else ctx.default_topic
    known = ", ".join(ctx.known_topics) or "none configured"
    if not topic:
        raise ctx.error(
            "no topic: name one in the front matter (topic: KEY), pass --topic KEY to"
            f" `mailer articles add`, or give its [[sources]] entry a topic (known: {known})",
            topic_line,
        )
    if topic not in ctx.known_topics:
        raise ctx.error(f"unknown topic {short(topic)} (known: {known})", topic_line)

    link_text, link_line = fields.link
    link: str | None = None
    if link_text is not None:
        link = _checked(strip_controls(link_text).strip(), "link", MAX_LINK, ctx, link_line)
        parts = urlsplit(link)
        if parts.scheme not in ("http", "https") or not parts.netloc or re.search(r"\s", link):
            raise ctx.error(f"link must be an http(s) URL, got {short(link)}", link_line)

    guid_text, guid_line = fields.guid
    if guid_text is not None:
        guid = _checked(strip_controls(guid_text).strip(), "guid", MAX_GUID, ctx, guid_line)
        if not guid:
            raise ctx.error("guid is empty: remove it or give a value", guid_line)
    elif link is not None:
        guid = _checked(link, "link (used as the guid)", MAX_GUID, ctx, link_line)
    else:
        name = PurePath(ctx.path).name if ctx.path else ""
        digest = hashlib.sha256(f"{name}\x1f{title.casefold()}".encode()).hexdigest()
        guid = f"urn:mailer:article:{digest[:32]}"

    published, published_line = fields.published
    expires, expires_line = fields.expires
    event_end, event_end_line = fields.event_end
    ends = (("expires", expires, expires_line), ("event_end", event_end, event_end_line))
    for key, end, end_line in ends:
        if published is not None and end is not None and end <= published:
            raise ctx.error(
                f"{key} ({end.isoformat()}) is not after published ({published.isoformat()})",
                end_line or published_line,
            )
    # An event that is over ends the article's life, like an expiry: whichever comes first.
    if event_end is not None and (expires is None or event_end < expires):
        expires = event_end

    priority_text, priority_line = fields.priority
    priority = one_line(priority_text).casefold() if priority_text is not None else "bulk"
    if priority not in PRIORITIES:
        raise ctx.error(
            f"priority must be one of {', '.join(PRIORITIES)}, got {short(priority_text)}",
            priority_line,
        )

    summary_text, summary_line = fields.summary
    why_text, why_line = fields.why
    body_text, body_line = fields.body
    return ParsedArticle(
        guid=guid,
        topic=topic,
        title=title,
        summary=_checked(
            strip_controls(summary_text).strip(), "summary", MAX_SUMMARY, ctx, summary_line
        ),
        why_it_matters=_checked(
            strip_controls(why_text).strip(), "why it matters", MAX_WHY, ctx, why_line
        ),
        body=_checked(strip_controls(body_text), "body", MAX_BODY, ctx, body_line),
        link=link,
        published_at=published if published is not None else ctx.now,
        expires_at=expires,
        date_given=published is not None,
        priority=priority,
    )
