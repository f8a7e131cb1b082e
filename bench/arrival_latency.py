"""Arrival latency: from `mailer articles add` to the first alert accepted by a local SMTP server.

Starts one ``mailer run --no-web`` on a fresh database (SQLite, or PostgreSQL database
``mailer_arrival`` on the server of ``--pg-url``, dropped at the end) with an arrival digest
(``trigger = "arrival"``, ``debounce_seconds`` from ``--debounce``, default 0), a few
subscribers of its topic and a recording SMTP server (``tests.smtp_server.FaultServer``). Each
run writes one new article file and times, from just before ``mailer articles add`` starts:

* stored: the ``articles add`` process exited (the row is committed);
* first message: the SMTP server accepted the first alert of that article, from the start
  and from the article's ``created_at`` (its arrival: the watch's poll, the issue, the send).

Then it times the watch's poll itself (``ArrivalWatch.step`` with nothing new, in process,
on the same database): the cost each ``mailer run`` pays every ``POLL_SECONDS``.
It prints medians over ``--runs``. Run from the repository root::

    .venv/bin/python -m bench.arrival_latency --db both --runs 5
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from mailer.compose.rendering import Renderer
from mailer.config.load import load_settings
from mailer.db.engine import create_engine, migrate
from mailer.db.schema import articles
from mailer.issues.arrival import POLL_SECONDS, ArrivalWatch
from tests.factories import SECRET, make_subscriber, write_config
from tests.smtp_server import FaultServer

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get(
    "MAILER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
PG_NAME = "mailer_arrival"
READERS = 5
POLLS = 200


def mailer(config: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, MAILER_SECRET_KEY=SECRET)
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mailer", "--config", str(config), *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def article_file(path: Path, n: int) -> Path:
    published = datetime.now(UTC).isoformat(timespec="seconds")
    path.write_text(
        f'+++\ntitle = "Gate {n} closed"\ntopic = "base-alerts"\npublished = {published}\n'
        f'summary = "Gate {n} is closed."\nwhy_it_matters = "Use another gate."\n+++\n\n'
        f"Gate {n} is closed until further notice.\n",
        encoding="utf-8",
    )
    return path


def wait_until(condition: Callable[[], bool], timeout: float, what: str, log: Path) -> float:
    """Poll ``condition`` every millisecond; the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}:\n{log.read_text()}")
        time.sleep(0.001)
    return time.monotonic()


def measure(url: str, args: argparse.Namespace, workdir: Path) -> tuple[list[float], ...]:
    engine = create_engine(url)
    migrate(engine)
    for n in range(READERS):
        make_subscriber(engine, email=f"r{n}@example.org")
    stored: list[float] = []
    first: list[float] = []
    after: list[float] = []  # from the article's created_at (its arrival) to the message
    with FaultServer() as server:
        config = write_config(
            workdir / "mailer.toml",
            url,
            smtp={"host": "127.0.0.1", "port": server.port, "connections": 2, "timeout": 5},
            scheduler={"poll_seconds": 1, "catch_up": "none"},
            digests=[
                {
                    "key": "alerts",
                    "name": "Base alerts",
                    "subject": "Base alert",
                    "trigger": "arrival",
                    "debounce_seconds": args.debounce,
                    "topics": ["base-alerts"],
                    "max_articles": 5,
                    "lookback_days": 2,
                }
            ],
        )
        log = workdir / "run.log"
        log.touch()
        service = mailer(config, log, "-v", "run", "--no-web")
        try:
            wait_until(lambda: "service running" in log.read_text(), 60, "the service", log)
            for n in range(args.runs):
                seen = len(server.received)
                path = article_file(workdir / f"gate-{n}.md", n)
                start = time.monotonic()
                added = mailer(config, log, "articles", "add", str(path))
                if added.wait(timeout=60) != 0:
                    raise RuntimeError(f"articles add failed:\n{log.read_text()}")
                stored.append(time.monotonic() - start)
                wait_until(lambda seen=seen: len(server.received) > seen, 60, "the alert", log)
                accepted = server.received[seen].at  # the server's own monotonic stamp
                first.append(accepted - start)
                wall = time.time() - (time.monotonic() - accepted)
                after.append(wall - arrived(engine, f"Gate {n} closed").timestamp())
                # Every reader's copy, before the next run starts.
                wait_until(
                    lambda seen=seen: len(server.received) >= seen + READERS, 60, "all copies", log
                )
        finally:
            service.send_signal(signal.SIGTERM)
            service.wait(timeout=30)
    polls = poll_cost(engine, config)
    engine.dispose()
    return stored, first, after, polls


def arrived(engine: sa.Engine, title: str) -> datetime:
    """The article's ``created_at``: the clock reading ``articles add`` stored it with."""
    with engine.connect() as conn:
        return conn.execute(
            sa.select(articles.c.created_at).where(articles.c.title == title)
        ).scalar_one()


def poll_cost(engine: sa.Engine, config: Path) -> list[float]:
    """Seconds per watch step with nothing new (what every poll costs), ``POLLS`` times."""
    settings = load_settings(config, env={"MAILER_SECRET_KEY": SECRET})
    watch = ArrivalWatch(
        engine,
        settings,
        render_subject=Renderer().render_subject,
        retry_seconds=30,
        retry_max_seconds=600,
        shown=str,
    )
    times = []
    for _ in range(POLLS):
        now = datetime.now(UTC)
        start = time.perf_counter()
        step = watch.step(now)
        times.append(time.perf_counter() - start)
        assert not step.made
    return times


def run(kind: str, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="arrival-") as tmp:
        workdir = Path(tmp)
        if kind == "sqlite":
            url = f"sqlite:///{workdir / 'mailer.db'}"
            results = measure(url, args, workdir)
        else:
            admin = create_engine(args.pg_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{PG_NAME}" WITH (FORCE)')
                conn.exec_driver_sql(f'CREATE DATABASE "{PG_NAME}"')
            try:
                results = measure(args.pg_url.rsplit("/", 1)[0] + "/" + PG_NAME, args, workdir)
            finally:
                with admin.connect() as conn:
                    conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{PG_NAME}" WITH (FORCE)')
                admin.dispose()
    stored, first, after, polls = results
    print(
        f"{kind}: debounce {args.debounce} s, {args.runs} runs:"
        f" articles add stored in {statistics.median(stored):.3f} s (median),"
        f" first message accepted {statistics.median(first):.3f} s after it started"
        f" (median; min {min(first):.3f}, max {max(first):.3f}),"
        f" {statistics.median(after):.3f} s after its arrival (created_at; median);"
        f" one poll {statistics.median(polls) * 1000:.2f} ms (median of {POLLS},"
        f" every {POLL_SECONDS} s)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--debounce", type=int, default=0)
    parser.add_argument("--pg-url", default=PG_ADMIN_URL)
    args = parser.parse_args(argv)
    for kind in ("sqlite", "postgres") if args.db == "both" else (args.db,):
        run(kind, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
