"""Real processes: several `mailer run` on one database, and a worker killed with SIGKILL."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.parser import BytesHeaderParser
from pathlib import Path

import pytest
import sqlalchemy as sa

from mailer.compose.rendering import render_subject
from mailer.content import articles
from mailer.db.engine import create_engine
from mailer.db.schema import deliveries, issues
from mailer.issues.store import create_issue
from mailer.service import Service
from tests.factories import NOW, SECRET, article, make_settings, make_subscriber, write_config
from tests.smtp_server import Delay, FaultServer, smtp_server  # noqa: F401

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def spawn(config: Path, log: Path, *args: str, verbose: bool = True) -> subprocess.Popen[bytes]:
    """``mailer`` with ``args`` (and ``-v`` unless not ``verbose``), its output in ``log``."""
    env = dict(os.environ, MAILER_SECRET_KEY=SECRET)
    flags = ["-v"] if verbose else []
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "mailer", "--config", str(config), *flags, *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@contextlib.contextmanager
def running(
    config: Path, log: Path, *args: str, verbose: bool = True
) -> Iterator[subprocess.Popen[bytes]]:
    """``spawn`` for the block; a process still running when the block ends is killed (a
    failed assertion must not leave it behind)."""
    process = spawn(config, log, *args, verbose=verbose)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def stop_all(processes: list[subprocess.Popen[bytes]], log: Path) -> None:
    """SIGTERM every process, then require each to exit 0 promptly; none is left running."""
    for process in processes:
        process.send_signal(signal.SIGTERM)
    codes = []
    try:
        for process in processes:
            codes.append(process.wait(timeout=30))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert codes == [0] * len(processes), log.read_text()


def issue_count(engine: sa.Engine) -> int:
    """How many issues the database holds."""
    with engine.connect() as conn:
        return conn.scalar(sa.select(sa.func.count()).select_from(issues)) or 0


def wait_for(condition: Callable[[], bool], log: Path, what: str, timeout: float = 90) -> None:
    """Poll until ``condition`` holds; a slow machine only makes this slower, not fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()}")
        time.sleep(0.02)


class Feeder(threading.Thread):
    """Publishes an article every half second, so that every slot has something to send."""

    def __init__(self, engine: sa.Engine) -> None:
        super().__init__(name="feeder", daemon=True)
        self.engine = engine
        self.halt = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.halt.wait(0.5):
            n += 1
            now = datetime.now(UTC)
            articles.upsert_articles(self.engine, [article(n, now)], now=now)


def received_ids(server: FaultServer) -> Counter[tuple[str, str]]:
    """(recipient, Message-ID) → copies received."""
    parser = BytesHeaderParser()
    return Counter(
        (r.recipients[0], str(parser.parsebytes(r.data)["Message-ID"])) for r in server.received
    )


@pytest.fixture
def process_log(tmp_path: Path) -> Iterator[Path]:
    log = tmp_path / "processes.log"
    log.touch()
    yield log


def test_processes_on_one_database_make_each_issue_once_and_mail_each_subscriber_once(
    db_url: str,
    tmp_path: Path,
    smtp_server: FaultServer,  # noqa: F811
    process_log: Path,
) -> None:
    processes = 3 if db_url.startswith("postgresql") else 1
    digest = {
        "key": "alerts",
        "name": "Alerts",
        "subject": "Base alerts",
        "schedule": "*/2 * * * * *",
        "timezone": "UTC",
        "topics": ["base-alerts"],
        "max_articles": 50,
    }
    config = write_config(
        tmp_path / "mailer.toml",
        db_url,
        smtp={"host": "127.0.0.1", "port": smtp_server.port, "connections": 2, "timeout": 5},
        scheduler={"poll_seconds": 0.2, "catch_up": "none"},
        digests=[digest],
    )
    engine = create_engine(db_url)
    for n in range(10):
        make_subscriber(engine, email=f"r{n}@example.org")
    feeder = Feeder(engine)
    feeder.start()
    running = [spawn(config, process_log, "run", "--no-web") for _ in range(processes)]
    try:
        wait_for(
            lambda: process_log.read_text().count("service running") == processes,
            process_log,
            "the services to start",
        )
        # Long enough for three slots after the first, whatever the machine's speed.
        wait_for(lambda: issue_count(engine) >= 4, process_log, "four issues")
    finally:
        feeder.halt.set()
        feeder.join()
        stop_all(running, process_log)
    drain = spawn(config, process_log, "worker", "--drain")
    assert drain.wait(timeout=60) == 0, process_log.read_text()

    with engine.connect() as conn:
        made = conn.execute(
            sa.select(issues.c.id, issues.c.scheduled_for, issues.c.created_at)
        ).all()
        rows = conn.execute(sa.select(deliveries.c.message_id, deliveries.c.status)).all()
    engine.dispose()
    slots = sorted(r.scheduled_for for r in made)
    assert len(slots) >= 3
    assert len(set(slots)) == len(slots)
    # No slot was skipped between the first and the last.
    assert all(b - a == timedelta(seconds=2) for a, b in itertools.pairwise(slots))
    assert rows and all(status == "sent" for _, status in rows)
    copies = received_ids(smtp_server)
    assert {mid for _, mid in copies} == {mid for mid, _ in rows}
    assert max(copies.values()) == 1, "a subscriber got the same issue twice"


@pytest.mark.parametrize("in_doubt", ["resend", "hold"])
def test_a_worker_killed_mid_issue_loses_nothing_and_duplicates_at_most_one_per_connection(
    db_url: str,
    tmp_path: Path,
    smtp_server: FaultServer,  # noqa: F811
    process_log: Path,
    in_doubt: str,
) -> None:
    connections = 3
    config = write_config(
        tmp_path / "mailer.toml",
        db_url,
        smtp={
            "host": "127.0.0.1",
            "port": smtp_server.port,
            "connections": connections,
            "timeout": 5,
            "lease_seconds": 5,
            "in_doubt": in_doubt,
            "batch_size": 50,
        },
    )
    settings = make_settings(db_url)
    engine = create_engine(db_url)
    articles.upsert_articles(engine, [article(1, NOW - timedelta(hours=1))], now=NOW)
    emails = [f"r{n}@example.org" for n in range(150)]
    for email in emails:
        make_subscriber(engine, email=email)
        smtp_server.script(email, [Delay(0.01)], stage="data")
    issue = create_issue(
        engine,
        settings,
        settings.digests[0],
        scheduled_for=NOW,
        now=NOW,
        render_subject=render_subject,
    )
    worker = spawn(config, process_log, "worker", "--drain")
    try:
        wait_for(lambda: len(smtp_server.received) >= 60, process_log, "60 messages sent")
    finally:
        worker.kill()
        worker.wait()
    assert 0 < len(smtp_server.received) < len(emails), "the kill should land mid-issue"
    # No wait for the lease: the dead worker's claims are taken over at once.
    again = spawn(config, process_log, "worker", "--drain")
    code = again.wait(timeout=60)

    with engine.connect() as conn:
        statuses = Counter(
            conn.scalars(
                sa.select(deliveries.c.status).where(deliveries.c.issue_id == issue.issue_id)
            )
        )
    engine.dispose()
    got = Counter(r.recipients[0] for r in smtp_server.received)
    duplicates = sum(n - 1 for n in got.values())
    if in_doubt == "resend":
        assert code == 0, process_log.read_text()
        assert set(got) == set(emails), "every recipient has the message"
        assert statuses == Counter({"sent": len(emails)})
        assert duplicates <= connections
    else:
        assert duplicates == 0
        assert statuses["unknown"] <= connections
        assert statuses["sent"] + statuses["unknown"] == len(emails)
        missing = set(emails) - set(got)
        assert len(missing) <= statuses["unknown"], "only held deliveries may be missing"
        # Held deliveries are not final: the drain says so.
        assert code == (1 if statuses["unknown"] else 0), process_log.read_text()
        if statuses["unknown"]:
            assert f"{statuses['unknown']} unknown" in process_log.read_text()


@pytest.mark.parametrize(
    ("scheduler", "expected_days"),
    [({}, [27]), ({"catch_up": "all", "catch_up_hours": 24 * 30}, [13, 20, 27])],
    ids=["latest-by-default", "all-in-window"],
)
def test_catch_up_creates_missed_slots_at_start(
    db_url: str, scheduler: dict[str, object], expected_days: list[int]
) -> None:
    settings = make_settings(db_url, scheduler=scheduler)
    engine = create_engine(db_url)
    make_subscriber(engine)
    last = datetime(2026, 11, 6, 12, tzinfo=UTC)  # a Friday slot: 07:00 in New York
    create_issue(
        engine,
        settings,
        settings.digests[0],
        scheduled_for=last,
        now=NOW,
        render_subject=render_subject,
    )
    service = Service(engine, settings, clock=lambda: datetime(2026, 11, 28, tzinfo=UTC))
    made = service.catch_up()
    again = service.catch_up()
    with engine.connect() as conn:
        slots = sorted(conn.scalars(sa.select(issues.c.scheduled_for)))
    engine.dispose()
    assert all(m.created for m in made) and len(made) == len(expected_days)
    assert again == []
    assert slots == [last] + [datetime(2026, 11, d, 12, tzinfo=UTC) for d in expected_days]
