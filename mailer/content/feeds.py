"""Feeds: fetch an RSS or Atom feed over HTTP, turn its entries into articles, remember validators.

Three layers, top-down:

* ``fetch_feed``: one bounded HTTP GET (connect/read timeouts and an overall deadline, a byte
  limit enforced while streaming, at most ``MAX_REDIRECTS`` hops, ``If-None-Match`` /
  ``If-Modified-Since``) → ``FetchResult``.
* ``parse_feed``: pure; the fetched bytes → ``ParsedFeed`` of ``ParsedArticle``. Feed HTML is
  sanitized with nh3 to a safe subset, then flattened to plain text: the store keeps text (as
  article files give it) and templates escape it, so no feed markup ever reaches a message.
* ``load_feed_states`` / ``record_success`` / ``record_failure``: the ``feed_state`` row per feed
  URL (validators for the next conditional GET, the last error, consecutive failures).

``mailer.content.sources`` runs these for every configured source.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import io
import logging
import re
import xml.sax
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

import feedparser
import httpx
import nh3
import sqlalchemy as sa

from mailer.config import category_key
from mailer.content.articles import (
    MAX_BODY,
    MAX_GUID,
    MAX_LINK,
    MAX_SUMMARY,
    MAX_TITLE,
    ParsedArticle,
)
from mailer.db.engine import upsert_insert
from mailer.db.schema import feed_state
from mailer.errors import ConfigError, MailerError

log = logging.getLogger(__name__)

MAX_FEED_BYTES = 5 * 1024 * 1024
MAX_REDIRECTS = 5
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 10.0
# The read timeout is per network read, so a server dripping a byte every few seconds never
# trips it; the deadline bounds the whole fetch, all redirect hops included.
FETCH_DEADLINE = 60.0
# A feed description that is the whole article is cut to its leading paragraphs for the summary
# (the digest shows the summary); the full text goes to the body.
SUMMARY_LEAD = 1_000

ACCEPT = (
    "application/rss+xml, application/atom+xml, application/xml;q=0.9, text/xml;q=0.9, */*;q=0.1"
)


# ---------------------------------------------------------------------------------------------
# Errors


class FeedError(MailerError):
    """A feed cannot be fetched or is not a feed; ``url`` is the feed, ``status`` the HTTP status
    when the server answered, ``reason`` the cause without the URL."""

    def __init__(self, url: str, reason: str, *, status: int | None = None) -> None:
        self.url = url
        self.reason = reason
        self.status = status
        super().__init__(f"feed {url}: {reason}")


class FeedTimeoutError(FeedError, TimeoutError):
    """The server did not answer in time (connect, read, or the whole-fetch deadline)."""


class FeedTooLargeError(FeedError, ValueError):
    """The response is over the byte limit; ``limit`` is that limit, ``size`` the declared
    ``Content-Length`` when the server gave one (None when the stream ran over)."""

    def __init__(self, url: str, *, limit: int, size: int | None = None) -> None:
        self.limit = limit
        self.size = size
        what = f"is {size:,} bytes," if size is not None else "is"
        super().__init__(url, f"the response {what} over the feed size limit of {limit:,} bytes")


# ---------------------------------------------------------------------------------------------
# HTTP


def user_agent(contact_url: str | None = None) -> str:
    """``mailer/<version> (digest newsletter feed reader; +<contact_url>)``.

    Naming the service and a site lets a feed's owner see who polls them and whom to ask.
    """
    try:
        version = importlib.metadata.version("mailer")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    contact = f"; +{contact_url}" if contact_url else ""
    return f"mailer/{version} (digest newsletter feed reader{contact})"


def create_client(
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
    read_timeout: float = READ_TIMEOUT,
    agent: str | None = None,
    max_connections: int = 10,
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` for feeds; use it with ``async with`` so it is closed.

    Redirects are not followed by the client: ``fetch_feed`` follows them itself so the hop
    limit holds whoever built the client. Proxy variables and ``.netrc`` are ignored
    (``trust_env=False``): configuration is read at the edge, not from the environment.
    """
    return httpx.AsyncClient(
        timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
        headers={"User-Agent": agent or user_agent(), "Accept": ACCEPT},
        follow_redirects=False,
        limits=httpx.Limits(max_connections=max_connections),
        trust_env=False,
    )


@dataclass(frozen=True)
class FetchResult:
    """One fetch: 200 with ``content``, or 304 (``not_modified``) with ``content == b""``.

    ``etag`` and ``last_modified`` are the validators the response gave (None if it gave none).
    """

    url: str
    final_url: str
    status: int
    content: bytes
    content_type: str | None
    etag: str | None
    last_modified: str | None
    redirects: int

    @property
    def not_modified(self) -> bool:
        return self.status == 304


async def fetch_feed(
    client: httpx.AsyncClient,
    url: str,
    *,
    etag: str | None = None,
    last_modified: str | None = None,
    max_bytes: int = MAX_FEED_BYTES,
    max_redirects: int = MAX_REDIRECTS,
    deadline: float = FETCH_DEADLINE,
) -> FetchResult:
    """GET ``url`` conditionally; raise FeedError (with ``status``) for anything but 2xx or 304.

    Redirects are followed up to ``max_redirects`` hops; the body is read up to ``max_bytes``
    (decoded bytes, so a gzip bomb counts at its inflated size); the whole fetch must finish
    within ``deadline`` seconds. Timeouts raise FeedTimeoutError, an oversized body
    FeedTooLargeError.
    """
    headers: dict[str, str] = {}
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    try:
        async with asyncio.timeout(deadline):
            return await _fetch(client, url, headers, max_bytes, max_redirects)
    except FeedError:
        raise
    except TimeoutError as exc:
        raise FeedTimeoutError(
            url, f"timed out: no complete response within the {deadline:g} s fetch deadline"
        ) from exc
    except httpx.TimeoutException as exc:
        raise FeedTimeoutError(url, f"timed out ({_timeout_kind(exc)})") from exc
    except httpx.TooManyRedirects as exc:  # only if a caller's client follows redirects itself
        raise FeedError(url, f"too many redirects: {exc}") from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise FeedError(url, f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc


async def _fetch(
    client: httpx.AsyncClient,
    url: str,
    headers: dict[str, str],
    max_bytes: int,
    max_redirects: int,
) -> FetchResult:
    request = client.build_request("GET", url, headers=headers)
    hops = [url]
    while True:
        response = await client.send(request, stream=True, follow_redirects=False)
        try:
            # httpx builds the next request (relative Location, 303, headers) when it is a redirect.
            following = response.next_request
            if following is not None:
                if len(hops) > max_redirects:
                    loop = " (a redirect loop)" if len(set(hops)) < len(hops) else ""
                    raise FeedError(
                        url,
                        f"more than {max_redirects} redirects{loop}: {' → '.join(hops)} → "
                        f"{following.url}",
                        status=response.status_code,
                    )
                request = following
                hops.append(str(following.url))
                continue
            if response.status_code == 304:
                content = b""
            elif response.is_success:
                content = await _read_limited(response, url, max_bytes)
            else:
                raise FeedError(
                    url,
                    f"HTTP {response.status_code} {response.reason_phrase}".rstrip(),
                    status=response.status_code,
                )
            return FetchResult(
                url=url,
                final_url=str(response.url),
                status=response.status_code,
                content=content,
                content_type=response.headers.get("Content-Type"),
                etag=response.headers.get("ETag"),
                last_modified=response.headers.get("Last-Modified"),
                redirects=len(hops) - 1,
            )
        finally:
            await response.aclose()


async def _read_limited(response: httpx.Response, url: str, limit: int) -> bytes:
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise FeedTooLargeError(url, limit=limit, size=int(declared))
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.aiter_bytes():
        total += len(chunk)
        if total > limit:
            raise FeedTooLargeError(url, limit=limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _timeout_kind(exc: httpx.TimeoutException) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return "connecting"
    if isinstance(exc, httpx.ReadTimeout):
        return "waiting for data"
    if isinstance(exc, httpx.PoolTimeout):
        return "waiting for a free connection"
    return "sending the request"


# ---------------------------------------------------------------------------------------------
# HTML → safe HTML → text

# A safe subset: structure and emphasis, links and images with http(s) URLs only. Everything
# else is stripped (keeping its text) and attributes not listed here (on*, style) are dropped.
SAFE_TAGS = frozenset(
    {
        *("a", "abbr", "b", "blockquote", "br", "cite", "code", "dd", "div", "dl", "dt", "em"),
        *("figcaption", "figure", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img", "li"),
        *("ol", "p", "pre", "q", "s", "small", "span", "strong", "sub", "sup", "table"),
        *("tbody", "td", "tfoot", "th", "thead", "tr", "u", "ul"),
    }
)
# Dropped with their content: code, styles, embeds and their "your browser cannot ..." fallbacks.
DROPPED_TAGS = frozenset(
    {
        *("script", "style", "iframe", "noscript", "template", "object", "embed", "svg"),
        *("math", "canvas", "audio", "video", "select", "textarea", "button"),
    }
)
_CLEANER = nh3.Cleaner(
    tags=set(SAFE_TAGS),
    clean_content_tags=set(DROPPED_TAGS),
    attributes={
        "a": {"href", "title"},
        "img": {"src", "alt", "width", "height"},
        "td": {"colspan", "rowspan"},
        "th": {"colspan", "rowspan"},
    },
    url_schemes={"http", "https", "mailto"},
    link_rel="noopener noreferrer nofollow",
)


def sanitize_html(html: str) -> str:
    """``html`` reduced to ``SAFE_TAGS``: no script, style, iframe, event handlers or
    ``javascript:`` URLs (nh3, an allow-list sanitizer)."""
    result: str = _CLEANER.clean(html)
    return result


_BLOCK_TAGS = SAFE_TAGS - {
    *("a", "abbr", "b", "br", "cite", "code", "em", "i", "img", "q", "s", "small", "span"),
    *("strong", "sub", "sup", "u"),
} | {"address", "article", "aside", "footer", "header", "main", "nav", "section", "caption"}


class _TextExtractor(HTMLParser):
    """Collects text; block elements become paragraph breaks (blank lines)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0  # depth inside DROPPED_TAGS, in case unsanitized HTML is passed

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in DROPPED_TAGS:
            self.hidden += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n\n")
        elif tag == "br":
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in DROPPED_TAGS:
            self.hidden = max(0, self.hidden - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(data)


_PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n\s*")


def html_to_text(html: str) -> str:
    """Plain text of an HTML fragment: paragraphs separated by a blank line, each on one line,
    entities decoded, tags and the content of DROPPED_TAGS gone."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    text = _clean("".join(parser.parts))
    paragraphs = (" ".join(chunk.split()) for chunk in _PARAGRAPH_BREAK.split(text))
    return "\n\n".join(p for p in paragraphs if p)


def _plain_to_text(text: str) -> str:
    paragraphs = (" ".join(chunk.split()) for chunk in _PARAGRAPH_BREAK.split(_clean(text)))
    return "\n\n".join(p for p in paragraphs if p)


# C0 and C1 controls except tab and newline, and lone surrogates (no database stores those).
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def _clean(text: str) -> str:
    return _CONTROLS.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


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


# ---------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class ParsedFeed:
    """A feed's articles, the entries left out (each with its reason), and the recoverable
    error feedparser worked around, if any (``warning``)."""

    title: str
    articles: tuple[ParsedArticle, ...]
    skipped: tuple[str, ...]
    warning: str | None


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
    title = _one_line(_detail_text(feed.get("title_detail"), feed.get("title")))
    warning = str(problem) if problem is not None else None
    return ParsedFeed(_truncate(title, MAX_TITLE), tuple(articles), tuple(skipped), warning)


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

    title = _one_line(_detail_text(entry.get("title_detail"), entry.get("title")))
    if not title:
        # RSS 2.0 allows an item with only a description; its first words stand in.
        title = _truncate(_one_line(summary), 120)
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


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _detail_text(detail: Any, fallback: Any) -> str:
    """Text of a feedparser ``*_detail`` dict: HTML is sanitized and flattened, text kept."""
    if isinstance(detail, Mapping):
        value = _string(detail.get("value"))
        kind = _string(detail.get("type")).lower()
        if "html" in kind:  # text/html, application/xhtml+xml
            return html_to_text(sanitize_html(value))
        return _plain_to_text(value)
    return _plain_to_text(_string(fallback))


def _content_text(contents: Any) -> str:
    if not isinstance(contents, list) or not contents:
        return ""
    # Atom allows several <content> elements; prefer an HTML one (the article as published).
    html = [c for c in contents if isinstance(c, Mapping) and "html" in _string(c.get("type"))]
    return _detail_text((html or contents)[0], None)


def _http_link(value: Any) -> str | None:
    link = _clean(_string(value)).strip()
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


# ---------------------------------------------------------------------------------------------
# State: one feed_state row per feed URL


@dataclass(frozen=True)
class FeedState:
    """What the last fetches of one feed left behind."""

    url: str
    etag: str | None
    last_modified: str | None
    last_status: int | None
    last_fetched_at: datetime | None
    last_success_at: datetime | None
    last_error: str | None
    consecutive_failures: int


MAX_ERROR_TEXT = 2_000


def load_feed_states(engine: sa.Engine) -> dict[str, FeedState]:
    """Every feed's state, by URL."""
    with engine.connect() as conn:
        rows = conn.execute(sa.select(feed_state))
        return {row.url: FeedState(**row._mapping) for row in rows}


def _upsert(conn: sa.Connection, values: dict[str, Any], on_conflict: dict[str, Any]) -> None:
    statement = upsert_insert(conn, feed_state).values(values)
    conn.execute(statement.on_conflict_do_update(index_elements=["url"], set_=on_conflict))


def record_success(
    engine: sa.Engine,
    url: str,
    *,
    status: int,
    etag: str | None,
    last_modified: str | None,
    now: datetime,
) -> None:
    """Store a fetch that worked: the validators to send next time, failures reset.

    Call it only after the articles are stored: a validator saved for a response that was not
    ingested would turn every later fetch into a 304 and lose that response for good.
    """
    # A validator too long for its column is dropped: without it the next fetch is a plain GET.
    values = {
        "etag": etag if etag and len(etag) <= 500 else None,
        "last_modified": last_modified if last_modified and len(last_modified) <= 100 else None,
        "last_status": status,
        "last_fetched_at": now,
        "last_success_at": now,
        "last_error": None,
        "consecutive_failures": 0,
    }
    with engine.begin() as conn:
        _upsert(conn, {"url": url, **values}, values)


def record_failure(engine: sa.Engine, url: str, error: FeedError, *, now: datetime) -> None:
    """Store a failed fetch: the error text and status, one more consecutive failure.

    The validators are kept: the feed is unchanged as far as we know.
    """
    text = str(error)[:MAX_ERROR_TEXT]
    values = {"last_status": error.status, "last_fetched_at": now, "last_error": text}
    with engine.begin() as conn:
        _upsert(
            conn,
            {"url": url, **values, "consecutive_failures": 1},
            values | {"consecutive_failures": feed_state.c.consecutive_failures + 1},
        )
