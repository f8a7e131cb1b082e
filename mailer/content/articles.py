"""Articles: read the site's text format or Markdown with front matter, store them, query them.

Parsing is pure (text and ``now`` in, a ``ParsedArticle`` out); storing and querying are thin Core
statements around it, bulk-friendly and the same on SQLite and PostgreSQL.

Two file formats:

* The site's format, as readers see an article page: the title line, a "Summary" heading and its
  paragraph, a "Why this matters" heading and its paragraph, then the body. The page ends with the
  newsletter sign-up box, which is page chrome and is dropped.
* Markdown with front matter: TOML between ``+++`` lines or YAML between ``---`` lines, then the
  Markdown body. ``## Summary`` and ``## Why this matters`` sections in the body may stand in for
  the ``summary`` and ``why_it_matters`` keys. ``event_end`` (or ``ends``), the end of the event
  an article announces, ends the article's life like ``expires``: whichever comes first.

Storing keeps one article per story: besides the guid, the normalised text (``text_key``) and
the canonical link under the normalised title (``link_key``) are unique, so the same story
from another source or guid is reported as a duplicate of the stored article, not stored again.
"""

from __future__ import annotations

import hashlib
import json
import re
import reprlib
import tomllib
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path, PurePath
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import sqlalchemy as sa
import yaml

from mailer.db.engine import upsert_insert
from mailer.db.schema import articles, issue_articles, issues
from mailer.errors import ArticleError
from mailer.models import Article

# Field limits: the title, guid and link ones are the column sizes in mailer/schema.py.
MAX_TITLE = 500
MAX_GUID = 500
MAX_LINK = 1000
MAX_SUMMARY = 5_000
MAX_WHY = 5_000
MAX_BODY = 200_000
MAX_TEXT = 1_000_000  # characters in one file
MAX_FILE_BYTES = 4 * MAX_TEXT

UPSERT_CHUNK = 500  # guids per IN (...) list: well under SQLite's and PostgreSQL's bind limits

FRONT_MATTER_KEYS = (
    "title",
    "topic",
    "link",
    "published",
    "expires",
    "event_end",
    "ends",
    "guid",
    "summary",
    "why_it_matters",
    "why",
)


@dataclass(frozen=True)
class ParsedArticle:
    """One article read from a file or feed: validated, cleaned, ready to store.

    Text fields are plain text (or Markdown for a Markdown body); templates escape them.
    """

    guid: str
    topic: str
    title: str
    summary: str
    why_it_matters: str
    body: str
    link: str | None
    published_at: datetime
    expires_at: datetime | None = None
    # False when the file named no date and published_at is the time it was read. Re-adding such
    # a file later must not move it into a newer digest, so the store keeps the first date.
    date_given: bool = True

    @property
    def content_hash(self) -> str:
        """SHA-256 of the content fields: equal hashes mean there is nothing to update."""
        fields = [
            self.topic,
            self.title,
            self.summary,
            self.why_it_matters,
            self.body,
            self.link,
            self.published_at.astimezone(UTC).isoformat() if self.date_given else None,
            self.expires_at.astimezone(UTC).isoformat() if self.expires_at else None,
        ]
        return hashlib.sha256(json.dumps(fields).encode("ascii")).hexdigest()

    @property
    def text_key(self) -> str | None:
        """The normalised text (title, summary, why it matters, body): equal keys are the same
        story, whatever the guid or source. None for a title alone, which is too little to tell
        two stories apart ("Main gate closed" is posted again and again)."""
        if not (self.summary.strip() or self.why_it_matters.strip() or self.body.strip()):
            return None
        texts = [self.title, self.summary, self.why_it_matters, self.body]
        return _key("text", *(_normalised(t) for t in texts))

    @property
    def link_key(self) -> str | None:
        """The canonical link under the normalised title: the same story as published on the
        site, however a feed or a file words its text. None without a link."""
        if self.link is None:
            return None
        return _key("link", canonical_link(self.link), _normalised(self.title))


def _normalised(text: str) -> str:
    folded = unicodedata.normalize("NFKC", text).translate(_QUOTES).casefold()
    return " ".join(folded.split())


def _key(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


# Query parameters that say where a reader came from, not what they read.
_TRACKING = re.compile(r"^(utm_\w+|fbclid|gclid|mc_cid|mc_eid)$", re.IGNORECASE)


def canonical_link(link: str) -> str:
    """The link with what does not change the page dropped: http vs https, case and ``www.`` of
    the host, a default port, a trailing slash, the fragment and tracking parameters."""
    parts = urlsplit(link.strip())
    host = (parts.hostname or "").removeprefix("www.")
    if parts.port is not None and parts.port not in (80, 443):
        host = f"{host}:{parts.port}"
    query = urlencode(
        sorted(
            (k, v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
            if not _TRACKING.match(k)
        )
    )
    return urlunsplit(("https", host, parts.path.rstrip("/") or "/", query, ""))


@dataclass(frozen=True)
class Duplicate:
    """An article not stored because article ``of`` holds the same content."""

    guid: str
    title: str
    of: int


@dataclass
class UpsertReport:
    """What ``upsert_articles`` did, one count per distinct guid; ``duplicates`` lists the
    articles skipped because another article (another guid) holds the same content."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    duplicates: list[Duplicate] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class _Context:
    path: str | None
    default_topic: str | None
    known_topics: Sequence[str]
    now: datetime

    def error(self, message: str, line: int | None = None) -> ArticleError:
        return ArticleError(message, path=self.path, line=line)


class _Fields(NamedTuple):
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


# C0 and C1 controls except tab and newline, and lone surrogates (no database stores those).
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def _clean(text: str) -> str:
    return _CONTROLS.sub("", text)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# Bounded: a plain repr() of a YAML value built from nested aliases can run to gigabytes.
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 2


def _short(value: object) -> str:
    return _REPR.repr(value)


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
    ctx = _Context(source, default_topic, known_topics, now)
    if len(text) > MAX_TEXT:
        raise ctx.error(f"the file has {len(text):,} characters; the limit is {MAX_TEXT:,}")
    text = _clean(text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n"))
    if not text.strip():
        raise ctx.error("the file is empty")
    first = text.split("\n", 1)[0].strip()
    if first in ("+++", "---"):
        fields = _parse_front_matter(text, first, ctx)
    else:
        fields = _parse_site_text(text, ctx)
    return _build(fields, ctx)


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


# The site's text format ----------------------------------------------------------------------

# "Summary", "Why this matters" (or "Why it matters"), any case, optionally "## " before and ":"
# after; text after the colon on the same line counts as the section's first line.
_SITE_HEADING = re.compile(
    r"^\s*(?:#{1,6}\s*)?(summary|why\s+(?:this|it)\s+matters)\s*(?::\s*(.*?))?\s*$",
    re.IGNORECASE,
)

# The newsletter sign-up box at the foot of every article page, compared after _chrome_key().
_SIGNUP_BOX = frozenset(
    {
        "get camp lejeune & new river updates",
        "get camp lejeune and new river updates",
        "essential base alerts, local events, and military news delivered to your inbox",
        "we don't spam! read our privacy policy for more info",
        "we don't spam! read our privacy policy",
        "we don't spam",
        "read our privacy policy for more info",
        "read our privacy policy",
    }
)
# Form widgets a copied page may carry next to the box; dropped only in the trailing box.
_SIGNUP_FORM = frozenset(
    {
        "subscribe",
        "sign up",
        "email",
        "email address",
        "your email",
        "your email address",
        "enter your email",
        "enter your email address",
        "name",
        "your name",
        "first name",
        "submit",
    }
)
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})

# A summary may run over several paragraphs when "Why this matters" follows within this many;
# otherwise it is one paragraph, so a stray heading deep in the body cannot swallow the body.
_MAX_SUMMARY_PARAGRAPHS = 5


class _Paragraph(NamedTuple):
    line: int  # 1-based line of the first line
    lines: list[str]


def _chrome_key(line: str) -> str:
    key = _one_line(line.translate(_QUOTES).replace("&amp;", "&").casefold())
    return key.rstrip(" .!:")


def _strip_signup_box(lines: list[str]) -> list[str]:
    """Blank out the sign-up box; blanking rather than deleting keeps line numbers right."""
    keys = [_chrome_key(line) for line in lines]
    # The trailing box, with any form widgets inside it...
    start = len(lines)
    chrome = _SIGNUP_BOX | _SIGNUP_FORM
    while start > 0 and (not lines[start - 1].strip() or keys[start - 1] in chrome):
        start -= 1
    # The box starts at its first own line: a lone "Email" above it is the article's text.
    start = next((i for i in range(start, len(lines)) if keys[i] in _SIGNUP_BOX), len(lines))
    # ...and the box's own lines wherever a page put them: no article sentence is one of them.
    return ["" if i >= start or keys[i] in _SIGNUP_BOX else line for i, line in enumerate(lines)]


def _paragraphs(lines: list[str], first: int, *, at_headings: bool) -> list[_Paragraph]:
    """Runs of non-blank lines; with ``at_headings`` a heading line also starts a new one."""
    found: list[_Paragraph] = []
    current: list[str] = []
    for number, line in enumerate(lines[first:], start=first + 1):
        if line.strip():
            if current and at_headings and _SITE_HEADING.match(line):
                current = []
            if not current:
                found.append(_Paragraph(number, current))
            current.append(line)
        else:
            current = []
    return found


def _heading(paragraph: _Paragraph) -> tuple[str, str] | None:
    """("summary" | "why", text after the colon) when the paragraph opens with a heading."""
    match = _SITE_HEADING.match(paragraph.lines[0])
    if match is None:
        return None
    return _section_kind(match.group(1)), match.group(2) or ""


def _parse_site_text(text: str, ctx: _Context) -> _Fields:
    lines = _strip_signup_box([line.rstrip() for line in text.split("\n")])
    title_at = next((i for i, line in enumerate(lines) if line.strip()), None)
    if title_at is None:
        raise ctx.error("no article text: the file holds only the newsletter sign-up box")
    title = lines[title_at].strip()
    match = _SITE_HEADING.match(title)
    if match is not None and not match.group(2):
        raise ctx.error(
            f"the first line is the {match.group(1)!r} heading: put the article's title above it",
            title_at + 1,
        )
    # Headings split paragraphs only here, in the head: a body line reading "Summary" is text.
    paragraphs = _paragraphs(lines, title_at + 1, at_headings=True)
    sections: dict[str, tuple[str, int]] = {}
    i = 0
    while i < len(paragraphs) and (heading := _heading(paragraphs[i])) is not None:
        kind, inline = heading
        if kind in sections:
            break  # a second "Summary" heading is body text
        head = paragraphs[i]
        own = ([inline] if inline else []) + head.lines[1:]
        i += 1
        end = i
        if kind == "summary" and "why" not in sections:
            end = next(
                (
                    k
                    for k in range(i, min(len(paragraphs), i + _MAX_SUMMARY_PARAGRAPHS + 1))
                    if (h := _heading(paragraphs[k])) is not None and h[0] == "why"
                ),
                i,
            )
        if end == i and not own and i < len(paragraphs) and _heading(paragraphs[i]) is None:
            end = i + 1  # the usual layout: heading, blank line, one paragraph
        parts = (["\n".join(own)] if own else []) + ["\n".join(p.lines) for p in paragraphs[i:end]]
        sections[kind] = ("\n\n".join(parts).strip(), head.line)
        i = end
    body_line = paragraphs[i].line if i < len(paragraphs) else None
    rest = _paragraphs(lines, body_line - 1, at_headings=False) if body_line else []
    body = "\n\n".join("\n".join(p.lines) for p in rest)
    return _Fields(
        title=(title, title_at + 1),
        summary=sections.get("summary", ("", None)),
        why=sections.get("why", ("", None)),
        body=(body, body_line),
        topic=(None, None),
        link=(None, None),
        guid=(None, None),
        published=(None, None),
        expires=(None, None),
    )


# Markdown with front matter ------------------------------------------------------------------

_ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_SECTION_NAME = re.compile(r"^(summary|why\s+(?:this|it)\s+matters)\s*:?$", re.IGNORECASE)
_TOML_LINE = re.compile(r"\(at line (\d+), column \d+\)")


def _parse_front_matter(text: str, delimiter: str, ctx: _Context) -> _Fields:
    lines = text.split("\n")
    closers = ("+++",) if delimiter == "+++" else ("---", "...")
    # Column 0 only: an indented "---" is content of a YAML block scalar, not the end.
    end = next((i for i in range(1, len(lines)) if lines[i].rstrip() in closers), None)
    if end is None:
        raise ctx.error(
            f"the front matter opened by {delimiter!r} on line 1 is never closed: "
            f"add a {delimiter!r} line after it",
            1,
        )
    block = lines[1:end]
    meta = _load_toml(block, ctx) if delimiter == "+++" else _load_yaml(block, ctx)

    def line_of(key: str) -> int:
        pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*[=:]")
        found = next((n for n, line in enumerate(block) if pattern.match(line)), None)
        return 1 if found is None else found + 2

    for key in meta:
        if key not in FRONT_MATTER_KEYS:
            raise ctx.error(
                f"unknown front-matter key {_short(key)} (known: {', '.join(FRONT_MATTER_KEYS)})",
                line_of(str(key)),
            )
    if "why" in meta and "why_it_matters" in meta:
        raise ctx.error("give 'why_it_matters' or 'why', not both", line_of("why"))
    if "ends" in meta and "event_end" in meta:
        raise ctx.error("give 'event_end' or 'ends', not both", line_of("ends"))

    def text_of(key: str) -> tuple[str | None, int | None]:
        value = meta.get(key)
        if value is None:
            return None, None
        if not isinstance(value, str):
            raise ctx.error(
                f"{key} must be text, got {type(value).__name__} {_short(value)}: quote it",
                line_of(key),
            )
        return value, line_of(key)

    def date_of(key: str) -> tuple[datetime | None, int | None]:
        value = meta.get(key)
        if value is None:
            return None, None
        return _to_datetime(value, key, ctx, line_of(key)), line_of(key)

    body_lines, found = _take_sections(lines[end + 1 :], end + 2, ctx)
    summary, summary_line = text_of("summary")
    why_key = "why" if "why" in meta else "why_it_matters"
    why, why_line = text_of(why_key)
    for key, value, kind in (("summary", summary, "summary"), (why_key, why, "why")):
        if value is not None and kind in found:
            raise ctx.error(
                f"{key} is given twice: in the front matter (line {line_of(key)}) and as a "
                f"section in the body (line {found[kind][1]}); keep one",
                found[kind][1],
            )
    while body_lines and not body_lines[0][1].strip():
        body_lines.pop(0)
    while body_lines and not body_lines[-1][1].strip():
        body_lines.pop()
    title, title_line = text_of("title")
    if title is None:
        raise ctx.error("the front matter has no 'title'", 1)
    return _Fields(
        title=(title, title_line),
        summary=(summary, summary_line)
        if summary is not None
        else found.get("summary", ("", None)),
        why=(why, why_line) if why is not None else found.get("why", ("", None)),
        body=("\n".join(line for _, line in body_lines), body_lines[0][0] if body_lines else None),
        topic=text_of("topic"),
        link=text_of("link"),
        guid=text_of("guid"),
        published=date_of("published"),
        expires=date_of("expires"),
        event_end=date_of("ends" if "ends" in meta else "event_end"),
    )


def _load_toml(block: list[str], ctx: _Context) -> dict[str, Any]:
    try:
        return tomllib.loads("\n".join(block))
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        match = _TOML_LINE.search(str(exc))
        # "+ 1" for the opening "+++"; an error "at end of document" is on the last line.
        line = int(match.group(1)) + 1 if match else len(block) + 1
        raise ctx.error(f"invalid TOML front matter: {exc}", line) from exc


def _load_yaml(block: list[str], ctx: _Context) -> dict[str, Any]:
    try:
        data = yaml.safe_load("\n".join(block))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 2 if mark is not None else None
        raise ctx.error(f"invalid YAML front matter: {exc.problem or exc}", line) from exc
    # PyYAML raises ValueError for a date-shaped value that is no date (2026-13-45).
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as exc:
        raise ctx.error(f"invalid YAML front matter: {exc}", 1) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ctx.error(
            f"the YAML front matter must be 'key: value' lines, got a {type(data).__name__}", 2
        )
    return data


class _Block(NamedTuple):
    start: int  # index of the first line
    end: int  # index after the last line
    heading: bool
    section: str | None  # "summary" or "why" for those headings


def _blocks(lines: list[str]) -> list[_Block]:
    """Paragraphs and ATX headings of a Markdown body; fenced code is one paragraph."""
    found: list[_Block] = []
    start: int | None = None
    fence: str | None = None
    for i, line in enumerate(lines):
        fence_match = _FENCE.match(line)
        if fence is not None:
            if fence_match is not None:
                marker = fence_match.group(1)
                if marker[0] == fence[0] and len(marker) >= len(fence):
                    fence = None
            continue
        heading = _ATX_HEADING.match(line)
        if heading is not None or not line.strip():
            if start is not None:
                found.append(_Block(start, i, False, None))
                start = None
            if heading is not None:
                name = _SECTION_NAME.match(heading.group(2).strip())
                kind = None if name is None else _section_kind(name.group(1))
                found.append(_Block(i, i + 1, True, kind))
            continue
        if start is None:
            start = i
        if fence_match is not None:
            fence = fence_match.group(1)
    if start is not None:
        found.append(_Block(start, len(lines), False, None))
    return found


def _section_kind(name: str) -> str:
    return "summary" if name.casefold() == "summary" else "why"


def _take_sections(
    lines: list[str], first_line: int, ctx: _Context
) -> tuple[list[tuple[int, str]], dict[str, tuple[str, int]]]:
    """Remove ``## Summary`` / ``## Why this matters`` sections from a Markdown body.

    Same rule as the site's format: a section is the paragraph after its heading, except that
    a Summary runs up to a "Why this matters" heading that follows within a few paragraphs.
    A section cannot simply run to the next heading: the body usually follows it headless.
    """
    blocks = _blocks(lines)
    found: dict[str, tuple[str, int]] = {}
    removed: list[tuple[int, int]] = []
    i = 0
    while i < len(blocks):
        block = blocks[i]
        i += 1
        if block.section is None:
            continue
        if block.section in found:
            raise ctx.error(
                f"a second {lines[block.start].strip()!r} section "
                f"(the first is on line {found[block.section][1]})",
                first_line + block.start,
            )
        end = i
        if block.section == "summary" and "why" not in found:
            for k in range(i, min(len(blocks), i + _MAX_SUMMARY_PARAGRAPHS + 1)):
                if blocks[k].heading:
                    end = k if blocks[k].section == "why" else i
                    break
        if end == i and i < len(blocks) and not blocks[i].heading:
            end = i + 1
        content_start = blocks[i].start if end > i else block.end
        content_end = blocks[end - 1].end if end > i else block.end
        text = "\n".join(lines[content_start:content_end]).strip()
        found[block.section] = (text, first_line + block.start)
        removed.append((block.start, content_end))
        i = end
    kept = [
        (first_line + n, line)
        for n, line in enumerate(lines)
        if not any(start <= n < stop for start, stop in removed)
    ]
    return kept, found


def _to_datetime(value: Any, key: str, ctx: _Context, line: int) -> datetime:
    hint = "a date like 2026-11-20 or a date-time like 2026-11-20T09:30:00-05:00"
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError as exc:
            raise ctx.error(f"{key} must be {hint}, got {_short(value)}", line) from exc
    if isinstance(value, datetime):
        # A time without a zone is read as UTC, like a bare date: the parser knows no site zone.
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        try:
            return value.astimezone(UTC)
        except OverflowError as exc:
            raise ctx.error(f"{key} is out of range: {value.isoformat()}", line) from exc
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    raise ctx.error(f"{key} must be {hint}, got {type(value).__name__} {_short(value)}", line)


# Both formats --------------------------------------------------------------------------------


def _checked(value: str, name: str, limit: int, ctx: _Context, line: int | None) -> str:
    if len(value) > limit:
        raise ctx.error(f"{name} is {len(value):,} characters; the limit is {limit:,}", line)
    return value


def _build(fields: _Fields, ctx: _Context) -> ParsedArticle:
    title_text, title_line = fields.title
    title = _checked(_one_line(_clean(title_text)), "title", MAX_TITLE, ctx, title_line)
    if not title:
        raise ctx.error("the title is empty", title_line)

    topic, topic_line = fields.topic
    topic = _one_line(_clean(topic)) if topic is not None else ctx.default_topic
    known = ", ".join(ctx.known_topics) or "none configured"
    if not topic:
        raise ctx.error(
            "no topic: name one in the front matter (topic: KEY), pass --topic KEY to"
            f" `mailer articles add`, or give its [[sources]] entry a topic (known: {known})",
            topic_line,
        )
    if topic not in ctx.known_topics:
        raise ctx.error(f"unknown topic {_short(topic)} (known: {known})", topic_line)

    link_text, link_line = fields.link
    link: str | None = None
    if link_text is not None:
        link = _checked(_clean(link_text).strip(), "link", MAX_LINK, ctx, link_line)
        parts = urlsplit(link)
        if parts.scheme not in ("http", "https") or not parts.netloc or re.search(r"\s", link):
            raise ctx.error(f"link must be an http(s) URL, got {_short(link)}", link_line)

    guid_text, guid_line = fields.guid
    if guid_text is not None:
        guid = _checked(_clean(guid_text).strip(), "guid", MAX_GUID, ctx, guid_line)
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

    summary_text, summary_line = fields.summary
    why_text, why_line = fields.why
    body_text, body_line = fields.body
    return ParsedArticle(
        guid=guid,
        topic=topic,
        title=title,
        summary=_checked(_clean(summary_text).strip(), "summary", MAX_SUMMARY, ctx, summary_line),
        why_it_matters=_checked(_clean(why_text).strip(), "why it matters", MAX_WHY, ctx, why_line),
        body=_checked(_clean(body_text), "body", MAX_BODY, ctx, body_line),
        link=link,
        published_at=published if published is not None else ctx.now,
        expires_at=expires,
        date_given=published is not None,
    )


# ---------------------------------------------------------------------------------------------
# Storage

_CONTENT_COLUMNS = ("topic", "title", "summary", "why_it_matters", "body", "link", "expires_at")


def _values(item: ParsedArticle) -> dict[str, Any]:
    for name, value, limit in (
        ("guid", item.guid, MAX_GUID),
        ("title", item.title, MAX_TITLE),
        ("link", item.link or "", MAX_LINK),
    ):
        if len(value) > limit:
            raise ArticleError(
                f"article {item.guid[:80]!r}: {name} is {len(value):,} characters; "
                f"the limit is {limit:,}"
            )
    return {
        "guid": item.guid,
        "topic": item.topic,
        "title": item.title,
        "summary": item.summary,
        "why_it_matters": item.why_it_matters,
        "body": item.body,
        "link": item.link,
        "published_at": item.published_at,
        "expires_at": item.expires_at,
        "content_hash": item.content_hash,
        "text_key": item.text_key,
        "link_key": item.link_key,
    }


def upsert_articles(
    engine: sa.Engine, items: Sequence[ParsedArticle], *, now: datetime
) -> UpsertReport:
    """Store articles by guid: new ones are added, changed ones updated, the rest left alone.

    A guid given twice keeps its last version. "Changed" means a different ``content_hash``; an
    article whose file gave no date keeps the publication date it was first stored with.
    Runs in one transaction, with a few bulk statements per chunk of guids.
    """
    latest: dict[str, ParsedArticle] = {}
    for item in items:
        latest[item.guid] = item
    unique = list(latest.values())
    report = UpsertReport()
    with engine.begin() as conn:
        for start in range(0, len(unique), UPSERT_CHUNK):
            _upsert_chunk(conn, unique[start : start + UPSERT_CHUNK], report, now)
    return report


def _upsert_chunk(
    conn: sa.Connection, chunk: list[ParsedArticle], report: UpsertReport, now: datetime
) -> None:
    rows = {item.guid: _values(item) for item in chunk}
    stored: dict[str, tuple[int, str]] = {
        guid: (id_, content_hash)
        for id_, guid, content_hash in conn.execute(
            sa.select(articles.c.id, articles.c.guid, articles.c.content_hash).where(
                articles.c.guid.in_(list(rows))
            )
        )
    }
    duplicates_before = len(report.duplicates)
    owners = _key_owners(conn, rows.values())
    new: list[dict[str, Any]] = []
    for guid, row in rows.items():
        if guid in stored:
            continue
        holder = _holder(owners, row, guid)
        if holder is not None:
            report.duplicates.append(Duplicate(guid, row["title"], holder))
            continue
        new.append(row)
    added = 0
    if new:
        # No conflict target: a guid, or content (the unique text_key and link_key indexes),
        # stored meanwhile by a concurrent ingest or by an earlier row of this chunk makes the
        # row a no-op; the article that holds it is named below.
        inserted = set(
            conn.scalars(
                upsert_insert(conn, articles).on_conflict_do_nothing().returning(articles.c.guid),
                [row | {"created_at": now, "updated_at": now} for row in new],
            )
        )
        _lost_races(conn, [row for row in new if row["guid"] not in inserted], report)
        added = len(inserted)
    changed: list[ParsedArticle] = []
    for item in chunk:
        if item.guid not in stored or stored[item.guid][1] == rows[item.guid]["content_hash"]:
            continue
        holder = _holder(owners, rows[item.guid], item.guid)
        if holder is not None and holder != stored[item.guid][0]:
            # The edit made it the copy of another article: keep the stored version.
            report.duplicates.append(Duplicate(item.guid, item.title, holder))
            continue
        changed.append(item)
    for with_date in (True, False):
        group = [item for item in changed if item.date_given is with_date]
        if not group:
            continue
        columns = (*_CONTENT_COLUMNS, "content_hash", "text_key", "link_key") + (
            ("published_at",) if with_date else ()
        )
        statement = (
            articles.update()
            .where(articles.c.guid == sa.bindparam("b_guid"))
            .values({name: sa.bindparam(f"b_{name}") for name in columns} | {"updated_at": now})
        )
        conn.execute(
            statement,
            [{f"b_{name}": rows[item.guid][name] for name in (*columns, "guid")} for item in group],
        )
    duplicates = len(report.duplicates) - duplicates_before
    report.added += added
    report.updated += len(changed)
    report.unchanged += len(chunk) - added - len(changed) - duplicates


_Owners = dict[tuple[str, str], tuple[int, str]]


def _key_owners(conn: sa.Connection, rows: Any) -> _Owners:
    """(key name, key) → (article id, guid) of the stored articles holding these keys."""
    owners: _Owners = {}
    for name in ("text_key", "link_key"):
        column = articles.c[name]
        keys = sorted({row[name] for row in rows if row[name] is not None})
        if not keys:
            continue
        for id_, guid, key in conn.execute(
            sa.select(articles.c.id, articles.c.guid, column).where(column.in_(keys))
        ):
            owners[name, key] = (id_, guid)
    return owners


def _holder(owners: _Owners, row: dict[str, Any], guid: str) -> int | None:
    """The id of another article (another guid) holding this row's content, if any."""
    for name in ("text_key", "link_key"):
        owner = owners.get((name, row[name])) if row[name] is not None else None
        if owner is not None and owner[1] != guid:
            return owner[0]
    return None


def _lost_races(conn: sa.Connection, rows: list[dict[str, Any]], report: UpsertReport) -> None:
    """Name the article that holds each row the INSERT skipped: a duplicate of this chunk, or
    content a concurrent ingest stored first (a guid stored meanwhile is simply unchanged)."""
    if not rows:
        return
    owners = _key_owners(conn, rows)
    for row in rows:
        holder = _holder(owners, row, row["guid"])
        if holder is not None:
            report.duplicates.append(Duplicate(row["guid"], row["title"], holder))


ARTICLE_COLUMNS = (
    articles.c.id,
    articles.c.guid,
    articles.c.topic,
    articles.c.title,
    articles.c.summary,
    articles.c.why_it_matters,
    articles.c.body,
    articles.c.link,
    articles.c.published_at,
    articles.c.expires_at,
    articles.c.removed_at,
)


def _newest_first(query: sa.Select[Any], limit: int) -> sa.Select[Any]:
    if limit < 0:
        raise ValueError(f"limit must be 0 or more, got {limit}")
    return query.order_by(articles.c.published_at.desc(), articles.c.id.desc()).limit(limit)


def _fetch(bind: sa.Engine | sa.Connection, query: sa.Select[Any]) -> list[Article]:
    if isinstance(bind, sa.Connection):
        return [Article(**row._mapping) for row in bind.execute(query)]
    with bind.connect() as conn:
        return [Article(**row._mapping) for row in conn.execute(query)]


def list_articles(
    engine: sa.Engine | sa.Connection, *, topic: str | None = None, limit: int = 50
) -> list[Article]:
    """The newest ``limit`` articles, newest first, optionally of one topic (expired ones too).

    ``engine`` may also be a Connection, to read inside a caller's transaction.
    """
    query = sa.select(*ARTICLE_COLUMNS)
    if topic is not None:
        query = query.where(articles.c.topic == topic)
    return _fetch(engine, _newest_first(query, limit))


@dataclass(frozen=True)
class Selection:
    """What the next issue of a digest takes: ``articles`` (newest published first) and how
    many more it could take that ``max_articles`` leaves for the issues after it."""

    articles: list[Article]
    left_over: int


# The issue status that gives its articles back: any other issue of the digest has taken them.
GIVES_BACK = "cancelled"


def taken_by(digest_key: str) -> sa.Exists:
    """The article (``articles.id``) is in an issue of this digest that was not cancelled."""
    return (
        sa.select(issue_articles.c.article_id)
        .join(issues, issues.c.id == issue_articles.c.issue_id)
        .where(
            issue_articles.c.article_id == articles.c.id,
            issues.c.digest == digest_key,
            issues.c.status != GIVES_BACK,
        )
        .exists()
    )


def lookback_start(
    conn: sa.Connection, digest_key: str, lookback: timedelta, now: datetime
) -> datetime:
    """The oldest publication date (exclusive) the digest's issue made at ``now`` takes.

    ``lookback`` before the digest's previous issue was made, so that what arrives after an
    issue, published just before it, is still in the lookback of the next one (a weekly digest
    with a lookback of 7 days takes on Friday what was published Thursday night and fetched
    after Friday's issue). A first issue takes only ``lookback`` before itself; after a long
    pause, no more than twice ``lookback`` before itself. Read before the issue is inserted.
    """
    # The newest slot's issue, off the UNIQUE(digest, scheduled_for) index: an alert digest
    # makes 52,560 issues a year, and a max(created_at) would read every one of them.
    query = (
        sa.select(issues.c.created_at)
        .where(issues.c.digest == digest_key)
        .order_by(issues.c.scheduled_for.desc())
        .limit(1)
    )
    previous: datetime | None = conn.execute(query).scalar_one_or_none()
    if previous is None:
        return now - lookback
    return max(min(previous, now), now - lookback) - lookback


def select_for_issue(
    conn: sa.Connection,
    *,
    digest_key: str,
    topics: Sequence[str],
    lookback: timedelta,
    limit: int,
    now: datetime,
    since: datetime | None = None,
) -> Selection:
    """The articles the issue of ``digest_key`` made at ``now`` takes: by arrival, not by date.

    Every article in one of ``topics`` that no issue of this digest has taken yet (a cancelled
    issue gives its articles back), published after ``lookback_start`` and at the latest
    ``now`` (an article dated in the future waits for its date), not expired at ``now`` (an
    event that is over has expired: see ``event_end``) and not removed by staff. So an article
    stored a moment after an issue was made, whatever its date, goes in the next issue; an
    update (same guid) is not new.

    At most ``limit``, oldest arrival first (``created_at``, then id), so what one issue leaves
    over goes in the next one before anything that arrived after it; returned newest published
    first, the order an issue shows. Reads inside the caller's transaction (creating an issue
    snapshots its articles there); ``since`` is ``lookback_start`` when the caller read it.
    """
    if not topics or limit == 0:
        return Selection([], 0)
    if since is None:
        since = lookback_start(conn, digest_key, lookback, now)
    eligible = sa.and_(
        articles.c.topic.in_(list(topics)),
        articles.c.published_at > since,
        articles.c.published_at <= now,
        articles.c.removed_at.is_(None),
        sa.or_(articles.c.expires_at.is_(None), articles.c.expires_at > now),
        ~taken_by(digest_key),
    )
    query = (
        sa.select(*ARTICLE_COLUMNS)
        .where(eligible)
        .order_by(articles.c.created_at, articles.c.id)
        .limit(limit)
    )
    chosen = _fetch(conn, query)
    left_over = 0
    if len(chosen) == limit:
        count = sa.select(sa.func.count()).select_from(articles).where(eligible)
        left_over = int(conn.execute(count).scalar_one()) - limit
    chosen.sort(key=lambda a: (a.published_at, a.id), reverse=True)
    return Selection(chosen, left_over)
