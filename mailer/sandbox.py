"""The Jinja sandbox staff-written templates run in, and what a subject line must be.

Templates are edited by staff, so they run in Jinja's ``SandboxedEnvironment`` (no access to
``__class__`` and friends) with ``StrictUndefined`` (a misspelt variable is an error, not an
empty string in 50,000 emails). HTML templates are autoescaped; text templates are not. Every
Jinja failure, and anything a template's own code raises, comes out as a ``RenderError``
naming the template and line.

The email templates (``mailer.compose.rendering.Renderer``) and a digest's ``subject`` run in
the same kind of environment, with the same filters. Nothing here reads the configuration or
the composer, so ``mailer.config`` checks a subject with it as it loads.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

import jinja2
from jinja2 import StrictUndefined, meta, select_autoescape
from jinja2.sandbox import SandboxedEnvironment

from mailer.errors import RenderError
from mailer.text import one_line

_FAKE_REPLY_RE = re.compile(r"^(re|fwd?|aw|wg|tr)\s*:", re.IGNORECASE)
_PARAGRAPH_RE = re.compile(r"\n[ \t]*\n")

# A subject longer than this is cut at a word boundary: inboxes show 40-90 characters, and a
# feed title of 400 characters would otherwise make a subject of 400.
SUBJECT_LIMIT = 150


@dataclass(frozen=True)
class Lead:
    """An article as a subject sees it: its one-line title and its topic's name."""

    title: str
    topic: str


# What ``mailer.config`` renders a subject with as it loads, so that a misspelt name in it
# (``lead.titel``) is refused then, not at the first issue.
SAMPLE_LEADS = (
    Lead("Gate 2 opens early Friday", "Base alerts"),
    Lead("Holiday market on the parade deck", "Local events"),
    Lead("New commander for the air station", "Military news"),
)


class SubjectOf(Protocol):
    """What a subject template is read from: a digest's key (for errors), name and subject."""

    @property
    def key(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def subject(self) -> str: ...


def paragraphs(text: str) -> list[str]:
    """Blank-line-separated paragraphs of ``text``, each on one line (a Jinja filter)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [p for p in (one_line(chunk) for chunk in _PARAGRAPH_RE.split(text)) if p]


def long_date(value: datetime) -> str:
    """``Friday, 20 November 2026``, without the platform-specific ``%-d``."""
    return f"{value:%A}, {value.day} {value:%B %Y}"


def environment(loader: jinja2.BaseLoader | None = None) -> SandboxedEnvironment:
    """A sandboxed environment with the project's filters (``paragraphs``, ``one_line``,
    ``long_date``); ``loader`` finds the template files, if any."""
    env = SandboxedEnvironment(
        loader=loader,
        autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["paragraphs"] = paragraphs
    env.filters["one_line"] = one_line
    env.filters["long_date"] = long_date
    return env


def render_subject(
    env: SandboxedEnvironment, digest: SubjectOf, date: datetime, articles: Sequence[Lead] = ()
) -> str:
    """The subject line of an issue of ``digest`` dated ``date`` holding ``articles``.

    ``digest.subject`` is a Jinja template seeing ``digest``, ``date``, ``lead`` (the first of
    ``articles``: what the issue opens with), ``count`` (how many articles) and ``more``
    (count - 1), so a subject can say what is inside: "Gate 2 opens early Friday, and 5 more".
    An issue without articles is never sent, but staff list it: its ``lead`` is None and
    ``count`` 0, and if the template names ``lead`` at all its subject is
    "<digest name>, <date>: no new articles" instead.

    CR, LF and other whitespace runs become single spaces, so the result is safe for a header,
    and it is cut at a word boundary to ``SUBJECT_LIMIT`` characters. RenderError for a
    template that fails, renders to nothing, or reads like a reply.
    """
    where = f"[[digests]] {digest.key!r} subject"
    context = {
        "digest": digest,
        "date": date,
        "lead": articles[0] if articles else None,
        "count": len(articles),
        "more": max(len(articles) - 1, 0),
    }
    try:
        template, names = _compiled(env, digest.subject)
        if not articles and "lead" in names:
            return one_line(f"{digest.name}, {long_date(date)}: no new articles")
        text = template.render(context)
    except Exception as exc:
        # Deliberately broad: the subject is staff-written template code, which can raise
        # anything (1/0, a bad strftime argument, ...), and all of it is "this subject is broken".
        raise render_error(exc, where) from exc
    subject = shorten(one_line(text), SUBJECT_LIMIT)
    if not subject:
        raise RenderError("renders to an empty subject", template=where)
    if _FAKE_REPLY_RE.match(subject):
        # A digest is not a reply: a fake "Re:"/"Fwd:" is a deceptive subject heading
        # (15 USC 7704(a)(2); COMPLIANCE 4.8). When the same template with sample titles
        # does not, an article's title ("RE: budget talks") made it so: the digest's name
        # goes first, rather than no issue at all.
        if articles and not _FAKE_REPLY_RE.match(digest.name):
            sample = Lead(SAMPLE_LEADS[0].title, articles[0].topic)
            neutral = one_line(template.render({**context, "lead": sample}))
            if not _FAKE_REPLY_RE.match(neutral):
                return shorten(one_line(f"{digest.name}: {subject}"), SUBJECT_LIMIT)
        raise RenderError(f"must not look like a reply or forward: {subject!r}", template=where)
    return subject


def _compiled(env: SandboxedEnvironment, source: str) -> tuple[jinja2.Template, frozenset[str]]:
    """``source`` compiled in ``env`` and the names it reads, compiled once per environment:
    a composer renders a subject per topic set, and compiling costs ten times rendering."""
    cache: dict[str, tuple[jinja2.Template, frozenset[str]]] = env.__dict__.setdefault(
        "_mailer_subjects", {}
    )
    found = cache.get(source)
    if found is None:
        names = frozenset(meta.find_undeclared_variables(env.parse(source)))
        found = cache[source] = (env.from_string(source), names)
    return found


def shorten(line: str, limit: int) -> str:
    """``line`` if it has at most ``limit`` characters, else cut at the last space that
    leaves room for "…" (mid-word only when the first word alone is too long)."""
    if len(line) <= limit:
        return line
    cut = line[: limit - 1]
    space = cut.rfind(" ")
    if space > limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:-–—") + "…"


def render_error(exc: Exception, name: str, template_dir: Path | None = None) -> RenderError:
    """A RenderError naming the template (file under ``template_dir``, or ``name`` for a
    template given as a string) and the line where ``exc`` happened."""
    if isinstance(exc, RenderError):
        return exc
    if isinstance(exc, jinja2.TemplateNotFound):
        return RenderError(f"template not found in {template_dir}", template=str(exc))
    if isinstance(exc, jinja2.TemplateSyntaxError):
        template = _relative(exc.filename, template_dir) if exc.filename else (exc.name or name)
        return RenderError(f"syntax error: {exc.message}", template=template, line=exc.lineno)
    template, line = name, None
    # Jinja rewrites tracebacks so template frames carry the template's file and line.
    for frame in traceback.extract_tb(exc.__traceback__):
        in_dir = template_dir is not None and frame.filename.startswith(str(template_dir))
        if frame.filename == "<template>" or in_dir:
            template = name if frame.filename == "<template>" else frame.filename
            line = frame.lineno
    message = str(exc) if isinstance(exc, jinja2.TemplateError) else f"{exc!r}"
    return RenderError(message, template=_relative(template, template_dir), line=line)


def _relative(filename: str, template_dir: Path | None) -> str:
    path = Path(filename)
    if template_dir is not None and path.is_absolute() and path.is_relative_to(template_dir):
        return path.relative_to(template_dir).as_posix()
    return filename
