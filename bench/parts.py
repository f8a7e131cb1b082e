"""The parts of one message's cost, measured alone, so the next bottleneck is visible.

* render: a full render of one topic set (Jinja2 HTML and text, CSS inlined, the MIME message
  serialized once and cut for splicing), and what it costs per message when N share 7 sets;
* build: ``DigestComposer.message`` for one recipient (the splice, links signed, Date);
* DKIM: ``DkimSigner.sign`` with an RSA-2048 key (OpenSSL);
* SMTP: ``SmtpPool.send`` into Postfix's smtp-sink over C connections, CPU per message, next to
  aiosmtplib's own ``sendmail`` on the same connections (what the pool used before);
* DB: ``claims.claim`` (batches of 500) and ``ledger.commit_progress`` (group commits of G
  outcomes and G in-flight marks; G = 8 and 32 by default) per message, on SQLite and
  PostgreSQL, with each commit's wall time and, on PostgreSQL, the server's CPU per commit
  (every server process of this machine, from /proc);
* ``--profile``: py-spy (installed into .venv if missing) samples ``mailer digest send``
  (one process, SQLite) and the samples are summed per part of the hot path.

CPU times are process (or thread) CPU seconds, medians of ``--runs``.

    .venv/bin/python bench/parts.py --runs 5 --profile
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import _lib

TABLE: list[tuple[str, str, str]] = []


def row(part: str, value: str, note: str) -> None:
    TABLE.append((part, value, note))
    print(f"{part:45} {value:>22}  {note}", flush=True)


def composer_and_recipients(n: int) -> tuple[object, list[object], datetime]:
    from mailer.compose.messages import DigestComposer
    from mailer.compose.rendering import Renderer
    from mailer.models import Recipient

    settings = _lib.load_bench_settings(_lib.WORK / "sample.toml")
    now = datetime.now(UTC)
    content = _lib.issue_content(now)
    composer = DigestComposer(settings, content, renderer=Renderer())
    recipients = [
        Recipient(
            email=f"reader{i}@example.org",
            name=f"Reader {i}",
            uid=f"{i:022d}",
            message_id=f"<weekly.202611271200.1.{i:022d}@news.example.org>",
        )
        for i in range(n)
    ]
    return composer, recipients, now


def measure_render_build(runs: int, n: int) -> None:
    renders, builds = [], []
    for _ in range(runs):
        composer, recipients, _ = composer_and_recipients(n)
        t = time.process_time()
        for topics in _lib.VARIANTS:
            composer.spliced(topics)  # type: ignore[attr-defined]
        renders.append((time.process_time() - t) / len(_lib.VARIANTS))
        t = time.process_time()
        for i, r in enumerate(recipients):
            composer.message(r, _lib.variant_of(i), datetime.now(UTC))  # type: ignore[attr-defined]
        builds.append((time.process_time() - t) / n)
    render = statistics.median(renders)
    row("render, one topic set", f"{render * 1e6:,.0f} µs", "7 sets per issue")
    row("render, per message (N=10,000)", f"{render * 7 / 10_000 * 1e6:.2f} µs", "7 renders / N")
    row(
        "build (splice) per message",
        _lib.median_range([b * 1e6 for b in builds], "{:.1f}") + " µs",
        "",
    )


def measure_dkim(runs: int, n: int) -> None:
    import send

    from mailer.compose.dkim import DkimSigner, load_private_key

    composer, recipients, now = composer_and_recipients(n)
    messages = [composer.message(r, _lib.VARIANTS[-1], now) for r in recipients]  # type: ignore[attr-defined]
    signer = DkimSigner("news.example.org", "bench", load_private_key(send.dkim_key()))
    times = []
    for _ in range(runs):
        t = time.process_time()
        for m in messages:
            signer.sign(m, now=now)
        times.append((time.process_time() - t) / n)
    row(
        "DKIM sign (RSA-2048, OpenSSL) per message",
        _lib.median_range([x * 1e6 for x in times]) + " µs",
        "",
    )


async def _smtp_run(port: int, message: bytes, n: int, connections: int, own: bool) -> float:
    """CPU seconds per message for n sends over `connections` lanes."""
    import aiosmtplib

    from mailer.delivery.pool import SmtpPool

    settings = _lib.load_bench_settings(_lib.WORK / "sample.toml")
    smtp = replace(settings.smtp, port=port, connections=connections)
    todo = list(range(n))
    if own:
        async with SmtpPool(smtp, local_hostname="bench.local") as pool:

            async def lane() -> None:
                while todo:
                    i = todo.pop()
                    result = await pool.send(_lib.SENDER, f"r{i}@example.org", message)
                    assert result.code == 250, result

            await pool.send(_lib.SENDER, "warm@example.org", message)  # open the connections
            t = time.process_time()
            await asyncio.gather(*(lane() for _ in range(connections)))
            return (time.process_time() - t) / n
    clients = []
    for _ in range(connections):
        c = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=port, local_hostname="bench.local", start_tls=False
        )
        await c.connect()
        clients.append(c)

    async def client_lane(c: aiosmtplib.SMTP) -> None:
        while todo:
            i = todo.pop()
            await c.sendmail(_lib.SENDER, [f"r{i}@example.org"], message)

    t = time.process_time()
    await asyncio.gather(*(client_lane(c) for c in clients))
    cpu = (time.process_time() - t) / n
    for c in clients:
        await c.quit()
    return cpu


def measure_smtp(runs: int, n: int, connections: int) -> None:
    settings = _lib.load_bench_settings(_lib.WORK / "sample.toml")
    _, message = _lib.mean_message_size(settings)
    ours, theirs = [], []
    with _lib.Sink() as sink:
        for _ in range(runs):
            ours.append(asyncio.run(_smtp_run(sink.port, message, n, connections, True)))
            theirs.append(asyncio.run(_smtp_run(sink.port, message, n, connections, False)))
    note = f"{len(message):,} bytes, {connections} connections"
    row("SMTP: SmtpPool.send per message", _lib.median_range([x * 1e6 for x in ours]) + " µs", note)
    row(
        "SMTP: aiosmtplib sendmail per message",
        _lib.median_range([x * 1e6 for x in theirs]) + " µs",
        "the path before",
    )


def measure_db(kind: str, runs: int, n: int, group: int) -> None:
    from mailer.clock import now
    from mailer.compose.rendering import Renderer
    from mailer.db.engine import create_engine
    from mailer.delivery import claims, ledger
    from mailer.delivery.policy import Outcome, SendResult, Stage
    from mailer.delivery.worker import apply_bounce
    from mailer.issues.staff import open_issue

    claim_cpu, commits, server, commit_wall = [], [], [], []
    ok = SendResult(Outcome.SENT, 250, "2.0.0 Ok: queued as 4F2C91234", Stage.DATA)
    lease = timedelta(minutes=5)
    for run in range(runs):
        url = _lib.fresh_database(kind, n, f"parts-{run}")
        engine = create_engine(url)
        try:
            config = _lib.write_config(
                _lib.WORK / "parts-db.toml", db_url=url, smtp_port=25, connections=group
            )
            settings = _lib.load_bench_settings(config)
            issue = open_issue(
                engine, settings, settings.digest("weekly"), now=now(), renderer=Renderer()
            )
            batches = []
            t = time.process_time()
            for _ in range(min(10, n // 500)):
                batches += claims.claim(
                    engine,
                    owner="parts",
                    limit=500,
                    lease=lease,
                    now=now(),
                    issue_id=issue.issue_id,
                )
            claim_cpu.append((time.process_time() - t) / len(batches))
            previous: list[claims.Claimed] = []
            t = time.process_time()
            wall = time.perf_counter()
            served = _lib.postgres_cpu_seconds() if kind == "postgres" else 0.0
            groups = 0
            for i in range(0, len(batches), group):
                groups += 1
                chunk = batches[i : i + group]
                ledger.commit_progress(
                    engine,
                    results=[ledger.Result(d, ok) for d in previous],
                    starts=[d.id for d in chunk],
                    owner="parts",
                    settings=settings.smtp,
                    now=now(),
                    lease=lease,
                    on_bounce=apply_bounce,
                )
                previous = chunk
            commits.append((time.process_time() - t) / len(batches))
            commit_wall.append((time.perf_counter() - wall) / groups)
            if kind == "postgres":
                server.append((_lib.postgres_cpu_seconds() - served) / groups)
        finally:
            engine.dispose()
            _lib.discard_database(url)
    row(
        f"DB {kind}: claim per message",
        _lib.median_range([x * 1e6 for x in claim_cpu]) + " µs",
        f"batches of 500, N={n:,}",
    )
    row(
        f"DB {kind}: group commit per message",
        _lib.median_range([x * 1e6 for x in commits]) + " µs",
        f"groups of {group}; each commit {_lib.median_range([x * 1e6 for x in commit_wall])} µs"
        " wall",
    )
    if server:
        row(
            f"DB {kind}: the server's CPU per group commit",
            _lib.median_range([x * 1e6 for x in server]) + " µs",
            f"groups of {group}: {_lib.median_range([x * 1e6 / group for x in server])} µs"
            " per message (every server process)",
        )


PARTS = {
    "compose": "DigestComposer.message",
    "  of which links (HMAC tokens)": "cached_property.__get__",
    "SMTP (SmtpPool.send)": "SmtpPool.send",
    "  of which reply parsing": "_Replies.data_received",
    "group commits (thread)": "Deliverer.commit",
    "claims (thread)": "Deliverer.claim",
    "asyncio event loop, all callbacks": "BaseEventLoop._run_once",
    "imports (start-up)": "_find_and_load",
}


def profile(n: int) -> None:
    """py-spy, GIL-holding samples of `mailer digest send` (one process, SQLite)."""
    raw = _lib.WORK / "profile.raw"
    with _lib.Sink() as sink:
        url = _lib.fresh_database("sqlite", n, "profile")
        config = _lib.write_config(
            _lib.WORK / "profile.toml", db_url=url, smtp_port=sink.port, connections=32
        )
        command = [str(_lib.MAILER), "--config", str(config), "digest", "send", "weekly"]
        try:
            _lib.py_spy(command, raw, mode="--gil", rate=250)
        finally:
            _lib.discard_database(url)
    total = 0
    parts: collections.Counter[str] = collections.Counter()
    for frames, count in _lib.stacks(raw):
        total += count
        for name, needle in PARTS.items():
            if needle in frames:
                parts[name] += count
    print(f"\nprofile: py-spy --gil, {total:,} samples at 250 Hz, `mailer digest send`, N={n:,}")
    print("| part of the hot path | share of GIL-holding samples |")
    print("|---|---|")
    for name in PARTS:
        print(f"| {name} | {parts[name] / total:.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--n", type=int, default=10_000, help="messages per SMTP/build run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument(
        "--group", type=int, nargs="+", default=[8, 32], help="outcomes per group commit"
    )
    parser.add_argument("--claim-n", type=int, default=100_000, help="rows in the claim's issue")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    _lib.ensure_postfix()
    _lib.write_config(_lib.WORK / "sample.toml", db_url="sqlite://", smtp_port=25, connections=1)
    print(
        f"# parts: {_lib.machine()}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC;"
        f" load {_lib.load_avg()}",
        flush=True,
    )
    try:
        measure_render_build(args.runs, args.n)
        measure_dkim(args.runs, min(args.n, 2000))
        measure_smtp(args.runs, args.n, args.connections)
        for kind in ("sqlite", "postgres"):
            for group in args.group:
                measure_db(kind, args.runs, 10_000, group)
            if args.claim_n != 10_000:
                measure_db(kind, 1, args.claim_n, args.group[0])
        if args.profile:
            profile(args.n)
    finally:
        _lib.stop_postfix_daemon()
    print("\n| part | per message (median, min–max) | note |")
    print("|---|---|---|")
    for part, value, note in TABLE:
        print(f"| {part} | {value} | {note} |")


if __name__ == "__main__":
    main()
