"""CSV import: ``mailer subscribers import FILE.csv`` of N new subscribers, timed from the CLI.

The file has the documented columns ``email,name,topics,status`` (topics separated by ``;``,
the seven topic sets in turn, some addresses in mixed case to be normalized). Each run imports
it into a freshly migrated, empty database; the figures are the wall time, rows per second,
CPU seconds and the peak RSS of the ``mailer`` process (wait4), then the rows are counted.

    .venv/bin/python bench/import_csv.py --n 1000000 --db sqlite --runs 3
"""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime
from pathlib import Path

import _lib


def write_csv(path: Path, n: int) -> Path:
    if path.exists():
        return path
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        f.write("email,name,topics,status\n")
        for start in range(0, n, 100_000):
            lines = []
            for i in range(start, min(n, start + 100_000)):
                email = f"Reader{i}@Example.org" if i % 10 == 0 else f"reader{i}@example.org"
                topics = ";".join(_lib.variant_of(i))
                lines.append(f"{email},Reader {i},{topics},active\n")
            f.write("".join(lines))
    tmp.rename(path)
    return path


def empty_database(kind: str, tag: str) -> str:
    from mailer.db import create_engine, migrate

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
    from mailer.db import create_engine

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one())
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="sqlite")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    csv_file = write_csv(_lib.WORK / f"subscribers-{args.n}.csv", args.n)
    print(
        f"# import: N={args.n:,} rows ({csv_file.stat().st_size / 1e6:.0f} MB);"
        f" {_lib.machine()}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; load {_lib.load_avg()}",
        flush=True,
    )
    results: dict[str, list[_lib.Measured]] = {k: [] for k in kinds}
    for run in range(args.runs):
        for kind in kinds:
            tag = f"{kind}-{os.getpid()}"
            url = empty_database(kind, tag)
            try:
                config = _lib.write_config(
                    _lib.WORK / f"import-{tag}.toml", db_url=url, smtp_port=25, connections=1
                )
                m = _lib.run_measured(
                    [
                        str(_lib.MAILER),
                        "--config",
                        str(config),
                        "subscribers",
                        "import",
                        str(csv_file),
                    ],
                    env=_lib.bench_env(),
                )
                if m.returncode != 0:
                    raise RuntimeError(f"import failed: {m.stderr[-2000:]}")
                rows = count(url, "subscribers")
                if rows != args.n:
                    raise RuntimeError(f"imported {rows} of {args.n}: {m.stdout}")
                results[kind].append(m)
                print(
                    f"run {run + 1} {kind:8} {m.wall:6.1f} s, {args.n / m.wall:9,.0f} rows/s,"
                    f" CPU {m.cpu:.1f} s, peak RSS {m.max_rss_mb:.0f} MB",
                    flush=True,
                )
            finally:
                _lib.discard_database(url)
    print()
    print("| database | rows | seconds | rows/s | CPU s | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for kind, ms in results.items():
        print(
            f"| {kind} | {args.n:,} | {_lib.median_range([m.wall for m in ms], '{:.1f}')} "
            f"| {_lib.median_range([args.n / m.wall for m in ms])} "
            f"| {_lib.median_range([m.cpu for m in ms], '{:.1f}')} "
            f"| {_lib.median_range([m.max_rss_mb for m in ms])} |"
        )


if __name__ == "__main__":
    main()
