"""Waiting out an outage, in process: logged once, given up on in time, stopped on request.

The database here is an SQLite file in a folder that does not exist yet ("unable to open
database file", an outage); creating the folder ends the outage.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from mailer.config.settings import SmtpSettings
from mailer.db.engine import create_engine, probe
from mailer.db.outages import DatabaseOutages
from mailer.delivery.policy import Outcome
from mailer.delivery.pool import SmtpPool
from mailer.devtools.sink import Sink
from mailer.errors import DatabaseUnavailable
from tests.factories import make_settings
from tests.pg_cluster import free_port

FAST = (0.01, 0.02)


def refused(url: str) -> DatabaseUnavailable:
    with pytest.raises(DatabaseUnavailable) as caught:
        probe(create_engine(url))
    return caught.value


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


async def until(condition: Callable[[], bool]) -> None:
    """Let the waiting task run until ``condition()`` holds (bounded)."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never held")


async def test_an_outage_is_logged_once_and_its_end_with_its_duration(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="mailer.db.outages")
    url = f"sqlite:///{tmp_path}/later/mailer.db"
    engine = create_engine(url)
    outages = DatabaseOutages(engine, backoff=FAST)
    error = refused(url)
    assert error.url == url and "unable to open database file" in error.reason
    # Two callers fail together (a group commit and a claim ahead): one outage, one probe loop.
    waits = [asyncio.create_task(outages.wait(error)) for _ in range(2)]
    await until(lambda: outages.log.failures >= 4)
    (tmp_path / "later").mkdir()
    await asyncio.wait_for(asyncio.gather(*waits), timeout=10)
    started = lines(caplog, "is unreachable; waiting for it to come back")
    ended = lines(caplog, "is reachable again after")
    assert [r.levelno for r in started] == [logging.ERROR]
    assert [r.levelno for r in ended] == [logging.WARNING]
    assert getattr(ended[0], "seconds", 0) > 0 and getattr(ended[0], "failures", 0) >= 4
    assert not outages.log.down
    engine.dispose()


async def test_a_wait_gives_up_after_its_limit_with_how_long_it_waited(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/never/mailer.db"
    engine = create_engine(url)
    outages = DatabaseOutages(engine, give_up_after=0.1, hint="try later", backoff=FAST)
    with pytest.raises(DatabaseUnavailable) as caught:
        await asyncio.wait_for(outages.wait(refused(url)), timeout=10)
    assert caught.value.waited is not None and caught.value.waited >= 0.1
    assert str(caught.value).startswith(f"the database at {url} was unreachable for 0 s: ")
    assert str(caught.value).endswith("(try later)")
    # Every later caller gets the same answer at once.
    with pytest.raises(DatabaseUnavailable):
        await asyncio.wait_for(outages.wait(refused(url)), timeout=0.05)
    engine.dispose()


async def test_a_stop_ends_the_wait(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/never/mailer.db"
    engine = create_engine(url)
    outages = DatabaseOutages(engine, backoff=(30, 30))
    stop = asyncio.Event()
    waiting = asyncio.create_task(outages.wait(refused(url), stop))
    await until(lambda: outages.log.down)
    stop.set()
    with pytest.raises(DatabaseUnavailable, match="stopped while waiting for it"):
        await asyncio.wait_for(waiting, timeout=5)
    engine.dispose()


def relay(port: int) -> SmtpSettings:
    return make_settings(smtp__port=port, smtp__connections=1, smtp__timeout=2).smtp


async def test_a_relay_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    sink = Sink("127.0.0.1", port, tmp_path / "mail")
    message = b"Subject: hi\r\n\r\nhello\r\n"
    async with SmtpPool(relay(port), local_hostname="client.test") as pool:
        down = [await pool.send("a@example.org", f"r{n}@example.org", message) for n in range(3)]
        await asyncio.to_thread(sink.start)
        try:
            up = await pool.send("a@example.org", "r3@example.org", message)
        finally:
            await asyncio.to_thread(sink.stop)
        again = await pool.send("a@example.org", "r4@example.org", message)
    assert [r.outcome for r in down] == [Outcome.DEFERRED] * 3
    assert up.outcome is Outcome.SENT and again.outcome is Outcome.DEFERRED
    started = lines(caplog, f"the SMTP relay at 127.0.0.1:{port} is unreachable")
    ended = lines(caplog, f"the SMTP relay at 127.0.0.1:{port} is reachable again after")
    # Two outages: each logged once at ERROR, the first one's end once with its duration.
    assert [r.levelno for r in started] == [logging.ERROR, logging.ERROR]
    assert len(ended) == 1 and getattr(ended[0], "failures", 0) == 3
    assert started[0].created <= ended[0].created <= started[1].created


async def test_a_relay_outage_writes_one_line_not_one_per_deferred_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    message = b"Subject: hi\r\n\r\nhello\r\n"
    async with SmtpPool(relay(port), local_hostname="client.test") as pool:
        results = [await pool.send("a@example.org", f"r{n}@example.org", message) for n in range(5)]
    assert [r.outcome for r in results] == [Outcome.DEFERRED] * 5
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == [
        f"the SMTP relay at 127.0.0.1:{port} is unreachable; deliveries are deferred"
        " until it answers"
    ]
