"""A send into a relay that takes its time: network-bound, not CPU-bound.

A real relay answers each message's DATA after it has queued the message (writing and syncing
a queue file), and a relay across a network adds its round trips. Here a relay (aiosmtpd, in
its own process) answers every DATA after ``--delay`` milliseconds; each run sends N digests
into it with the example config's defaults (`mailer digest send`, launch to exit) and, with
``--compare``, the CLI of another source tree (bench/baseline.py) in the same run. The rate
is then set by the connections and the relay's delay, not by CPU: this is the case where
anything that holds a lane back shows.

    .venv/bin/python bench/slow_relay.py --n 3000 --delay 50 --runs 3 \
        --compare /tmp/mailer-bench/baseline-REV
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _lib
from send import commands


def serve(port: int, delay: float) -> None:
    """The relay: accept every message, answer its DATA after ``delay`` seconds."""
    from aiosmtpd.controller import Controller

    class Slow:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            await asyncio.sleep(delay)
            return "250 2.0.0 queued"

    controller = Controller(Slow(), hostname="127.0.0.1", port=port, data_size_limit=0)
    controller.start()
    print("ready", flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
    controller.stop()


def relay(delay_ms: float) -> tuple[subprocess.Popen[str], int]:
    port = _lib.free_port()
    child = subprocess.Popen(
        [str(_lib.PYTHON), __file__, "--serve", str(port), "--delay", str(delay_ms)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    if child.stdout.readline().strip() != "ready":
        raise RuntimeError("the relay did not start")
    return child, port


def one_send(port: int, n: int, tag: str, code: Path | None) -> tuple[float, float]:
    """Seconds from launch to exit, and CPU seconds, of one `digest send` of ``n``."""
    url = _lib.fresh_database("sqlite", n, tag)
    try:
        config = _lib.write_config(
            _lib.WORK / f"{tag}.toml", db_url=url, smtp_port=port, connections=None
        )
        send, _ = commands(config, dkim=False, code=code, processes=None)
        started = time.monotonic()
        result = _lib.Child(send, env=_lib.bench_env()).wait()
        wall = time.monotonic() - started
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(send)} exited {result.returncode}: {result.stderr}")
        counts = _lib.delivery_counts(url)
        if counts.get("sent", 0) != n:
            raise RuntimeError(f"expected {n} sent, the ledger says {counts}")
        return wall, result.cpu
    finally:
        _lib.discard_database(url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--delay", type=float, default=50.0, help="ms before each DATA reply")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compare", type=Path, default=None)
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.delay / 1000)
        return
    print(
        f"# slow relay: N={args.n:,}, DATA answered after {args.delay:g} ms, the example"
        f" config's defaults, SQLite; {_lib.machine()}; {_lib.load_avg()}"
    )
    trees: list[tuple[str, Path | None]] = [("us", None)]
    if args.compare is not None:
        trees.append((f"before ({args.compare.name})", args.compare))
    rates: dict[str, list[float]] = {label: [] for label, _ in trees}
    cpus: dict[str, list[float]] = {label: [] for label, _ in trees}
    child, port = relay(args.delay)
    try:
        for run in range(1, args.runs + 1):
            for label, code in trees:
                _lib.wait_quiet()
                tag = f"slow-{os.getpid()}-{run}-{len(rates[label])}-{code is not None}"
                wall, cpu = one_send(port, args.n, tag, code)
                rates[label].append(args.n / wall)
                cpus[label].append(cpu / args.n * 1000)
                print(
                    f"run {run} {label}: {args.n / wall:,.0f} msg/s ({wall:.2f} s),"
                    f" {cpu / args.n * 1000:.2f} CPU s per 1,000"
                )
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
    print()
    print("| tree | msg/s | CPU s per 1,000 |")
    print("|---|---|---|")
    for label, _ in trees:
        print(
            f"| {label} | {_lib.median_range(rates[label])}"
            f" | {_lib.median_range(cpus[label], '{:.2f}')} |"
        )


if __name__ == "__main__":
    main()
