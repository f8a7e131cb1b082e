"""End to end: ``mailer digest send`` into Postfix's smtp-sink, side by side with the ceiling.

Each run, for each database, in this order on the same smtp-sink:

1. the ceiling: Postfix's ``smtp-source`` sending a real rendered digest (the topic variant
   whose size is nearest the mean of all variants) over the same total number of persistent
   connections;
2. us: a fresh copy of a database holding N active subscribers (seven topic variants) and a
   week of articles (``_lib.issue_articles``: a 20–40 KB digest); then, timed from the moment
   it is launched, ``mailer --config CFG digest send weekly [--processes P]`` as a subprocess
   (creates the issue, snapshots the recipients, delivers over P processes), plus ``--workers``
   ``mailer worker --drain`` processes started as soon as the issue exists.

Figures per configuration: messages per second end to end (launch to the last process's exit),
the steady rate seen by the sink (first to last message), CPU seconds per 1,000 messages of all
our processes (from wait4), the peak RSS of each process (VmHWM, read while they run:
``_lib.HighWater``; wait4's figure, printed beside it, includes this benchmark's own peak), and
the ratio to the ceiling of the same run. Medians and min–max over ``--runs``.

    .venv/bin/python bench/send.py --n 10000 --db sqlite --runs 5
    .venv/bin/python bench/send.py --n 100000 --db postgres --runs 3 --dkim
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import _lib


@dataclass
class Ceiling:
    rate: float
    client_cpu_us: float
    sink_cpu_us: float


@dataclass
class Ours:
    rate: float
    steady: float
    cpu_per_1000: float
    peak_rss_mb: float
    rss_each: list[float]
    cpu_each: list[float]
    wall_each: list[float]
    sink_cpu_us: float
    sent: int
    wall: float
    postgres_cpu_us: float = 0.0  # the PostgreSQL server's CPU per message (0 on SQLite)
    # Seconds from the command's launch to the sink's first message, and the seconds the run
    # took beyond N at its steady rate (start-up and the tail: wall - N / steady).
    first: float = 0.0
    lost: float = 0.0
    # wait4's peak RSS, which includes the benchmark's own peak (see _lib.HighWater).
    wait4_rss_mb: float = 0.0


def ceiling(sink: _lib.Sink, message: Path, sessions: int, count: int) -> Ceiling:
    """smtp-source: ``count`` messages over ``sessions`` persistent connections (-d)."""
    cpu0 = sink.cpu_seconds()
    argv = [
        _lib.SMTP_SOURCE,
        "-d",
        "-s",
        str(sessions),
        "-m",
        str(count),
        "-F",
        str(message),
        "-f",
        _lib.SENDER,
        "-t",
        "reader@example.org",
        "-M",
        "bench.local",
        f"127.0.0.1:{sink.port}",
    ]
    measured = _lib.run_measured(argv)
    if measured.returncode != 0:
        raise RuntimeError(f"smtp-source failed: {measured.stderr.strip()}")
    time.sleep(0.2)  # let smtp-sink finish its accounting
    return Ceiling(
        rate=count / measured.wall,
        client_cpu_us=measured.cpu / count * 1e6,
        sink_cpu_us=(sink.cpu_seconds() - cpu0) / count * 1e6,
    )


def cli_signs() -> bool:
    """Whether ``mailer digest send`` signs with [dkim] by itself (else: bench/_dkim_cli.py)."""
    import mailer.cli

    # The command line is a package of modules: read them all.
    here = Path(inspect.getfile(mailer.cli))
    files = sorted(here.parent.glob("*.py")) if here.name == "__init__.py" else [here]
    source = "".join(f.read_text(encoding="utf-8") for f in files)
    return "DkimSigner" in source or "signer_for" in source


def commands(
    config: Path,
    *,
    dkim: bool,
    helper: str = "worker",
    code: Path | None = None,
    processes: int | None = 1,
) -> tuple[list[str], list[str]]:
    """The sending command and the helper beside it: ``worker --drain``, or a second
    ``digest send`` (which resumes the issue the first one made). ``code``: run the CLI from
    another source tree (bench/baseline.py makes one from an older commit). ``processes``:
    ``--processes P``; None leaves it to the config (``[smtp].processes``, "auto" unless set).
    """
    if dkim and not cli_signs():
        script = str(Path(__file__).with_name("_dkim_cli.py"))
        send = [str(_lib.PYTHON), script, str(config), "send", "weekly"]
        worker = [str(_lib.PYTHON), script, str(config), "worker"]
    else:
        base = [str(_lib.MAILER), "--config", str(config)]
        if code is not None:
            launch = (
                f"import sys; sys.path.insert(0, {str(code)!r});"
                " from mailer.cli import main; main()"
            )
            base = [str(_lib.PYTHON), "-c", launch, "--config", str(config)]
        spread = [] if processes is None else ["--processes", str(processes)]
        send = [*base, "digest", "send", "weekly", *spread]
        worker = [*base, "worker", "--drain", *spread]
    return send, (send if helper == "send" else worker)


def ours(
    sink: _lib.Sink,
    *,
    kind: str,
    n: int,
    connections: int | None,
    workers: int,
    batch_size: int,
    dkim_key: Path | None,
    tag: str,
    rate_per_second: float = 0,
    helper: str = "worker",
    code: Path | None = None,
    processes: int | None = 1,
) -> Ours:
    url = _lib.fresh_database(kind, n, tag)
    try:
        config = _lib.write_config(
            _lib.WORK / f"{tag}.toml",
            db_url=url,
            smtp_port=sink.port,
            connections=connections,
            batch_size=batch_size,
            dkim_key=dkim_key,
            rate_per_second=rate_per_second,
        )
        send_cmd, worker_cmd = commands(
            config, dkim=dkim_key is not None, helper=helper, code=code, processes=processes
        )
        env = _lib.bench_env()
        base = sink.received
        sink.stamps.clear()
        sink.record = True
        cpu0 = sink.cpu_seconds()
        pg0 = _lib.postgres_cpu_seconds() if kind == "postgres" else 0.0
        started = time.monotonic()
        send = _lib.Child(send_cmd, env=env)
        helpers: list[_lib.Child] = []
        if workers and send.wait_for_line(r"^issue \d+", timeout=600):
            helpers = [_lib.Child(worker_cmd, env=env) for _ in range(workers)]
        results = [send.wait(), *(h.wait() for h in helpers)]
        wall = time.monotonic() - started
        pg_cpu = _lib.postgres_cpu_seconds() - pg0 if kind == "postgres" else 0.0
        sink.record = False
        time.sleep(0.2)
        for r in results:
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(r.argv)} exited {r.returncode}: {r.stderr[-2000:]}")
        counts = _lib.delivery_counts(url)
        sent = counts.get("sent", 0)
        if sent != n or sink.received - base != n:
            raise RuntimeError(
                f"expected {n} sent, ledger says {counts}, sink got {sink.received - base}"
            )
        stamps = [(t, c - base) for t, c in sink.stamps if c > base]
        steady = 0.0
        if len(stamps) >= 2 and stamps[-1][0] > stamps[0][0]:
            steady = (stamps[-1][1] - stamps[0][1]) / (stamps[-1][0] - stamps[0][0])
        rss = [r.max_rss_mb for r in results]
        first = stamps[0][0] - started if stamps else 0.0
        return Ours(
            rate=n / wall,
            steady=steady,
            cpu_per_1000=sum(r.cpu for r in results) / n * 1000,
            peak_rss_mb=max(rss),
            rss_each=rss,
            cpu_each=[r.cpu for r in results],
            wall_each=[r.wall for r in results],
            sink_cpu_us=(sink.cpu_seconds() - cpu0) / n * 1e6,
            sent=sent,
            wall=wall,
            postgres_cpu_us=pg_cpu / n * 1e6,
            wait4_rss_mb=max(r.wait4_rss_mb for r in results),
            first=first,
            lost=wall - n / steady if steady else 0.0,
        )
    finally:
        _lib.discard_database(url)


def dkim_key() -> Path:
    """An RSA-2048 key for [dkim], generated once with ``cryptography`` (mode 600)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    path = _lib.WORK / "dkim-rsa2048.pem"
    if not path.exists():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
    return path


def _pct(values: list[float]) -> str:
    return _lib.median_range(values, "{:.0f}")


def table_row(
    label: str, dkim: bool, n: int, ceiling_cell: str, runs: list[Ours], share: str
) -> str:
    """One line of the summary table: medians (min–max) of ``runs``."""
    cells = [
        label,
        "on" if dkim else "off",
        f"{n:,}",
        ceiling_cell,
        _lib.median_range([o.rate for o in runs]),
        _lib.median_range([o.steady for o in runs]),
        share,
        _lib.median_range([o.cpu_per_1000 for o in runs], "{:.2f}"),
        _lib.median_range([o.peak_rss_mb for o in runs], "{:.0f}"),
        _lib.median_range([o.first for o in runs], "{:.2f}"),
        _lib.median_range([o.lost for o in runs], "{:.2f}"),
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=10_000, help="subscribers (messages)")
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--dkim", action="store_true", help="sign with an RSA-2048 key")
    parser.add_argument(
        "--unsigned-too",
        action="store_true",
        help="with --dkim: each run also sends unsigned, right after the signed send, on the"
        " same sink and a fresh copy of the same database (signed / unsigned of the same run)",
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8, help="[smtp].connections")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="`digest send --processes P`: P sending processes (the command's own helpers)",
    )
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="the example config's defaults: no [smtp].connections or processes in the config,"
        " no --processes (overrides --connections and --processes)",
    )
    parser.add_argument(
        "--workers", type=int, default=0, help="`mailer worker --drain` processes beside it"
    )
    parser.add_argument(
        "--helper",
        choices=["worker", "send"],
        default="worker",
        help="the helpers: `mailer worker --drain` or a second `mailer digest send` (resumes)",
    )
    parser.add_argument("--batch-size", type=int, default=500, help="[smtp].batch_size")
    parser.add_argument(
        "--ceiling-max",
        type=int,
        default=30_000,
        help="messages smtp-source sends per run (its rate is steady long before)",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        help="also time the CLI of this source tree in each run (bench/baseline.py makes one)",
    )
    parser.add_argument("--keep-templates", action="store_true")
    args = parser.parse_args()

    _lib.ensure_postfix()
    _lib.WORK.mkdir(parents=True, exist_ok=True)
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    key = dkim_key() if args.dkim else None
    sample = _lib.WORK / "sample.toml"
    _lib.write_config(sample, db_url="sqlite://", smtp_port=25, connections=1)
    settings = _lib.load_bench_settings(sample)
    mean_size, message = _lib.mean_message_size(settings)
    message_file = _lib.WORK / "ceiling.eml"
    # smtp-source -F sends the file line by line, adding CRLF and dot-stuffing itself.
    message_file.write_bytes(message.replace(b"\r\n", b"\n"))
    if args.defaults:
        from mailer.config.sections import DEFAULT_CONNECTIONS, usable_cpus

        args.connections, args.processes = DEFAULT_CONNECTIONS, min(usable_cpus()[0], 64)
    sessions = args.connections * args.processes * (1 + args.workers)
    count = min(args.n, args.ceiling_max)
    for kind in kinds:  # build the templates before anything is timed
        _lib.discard_database(_lib.fresh_database(kind, args.n, "warmup"))

    print(
        f"# send: N={args.n:,} dkim={'on' if key else 'off'} connections={args.connections}"
        f" x {args.processes * (1 + args.workers)} processes = {sessions}"
        f" (--processes {args.processes}, --workers {args.workers}: {args.helper})"
        f"{' [the defaults: nothing in the config]' if args.defaults else ''};"
        f" mean message {mean_size:,} bytes"
        f" (ceiling sends {len(message):,}); {_lib.machine()};"
        f" {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; load {_lib.load_avg()}",
        flush=True,
    )
    rows: dict[str, list[tuple[Ceiling, Ours]]] = {k: [] for k in kinds}
    before: dict[str, list[Ours]] = {k: [] for k in kinds}
    unsigned: dict[str, list[Ours]] = {k: [] for k in kinds}
    if args.unsigned_too and key is None:
        parser.error("--unsigned-too compares with a signed send: give --dkim too")
    try:
        with _lib.Sink() as sink:
            for run in range(args.runs):
                for kind in kinds:
                    quiet = _lib.wait_quiet()
                    c = ceiling(sink, message_file, sessions, count)
                    common = {
                        "kind": kind,
                        "n": args.n,
                        "connections": None if args.defaults else args.connections,
                        "workers": args.workers,
                        "batch_size": args.batch_size,
                        "dkim_key": key,
                        "helper": args.helper,
                        "processes": None if args.defaults else args.processes,
                    }
                    o = ours(sink, tag=f"{kind}-{os.getpid()}", **common)
                    rows[kind].append((c, o))
                    if args.compare is not None:
                        b = ours(
                            sink, tag=f"{kind}-base-{os.getpid()}", code=args.compare, **common
                        )
                        before[kind].append(b)
                        print(
                            f"run {run + 1} {kind:8} before: {b.rate:7,.0f} msg/s end to end,"
                            f" {b.rate / c.rate:5.1%} of ceiling, {b.cpu_per_1000:.2f} CPU s/1000"
                            f" | after / before {o.rate / b.rate:.2f}x",
                            flush=True,
                        )
                    if args.unsigned_too:
                        u = ours(
                            sink, tag=f"{kind}-plain-{os.getpid()}", **common | {"dkim_key": None}
                        )
                        unsigned[kind].append(u)
                        print(
                            f"run {run + 1} {kind:8} unsigned: {u.rate:7,.0f} msg/s end to end,"
                            f" {u.cpu_per_1000:.2f} CPU s/1000 | signed / unsigned"
                            f" {o.rate / u.rate:.1%}",
                            flush=True,
                        )
                    print(
                        f"run {run + 1} {kind:8} ceiling {c.rate:7,.0f} msg/s | us {o.rate:7,.0f}"
                        f" msg/s end to end ({o.wall:.1f} s), {o.steady:7,.0f} steady,"
                        f" {o.rate / c.rate:5.1%} of ceiling, {o.cpu_per_1000:.2f} CPU s/1000"
                        f" ({'+'.join(f'{x:.1f}' for x in o.cpu_each)} s CPU in"
                        f" {'+'.join(f'{x:.1f}' for x in o.wall_each)} s),"
                        f" RSS {'+'.join(f'{r:.0f}' for r in o.rss_each)} MB"
                        f" (wait4: {o.wait4_rss_mb:.0f}),"
                        f" sink {o.sink_cpu_us:.0f} us/msg (ceiling: {c.sink_cpu_us:.0f}),"
                        f" first message {o.first:.2f} s, {o.lost:.2f} s beyond N / steady"
                        + (f", postgres {o.postgres_cpu_us:.0f} us/msg" * bool(o.postgres_cpu_us))
                        + f"; {quiet}",
                        flush=True,
                    )
    finally:
        if not args.keep_templates:
            _lib.drop_templates()
        _lib.stop_postfix_daemon()

    print()
    print(
        "| database | DKIM | N | ceiling msg/s | us msg/s (end to end) | us steady msg/s "
        "| us / ceiling | CPU s per 1,000 | peak RSS MB (per process) | first message s "
        "| s beyond N / steady |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    dkim = key is not None
    for kind, pairs in rows.items():
        cs = [c for c, _ in pairs]
        ours_ = [o for _, o in pairs]
        shares = [o.rate / c.rate * 100 for c, o in pairs]
        ceiling_cell = _lib.median_range([c.rate for c in cs])
        print(table_row(kind, dkim, args.n, ceiling_cell, ours_, f"{_pct(shares)} %"))
        if before[kind]:
            shares = [b.rate / c.rate * 100 for c, b in zip(cs, before[kind], strict=True)]
            label = f"{kind} (before: {args.compare})"
            print(table_row(label, dkim, args.n, ceiling_cell, before[kind], f"{_pct(shares)} %"))
        if unsigned[kind]:
            shares = [o.rate / u.rate * 100 for o, u in zip(ours_, unsigned[kind], strict=True)]
            share = f"signed / unsigned {_pct(shares)} %"
            label = f"{kind} unsigned, same runs"
            print(table_row(label, False, args.n, "", unsigned[kind], share))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
