"""Feed HTML → safe HTML → text.

Feed HTML is sanitized with nh3 to a safe subset, then flattened to plain text: the store keeps
text (as article files give it) and templates escape it, so no feed markup ever reaches a
message.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

import nh3

from mailer.text import strip_controls

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
    text = strip_controls("".join(parser.parts))
    paragraphs = (" ".join(chunk.split()) for chunk in _PARAGRAPH_BREAK.split(text))
    return "\n\n".join(p for p in paragraphs if p)


def plain_to_text(text: str) -> str:
    """Plain text as ``html_to_text`` gives it: paragraphs one blank line apart, each on one
    line."""
    paragraphs = (" ".join(chunk.split()) for chunk in _PARAGRAPH_BREAK.split(strip_controls(text)))
    return "\n\n".join(p for p in paragraphs if p)
