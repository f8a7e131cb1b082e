"""Eight hundred messages through a relay that misbehaves in every scripted way.

Every subscriber must end sent, bounced or failed exactly as scripted: none lost, none twice.
The table below is the fault matrix quoted in the robustness note.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import pytest
import sqlalchemy as sa

from mailer.compose.rendering import Renderer
from mailer.content.article import ParsedArticle
from mailer.content.store import upsert_articles
from mailer.db.schema import deliveries, subscribers
from mailer.delivery.pool import SmtpPool
from mailer.delivery.worker import Deliverer
from mailer.issues.create import create_issue
from mailer.issues.progress import summarize
from tests.factories import NOW, make_settings
from tests.smtp_server import DROP, Delay, FaultServer, smtp_server  # noqa: F401

pytestmark = pytest.mark.slow

N = 800  # every fault of 1 % share still comes 8 times, each over recycled connections
# fault → (script, stage, expected delivery status, copies received)
MATRIX: dict[str, tuple[list[object], str, str, int]] = {
    "none": ([], "rcpt", "sent", 1),
    "451-once": (["451 4.3.0 try again"], "rcpt", "sent", 1),
    "452-once-at-data": (["452 4.3.1 insufficient storage"], "data", "sent", 1),
    "421-at-rcpt": (["421 4.7.0 closing, too many connections"], "rcpt", "sent", 1),
    "drop-at-data-once": ([DROP], "data", "sent", 1),
    "slow-reply": ([Delay(0.3)], "data", "sent", 1),
    "550-user-unknown": (["550 5.1.1 no such user"], "rcpt", "bounced", 0),
    "552-too-big": (["552 5.3.4 message too big"], "data", "bounced", 0),
    "451-forever": (["451 4.3.0 try again"] * 20, "rcpt", "failed", 0),
}
SHARE = {
    "none": 0,
    "451-once": 10,
    "452-once-at-data": 4,
    "421-at-rcpt": 1,
    "drop-at-data-once": 3,
    "slow-reply": 1,
    "550-user-unknown": 5,
    "552-too-big": 1,
    "451-forever": 2,
}  # per 100


def fault_of(n: int) -> str:
    slot = n % 100
    for name, share in SHARE.items():
        if slot < share:
            return name
        slot -= share
    return "none"


def test_every_subscriber_ends_exactly_as_scripted(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    settings = make_settings(
        db_url,
        smtp={
            "host": "127.0.0.1",
            "port": smtp_server.port,
            "connections": 4,
            "timeout": 5,
            "retry_base_seconds": 60,
            "retry_max_age_hours": 6,
            "batch_size": 400,
        },
    )
    smtp_server.close_after(150)  # the relay also recycles connections
    expected: dict[str, str] = {}
    rows = []
    for n in range(N):
        email = f"r{n}@example.org"
        fault = fault_of(n)
        script, stage, _, _ = MATRIX[fault]
        if script:
            smtp_server.script(email, script, stage=stage)  # type: ignore[arg-type]
        expected[email] = fault
        rows.append(email)
    with engine.begin() as conn:
        conn.execute(
            subscribers.insert(),
            [
                {
                    "uid": f"{n:022d}",
                    "email": e,
                    "name": "",
                    "status": "active",
                    "created_at": NOW,
                    "updated_at": NOW,
                }
                for n, e in enumerate(rows)
            ],
        )
        ids = dict(conn.execute(sa.select(subscribers.c.email, subscribers.c.id)).all())
        conn.execute(
            sa.text(
                "INSERT INTO subscriber_topics (subscriber_id, topic) VALUES (:s, 'base-alerts')"
            ),
            [{"s": ids[e]} for e in rows],
        )
        conn.execute(
            sa.text(
                "INSERT INTO subscriber_digests (subscriber_id, digest, chosen_at)"
                " VALUES (:s, :d, :at)"
            ),
            [
                {"s": ids[e], "d": d.key, "at": "2026-11-20 12:00:00"}
                for e in rows
                for d in settings.digests
            ],
        )
    upsert_articles(
        engine,
        [
            ParsedArticle(
                guid="urn:test:1",
                topic="base-alerts",
                title="Gate closed",
                summary="S.",
                why_it_matters="W.",
                body="B.",
                link="https://news.example.org/a",
                published_at=NOW - timedelta(hours=1),
            )
        ],
        now=NOW,
    )
    issue = create_issue(
        engine,
        settings,
        settings.digests[0],
        scheduled_for=NOW,
        now=NOW,
        render_subject=Renderer().render_subject,
    )
    assert issue.recipients == N

    import asyncio

    async def run_until_done() -> None:
        clock_value = [NOW]
        async with SmtpPool(settings.smtp) as pool:
            deliverer = Deliverer(engine, settings, pool, clock=lambda: clock_value[0])
            for _ in range(40):
                await deliverer.drain(issue_id=issue.issue_id)
                if summarize(engine, issue.issue_id).status == "sent":
                    return
                clock_value[0] += timedelta(hours=1)
        raise AssertionError("the issue never finished")

    asyncio.run(run_until_done())

    with engine.connect() as conn:
        final = dict(
            conn.execute(
                sa.select(subscribers.c.email, deliveries.c.status).join(
                    deliveries, deliveries.c.subscriber_id == subscribers.c.id
                )
            ).all()
        )
    copies = Counter(r.recipients[0] for r in smtp_server.received)
    mismatches = [
        (email, fault, final[email], copies[email])
        for email, fault in expected.items()
        if (final[email], copies[email]) != (MATRIX[fault][2], MATRIX[fault][3])
    ]
    assert mismatches == []
    assert sum(copies.values()) == sum(MATRIX[f][3] for f in expected.values())
