"""CSV import: ``mailer subscribers import FILE.csv`` of N new subscribers, timed from the CLI.

The file has the documented columns ``email,name,topics,status`` (topics separated by ``;``,
the seven topic sets in turn, some addresses in mixed case to be normalized). Each run imports
it into a freshly migrated, empty database; the figures are the wall time, rows per second,
CPU seconds (wait4) and the peak RSS (VmHWM, ``_lib.HighWater``) of the ``mailer`` process,
on PostgreSQL also the server's CPU seconds meanwhile (every ``postgres`` process on the
machine, from /proc); then the subscribers, their topic rows and their events are counted.

    .venv/bin/python bench/import_csv.py --n 1000000 --db sqlite --runs 2
    .venv/bin/python bench/import_csv.py --n 1000000 --db postgres --runs 1

``--rejected`` imports a file in which every row is rejected (no ``@`` in the address) instead:
the CLI must list each one on stderr, by row number, and exit 1, with nothing imported.

    .venv/bin/python bench/import_csv.py --n 1000000 --db sqlite --runs 2 --rejected

``--profile`` then samples one more SQLite import with py-spy (wall clock, 100 Hz) and prints
where its time went.
"""

from __future__ import annotations

import argparse
import collections
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import _lib


def subscriber_row(i: int) -> str:
    """Row ``i`` of the benchmark's file: a new subscriber (one in ten in mixed case)."""
    email = f"Reader{i}@Example.org" if i % 10 == 0 else f"reader{i}@example.org"
    return f"{email},Reader {i},{';'.join(_lib.variant_of(i))},active\n"


def rejected_row(i: int) -> str:
    """Row ``i`` of the ``--rejected`` file: an address without ``@``, rejected."""
    return f"reader{i} at example.org,Reader {i},,active\n"


def write_csv(path: Path, n: int, row: Callable[[int], str] = subscriber_row) -> Path:
    """``n`` rows made by ``row``, under the documented header (kept for the next run)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        f.write("email,name,topics,status\n")
        for start in range(0, n, 100_000):
            f.write("".join(row(i) for i in range(start, min(n, start + 100_000))))
    tmp.rename(path)
    return path


def check_rejected(url: str, n: int, m: _lib.Measured, stderr: Path) -> None:
    """Exit 1, every row listed once on stderr in row order, nothing imported."""
    if m.returncode != 1:
        raise RuntimeError(f"expected exit status 1, got {m.returncode}: see {stderr}")
    expected = 2  # the first row after the header
    with stderr.open(encoding="utf-8") as listing:  # read as a stream: it is large
        for line in listing:
            if ": row " not in line:
                continue
            row = int(line.split(": row ", 1)[1].split(" ", 1)[0])
            if row != expected:
                raise RuntimeError(f"{stderr}: row {row} listed where row {expected} was due")
            expected += 1
    if expected != n + 2:
        raise RuntimeError(f"{stderr}: {expected - 2:,} rows listed, expected {n:,}")
    if count(url, "subscribers"):
        raise RuntimeError("subscribers were imported from a file of rejected rows")


def empty_database(kind: str, tag: str) -> str:
    from mailer.db.engine import create_engine, migrate

    _lib.WORK.mkdir(parents=True, exist_ok=True)
    if kind == "sqlite":
        path = _lib.WORK / f"import-{tag}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        url = f"sqlite:///{path}"
    else:
        name = f"mailer_bench_import_{tag}"
        _lib.drop_pg(name)
        with _lib._pg_admin() as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        url = _lib._pg_url(name)
    engine = create_engine(url)
    try:
        migrate(engine)
    finally:
        engine.dispose()
    return url


def count(url: str, table: str) -> int:
    from mailer.db.engine import create_engine

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one())
    finally:
        engine.dispose()


def check_counts(url: str, n: int, output: str) -> None:
    expected = {
        "subscribers": n,
        "subscriber_topics": sum(len(_lib.variant_of(i)) for i in range(n)),
        "events": n,
    }
    for table, rows in expected.items():
        found = count(url, table)
        if found != rows:
            raise RuntimeError(f"{table}: {found} rows, expected {rows}: {output}")


# Where the import's time goes: (part, frame that marks it, frame that does not count in it).
PARTS = [
    ("start-up (imports)", "_find_and_load", None),
    ("read and validate the CSV", "_read_csv", None),
    ("stage rows (uids, hashes; executemany or COPY)", "Staging._copy", "_read_csv"),
    ("duplicate check (_import_seen)", "Staging._drop_duplicates", None),
    ("suppression check", "Staging._drop_suppressed", None),
    ("insert subscribers, topics, events", "Staging._insert_new", None),
    ("commits", "Transaction.commit", None),
    ("empty the staging table", "Staging._clear", None),
]


def profile(n: int, csv_file: Path) -> None:
    """py-spy, wall clock (``--idle``: waits on the database count), one SQLite import."""
    raw = _lib.WORK / "import-profile.raw"
    url = empty_database("sqlite", "profile")
    config = _lib.write_config(
        _lib.WORK / "import-profile.toml", db_url=url, smtp_port=25, connections=1
    )
    command = [str(_lib.MAILER), "--config", str(config), "subscribers", "import", str(csv_file)]
    try:
        _lib.py_spy(command, raw, mode="--idle", rate=100)
    finally:
        _lib.discard_database(url)
    total = 0
    parts: collections.Counter[str] = collections.Counter()
    for frames, count in _lib.stacks(raw):
        total += count
        for name, needle, unless in PARTS:
            if needle in frames and (unless is None or unless not in frames):
                parts[name] += count
    print(f"\nprofile: py-spy --idle, {total:,} samples at 100 Hz, SQLite, N={n:,}")
    print("| part | share of wall time |")
    print("|---|---|")
    for name, _, _ in PARTS:
        print(f"| {name} | {parts[name] / total:.0%} |")


@dataclass
class Run:
    """One import: the ``mailer`` process, and the PostgreSQL server's CPU meanwhile."""

    measured: _lib.Measured
    server_cpu: float  # 0 on SQLite


def measure(kind: str, csv_file: Path, n: int, *, rejected: bool = False) -> Run:
    """One import of ``csv_file`` into a fresh database, checked, then discarded."""
    tag = f"{kind}-{os.getpid()}"
    url = empty_database(kind, tag)
    try:
        config = _lib.write_config(
            _lib.WORK / f"import-{tag}.toml", db_url=url, smtp_port=25, connections=1
        )
        command = [str(_lib.MAILER), "--config", str(config), "subscribers", "import"]
        server = _lib.postgres_cpu_seconds() if kind == "postgres" else 0.0
        # A rejected row's listing goes to a file: held here, it would grow this process (and
        # with it wait4's figure for the next import, see _lib.HighWater).
        stderr = _lib.WORK / f"import-{tag}.stderr" if rejected else None
        m = _lib.run_measured([*command, str(csv_file)], env=_lib.bench_env(), stderr_file=stderr)
        server = _lib.postgres_cpu_seconds() - server if kind == "postgres" else 0.0
        if stderr is not None:
            check_rejected(url, n, m, stderr)
            stderr.unlink()
        elif m.returncode != 0:
            raise RuntimeError(f"import failed: {m.stderr[-2000:]}")
        else:
            check_counts(url, n, m.stdout)
        return Run(m, server)
    finally:
        _lib.discard_database(url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="sqlite")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--rejected", action="store_true", help="every row of the file is bad")
    args = parser.parse_args()
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    if args.rejected:
        csv_file = write_csv(_lib.WORK / f"rejected-{args.n}.csv", args.n, rejected_row)
    else:
        csv_file = write_csv(_lib.WORK / f"subscribers-{args.n}.csv", args.n)
    print(
        f"# import{' (every row rejected)' if args.rejected else ''}: N={args.n:,} rows"
        f" ({csv_file.stat().st_size / 1e6:.0f} MB);"
        f" {_lib.machine()}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; load {_lib.load_avg()}",
        flush=True,
    )
    results: dict[str, list[Run]] = {k: [] for k in kinds}
    for run in range(args.runs):
        for kind in kinds:
            r = measure(kind, csv_file, args.n, rejected=args.rejected)
            results[kind].append(r)
            m = r.measured
            print(
                f"run {run + 1} {kind:8} {m.wall:6.1f} s, {args.n / m.wall:9,.0f} rows/s,"
                f" CPU {m.cpu:.1f} s, peak RSS {m.max_rss_mb:.0f} MB (wait4: {m.wait4_rss_mb:.0f})"
                + (f", PostgreSQL server CPU {r.server_cpu:.1f} s" if kind == "postgres" else ""),
                flush=True,
            )
    print()
    print("| database | rows | seconds | rows/s | CPU s | server CPU s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for kind, runs in results.items():
        ms = [r.measured for r in runs]
        server = (
            _lib.median_range([r.server_cpu for r in runs], "{:.1f}") if kind == "postgres" else "–"
        )
        print(
            f"| {kind} | {args.n:,} | {_lib.median_range([m.wall for m in ms], '{:.1f}')} "
            f"| {_lib.median_range([args.n / m.wall for m in ms])} "
            f"| {_lib.median_range([m.cpu for m in ms], '{:.1f}')} "
            f"| {server} "
            f"| {_lib.median_range([m.max_rss_mb for m in ms])} |"
        )
    if args.profile:
        profile(args.n, csv_file)


if __name__ == "__main__":
    main()
