"""The ceiling alone: Postfix's smtp-source into smtp-sink, at our message size.

The message is a real rendered digest (the topic variant whose size is nearest the mean of
the seven variants, rendered from the example articles); smtp-source sends it over ``--connections``
persistent sessions (``-d``; smtp-source does not pipeline). bench/send.py measures the same
ceiling in every run, side by side with us; this script is for looking at it alone.

    .venv/bin/python bench/ceiling.py --connections 32 --count 30000 --runs 5
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

import _lib
import send


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--connections", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--count", type=int, default=30_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    _lib.ensure_postfix()
    sample = _lib.WORK / "sample.toml"
    _lib.write_config(sample, db_url="sqlite://", smtp_port=25, connections=1)
    mean, message = _lib.mean_message_size(_lib.load_bench_settings(sample))
    path = _lib.WORK / "ceiling.eml"
    path.write_bytes(message.replace(b"\r\n", b"\n"))
    print(
        f"# ceiling: {len(message):,}-byte message (mean of the variants {mean:,});"
        f" {_lib.machine()}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; load {_lib.load_avg()}"
    )
    print("| connections | msg/s | smtp-source CPU µs/msg | smtp-sink CPU µs/msg |")
    print("|---|---|---|---|")
    try:
        with _lib.Sink() as sink:
            for sessions in args.connections:
                runs = [send.ceiling(sink, path, sessions, args.count) for _ in range(args.runs)]
                print(
                    f"| {sessions} | {_lib.median_range([r.rate for r in runs])} "
                    f"| {_lib.median_range([r.client_cpu_us for r in runs])} "
                    f"| {_lib.median_range([r.sink_cpu_us for r in runs])} |",
                    flush=True,
                )
    finally:
        _lib.stop_postfix_daemon()


if __name__ == "__main__":
    main()
