"""What each digest will send next: its coming slots, and what the next one would take now.

Every answer comes from the code that makes the issue: the slots from
``mailer.issues.schedule``, the articles from ``create.articles_for``, the recipients from the
snapshot's own ``create.recipients_where`` and the quiet-hours delay from ``create.goes_out``.
Only the next slot lists articles and recipients: a later slot takes what arrives before it.

A digest with review has each issue made ``review_minutes`` before its slot (what arrives
after that goes in the next issue): each slot says when. A slot whose issue is made already
(in review, approved, held, skipped) shows that issue, its fixed articles and who it would go
to now; what a new issue would take is then shown for the first slot that has none. Issues
held past their slot are listed apart (``waiting``): they go out only when approved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

import sqlalchemy as sa

from mailer.config.settings import Digest, Settings
from mailer.content.selection import lookback_start
from mailer.db.engine import reading
from mailer.db.schema import WAITING_ISSUE_STATUSES, articles, issues
from mailer.issues import schedule
from mailer.issues.create import articles_for, goes_out, recipients_by_topics
from mailer.issues.progress import kept_articles
from mailer.issues.review_actions import actions, last_decision
from mailer.models import Article


@dataclass(frozen=True)
class Slot:
    """One nominal fire time (UTC) and when its deliveries are first due (later in quiet
    hours); with review, when its issue is made, and that issue if it is made already."""

    at: datetime
    goes_out: datetime
    review_opens: datetime | None = None
    issue: MadeIssue | None = None

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
class MadeIssue:
    """An issue made before its slot (review): its state, the articles it holds and who it
    would go to if it went out now."""

    id: int
    slot: datetime
    status: str
    acted: str  # the last decision: "approved by ana", or ""
    acted_at: datetime | None
    articles: tuple[UpcomingArticle, ...]
    recipients: tuple[tuple[tuple[str, ...], int], ...]

    @property
    def total_recipients(self) -> int:
        return sum(n for _, n in self.recipients)


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
    # Issues held past their slot: they wait for `mailer issues approve`.
    waiting: tuple[MadeIssue, ...] = ()
    # Made on arrival (no slots): ``articles`` and ``recipients`` are what its next issue
    # takes, made ``debounce_seconds`` after the first of them arrived.
    on_arrival: bool = False
    debounce_seconds: int = 0

    @property
    def takes_at(self) -> Slot | None:
        """The slot ``articles`` and ``recipients`` are for: the first without an issue."""
        return next((s for s in self.slots if s.issue is None), None)

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
        opens = at - digest.review if digest.review_minutes > 0 else None
        slots.append(Slot(at, goes_out(digest, at), opens))
        after = at
    made = _made(conn, digest, [s.at for s in slots], now)
    slots = [replace(s, issue=made.get(s.at)) for s in slots]
    # The same call, with the same lookback start, as create_issue makes.
    selection = articles_for(
        conn, digest, now=now, since=lookback_start(conn, digest.key, digest.lookback, now)
    )
    chosen = selection.articles
    return Upcoming(
        key=digest.key,
        name=digest.name,
        slots=tuple(slots),
        articles=_listed(conn, chosen),
        left_over=selection.left_over,
        recipients=recipients_by_topics(conn, digest, {a.topic for a in chosen}, now),
        waiting=tuple(_made(conn, digest, None, now).values()),
        on_arrival=digest.on_arrival,
        debounce_seconds=digest.debounce_seconds,
    )


def _listed(conn: sa.Connection, chosen: Sequence[Article]) -> tuple[UpcomingArticle, ...]:
    arrived = _arrivals(conn, [a.id for a in chosen])
    return tuple(
        UpcomingArticle(a.id, a.title, a.topic, a.published_at, arrived[a.id]) for a in chosen
    )


def _made(
    conn: sa.Connection, digest: Digest, slots: list[datetime] | None, now: datetime
) -> dict[datetime, MadeIssue]:
    """The digest's issues made for ``slots``; with None, those held past their slot."""
    query = sa.select(issues.c.id, issues.c.scheduled_for, issues.c.status).where(
        issues.c.digest == digest.key
    )
    if slots is None:
        query = query.where(issues.c.status == "held", issues.c.scheduled_for <= now)
    elif slots:
        query = query.where(issues.c.scheduled_for.in_(slots))
    else:
        return {}
    rows = conn.execute(query.order_by(issues.c.scheduled_for)).all()
    decided = actions(conn, [r.id for r in rows])
    found: dict[datetime, MadeIssue] = {}
    for row in rows:
        held = kept_articles(conn, row.id)
        last = last_decision(decided.get(row.id, ()))
        acted = f"{last.kind} by {last.by}" if last else ""
        acted_at = last.at if last else None
        found[row.scheduled_for] = MadeIssue(
            id=row.id,
            slot=row.scheduled_for,
            status=row.status,
            acted=acted,
            acted_at=acted_at,
            articles=_listed(conn, held),
            recipients=recipients_by_topics(conn, digest, {a.topic for a in held}, now)
            if row.status in WAITING_ISSUE_STATUSES
            else (),
        )
    return found


def _arrivals(conn: sa.Connection, ids: list[int]) -> dict[int, datetime]:
    if not ids:
        return {}
    rows = conn.execute(
        sa.select(articles.c.id, articles.c.created_at).where(articles.c.id.in_(ids))
    )
    return {row.id: row.created_at for row in rows}
