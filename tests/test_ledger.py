"""The ledger's group commit and what a bounce does in it: one transaction, on both databases."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from mailer.db.schema import deliveries, subscribers
from mailer.delivery import claims, ledger
from mailer.delivery.policy import Outcome, SendResult, Stage
from mailer.delivery.worker import apply_bounce
from tests.factories import NOW, make_settings
from tests.test_leases import new_issue

LEASE = timedelta(minutes=5)
REFUSED = SendResult(Outcome.BOUNCED, 550, "5.1.1 No such user", Stage.RCPT)


class HookFailed(Exception):
    pass


def in_flight(engine: sa.Engine, email: str) -> claims.Claimed:
    """A claimed delivery to ``email``, marked in flight as a lane would before sending it."""
    settings = make_settings(str(engine.url))
    issue_id = new_issue(engine, settings, [email])
    (claimed,) = claims.claim(engine, owner="w", limit=10, lease=LEASE, now=NOW, issue_id=issue_id)
    ledger.commit_progress(
        engine,
        results=[],
        starts=[claimed.id],
        owner="w",
        settings=settings.smtp,
        now=NOW,
        lease=LEASE,
        on_bounce=apply_bounce,
    )
    return claimed


def record(engine: sa.Engine, claimed: claims.Claimed, hook: ledger.BounceHook) -> None:
    ledger.commit_progress(
        engine,
        results=[ledger.Result(claimed, REFUSED)],
        starts=[],
        owner="w",
        settings=make_settings(str(engine.url)).smtp,
        now=NOW,
        lease=LEASE,
        on_bounce=hook,
    )


def state(engine: sa.Engine, claimed: claims.Claimed) -> tuple[str, str]:
    with engine.connect() as conn:
        delivery = conn.scalar(sa.select(deliveries.c.status).where(deliveries.c.id == claimed.id))
        subscriber = conn.scalar(
            sa.select(subscribers.c.status).where(subscribers.c.id == claimed.subscriber_id)
        )
    return str(delivery), str(subscriber)


def test_a_hard_bounce_marks_the_subscriber_in_the_commit_that_records_it(
    engine: sa.Engine,
) -> None:
    claimed = in_flight(engine, "gone@example.org")
    seen: list[tuple[int, SendResult, datetime]] = []

    def hook(conn: sa.Connection, d: claims.Claimed, result: SendResult, now: datetime) -> None:
        seen.append((d.id, result, now))
        apply_bounce(conn, d, result, now)

    record(engine, claimed, hook)
    assert seen == [(claimed.id, REFUSED, NOW)]
    assert state(engine, claimed) == ("bounced", "bounced")


def test_a_failing_bounce_hook_leaves_the_delivery_unrecorded(engine: sa.Engine) -> None:
    claimed = in_flight(engine, "gone@example.org")

    def hook(conn: sa.Connection, d: claims.Claimed, result: SendResult, now: datetime) -> None:
        apply_bounce(conn, d, result, now)
        raise HookFailed

    with pytest.raises(HookFailed):
        record(engine, claimed, hook)
    assert state(engine, claimed) == ("sending", "active")


SENT = SendResult(Outcome.SENT, 250, "2.0.0 Ok: queued as 4F2C9", Stage.DATA)


def rows_now(engine: sa.Engine) -> dict[int, tuple[str, int, str | None]]:
    with engine.connect() as conn:
        found = conn.execute(
            sa.select(deliveries.c.id, deliveries.c.status, deliveries.c.attempts)
            .add_columns(deliveries.c.lease_owner)
            .order_by(deliveries.c.id)
        ).all()
    return {i: (status, attempts, owner) for i, status, attempts, owner in found}


def commit(
    engine: sa.Engine, results: list[ledger.Result], starts: list[int]
) -> tuple[dict[str, int], set[int]]:
    return ledger.commit_progress(
        engine,
        results=results,
        starts=starts,
        owner="w",
        settings=make_settings(str(engine.url)).smtp,
        now=NOW,
        lease=LEASE,
        on_bounce=apply_bounce,
    )


def test_one_group_commit_records_outcomes_and_starts_only_rows_still_held(
    engine: sa.Engine,
) -> None:
    settings = make_settings(str(engine.url))
    issue_id = new_issue(engine, settings, [f"r{n}@example.org" for n in range(4)])
    a, b, c, d = claims.claim(engine, owner="w", limit=10, lease=LEASE, now=NOW, issue_id=issue_id)
    assert commit(engine, [], [a.id, b.id]) == ({}, {a.id, b.id})
    # Another worker took d over (its lease ran out and it claimed it).
    with engine.begin() as conn:
        conn.execute(deliveries.update().where(deliveries.c.id == d.id).values(lease_owner="x"))

    counts, started = commit(engine, [ledger.Result(a, SENT), ledger.Result(b, None)], [c.id, d.id])

    assert counts == {"sent": 1, "cancelled": 1}
    assert started == {c.id}
    assert rows_now(engine) == {
        a.id: ("sent", 1, None),
        b.id: ("cancelled", 1, None),
        c.id: ("sending", 1, "w"),
        d.id: ("queued", 0, "x"),
    }


def test_a_group_commit_that_fails_writes_neither_its_outcomes_nor_its_starts(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(str(engine.url))
    issue_id = new_issue(engine, settings, ["a@example.org", "b@example.org"])
    a, b = claims.claim(engine, owner="w", limit=10, lease=LEASE, now=NOW, issue_id=issue_id)
    commit(engine, [], [a.id])
    before = rows_now(engine)
    real = ledger._outcome_row

    def refused_by_the_database(*args: object, **kwargs: object) -> dict[str, object]:
        return real(*args, **kwargs) | {"_status": "no such status"}  # type: ignore[arg-type]

    # The outcome breaks the status check: the start of b in the same commit must not stay.
    monkeypatch.setattr(ledger, "_outcome_row", refused_by_the_database)
    with pytest.raises(sa.exc.IntegrityError):
        commit(engine, [ledger.Result(a, SENT)], [b.id])
    assert rows_now(engine) == before


def test_on_postgresql_outcomes_and_starts_go_as_one_statement(engine: sa.Engine) -> None:
    settings = make_settings(str(engine.url))
    issue_id = new_issue(engine, settings, ["a@example.org", "b@example.org"])
    a, b = claims.claim(engine, owner="w", limit=10, lease=LEASE, now=NOW, issue_id=issue_id)
    commit(engine, [], [a.id])
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    sa.event.listen(engine, "before_cursor_execute", seen)
    try:
        assert commit(engine, [ledger.Result(a, SENT)], [b.id]) == ({"sent": 1}, {b.id})
    finally:
        sa.event.remove(engine, "before_cursor_execute", seen)
    if engine.dialect.name == "postgresql":
        (statement,) = statements  # the outcomes a CTE of the starts' UPDATE
        assert statement.startswith("WITH") and statement.count("UPDATE deliveries") == 2
    else:  # SQLite: its BEGIN IMMEDIATE, the outcomes, then the starts
        assert [s.split()[0] for s in statements] == ["BEGIN", "UPDATE", "UPDATE"]


def test_a_claim_takes_rows_in_doubt_and_waiting_rows_in_one_claim_order(
    engine: sa.Engine,
) -> None:
    settings = make_settings(str(engine.url))
    issue_id = new_issue(engine, settings, [f"r{n}@example.org" for n in range(5)])
    with engine.connect() as conn:
        ids = list(conn.scalars(sa.select(deliveries.c.id).order_by(deliveries.c.id)))
    # Rows 1 and 3 are in doubt: started by a worker whose lease has ended. Their due times
    # put them between the waiting rows, so a claim must merge the two kinds.
    with engine.begin() as conn:
        for position, id_ in enumerate(ids):
            conn.execute(
                deliveries.update()
                .where(deliveries.c.id == id_)
                .values(next_attempt_at=NOW - timedelta(minutes=10 - position))
            )
        conn.execute(
            deliveries.update()
            .where(deliveries.c.id.in_([ids[1], ids[3]]))
            .values(status="sending", lease_owner="dead", lease_expires_at=NOW - LEASE)
        )
    claimed = claims.claim(engine, owner="w", limit=4, lease=LEASE, now=NOW, issue_id=issue_id)
    assert [c.id for c in claimed] == ids[:4]
    # With nothing in doubt, one kind of row: the batch in its index's order.
    rest = claims.claim(engine, owner="v", limit=4, lease=LEASE, now=NOW, issue_id=issue_id)
    assert [c.id for c in rest] == ids[4:]
