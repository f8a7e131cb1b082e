"""Crash bound: kill -9 a delivering worker mid-issue, many times, and count what it cost.

Per trial: a fresh database (copied from a migrated template holding N subscribers and one
article), one issue created for all of them, a ``mailer worker --drain`` subprocess sending
over C connections to a recording aiosmtpd server (``tests.smtp_server.FaultServer``) that
holds every message a few milliseconds at the end of DATA, so the kill lands mid-issue.
When a random share of the issue has been received, the worker gets SIGKILL; the database is
read at once (rows left ``sending``: in flight at the kill); after the lease expires a second
``worker --drain`` finishes the issue. Then, per trial:

* lost: subscribers with no copy whose delivery is not held as ``unknown`` (must be 0);
* duplicates: copies received beyond the first (``resend`` policy);
* unknown: deliveries held as ``unknown`` (``hold`` policy);
* in flight at kill: ``sending`` rows right after the kill (the design bounds it by C).

Run from the repository root (PostgreSQL: a database ``mailer_crash`` and its template are
created on the server of ``--pg-url`` and dropped at the end)::

    .venv/bin/python -m bench.crash_bound --db both --policy both --trials 20
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from mailer.compose.rendering import Renderer
from mailer.content.article import ParsedArticle
from mailer.content.store import upsert_articles
from mailer.db.engine import create_engine, migrate
from mailer.db.schema import deliveries, subscribers
from mailer.issues.create import create_issue
from tests.factories import SECRET, TOPICS, make_settings, make_subscriber, write_config
from tests.smtp_server import Delay, FaultServer

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get(
    "MAILER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
PG_NAME = "mailer_crash"


@dataclass
class Trial:
    db: str
    policy: str
    number: int
    target: int  # messages received when the kill was due
    received_at_kill: int = 0
    in_flight: int = 0  # rows `sending` right after the kill
    killed_mid_issue: bool = True
    lost: int = 0
    duplicates: int = 0
    unknown: int = 0
    unknown_delivered: int = 0  # held as unknown, yet the server had accepted it
    message_id_changed: int = 0  # a re-send that carried another Message-ID (must be 0)
    other_status: int = 0  # deliveries neither sent nor unknown at the end (must be 0)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- databases


class Databases:
    """Fresh databases from a template: a copied SQLite file, or CREATE DATABASE … TEMPLATE."""

    def __init__(self, kind: str, workdir: Path, subscribers: int, pg_admin_url: str) -> None:
        self.kind = kind
        self.workdir = workdir
        self.pg_admin_url = pg_admin_url
        self.emails = [f"r{n:04d}@example.org" for n in range(subscribers)]
        self.admin: sa.Engine | None = None
        if kind == "sqlite":
            self.template = workdir / "template.db"
            self._populate(f"sqlite:///{self.template}")
        else:
            self.admin = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
            self._drop(PG_NAME, PG_NAME + "_tpl")
            with self.admin.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{PG_NAME}_tpl"')
            self._populate(self._pg_url(PG_NAME + "_tpl"))

    def _pg_url(self, name: str) -> str:
        return self.pg_admin_url.rsplit("/", 1)[0] + "/" + name

    def _drop(self, *names: str) -> None:
        assert self.admin is not None
        with self.admin.connect() as conn:
            for name in names:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _populate(self, url: str) -> None:
        engine = create_engine(url)
        migrate(engine)
        now = datetime.now(UTC)
        for email in self.emails:
            make_subscriber(engine, email=email, topics=TOPICS, now=now)
        article = ParsedArticle(
            guid="urn:bench:crash:1",
            topic="base-alerts",
            title="Gate 3 closed for maintenance",
            summary="Summary.",
            why_it_matters="Why it matters.",
            body="Body.",
            link="https://news.example.org/a",
            published_at=now - timedelta(hours=1),
        )
        upsert_articles(engine, [article], now=now)
        engine.dispose()

    @contextlib.contextmanager
    def fresh(self) -> Iterator[str]:
        if self.kind == "sqlite":
            path = self.workdir / "trial.db"
            shutil.copy(self.template, path)
            try:
                yield f"sqlite:///{path}"
            finally:
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
            return
        assert self.admin is not None
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{PG_NAME}" TEMPLATE "{PG_NAME}_tpl"')
        try:
            yield self._pg_url(PG_NAME)
        finally:
            self._drop(PG_NAME)

    def close(self) -> None:
        if self.admin is not None:
            self._drop(PG_NAME, PG_NAME + "_tpl")
            self.admin.dispose()


# ---------------------------------------------------------------- one trial


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


def run_trial(
    dbs: Databases, policy: str, number: int, args: argparse.Namespace, rng: random.Random
) -> Trial:
    n = len(dbs.emails)
    trial = Trial(dbs.kind, policy, number, target=rng.randint(max(1, n // 20), n * 9 // 10))
    started = time.monotonic()
    log = dbs.workdir / f"{dbs.kind}-{policy}-{number:02d}.log"
    with dbs.fresh() as url, FaultServer() as server:
        for email in dbs.emails:
            server.script(email, [Delay(args.delay)], stage="data")
        smtp = {
            "host": "127.0.0.1",
            "port": server.port,
            "connections": args.connections,
            "timeout": 5,
            "lease_seconds": args.lease,
            "in_doubt": policy,
            "batch_size": args.batch_size,
        }
        config = write_config(dbs.workdir / "mailer.toml", url, smtp=smtp)
        settings = make_settings(url, smtp=smtp)
        engine = create_engine(url)
        migrate(engine)  # a no-op, unless a migration was added since the template was made
        now = datetime.now(UTC)
        issue = create_issue(
            engine,
            settings,
            settings.digests[0],
            scheduled_for=now,
            now=now,
            render_subject=Renderer().render_subject,
        )
        if issue.recipients != n:
            trial.problems.append(f"issue has {issue.recipients} recipients, not {n}")

        worker = spawn(config, log, "worker", "--drain")
        deadline = time.monotonic() + 60
        while (
            len(server.received) < trial.target
            and worker.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.001)
        # A random phase within a message, so the kill does not always follow an acceptance.
        time.sleep(rng.uniform(0, 2 * args.delay))
        worker.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        code = worker.wait()
        trial.received_at_kill = len(server.received)
        trial.killed_mid_issue = code == -signal.SIGKILL and trial.received_at_kill < n
        with engine.connect() as conn:
            trial.in_flight = conn.execute(
                sa.select(sa.func.count())
                .select_from(deliveries)
                .where(deliveries.c.issue_id == issue.issue_id, deliveries.c.status == "sending")
            ).scalar_one()

        # Every lease the dead worker held (the newest was taken before the kill) must expire.
        time.sleep(max(0.0, killed_at + args.lease + 0.5 - time.monotonic()))
        again = spawn(config, log, "worker", "--drain")
        try:
            again.wait(timeout=120)
        except subprocess.TimeoutExpired:
            again.kill()
            again.wait()
            trial.problems.append("second worker did not finish in 120 s")
        # Under "hold" the drain ends with the in-doubt rows held as unknown, and says so: it
        # exits 1 naming them (an unfinished issue is never a silent success).
        last = (log.read_text(errors="replace").strip().splitlines() or [""])[-1]
        held = policy == "hold" and again.returncode == 1 and "not finished" in last
        if again.returncode != 0 and not held:
            trial.problems.append(f"second worker exited {again.returncode}")

        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(deliveries.c.status, deliveries.c.message_id, subscribers.c.email)
                .join(subscribers, subscribers.c.id == deliveries.c.subscriber_id)
                .where(deliveries.c.issue_id == issue.issue_id)
            ).all()
        engine.dispose()
        count(trial, rows, server)
    trial.seconds = time.monotonic() - started
    if trial.in_flight > args.connections:
        trial.problems.append(f"{trial.in_flight} rows in flight > {args.connections}")
    if trial.duplicates > trial.in_flight or trial.unknown > trial.in_flight:
        trial.problems.append("more duplicates/unknowns than rows in flight at the kill")
    if trial.problems or not args.keep_logs:
        if trial.problems:
            print(f"  problems: {trial.problems}; log kept: {log}", file=sys.stderr)
        else:
            log.unlink(missing_ok=True)
    return trial


def count(trial: Trial, rows: Sequence[Sequence[Any]], server: FaultServer) -> None:
    parser = BytesHeaderParser()
    copies: Counter[str] = Counter()
    ids: dict[str, set[str]] = {}
    for message in server.received:
        for rcpt in message.recipients:
            copies[rcpt] += 1
            mid = str(parser.parsebytes(message.data)["Message-ID"])
            ids.setdefault(rcpt, set()).add(mid)
    for status, message_id, email in rows:
        got = copies.get(email, 0)
        if status == "unknown":
            trial.unknown += 1
            trial.unknown_delivered += got > 0
        elif status != "sent":
            trial.other_status += 1
        if got == 0 and status != "unknown":
            trial.lost += 1
        trial.duplicates += max(0, got - 1)
        if ids.get(email, {message_id}) != {message_id}:
            trial.message_id_changed += 1
    if len(rows) != len(copies.keys() | {email for _, _, email in rows}):
        trial.problems.append("mail received for an address outside the issue")
    if trial.lost or trial.other_status or trial.message_id_changed:
        trial.problems.append(
            f"lost {trial.lost}, other status {trial.other_status}, "
            f"Message-ID changed {trial.message_id_changed}"
        )


# ---------------------------------------------------------------- report


def summarize(trials: list[Trial], connections: int) -> list[str]:
    head = (
        f"{'db':10} {'policy':7} {'trials':>6} {'mid-issue':>9} {'lost max':>8} "
        f"{'dup max':>7} {'dup mean':>8} {'unknown max':>11} {'in-flight max':>13} "
        f"{'held+delivered':>14} {'bound C':>7} {'kill at (msgs)':>14} {'s/trial':>7}"
    )
    lines = [head, "-" * len(head)]
    groups: dict[tuple[str, str], list[Trial]] = {}
    for t in trials:
        groups.setdefault((t.db, t.policy), []).append(t)
    for (db, policy), ts in groups.items():
        kills = [t.received_at_kill for t in ts]
        lines.append(
            f"{db:10} {policy:7} {len(ts):>6} {sum(t.killed_mid_issue for t in ts):>9} "
            f"{max(t.lost for t in ts):>8} {max(t.duplicates for t in ts):>7} "
            f"{statistics.mean(t.duplicates for t in ts):>8.2f} "
            f"{max(t.unknown for t in ts):>11} {max(t.in_flight for t in ts):>13} "
            f"{f'{sum(t.unknown_delivered for t in ts)}/{sum(t.unknown for t in ts)}':>14} "
            f"{connections:>7} {f'{min(kills)}-{max(kills)}':>14} "
            f"{statistics.mean(t.seconds for t in ts):>7.1f}"
        )
    lines.append("")
    for (db, policy), ts in groups.items():
        worst = "unknown" if policy == "hold" else "duplicates"
        spread = Counter(getattr(t, worst) for t in ts)
        flight = Counter(t.in_flight for t in ts)
        lines.append(
            f"{db} {policy}: trials by {worst} "
            + ", ".join(f"{k}: {spread[k]}" for k in sorted(spread))
            + "; by rows in flight at the kill "
            + ", ".join(f"{k}: {flight[k]}" for k in sorted(flight))
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--policy", choices=["resend", "hold", "both"], default="both")
    parser.add_argument("--trials", type=int, default=20, help="kill -9 trials per db and policy")
    parser.add_argument("--subscribers", type=int, default=300)
    parser.add_argument("--connections", type=int, default=4, help="SMTP connections (C)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--delay", type=float, default=0.01, help="server delay per message, s")
    parser.add_argument("--lease", type=float, default=5.0, help="[smtp].lease_seconds")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--pg-url", default=PG_ADMIN_URL, help="PostgreSQL admin database URL")
    parser.add_argument("--keep-logs", action="store_true", help="keep every worker log")
    args = parser.parse_args(argv)

    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    policies = ["resend", "hold"] if args.policy == "both" else [args.policy]
    print(
        f"seed {seed}; {args.trials} trials per db and policy; {args.subscribers} subscribers, "
        f"C={args.connections} connections, batch {args.batch_size}, "
        f"{args.delay * 1000:.0f} ms per message, lease {args.lease:g} s",
        flush=True,
    )
    trials: list[Trial] = []
    workdir = Path(tempfile.mkdtemp(prefix="crash-bound-"))
    try:
        for kind in kinds:
            dbs = Databases(kind, workdir, args.subscribers, args.pg_url)
            try:
                for policy in policies:
                    for number in range(1, args.trials + 1):
                        t = run_trial(dbs, policy, number, args, rng)
                        trials.append(t)
                        print(
                            f"{kind:8} {policy:6} #{number:02d}: killed at "
                            f"{t.received_at_kill}/{args.subscribers} received, "
                            f"{t.in_flight} in flight, lost {t.lost}, duplicates "
                            f"{t.duplicates}, unknown {t.unknown} "
                            f"({t.unknown_delivered} of them delivered), {t.seconds:.1f} s",
                            flush=True,
                        )
            finally:
                dbs.close()
    finally:
        if not any(t.problems for t in trials) and not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print("\n".join(summarize(trials, args.connections)))
    bad = [t for t in trials if t.problems]
    print(f"\n{len(bad)} trials with problems" if bad else "\nno trial broke an invariant")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
