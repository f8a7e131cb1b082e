"""The database layer: schema checks without Alembic, read-only transactions, the writer lock."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory

from mailer.db.engine import (
    MIGRATIONS_DIR,
    SCHEMA_HEAD,
    check_schema,
    create_engine,
    current_revision,
    reading,
    writing,
)
from mailer.db.writelock import WriteLock
from mailer.errors import MailerError


def test_schema_head_is_the_newest_migration(engine: sa.Engine) -> None:
    assert ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head() == SCHEMA_HEAD
    assert current_revision(engine) == SCHEMA_HEAD
    check_schema(engine)


def test_check_schema_names_an_old_or_missing_schema(engine: sa.Engine, tmp_path: Path) -> None:
    set_version = sa.text("UPDATE alembic_version SET version_num = :v")
    with engine.begin() as conn:
        conn.execute(set_version, {"v": "0003"})
    try:
        with pytest.raises(MailerError, match=f"at revision 0003, code expects {SCHEMA_HEAD}"):
            check_schema(engine)
    finally:
        # The PostgreSQL test database is shared by the session: put the revision back.
        with engine.begin() as conn:
            conn.execute(set_version, {"v": SCHEMA_HEAD})
    empty = create_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        assert current_revision(empty) is None
        with pytest.raises(MailerError, match="not initialized: run `mailer init`"):
            check_schema(empty)
    finally:
        empty.dispose()


def test_writing_commits_or_rolls_back(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE scratch (x INTEGER)"))
    try:
        with writing(engine) as conn:
            conn.execute(sa.text("INSERT INTO scratch VALUES (1)"))
        with pytest.raises(RuntimeError), writing(engine) as conn:
            conn.execute(sa.text("INSERT INTO scratch VALUES (2)"))
            raise RuntimeError("abandon")
        with reading(engine) as conn:
            assert conn.execute(sa.text("SELECT x FROM scratch")).scalars().all() == [1]
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE scratch"))


def test_sqlite_reading_does_not_wait_for_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))
            conn.execute(sa.text("INSERT INTO t VALUES (1)"))
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process's write transaction, open
        other.execute("INSERT INTO t VALUES (2)")
        started = time.monotonic()
        with reading(engine) as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM t")).scalar() == 1
        assert time.monotonic() - started < 1.0  # no busy wait: the snapshot before the insert
        other.execute("ROLLBACK")
        other.close()
    finally:
        engine.dispose()


def _hold(path: str, held: multiprocessing.synchronize.Event, seconds: float) -> None:
    with WriteLock(Path(path)):
        held.set()
        time.sleep(seconds)


def test_write_lock_queues_processes_and_dies_with_its_holder(tmp_path: Path) -> None:
    path = tmp_path / "db-writers"
    ctx = multiprocessing.get_context("spawn")
    held = ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(path), held, 60.0))
    holder.start()
    try:
        assert held.wait(30)
        lock = WriteLock(path)
        got = threading.Event()

        def take() -> None:
            with lock:
                got.set()

        waiter = threading.Thread(target=take)
        waiter.start()
        assert not got.wait(0.3)  # the other process holds it
        assert holder.pid is not None
        os.kill(holder.pid, signal.SIGKILL)  # the kernel lets go of a dead holder's lock
        assert got.wait(10)
        waiter.join(10)
    finally:
        holder.kill()
        holder.join()


def test_write_lock_queues_threads(tmp_path: Path) -> None:
    lock = WriteLock(tmp_path / "db-writers")
    inside = 0
    most = 0
    guard = threading.Lock()

    def work() -> None:
        nonlocal inside, most
        for _ in range(50):
            with lock:
                with guard:
                    inside += 1
                    most = max(most, inside)
                time.sleep(0.0005)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 1


def test_writers_of_two_engines_on_one_file_take_turns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    engines = [create_engine(url), create_engine(url)]
    try:
        with engines[0].begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))

        def add(engine: sa.Engine) -> None:
            for i in range(200):
                with writing(engine) as conn:
                    conn.execute(sa.text("INSERT INTO t VALUES (:x)"), {"x": i})

        threads = [threading.Thread(target=add, args=(e,)) for e in engines]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with reading(engines[0]) as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM t")).scalar() == 400
    finally:
        for e in engines:
            e.dispose()


def test_migrations_build_the_schema_the_code_declares(engine: sa.Engine) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from mailer.db.schema import metadata

    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diffs == []


def test_sqlite_claims_read_their_batch_off_the_claim_indexes(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from mailer.delivery import claims

    engine = create_engine(f"sqlite:///{tmp_path / 'plan.db'}")
    try:
        from mailer.db.engine import migrate

        migrate(engine)
        seen: list[tuple[str, object]] = []

        @sa.event.listens_for(engine, "before_cursor_execute")
        def record(
            conn: object, cursor: object, statement: str, params: object, *rest: object
        ) -> None:
            if statement.startswith("SELECT deliveries.id, deliveries.priority"):
                seen.append((statement, params))

        now = datetime.now(UTC)
        for issue_id in (None, 1):
            claims.claim(
                engine,
                owner="w",
                limit=10,
                lease=timedelta(seconds=60),
                now=now,
                issue_id=issue_id,
            )
        sa.event.remove(engine, "before_cursor_execute", record)
        plans = []
        with engine.connect() as conn:
            for statement, params in seen:
                rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params)  # type: ignore[arg-type]
                plans.append(" | ".join(str(r[-1]) for r in rows))
        waiting = [p for s, p in zip(seen, plans, strict=True) if "'queued', 'deferred'" in s[0]]
        assert len(waiting) == 2
        assert "USING INDEX ix_deliveries_waiting" in waiting[0]
        assert "USING INDEX ix_deliveries_issue_waiting" in waiting[1]
        assert not any("TEMP B-TREE" in p for p in waiting), waiting
        # The rows in flight: the small partial index, never a walk over the whole issue.
        sending = [p for s, p in zip(seen, plans, strict=True) if "'sending'" in s[0]]
        assert len(sending) == 2
        assert all("USING INDEX ix_deliveries_sending" in p for p in sending), sending
        assert "TEMP B-TREE" not in sending[1], sending
    finally:
        engine.dispose()


def test_writing_waits_for_another_process_holding_the_writer_lock(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    engine = create_engine(f"sqlite:///{path}")
    ctx = multiprocessing.get_context("spawn")
    held = ctx.Event()
    holder = ctx.Process(target=_hold, args=(f"{path}-writers", held, 60.0))
    holder.start()
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))
        assert held.wait(30)
        done = threading.Event()

        def write() -> None:
            with writing(engine) as conn:
                conn.execute(sa.text("INSERT INTO t VALUES (1)"))
            done.set()

        writer = threading.Thread(target=write)
        writer.start()
        assert not done.wait(0.5), "writing() did not queue behind the other process"
        assert holder.pid is not None
        os.kill(holder.pid, signal.SIGKILL)
        assert done.wait(10)
        writer.join(10)
    finally:
        holder.kill()
        holder.join()
        engine.dispose()
