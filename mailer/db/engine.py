"""Engines and migrations: SQLite (WAL, busy timeout, foreign keys) or PostgreSQL, one code path.

Alembic is imported only to migrate: every other command checks the schema against
``SCHEMA_HEAD`` with one query (importing Alembic, and Mako and Pygments through it, cost a
quarter of a second at every start).
"""

from __future__ import annotations

import logging
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from mailer.db.writelock import WriteLock
from mailer.errors import DatabaseUnavailable, MailerError

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

    from mailer.config.settings import Digest

log = logging.getLogger(__name__)

# Package data: a wheel installs it as plain files, and Alembic wants a directory path.
MIGRATIONS_DIR = Path(str(resources.files("mailer.db") / "migrations"))
SQLITE_BUSY_TIMEOUT_MS = 10_000
# The newest migration in migrations/versions (tests/test_db.py checks it against
# Alembic's head).
SCHEMA_HEAD = "0015"
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
    queue on a kernel file lock first (``mailer.db.writelock``), which wakes the next one at
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
    """An engine configured for this project (sync: small writes cost 0.2 ms, not 1.4 ms async).

    A lost or refused connection raises ``DatabaseUnavailable`` (see ``_unavailable``).
    """
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = sa.create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "isolation_level": None},
            **kwargs,
        )
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        sa.event.listen(engine, "begin", _sqlite_begin)
    else:
        kwargs.setdefault("pool_pre_ping", True)
        kwargs.setdefault("connect_args", {"connect_timeout": 10})
        engine = sa.create_engine(url, **kwargs)
    sa.event.listen(engine, "handle_error", _unavailable)
    return engine


# SQLSTATE classes and codes that mean the server is gone or not accepting us yet: 08 connection
# exceptions, 57P01-57P03 admin/crash shutdown and "cannot connect now" (starting up or shutting
# down), 53300 too many connections. Other OperationalErrors (a statement timeout, a lock not
# available) are the statement's, not an outage.
_OUTAGE_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300")
# SQLite has no server: only a file that cannot be opened (a vanished mount) is an outage.
_SQLITE_OUTAGE = ("unable to open database file", "disk i/o error")


def is_outage(error: BaseException, dialect: str) -> bool:
    """Whether a driver exception means the database is unreachable (worth waiting out)."""
    if dialect == "sqlite":
        text = str(error).lower()
        return isinstance(error, sqlite3.OperationalError) and text.startswith(_SQLITE_OUTAGE)
    # psycopg is imported by the dialect only when a PostgreSQL engine is made (it costs start-up
    # time an SQLite user need not pay); if it is not loaded, the error cannot be one of its own.
    psycopg = sys.modules.get("psycopg")
    if psycopg is None:
        return False
    if isinstance(error, psycopg.InterfaceError):
        return True  # the connection is closed
    if not isinstance(error, psycopg.OperationalError):
        return False
    sqlstate: str | None = error.sqlstate
    # No SQLSTATE: libpq failed to connect (refused, reset, timed out, name not resolved).
    return sqlstate is None or sqlstate.startswith(_OUTAGE_SQLSTATES)


def outage_reason(error: BaseException) -> str:
    """The driver's words for an outage, one line: "Connection refused", not the libpq essay."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    # libpq: 'connection failed: connection to server at "127.0.0.1", port 5433 failed: ...'
    # and the server's own words come as 'FATAL:  the database system is shutting down'.
    reason = text.rsplit(" failed: ", 1)[-1].strip().removeprefix("FATAL:").strip()
    return reason or text


def safe_url(url: str | sa.URL) -> str:
    """``url`` for a message or a log line: the password shown as ***."""
    return sa.make_url(url).render_as_string(hide_password=True)


def _unavailable(context: sa.engine.ExceptionContext) -> BaseException | None:
    """Raise ``DatabaseUnavailable`` (from the driver's error) where the database is gone.

    The one place a lost or refused connection crosses into the project, so that callers catch
    one exception that carries the URL, not the driver's and SQLAlchemy's types. A pre-ping is
    left alone: SQLAlchemy reconnects after a failed one by itself.
    """
    if context.is_pre_ping or context.engine is None:
        return None
    error = context.original_exception
    if not (context.is_disconnect or is_outage(error, context.engine.dialect.name)):
        return None
    return DatabaseUnavailable(safe_url(context.engine.url), outage_reason(error))


def probe(engine: sa.Engine) -> None:
    """One round trip (``SELECT 1`` on a fresh connection); raises ``DatabaseUnavailable``."""
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")


def _alembic_config(engine: sa.Engine, digests: Sequence[Digest] | None = None) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    if not (MIGRATIONS_DIR / "env.py").exists():
        raise MailerError(
            f"migrations not found at {MIGRATIONS_DIR} (reinstall the mailer package)"
        )
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["engine"] = engine
    if digests is not None:
        # Migration 0010 gives each existing subscriber the digests whose topics meet theirs.
        config.attributes["digests"] = [(d.key, tuple(d.topics)) for d in digests]
    return config


def migrate(engine: sa.Engine, digests: Sequence[Digest] | None = None) -> str:
    """Create or upgrade the database to the newest schema; returns the revision reached.

    ``digests`` (the config's ``[[digests]]``) are needed to upgrade a database that has
    subscribers past revision 0009; without them that upgrade refuses.
    """
    from alembic import command
    from alembic.script import ScriptDirectory

    config = _alembic_config(engine, digests)
    try:
        command.upgrade(config, "head")
    except sa.exc.OperationalError as exc:
        raise MailerError(f"cannot migrate {safe_url(engine.url)}: {exc.orig}") from exc
    head = ScriptDirectory.from_config(config).get_current_head()
    return head or ""


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
