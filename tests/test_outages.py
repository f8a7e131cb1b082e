"""Outages: a PostgreSQL server of the test's own stopped mid-send, then started again.

Nothing is lost (every subscriber gets the issue; a duplicate only where a message's outcome
could not be recorded, at most one per connection), no traceback reaches the output, a worker
carries on by itself and a foreground ``digest send`` either finishes or, past
``[database].outage_wait_seconds``, exits 1 with one line.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mailer.db.engine import create_engine
from tests.factories import make_issue, make_settings, ready_to_send, write_config
from tests.pg_cluster import PgCluster, free_port, pg_cluster  # noqa: F401
from tests.smtp_server import Delay, FaultServer, smtp_server  # noqa: F401
from tests.test_processes import statuses
from tests.test_service import running, spawn, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CONNECTIONS = 2
# Two sending processes (the command and one helper): the helper must wait out an outage too.
PROCESSES = 2
SUBSCRIBERS = 200
# Each message is held this long by the server: the whole send takes about 2 s, so a stop
# after a quarter of it lands mid-send.
HOLD = 0.02


def prepare(url: str, tmp_path: Path, server: FaultServer, **database: object) -> Path:
    return ready_to_send(
        url,
        tmp_path / "mailer.toml",
        server,
        [f"r{n}@example.org" for n in range(SUBSCRIBERS)],
        hold=HOLD,
        smtp={"connections": CONNECTIONS, "batch_size": 20},
        **{f"database__{k}": v for k, v in database.items()},
    )


def outage_mid_send(cluster: PgCluster, server: FaultServer, log: Path, *, down: float) -> None:
    """Stop the cluster once a quarter of the list went out; start it ``down`` s later."""
    wait_for(lambda: len(server.received) >= SUBSCRIBERS // 4, log, "a quarter of the sends")
    cluster.stop()
    sent_before = len(server.received)
    time.sleep(down)  # the outage itself: what the processes must wait out
    assert len(server.received) < SUBSCRIBERS, "the send finished before the outage"
    # Nothing goes out while it is down but the messages already on the wire.
    assert len(server.received) - sent_before <= CONNECTIONS * PROCESSES
    cluster.start()


def assert_nothing_lost(server: FaultServer) -> None:
    got = Counter(r.recipients[0] for r in server.received)
    assert set(got) == {f"r{n}@example.org" for n in range(SUBSCRIBERS)}
    twice = [email for email, n in got.items() if n > 1]
    assert len(twice) <= CONNECTIONS * PROCESSES and max(got.values()) <= 2, twice


def test_a_worker_waits_out_a_database_outage_and_carries_on_by_itself(
    pg_cluster: PgCluster,  # noqa: F811
    tmp_path: Path,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    config = prepare(pg_cluster.url, tmp_path, smtp_server)
    engine = create_engine(pg_cluster.url)
    make_issue(engine, make_settings(pg_cluster.url), at=datetime.now(UTC))
    engine.dispose()
    log = tmp_path / "worker.log"
    with running(config, log, "worker", "--processes", str(PROCESSES)) as worker:
        outage_mid_send(pg_cluster, smtp_server, log, down=2)
        wait_for(
            lambda: statuses(pg_cluster.url) == Counter({"sent": SUBSCRIBERS}), log, "all sent"
        )
        assert worker.poll() is None, log.read_text()  # still running, by itself
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0, log.read_text()
    text = log.read_text()
    assert_nothing_lost(smtp_server)
    assert "Traceback" not in text, text
    # Logged once per process when it started, at ERROR, and once with its duration when it
    # ended (a process that was between batches may not have seen it).
    started = [line for line in text.splitlines() if "is unreachable; waiting" in line]
    assert 1 <= len(started) <= PROCESSES, text
    assert all(" ERROR " in line and "postgres@127.0.0.1" in line for line in started)
    ended = [line for line in text.splitlines() if "is reachable again after" in line]
    assert len(ended) == len(started) and all("seconds=" in line for line in ended), text


def test_digest_send_finishes_after_the_database_comes_back(
    pg_cluster: PgCluster,  # noqa: F811
    tmp_path: Path,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    config = prepare(pg_cluster.url, tmp_path, smtp_server, outage_wait_seconds=60)
    log = tmp_path / "send.log"
    with running(
        config, log, "digest", "send", "weekly", "--processes", str(PROCESSES), verbose=False
    ) as send:
        outage_mid_send(pg_cluster, smtp_server, log, down=2)
        assert send.wait(timeout=90) == 0, log.read_text()
    text = log.read_text()
    assert "Traceback" not in text, text
    assert f"sent {SUBSCRIBERS}, deferred 0" in text, text
    assert statuses(pg_cluster.url) == Counter({"sent": SUBSCRIBERS})
    assert_nothing_lost(smtp_server)


def test_digest_send_gives_up_after_outage_wait_seconds_with_one_line(
    pg_cluster: PgCluster,  # noqa: F811
    tmp_path: Path,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    config = prepare(pg_cluster.url, tmp_path, smtp_server, outage_wait_seconds=2)
    log = tmp_path / "send.log"
    with running(
        config, log, "digest", "send", "weekly", "--processes", str(PROCESSES), verbose=False
    ) as send:
        wait_for(lambda: len(smtp_server.received) >= SUBSCRIBERS // 4, log, "a quarter sent")
        pg_cluster.stop()
        started = time.monotonic()
        code = send.wait(timeout=60)
        waited = time.monotonic() - started
    text = log.read_text()
    assert code == 1, text
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    assert "was unreachable for 2 s" in errors[0] and "outage_wait_seconds = 2" in errors[0]
    assert 2 <= waited < 20, waited
    # Nothing lost: what was not recorded sent is still to be sent, nothing was given up on.
    pg_cluster.start()
    found = statuses(pg_cluster.url)
    assert sum(found.values()) == SUBSCRIBERS
    assert set(found) <= {"sent", "queued", "sending"}, found
    assert found["sent"] <= len(smtp_server.received) < SUBSCRIBERS


def test_digest_send_against_an_unreachable_database_is_one_line(
    tmp_path: Path,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    port = free_port()
    url = f"postgresql://mailer:hunter2@127.0.0.1:{port}/mailer"
    config = write_config(tmp_path / "mailer.toml", url)
    log = tmp_path / "send.log"
    send = spawn(
        config, log, "digest", "send", "weekly", "--processes", str(PROCESSES), verbose=False
    )
    assert send.wait(timeout=60) == 1
    text = log.read_text()
    assert text.count("\n") == 1 and "Traceback" not in text, text
    # The start check finds it before anything is made.
    where = f"postgresql://mailer:***@127.0.0.1:{port}/mailer"
    assert text.startswith(f"error: cannot reach the database {where}: "), text
    assert "Connection refused" in text
    assert "hunter2" not in text


def test_a_database_error_is_one_line_and_its_traceback_only_in_the_verbose_log(
    tmp_path: Path,
) -> None:
    database = tmp_path / "mailer.db"
    database.write_bytes(b"not a database\n" * 512)
    config = write_config(tmp_path / "mailer.toml", f"sqlite:///{database}")
    quiet = tmp_path / "quiet.log"
    assert spawn(config, quiet, "subscribers", "list", verbose=False).wait(timeout=60) == 1
    assert (
        quiet.read_text() == "error: the database refused the operation: file is not a database\n"
    )
    verbose = tmp_path / "verbose.log"
    assert spawn(config, verbose, "subscribers", "list").wait(timeout=60) == 1
    text = verbose.read_text()
    assert "INFO mailer.cli: the error below, traced" in text and "Traceback" in text
    assert text.splitlines()[-1] == quiet.read_text().strip()
