"""Parse a feed: pure; the fetched bytes → ``ParsedFeed`` of ``ParsedArticle``.

RSS 2.0, RSS 1.0 and Atom, read by feedparser; entry HTML made plain text by
``mailer.content.feeds.html``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import xml.sax
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import feedparser

from mailer.config.checks import category_key
from mailer.content.article import (
    MAX_BODY,
    MAX_GUID,
    MAX_LINK,
    MAX_SUMMARY,
    MAX_TITLE,
    ParsedArticle,
)
from mailer.content.feeds.html import html_to_text, plain_to_text, sanitize_html
from mailer.errors import ConfigError, FeedError
from mailer.text import one_line, strip_controls

log = logging.getLogger(__name__)

# A feed description that is the whole article is cut to its leading paragraphs for the summary
# (the digest shows the summary); the full text goes to the body.
SUMMARY_LEAD = 1_000


def _truncate(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters at a word boundary, marked with "…"."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip() + "…"


def _lead(text: str, limit: int) -> str:
    """The leading whole paragraphs of ``text`` that fit in ``limit`` (at least one, cut)."""
    kept: list[str] = []
    for paragraph in text.split("\n\n"):
        if kept and len("\n\n".join([*kept, paragraph])) > limit:
            break
        kept.append(paragraph)
    return _truncate("\n\n".join(kept), limit)


@dataclass(frozen=True)
class ParsedFeed:
    """A feed's articles, the entries left out (each with its reason), and the recoverable
    error feedparser worked around, if any (``warning``)."""

    title: str
    articles: tuple[ParsedArticle, ...]
    skipped: tuple[str, ...]
    warning: str | None
    # The WebSub hub the feed names (``<link rel="hub">``) and its own URL there
    # (``<link rel="self">``, the topic to subscribe to); None when it names none.
    hub: str | None = None
    self_url: str | None = None


def category_topics(
    categories: Mapping[str, str] | None, known_topics: Collection[str] | None
) -> dict[str, str]:
    """The category → topic map with keys normalized (case, whitespace) for matching.

    Raises ConfigError when a topic is not one of ``known_topics`` (when given).
    """
    result: dict[str, str] = {}
    for category, topic in (categories or {}).items():
        if known_topics is not None and topic not in known_topics:
            known = ", ".join(sorted(known_topics)) or "none"
            raise ConfigError(
                f"category {category!r} maps to unknown topic {topic!r} (known: {known})",
                key="sources.categories",
            )
        result[category_key(category)] = topic
    return result


class _Skip(Exception):
    """An entry that cannot become an article; the message says why."""


@dataclass(frozen=True)
class _FeedContext:
    url: str
    topic: str
    categories: dict[str, str]
    now: datetime


def parse_feed(
    content: bytes,
    *,
    url: str,
    topic: str,
    now: datetime,
    categories: Mapping[str, str] | None = None,
    known_topics: Collection[str] | None = None,
    content_type: str | None = None,
    base_url: str | None = None,
) -> ParsedFeed:
    """Parse RSS 2.0 / RSS 1.0 / Atom bytes into articles. Pure: no network, no clock.

    Each entry becomes a ``ParsedArticle``: guid = entry id, else link (ids that are not URIs,
    like RSS ``<guid>1234</guid>``, are prefixed with the feed ``url`` since they are only unique
    within their feed); topic = the first entry category found in ``categories`` (matched without
    regard to case), else ``topic``; title, summary and body as plain text from sanitized HTML;
    link only if http(s); published from the entry's published, else updated, date (UTC), else
    ``now`` with ``date_given=False``. Fields over the article limits are cut, not refused: the
    feed is someone else's. ``base_url`` (the URL after redirects) resolves relative links.

    An entry with neither title nor text, or neither id nor link, is skipped and named in
    ``skipped``. Raises FeedError when the bytes are not a feed (XML so malformed that not one
    article could be read, or not RSS/Atom at all), ConfigError when ``categories`` names a
    topic not in ``known_topics``.
    """
    ctx = _FeedContext(url, topic, category_topics(categories, known_topics), now)
    headers = {"content-location": base_url or url}
    if content_type:
        headers["content-type"] = content_type
    # A stream, never bytes or str: feedparser fetches a str that looks like a URL and first
    # tries any str or bytes as a local file name, so feed bytes could become a read of a path.
    # sanitize_html=False: nh3 is the one sanitizer. feedparser's own would run first and strip
    # the tags nh3 drops with their content (iframe, video) but leave their fallback text.
    parsed = feedparser.parse(io.BytesIO(content), response_headers=headers, sanitize_html=False)
    problem = parsed.get("bozo_exception") if parsed.get("bozo") else None
    articles: list[ParsedArticle] = []
    skipped: list[str] = []
    for index, entry in enumerate(parsed.get("entries") or [], 1):
        try:
            articles.append(_entry_article(entry, ctx))
        except _Skip as exc:
            skipped.append(f"entry {index}: {exc}")
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            # feedparser's loose parser turns odd markup into odd shapes; one odd entry is
            # skipped and reported, it does not cost the feed its other entries.
            skipped.append(f"entry {index}: cannot be read ({type(exc).__name__}: {exc})")
    if not articles:
        # Not well-formed XML that the loose parser could not salvage one article from. (Other
        # "bozo" problems, like a text/plain Content-Type, are harmless: feedparser goes on.)
        if isinstance(problem, xml.sax.SAXException):
            raise FeedError(url, f"not a well-formed feed: {problem}")
        if not parsed.get("version"):
            raise FeedError(url, "not an RSS or Atom feed (no <rss>, <feed> or <rdf:RDF> element)")
    feed = parsed.get("feed") or {}
    title = one_line(_detail_text(feed.get("title_detail"), feed.get("title")))
    warning = str(problem) if problem is not None else None
    hub, self_url = _websub_links(feed.get("links"))
    return ParsedFeed(
        _truncate(title, MAX_TITLE), tuple(articles), tuple(skipped), warning, hub, self_url
    )


def _websub_links(links: Any) -> tuple[str | None, str | None]:
    """The first http(s) ``rel="hub"`` and ``rel="self"`` links of the feed (Atom's
    ``<link>``, RSS's ``<atom:link>``): a hub counts only with a self link, its topic."""
    found: dict[str, str] = {}
    for link in links if isinstance(links, list) else []:
        if not isinstance(link, Mapping):
            continue
        rel = _string(link.get("rel")).strip().lower()
        href = _http_link(link.get("href"))
        if rel in ("hub", "self") and href and rel not in found:
            found[rel] = href
    if "hub" not in found or "self" not in found:
        return None, None
    return found["hub"], found["self"]


_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S")


def _entry_article(entry: Any, ctx: _FeedContext) -> ParsedArticle:
    link = _http_link(entry.get("link"))
    guid = _string(entry.get("id")).strip()
    label = repr(_truncate(guid or link or _string(entry.get("title")), 80))
    if not guid:
        if link is None:
            raise _Skip("no id and no http(s) link to identify it")
        guid = link
    elif not _URI_SCHEME.match(guid):
        guid = f"{ctx.url}#{guid}"
    if len(guid) > MAX_GUID:
        guid = "urn:sha256:" + hashlib.sha256(guid.encode()).hexdigest()

    summary = _detail_text(entry.get("summary_detail"), None)
    body = _content_text(entry.get("content"))
    if not summary and body:
        summary = _lead(body, SUMMARY_LEAD)
    elif not body and len(summary) > SUMMARY_LEAD:
        summary, body = _lead(summary, SUMMARY_LEAD), summary

    title = one_line(_detail_text(entry.get("title_detail"), entry.get("title")))
    if not title:
        # RSS 2.0 allows an item with only a description; its first words stand in.
        title = _truncate(one_line(summary), 120)
    if not title:
        raise _Skip(f"{label} has no title and no text")

    published = _entry_date(entry)
    ends = _event_end(entry, ctx, guid)
    return ParsedArticle(
        guid=guid,
        topic=_entry_topic(entry, ctx),
        title=_truncate(title, MAX_TITLE),
        summary=_truncate(summary, MAX_SUMMARY),
        why_it_matters="",
        body=_truncate(body, MAX_BODY),
        link=link,
        published_at=published or ctx.now,
        expires_at=ends,
        date_given=published is not None,
    )


def _string(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _detail_text(detail: Any, fallback: Any) -> str:
    """Text of a feedparser ``*_detail`` dict: HTML is sanitized and flattened, text kept."""
    if isinstance(detail, Mapping):
        value = _string(detail.get("value"))
        kind = _string(detail.get("type")).lower()
        if "html" in kind:  # text/html, application/xhtml+xml
            return html_to_text(sanitize_html(value))
        return plain_to_text(value)
    return plain_to_text(_string(fallback))


def _content_text(contents: Any) -> str:
    if not isinstance(contents, list) or not contents:
        return ""
    # Atom allows several <content> elements; prefer an HTML one (the article as published).
    html = [c for c in contents if isinstance(c, Mapping) and "html" in _string(c.get("type"))]
    return _detail_text((html or contents)[0], None)


def _http_link(value: Any) -> str | None:
    link = strip_controls(_string(value)).strip()
    if not link or len(link) > MAX_LINK or re.search(r"\s", link):
        return None
    try:
        parts = urlsplit(link)
    except ValueError:
        return None
    return link if parts.scheme.lower() in ("http", "https") and parts.netloc else None


def _entry_date(entry: Any) -> datetime | None:
    for key in ("published_parsed", "updated_parsed"):
        value = entry.get(key)
        if value is None:
            continue
        try:
            # feedparser gives UTC struct_times; a leap second (60) is clamped to 59.
            year, month, day, hour, minute, second = value[:6]
            return datetime(year, month, day, hour, minute, min(second, 59), tzinfo=UTC)
        except (TypeError, ValueError, OverflowError):
            continue
    return None


def _event_end(entry: Any, ctx: _FeedContext, guid: str) -> datetime | None:
    """The end of the event an entry announces (RSS 1.0 event module, ``<ev:enddate>``): the
    entry's life ends with it. A date without a time is the end of that day, UTC. One that
    cannot be read is logged (the article is kept, without an end)."""
    value = _string(entry.get("ev_enddate")).strip()
    if not value:
        return None
    try:
        ends = datetime.fromisoformat(value)
    except ValueError:
        log.warning(
            "event end date not understood; the article is kept without one",
            extra={"feed": ctx.url, "guid": guid, "value": value[:80]},
        )
        return None
    if len(value) <= 10:  # a bare date: the event lasts the whole day
        ends = ends.replace(hour=23, minute=59, second=59)
    return ends.replace(tzinfo=UTC) if ends.tzinfo is None else ends.astimezone(UTC)


def _entry_topic(entry: Any, ctx: _FeedContext) -> str:
    if ctx.categories:
        for tag in entry.get("tags") or []:
            if not isinstance(tag, Mapping):
                continue
            for name in (tag.get("term"), tag.get("label")):
                topic = ctx.categories.get(category_key(_string(name)))
                if topic is not None:
                    return topic
    return ctx.topic
