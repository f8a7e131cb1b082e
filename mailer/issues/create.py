"""Making an issue: one per (digest, nominal time), created once, with a snapshot of its
recipients.

``create_issue`` is idempotent: the INSERT … ON CONFLICT DO NOTHING on UNIQUE(digest,
scheduled_for) picks one winner, and only the winner selects the articles and snapshots the
recipients, in the same transaction. Two processes firing the same slot create one issue.

An issue takes the articles its digest has not taken yet (``selection.select_for_issue``): by
arrival in the store, not by publication date, so an article fetched after its slot's issue
was made goes in the next one. Issues of one digest are made one at a time (SQLite's write
lock; a transaction-scoped advisory lock per digest on PostgreSQL), so two of them never take
the same article.

A digest with ``review_minutes`` has its issue made that long before the slot, in status
``review``: the articles are fixed then, the recipients only when it is released at the slot
(``mailer.issues.review``), so that whoever leaves or joins during the window is honoured. An
issue of such a digest made at or after its slot (the window was missed: no process ran) gets
``on_unreviewed`` at once: sent as if unreviewed ("send"), or ``held`` for staff ("hold").

What happens to an issue once made (cancel, resume, retry, its counts) is
``mailer.issues.progress``.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from mailer.compose.rendering import SubjectRenderer, leads
from mailer.config.settings import Digest, Settings
from mailer.content.selection import Selection, lookback_start, select_for_issue
from mailer.db.engine import reading, refresh_statistics, upsert_insert
from mailer.db.schema import (
    deliveries,
    issue_articles,
    issues,
    subscriber_digests,
    subscriber_topics,
    subscribers,
)
from mailer.issues import notes
from mailer.issues.schedule import quiet_until

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IssueCreated:
    """What ``create_issue`` did for one slot."""

    issue_id: int
    created: bool  # False: the issue already existed (another firing or process won)
    articles: int
    recipients: int
    # Articles this issue could have taken beyond max_articles: the next issue takes them.
    left_over: int = 0
    # sending, empty, or (a digest with review) review or held: then ``recipients`` is how
    # many it would go to now, no delivery being made before its release.
    status: str = "sending"


def message_id_prefix(digest_key: str, scheduled_for: datetime, issue_id: int) -> str:
    """The fixed left part of every Message-ID in an issue; the subscriber uid completes it."""
    return f"{digest_key}.{scheduled_for:%Y%m%d%H%M}.{issue_id}."


def articles_for(
    conn: sa.Connection, digest: Digest, *, now: datetime, since: datetime | None = None
) -> Selection:
    """What an issue of ``digest`` made at ``now`` takes: ``create_issue`` makes it so and the
    preview of the next issue shows it, by the one call."""
    return select_for_issue(
        conn,
        digest_key=digest.key,
        topics=digest.topics,
        lookback=digest.lookback,
        limit=digest.max_articles,
        now=now,
        since=since,
    )


def create_issue(
    engine: sa.Engine,
    settings: Settings,
    digest: Digest,
    *,
    scheduled_for: datetime,
    now: datetime,
    render_subject: SubjectRenderer,
    reviewed: bool = True,
) -> IssueCreated:
    """Create the issue for (digest, scheduled_for) unless it exists; snapshot its recipients.

    The issue takes what ``selection.select_for_issue`` gives at ``now`` (the moment it is
    made); its window records the publication dates that could go in, (window_start, now].
    For a digest with review (unless ``reviewed`` is False: ``digest send``), see the module
    docstring: made before its slot it waits in ``review`` without deliveries; made at or
    after it, ``on_unreviewed`` decides. An issue without articles is ``empty`` either way.
    """
    local_date = scheduled_for.astimezone(ZoneInfo(digest.timezone))
    status = initial_status(digest, scheduled_for=scheduled_for, now=now, reviewed=reviewed)
    note = notes.waiting_file(settings, digest)
    with engine.begin() as conn:
        since = lookback_start(conn, digest.key, digest.lookback, now)
        insert = upsert_insert(conn, issues)
        issue_id = conn.execute(
            insert.values(
                digest=digest.key,
                scheduled_for=scheduled_for,
                window_start=since,
                window_end=now,
                subject="",  # rendered below, once the articles are chosen
                topics=";".join(digest.topics),
                note=note.text if note else None,
                note_by=note.by if note else None,
                status=status,
                created_at=now,
            )
            .on_conflict_do_nothing(index_elements=["digest", "scheduled_for"])
            .returning(issues.c.id)
        ).scalar_one_or_none()
        if issue_id is None:
            existing = conn.execute(
                sa.select(issues.c.id).where(
                    issues.c.digest == digest.key, issues.c.scheduled_for == scheduled_for
                )
            ).scalar_one()
            return IssueCreated(existing, False, 0, 0)
        _one_issue_at_a_time(conn, digest.key)
        selection = articles_for(conn, digest, now=now, since=since)
        chosen = selection.articles
        # The subject names what the issue opens with, so it is made from the chosen articles
        # (a RenderError here rolls the whole issue back: the firing is retried).
        subject = render_subject(digest, local_date, leads(settings, chosen))
        conn.execute(issues.update().where(issues.c.id == issue_id).values(subject=subject))
        if chosen:
            conn.execute(
                issue_articles.insert(),
                [
                    {"issue_id": issue_id, "article_id": a.id, "position": i}
                    for i, a in enumerate(chosen)
                ],
            )
        topics = {a.topic for a in chosen}
        if status == "sending":
            recipients = snapshot(conn, settings, digest, issue_id, scheduled_for, topics, now)
        else:
            recipients = count_recipients(conn, digest.key, topics, now)
        if (status == "sending" and recipients == 0) or not chosen:
            # Nothing to send, and nothing to review: an issue without articles is over.
            status = "empty"
            conn.execute(
                issues.update()
                .where(issues.c.id == issue_id)
                .values(status=status, completed_at=now)
            )
    if note is not None:
        notes.taken(note, issue_id)
    if status == "sending":
        refresh_statistics(engine, deliveries)
    log.info(
        "issue created",
        extra={
            "issue": issue_id,
            "digest": digest.key,
            "articles": len(chosen),
            "left_over": selection.left_over,
            "recipients": recipients,
            "status": status,
        },
    )
    return IssueCreated(issue_id, True, len(chosen), recipients, selection.left_over, status)


def initial_status(
    digest: Digest, *, scheduled_for: datetime, now: datetime, reviewed: bool = True
) -> str:
    """The status an issue of ``digest`` for ``scheduled_for`` is made in at ``now``.

    ``review`` before the slot (the review window); at or after it the window was missed and
    ``on_unreviewed`` applies at once: "send" (``sending``) or "hold" (``held``). A digest
    without review, and a ``digest send`` (``reviewed`` False), send at once.
    """
    if not reviewed or digest.review_minutes <= 0:
        return "sending"
    if now < scheduled_for:
        return "review"
    return "sending" if digest.on_unreviewed == "send" else "held"


def count_recipients(conn: sa.Connection, digest_key: str, topics: set[str], now: datetime) -> int:
    """How many subscribers an issue of ``digest_key`` with articles in ``topics`` would go to
    at ``now``."""
    if not topics:
        return 0
    return int(
        conn.execute(
            sa.select(sa.func.count())
            .select_from(subscribers)
            .where(recipients_where(digest_key, topics, now))
        ).scalar_one()
    )


def _one_issue_at_a_time(conn: sa.Connection, digest_key: str) -> None:
    """Hold the digest's issue lock until this transaction ends.

    Two issues of one digest made at once (a scheduled slot and a ``digest send``, or two
    slots caught up by two processes) would each see the other's articles as not taken yet.
    SQLite already runs one writing transaction at a time (BEGIN IMMEDIATE); PostgreSQL gets a
    transaction-scoped advisory lock keyed on the digest, after which this transaction's next
    statements see what the other one committed (READ COMMITTED).
    """
    if conn.dialect.name != "postgresql":
        return
    digest_hash = hashlib.sha256(f"mailer.issue:{digest_key}".encode()).digest()
    key = int.from_bytes(digest_hash[:8], "big", signed=True)
    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))


def goes_out(digest: Digest, made: datetime) -> datetime:
    """When the deliveries of an issue of ``digest`` made at ``made`` are first due."""
    # A bulk issue made in quiet hours waits for their end; an alert never waits.
    if digest.priority == "alert":
        return made
    return quiet_until(digest.quiet_hours, digest.timezone, made) or made


def recipients_where(digest_key: str, topics: set[str], now: datetime) -> sa.ColumnElement[bool]:
    """Which subscribers an issue of ``digest_key`` with articles in ``topics`` made at ``now``
    goes to: active, receiving that digest and not pausing it, and one of the topics chosen.

    The snapshot, ``count_recipients``, review and ``mailer.issues.upcoming`` all select by
    this one clause, so what staff are shown is who the issue takes.
    """
    wanted = sa.select(subscriber_topics.c.subscriber_id).where(
        subscriber_topics.c.topic.in_(sorted(topics))
    )
    receiving = sa.select(subscriber_digests.c.subscriber_id).where(
        subscriber_digests.c.digest == digest_key,
        # Paused from the preferences page: no issue of this digest while the pause lasts.
        sa.or_(
            subscriber_digests.c.paused_until.is_(None), subscriber_digests.c.paused_until <= now
        ),
    )
    return sa.and_(
        subscribers.c.status == "active",
        subscribers.c.id.in_(wanted),
        subscribers.c.id.in_(receiving),
    )


def recipients_by_topics(
    conn: sa.Connection, digest: Digest, topics: set[str], now: datetime, *, variants: bool = False
) -> tuple[tuple[tuple[str, ...], int], ...]:
    """Who an issue with articles in ``topics`` would go to at ``now``, per topic set, most
    common first: each reader's topics within the digest's (``digest upcoming``), or with
    ``variants`` within ``topics`` only, so that readers who get the same digest count once
    together (the review mail's variants)."""
    within = topics if variants else set(digest.topics)
    order = {topic: i for i, topic in enumerate(digest.topics)}
    counts = Counter(
        tuple(sorted(s, key=lambda t: (order.get(t, len(order)), t)))
        for s in chosen_topics(conn, digest.key, topics, now, within=within).values()
    )
    return tuple(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def chosen_topics(
    conn: sa.Connection, digest_key: str, topics: set[str], now: datetime, *, within: set[str]
) -> dict[int, set[str]]:
    """Each would-be recipient (by id) of an issue of ``digest_key`` with articles in ``topics``
    (``recipients_where``, the snapshot's own clause) with the topics of ``within`` they chose.
    """
    # The snapshot takes nobody when no article is chosen.
    if not topics:
        return {}
    chosen = sa.select(subscribers.c.id).where(recipients_where(digest_key, topics, now))
    rows = conn.execute(
        sa.select(subscriber_topics.c.subscriber_id, subscriber_topics.c.topic).where(
            subscriber_topics.c.subscriber_id.in_(chosen),
            subscriber_topics.c.topic.in_(sorted(within)),
        )
    )
    sets: dict[int, set[str]] = {}
    for row in rows:
        sets.setdefault(row.subscriber_id, set()).add(row.topic)
    return sets


def snapshot(
    conn: sa.Connection,
    settings: Settings,
    digest: Digest,
    issue_id: int,
    scheduled_for: datetime,
    topics: set[str],
    now: datetime,
) -> int:
    """Queue one delivery per active subscriber who chose a topic this issue has articles in,
    first due at ``goes_out(digest, now)``; returns how many the issue has.

    Run once per issue, in the transaction that makes it ``sending``: when it is made, or when
    it is released after review (``mailer.issues.review``).
    """
    if not topics:
        return 0
    prefix = "<" + message_id_prefix(digest.key, scheduled_for, issue_id)
    alert = digest.priority == "alert"
    due = goes_out(digest, now)
    suffix = f"@{settings.site.domain}>"
    queue_deliveries(
        conn,
        issue_id,
        recipients_where(digest.key, topics, now),
        message_id=(prefix, suffix),
        due=due,
        priority=1 if alert else 0,
        now=now,
    )
    # Counted, not taken from rowcount: drivers disagree on it for INSERT … SELECT.
    return snapshotted(conn, issue_id)


def queue_deliveries(
    conn: sa.Connection,
    issue_id: int,
    who: sa.ColumnElement[bool],
    *,
    message_id: tuple[str, str],
    due: datetime,
    priority: int,
    now: datetime,
) -> None:
    """Queue one delivery of ``issue_id`` per subscriber ``who`` selects, in one INSERT …
    SELECT: first due at ``due``, its Message-ID the two parts of ``message_id`` around the
    subscriber's uid. Both an issue's snapshot and a correction's are made by it."""
    prefix, suffix = message_id
    select = sa.select(
        sa.literal(issue_id),
        subscribers.c.id,
        sa.literal("queued"),
        sa.literal(due, type_=deliveries.c.next_attempt_at.type),
        (sa.literal(prefix) + subscribers.c.uid + sa.literal(suffix)),
        sa.literal(now, type_=deliveries.c.created_at.type),
        sa.literal(now, type_=deliveries.c.updated_at.type),
        sa.literal(priority),
    ).where(who)
    conn.execute(
        deliveries.insert().from_select(
            [
                "issue_id",
                "subscriber_id",
                "status",
                "next_attempt_at",
                "message_id",
                "created_at",
                "updated_at",
                "priority",
            ],
            select,
        )
    )


def snapshotted(conn: sa.Connection, issue_id: int) -> int:
    """How many deliveries the issue's snapshot made."""
    return int(
        conn.execute(
            sa.select(sa.func.count())
            .select_from(deliveries)
            .where(deliveries.c.issue_id == issue_id)
        ).scalar_one()
    )


def last_scheduled(
    engine: sa.Engine, digest_key: str, *, until: datetime | None = None
) -> datetime | None:
    """The slot of the digest's newest issue (with ``until``, of a slot at or before it).

    ``until`` leaves out an issue made ahead of its slot for review: a slot missed before it
    is still missed.
    """
    query = sa.select(sa.func.max(issues.c.scheduled_for)).where(issues.c.digest == digest_key)
    if until is not None:
        query = query.where(issues.c.scheduled_for <= until)
    with reading(engine) as conn:
        return conn.execute(query).scalar_one_or_none()
