"""The delivery ledger: claims, in-flight marks and outcomes, in group commits.

A delivery's life: ``queued`` → claimed (a lease: ``lease_owner`` and ``lease_expires_at``
set, status unchanged) → ``sending`` (in flight: its bytes may be on the wire) → ``sent`` |
``deferred`` (queued again later) | ``bounced`` | ``failed`` | ``cancelled``.

Crash bound. A worker marks a delivery ``sending`` in the same transaction that records the
outcome of the previous message on that SMTP connection, and starts DATA only after that
commit. So at any instant a worker has at most one ``sending`` row per open connection, and
those are the only rows whose fate a crash can leave unknown. Claimed rows not yet started
keep their old status and simply return to the queue when the lease expires. In-doubt rows
are re-sent with the same Message-ID, or held as ``unknown``, by ``[smtp].in_doubt``.

Claims take a batch at once (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; the ``BEGIN
IMMEDIATE`` write lock on SQLite), so concurrent workers never share a row. Outcomes are
written for many connections in one transaction: a transaction per message was measured at
about 200 messages per second.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY

from mailer.config.settings import SmtpSettings
from mailer.db.engine import reading, writing
from mailer.db.schema import (
    SENDING_ROW,
    WAITING_ROW,
    articles,
    deliveries,
    issue_articles,
    issues,
    subscriber_topics,
    subscribers,
)
from mailer.delivery.policy import SendResult, settle

WAITING = ("queued", "deferred")


def _one_of(column: sa.ColumnElement[Any], name: str, *, arrays: bool) -> sa.ColumnElement[bool]:
    """``column`` is one of the ids bound as ``name``: one array parameter on PostgreSQL
    (``arrays``), an expanding IN list on SQLite.

    As an IN list, a claim's 500 ids were 500 parameters: psycopg caches its conversion of a
    statement's placeholders only up to 50 parameters, so it parsed the 500 again on every
    execution (8 % of the samples of a PostgreSQL send), and the server planned a statement
    with 500 parameters. As an array the statement text is the same for any number of ids, so
    psycopg prepares it once.
    """
    if arrays:
        return column == sa.any_(sa.bindparam(name, type_=ARRAY(sa.BigInteger)))
    return column.in_(sa.bindparam(name, expanding=True))


@dataclass(frozen=True)
class Claimed:
    """A delivery this worker holds the lease on, with what it needs to build the message."""

    id: int
    issue_id: int
    subscriber_id: int
    email: str
    name: str
    uid: str
    topics: tuple[str, ...]
    message_id: str
    attempts: int
    created_at: datetime
    digest: str = ""
    # This issue's articles the subscriber already received in another issue, each with
    # whether the article was updated since (a digest may send updated ones again).
    seen: tuple[tuple[int, bool], ...] = ()


@dataclass(frozen=True)
class Result:
    """What became of one claimed delivery, for ``commit_progress`` to record."""

    delivery: Claimed
    outcome: SendResult | None  # None: nothing to send (no article in the subscriber's topics)
    error: str | None = None  # the message could not be built for this recipient: failed


def _free(now: datetime) -> sa.ColumnElement[bool]:
    return sa.or_(deliveries.c.lease_expires_at.is_(None), deliveries.c.lease_expires_at < now)


def hold_in_doubt(engine: sa.Engine, *, now: datetime) -> int:
    """Mark deliveries whose worker died mid-send ``unknown`` (the "hold" policy)."""
    with writing(engine) as conn:
        return conn.execute(
            deliveries.update()
            .where(SENDING_ROW, deliveries.c.lease_expires_at < now)
            .values(
                status="unknown",
                last_reply="worker stopped while sending; may have been delivered",
                lease_owner=None,
                lease_expires_at=None,
                updated_at=now,
            )
        ).rowcount


def claim(
    engine: sa.Engine,
    *,
    owner: str,
    limit: int,
    lease: timedelta,
    now: datetime,
    issue_id: int | None = None,
    resend_in_doubt: bool = True,
) -> list[Claimed]:
    """Lease up to ``limit`` due deliveries to ``owner``, in claim order (priority first, then
    the oldest due, then the lowest id).

    Due: queued or deferred with ``next_attempt_at`` passed and no live lease; with
    ``resend_in_doubt``, also rows left ``sending`` under an expired lease (their worker died).

    Only choosing and leasing the rows happens in the write transaction (on SQLite it holds the
    database's one write lock, which every group commit of every worker waits for); what the
    messages need is read afterwards, from rows that are ours by then.
    """
    with writing(engine) as conn:
        ids = _due(conn, limit=limit, now=now, issue_id=issue_id, resend_in_doubt=resend_in_doubt)
        if not ids:
            return []
        statements = _CLAIM[conn.dialect.name == "postgresql"]
        conn.execute(
            statements.lease,
            {"ids": ids, "_owner": owner, "_expires": now + lease, "_now": now},
        )
    with reading(engine) as conn:
        rows = conn.execute(statements.rows, {"ids": ids}).all()
        # Someone who unsubscribed or paused after the snapshot gets nothing more.
        live = [r for r in rows if _receiving(r.status, r.paused_until, now)]
        topics: dict[int, list[str]] = {r.subscriber_id: [] for r in live}
        if topics:
            for sid, topic in conn.execute(statements.topics, {"ids": list(topics)}):
                topics[sid].append(topic)
        seen = _seen(conn, live, statements.arrays)
    if len(live) < len(rows):
        gone = [r.id for r in rows if not _receiving(r.status, r.paused_until, now)]
        with writing(engine) as conn:
            conn.execute(
                deliveries.update()
                .where(deliveries.c.id.in_(gone))
                .values(
                    status="cancelled",
                    last_reply="subscriber no longer receiving",
                    lease_owner=None,
                    lease_expires_at=None,
                    updated_at=now,
                )
            )
    # Unpacked by position: a named attribute of a Row costs more than the rest of the loop.
    return [
        Claimed(
            id=id_,
            issue_id=issue,
            subscriber_id=sid,
            email=email,
            name=name,
            uid=uid,
            topics=tuple(topics[sid]),
            message_id=message_id,
            attempts=attempts,
            created_at=created_at,
            digest=digest,
            seen=tuple(sorted(seen[sid].items())) if sid in seen else (),
        )
        for (
            id_,
            issue,
            sid,
            message_id,
            attempts,
            created_at,
            email,
            name,
            uid,
            _status,
            _paused_until,
            digest,
        ) in live
    ]


def _due(
    conn: sa.Connection,
    *,
    limit: int,
    now: datetime,
    issue_id: int | None,
    resend_in_doubt: bool,
) -> list[int]:
    """The ids of the first ``limit`` due rows in claim order, locked (SKIP LOCKED) until the
    transaction ends.

    One query per kind of due row instead of one with an OR (waiting rows; rows in doubt),
    merged here: each reads its own partial index (``ix_deliveries_issue_waiting`` or
    ``ix_deliveries_waiting``, in claim order, so the batch is the index's first rows;
    ``ix_deliveries_sending``), where the OR made both databases sort every row of the issue on
    every claim. Within one issue every row has the same priority (``issues._snapshot`` sets it
    from the digest, and nothing changes it), so an issue's rows are read in
    (next_attempt_at, id) order.
    """
    free = _free(now)
    waiting = sa.and_(WAITING_ROW, deliveries.c.next_attempt_at <= now)
    branches = [waiting]
    if resend_in_doubt:
        branches.append(SENDING_ROW)
    order: tuple[sa.ColumnElement[Any], ...] = (deliveries.c.next_attempt_at, deliveries.c.id)
    if issue_id is None:
        order = (deliveries.c.priority.desc(), *order)
    candidates: list[Any] = []
    for due in branches:
        query = sa.select(deliveries.c.id, deliveries.c.priority, deliveries.c.next_attempt_at)
        query = query.where(due, free)
        if issue_id is not None:
            query = query.where(deliveries.c.issue_id == issue_id)
        query = query.order_by(*order).limit(limit).with_for_update(skip_locked=True)
        candidates.extend(conn.execute(query).all())
    if len(branches) > 1:
        candidates.sort(key=lambda r: (-r.priority, r.next_attempt_at, r.id))
    return [r.id for r in candidates[:limit]]


@dataclass(frozen=True)
class _ClaimStatements:
    """A claim's statements for one kind of id list (``_one_of``), built once: building them
    per claim (and a list of literal ids, a bound parameter object each) cost more CPU than
    the database spent running them."""

    arrays: bool
    lease: sa.Update
    rows: sa.Select[Any]
    topics: sa.Select[Any]

    @classmethod
    def build(cls, *, arrays: bool) -> _ClaimStatements:
        lease = (
            deliveries.update()
            .where(_one_of(deliveries.c.id, "ids", arrays=arrays))
            .values(
                lease_owner=sa.bindparam("_owner"),
                lease_expires_at=sa.bindparam("_expires"),
                updated_at=sa.bindparam("_now"),
            )
        )
        rows = (
            sa.select(
                deliveries.c.id,
                deliveries.c.issue_id,
                deliveries.c.subscriber_id,
                deliveries.c.message_id,
                deliveries.c.attempts,
                deliveries.c.created_at,
                subscribers.c.email,
                subscribers.c.name,
                subscribers.c.uid,
                subscribers.c.status,
                subscribers.c.paused_until,
                issues.c.digest,
            )
            .join(subscribers, subscribers.c.id == deliveries.c.subscriber_id)
            .join(issues, issues.c.id == deliveries.c.issue_id)
            .where(_one_of(deliveries.c.id, "ids", arrays=arrays))
            .order_by(deliveries.c.id)
        )
        topics = (
            sa.select(subscriber_topics.c.subscriber_id, subscriber_topics.c.topic)
            .where(_one_of(subscriber_topics.c.subscriber_id, "ids", arrays=arrays))
            .order_by(subscriber_topics.c.topic)
        )
        return cls(arrays, lease, rows, topics)


# By ``arrays``: PostgreSQL (True), SQLite (False).
_CLAIM = {arrays: _ClaimStatements.build(arrays=arrays) for arrays in (False, True)}


def _seen(conn: sa.Connection, rows: Sequence[Any], arrays: bool) -> dict[int, dict[int, bool]]:
    """Per subscriber: which of these issues' articles another issue already brought them.

    First the other issues that share an article with these (``issue_articles`` is small),
    then only those issues' deliveries to these subscribers, through the
    (issue_id, subscriber_id) index. Asked in one join instead, PostgreSQL planned it over
    every sent delivery while the table's statistics lagged behind a fresh issue: its CPU per
    message grew with the list (≈ 720 µs at 100,000).
    """
    if not rows:
        return {}
    batch_issues = sorted({r.issue_id for r in rows})
    shared = sa.select(issue_articles.c.article_id).where(
        issue_articles.c.issue_id.in_(batch_issues)
    )
    earlier = conn.scalars(
        sa.select(issue_articles.c.issue_id)
        .where(issue_articles.c.article_id.in_(shared))
        .where(issue_articles.c.issue_id.not_in(batch_issues))
        .distinct()
    ).all()
    if not earlier:
        return {}
    previous = deliveries.alias("previous")
    query = (
        sa.select(
            previous.c.subscriber_id,
            issue_articles.c.article_id,
            (articles.c.updated_at > previous.c.sent_at).label("updated"),
        )
        .join(issue_articles, issue_articles.c.issue_id == previous.c.issue_id)
        .join(articles, articles.c.id == issue_articles.c.article_id)
        .where(
            previous.c.issue_id.in_(earlier),
            _one_of(previous.c.subscriber_id, "ids", arrays=arrays),
            previous.c.status == "sent",
            issue_articles.c.article_id.in_(shared),
        )
    )
    seen: dict[int, dict[int, bool]] = {}
    for sid, article_id, updated in conn.execute(
        query, {"ids": sorted({r.subscriber_id for r in rows})}
    ):
        mine = seen.setdefault(sid, {})
        mine[article_id] = bool(updated) and mine.get(article_id, True)
    return seen


def postpone(
    engine: sa.Engine, ids: Sequence[int], *, owner: str, until: datetime, now: datetime
) -> None:
    """Hand claimed rows back with a later due time (quiet hours)."""
    if not ids:
        return
    with writing(engine) as conn:
        conn.execute(
            deliveries.update()
            .where(deliveries.c.id.in_(ids), deliveries.c.lease_owner == owner)
            .values(next_attempt_at=until, lease_owner=None, lease_expires_at=None, updated_at=now)
        )


def _receiving(status: str, paused_until: datetime | None, now: datetime) -> bool:
    return status == "active" and (paused_until is None or paused_until <= now)


def _outcome_row(
    result: Result, settings: SmtpSettings, now: datetime, rng: random.Random
) -> dict[str, Any]:
    d = result.delivery
    verdict = settle(
        result.outcome,
        error=result.error,
        attempts=d.attempts + 1,  # counted when it was started
        created_at=d.created_at,
        now=now,
        settings=settings,
        rng=rng,
    )
    sent_at = now if verdict.status == "sent" else None
    return {
        "_id": d.id,
        "_status": verdict.status,
        "_reply": verdict.reply,
        "_sent_at": sent_at,
        "_next": verdict.next_attempt,
    }


# What a bounce at send time does beyond the delivery's row (mailer.bounces suppresses the
# subscriber): called with the group commit's connection, the delivery, the server's answer and
# the time, so that it commits with the outcome. The ledger only records deliveries.
BounceHook = Callable[[sa.Connection, Claimed, SendResult, datetime], object]


# The two statements of every group commit, built once: building them per call (and an IN
# list of literal ids, each coerced into its own bound parameter) cost more CPU than the
# database spent running them.
_RECORD = (
    deliveries.update()
    .where(deliveries.c.id == sa.bindparam("_id"))
    .values(
        status=sa.bindparam("_status"),
        last_reply=sa.bindparam("_reply"),
        sent_at=sa.bindparam("_sent_at"),
        next_attempt_at=sa.bindparam("_next"),
        lease_owner=None,
        lease_expires_at=None,
        updated_at=sa.bindparam("_now"),
    )
)


def _start(chosen: sa.ColumnElement[bool]) -> sa.UpdateBase:
    """Mark the ``chosen`` rows in flight where this worker still holds their lease; returns
    the ids started."""
    return (
        deliveries.update()
        .where(chosen, deliveries.c.lease_owner == sa.bindparam("_owner"))
        .values(
            status="sending",
            attempts=deliveries.c.attempts + 1,
            lease_expires_at=sa.bindparam("_expires"),
            updated_at=sa.bindparam("_now"),
        )
        .returning(deliveries.c.id)
    )


# By ``arrays``, as _CLAIM: on PostgreSQL the ids to start go as one array.
_START = {
    arrays: _start(_one_of(deliveries.c.id, "_ids", arrays=arrays)) for arrays in (False, True)
}


# PostgreSQL: the outcomes as one statement per group whatever its size, as for the starts.
# They arrive as arrays, unnested into rows joined on id.
# An executemany is one statement per row on the server (parse-bind-execute each), and an
# expanding IN list is a new statement text for every group size.
_outcomes = (
    sa.func.unnest(
        sa.bindparam("_ids", type_=ARRAY(sa.BigInteger)),
        sa.bindparam("_statuses", type_=ARRAY(sa.String)),
        sa.bindparam("_replies", type_=ARRAY(sa.String)),
        sa.bindparam("_sent", type_=ARRAY(sa.DateTime(timezone=True))),
        sa.bindparam("_next", type_=ARRAY(sa.DateTime(timezone=True))),
    )
    .table_valued("id", "status", "reply", "sent_at", "next_at", name="outcome")
    .render_derived()
)
_RECORD_ARRAYS = (
    deliveries.update()
    .where(deliveries.c.id == _outcomes.c.id)
    .values(
        status=_outcomes.c.status,
        last_reply=_outcomes.c.reply,
        sent_at=_outcomes.c.sent_at,
        next_attempt_at=_outcomes.c.next_at,
        lease_owner=None,
        lease_expires_at=None,
        updated_at=sa.bindparam("_now"),
    )
)


def commit_progress(
    engine: sa.Engine,
    *,
    results: Sequence[Result],
    starts: Sequence[int],
    owner: str,
    settings: SmtpSettings,
    now: datetime,
    lease: timedelta,
    on_bounce: BounceHook,
    rng: random.Random | None = None,
    renew: Sequence[int] = (),
) -> tuple[dict[str, int], set[int]]:
    """One group commit: record outcomes, mark the next messages in flight, and (``renew``)
    extend the lease of the other rows this worker holds.

    ``on_bounce`` is called for each delivery that bounced, inside the same transaction: what
    a bounce does to its subscriber commits, or fails, with the delivery's status.

    Returns the counts by new status and the ids actually started: a start is refused when
    this worker no longer holds the row's lease (another worker took it over).
    """
    rng = rng or random.Random()
    rows = [_outcome_row(r, settings, now, rng) for r in results]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["_status"]] = counts.get(row["_status"], 0) + 1
    started: set[int] = set()
    with writing(engine) as conn:
        arrays = conn.dialect.name == "postgresql"
        if rows and arrays:
            conn.execute(
                _RECORD_ARRAYS,
                {
                    "_ids": [row["_id"] for row in rows],
                    "_statuses": [row["_status"] for row in rows],
                    "_replies": [row["_reply"] for row in rows],
                    "_sent": [row["_sent_at"] for row in rows],
                    "_next": [row["_next"] for row in rows],
                    "_now": now,
                },
            )
        elif rows:
            for row in rows:
                row["_now"] = now
            conn.execute(_RECORD, rows)
        for result, row in zip(results, rows, strict=True):
            if row["_status"] == "bounced" and result.outcome is not None:
                on_bounce(conn, result.delivery, result.outcome, now)
        if starts:
            started = set(
                conn.scalars(
                    _START[arrays],
                    {"_ids": list(starts), "_owner": owner, "_expires": now + lease, "_now": now},
                )
            )
        if renew:
            _renew(conn, renew, owner=owner, expires=now + lease, now=now)
    return counts, started


# The heartbeat's one statement, by ``arrays`` as _CLAIM. Keyed by id (the worker knows what it
# holds) rather than by owner: lease_owner has no index, and a renewal every few seconds must
# not read the whole table. ``updated_at`` is the owner's latest sign of life
# (mailer.delivery.owners).
_RENEW = {
    arrays: deliveries.update()
    .where(
        _one_of(deliveries.c.id, "_ids", arrays=arrays),
        deliveries.c.lease_owner == sa.bindparam("_owner"),
    )
    .values(lease_expires_at=sa.bindparam("_expires"), updated_at=sa.bindparam("_now"))
    for arrays in (False, True)
}


def _renew(
    conn: sa.Connection, ids: Sequence[int], *, owner: str, expires: datetime, now: datetime
) -> int:
    arrays = conn.dialect.name == "postgresql"
    params = {"_ids": list(ids), "_owner": owner, "_expires": expires, "_now": now}
    return conn.execute(_RENEW[arrays], params).rowcount


def renew(
    engine: sa.Engine, ids: Sequence[int], *, owner: str, lease: timedelta, now: datetime
) -> int:
    """Extend to ``now + lease`` the leases ``owner`` still holds among ``ids`` (one UPDATE);
    returns how many it still held. Rows taken over by another worker are left alone."""
    if not ids:
        return 0
    with writing(engine) as conn:
        return _renew(conn, ids, owner=owner, expires=now + lease, now=now)


@dataclass(frozen=True)
class Holding:
    """Due deliveries held under a live lease by another worker."""

    owner: str
    count: int
    expires: datetime  # the earliest of their leases to end
    seen: datetime  # the owner's latest write to them: when it was last known alive

    def describe(self, now: datetime) -> str:
        ago = max(0.0, (now - self.seen).total_seconds())
        return (
            f"{self.count} deliveries held by {self.owner} (lease renewed {ago:.0f} s ago,"
            f" ends in {max(0.0, (self.expires - now).total_seconds()):.0f} s unless renewed)"
        )


def held_elsewhere(
    engine: sa.Engine, *, owner: str, now: datetime, issue_id: int | None = None
) -> list[Holding]:
    """Who else holds live leases on due or in-flight deliveries (of one issue, or of any),
    biggest holder first."""
    query = (
        sa.select(
            deliveries.c.lease_owner,
            sa.func.count(),
            sa.func.min(deliveries.c.lease_expires_at),
            sa.func.max(deliveries.c.updated_at),
        )
        .where(
            sa.or_(WAITING_ROW, SENDING_ROW),
            deliveries.c.lease_expires_at >= now,
            deliveries.c.lease_owner != owner,
        )
        .group_by(deliveries.c.lease_owner)
    )
    if issue_id is not None:
        query = query.where(deliveries.c.issue_id == issue_id)
    with reading(engine) as conn:
        rows = conn.execute(query).all()
    holdings = [Holding(str(o), int(n), expires, seen) for o, n, expires, seen in rows]
    return sorted(holdings, key=lambda h: (-h.count, h.owner))


def end_leases(engine: sa.Engine, owners: Sequence[str], *, now: datetime) -> int:
    """End now the leases of ``owners`` (processes known to be dead); returns how many rows.

    Their rows become due as if the lease had run out: waiting rows return to the queue, rows
    left ``sending`` are in doubt and go the ``[smtp].in_doubt`` way (the owner stays named).
    """
    if not owners:
        return 0
    with writing(engine) as conn:
        return conn.execute(
            deliveries.update()
            .where(
                deliveries.c.lease_owner.in_(list(owners)),
                deliveries.c.lease_expires_at >= now,
            )
            .values(lease_expires_at=now - timedelta(microseconds=1))
        ).rowcount


def release(engine: sa.Engine, ids: Sequence[int], *, owner: str, now: datetime) -> None:
    """Give back claimed rows that were never started (a stop before the batch ended)."""
    if not ids:
        return
    with writing(engine) as conn:
        conn.execute(
            deliveries.update()
            .where(
                deliveries.c.id.in_(ids),
                deliveries.c.lease_owner == owner,
                deliveries.c.status.in_(WAITING),
            )
            .values(lease_owner=None, lease_expires_at=None, updated_at=now)
        )
