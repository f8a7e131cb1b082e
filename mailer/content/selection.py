"""Which articles the next issue of a digest takes: by arrival in the store, not by date.

A read of the article store's table (``mailer.content.store`` writes it) against the issues
already made; ``mailer.issues.create`` runs it inside the transaction that makes an issue.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from mailer.content.store import ARTICLE_COLUMNS, fetch
from mailer.db.schema import articles, issue_articles, issues
from mailer.models import Article


@dataclass(frozen=True)
class Selection:
    """What the next issue of a digest takes: ``articles`` (newest published first) and how
    many more it could take that ``max_articles`` leaves for the issues after it."""

    articles: list[Article]
    left_over: int


# The issue statuses that give their articles back (cancelled by staff while sending, skipped
# in review): any other issue of the digest has taken them.
GIVES_BACK = ("cancelled", "skipped")


def taken_by(digest_key: str) -> sa.Exists:
    """The article (``articles.id``) is in an issue of this digest that was not cancelled or
    skipped, or was dropped from one of its issues in review (``issues drop-article``: staff
    did not want it in this digest, so no later issue takes it either)."""
    return (
        sa.select(issue_articles.c.article_id)
        .join(issues, issues.c.id == issue_articles.c.issue_id)
        .where(
            issue_articles.c.article_id == articles.c.id,
            issues.c.digest == digest_key,
            sa.or_(issues.c.status.not_in(GIVES_BACK), issue_articles.c.dropped_at.is_not(None)),
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


def untaken(
    digest_key: str, topics: Sequence[str], *, since: datetime, now: datetime
) -> sa.ColumnElement[bool]:
    """The articles an issue of ``digest_key`` made at ``now`` may take (see
    ``select_for_issue``): the one clause for the issue and for the arrival watch
    (``mailer.issues.arrival``), so that the watch never waits for an article no issue takes."""
    return sa.and_(
        articles.c.topic.in_(list(topics)),
        articles.c.published_at > since,
        articles.c.published_at <= now,
        articles.c.removed_at.is_(None),
        sa.or_(articles.c.expires_at.is_(None), articles.c.expires_at > now),
        ~taken_by(digest_key),
    )


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
    over goes in the next one before anything that arrived after it; returned alerts first
    (``priority = "alert"``), then newest published first: the order an issue shows. Reads
    inside the caller's transaction (creating an issue snapshots its articles there);
    ``since`` is ``lookback_start`` when the caller read it.
    """
    if not topics or limit == 0:
        return Selection([], 0)
    if since is None:
        since = lookback_start(conn, digest_key, lookback, now)
    eligible = untaken(digest_key, topics, since=since, now=now)
    query = (
        sa.select(*ARTICLE_COLUMNS)
        .where(eligible)
        .order_by(articles.c.created_at, articles.c.id)
        .limit(limit)
    )
    chosen = fetch(conn, query)
    left_over = 0
    if len(chosen) == limit:
        count = sa.select(sa.func.count()).select_from(articles).where(eligible)
        left_over = int(conn.execute(count).scalar_one()) - limit
    # Alerts lead (a gate closed outranks this week's news), then newest published first.
    chosen.sort(key=lambda a: (a.priority == "alert", a.published_at, a.id), reverse=True)
    return Selection(chosen, left_over)
