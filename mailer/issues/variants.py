"""An issue's variants: the digests its readers get, one per set of its topics they chose.

Readers whose topics with articles in the issue are the same get the same digest
(``compose.messages.shown_topics``). Before an issue goes out (in review, approved, held) its
variants are who it would go to now, counted as the review mail counts them
(``create.recipients_by_topics`` with ``variants``); once it has deliveries they are its
recipients' (``report.topic_sets_of``, as the report counts them). An issue nobody would get
has one variant, every topic of its articles: the web copy.

Each variant renders as ``digest preview`` and the review mail show it
(``DigestComposer.preview``: neutral links, no personal link).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from mailer.compose.messages import DigestComposer, shown_topics
from mailer.compose.rendering import Renderer
from mailer.config.settings import Settings
from mailer.db.engine import reading
from mailer.db.schema import WAITING_ISSUE_STATUSES, issues
from mailer.errors import DigestError, UnknownIssueError
from mailer.issues.create import recipients_by_topics
from mailer.issues.progress import load_content
from mailer.issues.report import topic_sets_of
from mailer.issues.sample import topic_names
from mailer.models import IssueContent


@dataclass(frozen=True)
class Variant:
    """One digest of the issue: its topics (keys, configured order), their names, and how
    many readers get it (would get it, before the issue goes out)."""

    number: int  # 1-based, most readers first
    topics: tuple[str, ...]
    names: str
    readers: int


def issue_variants(
    engine: sa.Engine, settings: Settings, issue_id: int, *, now: datetime
) -> tuple[Variant, ...]:
    """The variants of issue ``issue_id``, most readers first; UnknownIssueError if none."""
    with reading(engine) as conn:
        return _variants(conn, settings, issue_id, now)


def render_variant(
    engine: sa.Engine,
    settings: Settings,
    issue_id: int,
    number: int,
    *,
    now: datetime,
    renderer: Renderer,
) -> tuple[Variant, str, str]:
    """Variant ``number`` (1-based) of the issue with its HTML and text, links neutral;
    DigestError if the issue has no such variant. Finding the nth counts every variant's
    readers (their order is by readers); ``render_topics`` renders one whose topics are known."""
    with reading(engine) as conn:
        found = _variants(conn, settings, issue_id, now)
        content = load_content(conn, issue_id, settings)
    if not 1 <= number <= len(found):
        raise DigestError(f"issue {issue_id} has {len(found)} variants; there is no {number}")
    variant = found[number - 1]
    html, text = DigestComposer(settings, content, renderer=renderer).preview(variant.topics)
    return variant, html, text


def render_topics(
    engine: sa.Engine,
    settings: Settings,
    issue_id: int,
    topics: Sequence[str],
    *,
    renderer: Renderer,
) -> tuple[str, str]:
    """The issue as readers who chose ``topics`` get it, HTML and text, links neutral: one
    variant, without counting who gets each (``issue_variants`` gave its topics). DigestError
    if a topic is not one the site offers or none is given; UnknownIssueError if no issue."""
    with reading(engine) as conn:
        content = load_content(conn, issue_id, settings)
    # A topic since removed from the config still names its articles' digests.
    known = {t.key for t in settings.topics} | {a.topic for a in content.articles}
    if not topics or any(t not in known for t in topics):
        raise DigestError(
            f"issue {issue_id} has no variant for the topics {', '.join(topics) or '(none)'}"
        )
    return DigestComposer(settings, content, renderer=renderer).preview(topics)


def _variants(
    conn: sa.Connection, settings: Settings, issue_id: int, now: datetime
) -> tuple[Variant, ...]:
    status = conn.execute(
        sa.select(issues.c.status).where(issues.c.id == issue_id)
    ).scalar_one_or_none()
    if status is None:
        raise UnknownIssueError(issue_id)
    content = load_content(conn, issue_id, settings)
    counted: list[tuple[tuple[str, ...], int]] = []
    digest = settings.find_digest(content.digest_key)
    topics = {a.topic for a in content.articles}
    if status in WAITING_ISSUE_STATUSES and digest is not None:
        counted = list(recipients_by_topics(conn, digest, topics, now, variants=True))
    elif status not in WAITING_ISSUE_STATUSES:
        counted = [
            (s.topics, s.recipients) for s in topic_sets_of(conn, settings, issue_id, content)
        ]
    counted = [(keys, n) for keys, n in counted if keys]
    if not counted:
        counted = [(_every_topic(settings, content), 0)]
    return tuple(
        Variant(i, keys, topic_names(settings, keys) or "(no topic)", n)
        for i, (keys, n) in enumerate(counted, start=1)
    )


def _every_topic(settings: Settings, content: IssueContent) -> tuple[str, ...]:
    return shown_topics(settings, content, {a.topic for a in content.articles})
