"""Crash recovery: time from ``kill -9`` of ``mailer digest send`` to the issue complete.

Per database and trial: a fresh copy of a database holding N subscribers (bench/_lib.py), the
example config (config.example.toml: every value as shipped, only the database URL and the
SMTP host and port replaced), and the recording aiosmtpd server of tests/smtp_server.py. A
``mailer digest send weekly`` subprocess is killed with SIGKILL once a random 20-80 % of the
issue has been received; at once a second ``mailer digest send weekly`` is started. Measured
from the kill: the issue marked sent in the database, and the second command's exit (with its
status). Two cases:

* ``same-host``: the second command runs where the first did; it sees that the process named
  by the dead claims is gone and takes them over at once;
* ``other-host``: the dead claims are renamed, at the kill, to an owner on another host (as if
  the killed process ran on another machine): they come back only when their lease ends
  (``[smtp].lease_seconds``, renewed every third of it while the owner lived).

Every trial checks that each subscriber got the issue, and counts duplicates (at most one per
open connection: ``[smtp].connections``).

    .venv/bin/python bench/recovery.py --db both --subscribers 2000 --trials 3
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from _lib import (
    PYTHON,
    ROOT,
    SECRET,
    WORK,
    discard_database,
    fresh_database,
    load_avg,
    machine,
)

sys.path.insert(0, str(ROOT))  # tests.smtp_server, the recording server

import sqlalchemy as sa

from mailer.db.engine import create_engine
from mailer.db.schema import deliveries, issues
from tests.smtp_server import FaultServer


@dataclass
class Trial:
    db: str
    case: str
    received_at_kill: int
    to_complete: float  # s from the kill to the issue marked sent
    to_exit: float  # s from the kill to the second command's exit
    exit_code: int
    lost: int
    duplicates: int


def example_config(path: Path, db_url: str, port: int) -> Path:
    """config.example.toml with only [database].url and [smtp] host/port replaced."""
    text = (ROOT / "config.example.toml").read_text(encoding="utf-8")
    section = ""
    lines = []
    for line in text.splitlines():
        if line.startswith("["):
            section = line.strip()
        if section == "[database]" and re.match(r"url\s*=", line):
            line = f'url = "{db_url}"'
        elif section == "[smtp]" and re.match(r"host\s*=", line):
            line = 'host = "127.0.0.1"'
        elif section == "[smtp]" and re.match(r"port\s*=", line):
            line = f"port = {port}"
        lines.append(line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def spawn(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(PYTHON), "-m", "mailer", "--config", str(config), "digest", "send", "weekly"],
            cwd=ROOT,
            env=dict(os.environ, MAILER_SECRET_KEY=SECRET),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def run_trial(kind: str, case: str, n: int, number: int, rng: random.Random) -> Trial:
    url = fresh_database(kind, n, f"recovery_{number}")
    log = WORK / f"recovery-{kind}-{case}-{number}.log"
    log.unlink(missing_ok=True)
    engine = create_engine(url)
    try:
        with FaultServer() as server:
            config = example_config(WORK / "recovery.toml", url, server.port)
            target = int(n * rng.uniform(0.2, 0.8))
            first = spawn(config, log)
            while len(server.received) < target and first.poll() is None:
                time.sleep(0.001)
            first.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            first.wait()
            at_kill = len(server.received)
            if case == "other-host":
                with engine.begin() as conn:
                    conn.execute(
                        deliveries.update()
                        .where(deliveries.c.lease_owner.is_not(None))
                        .values(lease_owner="other-host.example:4242")
                    )
            second = spawn(config, log)
            complete = None
            while second.poll() is None or complete is None:
                if complete is None:
                    with engine.connect() as conn:
                        status = conn.scalar(sa.select(issues.c.status).limit(1))
                    if status == "sent":
                        complete = time.monotonic() - killed
                    elif second.poll() is not None:
                        complete = float("nan")
                time.sleep(0.02)
            exited = time.monotonic() - killed
            got = Counter(r.recipients[0] for r in server.received)
    finally:
        engine.dispose()
        discard_database(url)
    expected = {f"reader{i}@example.org" for i in range(n)}
    if second.returncode != 0:
        print(f"  second send exited {second.returncode}; log: {log}", file=sys.stderr)
    else:
        log.unlink(missing_ok=True)
    return Trial(
        kind,
        case,
        at_kill,
        complete,
        exited,
        second.returncode,
        len(expected - set(got)),
        sum(c - 1 for c in got.values()),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--case", choices=["same-host", "other-host", "both"], default="both")
    parser.add_argument("--subscribers", type=int, default=2000)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seed", type=int, default=12)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    cases = ["same-host", "other-host"] if args.case == "both" else [args.case]
    print(f"{machine()}; load {load_avg()}; {args.subscribers} subscribers; example config")
    trials: list[Trial] = []
    for kind in kinds:
        for case in cases:
            for number in range(1, args.trials + 1):
                t = run_trial(kind, case, args.subscribers, number, rng)
                trials.append(t)
                print(
                    f"{kind:8} {case:10} #{number}: killed at {t.received_at_kill} received; "
                    f"complete {t.to_complete:.2f} s, second send exited {t.exit_code} at "
                    f"{t.to_exit:.2f} s; lost {t.lost}, duplicates {t.duplicates}",
                    flush=True,
                )
    print()
    print(f"{'db':8} {'case':10} {'complete s (median, max)':>25} {'exit s':>8} {'dup max':>7}")
    for kind in kinds:
        for case in cases:
            ts = [t for t in trials if t.db == kind and t.case == case]
            done = [t.to_complete for t in ts]
            print(
                f"{kind:8} {case:10} {statistics.median(done):>15.2f} {max(done):>9.2f} "
                f"{statistics.median(t.to_exit for t in ts):>8.2f} "
                f"{max(t.duplicates for t in ts):>7}"
            )
    bad = [t for t in trials if t.lost or t.exit_code != 0]
    print(f"\n{len(bad)} trials lost mail or exited non-zero" if bad else "\nnothing lost")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
