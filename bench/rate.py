"""Rate limiting: ``[smtp].rate_per_second`` held end to end, measured at the sink.

For each rate R, ``mailer digest send`` (one process: the limit is per process, like the pool
it paces) sends R x ``--seconds`` messages into Postfix's smtp-sink; the rate is taken at the
sink, from its first to its last message, and compared with R (target: within 5%).

    .venv/bin/python bench/rate.py --rates 50 200 1000 --seconds 10 --runs 3
"""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime

import _lib
import send


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[50, 200, 1000])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--processes", type=int, default=1, help="`digest send --processes`")
    args = parser.parse_args()
    _lib.ensure_postfix()
    print(
        f"# rate: {args.db}, {args.connections} connections x {args.processes} processes;"
        f" {_lib.machine()};"
        f" {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; load {_lib.load_avg()}",
        flush=True,
    )
    table = []
    try:
        with _lib.Sink() as sink:
            for rate in args.rates:
                n = int(rate * args.seconds)
                measured = []
                for run in range(args.runs):
                    o = send.ours(
                        sink,
                        kind=args.db,
                        n=n,
                        connections=args.connections,
                        workers=0,
                        batch_size=500,
                        dkim_key=None,
                        tag=f"rate-{os.getpid()}",
                        rate_per_second=rate,
                        processes=args.processes,
                    )
                    measured.append(o.steady)
                    print(
                        f"rate {rate:6,.0f}/s run {run + 1}: {o.steady:8,.1f} msg/s at the sink"
                        f" ({(o.steady - rate) / rate:+.1%}), {n:,} messages",
                        flush=True,
                    )
                table.append((rate, n, measured))
    finally:
        _lib.drop_templates()
        _lib.stop_postfix_daemon()
    print("\n| rate_per_second | messages | measured msg/s at the sink | deviation |")
    print("|---|---|---|---|")
    for rate, n, measured in table:
        devs = [(m - rate) / rate * 100 for m in measured]
        print(
            f"| {rate:,.0f} | {n:,} | {_lib.median_range(measured, '{:,.1f}')} "
            f"| {_lib.median_range(devs, '{:+.1f}')} % |"
        )


if __name__ == "__main__":
    main()
