"""Markdown with front matter: TOML between ``+++`` lines or YAML between ``---`` lines, then the
Markdown body. ``## Summary`` and ``## Why this matters`` sections in the body may stand in for
the ``summary`` and ``why_it_matters`` keys. ``event_end`` (or ``ends``), the end of the event
an article announces, ends the article's life like ``expires``: whichever comes first.
``priority: alert`` makes the article the lead of every issue that takes it.
"""

from __future__ import annotations

import re
import tomllib
from datetime import UTC, date, datetime
from typing import Any, NamedTuple

import yaml

from mailer.content.fields import (
    MAX_SUMMARY_PARAGRAPHS,
    FileContext,
    RawFields,
    section_kind,
    short,
)

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
    "priority",
)

_ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_SECTION_NAME = re.compile(r"^(summary|why\s+(?:this|it)\s+matters)\s*:?$", re.IGNORECASE)
_TOML_LINE = re.compile(r"\(at line (\d+), column \d+\)")


def parse_front_matter(text: str, delimiter: str, ctx: FileContext) -> RawFields:
    """The fields of a Markdown article whose front matter opens with ``delimiter``."""
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
                f"unknown front-matter key {short(key)} (known: {', '.join(FRONT_MATTER_KEYS)})",
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
                f"{key} must be text, got {type(value).__name__} {short(value)}: quote it",
                line_of(key),
            )
        return value, line_of(key)

    def date_of(key: str) -> tuple[datetime | None, int | None]:
        value = meta.get(key)
        if value is None:
            return None, None
        return to_datetime(value, key, ctx, line_of(key)), line_of(key)

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
    return RawFields(
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
        priority=text_of("priority"),
    )


def _load_toml(block: list[str], ctx: FileContext) -> dict[str, Any]:
    try:
        return tomllib.loads("\n".join(block))
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        match = _TOML_LINE.search(str(exc))
        # "+ 1" for the opening "+++"; an error "at end of document" is on the last line.
        line = int(match.group(1)) + 1 if match else len(block) + 1
        raise ctx.error(f"invalid TOML front matter: {exc}", line) from exc


def _load_yaml(block: list[str], ctx: FileContext) -> dict[str, Any]:
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
                kind = None if name is None else section_kind(name.group(1))
                found.append(_Block(i, i + 1, True, kind))
            continue
        if start is None:
            start = i
        if fence_match is not None:
            fence = fence_match.group(1)
    if start is not None:
        found.append(_Block(start, len(lines), False, None))
    return found


def _take_sections(
    lines: list[str], first_line: int, ctx: FileContext
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
            for k in range(i, min(len(blocks), i + MAX_SUMMARY_PARAGRAPHS + 1)):
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


def to_datetime(value: Any, key: str, ctx: FileContext, line: int) -> datetime:
    """A front-matter (or pushed) date: an ISO date or date-time, read as UTC without a zone."""
    hint = "a date like 2026-11-20 or a date-time like 2026-11-20T09:30:00-05:00"
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError as exc:
            raise ctx.error(f"{key} must be {hint}, got {short(value)}", line) from exc
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
    raise ctx.error(f"{key} must be {hint}, got {type(value).__name__} {short(value)}", line)
