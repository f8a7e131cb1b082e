"""Scheduling lag: how long after its slot an issue exists, with one or several `mailer run`.

Starts P ``mailer run --no-web`` processes (default: 1 on SQLite, 3 on PostgreSQL) on one
fresh database with a digest every 2 seconds (``*/2 * * * * *``, UTC), a feeder publishing an
article every half second (so every issue has mail to send) and a recording SMTP server
(``tests.smtp_server.FaultServer``). After ``--duration`` seconds it sends SIGTERM to every
process and times their exit (each must exit 0), drains what is left with ``worker --drain``,
and reports for every issue:

* lag: ``issues.created_at − issues.scheduled_for`` (``created_at`` is the clock reading
  taken when the firing starts, the ``lag_s`` that ``fire`` logs);
* visible: first time this script saw the committed row (it polls every 10 ms) minus the
  slot, i.e. what a reader of the database observes;

plus the number of slots, that each has exactly one issue with no slot skipped, which process
created how many issues, and that no subscriber got any issue twice.

Run from the repository root (PostgreSQL: a database ``mailer_lag`` is created on the server
of ``--pg-url`` and dropped at the end)::

    .venv/bin/python -m bench.schedule_lag --db both --duration 60
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from mailer.content.article import ParsedArticle
from mailer.content.store import upsert_articles
from mailer.db.engine import create_engine, migrate
from mailer.db.schema import deliveries, issues
from tests.factories import SECRET, TOPICS, make_subscriber, write_config
from tests.smtp_server import FaultServer

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get(
    "MAILER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
PG_NAME = "mailer_lag"
PERIOD = timedelta(seconds=2)
DIGEST = {
    "key": "alerts",
    "name": "Alerts",
    "subject": "Base alerts",
    "schedule": "*/2 * * * * *",
    "timezone": "UTC",
    "topics": ["base-alerts"],
    "max_articles": 50,
}


@dataclass
class Outcome:
    db: str
    processes: int
    lags_ms: list[float] = field(default_factory=list)
    visible_ms: list[float] = field(default_factory=list)
    slots: int = 0
    duplicate_slots: int = 0
    missing_slots: list[datetime] = field(default_factory=list)
    first_slot_after_spawn_s: float = 0.0
    last_slot_before_stop_s: float = 0.0
    created_by: list[int] = field(default_factory=list)  # issues created, per process
    misfires: int = 0
    shutdown_s: list[float] = field(default_factory=list)
    exit_codes: list[int | None] = field(default_factory=list)
    deliveries: Counter[str] = field(default_factory=Counter)
    max_copies: int = 0
    messages: int = 0
    problems: list[str] = field(default_factory=list)


def spawn(config: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, MAILER_SECRET_KEY=SECRET)
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mailer", "--config", str(config), "-v", *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


class Feeder(threading.Thread):
    """Publishes an article every half second, so that every slot has something to send."""

    def __init__(self, engine: sa.Engine) -> None:
        super().__init__(name="feeder", daemon=True)
        self.engine = engine
        self.halt = threading.Event()

    def run(self) -> None:
        for n in itertools.count(1):
            if self.halt.wait(0.5):
                return
            now = datetime.now(UTC)
            article = ParsedArticle(
                guid=f"urn:bench:lag:{n}",
                topic="base-alerts",
                title=f"Alert {n}",
                summary="Summary.",
                why_it_matters="Why it matters.",
                body="Body.",
                link="https://news.example.org/a",
                published_at=now,
            )
            upsert_articles(self.engine, [article], now=now)


class Watcher(threading.Thread):
    """Records when each issue row first becomes visible to a reader (10 ms polling).

    On SQLite it reads through a plain read-only connection: the project's engines begin
    every transaction with BEGIN IMMEDIATE, and a poller must not take the write lock.
    """

    def __init__(self, url: str) -> None:
        super().__init__(name="watcher", daemon=True)
        self.url = url
        self.halt = threading.Event()
        self.seen: dict[int, datetime] = {}

    def run(self) -> None:
        if self.url.startswith("sqlite"):
            path = self.url.removeprefix("sqlite:///")
            raw = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
            try:
                while not self.halt.wait(0.01):
                    self._note(raw.execute("SELECT id FROM issues").fetchall())
            finally:
                raw.close()
            return
        engine = create_engine(self.url)
        try:
            with engine.connect() as conn:
                while not self.halt.wait(0.01):
                    self._note(conn.execute(sa.select(issues.c.id)).all())
                    conn.rollback()  # a new snapshot for the next poll
        finally:
            engine.dispose()

    def _note(self, rows: Sequence[Sequence[Any]]) -> None:
        now = datetime.now(UTC)
        for (issue_id,) in rows:
            self.seen.setdefault(issue_id, now)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def run(kind: str, args: argparse.Namespace, workdir: Path) -> Outcome:
    processes = args.processes or (1 if kind == "sqlite" else 3)
    outcome = Outcome(kind, processes)
    admin = None
    if kind == "sqlite":
        url = f"sqlite:///{workdir / 'lag.db'}"
    else:
        admin = create_engine(args.pg_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{PG_NAME}" WITH (FORCE)')
            conn.exec_driver_sql(f'CREATE DATABASE "{PG_NAME}"')
        url = args.pg_url.rsplit("/", 1)[0] + "/" + PG_NAME
    try:
        measure(url, outcome, args, workdir)
    finally:
        if admin is not None:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{PG_NAME}" WITH (FORCE)')
            admin.dispose()
    return outcome


def measure(url: str, outcome: Outcome, args: argparse.Namespace, workdir: Path) -> None:
    engine = create_engine(url)
    migrate(engine)
    now = datetime.now(UTC)
    for n in range(args.subscribers):
        make_subscriber(engine, email=f"r{n:03d}@example.org", topics=TOPICS, now=now)
    with FaultServer() as server:
        config = write_config(
            workdir / f"{outcome.db}.toml",
            url,
            smtp={"host": "127.0.0.1", "port": server.port, "connections": 2, "timeout": 5},
            scheduler={"poll_seconds": 0.5, "catch_up": "none"},
            digests=[DIGEST],
        )
        logs = [workdir / f"{outcome.db}-run-{i}.log" for i in range(outcome.processes)]
        feeder = Feeder(engine)
        watcher = Watcher(url)
        feeder.start()
        watcher.start()
        spawned_at = datetime.now(UTC)
        running = [spawn(config, log, "run", "--no-web") for log in logs]
        try:
            time.sleep(args.duration)
        finally:
            feeder.halt.set()
            feeder.join()
            stopped_at = datetime.now(UTC)
            outcome.shutdown_s, outcome.exit_codes = terminate(running)
            watcher.halt.set()
            watcher.join()
        drain_log = workdir / f"{outcome.db}-drain.log"
        drain = spawn(config, drain_log, "worker", "--drain")
        try:
            if drain.wait(timeout=120) != 0:
                outcome.problems.append(f"worker --drain failed: see {drain_log}")
        except subprocess.TimeoutExpired:
            drain.kill()
            drain.wait()
            outcome.problems.append("worker --drain did not finish in 120 s")
        parser = BytesHeaderParser()
        copies = Counter(
            (r.recipients[0], str(parser.parsebytes(r.data)["Message-ID"])) for r in server.received
        )
    with engine.connect() as conn:
        made = conn.execute(
            sa.select(issues.c.id, issues.c.scheduled_for, issues.c.created_at)
        ).all()
        outcome.deliveries = Counter(
            dict(
                conn.execute(
                    sa.select(deliveries.c.status, sa.func.count()).group_by(deliveries.c.status)
                ).all()
            )
        )
    engine.dispose()

    outcome.messages = sum(copies.values())
    outcome.max_copies = max(copies.values(), default=0)
    for row in made:
        outcome.lags_ms.append((row.created_at - row.scheduled_for).total_seconds() * 1000)
        seen = watcher.seen.get(row.id)
        if seen is not None:
            outcome.visible_ms.append((seen - row.scheduled_for).total_seconds() * 1000)
    per_slot = Counter(row.scheduled_for for row in made)
    slots = sorted(per_slot)
    outcome.slots = len(slots)
    outcome.duplicate_slots = sum(1 for n in per_slot.values() if n > 1)
    for a, b in itertools.pairwise(slots):
        gap = a + PERIOD
        while gap < b:
            outcome.missing_slots.append(gap)
            gap += PERIOD
    if slots:
        outcome.first_slot_after_spawn_s = (slots[0] - spawned_at).total_seconds()
        outcome.last_slot_before_stop_s = (stopped_at - slots[-1]).total_seconds()
    for log in logs:
        text = log.read_text(encoding="utf-8", errors="replace")
        outcome.created_by.append(text.count("issue created for slot"))
        outcome.misfires += text.count("was missed by") + text.count("maximum number of running")

    if not slots:
        outcome.problems.append("no issue was created")
    if outcome.duplicate_slots or outcome.missing_slots:
        outcome.problems.append(
            f"{outcome.duplicate_slots} slots with several issues, "
            f"{len(outcome.missing_slots)} slots skipped"
        )
    if outcome.last_slot_before_stop_s > PERIOD.total_seconds() + 1:
        outcome.problems.append("the slots before the stop have no issue")
    if any(code != 0 for code in outcome.exit_codes):
        outcome.problems.append(f"exit codes after SIGTERM: {outcome.exit_codes}")
    if outcome.max_copies > 1:
        outcome.problems.append("a subscriber got the same issue twice")
    if set(outcome.deliveries) - {"sent"}:
        outcome.problems.append(f"deliveries not all sent: {dict(outcome.deliveries)}")


def terminate(running: list[subprocess.Popen[bytes]]) -> tuple[list[float], list[int | None]]:
    """SIGTERM every process at once; seconds each took to exit, and the exit codes."""
    started = time.monotonic()
    for process in running:
        process.send_signal(signal.SIGTERM)
    took: list[float | None] = [None] * len(running)
    deadline = started + 60
    while any(t is None for t in took) and time.monotonic() < deadline:
        for i, process in enumerate(running):
            if took[i] is None and process.poll() is not None:
                took[i] = time.monotonic() - started
        time.sleep(0.005)
    codes: list[int | None] = []
    for process in running:
        if process.poll() is None:
            process.kill()
            process.wait()
            codes.append(None)
        else:
            codes.append(process.returncode)
    return [t if t is not None else float("inf") for t in took], codes


def report(o: Outcome) -> list[str]:
    def stats(values: list[float]) -> str:
        if not values:
            return "n/a"
        return (
            f"median {statistics.median(values):.1f} ms, p95 {percentile(values, 95):.1f} ms, "
            f"max {max(values):.1f} ms, min {min(values):.1f} ms"
        )

    ok = "yes" if not (o.duplicate_slots or o.missing_slots) else "NO"
    return [
        f"{o.db}: {o.processes} x `mailer run --no-web`, digest every 2 s",
        f"  slots: {o.slots} issues for {o.slots} slots; exactly one issue per slot, "
        f"none skipped: {ok} (first slot {o.first_slot_after_spawn_s:.1f} s after spawn, "
        f"last {o.last_slot_before_stop_s:.1f} s before SIGTERM)",
        f"  lag (created_at - scheduled_for): {stats(o.lags_ms)}",
        f"  visible (first seen by a 10 ms poller - scheduled_for): {stats(o.visible_ms)}",
        f"  issues created per process: {o.created_by}; APScheduler misfire/skip warnings: "
        f"{o.misfires}",
        f"  deliveries: {dict(o.deliveries)}; {o.messages} messages received, max copies of "
        f"one (recipient, Message-ID): {o.max_copies}",
        f"  SIGTERM -> exit: {', '.join(f'{s:.2f} s' for s in o.shutdown_s)}; "
        f"exit codes {o.exit_codes}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of running")
    parser.add_argument(
        "--processes", type=int, default=None, help="default: 1 on SQLite, 3 on PostgreSQL"
    )
    parser.add_argument("--subscribers", type=int, default=20)
    parser.add_argument("--pg-url", default=PG_ADMIN_URL, help="PostgreSQL admin database URL")
    parser.add_argument("--keep-logs", action="store_true")
    args = parser.parse_args(argv)

    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    workdir = Path(tempfile.mkdtemp(prefix="schedule-lag-"))
    outcomes = []
    for kind in kinds:
        outcome = run(kind, args, workdir)
        outcomes.append(outcome)
        print("\n".join(report(outcome)), flush=True)
        for problem in outcome.problems:
            print(f"  PROBLEM: {problem}", flush=True)
    failed = any(o.problems for o in outcomes)
    if failed or args.keep_logs:
        print(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
