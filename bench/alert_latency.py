"""Alert latency: from the site's signed push of an alert to the first and the last message
accepted by the relay, at N readers.

For each database (SQLite, and a fresh PostgreSQL database on ``$MAILER_BENCH_PG``'s server,
dropped after), one ``mailer run`` (scheduler, delivery worker and web app) on a copy of a
database holding N active subscribers (``_lib.fresh_database``), every one of them made a
reader of the ``base-alerts`` topic who chose the ``alerts`` digest (``trigger = "arrival"``,
``debounce_seconds = 0``); Postfix's ``smtp-sink`` is the relay. Each run posts one new
article with ``priority: "alert"`` to ``POST /hooks/articles``, signed with the hook secret,
and times, from just before the POST, the sink's first and N-th accepted message (its own
counter line, stamped as it is read). Medians and min–max over ``--runs``.

Then, per run, where the time went, from the timestamps the service itself wrote: the
article's ``created_at`` (stored by the hook), the issue's ``created_at`` (made by the
arrival watch, recipients snapshotted in the same transaction), the first and last
delivery's ``sent_at`` (the worker recorded the relay's answer). Run from the repository
root::

    .venv/bin/python bench/alert_latency.py --readers 10000 --db both --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from _lib import (
    MAILER,
    WORK,
    Sink,
    _proc_cpu_seconds,
    bench_env,
    config_text,
    discard_database,
    ensure_postfix,
    free_port,
    fresh_database,
    load_avg,
    machine,
    postgres_cpu_seconds,
)

HOOK_SECRET = "bench-hook-secret-0123456789abcdef"
HOOK_ENV = "MAILER_BENCH_HOOK_SECRET"
# Stages, from the service's own timestamps (seconds after the POST started).
STAGES = ("stored", "poll", "issue made", "first sent", "last sent")
ISSUE_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) UTC INFO mailer\.issues\.arrival:"
    r" issue created on arrival .*issue=(\d+)"
)


def alert_config(
    db_url: str, sink_port: int, web_port: int, connections: int, processes: int
) -> str:
    """The benchmarks' config, with ``processes`` sending processes, the web app on
    ``web_port``, the hook secret and the arrival digest of the ``base-alerts`` topic (no
    debounce)."""
    text = config_text(db_url=db_url, smtp_port=sink_port, connections=connections)
    text = text.replace("[smtp]\n", f"[smtp]\nprocesses = {processes}\n", 1)
    return text + "\n".join(
        [
            "",
            "[web]",
            'host = "127.0.0.1"',
            f"port = {web_port}",
            "",
            "[hooks]",
            f'secret_env = "{HOOK_ENV}"',
            "",
            "[[digests]]",
            'key = "alerts"',
            'name = "Base alerts"',
            'subject = "Base alert"',
            'trigger = "arrival"',
            "debounce_seconds = 0",
            'topics = ["base-alerts"]',
            "max_articles = 5",
            "lookback_days = 2",
            "",
        ]
    )


def make_readers(db_url: str) -> int:
    """Every subscriber of the copy reads ``base-alerts`` and chose the alerts digest; the
    template's articles go (they would make a first alert issue as soon as the service starts).
    Returns the number of readers."""
    from mailer.db.engine import create_engine

    engine = create_engine(db_url)
    now = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM articles")
            conn.exec_driver_sql(
                "INSERT INTO subscriber_topics (subscriber_id, topic)"
                " SELECT id, 'base-alerts' FROM subscribers s WHERE NOT EXISTS"
                " (SELECT 1 FROM subscriber_topics t"
                "  WHERE t.subscriber_id = s.id AND t.topic = 'base-alerts')"
            )
            conn.exec_driver_sql(
                "INSERT INTO subscriber_digests (subscriber_id, digest, chosen_at)"
                " SELECT id, 'alerts', ? FROM subscribers"
                if engine.dialect.name == "sqlite"
                else "INSERT INTO subscriber_digests (subscriber_id, digest, chosen_at)"
                " SELECT id, 'alerts', %s FROM subscribers",
                (now if engine.dialect.name != "sqlite" else now.isoformat(sep=" "),),
            )
            readers = conn.exec_driver_sql(
                "SELECT count(*) FROM subscriber_digests WHERE digest = 'alerts'"
            ).scalar_one()
    finally:
        engine.dispose()
    return int(readers)


def alert_body(n: int) -> bytes:
    published = datetime.now(UTC).isoformat(timespec="seconds")
    return json.dumps(
        {
            "guid": f"https://news.example.org/alerts/gate-{n}-{time.time_ns()}",
            "title": f"Gate {n} closed",
            "topic": "base-alerts",
            "summary": f"Gate {n} is closed after a crash; use the main gate.",
            "why_it_matters": "Expect delays at the main gate.",
            "body": f"Gate {n} is closed until further notice.",
            "link": f"https://news.example.org/alerts/gate-{n}",
            "published": published,
            "priority": "alert",
        }
    ).encode()


def post(port: int, body: bytes) -> int:
    from mailer.web.hooks import HOOK_PATH, SIGNATURE_HEADER, sign

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{HOOK_PATH}",
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(HOOK_SECRET.encode(), body),
        },
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return int(answer.status)


def wait_until(condition: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.002)


def committed(log: Path, issue_id: int) -> datetime:
    """When the watch logged the issue made (committed, recipients snapshotted): the log
    line's own time stamp, to the millisecond."""
    for line in log.read_text().splitlines():
        if (match := ISSUE_LINE.match(line)) and int(match.group(3)) == issue_id:
            stamp = datetime.fromisoformat(match.group(1)).replace(tzinfo=UTC)
            return stamp.replace(microsecond=int(match.group(2)) * 1000)
    raise RuntimeError(f"no 'issue created on arrival' line for issue {issue_id} in {log}")


def stages(db_url: str, title: str, log: Path) -> dict[str, datetime]:
    """The service's own timestamps for the run's article, its issue and its deliveries:
    ``poll`` is the issue's ``created_at`` (the clock the watch's step read: when the poll saw
    the article), ``issue made`` the log line written once the issue and its snapshot were
    committed."""
    from mailer.db.engine import create_engine

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            stored = conn.exec_driver_sql(
                "SELECT created_at FROM articles WHERE title = ?"
                if engine.dialect.name == "sqlite"
                else "SELECT created_at FROM articles WHERE title = %s",
                (title,),
            ).scalar_one()
            issue_id, made = conn.exec_driver_sql(
                "SELECT id, created_at FROM issues WHERE digest = 'alerts' ORDER BY id DESC"
            ).first() or (None, None)
            first, last = conn.exec_driver_sql(
                f"SELECT min(sent_at), max(sent_at) FROM deliveries WHERE issue_id = {issue_id}"
            ).one()
    finally:
        engine.dispose()

    def utc(value: datetime | str) -> datetime:
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    return {
        "stored": utc(stored),
        "poll": utc(made),
        "issue made": committed(log, int(issue_id)),
        "first sent": utc(first),
        "last sent": utc(last),
    }


def measure(kind: str, args: argparse.Namespace) -> tuple[list[float], list[float], list[dict]]:
    url = fresh_database(kind, args.readers, f"alert_{kind}")
    firsts: list[float] = []
    lasts: list[float] = []
    breakdown: list[dict[str, float]] = []
    try:
        readers = make_readers(url)
        if readers != args.readers:
            raise RuntimeError(f"{readers} readers of the alerts digest, not {args.readers}")
        with Sink() as sink:
            sink.record = True
            web_port = free_port()
            config = WORK / f"alert-{kind}.toml"
            config.write_text(
                alert_config(url, sink.port, web_port, args.connections, args.processes),
                encoding="utf-8",
            )
            log = WORK / f"alert-{kind}.log"
            env = bench_env(**{HOOK_ENV: HOOK_SECRET})
            with log.open("wb") as out:
                service = subprocess.Popen(
                    [str(MAILER), "--config", str(config), "-v", "run"],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            try:
                wait_until(lambda: "service running" in log.read_text(), 60, "the service", log)
                for n in range(args.runs):
                    seen = sink.received
                    sink.stamps.clear()
                    body = alert_body(n)
                    cpu = (
                        _proc_cpu_seconds(service.pid),
                        postgres_cpu_seconds() if kind == "postgres" else 0.0,
                        sink.cpu_seconds(),
                    )
                    start_wall = time.time()
                    start = time.monotonic()
                    status = post(web_port, body)
                    if status != 201:
                        raise RuntimeError(f"the hook answered {status}")
                    wait_until(
                        lambda seen=seen: sink.received >= seen + readers,
                        120,
                        f"{readers} messages at the sink",
                        log,
                    )
                    stamps = list(sink.stamps)
                    first = next(t for t, count in stamps if count > seen)
                    last = next(t for t, count in stamps if count >= seen + readers)
                    firsts.append(first - start)
                    lasts.append(last - start)
                    at = stages(url, f"Gate {n} closed", log)
                    row = {k: (v.timestamp() - start_wall) for k, v in at.items()}
                    row["sink first"] = first - start
                    row["sink last"] = last - start
                    row["service CPU"] = _proc_cpu_seconds(service.pid) - cpu[0]
                    if kind == "postgres":
                        row["postgres CPU"] = postgres_cpu_seconds() - cpu[1]
                    row["sink CPU"] = sink.cpu_seconds() - cpu[2]
                    breakdown.append(row)
                    print(
                        f"  {kind} run {n + 1}: first {first - start:.3f} s,"
                        f" last {last - start:.3f} s; "
                        + ", ".join(f"{k} {v:.3f}" for k, v in row.items()),
                        file=sys.stderr,
                    )
            finally:
                service.send_signal(signal.SIGTERM)
                service.wait(timeout=60)
    finally:
        discard_database(url)
    return firsts, lasts, breakdown


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s ({min(values):.2f}–{max(values):.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--readers", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument(
        "--connections", type=int, default=8, help="[smtp].connections (default: the default, 8)"
    )
    parser.add_argument(
        "--processes", type=int, default=1, help="[smtp].processes (default: the default, 1)"
    )
    args = parser.parse_args(argv)
    ensure_postfix()
    WORK.mkdir(parents=True, exist_ok=True)
    print(
        f"{machine()}; load {load_avg()}; {args.readers:,} readers, {args.runs} runs,"
        f" {args.processes} process(es) x {args.connections} connections"
    )
    results = {}
    for kind in ("sqlite", "postgres") if args.db == "both" else (args.db,):
        results[kind] = measure(kind, args)
    print()
    print("| database | first message | last message |")
    print("|---|---:|---:|")
    for kind, (firsts, lasts, _) in results.items():
        print(f"| {kind} | {spread(firsts)} | {spread(lasts)} |")
    print()
    keys = (*STAGES, "sink first", "sink last", "service CPU", "postgres CPU", "sink CPU")
    print(
        "Seconds after the POST started, from the service's own timestamps, and CPU seconds"
        " spent from the POST to the last message (medians):"
    )
    print("| database | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for kind, (_, _, rows) in results.items():
        medians = [statistics.median(r.get(k, 0.0) for r in rows) for k in keys]
        print(f"| {kind} | " + " | ".join(f"{m:.3f}" for m in medians) + " |")
    print(f"load afterwards {load_avg()}")
    return 0


if __name__ == "__main__":
    os.chdir(Path(__file__).resolve().parent.parent)
    sys.exit(main())
