"""Alerts to staff: each cause found in the store (or where it happens) raised once an hour,
logged at ERROR, mailed to the alert addresses; and the staff round that runs the checks."""

from __future__ import annotations

import asyncio
import logging
import signal
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from mailer.content.feeds.state import record_failure
from mailer.content.store import upsert_articles
from mailer.db import audit
from mailer.db.engine import create_engine, writing
from mailer.db.schema import deliveries, staff_alerts, staff_mail
from mailer.delivery.pool import SmtpAuthError
from mailer.errors import FeedError, MailerError
from mailer.service import Parts, Service
from mailer.staff import checks
from mailer.staff.outbox import enqueue
from mailer.staff.rounds import StaffRound, Step
from mailer.web.server import bind_ephemeral
from tests.factories import (
    ALERTS,
    NOW,
    Clock,
    make_article,
    make_issue,
    make_settings,
    make_subscriber,
    server_settings,
)
from tests.smtp_server import FaultServer
from tests.test_service import running, wait_for

pytest_plugins = ["tests.smtp_server"]

ONCALL = "oncall@news.example.org"
STAFF = {"emails": ["editor@news.example.org"], "alert_emails": [ONCALL]}
FEED = "https://feeds.example.org/base-alerts.rss"
SOURCES = [{"type": "feed", "url": FEED, "topic": "base-alerts"}]


def raised(engine: sa.Engine) -> dict[str, int]:
    """Alert causes raised so far, with how many times."""
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(staff_alerts.c.cause, staff_alerts.c.times)).all())


def mails(engine: sa.Engine) -> list[sa.Row[Any]]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(staff_mail).order_by(staff_mail.c.id)))


def alert_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR and r.name == "mailer.staff.alerts"
    ]


def new_issue(engine: sa.Engine, settings: Any, *, at: datetime = NOW, made: datetime = NOW) -> int:
    """An issue of the weekly digest for ``at`` with a new article, made at ``made``."""
    upsert_articles(engine, [make_article(published_at=made - timedelta(hours=1))], now=made)
    issue = make_issue(engine, settings, at=at, made=made)
    assert issue.recipients
    return issue.issue_id


def fail_feed(engine: sa.Engine, url: str, times: int) -> None:
    for n in range(times):
        error = FeedError(url, "HTTP 503 Service Unavailable", status=503)
        record_failure(engine, url, error, now=NOW - timedelta(minutes=30 - n))


# -- each cause once an hour


def test_a_feed_failing_n_times_in_a_row_is_alerted_once_an_hour(
    engine: sa.Engine, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(db_url, staff={**STAFF, "feed_failures": 3}, sources=SOURCES)
    fail_feed(engine, FEED, 2)
    fail_feed(engine, "https://old.example.org/feed", 9)  # no longer configured
    assert checks.check_feeds(engine, settings, now=NOW) == 0
    fail_feed(engine, FEED, 1)
    with caplog.at_level(logging.ERROR):
        assert checks.check_feeds(engine, settings, now=NOW) == 1
        assert checks.check_feeds(engine, settings, now=NOW + timedelta(minutes=59)) == 0
        assert checks.check_feeds(engine, settings, now=NOW + timedelta(minutes=60)) == 1
    assert raised(engine) == {f"feed:{FEED}": 2}
    assert alert_lines(caplog) == [f"alert: the feed {FEED} failed 3 times in a row"] * 2
    first = mails(engine)[0]
    assert (first.kind, first.recipients, first.cause) == ("alert", ONCALL, f"feed:{FEED}")
    assert "HTTP 503" in first.text and "mailer articles sources" in first.text


def test_with_no_staff_address_an_alert_is_only_logged(
    engine: sa.Engine, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(db_url, staff={"feed_failures": 1}, sources=SOURCES)
    fail_feed(engine, FEED, 1)
    with caplog.at_level(logging.ERROR):
        assert checks.check_feeds(engine, settings, now=NOW) == 1
    assert alert_lines(caplog) == [f"alert: the feed {FEED} failed 1 times in a row"]
    assert mails(engine) == []


def test_a_slot_past_its_grace_without_its_issue_is_alerted_once(
    engine: sa.Engine, db_url: str
) -> None:
    # NOW is the weekly digest's Friday slot; the alerts digest fires every ten minutes.
    alerts = {
        "key": "alerts",
        "name": "Base alerts",
        "subject": "Base alert",
        "schedule": "*/10 * * * *",
        "topics": ["base-alerts"],
        "max_articles": 5,
    }
    weekly = make_settings().digests[0]
    settings = make_settings(
        db_url,
        staff=STAFF,
        scheduler={"misfire_grace_seconds": 600},
        digests=[
            {
                "key": weekly.key,
                "name": weekly.name,
                "subject": weekly.subject,
                "schedule": weekly.schedule,
                "topics": list(weekly.topics),
                "max_articles": 20,
            },
            alerts,
        ],
    )
    make_subscriber(engine)
    for minutes in range(-60, 190, 10):  # every alerts slot made but NOW's
        if minutes:
            make_issue(engine, settings, "alerts", at=NOW + timedelta(minutes=minutes))
    grace = timedelta(seconds=600) + checks.MISSED_MARGIN
    assert checks.check_missed_slots(engine, settings, now=NOW + grace - timedelta(seconds=1)) == 0
    assert checks.check_missed_slots(engine, settings, now=NOW + grace) == 2
    assert raised(engine) == {"missed:weekly": 1, "missed:alerts": 1}
    # Once: within the hour it is not raised again, and after it the slot is out of the window.
    for later in (timedelta(minutes=30), timedelta(minutes=59, seconds=59), timedelta(hours=2)):
        assert checks.check_missed_slots(engine, settings, now=NOW + grace + later) == 0
    text = next(m.text for m in mails(engine) if m.cause == "missed:weekly")
    assert "Fri 20 Nov 2026 07:00 EST" in text and "mailer digest send weekly" in text


def test_slots_before_the_first_issue_ever_are_not_missed_and_many_make_one_alert(
    engine: sa.Engine, db_url: str
) -> None:
    alerts = {**ALERTS, "schedule": "*/10 * * * *"}
    settings = make_settings(
        db_url, staff=STAFF, scheduler={"misfire_grace_seconds": 600}, digests=[alerts]
    )
    later = NOW + timedelta(minutes=60) + checks.MISSED_MARGIN
    # A new installation: nothing ran before, so the slots of the last hour were not missed.
    assert checks.check_missed_slots(engine, settings, now=later) == 0
    make_issue(engine, settings, "alerts", at=NOW - timedelta(minutes=5))
    assert checks.check_missed_slots(engine, settings, now=later) == 1
    [mail] = mails(engine)
    assert mail.subject.endswith("alert: 6 issues of the Base alerts were not made")
    assert "Fri 20 Nov 2026 07:00 EST, Fri 20 Nov 2026 07:10 EST" in mail.text


async def test_a_firing_given_up_raises_the_missed_slot_at_once(
    engine: sa.Engine, db_url: str
) -> None:
    settings = make_settings(db_url, staff=STAFF, scheduler={"misfire_grace_seconds": 600})
    service = Service(engine, settings, clock=lambda: NOW + timedelta(minutes=11))
    assert await service.retry_firing(settings.digests[0], NOW) is None
    assert raised(engine) == {"missed:weekly": 1}
    # The periodic check finds the same slot later: not raised twice.
    later = NOW + timedelta(minutes=12)
    assert checks.check_missed_slots(engine, settings, now=later) == 0


def test_an_issue_with_due_deliveries_and_no_progress_is_alerted_as_stalled(
    engine: sa.Engine, db_url: str
) -> None:
    settings = make_settings(db_url, staff={**STAFF, "stall_minutes": 15})
    for _ in range(3):
        make_subscriber(engine)
    issue = new_issue(engine, settings)
    # A second issue whose deliveries are deferred to later is waiting, not stalled.
    later = new_issue(engine, settings, at=NOW - timedelta(days=7))
    with writing(engine) as conn:
        conn.execute(
            deliveries.update()
            .where(deliveries.c.issue_id == later)
            .values(status="deferred", next_attempt_at=NOW + timedelta(hours=2))
        )
    assert checks.check_stalls(engine, settings, now=NOW + timedelta(minutes=14)) == 0
    stall = NOW + timedelta(minutes=15)
    assert checks.check_stalls(engine, settings, now=stall) == 1
    assert checks.check_stalls(engine, settings, now=stall + timedelta(minutes=59)) == 0
    assert checks.check_stalls(engine, settings, now=stall + timedelta(minutes=60)) == 1
    assert raised(engine) == {f"stall:issue:{issue}": 2}
    mail = mails(engine)[0]
    assert mail.subject.endswith(f"issue {issue} has stalled: 3 deliveries waiting")
    assert "since Fri 20 Nov 2026 07:00 EST" in mail.text
    assert "mailer worker" in mail.text and f"mailer issues show {issue}" in mail.text


def test_an_issue_whose_worker_still_moves_or_holds_a_live_lease_is_not_stalled(
    engine: sa.Engine, db_url: str
) -> None:
    settings = make_settings(db_url, staff={**STAFF, "stall_minutes": 15})
    for _ in range(2):
        make_subscriber(engine)
    issue = new_issue(engine, settings)
    at = NOW + timedelta(minutes=20)
    with writing(engine) as conn:
        first = conn.scalar(sa.select(sa.func.min(deliveries.c.id)))
        conn.execute(  # one sent ten minutes ago: the issue moves
            deliveries.update()
            .where(deliveries.c.id == first)
            .values(
                status="sent",
                sent_at=at - timedelta(minutes=10),
                updated_at=at - timedelta(minutes=10),
            )
        )
    assert checks.check_stalls(engine, settings, now=at) == 0
    # In flight under a lease that ran out 20 minutes ago, nothing since: stalled.
    with writing(engine) as conn:
        conn.execute(
            deliveries.update()
            .where(deliveries.c.issue_id == issue)
            .values(
                status="sending",
                lease_owner="host:1",
                lease_expires_at=NOW - timedelta(minutes=5),
                updated_at=NOW - timedelta(minutes=6),
            )
        )
    assert [s.issue_id for s in checks.find_stalls(engine, settings, now=at)] == [issue]
    # A worker holding one of them under a live lease is at work on the issue.
    with writing(engine) as conn:
        conn.execute(
            deliveries.update()
            .where(deliveries.c.id == first)
            .values(
                status="queued", lease_owner="host:2", lease_expires_at=at + timedelta(seconds=10)
            )
        )
    assert checks.find_stalls(engine, settings, now=at) == []


def test_complaint_and_hard_bounce_rates_over_30_days_are_alerted_above_the_limits(
    engine: sa.Engine, db_url: str
) -> None:
    settings = make_settings(db_url, staff=STAFF)
    ids = [make_subscriber(engine).id for _ in range(100)]
    new_issue(engine, settings, made=NOW - timedelta(days=2))
    with writing(engine) as conn:
        conn.execute(deliveries.update().values(status="sent", sent_at=NOW - timedelta(days=2)))
        old = NOW - timedelta(days=31)
        for sid in ids[:5]:  # outside the window
            audit.record(conn, sid, "complaint", old, type="complaint")
            audit.record(conn, sid, "bounce", old, type="hard")
        day = NOW - timedelta(days=1)
        audit.record(conn, ids[0], "bounce", day, type="hard")
        audit.record(conn, ids[1], "bounce", day, type="hard")
        audit.record(conn, ids[2], "bounce", day, type="blocked")  # the address is fine
        audit.record(conn, ids[3], "bounce", day, type="soft")
    rates = checks.measure_rates(engine, now=NOW)
    assert rates == checks.Rates(accepted=100, attempted=100, complaints=0, hard_bounces=2)
    assert checks.check_rates(engine, settings, now=NOW) == 0  # 2 % is the limit, not above

    with writing(engine) as conn:
        audit.record(conn, ids[4], "complaint", NOW - timedelta(hours=1), type="complaint")
        audit.record(conn, ids[5], "bounce", NOW - timedelta(hours=1), type="hard")
    assert checks.check_rates(engine, settings, now=NOW) == 2
    assert checks.check_rates(engine, settings, now=NOW + timedelta(minutes=30)) == 0
    assert raised(engine) == {"rate:complaints": 1, "rate:bounces": 1}
    texts = {m.cause: m for m in mails(engine)}
    assert "complaint rate 1.00% over 30 days" in texts["rate:complaints"].subject
    assert "1 spam complaints for 100 messages" in texts["rate:complaints"].text
    assert "hard-bounce rate 3.00% over 30 days" in texts["rate:bounces"].subject
    assert "3 hard bounces for 100 messages" in texts["rate:bounces"].text


def test_rates_of_a_small_list_say_nothing(engine: sa.Engine, db_url: str) -> None:
    settings = make_settings(db_url, staff=STAFF)
    sid = make_subscriber(engine).id
    new_issue(engine, settings)
    with writing(engine) as conn:
        conn.execute(deliveries.update().values(status="sent", sent_at=NOW))
        audit.record(conn, sid, "complaint", NOW, type="complaint")
    assert checks.measure_rates(engine, now=NOW).complaint_rate == 1.0
    assert checks.check_rates(engine, settings, now=NOW) == 0


# -- the relay, seen by the worker


async def test_a_relay_that_refuses_our_login_is_alerted_and_the_mail_waits(
    engine: sa.Engine, db_url: str, make_smtp_server: Any
) -> None:
    server = make_smtp_server(users={"mailer": "secret"})  # we log in as nobody: 530
    settings = server_settings(db_url, server, staff=STAFF)
    make_subscriber(engine)
    new_issue(engine, settings)
    service = Service(engine, settings, parts=Parts(scheduler=False, web=False), clock=Clock())
    with pytest.raises(SmtpAuthError):
        await service.deliver_forever(drain=True)
    assert raised(engine) == {"relay:auth": 1}
    [mail] = mails(engine)
    assert mail.status == "pending" and "530" in mail.text
    assert server.received == []


async def test_a_relay_that_refuses_every_connection_is_alerted_once(
    engine: sa.Engine, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = FaultServer().start()
    server.stop()
    settings = server_settings(db_url, server, staff=STAFF)
    for _ in range(3):
        make_subscriber(engine)
    new_issue(engine, settings)
    service = Service(engine, settings, parts=Parts(scheduler=False, web=False), clock=Clock())
    with caplog.at_level(logging.ERROR):
        totals = await service.deliver_forever(drain=True)
        await asyncio.gather(*list(service.alerting))
    assert totals.counts.get("deferred") == 3
    assert raised(engine) == {"relay:down": 1}
    assert alert_lines(caplog) == [f"alert: the SMTP relay 127.0.0.1:{server.port} is unreachable"]
    [mail] = mails(engine)
    assert "Connect call failed" in mail.text or "refused" in mail.text.lower()


# -- the web app, seen by the service


async def test_a_web_app_that_stops_while_the_service_runs_stops_it_with_an_alert(
    engine: sa.Engine, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(db_url, staff=STAFF)
    service = Service(
        engine,
        settings,
        parts=Parts(scheduler=False, worker=False),
        clock=Clock(),
        web_socket=bind_ephemeral(),
    )

    def stop_the_web_app() -> None:
        assert service.web_server is not None
        service.web_server.should_exit = True  # uvicorn returns from serve() without an error

    with caplog.at_level(logging.ERROR), pytest.raises(MailerError) as stopped:
        await asyncio.wait_for(service.run(on_started=stop_the_web_app), timeout=30)
    await asyncio.gather(*list(service.alerting))
    assert str(stopped.value) == "the web app stopped: it exited without an error"
    assert raised(engine) == {"web:stopped": 1}
    assert "the web app stopped: it exited without an error" in caplog.messages
    [mail] = mails(engine)
    assert "sign-up page, confirmation, preferences and unsubscribe links were down" in mail.text


# -- the round


async def test_a_round_runs_each_step_guarded_and_heavy_ones_less_often(
    engine: sa.Engine, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(db_url)
    calls: list[tuple[str, datetime]] = []

    def broken(now: datetime) -> None:
        raise RuntimeError("the check is broken")

    steps = [
        Step("broken", broken),
        Step("light", lambda now: calls.append(("light", now))),
        Step("heavy", lambda now: calls.append(("heavy", now)), timedelta(minutes=5)),
    ]
    staff = StaffRound(engine, settings, sign=None, steps=steps)
    with caplog.at_level(logging.ERROR, logger="mailer.staff.rounds"):
        for minutes in (0, 1, 4, 5, 6):
            await staff.run(NOW + timedelta(minutes=minutes))
    assert [m for name, m in calls if name == "heavy"] == [NOW, NOW + timedelta(minutes=5)]
    assert len([c for c in calls if c[0] == "light"]) == 5
    lines = [r.getMessage() for r in caplog.records if r.name == "mailer.staff.rounds"]
    assert lines == ["staff round: broken failed: the check is broken"] * 5


async def test_the_service_round_alerts_and_sends_on_the_workers_pool(
    engine: sa.Engine, db_url: str, smtp_server: FaultServer
) -> None:
    settings = server_settings(
        db_url, smtp_server, staff={**STAFF, "feed_failures": 2}, sources=SOURCES
    )
    fail_feed(engine, FEED, 2)
    with writing(engine) as conn:  # a report queued by another process meanwhile
        enqueue(
            conn,
            kind="report",
            cause="report:1",
            to=["editor@news.example.org"],
            subject="Report",
            text="Sent 1.\n",
            html=None,
            now=NOW,
        )
    clock = Clock()
    service = Service(engine, settings, parts=Parts(web=False), clock=clock)
    worker = asyncio.create_task(service.deliver_forever())
    try:
        while service.pool is None:  # noqa: ASYNC110 (the worker opens its pool at once)
            await asyncio.sleep(0)
        await service.staff_round()
        # Sent on the worker's pool: its connections stay open (a pool of the round's own
        # would have said QUIT before the round ended).
        assert len(smtp_server.received) == 2 and smtp_server.quits == 0
    finally:
        service.stop.set()
        await worker
    assert raised(engine) == {f"feed:{FEED}": 1}
    assert sorted(r.recipients[0] for r in smtp_server.received) == [
        "editor@news.example.org",
        ONCALL,
    ]
    assert {m.status for m in mails(engine)} == {"sent"}


def test_mailer_run_alerts_a_failing_feed_by_mail(
    db_url: str, tmp_path: Path, smtp_server: FaultServer
) -> None:
    from tests.factories import write_config

    log = tmp_path / "run.log"
    log.touch()
    dead = FaultServer().start()  # a port nobody listens on once stopped
    dead.stop()
    config = write_config(
        tmp_path / "mailer.toml",
        db_url,
        smtp={"host": "127.0.0.1", "port": smtp_server.port, "timeout": 5},
        scheduler={"poll_seconds": 0.2, "catch_up": "none"},
        feeds={"interval_minutes": 60, "timeout": 2},
        staff={"alert_emails": [ONCALL], "feed_failures": 1},
        sources=[
            {
                "type": "feed",
                "url": f"http://127.0.0.1:{dead.port}/feed.xml",
                "topic": "base-alerts",
                "allow_private": True,  # a dead local server, not a refused address
            }
        ],
    )
    with running(config, log, "run", "--no-web") as process:
        wait_for(lambda: bool(smtp_server.received_for(ONCALL)), log, "the alert mail")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
    text = log.read_text()
    assert "alert: the feed http://127.0.0.1:" in text
    engine = create_engine(db_url)
    try:
        assert [m.status for m in mails(engine)] == ["sent"]
    finally:
        engine.dispose()
