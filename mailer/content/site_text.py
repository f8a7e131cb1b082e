"""The site's text format, as readers see an article page: the title line, a "Summary" heading
and its paragraph, a "Why this matters" heading and its paragraph, then the body. The page ends
with the newsletter sign-up box, which is page chrome and is dropped.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from mailer.content.article import QUOTES
from mailer.content.fields import MAX_SUMMARY_PARAGRAPHS, FileContext, RawFields, section_kind
from mailer.text import one_line

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


class _Paragraph(NamedTuple):
    line: int  # 1-based line of the first line
    lines: list[str]


def _chrome_key(line: str) -> str:
    key = one_line(line.translate(QUOTES).replace("&amp;", "&").casefold())
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
    return section_kind(match.group(1)), match.group(2) or ""


def parse_site_text(text: str, ctx: FileContext) -> RawFields:
    """The fields of an article in the site's text format (the sign-up box dropped)."""
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
                    for k in range(i, min(len(paragraphs), i + MAX_SUMMARY_PARAGRAPHS + 1))
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
    return RawFields(
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
