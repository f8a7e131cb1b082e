"""[smtp].processes: more sending processes on one database, each message still sent once."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import threading
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa

from mailer.clock import now as clock_now
from mailer.compose.rendering import Renderer
from mailer.config.load import with_processes
from mailer.db.engine import create_engine, migrate
from mailer.db.schema import deliveries
from mailer.delivery.processes import Events, HelperExit, Helpers
from mailer.errors import ConfigError
from mailer.issues.create import create_issue
from tests.factories import make_settings, ready_to_send, write_config
from tests.smtp_server import Delay, FaultServer, smtp_server  # noqa: F401
from tests.test_service import process_log, spawn, wait_for  # noqa: F401

pytestmark = pytest.mark.slow

CONNECTIONS = 2


def prepare(
    db_url: str, tmp_path: Path, server: FaultServer, *, subscribers: int, **smtp: object
) -> tuple[Path, list[str]]:
    """Subscribers with one article waiting, each message held 20 ms by the server (one process
    alone takes seconds: the helper starts well before the end)."""
    emails = [f"r{n}@example.org" for n in range(subscribers)]
    config = ready_to_send(
        db_url,
        tmp_path / "mailer.toml",
        server,
        emails,
        hold=0.02,
        smtp={"connections": CONNECTIONS, "batch_size": 20, **smtp},
    )
    return config, emails


def statuses(db_url: str) -> Counter[str]:
    engine = create_engine(db_url)
    with engine.connect() as conn:
        found = Counter(conn.scalars(sa.select(deliveries.c.status)))
    engine.dispose()
    return found


def assert_each_received_once(server: FaultServer, emails: list[str]) -> None:
    got = Counter(r.recipients[0] for r in server.received)
    assert set(got) == set(emails) and max(got.values()) == 1


def test_digest_send_over_two_processes_sends_each_message_once(
    db_url: str,
    tmp_path: Path,
    smtp_server: FaultServer,  # noqa: F811
    process_log: Path,  # noqa: F811
) -> None:
    config, emails = prepare(db_url, tmp_path, smtp_server, subscribers=240)
    send = spawn(config, process_log, "digest", "send", "weekly", "--processes", "2")
    assert send.wait(timeout=120) == 0, process_log.read_text()
    log = process_log.read_text()
    assert "sent 240, deferred 0, bounced 0, failed 0, cancelled 0" in log
    assert "2 processes" in log
    assert_each_received_once(smtp_server, emails)
    assert statuses(db_url) == Counter({"sent": 240})
    # The helper's connections were open beside the parent's.
    assert smtp_server.max_concurrent > CONNECTIONS


def test_worker_processes_from_the_config_drain_every_due_delivery_once(
    db_url: str,
    tmp_path: Path,
    smtp_server: FaultServer,  # noqa: F811
    process_log: Path,  # noqa: F811
) -> None:
    config, emails = prepare(db_url, tmp_path, smtp_server, subscribers=240, processes=3)
    settings = make_settings(db_url)
    engine = create_engine(db_url)
    digest = settings.digests[0]
    moment = clock_now()
    create_issue(
        engine,
        settings,
        digest,
        scheduled_for=moment,
        now=moment,
        render_subject=Renderer().render_subject,
    )
    engine.dispose()
    worker = spawn(config, process_log, "worker", "--drain")
    assert worker.wait(timeout=120) == 0, process_log.read_text()
    assert "sent 240, deferred 0, bounced 0, failed 0" in process_log.read_text()
    assert_each_received_once(smtp_server, emails)
    assert smtp_server.max_concurrent > CONNECTIONS


def test_sigterm_stops_every_process_and_a_second_send_finishes_without_duplicates(
    db_url: str,
    tmp_path: Path,
    smtp_server: FaultServer,  # noqa: F811
    process_log: Path,  # noqa: F811
) -> None:
    config, emails = prepare(db_url, tmp_path, smtp_server, subscribers=200)
    send = spawn(config, process_log, "digest", "send", "weekly", "--processes", "2")
    wait_for(lambda: len(smtp_server.received) >= 40, process_log, "40 messages sent")
    send.send_signal(signal.SIGTERM)  # the parent only: it stops its helper itself
    assert send.wait(timeout=60) == 1, process_log.read_text()
    assert "error: issue 1 not finished: " in process_log.read_text()
    assert len(smtp_server.received) < len(emails), "the stop should land mid-issue"
    assert statuses(db_url)["sending"] == 0, "every lane finished the message it was on"
    again = spawn(config, process_log, "digest", "send", "weekly")
    assert again.wait(timeout=120) == 0, process_log.read_text()
    assert_each_received_once(smtp_server, emails)
    assert statuses(db_url) == Counter({"sent": len(emails)})


def test_a_killed_helper_is_reported_and_its_deliveries_are_taken_over_at_once(
    db_url: str,
    tmp_path: Path,
    smtp_server: FaultServer,  # noqa: F811
    process_log: Path,  # noqa: F811
) -> None:
    # The default lease (15 s): the parent sees that the helper is gone, without waiting.
    config, emails = prepare(db_url, tmp_path, smtp_server, subscribers=200)
    send = spawn(config, process_log, "digest", "send", "weekly", "--processes", "2")
    wait_for(
        lambda: (
            "sending processes started" in process_log.read_text()
            and len(smtp_server.received) >= 40
        ),
        process_log,
        "the helper to send",
    )
    line = next(
        ln for ln in process_log.read_text().splitlines() if "sending processes started" in ln
    )
    pid = int(line.split("pids=[", 1)[1].split("]", 1)[0])
    os.kill(pid, signal.SIGKILL)
    assert send.wait(timeout=120) == 1, process_log.read_text()
    assert f"sending process {pid} was killed by signal 9" in process_log.read_text()
    assert "took over the claims of workers that are gone" in process_log.read_text()
    got = Counter(r.recipients[0] for r in smtp_server.received)
    assert set(got) == set(emails), "nothing lost"
    assert sum(n - 1 for n in got.values()) <= CONNECTIONS, "at most one per helper connection"
    assert statuses(db_url) == Counter({"sent": len(emails)})


def test_processes_need_a_shared_database() -> None:
    with pytest.raises(ConfigError, match=r"\[smtp\]\.processes must be 1 with an in-memory"):
        make_settings("sqlite:///:memory:", smtp__processes=2)
    with pytest.raises(ConfigError, match=r"\[smtp\]\.processes"):
        make_settings("sqlite:////tmp/x.db", smtp__processes=0)


def test_processes_from_the_command_line_are_checked_naming_the_config_file(
    tmp_path: Path,
) -> None:
    settings = make_settings("sqlite:///:memory:", path=tmp_path / "mailer.toml")
    with pytest.raises(ConfigError) as raised:
        with_processes(settings, 2)
    assert str(raised.value).startswith(f"{tmp_path / 'mailer.toml'}: [smtp].processes")


def test_the_rate_holds_for_all_processes_together(
    db_url: str,
    tmp_path: Path,
    smtp_server: FaultServer,  # noqa: F811
    process_log: Path,  # noqa: F811
) -> None:
    config, emails = prepare(
        db_url, tmp_path, smtp_server, subscribers=120, rate_per_second=40, batch_size=10
    )
    send = spawn(config, process_log, "digest", "send", "weekly", "--processes", "2")
    assert send.wait(timeout=120) == 0, process_log.read_text()
    assert_each_received_once(smtp_server, emails)
    stamps = sorted(r.at for r in smtp_server.received)
    assert (len(stamps) - 1) / (stamps[-1] - stamps[0]) <= 40 * 1.05
    assert smtp_server.max_concurrent > CONNECTIONS  # both processes sent


def test_helper_exits_describe_themselves() -> None:
    assert HelperExit(7, 0).ok
    assert HelperExit(7, -9).describe() == "sending process 7 was killed by signal 9"
    assert HelperExit(7, 1).describe() == "sending process 7 exited with status 1"
    assert HelperExit(7, None).describe() == "sending process 7 did not stop"


def test_sigterm_to_a_worker_stops_its_helpers_cleanly(
    db_url: str,
    tmp_path: Path,
    smtp_server: FaultServer,  # noqa: F811
    process_log: Path,  # noqa: F811
) -> None:
    config, _ = prepare(db_url, tmp_path, smtp_server, subscribers=1)
    worker = spawn(config, process_log, "worker", "--processes", "3")
    wait_for(
        lambda: process_log.read_text().count("service running") == 3,
        process_log,
        "the worker and its two helpers to run",
    )
    line = next(
        ln for ln in process_log.read_text().splitlines() if "sending processes started" in ln
    )
    pids = [int(p) for p in line.split("pids=[", 1)[1].split("]", 1)[0].split(",")]
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0, process_log.read_text()
    log = process_log.read_text()
    assert "was killed" not in log and "exited with status" not in log, log
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _ended(pid: int) -> bool:
    """The process is gone, or a zombie left for whoever adopted it to reap."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def _helper_pids(log: Path) -> list[int]:
    line = next(ln for ln in log.read_text().splitlines() if "sending processes started" in ln)
    return [int(p) for p in line.split("pids=[", 1)[1].split("]", 1)[0].split(",")]


def test_no_helper_starts_when_the_database_is_not_initialized(
    tmp_path: Path,
    process_log: Path,  # noqa: F811
) -> None:
    # A database nobody migrated: `digest send` stops at its checks, before any helper starts.
    path = tmp_path / "new.db"
    config = write_config(tmp_path / "mailer.toml", f"sqlite:///{path}", smtp={"processes": 2})
    send = spawn(config, process_log, "digest", "send", "weekly")
    assert send.wait(timeout=60) == 1, process_log.read_text()
    log = process_log.read_text()
    assert f"the database {path} does not exist: run `mailer init`" in log, log
    assert "sending processes started" not in log
    assert not path.exists()


def test_helpers_waiting_for_their_job_end_when_the_command_is_killed(
    tmp_path: Path,
    smtp_server: FaultServer,  # noqa: F811
    process_log: Path,  # noqa: F811
) -> None:
    path = tmp_path / "held.db"
    engine = create_engine(f"sqlite:///{path}")
    migrate(engine)
    engine.dispose()
    config, _ = prepare(f"sqlite:///{path}", tmp_path, smtp_server, subscribers=3)
    # Another writer holds the database: the command waits to create the issue while its
    # helper waits for the issue.
    holder = sqlite3.connect(path, isolation_level=None, timeout=30)
    holder.execute("BEGIN IMMEDIATE")
    try:
        send = spawn(config, process_log, "digest", "send", "weekly", "--processes", "2")
        wait_for(
            lambda: "sending processes started" in process_log.read_text(),
            process_log,
            "the helper to start",
        )
        pids = _helper_pids(process_log)
        send.kill()
        send.wait(timeout=30)
        wait_for(
            lambda: all(_ended(p) for p in pids),
            process_log,
            "the orphaned helper to notice and end",
            timeout=10,
        )
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert statuses(f"sqlite:///{path}") == Counter(), "nothing was claimed or sent"
    assert smtp_server.received == []


def test_a_helper_killed_while_writing_an_event_ends_only_its_own_pipe(tmp_path: Path) -> None:
    # Each helper reports on a pipe of its own: one killed halfway through writing an event
    # (SIGKILL, the OOM killer) leaves a cut message and a closed pipe, which ends that pipe;
    # the other helpers' events still count, and the reading ends.
    settings = make_settings(f"sqlite:///{tmp_path / 'mailer.db'}", smtp__processes=3)
    helpers = Helpers(settings)
    ctx = multiprocessing.get_context("spawn")
    (cut_in, cut_out), (whole_in, whole_out) = ctx.Pipe(duplex=False), ctx.Pipe(duplex=False)
    helpers._event_pipes = [cut_in, whole_in]
    Events(whole_out).put(("done", 1, {"sent": 7}))
    whole_out.close()
    os.write(cut_out.fileno(), (1000).to_bytes(4, "big") + b"only the start")
    cut_out.close()
    reader = threading.Thread(target=helpers._read)
    reader.start()
    reader.join(timeout=60)  # a hang is what is tested, not a speed
    assert not reader.is_alive()
    assert helpers.report.counts == {"sent": 7}
