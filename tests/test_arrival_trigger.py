"""Digests made on arrival (``trigger = "arrival"``): the watch step driven with a fixed
clock, real SMTP delivery, both databases; then real ``mailer run`` processes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from mailer.cli import cli
from mailer.clock import now as clock_now
from mailer.compose.rendering import Renderer
from mailer.config.settings import Digest, Settings
from mailer.content.store import upsert_articles
from mailer.db.engine import create_engine
from mailer.db.schema import articles, issue_articles, issues, staff_alerts
from mailer.errors import ConfigError, RenderError
from mailer.issues import arrival
from mailer.issues.arrival import LATE
from mailer.service import Service
from mailer.staff import checks
from mailer.subscribers import editions
from tests.factories import (
    ALERTS,
    BASE_CONFIG,
    NOW,
    SECRET,
    Clock,
    make_article,
    make_settings,
    make_subscriber,
    server_settings,
    write_config,
)
from tests.smtp_server import FaultServer
from tests.test_service import received_ids, running, spawn, stop_all, wait_for

pytest_plugins = ["tests.smtp_server"]

ON_ARRIVAL = {
    "key": "alerts",
    "name": "Base alerts",
    "subject": "Base alert",
    "trigger": "arrival",
    "topics": ["base-alerts"],
    "max_articles": 5,
    "lookback_days": 2,
}
# The first arrival, a fraction into a second: the issue's time is counted from the second.
T0 = NOW + timedelta(milliseconds=400)


def arrival_settings(db_url: str, server: FaultServer | None = None, **digest: Any) -> Settings:
    """The weekly digest and the arrival-triggered alerts digest, sending to ``server``."""
    digests = [*BASE_CONFIG["digests"], {**ON_ARRIVAL, **digest}]
    if server is None:
        return make_settings(db_url, digests=digests)
    return server_settings(db_url, server, digests=digests)


def store_alert(
    db_url: str,
    at: datetime,
    title: str,
    priority: str = "bulk",
    published_at: datetime | None = None,
) -> None:
    """An article stored at ``at`` through an engine of its own, as another process would
    (published five minutes before, unless ``published_at`` says)."""
    other = create_engine(db_url)
    try:
        published = published_at or at - timedelta(minutes=5)
        item = make_article(title=title, published_at=published)
        item = dataclasses.replace(item, priority=priority)
        upsert_articles(other, [item], now=at)
    finally:
        other.dispose()


def made(engine: sa.Engine) -> list[tuple[datetime, list[str]]]:
    """Each issue of the alerts digest: its time and its articles' titles, in issue order."""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(issues.c.id, issues.c.scheduled_for)
            .where(issues.c.digest == "alerts")
            .order_by(issues.c.id)
        ).all()
        return [
            (
                row.scheduled_for,
                list(
                    conn.scalars(
                        sa.select(articles.c.title)
                        .join(issue_articles, issue_articles.c.article_id == articles.c.id)
                        .where(issue_articles.c.issue_id == row.id)
                        .order_by(issue_articles.c.position)
                    )
                ),
            )
            for row in rows
        ]


def alerts_digest(settings: Settings) -> Digest:
    return settings.digest("alerts")


# -- configuration -------------------------------------------------------------------------


def test_an_arrival_digest_is_an_alert_digest_without_slots() -> None:
    digest = alerts_digest(arrival_settings("sqlite:///:memory:"))
    assert digest.on_arrival and digest.priority == "alert" and digest.schedule == ""
    assert digest.debounce_seconds == 20
    assert digest.template == "alert"
    zero = alerts_digest(arrival_settings("sqlite:///:memory:", debounce_seconds=0))
    assert zero.debounce_seconds == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schedule": "*/10 * * * *"}, 'schedule (digest \'alerts\') does not apply with trigger'),
        ({"debounce_seconds": 601}, "debounce_seconds (digest 'alerts') must be 0–600, got 601"),
        ({"debounce_seconds": -1}, "debounce_seconds (digest 'alerts') must be 0–600, got -1"),
        ({"debounce_seconds": "20"}, "debounce_seconds (digest 'alerts') must be a whole number"),
        ({"priority": "bulk"}, 'priority (digest \'alerts\') must be "alert" with trigger'),
        ({"review_minutes": 5}, "review_minutes (digest 'alerts') applies to bulk digests only"),
        ({"trigger": "sometimes"}, "trigger (digest 'alerts') must be one of schedule, arrival"),
    ],
    ids=["schedule", "debounce-high", "debounce-negative", "debounce-text", "bulk", "review",
         "unknown-trigger"],
)  # fmt: skip
def test_arrival_config_errors_name_the_key(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        arrival_settings("sqlite:///:memory:", **change)
    assert "[digests[1]]." + message in str(caught.value)


def test_debounce_on_a_scheduled_digest_is_refused() -> None:
    scheduled = {**ALERTS, "debounce_seconds": 5}
    with pytest.raises(ConfigError, match=r"debounce_seconds .*applies only with trigger"):
        make_settings(digests=[scheduled])


# -- the watch step, fixed clock, real SMTP, both databases ----------------------------------


async def test_articles_arriving_within_the_debounce_go_in_one_issue_sent_once_each(
    engine: sa.Engine, db_url: str, smtp_server: FaultServer
) -> None:
    settings = arrival_settings(db_url, smtp_server)
    readers = [make_subscriber(engine, email=f"r{n}@example.org").email for n in range(3)]
    paused = make_subscriber(engine, email="paused@example.org")
    with engine.begin() as conn:
        editions.pause(conn, paused.id, ["alerts"], NOW + timedelta(days=1))
    clock = Clock(T0)
    service = Service(engine, settings, clock=clock)

    store_alert(db_url, T0, "Gate closed")
    clock.value = T0 + timedelta(seconds=5)
    step = service.watch_arrivals()
    assert step.made == [] and step.next_due == NOW + timedelta(seconds=20)
    store_alert(db_url, T0 + timedelta(seconds=10), "Shelter in place")
    clock.value = NOW + timedelta(seconds=19, milliseconds=999)
    assert service.watch_arrivals().made == []
    clock.value = NOW + timedelta(seconds=20)
    step = service.watch_arrivals()
    assert [i.articles for i in step.made] == [2] and service.work.is_set()
    assert made(engine) == [(NOW + timedelta(seconds=20), ["Shelter in place", "Gate closed"])]
    # Taken: the next look makes nothing.
    assert service.watch_arrivals().made == [] and len(made(engine)) == 1

    await service.deliver_forever(drain=True)
    copies = received_ids(smtp_server)
    assert sorted(to for to, _ in copies) == sorted(readers)
    assert set(copies.values()) == {1}
    assert smtp_server.received_for(paused.email) == []


def test_an_article_pushed_as_an_alert_does_not_wait_for_the_debounce(
    engine: sa.Engine, db_url: str
) -> None:
    settings = arrival_settings(db_url)
    clock = Clock(T0)
    service = Service(engine, settings, clock=clock)
    store_alert(db_url, T0, "Road work")
    clock.value = T0 + timedelta(seconds=3)
    step = service.watch_arrivals()
    assert step.made == [] and step.next_due == NOW + timedelta(seconds=20)
    store_alert(
        db_url,
        T0 + timedelta(seconds=3),
        "Shelter in place",
        priority="alert",
        published_at=T0 - timedelta(minutes=10),  # older than "Road work": not first by date
    )
    step = service.watch_arrivals()
    # Made at once, for the alert's own second, taking what waited with it; the alert leads
    # although it is the older of the two.
    assert [i.articles for i in step.made] == [2]
    assert made(engine) == [(NOW + timedelta(seconds=3), ["Shelter in place", "Road work"])]


async def test_the_running_watch_wakes_when_told_an_article_arrived(
    engine: sa.Engine, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A poll too slow to find it within the test: only the wake-up can.
    monkeypatch.setattr(arrival, "POLL_SECONDS", 600.0)
    settings = arrival_settings(db_url, debounce_seconds=0)
    service = Service(engine, settings)
    looked = threading.Event()
    first_look = service.arrivals.step

    def step(now: datetime) -> Any:
        try:
            return first_look(now)
        finally:
            looked.set()

    monkeypatch.setattr(service.arrivals, "step", step)
    watch = asyncio.create_task(service.arrivals_forever())
    try:
        assert await asyncio.to_thread(looked.wait, 10)  # its first look found nothing
        store_alert(db_url, clock_now(), "Gate closed")
        service.arrived.set()  # what the push hook does once it stored an article
        await asyncio.wait_for(service.work.wait(), timeout=10)
        assert [titles for _at, titles in made(engine)] == [["Gate closed"]]
    finally:
        service.stop.set()
        await asyncio.wait_for(watch, timeout=10)


async def test_debounce_zero_makes_the_issue_at_once_and_a_later_arrival_its_own(
    engine: sa.Engine, db_url: str, smtp_server: FaultServer
) -> None:
    settings = arrival_settings(db_url, smtp_server, debounce_seconds=0)
    reader = make_subscriber(engine, email="r@example.org")
    clock = Clock(T0)
    service = Service(engine, settings, clock=clock)
    store_alert(db_url, T0, "Gate closed")
    assert [i.articles for i in service.watch_arrivals().made] == [1]
    # Stored in the same second the first issue is for: a new issue, one second on.
    store_alert(db_url, T0 + timedelta(milliseconds=300), "Gate open")
    clock.value = T0 + timedelta(milliseconds=300)
    assert service.watch_arrivals().made == []
    clock.value = NOW + timedelta(seconds=1)
    assert [i.articles for i in service.watch_arrivals().made] == [1]
    assert made(engine) == [
        (NOW, ["Gate closed"]),
        (NOW + timedelta(seconds=1), ["Gate open"]),
    ]
    await service.deliver_forever(drain=True)
    assert len(smtp_server.received_for(reader.email)) == 2


def test_two_services_make_one_issue_of_the_same_arrival(engine: sa.Engine, db_url: str) -> None:
    settings = arrival_settings(db_url)
    make_subscriber(engine)
    clock = Clock(NOW + timedelta(seconds=20))
    store_alert(db_url, T0, "Gate closed")
    other = create_engine(db_url)
    try:
        first = Service(engine, settings, clock=clock)
        second = Service(other, settings, clock=clock)
        # The second read what was waiting before the first made the issue: it still makes
        # none (ON CONFLICT on the same computed time).
        assert second.arrivals.digests
        made_first = first.watch_arrivals().made
        made_second = second.watch_arrivals().made
    finally:
        other.dispose()
    assert len(made_first) == 1 and made_second == []
    assert len(made(engine)) == 1


def test_an_issue_that_fails_is_retried_after_a_doubling_wait_and_logged(
    engine: sa.Engine, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = arrival_settings(db_url, debounce_seconds=0)
    make_subscriber(engine)
    failures = [RenderError("the template broke", template="subject")] * 2

    def render_subject(digest: Digest, date: datetime, leads: Any) -> str:
        if failures:
            raise failures.pop()
        return Renderer().render_subject(digest, date, leads)

    clock = Clock(T0)
    service = Service(
        engine, settings, clock=clock, render_subject=render_subject, retry_seconds=30
    )
    store_alert(db_url, T0, "Gate closed")
    with caplog.at_level(logging.ERROR, logger="mailer.issues.arrival"):
        step = service.watch_arrivals()
    assert step.made == [] and step.next_due == T0 + timedelta(seconds=30)
    assert "creating the arrival issue failed: subject: the template broke" in caplog.text
    clock.value = T0 + timedelta(seconds=29)
    assert service.watch_arrivals().made == []  # waiting out the first delay
    clock.value = T0 + timedelta(seconds=30)
    step = service.watch_arrivals()  # fails again: the wait doubles
    assert step.made == [] and step.next_due == T0 + timedelta(seconds=90)
    clock.value = T0 + timedelta(seconds=90)
    assert [i.articles for i in service.watch_arrivals().made] == [1]


def test_an_article_left_untaken_is_alerted_and_no_slot_is_missed(
    engine: sa.Engine, db_url: str
) -> None:
    settings = arrival_settings(db_url)
    store_alert(db_url, T0, "Gate closed")
    due = NOW + timedelta(seconds=20)
    # A made issue of another digest: the missed-slot check counts from the first one.
    assert checks.check_missed_slots(engine, settings, now=due + timedelta(hours=1)) == 0
    assert checks.check_arrivals(engine, settings, now=due + LATE - timedelta(seconds=1)) == 0
    assert checks.check_arrivals(engine, settings, now=due + LATE) == 1
    assert checks.check_arrivals(engine, settings, now=due + LATE + timedelta(minutes=1)) == 0
    with engine.connect() as conn:
        causes = set(conn.scalars(sa.select(staff_alerts.c.cause)))
    assert causes == {"arrival:alerts"}


def test_an_article_stored_before_its_date_is_not_alerted_as_soon_as_it_is_published(
    engine: sa.Engine, db_url: str
) -> None:
    settings = arrival_settings(db_url)
    published = NOW + timedelta(hours=1)
    upsert_articles(engine, [make_article(title="Gate closes", published_at=published)], now=NOW)
    assert checks.check_arrivals(engine, settings, now=published + timedelta(seconds=1)) == 0
    assert checks.check_arrivals(engine, settings, now=published + LATE) == 1


async def test_quiet_hours_never_hold_an_arrival_alert(
    engine: sa.Engine, db_url: str, smtp_server: FaultServer
) -> None:
    # 07:00 New York is inside 21:00-09:00.
    settings = arrival_settings(db_url, smtp_server, debounce_seconds=0, quiet_hours="21:00-09:00")
    reader = make_subscriber(engine, email="r@example.org")
    service = Service(engine, settings, clock=Clock(T0))
    store_alert(db_url, T0, "Gate closed")
    assert [i.recipients for i in service.watch_arrivals().made] == [1]
    await service.deliver_forever(drain=True)
    assert len(smtp_server.received_for(reader.email)) == 1


def test_upcoming_shows_on_arrival_and_what_waits(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILER_SECRET_KEY", SECRET)
    config = write_config(
        tmp_path / "mailer.toml", db_url, digests=[{**ON_ARRIVAL, "debounce_seconds": 15}]
    )
    now = datetime.now(UTC)
    store_alert(db_url, now, "Gate closed")
    result = CliRunner().invoke(
        cli, ["--config", str(config), "digest", "upcoming"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert "on arrival: an issue 15 s after the first new article" in result.output
    assert "Gate closed" in result.output
    as_json = CliRunner().invoke(
        cli,
        ["--config", str(config), "digest", "upcoming", "--format", "json"],
        catch_exceptions=False,
    )
    (alerts,) = json.loads(as_json.output)
    assert alerts["trigger"] == "on arrival" and alerts["debounce_seconds"] == 15
    assert alerts["slots"] == [] and [a["title"] for a in alerts["articles"]] == ["Gate closed"]


# -- real processes --------------------------------------------------------------------------


@pytest.mark.slow
def test_mailer_run_processes_send_an_added_article_once_to_each_reader(
    db_url: str, tmp_path: Path, smtp_server: FaultServer
) -> None:
    processes = 3 if db_url.startswith("postgresql") else 1
    log = tmp_path / "processes.log"
    log.touch()
    config = write_config(
        tmp_path / "mailer.toml",
        db_url,
        smtp={"host": "127.0.0.1", "port": smtp_server.port, "connections": 2, "timeout": 5},
        scheduler={"poll_seconds": 0.2, "catch_up": "none"},
        digests=[{**ON_ARRIVAL, "debounce_seconds": 1}],
    )
    engine = create_engine(db_url)
    readers = [make_subscriber(engine, email=f"r{n}@example.org").email for n in range(5)]
    article = tmp_path / "gate.md"
    published = datetime.now(UTC).isoformat(timespec="seconds")
    article.write_text(
        f'+++\ntitle = "Main gate closed"\ntopic = "base-alerts"\npublished = {published}\n'
        'summary = "The main gate is closed."\nwhy_it_matters = "Use the Sneads Ferry gate."\n'
        "+++\n\n"
        "The main gate is closed until further notice.\n",
        encoding="utf-8",
    )
    running_ = []
    try:
        with running(config, log, "run", "--no-web") as first:
            running_.append(first)
            for _ in range(processes - 1):
                running_.append(spawn(config, log, "run", "--no-web"))
            wait_for(
                lambda: log.read_text().count("service running") == processes,
                log,
                "the services to start",
            )
            added = spawn(config, log, "articles", "add", str(article), verbose=False)
            assert added.wait(timeout=60) == 0, log.read_text()
            wait_for(lambda: len(smtp_server.received) >= len(readers), log, "the alert")
            stop_all(running_, log)
    finally:
        for process in running_:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert [titles for _, titles in made(engine)] == [["Main gate closed"]]
    engine.dispose()
    copies = received_ids(smtp_server)
    assert Counter(to for to, _ in copies) == Counter(readers)
    assert set(copies.values()) == {1}
