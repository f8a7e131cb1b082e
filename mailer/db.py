"""Engines and migrations: SQLite (WAL, busy timeout, foreign keys) or PostgreSQL, one code path.

Alembic is imported only to migrate: every other command checks the schema against
``SCHEMA_HEAD`` with one query (importing Alembic, and Mako and Pygments through it, cost a
quarter of a second at every start).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from mailer.errors import MailerError
from mailer.writelock import WriteLock

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "db"
SQLITE_BUSY_TIMEOUT_MS = 10_000
# The newest migration in db/versions (tests/test_store.py checks it against Alembic's head).
SCHEMA_HEAD = "0007"
# A Connection execution option: the transaction only reads (see _sqlite_begin).
READ_ONLY = "mailer_read_only"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin(conn: sa.Connection) -> None:
    # pysqlite's own BEGIN handling defers the write lock to the first write, so two claimers
    # could both read the same rows; BEGIN IMMEDIATE takes the lock at the start instead.
    # A transaction opened by reading() only reads: a deferred BEGIN reads a WAL snapshot and
    # leaves the write lock to the writers.
    if conn.get_execution_options().get(READ_ONLY):
        conn.exec_driver_sql("BEGIN")
    else:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


_WRITE_LOCKS: dict[str, WriteLock] = {}


@contextmanager
def writing(engine: sa.Engine) -> Iterator[sa.Connection]:
    """``engine.begin()`` for the delivery path's frequent small writes.

    On SQLite a writer that finds the database locked sleeps in SQLite's busy handler (1, 2,
    5, 10 ms ...) even when the lock is free again a few microseconds later; with two
    processes sending, those sleeps stalled every lane waiting for a group commit. Writers
    queue on a kernel file lock first (``mailer.writelock``), which wakes the next one at
    once. SQLite's own lock still guards the data; other writers keep the busy handler.
    """
    lock = _write_lock(engine)
    if lock is None:
        with engine.begin() as conn:
            yield conn
        return
    with lock, engine.begin() as conn:
        yield conn


@contextmanager
def reading(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A connection whose transactions only read (no write lock on SQLite)."""
    with engine.connect() as conn:
        yield conn.execution_options(**{READ_ONLY: True})


def _write_lock(engine: sa.Engine) -> WriteLock | None:
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        return None
    lock = _WRITE_LOCKS.get(database)
    if lock is None:
        lock = _WRITE_LOCKS[database] = WriteLock(Path(f"{database}-writers"))
    return lock


def refresh_statistics(engine: sa.Engine, table: sa.Table) -> None:
    """Have PostgreSQL re-read ``table``'s statistics after a bulk write (an issue's snapshot).

    Until autovacuum gets to it (a minute or more), the planner sees the table as it was: it
    then joined a claim's 500 rows to every subscriber by hashing the whole table and leased
    them by a sequential scan (at 20,000 recipients: 21 µs per message for the claim's read
    instead of 8). ANALYZE samples a bounded number of rows, so it costs about the same at any
    size, and blocks no reader or writer. SQLite is left alone: its claims are planned from the
    partial indexes alone, and statistics would only let its planner choose differently.
    """
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.exec_driver_sql(f"ANALYZE {table.name}")


def upsert_insert(conn: sa.Connection, table: sa.Table) -> Any:
    """An INSERT with the dialect's ``on_conflict_do_nothing`` / ``on_conflict_do_update``."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


def normalize_url(url: str) -> str:
    """Pick the driver: psycopg 3 for PostgreSQL unless the URL names one."""
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def create_engine(url: str, **kwargs: Any) -> sa.Engine:
    """An engine configured for this project (sync: small writes cost 0.2 ms, not 1.4 ms async)."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = sa.create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "isolation_level": None},
            **kwargs,
        )
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        sa.event.listen(engine, "begin", _sqlite_begin)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("connect_args", {"connect_timeout": 10})
    return sa.create_engine(url, **kwargs)


def _alembic_config(engine: sa.Engine) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    if not (MIGRATIONS_DIR / "env.py").exists():
        raise MailerError(
            f"migrations not found at {MIGRATIONS_DIR} (install the project with pip -e)"
        )
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["engine"] = engine
    return config


def migrate(engine: sa.Engine) -> str:
    """Create or upgrade the database to the newest schema; returns the revision reached."""
    from alembic import command
    from alembic.script import ScriptDirectory

    config = _alembic_config(engine)
    try:
        command.upgrade(config, "head")
    except sa.exc.OperationalError as exc:
        raise MailerError(
            f"cannot migrate {engine.url.render_as_string(hide_password=True)}: {exc.orig}"
        ) from exc
    head = ScriptDirectory.from_config(config).get_current_head()
    return head or ""


def migrations_head(engine: sa.Engine) -> str | None:
    """The newest revision in db/versions, as Alembic reads it."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config(engine)).get_current_head()


def current_revision(engine: sa.Engine) -> str | None:
    """The revision the database is at (None: never migrated)."""
    with reading(engine) as conn:
        if not sa.inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()


def check_schema(engine: sa.Engine) -> None:
    """Refuse to run against a database that ``mailer init`` has not brought up to date."""
    head = SCHEMA_HEAD
    try:
        current = current_revision(engine)
    except sa.exc.OperationalError as exc:
        raise MailerError(f"cannot open the database: {exc.orig}") from exc
    if current != head:
        state = (
            "not initialized" if current is None else f"at revision {current}, code expects {head}"
        )
        raise MailerError(f"the database is {state}: run `mailer init`")
