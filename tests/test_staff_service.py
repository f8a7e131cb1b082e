"""Issue 14 end to end in the service: the staff round opens a review window, mails staff,
releases the slot as staff decided, and mails the report when the issue ends (real SMTP)."""

from __future__ import annotations

from datetime import timedelta
from email import message_from_bytes, policy
from typing import Any

import sqlalchemy as sa

from mailer.content.store import upsert_articles
from mailer.db.schema import issues
from mailer.issues import review_actions
from mailer.service import Parts, Service
from tests.factories import (
    NOW,
    Clock,
    config_dict,
    make_article,
    make_subscriber,
    server_settings,
)
from tests.smtp_server import FaultServer

pytest_plugins = ["tests.smtp_server"]

EDITOR = "editor@news.example.org"
ONCALL = "oncall@news.example.org"
READERS = ("ana@example.org", "ben@example.org", "cy@example.org")


def _settings(db_url: str, server: FaultServer, **weekly: Any) -> Any:
    digest = {**config_dict()["digests"][0], "review_minutes": 60, **weekly}
    return server_settings(
        db_url,
        server,
        staff={"emails": [EDITOR], "alert_emails": [ONCALL]},
        digests=[digest],
    )


def _subjects(server: FaultServer, address: str) -> list[str]:
    return [
        str(message_from_bytes(r.data, policy=policy.default)["Subject"]).strip()
        for r in server.received_for(address)
    ]


def _status(engine: sa.Engine) -> str:
    with engine.connect() as conn:
        return str(conn.execute(sa.select(issues.c.status)).scalar_one())


def _prepare(engine: sa.Engine) -> None:
    for email in READERS:
        make_subscriber(engine, email=email)
    upsert_articles(engine, [make_article(), make_article()], now=NOW - timedelta(hours=2))


async def test_a_review_cycle_in_the_service_approved_then_sent_then_reported(
    engine: sa.Engine, db_url: str, smtp_server: FaultServer
) -> None:
    settings = _settings(db_url, smtp_server)
    _prepare(engine)
    clock = Clock(NOW - timedelta(minutes=59))  # the slot is NOW; its window opened a minute ago
    service = Service(engine, settings, parts=Parts(web=False), clock=clock)

    await service.staff.run(clock())
    assert _status(engine) == "review"
    [subject] = _subjects(smtp_server, EDITOR)
    assert subject.startswith("[Review] Weekly digest for Fri 20 Nov 2026 07:00 EST")
    assert all(not smtp_server.received_for(r) for r in READERS)  # nothing to readers yet

    with engine.connect() as conn:
        issue_id = int(conn.execute(sa.select(issues.c.id)).scalar_one())
    review_actions.approve(engine, settings, issue_id, by="ana", now=clock())
    await service.staff.run(clock())
    assert _status(engine) == "approved"  # waits for its slot

    clock.value = NOW + timedelta(seconds=1)
    await service.staff.run(clock())  # the slot came: released, deliveries made
    totals = await service.deliver_forever(drain=True)
    assert totals.counts.get("sent") == len(READERS)
    assert _status(engine) == "sent"

    await service.staff.run(clock())  # the issue ended: its report goes to staff
    subjects = _subjects(smtp_server, EDITOR)
    assert (
        subjects[1]
        == "[Report] Weekly digest, Fri 20 Nov 2026 07:00 EST: 3 sent, 0 bounced, 0 failed"
    )
    await service.staff.run(clock() + timedelta(minutes=1))
    assert len(_subjects(smtp_server, EDITOR)) == 2  # reported once


async def test_an_unreviewed_issue_under_hold_waits_and_alerts_until_approved(
    engine: sa.Engine, db_url: str, smtp_server: FaultServer
) -> None:
    settings = _settings(db_url, smtp_server, on_unreviewed="hold")
    _prepare(engine)
    clock = Clock(NOW - timedelta(minutes=30))
    service = Service(engine, settings, parts=Parts(web=False), clock=clock)
    await service.staff.run(clock())

    clock.value = NOW + timedelta(seconds=1)
    await service.staff.run(clock())
    assert _status(engine) == "held"
    [alert] = _subjects(smtp_server, ONCALL)
    assert "is held" in alert
    totals = await service.deliver_forever(drain=True)
    assert not totals.counts and all(not smtp_server.received_for(r) for r in READERS)

    with engine.connect() as conn:
        issue_id = int(conn.execute(sa.select(issues.c.id)).scalar_one())
    review_actions.approve(
        engine, settings, issue_id, by="ana", now=clock()
    )  # the slot passed: now
    totals = await service.deliver_forever(drain=True)
    assert totals.counts.get("sent") == len(READERS)
