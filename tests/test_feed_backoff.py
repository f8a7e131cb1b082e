"""A failing feed backs off: the wait doubles with each failure in a row, up to an hour, and one
success resets it. The clock is fixed (every ``now`` is given); the feed server is the real
local HTTP server of tests/test_feeds.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from mailer.content.feeds.backoff import MAX_DELAY, is_due, next_fetch_at, retry_delay
from mailer.content.feeds.state import FeedState, load_feed_states
from mailer.content.sources import fetch_sources
from mailer.db.engine import create_engine
from mailer.issues.progress import local_time
from mailer.service import Service
from tests.factories import NOW, SECRET, Clock, make_settings, write_config
from tests.test_feeds import FeedServer, feed, server  # noqa: F401  (the server fixture)

MINUTE = timedelta(minutes=1)
ROOT = Path(__file__).resolve().parent.parent


def failing(failures: int, *, at: timedelta = timedelta(0)) -> FeedState:
    return FeedState(
        url="https://news.example.org/feed.rss",
        etag=None,
        last_modified=None,
        last_status=503,
        last_fetched_at=NOW + at,
        last_success_at=None,
        last_error="HTTP 503",
        consecutive_failures=failures,
    )


@pytest.mark.parametrize(
    ("failures", "interval", "delay"),
    [
        (1, 5 * MINUTE, 5 * MINUTE),
        (2, 5 * MINUTE, 10 * MINUTE),
        (3, 5 * MINUTE, 20 * MINUTE),
        (7, 5 * MINUTE, 60 * MINUTE),  # 320 min, capped
        (1, 0 * MINUTE, 1 * MINUTE),  # fetched only by hand: one minute at least
        (2, 30 * MINUTE, 60 * MINUTE),
        (3, 30 * MINUTE, 60 * MINUTE),
        (1, 90 * MINUTE, 60 * MINUTE),  # an interval above the cap: the cap
        (7, 1 * MINUTE, 60 * MINUTE),  # 64 min, capped
        (6, 1 * MINUTE, 32 * MINUTE),
        (10_000, 5 * MINUTE, 60 * MINUTE),
    ],
)
def test_the_delay_doubles_from_the_interval_up_to_an_hour(
    failures: int, interval: timedelta, delay: timedelta
) -> None:
    assert retry_delay(failures, interval) == delay
    assert next_fetch_at(failing(failures), interval) == NOW + delay


def test_a_feed_that_did_not_fail_is_always_due() -> None:
    assert next_fetch_at(None, 5 * MINUTE) is None
    assert next_fetch_at(failing(0), 5 * MINUTE) is None
    assert is_due(failing(0), 5 * MINUTE, NOW)
    assert not is_due(failing(2), 5 * MINUTE, NOW + 9 * MINUTE)
    # A round starting a few seconds early still takes it.
    assert is_due(failing(2), 5 * MINUTE, NOW + 10 * MINUTE - timedelta(seconds=3))
    assert retry_delay(10**9, MINUTE) == MAX_DELAY


async def test_the_fetch_round_skips_a_feed_backing_off_and_a_success_resets_it(
    engine: sa.Engine,
    server: FeedServer,  # noqa: F811
) -> None:
    down = server.serve_file("/feeds/base-alerts.rss", "base-alerts.rss", status=503)
    settings = make_settings(
        sources=[feed(server, "/feeds/base-alerts.rss", "base-alerts")],
        feeds={"interval_minutes": 5},
    )

    async def round_at(offset: timedelta) -> str:
        (result,) = await fetch_sources(
            engine, settings, now=NOW + offset, read_timeout=2, honour_backoff=True
        )
        if result.backing_off_until is not None:
            assert result.error is None and result.ok  # skipped is not failed
            waited = result.backing_off_until - NOW
            return f"skipped until +{waited // MINUTE} min after {result.failures} failures"
        return result.error or "fetched"

    failed = "feed " + server.url("/feeds/base-alerts.rss") + ": HTTP 503 Service Unavailable"
    rounds = [(m, await round_at(m * MINUTE)) for m in (0, 5, 10, 15, 20, 25, 30, 35)]
    assert rounds == [
        (0, failed),  # 1st failure: wait 5 min
        (5, failed),  # 2nd: wait 10
        (10, "skipped until +15 min after 2 failures"),
        (15, failed),  # 3rd: wait 20
        (20, "skipped until +35 min after 3 failures"),
        (25, "skipped until +35 min after 3 failures"),
        (30, "skipped until +35 min after 3 failures"),
        (35, failed),
    ]
    assert len(server.requests("/feeds/base-alerts.rss")) == 4
    url = server.url("/feeds/base-alerts.rss")
    assert load_feed_states(engine)[url].consecutive_failures == 4  # next try at +75 min

    # Staff fetch at once regardless (`mailer articles fetch` does not honour the backoff) …
    down.status = 200
    (forced,) = await fetch_sources(engine, settings, now=NOW + 36 * MINUTE, read_timeout=2)
    assert (forced.error, forced.added) == (None, 4)
    # … and a success resets it: the next round fetches it again at once.
    state = load_feed_states(engine)[url]
    assert state.consecutive_failures == 0
    assert next_fetch_at(state, 5 * MINUTE) is None
    assert await round_at(41 * MINUTE) == "fetched"


def test_sources_shows_the_backoff_and_fetch_overrides_it(
    db_url: str,
    tmp_path: Path,
    server: FeedServer,  # noqa: F811
) -> None:
    down = server.serve_file("/feeds/base-alerts.rss", "base-alerts.rss", status=503)
    url = server.url("/feeds/base-alerts.rss")
    config = write_config(
        tmp_path / "mailer.toml",
        db_url,
        sources=[feed(server, "/feeds/base-alerts.rss", "base-alerts")],
        feeds={"interval_minutes": 5},
    )

    def mailer(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mailer", "--config", str(config), *args],
            cwd=ROOT,
            env=dict(os.environ, MAILER_SECRET_KEY=SECRET),
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert mailer("init").returncode == 0
    for _ in range(2):
        failed = mailer("articles", "fetch")
        assert failed.returncode != 0
        assert f"feed {url}: HTTP 503 Service Unavailable" in failed.stderr

    engine = create_engine(db_url)
    try:
        state = load_feed_states(engine)[url]
    finally:
        engine.dispose()
    assert state.last_fetched_at is not None
    shown = mailer("articles", "sources")
    assert shown.returncode == 0, shown.stderr
    due = local_time(state.last_fetched_at + 10 * MINUTE, "America/New_York")
    assert shown.stdout.splitlines() == [
        f"{url} (feed, topic base-alerts, private addresses allowed)",
        f"  last fetched: {local_time(state.last_fetched_at, 'America/New_York')} (HTTP 503)",
        "  last success: never",
        f"  next attempt: {due} (backing off after 2 failures)",
        f"  last error:   feed {url}: HTTP 503 Service Unavailable",
        "  hub:          no hub",
    ]

    down.status = 200
    fetched = mailer("articles", "fetch")
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout.splitlines() == [
        f"{url}: fetched although it had failed 2 times in a row (the scheduled round backs"
        " off; this command does not)",
        f"{url}: 4 added, 0 updated, 0 unchanged",
    ]
    assert "next attempt: next fetch round\n" in mailer("articles", "sources").stdout
    assert len(server.requests("/feeds/base-alerts.rss")) == 3


async def test_the_services_scheduled_round_backs_off(
    engine: sa.Engine,
    server: FeedServer,  # noqa: F811
) -> None:
    server.serve_file("/feeds/base-alerts.rss", "base-alerts.rss", status=503)
    settings = make_settings(
        sources=[feed(server, "/feeds/base-alerts.rss", "base-alerts")],
        feeds={"interval_minutes": 5, "timeout": 2},
    )
    clock = Clock(NOW)
    service = Service(engine, settings, clock=clock)
    fetched_at = []
    for minute in range(0, 40, 5):
        clock.value = NOW + minute * MINUTE
        before = len(server.seen)
        await service.fetch_sources()
        if len(server.seen) > before:
            fetched_at.append(minute)
    assert fetched_at == [0, 5, 15, 35]  # waits of 5, 10, 20 minutes
