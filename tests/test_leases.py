"""Leases: renewed by a heartbeat, taken over at once from dead processes, waited for while
their owner lives; commands that exit 0 only when an issue is finished."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from email.parser import BytesHeaderParser
from pathlib import Path

import pytest
import sqlalchemy as sa

from mailer.config.settings import Settings
from mailer.content.store import upsert_articles
from mailer.db.engine import create_engine
from mailer.db.schema import deliveries, events, issues, subscribers
from mailer.delivery import claims, ledger
from mailer.delivery.owners import owner_gone, process_started
from mailer.delivery.pool import SmtpPool
from mailer.delivery.worker import Deliverer, apply_bounce
from mailer.issues.progress import reasons, summarize
from tests.factories import (
    NOW,
    Clock,
    article,
    make_issue,
    make_settings,
    make_subscriber,
    ready_to_send,
    server_settings,
    write_config,
)
from tests.smtp_server import Delay, FaultServer, smtp_server  # noqa: F401
from tests.test_service import process_log, running, spawn, wait_for  # noqa: F401

HOST = socket.gethostname()


def new_issue(engine: sa.Engine, settings: Settings, emails: Sequence[str]) -> int:
    upsert_articles(engine, [article(1, NOW - timedelta(hours=1))], now=NOW)
    for email in emails:
        make_subscriber(engine, email=email)
    issue = make_issue(engine, settings)
    assert issue.recipients == len(emails)
    return issue.issue_id


def leases(engine: sa.Engine) -> dict[int, tuple[str | None, datetime | None]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(deliveries.c.id, deliveries.c.lease_owner, deliveries.c.lease_expires_at)
        ).all()
    return {i: (owner, expires) for i, owner, expires in rows}


def dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---------------------------------------------------------------- library, injected clock


async def test_the_heartbeat_renews_every_lease_held_and_only_those(engine: sa.Engine) -> None:
    settings = make_settings(str(engine.url), smtp__lease_seconds=15)
    issue_id = new_issue(engine, settings, [f"r{n}@example.org" for n in range(6)])
    clock = Clock(NOW)
    async with SmtpPool(settings.smtp) as pool:  # opens nothing until a message is sent
        worker = Deliverer(engine, settings, pool, owner="worker-a", clock=clock)
        claimed = worker.claim(issue_id)
        assert len(claimed) == 6 and worker.leases.held == {d.id for d in claimed}
        assert worker.leases.heartbeat_seconds == 5
        # One row given back, one taken by another worker behind this one's back.
        await worker._release([claimed[0]])
        with engine.begin() as conn:
            conn.execute(
                deliveries.update()
                .where(deliveries.c.id == claimed[1].id)
                .values(lease_owner="worker-b", lease_expires_at=NOW + timedelta(hours=1))
            )
        clock.value = NOW + timedelta(seconds=10)
        assert worker.leases.renew() == 4  # one UPDATE; the row taken over is not renewed
        got = leases(engine)
        renewed = NOW + timedelta(seconds=25)
        assert [got[d.id] for d in claimed[2:]] == [("worker-a", renewed)] * 4
        assert got[claimed[0].id] == (None, None)
        assert got[claimed[1].id][0] == "worker-b"

        # Past the first lease's end, another worker finds nothing to take.
        other = Deliverer(engine, settings, pool, owner="worker-c", clock=lambda: renewed)
        assert [d.id for d in other.claim(issue_id)] == [claimed[0].id]  # the one given back
        # The background task renews by itself.
        worker.leases.heartbeat_seconds = 0.01
        worker.leases._renew_due = 0.0
        clock.value = NOW + timedelta(seconds=20)
        async with worker.leases.kept():
            deadline = time.monotonic() + 10
            while leases(engine)[claimed[2].id][1] != NOW + timedelta(seconds=35):
                assert time.monotonic() < deadline, "the heartbeat never renewed"
                await asyncio.sleep(0.01)


def test_a_group_commit_renews_the_other_held_leases_in_its_transaction(
    engine: sa.Engine,
) -> None:
    settings = make_settings(str(engine.url))
    issue_id = new_issue(engine, settings, ["a@example.org", "b@example.org", "c@example.org"])
    lease = timedelta(seconds=15)
    claimed = claims.claim(engine, owner="w", limit=10, lease=lease, now=NOW, issue_id=issue_id)
    later = NOW + timedelta(seconds=9)
    _, started = ledger.commit_progress(
        engine,
        results=[],
        starts=[claimed[0].id],
        owner="w",
        settings=settings.smtp,
        now=later,
        lease=lease,
        on_bounce=apply_bounce,
        renew=[d.id for d in claimed[1:]],
    )
    assert started == {claimed[0].id}
    assert {expires for _, expires in leases(engine).values()} == {later + lease}


async def test_a_group_commit_that_fails_leaves_its_renewal_due_soon(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(str(engine.url), smtp__lease_seconds=15)
    issue_id = new_issue(engine, settings, ["a@example.org", "b@example.org"])
    async with SmtpPool(settings.smtp) as pool:
        worker = Deliverer(engine, settings, pool, owner="worker-a", clock=Clock(NOW))
        claimed = worker.claim(issue_id)
        worker.leases._renew_due = 0.0  # a renewal is due: the next group commit carries it

        def rolled_back(*args: object, **kwargs: object) -> None:
            assert kwargs["renew"] == sorted(d.id for d in claimed)
            raise sa.exc.OperationalError("UPDATE", {}, Exception("connection reset"))

        monkeypatch.setattr(ledger, "commit_progress", rolled_back)
        with pytest.raises(sa.exc.OperationalError):
            worker.commit([])
        # Owed within a second (heartbeat: 5 s), not a whole heartbeat later.
        assert worker.leases._renew_due <= time.monotonic() + 1.0


def test_owner_gone_knows_dead_pids_reused_pids_and_live_owners() -> None:
    now = datetime.now(UTC)
    assert owner_gone(f"{HOST}:{dead_pid()}", alive_at=now)
    parent = os.getppid()  # alive, started before this test
    assert not owner_gone(f"{HOST}:{parent}", alive_at=now)
    # A live process that started after the owner's last write is another process.
    started = process_started(parent)
    assert started is not None
    assert owner_gone(f"{HOST}:{parent}", alive_at=started - timedelta(seconds=10))
    # Killed but not yet reaped by its parent (a sending process beside the command).
    zombie = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        zombie.kill()
        deadline = time.monotonic() + 10
        while not owner_gone(f"{HOST}:{zombie.pid}", alive_at=now):
            assert time.monotonic() < deadline, "a killed process still counts as alive"
            time.sleep(0.01)
    finally:
        zombie.wait()
    # Another host, or a name cut at the column's width, is never judged from here.
    assert not owner_gone(f"elsewhere.example:{dead_pid()}", alive_at=now)
    assert not owner_gone(f"{'h' * 60}:{dead_pid()}", alive_at=now, hostname="h" * 60)


@pytest.mark.parametrize("in_doubt", ["resend", "hold"])
async def test_a_dead_processs_claims_are_taken_over_at_once(
    engine: sa.Engine,
    smtp_server: FaultServer,  # noqa: F811
    in_doubt: str,
) -> None:
    settings = server_settings(str(engine.url), smtp_server, smtp={"in_doubt": in_doubt})
    emails = [f"r{n}@example.org" for n in range(5)]
    issue_id = new_issue(engine, settings, emails)
    gone = f"{HOST}:{dead_pid()}"
    # Its lease would hold for an hour; one row was in flight when it died.
    claimed = claims.claim(
        engine, owner=gone, limit=10, lease=timedelta(hours=1), now=NOW, issue_id=issue_id
    )
    ledger.commit_progress(
        engine,
        results=[],
        starts=[claimed[0].id],
        owner=gone,
        settings=settings.smtp,
        now=NOW,
        lease=timedelta(hours=1),
        on_bounce=apply_bounce,
    )
    async with SmtpPool(settings.smtp) as pool:
        worker = Deliverer(engine, settings, pool, clock=lambda: NOW + timedelta(seconds=1))
        totals = await worker.drain(issue_id=issue_id)
    got = Counter(r.recipients[0] for r in smtp_server.received)
    if in_doubt == "resend":
        assert totals.counts == {"sent": 5}
        assert got == Counter(emails)
    else:
        assert totals.counts == {"sent": 4}
        assert got == Counter(e for e in emails if e != claimed[0].email)
        with engine.connect() as conn:
            held = conn.execute(
                sa.select(deliveries.c.status).where(deliveries.c.id == claimed[0].id)
            ).scalar_one()
        assert held == "unknown"


# ---------------------------------------------------------------- reasons, retry, resume


def set_rows(engine: sa.Engine, issue_id: int, rows: dict[str, dict[str, object]]) -> None:
    with engine.begin() as conn:
        ids = dict(conn.execute(sa.select(subscribers.c.email, subscribers.c.id)).all())
        for email, values in rows.items():
            conn.execute(
                deliveries.update()
                .where(deliveries.c.issue_id == issue_id, deliveries.c.subscriber_id == ids[email])
                .values(**values)
            )


def test_reasons_count_by_status_and_reply_and_give_the_next_retry(engine: sa.Engine) -> None:
    settings = make_settings(str(engine.url))
    emails = [f"r{n}@example.org" for n in range(6)]
    issue_id = new_issue(engine, settings, emails)
    later = NOW + timedelta(minutes=7)
    set_rows(
        engine,
        issue_id,
        {
            "r0@example.org": {"status": "sent"},
            "r1@example.org": {
                "status": "deferred",
                "last_reply": "451 4.7.1 <r1@example.org>: try later",
                "next_attempt_at": later,
            },
            "r2@example.org": {
                "status": "deferred",
                "last_reply": "451 4.7.1 <r2@example.org>: try later",
                "next_attempt_at": later + timedelta(minutes=3),
            },
            "r3@example.org": {"status": "deferred", "last_reply": "connect: refused"},
            "r4@example.org": {"status": "bounced", "last_reply": "550 5.1.1 no such user"},
            "r5@example.org": {"status": "unknown", "last_reply": "worker stopped while sending"},
        },
    )
    set_rows(engine, issue_id, {"r3@example.org": {"next_attempt_at": later + timedelta(hours=1)}})
    why = reasons(engine, issue_id)
    assert why.by_status == {
        "deferred": [("451 4.7.1 <address>: try later", 2), ("connect: refused", 1)],
        "unknown": [("worker stopped while sending", 1)],
        "bounced": [("550 5.1.1 no such user", 1)],
    }
    assert why.next_retry == later


def cli_run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    from tests.factories import SECRET

    return subprocess.run(
        [sys.executable, "-m", "mailer", "--config", str(config), *args],
        env=dict(os.environ, MAILER_SECRET_KEY=SECRET),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_retry_makes_deferred_and_unknown_due_now_and_reopens_the_issue(
    db_url: str,
    tmp_path: Path,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    smtp = {"host": "127.0.0.1", "port": smtp_server.port, "timeout": 5}
    config = write_config(tmp_path / "mailer.toml", db_url, smtp=smtp)
    engine = create_engine(db_url)
    settings = make_settings(db_url, smtp=smtp)
    emails = [f"r{n}@example.org" for n in range(4)]
    issue_id = new_issue(engine, settings, emails)
    far = datetime.now(UTC) + timedelta(hours=5)
    set_rows(
        engine,
        issue_id,
        {
            "r0@example.org": {"status": "sent"},
            "r1@example.org": {
                "status": "deferred",
                "last_reply": "421 busy",
                "next_attempt_at": far,
            },
            "r2@example.org": {"status": "unknown", "last_reply": "worker stopped while sending"},
            "r3@example.org": {"status": "failed", "last_reply": "message not built: bad"},
        },
    )
    with engine.begin() as conn:  # as finish_if_done leaves it: nothing waiting
        conn.execute(issues.update().values(status="sent", completed_at=NOW))

    shown = cli_run(config, "issues", "show", str(issue_id))
    assert shown.returncode == 0, shown.stderr
    assert "deferred   1" in shown.stdout and "421 busy" in shown.stdout
    assert (
        "next retry " + far.astimezone(settings_zone(settings)).strftime("%Y-%m-%d %H:%M:%S %Z")
        in shown.stdout
    )

    retried = cli_run(config, "issues", "retry", str(issue_id), "--by", "ann")
    assert retried.returncode == 0, retried.stderr
    assert f"issue {issue_id}: 2 deliveries due now" in retried.stdout
    with engine.connect() as conn:  # recorded with who asked, as the console's retry is
        detail = conn.scalar(
            sa.select(events.c.detail).where(events.c.kind == "staff.retry").order_by(events.c.id)
        )
    assert detail == {"by": "ann", "issue": issue_id, "deliveries": 2}
    assert summarize(engine, issue_id).status == "sending"
    due = cli_run(config, "issues", "show", str(issue_id))
    assert "  next attempt due now" in due.stdout and "next retry" not in due.stdout, due.stdout
    sent = cli_run(config, "digest", "send", "weekly")
    # The unbuildable one stays failed: final, so the issue is done.
    assert sent.returncode == 0, sent.stdout + sent.stderr
    got = Counter(r.recipients[0] for r in smtp_server.received)
    assert got == Counter(["r1@example.org", "r2@example.org"]), "no one sent is sent again"
    with engine.connect() as conn:
        message_ids = dict(
            conn.execute(
                sa.select(subscribers.c.email, deliveries.c.message_id).join(
                    deliveries, deliveries.c.subscriber_id == subscribers.c.id
                )
            ).all()
        )
    parser = BytesHeaderParser()
    for received in smtp_server.received:
        header = parser.parsebytes(received.data)["Message-ID"]
        assert header == message_ids[received.recipients[0]], "the same Message-ID"
    assert summarize(engine, issue_id).status == "sent"
    engine.dispose()


def settings_zone(settings: Settings) -> object:
    from zoneinfo import ZoneInfo

    return ZoneInfo(settings.site.timezone)


def test_resume_requeues_what_a_relay_outage_left(engine: sa.Engine) -> None:
    from mailer.issues.progress import resume

    settings = make_settings(str(engine.url))
    emails = [f"r{n}@example.org" for n in range(5)]
    issue_id = new_issue(engine, settings, emails)
    set_rows(
        engine,
        issue_id,
        {
            "r0@example.org": {"status": "sent"},
            "r1@example.org": {"status": "deferred", "next_attempt_at": NOW + timedelta(hours=3)},
            "r2@example.org": {"status": "failed", "last_reply": "connect: refused"},
            "r3@example.org": {"status": "failed", "last_reply": "message not built: bad"},
            "r4@example.org": {"status": "unknown"},
        },
    )
    later = NOW + timedelta(minutes=1)
    assert resume(engine, issue_id, now=later) == 2
    assert resume(engine, issue_id, now=later, resend_unknown=True) == 1  # the unknown one
    with engine.connect() as conn:
        rows = dict(
            conn.execute(
                sa.select(subscribers.c.email, deliveries.c.status).join(
                    deliveries, deliveries.c.subscriber_id == subscribers.c.id
                )
            ).all()
        )
    assert rows == {
        "r0@example.org": "sent",
        "r1@example.org": "queued",
        "r2@example.org": "queued",
        "r3@example.org": "failed",
        "r4@example.org": "queued",
    }
    # Due now, without the deferred one's backoff, and its old reply cleared.
    with engine.connect() as conn:
        due = conn.execute(
            sa.select(deliveries.c.next_attempt_at, deliveries.c.last_reply).where(
                deliveries.c.status == "queued"
            )
        ).all()
    assert [tuple(row) for row in due] == [(later, None)] * 3


# ---------------------------------------------------------------- real processes


def prepare(
    db_url: str, tmp_path: Path, server: FaultServer, emails: Sequence[str], **smtp: object
) -> tuple[Path, sa.Engine]:
    config = ready_to_send(db_url, tmp_path / "mailer.toml", server, emails, smtp=smtp)
    return config, create_engine(db_url)


def test_kill_9_mid_send_then_send_again_finishes_within_seconds(
    db_url: str,
    tmp_path: Path,
    smtp_server: FaultServer,  # noqa: F811
    process_log: Path,  # noqa: F811
) -> None:
    connections = 4
    emails = [f"r{n}@example.org" for n in range(200)]
    # The default lease (15 s): no lease_seconds given.
    config, engine = prepare(
        db_url, tmp_path, smtp_server, emails, connections=connections, batch_size=50
    )
    for email in emails:
        smtp_server.script(email, [Delay(0.02)], stage="data")
    send = spawn(config, process_log, "digest", "send", "weekly")
    try:
        wait_for(lambda: len(smtp_server.received) >= 40, process_log, "40 messages sent")
    finally:
        send.send_signal(signal.SIGKILL)
        send.wait()
    assert len(smtp_server.received) < len(emails), "the kill should land mid-send"
    started = time.monotonic()
    again = spawn(config, process_log, "digest", "send", "weekly")
    assert again.wait(timeout=60) == 0, process_log.read_text()
    assert time.monotonic() - started < 20, process_log.read_text()
    got = Counter(r.recipients[0] for r in smtp_server.received)
    assert set(got) == set(emails), "every subscriber received the issue"
    assert sum(n - 1 for n in got.values()) <= connections, "at most one per connection"
    with engine.connect() as conn:
        assert Counter(conn.scalars(sa.select(deliveries.c.status))) == {"sent": len(emails)}
    engine.dispose()


def test_relay_down_then_up_exits_1_with_the_reason_then_delivers_each_once(
    db_url: str,
    tmp_path: Path,
    process_log: Path,  # noqa: F811
) -> None:
    connections = 2
    emails = [f"r{n}@example.org" for n in range(12)]
    first = FaultServer().start()
    port = first.port
    for email in emails:
        first.script(email, [Delay(0.2)], stage="data")
    config, engine = prepare(db_url, tmp_path, first, emails, connections=connections)
    # The relay answers the start check, then goes away mid-send.
    send = spawn(config, process_log, "digest", "send", "weekly")
    try:
        wait_for(lambda: len(first.received) >= 2, process_log, "two messages sent")
    finally:
        first.stop()
    assert send.wait(timeout=60) == 1, process_log.read_text()
    line = process_log.read_text().strip().splitlines()[-1]
    assert line.startswith("error: issue 1 not finished: "), line
    assert " deferred; most got: " in line, line
    assert "; next retry 20" in line and (" EST" in line or " EDT" in line), line
    assert "`mailer issues retry 1` retries now" in line
    shown = cli_run(config, "issues", "show", "1")
    assert "deferred" in shown.stdout and "next retry" in shown.stdout, shown.stdout
    before = Counter(r.recipients[0] for r in first.received)

    with FaultServer(port=port) as relay:  # up again, on the same port
        retried = cli_run(config, "issues", "retry", "1")
        assert retried.returncode == 0, retried.stderr
        assert "deliveries due now" in retried.stdout, retried.stdout
        up = cli_run(config, "digest", "send", "weekly")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "issue 1 resuming" in up.stdout
        after = Counter(r.recipients[0] for r in relay.received)
    got = before + after
    assert set(got) == set(emails), "every subscriber received the issue"
    # A message cut off with the relay may have reached it: at most one per connection.
    assert sum(n - 1 for n in got.values()) <= connections, got
    assert summarize(engine, 1).status == "sent"
    engine.dispose()


@pytest.mark.parametrize(
    "command", [("digest", "send", "weekly"), ("worker", "--drain")], ids=["send", "drain"]
)
def test_a_drain_waits_for_a_live_workers_lease_says_so_then_finishes(
    db_url: str,
    tmp_path: Path,
    smtp_server: FaultServer,  # noqa: F811
    process_log: Path,  # noqa: F811
    command: tuple[str, ...],
) -> None:
    emails = [f"r{n}@example.org" for n in range(6)]
    # Short leases: the drain looks again every heartbeat (0.2 s), so the test waits on what it
    # prints, not on the clock.
    config, engine = prepare(db_url, tmp_path, smtp_server, emails, lease_seconds=0.6)
    issue = make_issue(engine, make_settings(db_url), at=datetime.now(UTC))
    assert issue.recipients == len(emails)
    issue_id = issue.issue_id
    # Another worker, alive (this test's process), holds three of the issue's deliveries.
    holder = f"{HOST}:{os.getpid()}"
    with engine.connect() as conn:
        held = list(conn.scalars(sa.select(deliveries.c.id).order_by(deliveries.c.id).limit(3)))

    def hold(seconds: float) -> None:
        now = datetime.now(UTC)
        with engine.begin() as conn:
            conn.execute(
                deliveries.update()
                .where(deliveries.c.id.in_(held))
                .values(
                    lease_owner=holder,
                    lease_expires_at=now + timedelta(seconds=seconds),
                    updated_at=now,
                )
            )

    hold(30)  # outlasts the command's start; it waits a heartbeat (0.6 s / 3) at a time
    waiting = f"waiting for 3 deliveries held by {holder} (lease renewed"
    with running(config, process_log, *command) as drain:
        wait_for(lambda: waiting in process_log.read_text(), process_log, "the drain to wait")
        assert len(smtp_server.received) == 3, "the rest went out meanwhile"
        hold(30)  # renewed: still alive, still waited for
        seen = process_log.read_text().count(waiting)
        wait_for(lambda: process_log.read_text().count(waiting) > seen, process_log, "another wait")
        assert len(smtp_server.received) == 3
        # The holder gives them back unsent: the drain sends them.
        ledger.release(engine, held, owner=holder, now=datetime.now(UTC))
        assert drain.wait(timeout=30) == 0, process_log.read_text()
    assert Counter(r.recipients[0] for r in smtp_server.received) == Counter(emails)
    assert summarize(engine, issue_id).status == "sent"
    engine.dispose()


def held_elsewhere(engine: sa.Engine, issue_id: int, *, lease: timedelta) -> list[int]:
    """Every delivery of the issue claimed at NOW by a worker on another host (never judged
    gone from here); their ids."""
    claimed = claims.claim(
        engine, owner="elsewhere.example:1", limit=100, lease=lease, now=NOW, issue_id=issue_id
    )
    return [d.id for d in claimed]


async def test_a_lease_that_ends_between_the_claim_and_the_wait_is_not_left_behind(
    engine: sa.Engine,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    settings = server_settings(str(engine.url), smtp_server)
    emails = [f"r{n}@example.org" for n in range(3)]
    issue_id = new_issue(engine, settings, emails)
    # Held by a worker on another host (never judged gone from here) until NOW + 1.5 s.
    held_elsewhere(engine, issue_id, lease=timedelta(seconds=1.5))
    ticks = iter(range(10_000))

    def clock() -> datetime:  # two seconds pass between any two readings
        return NOW + timedelta(seconds=2 * next(ticks))

    told: list[str] = []
    async with SmtpPool(settings.smtp) as pool:
        worker = Deliverer(engine, settings, pool, clock=clock)
        totals = await worker.drain(
            issue_id=issue_id, on_wait=lambda hs, at: told.extend(h.describe(at) for h in hs)
        )
    # The claim (at NOW) found them held; by the look after it the lease had ended: they are
    # claimed again and sent, not left behind by a drain that thinks nothing is held.
    assert told and told[0].startswith("3 deliveries held by elsewhere.example:1")
    assert totals.counts == {"sent": 3}
    assert Counter(r.recipients[0] for r in smtp_server.received) == Counter(emails)


async def test_a_drain_tells_what_it_waits_for_when_the_holders_change_not_every_batch(
    engine: sa.Engine,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    settings = server_settings(str(engine.url), smtp_server)
    issue_id = new_issue(engine, settings, [f"r{n}@example.org" for n in range(30)])
    # Another host's worker holds the whole issue (15 s leases: a heartbeat every 5 s).
    held = held_elsewhere(engine, issue_id, lease=timedelta(minutes=5))
    clock = Clock(NOW)
    told: list[tuple[str, int]] = []
    at_once = asyncio.Event()
    at_once.set()  # no pause between looks: the test moves the clock itself

    async def look(worker: Deliverer) -> None:
        def tell(holdings: Sequence[ledger.Holding], at: datetime) -> None:
            told.extend((h.owner, h.count) for h in holdings)

        assert await worker.wait_for_others(issue_id, on_wait=tell, stop=at_once)

    async with SmtpPool(settings.smtp) as pool:
        worker = Deliverer(engine, settings, pool, clock=clock)
        # The holder sends one message every quarter second for six seconds.
        for step in range(24):
            set_sent(engine, held[step])
            await look(worker)
            clock.value += timedelta(milliseconds=250)
        with engine.begin() as conn:  # then another worker holds what is left
            conn.execute(
                deliveries.update()
                .where(deliveries.c.lease_owner == "elsewhere.example:1")
                .values(lease_owner="other.example:2")
            )
        await look(worker)
    assert told == [
        ("elsewhere.example:1", 29),  # the first look
        ("elsewhere.example:1", 9),  # a heartbeat interval (5 s) later
        ("other.example:2", 6),  # the holders changed
    ]


def set_sent(engine: sa.Engine, delivery_id: int) -> None:
    with engine.begin() as conn:
        conn.execute(
            deliveries.update()
            .where(deliveries.c.id == delivery_id)
            .values(status="sent", lease_owner=None, lease_expires_at=None)
        )
