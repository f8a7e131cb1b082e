"""The delivery ledger: in-flight marks, outcomes and leases, written in group commits.

A delivery's life: ``queued`` → claimed (a lease: ``lease_owner`` and ``lease_expires_at``
set, status unchanged; mailer.delivery.claims) → ``sending`` (in flight: its bytes may be on
the wire) → ``sent`` | ``deferred`` (queued again later) | ``bounced`` | ``failed`` |
``cancelled``.

Crash bound. A worker marks a delivery ``sending`` in the same transaction that records the
outcome of the previous message on that SMTP connection, and sends the message's content only
after that commit (its envelope may go out meanwhile: a transaction that ends before the
content, or with the connection dropped in DATA, delivers nothing). So at any instant a worker
has at most one ``sending`` row per open connection, and those are the only rows whose fate a
crash can leave unknown. Claimed rows not yet started keep their old status and simply return to
the queue when the lease expires. In-doubt rows are re-sent with the same Message-ID, or held as
``unknown``, by ``[smtp].in_doubt``.

Outcomes are written for many connections in one transaction: a transaction per message was
measured at about 200 messages per second. The leases live here too: a renewal rides on a
group commit when one falls due, and the rest (who holds what, ending a dead owner's leases,
handing rows back) are the same few columns of the same rows.
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
from mailer.db.schema import SENDING_ROW, WAITING_ROW, deliveries
from mailer.delivery.claims import Claimed, one_of
from mailer.delivery.policy import SendResult, settle

WAITING = ("queued", "deferred")


@dataclass(frozen=True)
class Result:
    """What became of one claimed delivery, for ``commit_progress`` to record."""

    delivery: Claimed
    outcome: SendResult | None  # None: nothing to send (no article in the subscriber's topics)
    error: str | None = None  # the message could not be built for this recipient: failed


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


# By ``arrays``, as a claim's statements (claims._CLAIM): on PostgreSQL the ids to start go as
# one array.
_START = {
    arrays: _start(one_of(deliveries.c.id, "_ids", arrays=arrays)) for arrays in (False, True)
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


# PostgreSQL, a group commit with nothing to write but outcomes and starts (no bounce, no
# renewal due): one statement, the outcomes a data-modifying CTE of the starts' UPDATE, sent
# outside a transaction block so that it is its own transaction (both or neither, as before).
# A group commit in a transaction block is five round trips (the pool's ping, BEGIN, outcomes,
# starts, COMMIT), and at the groups a send makes (8 or so) those round trips, not the rows,
# were most of the server's CPU per commit (bench/README.md). The two UPDATEs never touch the
# same row: an outcome is of a row started in an earlier commit, a start of a row not yet
# started.
_START_AFTER_RECORD = _start(one_of(deliveries.c.id, "_starts", arrays=True)).add_cte(
    _RECORD_ARRAYS.returning(deliveries.c.id).cte("recorded")
)


def _outcome_arrays(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``_RECORD_ARRAYS``' parameters: the outcome rows as one array per column."""
    return {
        "_ids": [row["_id"] for row in rows],
        "_statuses": [row["_status"] for row in rows],
        "_replies": [row["_reply"] for row in rows],
        "_sent": [row["_sent_at"] for row in rows],
        "_next": [row["_next"] for row in rows],
    }


def _commit_in_one_statement(
    engine: sa.Engine,
    rows: Sequence[dict[str, Any]],
    starts: Sequence[int],
    *,
    owner: str,
    expires: datetime,
    now: datetime,
) -> set[int]:
    """Record ``rows`` and start ``starts`` in one statement of its own (PostgreSQL); returns
    the ids started."""
    params: dict[str, Any] = {"_now": now}
    if rows:
        params |= _outcome_arrays(rows)
    if starts:
        # Without outcomes the starts' ids take the name _START's own statement binds.
        ids = "_starts" if rows else "_ids"
        params |= {ids: list(starts), "_owner": owner, "_expires": expires}
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        if not starts:
            conn.execute(_RECORD_ARRAYS, params)
            return set()
        statement = _START_AFTER_RECORD if rows else _START[True]
        return set(conn.scalars(statement, params))


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
    if (
        engine.dialect.name == "postgresql"
        and not renew
        and (rows or starts)
        and "bounced" not in counts
    ):
        started = _commit_in_one_statement(
            engine, rows, starts, owner=owner, expires=now + lease, now=now
        )
        return counts, started
    with writing(engine) as conn:
        arrays = conn.dialect.name == "postgresql"
        if rows and arrays:
            conn.execute(_RECORD_ARRAYS, _outcome_arrays(rows) | {"_now": now})
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


# The heartbeat's one statement, by ``arrays`` as claims._CLAIM. Keyed by id (the worker knows
# what it holds) rather than by owner: lease_owner has no index, and a renewal every few seconds
# must not read the whole table. ``updated_at`` is the owner's latest sign of life
# (mailer.delivery.owners).
_RENEW = {
    arrays: deliveries.update()
    .where(
        one_of(deliveries.c.id, "_ids", arrays=arrays),
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
