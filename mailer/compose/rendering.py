"""Rendering: staff-edited Jinja2 templates to HTML and text, safely and once per topic set.

Templates run in the sandbox of ``mailer.sandbox`` (sandboxed, strict about undefined names,
HTML autoescaped); every failure comes out as a ``RenderError`` naming the template and line.
A ``Renderer`` is made by whoever composes (the service, a command, the web app, a worker) and
passed to what renders: nothing here is shared through a module global.

The view objects below are all a template ever sees: plain, frozen, and free of secrets (the
settings object holds the site secret, so it is never passed in).

HTML goes through ``css_inline`` (email clients ignore most ``<style>`` blocks) and then
``isolate_links`` puts every ``href`` attribute on a line of its own. Both happen once per
rendered body. The second is what lets ``mailer.compose.messages`` splice per-recipient URLs into
quoted-printable bytes encoded once: see that module.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import css_inline
from jinja2 import FileSystemLoader, TemplateError

from mailer import sandbox
from mailer.config.settings import Digest, Settings
from mailer.errors import RenderError
from mailer.models import Article, IssueContent
from mailer.sandbox import Lead, paragraphs
from mailer.text import one_line

# What makes an issue's subject: the digest, the issue date, and the issue's articles as a
# subject sees them (``leads``), first the one it opens with. ``Renderer.render_subject``.
SubjectRenderer = Callable[[Digest, datetime, Sequence[Lead]], str]

# Package data: a wheel installs it as plain files, and Jinja's FileSystemLoader reads a path.
TEMPLATE_DIR = Path(str(resources.files("mailer") / "templates"))

# A start tag as html5ever (css_inline) serializes it: attributes always as name="value", with
# '"' escaped as &quot; inside values and '<' never bare outside tags, so this is exact.
_START_TAG_RE = re.compile(r'<[A-Za-z][^\s/>]*(?:\s+[^\s"\'>/=]+(?:="[^"]*")?)*\s*/?>')
_HREF_RE = re.compile(r'\s+(href="[^"]*")\s*')


# --- the view objects templates see -------------------------------------------------------


@dataclass(frozen=True)
class SiteView:
    """The site as templates see it (no secret, nothing per subscriber)."""

    name: str
    tagline: str
    base_url: str
    publisher: str
    disclaimer: str
    postal_address: str
    postal_lines: tuple[str, ...]
    privacy_url: str
    # The postal address without the publisher's name when it starts with it, so "publisher,
    # street_address" names the publisher once whichever way staff wrote [site].postal_address.
    street_address: str
    # The masthead logo ([site].logo_url, https) and how it is shown; None: the name alone.
    logo_url: str | None = None
    logo_alt: str = ""
    logo_width: int = 200
    logo_height: int | None = None


@dataclass(frozen=True)
class LinkView:
    """The footer links. ``personal`` is False in the public web copy (no per-person URLs)."""

    unsubscribe: str
    preferences: str
    privacy: str
    archive: str
    home: str
    personal: bool


@dataclass(frozen=True)
class ArticleView:
    """One article in a digest: one-line title, safe https link or None."""

    title: str
    summary: str
    why_it_matters: str
    link: str | None
    topic: str = ""  # the topic's name
    # For a reader who received an earlier version: when it changed, in the site's zone.
    updated_at: datetime | None = None


@dataclass(frozen=True)
class SectionView:
    """One topic's articles, in the configured topic order."""

    key: str
    name: str
    articles: tuple[ArticleView, ...]

    @property
    def anchor(self) -> str:
        """The id of the section's heading, for the "In this issue" links (topic keys are
        letters, digits and dashes, so it needs no escaping)."""
        return f"topic-{self.key}"


@dataclass(frozen=True)
class NoteView:
    """The editor's note at the top of an issue: plain text (blank lines part paragraphs)."""

    text: str
    by: str


@dataclass(frozen=True)
class DigestView:
    """The digest an issue belongs to."""

    key: str
    name: str


@dataclass(frozen=True)
class IssueView:
    """The issue being rendered: its id, one-line subject and date (digest time zone)."""

    id: int
    subject: str
    date: datetime


def safe_link(url: str | None) -> str | None:
    """An article link fit for an email: https only, or None.

    ``javascript:``, ``data:`` and the like are dropped (autoescaping does not stop them).
    Plain ``http`` is upgraded: mail filters and clients flag http links, and news sites
    serve https. URLs with whitespace or control characters are dropped as malformed.
    """
    if not url:
        return None
    url = url.strip()
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return None
    return urlunsplit(parts._replace(scheme="https"))


def site_view(settings: Settings) -> SiteView:
    """The template-safe view of ``settings.site``."""
    site = settings.site
    lines = tuple(line.strip() for line in site.postal_address.splitlines() if line.strip())
    return SiteView(
        name=site.name,
        tagline=site.tagline,
        base_url=site.base_url,
        publisher=site.publisher,
        disclaimer=site.disclaimer,
        postal_address=", ".join(lines),
        postal_lines=lines,
        privacy_url=site.privacy_policy_url,
        street_address=street_address(site.publisher, ", ".join(lines)),
        logo_url=site.logo_url,
        logo_alt=site.logo_alt or site.name,
        logo_width=site.logo_width,
        logo_height=site.logo_height,
    )


def street_address(publisher: str, postal_address: str) -> str:
    """``postal_address`` less a leading ``publisher`` (any case, then a comma or the end).

    "Example Media, 100 Main Street" → "100 Main Street"; "100 Main Street" stays as it is; an
    address that is only the publisher's name gives "".
    """
    name = publisher.strip()
    if name and postal_address[: len(name)].casefold() == name.casefold():
        rest = postal_address[len(name) :]
        if not rest.strip():
            return ""
        if rest.lstrip().startswith(","):
            return rest.lstrip()[1:].strip()
    return postal_address


def sections(settings: Settings, articles: Sequence[Article]) -> tuple[SectionView, ...]:
    """``articles`` grouped per topic: configured topic order, then unknown topics by key.

    Within a section the articles keep the order they were given in (newest first).
    """
    names = {topic.key: topic.name for topic in settings.topics}
    order = {key: index for index, key in enumerate(names)}
    grouped: dict[str, list[ArticleView]] = {}
    for article in articles:
        view = article_view(article, names.get(article.topic, article.topic))
        grouped.setdefault(article.topic, []).append(view)
    keys = sorted(grouped, key=lambda key: (order.get(key, len(order)), key))
    return tuple(SectionView(key, names.get(key, key), tuple(grouped[key])) for key in keys)


def leads(settings: Settings, articles: Sequence[Article]) -> tuple[Lead, ...]:
    """``articles`` as a subject sees them, in the issue's order: title and topic name."""
    names = {topic.key: topic.name for topic in settings.topics}
    return tuple(Lead(one_line(a.title), names.get(a.topic, a.topic)) for a in articles)


def article_view(article: Article, topic: str = "") -> ArticleView:
    """The template view of one article; the title is forced onto one line.

    An article without a summary (a short alert is often a body alone) is shown by its body:
    all of it when there is no link to read it at, else its first paragraph. Without this
    fallback such an article reached readers as a bare title.
    """
    link = safe_link(article.link)
    summary = article.summary.strip()
    if not summary:
        body = article.body.strip()
        summary = body if link is None else (paragraphs(body) or [""])[0]
    return ArticleView(
        title=one_line(article.title),
        summary=summary,
        why_it_matters=article.why_it_matters.strip(),
        link=link,
        topic=topic,
        updated_at=article.updated_at if article.marked_updated else None,
    )


# The preheader (the line inboxes show after the subject) stops near here: inboxes show
# 40-140 characters of it, and a whole summary would only be cut by them.
PREHEADER_LIMIT = 140
# An "In this issue" list pays for its room from this many sections or articles on.
CONTENTS_SECTIONS = 2
CONTENTS_ARTICLES = 4


def digest_context(
    settings: Settings, content: IssueContent, articles: Sequence[Article], links: LinkView
) -> dict[str, Any]:
    """Everything ``email/<template>.html`` and ``.txt`` see, for ``articles`` of an issue.

    ``articles`` are all of them in the issue's order (an alert shows them so, without
    sections); ``lead`` is the first of them (what the issue opens with), given
    more room at the top; ``others`` are the sections without it; ``contents`` the sections
    an "In this issue" list links to (none for a short issue); ``preheader`` the first line
    a reader sees (see ``preheader``); ``note`` the editor's note or None.
    """
    grouped = sections(settings, articles)
    names = {topic.key: topic.name for topic in settings.topics}
    first = articles[0] if articles else None
    lead = article_view(first, names.get(first.topic, first.topic)) if first else None
    others = sections(settings, articles[1:])
    big = len(grouped) >= CONTENTS_SECTIONS or len(articles) >= CONTENTS_ARTICLES
    note = NoteView(content.note, content.note_by) if content.note.strip() else None
    return {
        "site": site_view(settings),
        "digest": DigestView(content.digest_key, content.digest_name),
        "issue": IssueView(content.issue_id, one_line(content.subject), content.date),
        "sections": grouped,
        "articles": tuple(article_view(a, names.get(a.topic, a.topic)) for a in articles),
        "lead": lead,
        "others": others,
        "contents": others if big else (),
        "count": len(articles),
        "preheader": preheader(lead),
        "note": note,
        "links": links,
    }


def preheader(lead: ArticleView | None) -> str:
    """The issue's first line: the lead's title and the start of its summary, one line.

    Inboxes show the first text of a message after its subject; without this that is the
    masthead's name and tagline, the same in every issue. It is shown in the message, not
    hidden: COMPLIANCE 4.13 (Gmail: "Don't use HTML and CSS to hide content").
    """
    if lead is None:
        return ""
    first = (paragraphs(lead.summary) or [""])[0]
    return sandbox.shorten(
        one_line(f"{lead.title} — {first}" if first else lead.title), PREHEADER_LIMIT
    )


# --- the environment ------------------------------------------------------------------------


class Renderer:
    """Loads and renders the email templates under ``template_dir`` (``mailer/templates``).

    Template names are relative to that directory (``email/digest.html``). One instance can
    be shared by everything its owner composes: Jinja caches compiled templates, and rendering
    has no other state.
    """

    def __init__(self, template_dir: Path | None = None) -> None:
        self.template_dir = (template_dir or TEMPLATE_DIR).resolve()
        self.env = sandbox.environment(FileSystemLoader(self.template_dir))
        # keep_at_rules keeps @media queries (they cannot be inlined) in a <style> block.
        # Remote stylesheets are never fetched: a staff template must not make us do I/O.
        self._inliner = css_inline.CSSInliner(keep_at_rules=True, load_remote_stylesheets=False)

    def warm(self, names: Iterable[str]) -> None:
        """Compile templates ``names`` now, so that the first message does not wait for it
        (about 50 ms for a digest's pair). A template that does not compile is left for its
        first render to report, with its file and line."""
        for name in names:
            try:
                self.env.get_template(name)
            except TemplateError:
                continue  # reported by render, where the message is built

    def render(self, name: str, context: Mapping[str, Any]) -> str:
        """Render template ``name`` as is (no CSS inlining)."""
        try:
            return self.env.get_template(name).render(context)
        except Exception as exc:
            # Deliberately broad: staff-written template code can raise anything (1/0,
            # a bad strftime argument, ...), and all of it is "this template is broken".
            raise sandbox.render_error(exc, name, self.template_dir) from exc

    def render_html(self, name: str, context: Mapping[str, Any]) -> str:
        """Render an HTML email template, inline its CSS, and put each href on its own line."""
        html = self.render(name, context)
        try:
            inlined: str = self._inliner.inline(html)
        except (css_inline.InlineError, ValueError) as exc:
            raise RenderError(f"CSS cannot be inlined: {exc}", template=name) from exc
        return isolate_links(inlined)

    def render_subject(self, digest: Digest, date: datetime, articles: Sequence[Lead] = ()) -> str:
        """The subject line of an issue of ``digest`` dated ``date`` holding ``articles``
        (``leads``), on one line (see ``mailer.sandbox.render_subject``)."""
        return sandbox.render_subject(self.env, digest, date, articles)


def digest_templates(settings: Settings) -> list[str]:
    """The templates the digests of ``settings`` render (``email/<template>.html`` and
    ``.txt``), each once."""
    names = dict.fromkeys(d.template for d in settings.digests)
    return [f"email/{name}.{kind}" for name in names for kind in ("html", "txt")]


def isolate_links(html: str) -> str:
    """Put each ``href="…"`` attribute on a line of its own.

    A line break between attributes is ordinary whitespace inside a tag (HTML Living
    Standard, "before attribute name state"), so the page is unchanged. What changes is the
    quoted-printable encoding: QP is line-local (RFC 2045 §6.7), so a URL alone on its line is
    encoded alone, and ``mailer.compose.messages`` can re-encode just that line per recipient.
    """
    return _START_TAG_RE.sub(_isolate_in_tag, html)


def _isolate_in_tag(match: re.Match[str]) -> str:
    return _HREF_RE.sub(r"\n\1\n", match.group(0))
