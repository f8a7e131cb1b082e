"""Time to the first message and to the steady rate: where a send's first second goes.

Each run, for each database: a fresh copy of a database of N subscribers (the benchmark's
week of articles), Postfix's ``smtp-sink`` as the relay, and ``mailer -vv --config CFG digest
send weekly`` launched as a subprocess with the example config's defaults for ``[smtp]``
(no ``connections``, no ``processes``). Its log lines are stamped as they are read, against
the launch:

* **ready**: the helper processes are started (``sending processes started``): the interpreter,
  the imports, the config, the preflight checks (database, relay);
* **issue**: the issue and its recipient snapshot are committed (``issue created``; on
  PostgreSQL after the ``ANALYZE`` that follows the snapshot);
* **first connection**: the first SMTP connection of a sending lane is open (``SMTP connection
  opened`` after the issue): the first claim and the render of the topic sets are done;
* **first message**: the sink's counter first moves;
* **steady**: the first 0.25 s window in which the sink's rate reaches 90 % of the run's steady
  rate (first to last message);
* **exit**: the command's exit (N / steady would be the send at its steady rate all along).

Also: the imports alone (``import mailer.cli`` and the modules ``digest send`` loads), the
best of five interpreters.

    .venv/bin/python bench/first_message.py --n 20000 --db both --runs 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import threading
import time
from datetime import UTC, datetime

import _lib

PHASES = ("ready", "issue", "first connection", "first message", "steady", "exit")
MARKS = {
    "ready": "sending processes started",
    "issue": "issue created",
}

IMPORTS = (
    "import mailer.cli, mailer.compose.rendering, mailer.delivery.processes,"
    " mailer.delivery.sending, mailer.issues.staff, mailer.staff.reports, mailer.staff.rounds"
)


def imports_seconds() -> float:
    best = float("inf")
    for _ in range(5):
        started = time.monotonic()
        subprocess.run([str(_lib.PYTHON), "-c", IMPORTS], check=True)
        best = min(best, time.monotonic() - started)
    return best


def steady_start(stamps: list[tuple[float, int]], window: float = 0.25) -> float:
    """When the sink's rate over ``window`` seconds first reaches 90 % of the steady rate."""
    (t0, c0), (t1, c1) = stamps[0], stamps[-1]
    steady = (c1 - c0) / (t1 - t0)
    j = 0
    for t, c in stamps:
        while stamps[j][0] < t - window:
            j += 1
        if t - stamps[0][0] >= window and (c - stamps[j][1]) / window >= 0.9 * steady:
            return stamps[j][0]
    return t1


def one_run(sink: _lib.Sink, kind: str, n: int) -> dict[str, float]:
    url = _lib.fresh_database(kind, n, f"first-{os.getpid()}")
    try:
        config = _lib.write_config(
            _lib.WORK / f"first-{kind}.toml", db_url=url, smtp_port=sink.port, connections=None
        )
        base = sink.received
        sink.stamps.clear()
        sink.record = True
        marks: dict[str, float] = {}
        started = time.monotonic()
        child = subprocess.Popen(
            [str(_lib.MAILER), "-vv", "--config", str(config), "digest", "send", "weekly"],
            env=_lib.bench_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

        def read() -> None:
            assert child.stderr is not None
            for line in child.stderr:
                at = time.monotonic() - started
                for name, text in MARKS.items():
                    if text in line:
                        marks.setdefault(name, at)
                if "issue" in marks and "SMTP connection opened" in line:
                    marks.setdefault("first connection", at)

        reader = threading.Thread(target=read)
        reader.start()
        code = child.wait()
        marks["exit"] = time.monotonic() - started
        reader.join()
        time.sleep(0.2)
        sink.record = False
        if code != 0:
            raise RuntimeError(f"digest send exited {code}")
        stamps = [(t - started, c - base) for t, c in sink.stamps if c > base]
        if sink.received - base != n:
            raise RuntimeError(f"the sink got {sink.received - base} of {n}")
        marks["first message"] = stamps[0][0]
        marks["steady"] = steady_start(stamps)
        marks["rate"] = (stamps[-1][1] - stamps[0][1]) / (stamps[-1][0] - stamps[0][0])
        return marks
    finally:
        _lib.discard_database(url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep-templates", action="store_true")
    args = parser.parse_args()
    _lib.ensure_postfix()
    _lib.WORK.mkdir(parents=True, exist_ok=True)
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    for kind in kinds:
        _lib.discard_database(_lib.fresh_database(kind, args.n, "warmup"))
    print(
        f"# first message: N={args.n:,}, the example config's [smtp] defaults; {_lib.machine()};"
        f" {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; load {_lib.load_avg()}",
        flush=True,
    )
    print(f"imports alone (best of 5): {imports_seconds():.3f} s", flush=True)
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    try:
        with _lib.Sink() as sink:
            for run in range(args.runs):
                for kind in kinds:
                    quiet = _lib.wait_quiet()
                    marks = one_run(sink, kind, args.n)
                    rows[kind].append(marks)
                    shown = ", ".join(f"{p} {marks.get(p, float('nan')):.2f}" for p in PHASES)
                    print(
                        f"run {run + 1} {kind:8} {shown} s; steady {marks['rate']:,.0f} msg/s;"
                        f" N / steady {args.n / marks['rate']:.2f} s; {quiet}",
                        flush=True,
                    )
    finally:
        if not args.keep_templates:
            _lib.drop_templates()
        _lib.stop_postfix_daemon()
    print()
    print("| database | " + " | ".join(f"{p} s" for p in PHASES) + " | exit − N / steady s |")
    print("|---" * (len(PHASES) + 2) + "|")
    for kind, runs in rows.items():
        cells = [
            _lib.median_range([m[p] for m in runs if p in m], "{:.2f}") if runs else "-"
            for p in PHASES
        ]
        lost = _lib.median_range([m["exit"] - args.n / m["rate"] for m in runs], "{:.2f}")
        print(f"| {kind} | " + " | ".join(cells) + f" | {lost} |")


if __name__ == "__main__":
    main()
