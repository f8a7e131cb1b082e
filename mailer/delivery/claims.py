"""Claiming due deliveries: choosing a batch, leasing it to one worker, reading what its
messages need.

Claims take a batch at once (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; the ``BEGIN
IMMEDIATE`` write lock on SQLite), so concurrent workers never share a row. Apart from the
ledger (mailer.delivery.ledger), which writes what became of claimed rows: a claim is mostly
reads (the due rows off their partial indexes, the subscriber and topics, the articles another
issue already brought), each query tuned on its own (bench/README.md). Here too: holding rows
in doubt before a claim (``[smtp].in_doubt = "hold"``), and handing claimed rows back for
quiet hours.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY

from mailer.db.engine import reading, writing
from mailer.db.schema import (
    SENDING_ROW,
    WAITING_ROW,
    articles,
    deliveries,
    issue_articles,
    issues,
    subscriber_digests,
    subscriber_topics,
    subscribers,
)


def one_of(column: sa.ColumnElement[Any], name: str, *, arrays: bool) -> sa.ColumnElement[bool]:
    """``column`` is one of the ids bound as ``name``: one array parameter on PostgreSQL
    (``arrays``), an expanding IN list on SQLite.

    As an IN list, a claim's 500 ids were 500 parameters: psycopg caches its conversion of a
    statement's placeholders only up to 50 parameters, so it parsed the 500 again on every
    execution (8 % of the samples of a PostgreSQL send), and the server planned a statement
    with 500 parameters. As an array the statement text is the same for any number of ids, so
    psycopg prepares it once. The ledger's starts and renewals bind their ids the same way.
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
        # Someone who unsubscribed, dropped the digest or paused it after the snapshot gets
        # nothing more.
        live = [r for r in rows if _receiving(r, now)]
        topics: dict[int, list[str]] = {r.subscriber_id: [] for r in live}
        if topics:
            for sid, topic in conn.execute(statements.topics, {"ids": list(topics)}):
                topics[sid].append(topic)
        seen = _seen(conn, live, statements.arrays)
    if len(live) < len(rows):
        gone = [r.id for r in rows if not _receiving(r, now)]
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
            _chosen,
            _paused_until,
            digest,
            _kind,
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
    found: list[Sequence[Any]] = []
    for due in branches:
        query = sa.select(deliveries.c.id, deliveries.c.priority, deliveries.c.next_attempt_at)
        query = query.where(due, free)
        if issue_id is not None:
            query = query.where(deliveries.c.issue_id == issue_id)
        query = query.order_by(*order).limit(limit).with_for_update(skip_locked=True)
        if rows := conn.execute(query).all():
            found.append(rows)
    if len(found) == 1:  # the usual case, nothing in doubt: already in claim order
        return [r.id for r in found[0]]
    candidates = [r for rows in found for r in rows]
    candidates.sort(key=lambda r: (-r.priority, r.next_attempt_at, r.id))
    return [r.id for r in candidates[:limit]]


@dataclass(frozen=True)
class _ClaimStatements:
    """A claim's statements for one kind of id list (``one_of``), built once: building them
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
            .where(one_of(deliveries.c.id, "ids", arrays=arrays))
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
                subscriber_digests.c.digest.is_not(None).label("chosen"),
                subscriber_digests.c.paused_until,
                issues.c.digest,
                issues.c.kind,
            )
            .join(subscribers, subscribers.c.id == deliveries.c.subscriber_id)
            .join(issues, issues.c.id == deliveries.c.issue_id)
            .outerjoin(
                subscriber_digests,
                sa.and_(
                    subscriber_digests.c.subscriber_id == deliveries.c.subscriber_id,
                    subscriber_digests.c.digest == issues.c.digest,
                ),
            )
            .where(one_of(deliveries.c.id, "ids", arrays=arrays))
            .order_by(deliveries.c.id)
        )
        topics = (
            sa.select(subscriber_topics.c.subscriber_id, subscriber_topics.c.topic)
            .where(one_of(subscriber_topics.c.subscriber_id, "ids", arrays=arrays))
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
    # An article dropped from an issue in review never went out with it (``dropped_at``).
    kept = issue_articles.c.dropped_at.is_(None)
    shared = sa.select(issue_articles.c.article_id).where(
        issue_articles.c.issue_id.in_(batch_issues), kept
    )
    earlier = conn.scalars(
        sa.select(issue_articles.c.issue_id)
        .where(issue_articles.c.article_id.in_(shared), kept)
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
            one_of(previous.c.subscriber_id, "ids", arrays=arrays),
            previous.c.status == "sent",
            issue_articles.c.article_id.in_(shared),
            kept,
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


def _receiving(row: Any, now: datetime) -> bool:
    """Whether the reader of a claimed row still gets it: active, and for a digest issue
    still choosing that digest and not pausing it. A correction (``issues.kind``) goes to
    every reader still active who received the article: it belongs to no digest they could
    have dropped, and a pause is of new issues, not of corrections to what they were sent."""
    if row.status != "active":
        return False
    if row.kind == "correction":
        return True
    return bool(row.chosen) and (row.paused_until is None or row.paused_until <= now)
