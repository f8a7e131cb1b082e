"""Corrections: ``mailer articles retract ID --correction TEXT``.

Retracting an article takes it out of every issue not yet sent (``store.remove``, the same as
``articles remove``). With a correction, those who RECEIVED it get a short mail saying what
was wrong. That mail is an issue of its own (``issues.kind = "correction"``, migration 0012)
under the reserved digest key ``CORRECTION_DIGEST``, so it goes through the snapshot, the
worker, the report and the archive like any issue, and no digest's schedule or lookback counts
it. Its deliveries are alerts: claimed ahead of bulk mail, never held by quiet hours.

Who received the article: a delivery ``sent`` of an issue that took it (not dropped in review)
to a reader whose topics include the article's (a copy leaves out the topics its reader did
not choose), sent before the article expired (a copy leaves out what expired). A reader whose
later copy left it out as already seen got it from the earlier issue, and is counted once.
The snapshot then keeps only readers still active: an unsubscribed, bounced or complained
reader gets nothing. A reader pausing a digest still gets the correction: it corrects what
they were already sent, and the pause is of new issues.

``issues.note`` holds the correction text (``note_by`` who wrote it) and ``window_start`` when
the article first went out: a correction covers the time since then.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from mailer.config.settings import Settings
from mailer.content.store import ARTICLE_COLUMNS, Removal, remove
from mailer.db import audit
from mailer.db.engine import reading, refresh_statistics, upsert_insert
from mailer.db.schema import (
    CORRECTION_DIGEST,
    articles,
    deliveries,
    issue_articles,
    issues,
    subscriber_topics,
    subscribers,
)
from mailer.errors import MailerError, UnknownArticleError
from mailer.issues.create import message_id_prefix, queue_deliveries, snapshotted
from mailer.models import Article, Correction, IssueContent
from mailer.text import one_line

log = logging.getLogger(__name__)

MAX_CORRECTION = 2000
# Snapshot rows are inserted in chunks of this many readers (SQLite binds at most 32,766).
_CHUNK = 5000


@dataclass(frozen=True)
class Retraction:
    """What ``retract`` did: the removal, and the correction issue if one was asked for."""

    removal: Removal
    received: int  # readers who received the article
    correction_issue: int | None = None
    recipients: int = 0  # the correction's deliveries (readers still active)
    already_corrected: bool = False  # a correction was sent for it before: no second one


def check_text(text: str) -> str:
    """The correction text, stripped; a MailerError naming what is wrong otherwise."""
    stripped = text.strip()
    if not stripped:
        raise MailerError("--correction: the correction text is empty")
    if len(stripped) > MAX_CORRECTION:
        raise MailerError(
            f"--correction: the text is {len(stripped):,} characters; the limit is "
            f"{MAX_CORRECTION:,}"
        )
    return stripped


def retract(
    engine: sa.Engine,
    settings: Settings,
    article_id: int,
    *,
    correction: str | None,
    by: str,
    now: datetime,
) -> Retraction:
    """Take the article out of every unsent issue and, with ``correction``, make the
    correction issue for those who received it.

    Idempotent: an article already corrected gets no second correction; an article retracted
    without one gets it when retracted again with one. Who received it is read before the
    removal, which takes the article out of an issue still sending to some of its readers.
    """
    text = check_text(correction) if correction is not None else None
    with reading(engine) as conn:
        row = conn.execute(
            sa.select(articles.c.title, articles.c.topic).where(articles.c.id == article_id)
        ).first()
        if row is None:
            raise UnknownArticleError(article_id)
        existing = conn.execute(
            sa.select(issues.c.id).where(issues.c.corrects_article == article_id)
        ).scalar_one_or_none()
        readers = [] if existing is not None else received_by(conn, article_id)
        first_sent = first_sent_at(conn, article_id)
    removal = remove(engine, article_id, by=by, now=now)
    if existing is not None:
        return Retraction(removal, 0, existing, already_corrected=True)
    if text is None or not readers:
        return Retraction(removal, len(readers))
    subject = one_line(f"Correction: {row.title}")[:500]
    with engine.begin() as conn:
        issue_id = conn.execute(
            upsert_insert(conn, issues)
            .values(
                digest=CORRECTION_DIGEST,
                scheduled_for=now,
                window_start=first_sent,
                window_end=now,
                subject=subject,
                topics=row.topic,
                status="sending",
                created_at=now,
                note=text,
                note_by=by[:200],
                kind="correction",
                corrects_article=article_id,
            )
            .on_conflict_do_nothing(index_elements=["corrects_article"])
            .returning(issues.c.id)
        ).scalar_one_or_none()
        if issue_id is None:  # another retraction made it meanwhile
            existing = conn.execute(
                sa.select(issues.c.id).where(issues.c.corrects_article == article_id)
            ).scalar_one()
            return Retraction(removal, len(readers), existing, already_corrected=True)
        prefix = "<" + message_id_prefix(CORRECTION_DIGEST, now, issue_id)
        suffix = f"@{settings.site.domain}>"
        recipients = _snapshot(conn, issue_id, readers, (prefix, suffix), now)
        if recipients == 0:
            conn.execute(
                issues.update()
                .where(issues.c.id == issue_id)
                .values(status="empty", completed_at=now)
            )
        audit.record(
            conn,
            None,
            "correction_made",
            now,
            article=article_id,
            issue=issue_id,
            by=by,
            recipients=recipients,
        )
    refresh_statistics(engine, deliveries)
    log.info(
        "correction made",
        extra={"article": article_id, "issue": issue_id, "recipients": recipients},
    )
    return Retraction(removal, len(readers), issue_id, recipients)


@dataclass(frozen=True)
class Audience:
    """Who a correction of an article would go to, asked before retracting it."""

    received: int  # readers who received the article
    active: int  # of those, readers still active: the correction's recipients
    correction_issue: int | None  # the correction already made for it (none is made again)


def audience(engine: sa.Engine, article_id: int) -> Audience:
    """Who ``retract(..., correction=TEXT)`` would send a correction to now, by the same rule
    (``received_by``, then readers still active); UnknownArticleError if there is no article."""
    with reading(engine) as conn:
        found = conn.execute(
            sa.select(articles.c.id).where(articles.c.id == article_id)
        ).scalar_one_or_none()
        if found is None:
            raise UnknownArticleError(article_id)
        existing = conn.execute(
            sa.select(issues.c.id).where(issues.c.corrects_article == article_id)
        ).scalar_one_or_none()
        readers = received_by(conn, article_id)
        active = 0
        for start in range(0, len(readers), _CHUNK):
            chunk = readers[start : start + _CHUNK]
            active += conn.execute(
                sa.select(sa.func.count())
                .select_from(subscribers)
                .where(subscribers.c.id.in_(chunk), subscribers.c.status == "active")
            ).scalar_one()
    return Audience(len(readers), active, existing)


def received_by(conn: sa.Connection, article_id: int) -> list[int]:
    """The ids of the readers who received the article (see the module docstring)."""
    query = (
        sa.select(deliveries.c.subscriber_id)
        .join(issues, issues.c.id == deliveries.c.issue_id)
        .join(issue_articles, issue_articles.c.issue_id == issues.c.id)
        .join(articles, articles.c.id == issue_articles.c.article_id)
        .join(
            subscriber_topics,
            sa.and_(
                subscriber_topics.c.subscriber_id == deliveries.c.subscriber_id,
                subscriber_topics.c.topic == articles.c.topic,
            ),
        )
        .where(
            issue_articles.c.article_id == article_id,
            issue_articles.c.dropped_at.is_(None),
            issues.c.kind == "digest",
            deliveries.c.status == "sent",
            sa.or_(articles.c.expires_at.is_(None), deliveries.c.sent_at < articles.c.expires_at),
        )
        .distinct()
        .order_by(deliveries.c.subscriber_id)
    )
    return list(conn.scalars(query))


def first_sent_at(conn: sa.Connection, article_id: int) -> datetime | None:
    """When a digest first sent the article to anyone."""
    return conn.execute(
        sa.select(sa.func.min(deliveries.c.sent_at))
        .join(issue_articles, issue_articles.c.issue_id == deliveries.c.issue_id)
        .where(
            issue_articles.c.article_id == article_id,
            issue_articles.c.dropped_at.is_(None),
            deliveries.c.status == "sent",
        )
    ).scalar_one_or_none()


def _snapshot(
    conn: sa.Connection,
    issue_id: int,
    readers: list[int],
    message_id: tuple[str, str],
    now: datetime,
) -> int:
    """One alert delivery per reader still active, due at once; returns how many."""
    for start in range(0, len(readers), _CHUNK):
        chunk = readers[start : start + _CHUNK]
        queue_deliveries(
            conn,
            issue_id,
            sa.and_(subscribers.c.id.in_(chunk), subscribers.c.status == "active"),
            message_id=message_id,
            due=now,
            priority=1,
            now=now,
        )
    return snapshotted(conn, issue_id)


def correction_content(conn: sa.Connection, row: Any, settings: Settings) -> IssueContent:
    """What a composer renders for the correction issue ``row`` (an ``issues`` row)."""
    zone = ZoneInfo(settings.site.timezone)
    found = conn.execute(
        sa.select(*ARTICLE_COLUMNS).where(articles.c.id == row.corrects_article)
    ).first()
    corrected = (Article(**found._mapping),) if found is not None else ()
    first = row.window_start.astimezone(zone) if row.window_start is not None else None
    return IssueContent(
        issue_id=row.id,
        digest_key=row.digest,
        digest_name="Correction",
        subject=row.subject,
        date=row.scheduled_for.astimezone(zone),
        articles=corrected,
        correction=Correction(text=row.note or "", by=row.note_by or "", first_sent=first),
    )
