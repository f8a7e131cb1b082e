"""The whole path on both databases: issue, snapshot, render, send to a real SMTP server, ledger."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest
import sqlalchemy as sa

from mailer.compose.rendering import Renderer
from mailer.config.settings import Settings
from mailer.content.article import ParsedArticle
from mailer.content.store import upsert_articles
from mailer.db.schema import deliveries
from mailer.db.schema import subscribers as subscriber_table
from mailer.delivery.pool import SmtpPool
from mailer.delivery.worker import Deliverer
from mailer.issues.create import create_issue
from mailer.issues.progress import summarize
from mailer.issues.staff import open_issue
from mailer.subscribers import store
from tests.factories import NOW, Clock, make_issue, make_settings, make_subscriber, server_settings
from tests.smtp_server import DROP, FaultServer, smtp_server  # noqa: F401

pytestmark = pytest.mark.slow


def add_article(engine: sa.Engine, topic: str, title: str, hours_ago: float) -> None:
    item = ParsedArticle(
        guid=f"urn:test:{title}",
        topic=topic,
        title=title,
        summary=f"Summary of {title}.",
        why_it_matters=f"Why {title} matters.",
        body="Body.",
        link=f"https://news.example.org/{topic}",
        published_at=NOW - timedelta(hours=hours_ago),
    )
    upsert_articles(engine, [item], now=NOW)


@pytest.fixture
def settings(db_url: str, smtp_server: FaultServer) -> Settings:  # noqa: F811
    return server_settings(db_url, smtp_server, smtp={"connections": 2, "timeout": 2})


@pytest.fixture
def content(engine: sa.Engine) -> Iterator[None]:
    add_article(engine, "base-alerts", "Gate closed", 3)
    add_article(engine, "local-events", "Market on the Riverwalk", 2)
    add_article(engine, "military-news", "Units return", 1)
    yield


def parsed(data: bytes) -> EmailMessage:
    message = message_from_bytes(data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def text_of(message: EmailMessage) -> str:
    part = message.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


async def deliver(
    engine: sa.Engine, settings: Settings, clock: Clock, issue_id: int
) -> dict[str, int]:
    async with SmtpPool(settings.smtp) as pool:
        totals = await Deliverer(engine, settings, pool, clock=clock).drain(issue_id=issue_id)
    return totals.counts


def statuses(engine: sa.Engine, issue_id: int) -> dict[str, str]:
    query = (
        sa.select(subscriber_table.c.email, deliveries.c.status)
        .join(subscriber_table)
        .where(deliveries.c.issue_id == issue_id)
    )
    with engine.connect() as conn:
        return {email: status for email, status in conn.execute(query)}


@pytest.mark.usefixtures("content")
async def test_each_active_subscriber_gets_one_message_with_their_topics(
    engine: sa.Engine,
    settings: Settings,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    make_subscriber(engine, email="all@example.org")
    make_subscriber(engine, email="events@example.org", topics=["local-events"])
    make_subscriber(engine, email="pending@example.org", status="pending")
    make_subscriber(engine, email="left@example.org", status="unsubscribed")
    issue = make_issue(engine, settings)
    assert (issue.created, issue.articles, issue.recipients) == (True, 3, 2)

    counts = await deliver(engine, settings, Clock(NOW), issue.issue_id)

    assert counts == {"sent": 2}
    assert sorted(r.recipients[0] for r in smtp_server.received) == [
        "all@example.org",
        "events@example.org",
    ]
    events_mail = parsed(smtp_server.received_for("events@example.org")[0].data)
    assert "Market on the Riverwalk" in text_of(events_mail)
    assert "Gate closed" not in text_of(events_mail)
    all_mail = parsed(smtp_server.received_for("all@example.org")[0].data)
    assert all(
        t in text_of(all_mail) for t in ("Gate closed", "Market on the Riverwalk", "Units return")
    )
    assert summarize(engine, issue.issue_id).status == "sent"


@pytest.mark.usefixtures("content")
async def test_the_same_slot_makes_one_issue(engine: sa.Engine, settings: Settings) -> None:
    make_subscriber(engine)
    digest = settings.digests[0]
    first = create_issue(
        engine,
        settings,
        digest,
        scheduled_for=NOW,
        now=NOW,
        render_subject=Renderer().render_subject,
    )
    second = create_issue(
        engine,
        settings,
        digest,
        scheduled_for=NOW,
        now=NOW,
        render_subject=Renderer().render_subject,
    )
    assert first.created and not second.created
    assert second.issue_id == first.issue_id
    assert summarize(engine, first.issue_id).total == 1


@pytest.mark.usefixtures("content")
async def test_4xx_and_drops_defer_then_resend_with_the_same_message_id(
    engine: sa.Engine,
    settings: Settings,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    for name in ("ok", "later", "drop", "gone"):
        make_subscriber(engine, email=f"{name}@example.org")
    smtp_server.script("later@example.org", ["451 4.7.1 try again later"])
    smtp_server.script("drop@example.org", [DROP], stage="data")
    smtp_server.script("gone@example.org", ["550 5.1.1 no such user"])
    clock = Clock(NOW)
    issue = make_issue(engine, settings)

    assert await deliver(engine, settings, clock, issue.issue_id) == {
        "sent": 1,
        "deferred": 2,
        "bounced": 1,
    }
    assert statuses(engine, issue.issue_id) == {
        "ok@example.org": "sent",
        "later@example.org": "deferred",
        "drop@example.org": "deferred",
        "gone@example.org": "bounced",
    }
    # A 5.1.1 at send time is a hard bounce: the subscriber is suppressed at once.
    assert store.get(engine, "gone@example.org").status == "bounced"

    # Nothing is due until the backoff has passed.
    assert await deliver(engine, settings, clock, issue.issue_id) == {}
    clock.value = NOW + timedelta(hours=1)
    assert await deliver(engine, settings, clock, issue.issue_id) == {"sent": 2}

    for name in ("later", "drop"):
        copies = smtp_server.received_for(f"{name}@example.org")
        ids = {parsed(c.data)["Message-ID"] for c in copies}
        assert len(ids) == 1, f"{name}: a resend must carry the same Message-ID"
    assert summarize(engine, issue.issue_id).status == "sent"


@pytest.mark.usefixtures("content")
async def test_deferred_mail_fails_after_the_give_up_age(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    settings = make_settings(
        db_url,
        smtp={
            "host": "127.0.0.1",
            "port": smtp_server.port,
            "timeout": 2,
            "retry_max_age_hours": 1,
        },
    )
    make_subscriber(engine, email="later@example.org")
    smtp_server.script("later@example.org", ["451 4.7.1 later", "452 4.2.2 full"])
    clock = Clock(NOW)
    issue = make_issue(engine, settings)
    assert await deliver(engine, settings, clock, issue.issue_id) == {"deferred": 1}
    clock.value = NOW + timedelta(hours=2)
    assert await deliver(engine, settings, clock, issue.issue_id) == {"failed": 1}


@pytest.mark.usefixtures("content")
async def test_sending_again_sends_nothing_twice(
    engine: sa.Engine,
    settings: Settings,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    make_subscriber(engine, email="ann@example.org")
    digest = settings.digests[0]
    first = open_issue(engine, settings, digest, now=NOW, renderer=Renderer())
    await deliver(engine, settings, Clock(NOW), first.issue_id)
    # A second send finds the first issue complete and no article published since.
    later = NOW + timedelta(minutes=5)
    second = open_issue(engine, settings, digest, now=later, renderer=Renderer())
    assert second.created and second.articles == 0 and second.recipients == 0
    assert await deliver(engine, settings, Clock(later), second.issue_id) == {}
    assert len(smtp_server.received) == 1


@pytest.mark.usefixtures("content")
async def test_an_interrupted_send_resumes_instead_of_starting_over(
    engine: sa.Engine,
    settings: Settings,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    for n in range(3):
        make_subscriber(engine, email=f"r{n}@example.org")
    digest = settings.digests[0]
    first = open_issue(engine, settings, digest, now=NOW, renderer=Renderer())
    resumed = open_issue(
        engine, settings, digest, now=NOW + timedelta(minutes=1), renderer=Renderer()
    )
    assert not resumed.created and resumed.issue_id == first.issue_id
    await deliver(engine, settings, Clock(NOW), first.issue_id)
    assert sorted(r.recipients[0] for r in smtp_server.received) == [
        f"r{n}@example.org" for n in range(3)
    ]


@pytest.mark.usefixtures("content")
async def test_who_unsubscribes_after_the_snapshot_gets_nothing(
    engine: sa.Engine,
    settings: Settings,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    make_subscriber(engine, email="stays@example.org")
    make_subscriber(engine, email="leaves@example.org")
    issue = make_issue(engine, settings)
    store.set_status(engine, "leaves@example.org", "unsubscribed", now=NOW, source="test")
    await deliver(engine, settings, Clock(NOW), issue.issue_id)
    assert [r.recipients[0] for r in smtp_server.received] == ["stays@example.org"]
    assert statuses(engine, issue.issue_id)["leaves@example.org"] == "cancelled"


async def test_an_issue_without_articles_is_empty_and_sends_nothing(
    engine: sa.Engine, settings: Settings
) -> None:
    make_subscriber(engine)
    issue = make_issue(engine, settings)
    assert issue.recipients == 0
    assert summarize(engine, issue.issue_id).status == "empty"


@pytest.mark.usefixtures("content")
async def test_a_throttling_relay_slows_the_whole_pool(
    engine: sa.Engine,
    settings: Settings,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    for n in range(4):
        make_subscriber(engine, email=f"r{n}@example.org")
    smtp_server.script("r0@example.org", ["451 4.7.0 Rate limited, try again later"])
    issue = make_issue(engine, settings)
    async with SmtpPool(settings.smtp) as pool:
        deliverer = Deliverer(engine, settings, pool, clock=Clock(NOW))
        counts = (await deliverer.drain(issue_id=issue.issue_id)).counts
    assert counts == {"sent": 3, "deferred": 1}
    accepted = sorted(r.at for r in smtp_server.received)
    # Nothing was accepted within the pause that the throttle reply started (1 s).
    assert len(accepted) == 3 and accepted[-1] - accepted[0] >= 0.9
