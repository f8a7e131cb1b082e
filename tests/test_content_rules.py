"""Per-subscriber content rules: never the same article twice, alerts first, quiet hours, expiry."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from mailer.compose.rendering import Renderer
from mailer.config.settings import Settings
from mailer.content.article import ParsedArticle
from mailer.content.store import upsert_articles
from mailer.db.schema import deliveries
from mailer.delivery import claims
from mailer.delivery.pool import SmtpPool
from mailer.delivery.worker import Deliverer
from mailer.issues.create import create_issue
from mailer.issues.schedule import quiet_until
from tests.factories import NOW, config_dict, make_settings, make_subscriber, server_settings
from tests.smtp_server import FaultServer, smtp_server  # noqa: F401

pytestmark = pytest.mark.slow

BASE = config_dict()["digests"][0]


def digest(**overrides: Any) -> dict[str, Any]:
    return {**BASE, **overrides}


def publish(engine: sa.Engine, guid: str, topic: str, at: datetime, **extra: Any) -> None:
    stored_at = extra.pop("now", at)
    item = ParsedArticle(
        guid=f"urn:test:{guid}",
        topic=topic,
        title=extra.pop("title", guid),
        summary="Summary.",
        why_it_matters="Why.",
        body="Body.",
        link="https://news.example.org/a",
        published_at=at,
        **extra,
    )
    upsert_articles(engine, [item], now=stored_at)


def settings_for(db_url: str, server: FaultServer, *digests: dict[str, Any]) -> Settings:
    return server_settings(db_url, server, digests=list(digests))


async def send(engine: sa.Engine, settings: Settings, at: datetime) -> dict[str, int]:
    async with SmtpPool(settings.smtp) as pool:
        totals = await Deliverer(engine, settings, pool, clock=lambda: at).drain()
    return totals.counts


def titles(server: FaultServer, start: int = 0) -> list[set[str]]:
    out = []
    for received in server.received[start:]:
        text = received.data.decode("ascii")
        out.append({t for t in ("alpha", "bravo", "charlie") if t in text})
    return out


def issue(engine: sa.Engine, settings: Settings, key: str, slot: datetime) -> int:
    return create_issue(
        engine,
        settings,
        settings.digest(key),
        scheduled_for=slot,
        now=slot,
        render_subject=Renderer().render_subject,
    ).issue_id


async def test_an_article_is_never_sent_twice_across_digests_unless_updated_and_wanted(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    settings = settings_for(
        db_url,
        smtp_server,
        digest(key="alerts", name="Alerts", topics=["base-alerts"], priority="alert"),
        digest(key="weekly", include_updates=True),
        digest(key="daily", name="Daily"),
    )
    make_subscriber(engine, email="ann@example.org")
    t0 = NOW
    publish(engine, "alpha", "base-alerts", t0 - timedelta(hours=3))
    issue(engine, settings, "alerts", t0)  # 1: alpha, as an alert
    await send(engine, settings, t0)
    publish(engine, "bravo", "local-events", t0 + timedelta(hours=1))
    issue(engine, settings, "daily", t0 + timedelta(hours=2))  # 2: alpha seen, bravo new
    await send(engine, settings, t0 + timedelta(hours=2))
    # alpha is updated; the weekly digest includes updates, the daily one would not.
    publish(
        engine,
        "alpha",
        "base-alerts",
        t0 - timedelta(hours=3),
        title="alpha (updated)",
        now=t0 + timedelta(hours=3),
    )
    publish(engine, "charlie", "military-news", t0 + timedelta(hours=3))
    issue(
        engine, settings, "weekly", t0 + timedelta(hours=4)
    )  # 3: alpha updated, bravo seen, charlie
    await send(engine, settings, t0 + timedelta(hours=4))
    assert titles(smtp_server) == [{"alpha"}, {"bravo"}, {"alpha", "charlie"}]


async def test_nothing_new_for_a_subscriber_means_no_mail(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    settings = settings_for(
        db_url,
        smtp_server,
        digest(key="alerts", name="Alerts", topics=["base-alerts"], priority="alert"),
        digest(key="weekly"),
    )
    make_subscriber(engine, email="ann@example.org", topics=["base-alerts"])
    publish(engine, "alpha", "base-alerts", NOW - timedelta(hours=1))
    issue(engine, settings, "alerts", NOW)
    await send(engine, settings, NOW)
    weekly = issue(engine, settings, "weekly", NOW + timedelta(hours=1))
    assert await send(engine, settings, NOW + timedelta(hours=1)) == {"cancelled": 1}
    assert len(smtp_server.received) == 1
    with engine.connect() as conn:
        reply = conn.scalar(
            sa.select(deliveries.c.last_reply).where(deliveries.c.issue_id == weekly)
        )
    assert reply == "nothing new in the subscriber's topics"


def test_alert_deliveries_are_claimed_ahead_of_a_bulk_issue_in_flight(
    engine: sa.Engine, db_url: str
) -> None:
    settings = make_settings(
        db_url,
        digests=[
            digest(key="weekly"),
            digest(key="alerts", name="Alerts", topics=["base-alerts"], priority="alert"),
        ],
    )
    for n in range(6):
        make_subscriber(engine, email=f"r{n}@example.org")
    publish(engine, "alpha", "base-alerts", NOW - timedelta(hours=1))
    bulk = issue(engine, settings, "weekly", NOW)
    first = claims.claim(engine, owner="w", limit=2, lease=timedelta(minutes=5), now=NOW)
    assert {d.issue_id for d in first} == {bulk}
    publish(engine, "bravo", "base-alerts", NOW + timedelta(minutes=1))
    alert = issue(engine, settings, "alerts", NOW + timedelta(minutes=2))
    later = NOW + timedelta(minutes=3)
    nxt = claims.claim(engine, owner="w", limit=6, lease=timedelta(minutes=5), now=later)
    assert [d.issue_id for d in nxt] == [alert] * 6


@pytest.mark.parametrize(
    ("local", "expected"),
    [
        (datetime(2026, 11, 20, 22, 30), datetime(2026, 11, 21, 6, 0)),
        (datetime(2026, 11, 21, 5, 59), datetime(2026, 11, 21, 6, 0)),
        (datetime(2026, 11, 21, 6, 0), None),
        (datetime(2026, 11, 20, 20, 59), None),
        # DST ends in New York on 1 Nov 2026: the night is an hour longer, the end still 06:00.
        (datetime(2026, 10, 31, 23, 0), datetime(2026, 11, 1, 6, 0)),
    ],
    ids=["evening", "just-before-end", "at-end", "before-start", "dst-night"],
)
def test_quiet_hours_end_at_local_time(local: datetime, expected: datetime | None) -> None:
    from zoneinfo import ZoneInfo

    zone = ZoneInfo("America/New_York")
    got = quiet_until((time(21), time(6)), "America/New_York", local.replace(tzinfo=zone))
    assert got == (expected.replace(tzinfo=zone).astimezone(UTC) if expected else None)


async def test_bulk_mail_waits_out_quiet_hours_and_alerts_do_not(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    settings = settings_for(
        db_url,
        smtp_server,
        digest(key="weekly", quiet_hours="21:00-06:00", timezone="UTC"),
        digest(
            key="alerts",
            name="Alerts",
            topics=["base-alerts"],
            priority="alert",
            quiet_hours="21:00-06:00",
            timezone="UTC",
        ),
    )
    make_subscriber(engine, email="ann@example.org")
    night = datetime(2026, 11, 20, 22, 0, tzinfo=UTC)
    publish(engine, "alpha", "local-events", night - timedelta(hours=1))
    issue(engine, settings, "weekly", night)
    assert await send(engine, settings, night + timedelta(minutes=5)) == {}
    publish(engine, "bravo", "base-alerts", night + timedelta(minutes=6))
    issue(engine, settings, "alerts", night + timedelta(minutes=10))
    assert await send(engine, settings, night + timedelta(minutes=11)) == {"sent": 1}
    morning = datetime(2026, 11, 21, 6, 1, tzinfo=UTC)
    assert await send(engine, settings, morning) == {"sent": 1}


async def test_an_expired_article_is_dropped_from_mail_not_yet_sent(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    settings = settings_for(db_url, smtp_server, digest(key="weekly"))
    make_subscriber(engine, email="ann@example.org")
    publish(
        engine,
        "alpha",
        "base-alerts",
        NOW - timedelta(hours=2),
        expires_at=NOW + timedelta(minutes=30),
    )
    publish(engine, "bravo", "local-events", NOW - timedelta(hours=1))
    issue(engine, settings, "weekly", NOW)
    await send(engine, settings, NOW + timedelta(hours=1))
    assert titles(smtp_server) == [{"bravo"}]
