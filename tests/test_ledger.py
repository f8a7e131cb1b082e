"""The ledger's group commit and what a bounce does in it: one transaction, on both databases."""

from __future__ import annotations

from datetime import datetime, timedelta

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
