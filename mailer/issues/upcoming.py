"""What each digest will send next: its coming slots, and what the next one would take now.

Every answer comes from the code that makes the issue: the slots from
``mailer.issues.schedule``, the articles from ``create.articles_for``, the recipients from the
snapshot's own ``create.recipients_where`` and the quiet-hours delay from ``create.goes_out``.
Only the next slot lists articles and recipients: a later slot takes what arrives before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from mailer.config.settings import Digest, Settings
from mailer.content.selection import lookback_start
from mailer.db.engine import reading
from mailer.db.schema import articles
from mailer.issues import schedule
from mailer.issues.create import articles_for, goes_out, recipients_by_topics


@dataclass(frozen=True)
class Slot:
    """One nominal fire time (UTC) and when its deliveries are first due (later in quiet
    hours)."""

    at: datetime
    goes_out: datetime

    @property
    def held(self) -> bool:
        """The slot falls in the digest's quiet hours: it goes out at ``goes_out``."""
        return self.goes_out != self.at


@dataclass(frozen=True)
class UpcomingArticle:
    """An article the next issue would take; ``arrived`` is when it reached the store."""

    id: int
    title: str
    topic: str
    published: datetime
    arrived: datetime


@dataclass(frozen=True)
class Upcoming:
    """One digest's coming slots; ``articles``, ``left_over`` and ``recipients`` are for the
    first slot only, as if its issue were made now.

    ``recipients`` maps each set of topics (a subscriber's, within the digest's) to how many
    subscribers the issue would snapshot with that set.
    """

    key: str
    name: str
    slots: tuple[Slot, ...]
    articles: tuple[UpcomingArticle, ...]
    left_over: int
    recipients: tuple[tuple[tuple[str, ...], int], ...]

    @property
    def total_recipients(self) -> int:
        """Everyone the next issue would go to."""
        return sum(n for _, n in self.recipients)


def upcoming(
    engine: sa.Engine,
    settings: Settings,
    *,
    now: datetime,
    key: str | None = None,
    count: int = 3,
) -> list[Upcoming]:
    """The next ``count`` slots of each digest (or only ``key``), in config order.

    An unknown ``key`` raises ``ConfigError`` naming the known ones.
    """
    digests = settings.digests if key is None else (settings.digest(key),)
    with reading(engine) as conn:
        return [_one(conn, digest, now=now, count=count) for digest in digests]


def _one(conn: sa.Connection, digest: Digest, *, now: datetime, count: int) -> Upcoming:
    slots: list[Slot] = []
    after = now
    while len(slots) < count:
        found = schedule.upcoming([digest], after)
        if not found:
            break  # a schedule whose last firing has passed
        at = found[0][1]
        # A scheduled issue is made at its slot, so quiet hours are judged at the slot.
        slots.append(Slot(at, goes_out(digest, at)))
        after = at
    # The same call, with the same lookback start, as create_issue makes.
    selection = articles_for(
        conn, digest, now=now, since=lookback_start(conn, digest.key, digest.lookback, now)
    )
    chosen = selection.articles
    arrived = _arrivals(conn, [a.id for a in chosen])
    listed = tuple(
        UpcomingArticle(a.id, a.title, a.topic, a.published_at, arrived[a.id]) for a in chosen
    )
    return Upcoming(
        key=digest.key,
        name=digest.name,
        slots=tuple(slots),
        articles=listed,
        left_over=selection.left_over,
        recipients=recipients_by_topics(conn, digest, {a.topic for a in chosen}, now),
    )


def _arrivals(conn: sa.Connection, ids: list[int]) -> dict[int, datetime]:
    if not ids:
        return {}
    rows = conn.execute(
        sa.select(articles.c.id, articles.c.created_at).where(articles.c.id.in_(ids))
    )
    return {row.id: row.created_at for row in rows}
