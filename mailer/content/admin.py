"""One article for staff: everything about it (``articles show``), and taking it back
(``articles remove``) from every issue that has not gone out in full.

Removal is a mark, not a delete: the row stays, with when, by whom and which issues it was
taken out of, so ``articles show`` and ``articles list`` can say so and no later ingest of the
same guid or content brings it back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from mailer.content.articles import ARTICLE_COLUMNS
from mailer.db import events
from mailer.db.schema import articles, issue_articles, issues
from mailer.errors import UnknownArticleError
from mailer.models import Article

log = logging.getLogger(__name__)

# An issue whose every delivery reached its end keeps its articles: it is the record of what
# went out (the archive shows it). Every other issue still renders from issue_articles.
SENT = "sent"


@dataclass(frozen=True)
class TakenBy:
    """One issue that took the article."""

    issue_id: int
    digest: str
    scheduled_for: datetime
    status: str


@dataclass(frozen=True)
class ArticleDetail:
    """One stored article, when it arrived and changed, what took it, and its removal if any."""

    article: Article
    created_at: datetime  # arrival in the store
    updated_at: datetime
    removed_by: str | None
    removed_from: tuple[int, ...]
    issues: tuple[TakenBy, ...]


@dataclass(frozen=True)
class Removal:
    """What ``remove`` did: the issues the article was taken out of, or that it already was."""

    article_id: int
    title: str
    issues: tuple[int, ...]
    already: bool
    removed_at: datetime
    removed_by: str


def _issue_ids(text: str | None) -> tuple[int, ...]:
    return tuple(int(part) for part in (text or "").split(";") if part)


def show(engine: sa.Engine, article_id: int) -> ArticleDetail:
    """The article ``article_id`` with the issues that took it; UnknownArticleError if none."""
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(
                *ARTICLE_COLUMNS,
                articles.c.created_at,
                articles.c.updated_at,
                articles.c.removed_by,
                articles.c.removed_from,
            ).where(articles.c.id == article_id)
        ).first()
        if row is None:
            raise UnknownArticleError(article_id)
        taken = conn.execute(
            sa.select(issues.c.id, issues.c.digest, issues.c.scheduled_for, issues.c.status)
            .join(issue_articles, issue_articles.c.issue_id == issues.c.id)
            .where(issue_articles.c.article_id == article_id)
            .order_by(issues.c.scheduled_for, issues.c.id)
        ).all()
    values = row._mapping
    return ArticleDetail(
        article=Article(**{c.name: values[c.name] for c in ARTICLE_COLUMNS}),
        created_at=row.created_at,
        updated_at=row.updated_at,
        removed_by=row.removed_by,
        removed_from=_issue_ids(row.removed_from),
        issues=tuple(TakenBy(*t) for t in taken),
    )


def remove(engine: sa.Engine, article_id: int, *, by: str, now: datetime) -> Removal:
    """Take the article out of every issue not sent in full, and out of every later issue.

    Deliveries still queued or deferred render from issue_articles when they are sent, so they
    go without it; a running worker sees the change at its next claim (``Deliverer`` checks
    the issues of every batch it claims). Recorded on the article and in the audit trail.
    Removing a removed article again changes nothing.
    """
    with engine.begin() as conn:
        query = sa.select(
            articles.c.title, articles.c.removed_at, articles.c.removed_by, articles.c.removed_from
        ).where(articles.c.id == article_id)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        row = conn.execute(query).first()
        if row is None:
            raise UnknownArticleError(article_id)
        if row.removed_at is not None:
            return Removal(
                article_id,
                row.title,
                _issue_ids(row.removed_from),
                True,
                row.removed_at,
                row.removed_by or "",
            )
        unsent = sorted(
            conn.scalars(
                sa.select(issue_articles.c.issue_id)
                .join(issues, issues.c.id == issue_articles.c.issue_id)
                .where(issue_articles.c.article_id == article_id, issues.c.status != SENT)
            ).all()
        )
        if unsent:
            conn.execute(
                issue_articles.delete().where(
                    issue_articles.c.article_id == article_id,
                    issue_articles.c.issue_id.in_(unsent),
                )
            )
        conn.execute(
            articles.update()
            .where(articles.c.id == article_id)
            .values(
                removed_at=now,
                removed_by=by[:200],
                removed_from=";".join(str(i) for i in unsent),
            )
        )
        events.record(conn, None, "article_removed", now, article=article_id, by=by, issues=unsent)
    log.info("article removed", extra={"article": article_id, "by": by, "issues": unsent})
    return Removal(article_id, row.title, tuple(unsent), False, now, by)
