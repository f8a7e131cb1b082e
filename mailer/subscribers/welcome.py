"""What a new reader is told when they confirm: their topics, the digests they receive and when
each next arrives, and the latest stories in their topics.

Built once here (``welcome_for``) and shown twice: in the welcome mail
(``mailer.compose.welcome``) and on the confirmed page (``mailer.web.signup``), so the two never
disagree. The next arrival comes from the scheduler's own answers (``issues.schedule.upcoming``
for the digest's cron, ``issues.create.goes_out`` for its quiet hours), not from a second
reading of the cron expression.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from mailer.compose.welcome import Arrival, Welcome, story
from mailer.config.settings import Digest, Settings
from mailer.content.store import ARTICLE_COLUMNS, fetch
from mailer.db.schema import articles
from mailer.issues import schedule
from mailer.issues.create import goes_out
from mailer.models import Article
from mailer.subscribers import editions
from mailer.subscribers.store import topics_of


def receives(
    conn: sa.Connection,
    settings: Settings,
    subscriber_id: int,
    chosen: set[str],
    *,
    now: datetime,
) -> list[Digest]:
    """The digests the subscriber receives, in config order: those they chose
    (``editions.chosen_digests``), not paused at ``now``, that carry one of their topics (a
    digest none of whose topics they chose never has an article for them)."""
    return [
        c.digest
        for c in editions.chosen_digests(conn, settings, subscriber_id)
        if chosen.intersection(c.digest.topics) and not c.paused(now)
    ]


def latest_articles(
    conn: sa.Connection, topics: tuple[str, ...], *, now: datetime, limit: int
) -> list[Article]:
    """The ``limit`` newest stories in ``topics`` at ``now``: published, not expired, not
    taken back by staff; newest published first."""
    if not topics or limit == 0:
        return []
    query = (
        sa.select(*ARTICLE_COLUMNS)
        .where(
            articles.c.topic.in_(sorted(topics)),
            articles.c.published_at <= now,
            articles.c.removed_at.is_(None),
            sa.or_(articles.c.expires_at.is_(None), articles.c.expires_at > now),
        )
        .order_by(articles.c.published_at.desc(), articles.c.id.desc())
        .limit(limit)
    )
    return fetch(conn, query)


def next_arrival(digest: Digest, now: datetime) -> datetime | None:
    """When the digest's next issue after ``now`` is first delivered (UTC), or None when its
    schedule has no more slots. A slot in quiet hours arrives when they end."""
    found = schedule.upcoming([digest], now)
    return goes_out(digest, found[0][1]) if found else None


def reader_time(moment: datetime, zone: str, now: datetime) -> str:
    """``moment`` as a reader reads it in ``zone``: "Friday 11 December, 7:00 AM EST" (the
    year added when it is not ``now``'s). A zone without an abbreviation is named in full."""
    local = moment.astimezone(ZoneInfo(zone))
    name = local.tzname() or zone
    if name[0] in "+-":
        name = zone
    day = f"{local:%A} {local.day} {local:%B}"
    if local.year != now.astimezone(ZoneInfo(zone)).year:
        day += f" {local.year}"
    hour = local.hour % 12 or 12
    return f"{day}, {hour}:{local:%M} {'AM' if local.hour < 12 else 'PM'} {name}"


def welcome_for(
    conn: sa.Connection, settings: Settings, subscriber_id: int, *, now: datetime
) -> Welcome:
    """Everything the welcome mail and the confirmed page say to this subscriber at ``now``."""
    chosen = set(topics_of(conn, [subscriber_id])[subscriber_id])
    topics = tuple(t for t in settings.topics if t.key in chosen)
    arrivals = []
    for digest in receives(conn, settings, subscriber_id, chosen, now=now):
        at = next_arrival(digest, now)
        when = reader_time(at, settings.site.timezone, now) if at is not None else ""
        arrivals.append(Arrival(digest.key, digest.name, at, when, digest.on_arrival))
    # Soonest first (one made on arrival first of all); a digest whose schedule ended last.
    arrivals.sort(key=lambda a: (not a.on_arrival, a.at is None, a.at or now))
    stories = latest_articles(
        conn, tuple(t.key for t in topics), now=now, limit=settings.welcome.articles
    )
    return Welcome(
        topics=tuple(t.name for t in topics),
        digests=tuple(arrivals),
        articles=tuple(story(a) for a in stories),
    )
