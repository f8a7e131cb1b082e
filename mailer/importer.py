"""The database side of the CSV import: rows staged in temporary tables, checked in SQL.

One import holds one connection. Each chunk of validated rows is copied into a temporary
table (PostgreSQL's COPY, or executemany on SQLite, a few thousand rows at a time) and the
rest is a handful of set-based statements per chunk: the duplicate check against every
earlier row of the file (a second temporary table keyed by address, so the file is never held
in memory), the suppression list, the present subscribers, then the inserts of the new
subscribers, their topics and their ``subscribed`` events. Nothing in Python runs per row
after the copy, and the values copied are plain str and int: SQLAlchemy converts the one
timestamp of the import once per statement instead of four times per row.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import sqlalchemy as sa

from mailer.addresses import address_hash
from mailer.db import upsert_insert
from mailer.schema import UtcDateTime, events, subscriber_topics, subscribers, suppressions


class ImportRow(NamedTuple):
    """One valid CSV row: its line in the file, the address as given and normalized."""

    line: int
    raw_email: str
    email: str
    name: str
    topics: tuple[str, ...]
    status: str


class Duplicate(NamedTuple):
    """A row whose address an earlier row of the file already had."""

    line: int
    raw_email: str
    first_line: int


class Present(NamedTuple):
    """A row whose address is already subscribed, with the name and topics the row gives."""

    subscriber_id: int
    name: str
    topics: tuple[str, ...]


@dataclass(frozen=True)
class ChunkResult:
    """What one chunk did: counts, and the rows that were not inserted, with why."""

    added: int
    suppressed: int
    duplicates: list[Duplicate]
    # Filled only when asked for (an import with ``update``); otherwise they are ``unchanged``.
    present: list[Present]
    unchanged: int


_staging = sa.MetaData()

# The rows of the current chunk; emptied at the start of each chunk.
_rows = sa.Table(
    "_import_rows",
    _staging,
    sa.Column("line", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("raw_email", sa.String(), nullable=False),
    sa.Column("email", sa.String(320), nullable=False),
    sa.Column("email_hash", sa.String(64), nullable=False),
    sa.Column("uid", sa.String(32), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("topic_set", sa.Integer, nullable=False),
    sa.Column("detail", sa.JSON, nullable=False),
    prefixes=["TEMPORARY"],
)

# Every address of the file so far, with the line it first appeared on.
_seen = sa.Table(
    "_import_seen",
    _staging,
    sa.Column("email", sa.String(320), primary_key=True),
    sa.Column("line", sa.Integer, nullable=False),
    prefixes=["TEMPORARY"],
    sqlite_with_rowid=False,
)

# Each distinct choice of topics in the file, numbered: a row refers to its choice by number.
_topic_sets = sa.Table(
    "_import_topic_sets",
    _staging,
    sa.Column("topic_set", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("topic", sa.String(40), primary_key=True),
    prefixes=["TEMPORARY"],
)

_STAGED_COLUMNS = [c.name for c in _rows.columns]
# Rows held in memory at a time while a chunk is staged.
STAGE_BATCH = 5_000
# SQLite's page cache during an import, in KiB (its default is 2,000).
SQLITE_CACHE_KIB = 32_768


class EventDetail:
    """The JSON text of a ``subscribed`` event's detail, as ``json.dumps`` writes it.

    The detail of an imported row is ``{"source": …, "status": …, "row": line}``; only the
    line differs between rows of one status, so the text before it is serialized once per
    status instead of once per row (tests/test_import.py holds it to ``json.dumps``).
    """

    def __init__(self, source: str) -> None:
        self._source = source
        self._heads: dict[str, str] = {}

    def __call__(self, status: str, line: int) -> str:
        head = self._heads.get(status)
        if head is None:
            whole = json.dumps({"source": self._source, "status": status, "row": 0})
            head = self._heads[status] = whole.removesuffix("0}")
        return f"{head}{line}}}"


class Staging:
    """The staging tables of one import on one connection, and the statements over them."""

    def __init__(self, conn: sa.Connection, *, now: datetime, source: str) -> None:
        self._conn = conn
        self._postgres = conn.dialect.name == "postgresql"
        self._detail = EventDetail(source)
        self._topic_sets: dict[tuple[str, ...], int] = {}
        self._statements = _Statements(conn, now=now, source=source)
        self._cache_size = 0

    def create(self) -> None:
        # Tables left by an import whose connection failed before it could drop them.
        _staging.drop_all(self._conn, checkfirst=True)
        _staging.create_all(self._conn)
        if not self._postgres:
            self._cache_size = self._conn.exec_driver_sql("PRAGMA cache_size").scalar_one()
            # Every new subscriber's random uid lands on a random page of the uid index, and
            # SQLite's default 2 MB page cache misses most of them (32 MB: a million rows in
            # 21 s instead of 24, bench/README.md). Bounded, and given back at the end.
            self._conn.exec_driver_sql(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")

    def drop(self) -> None:
        _staging.drop_all(self._conn)
        if not self._postgres:
            self._conn.exec_driver_sql(f"PRAGMA cache_size = {int(self._cache_size)}")

    def import_chunk(self, rows: Iterable[ImportRow], *, present: bool) -> ChunkResult:
        """Stage ``rows`` and insert the new ones, inside the caller's transaction.

        The rows are read from the iterable in batches of ``STAGE_BATCH``, so memory does not
        grow with the size of a chunk.
        """
        self._clear()
        staged = self._copy(rows)
        if not staged:
            return ChunkResult(0, 0, [], [], 0)
        duplicates = self._drop_duplicates()
        suppressed = self._drop_suppressed()
        added = self._insert_new()
        found = self._present() if present else []
        kept = staged - len(duplicates) - suppressed
        return ChunkResult(
            added=added,
            suppressed=suppressed,
            duplicates=duplicates,
            present=found,
            unchanged=0 if present else kept - added,
        )

    def _drop_duplicates(self) -> list[Duplicate]:
        """Remember the chunk's addresses; unstage (and return) the rows seen before."""
        sql, conn = self._statements, self._conn
        conn.execute(sql.remember)
        duplicates = [Duplicate(*row) for row in conn.execute(sql.duplicates)]
        if duplicates:
            conn.execute(sql.drop_duplicates)
        return duplicates

    def _drop_suppressed(self) -> int:
        return self._conn.execute(self._statements.drop_suppressed).rowcount

    def _insert_new(self) -> int:
        """Insert the staged rows whose address is not subscribed; returns how many."""
        first, *rest = self._statements.insert_new
        added = self._conn.execute(first).rowcount
        if added:
            for statement in rest:
                self._conn.execute(statement)
        return added

    def _present(self) -> list[Present]:
        sets = list(self._topic_sets)  # numbered in order of first use
        return [
            Present(sid, name, sets[topic_set])
            for sid, name, topic_set in self._conn.execute(self._statements.present)
        ]

    def _clear(self) -> None:
        # TRUNCATE on PostgreSQL: deleted rows of a temporary table are never vacuumed, and
        # every join of the import would scan them again. SQLite truncates a bare DELETE.
        if self._postgres:
            self._conn.exec_driver_sql(f"TRUNCATE {_rows.name}")
        else:
            self._conn.execute(_rows.delete())

    def _copy(self, rows: Iterable[ImportRow]) -> int:
        """Stage the rows, a batch at a time; returns how many."""
        count = 0
        for batch in _batches(rows, STAGE_BATCH):
            staged = self._staged(batch)
            if self._postgres:
                self._copy_postgres(staged)
            else:
                # The values go to the driver as they are, without SQLAlchemy's per-value
                # type processing: all of them are str or int already.
                self._conn.exec_driver_sql(self._statements.stage, staged)
            count += len(batch)
        if count and self._postgres:
            # The planner knows nothing of a temporary table until it is analyzed (autovacuum
            # never visits them); without it, it guesses the chunk's size from its pages.
            self._conn.exec_driver_sql(f"ANALYZE {_rows.name}")
        return count

    def _staged(self, batch: list[ImportRow]) -> list[tuple[Any, ...]]:
        """The staging table's values for each row, in its column order."""
        topic_set, detail = self._topic_set, self._detail
        return [
            (
                r.line,
                r.raw_email,
                r.email,
                address_hash(r.email),
                uid,
                r.name,
                r.status,
                topic_set(r.topics),
                detail(r.status, r.line),
            )
            for r, uid in zip(batch, fresh_uids(len(batch)), strict=True)
        ]

    def _topic_set(self, topics: tuple[str, ...]) -> int:
        number = self._topic_sets.get(topics)
        if number is None:
            number = self._topic_sets[topics] = len(self._topic_sets)
            if topics:
                self._conn.execute(
                    _topic_sets.insert(), [{"topic_set": number, "topic": t} for t in topics]
                )
        return number

    def _copy_postgres(self, staged: list[tuple[Any, ...]]) -> None:
        # psycopg's COPY, on the connection (and in the transaction) SQLAlchemy holds.
        import psycopg  # only PostgreSQL imports need it

        driver = self._conn.connection.driver_connection
        if not isinstance(driver, psycopg.Connection):
            raise TypeError(f"COPY needs a psycopg 3 connection, got {type(driver).__name__}")
        columns = ", ".join(_STAGED_COLUMNS)
        with (
            driver.cursor() as cursor,
            cursor.copy(f"COPY {_rows.name} ({columns}) FROM STDIN") as copy,
        ):
            for row in staged:
                copy.write_row(row)


class _Statements:
    """The set-based statements of one import (its ``now`` and ``source`` bound in)."""

    def __init__(self, conn: sa.Connection, *, now: datetime, source: str) -> None:
        at = sa.literal(now, UtcDateTime())
        self.stage = str(_rows.insert().compile(dialect=conn.dialect))
        # The first line of each address of the chunk, unless an earlier chunk had it.
        self.remember = (
            upsert_insert(conn, _seen)
            .from_select(
                ["email", "line"],
                sa.select(_rows.c.email, sa.func.min(_rows.c.line))
                # SQLite needs a WHERE before ON CONFLICT in INSERT … SELECT (lang_upsert.html).
                .where(sa.true())
                .group_by(_rows.c.email),
            )
            .on_conflict_do_nothing(index_elements=["email"])
        )
        later = sa.and_(_seen.c.email == _rows.c.email, _seen.c.line != _rows.c.line)
        self.duplicates = (
            sa.select(_rows.c.line, _rows.c.raw_email, _seen.c.line)
            .join(_seen, later)
            .order_by(_rows.c.line)
        )
        self.drop_duplicates = sa.delete(_rows).where(sa.exists().where(later))
        self.drop_suppressed = sa.delete(_rows).where(
            sa.exists().where(suppressions.c.email_hash == _rows.c.email_hash)
        )
        insert = (
            upsert_insert(conn, subscribers)
            .from_select(
                [
                    "uid",
                    "email",
                    "name",
                    "status",
                    "created_at",
                    "updated_at",
                    "confirmed_at",
                    "consent_source",
                    "consent_at",
                ],
                sa.select(
                    _rows.c.uid,
                    _rows.c.email,
                    _rows.c.name,
                    _rows.c.status,
                    at,
                    at,
                    sa.case((_rows.c.status == "active", at), else_=sa.null()),
                    sa.literal(source, sa.String()),
                    at,
                )
                .where(~sa.exists().where(subscribers.c.email == _rows.c.email))
                .order_by(_rows.c.line),
            )
            .on_conflict_do_nothing(index_elements=["email"])
        )
        self.insert_new = (
            _insert_new_postgres(insert, at)
            if conn.dialect.name == "postgresql"
            else _insert_new_sqlite(insert, at)
        )
        self.present = (
            sa.select(subscribers.c.id, _rows.c.name, _rows.c.topic_set)
            .join(subscribers, subscribers.c.email == _rows.c.email)
            .where(subscribers.c.uid != _rows.c.uid)
            .order_by(_rows.c.line)
        )


def _insert_new_sqlite(insert: Any, at: sa.ColumnElement[Any]) -> tuple[sa.Executable, ...]:
    """The new subscribers, then their topics and events: the first one's rowcount is theirs."""
    # The subscribers this import inserted: the address and the fresh uid both match (the
    # address alone would also match the subscribers already present). The uid is compared as
    # an expression so that SQLite finds the row through the address index, in file order,
    # rather than through the uid index at random (3 s of a million rows).
    inserted = _rows.join(
        subscribers,
        sa.and_(
            subscribers.c.email == _rows.c.email,
            subscribers.c.uid.concat("") == _rows.c.uid,
        ),
    )
    topics = subscriber_topics.insert().from_select(
        ["subscriber_id", "topic"],
        sa.select(subscribers.c.id, _topic_sets.c.topic).select_from(
            inserted.join(_topic_sets, _topic_sets.c.topic_set == _rows.c.topic_set)
        ),
    )
    subscribed = events.insert().from_select(
        ["subscriber_id", "kind", "at", "detail"],
        sa.select(subscribers.c.id, sa.literal("subscribed", sa.String()), at, _rows.c.detail)
        .select_from(inserted)
        .order_by(_rows.c.line),
    )
    # An INSERT's rowcount is kept only when asked for.
    return insert.execution_options(preserve_rowcount=True), topics, subscribed


def _insert_new_postgres(insert: Any, at: sa.ColumnElement[Any]) -> tuple[sa.Executable, ...]:
    """The same as one statement: the topics and events take the ids the INSERT returns.

    PostgreSQL would otherwise hash the whole subscribers table twice per chunk to find the
    rows just inserted. Its rowcount is the events', one per new subscriber.
    """
    new = insert.returning(subscribers.c.id, subscribers.c.uid).cte("new_subscribers")
    staged = new.join(_rows, _rows.c.uid == new.c.uid)
    topics = (
        subscriber_topics.insert()
        .from_select(
            ["subscriber_id", "topic"],
            sa.select(new.c.id, _topic_sets.c.topic).select_from(
                staged.join(_topic_sets, _topic_sets.c.topic_set == _rows.c.topic_set)
            ),
        )
        .cte("new_topics")
    )
    subscribed = (
        events.insert()
        .from_select(
            ["subscriber_id", "kind", "at", "detail"],
            sa.select(new.c.id, sa.literal("subscribed", sa.String()), at, _rows.c.detail)
            .select_from(staged)
            .order_by(_rows.c.line),
        )
        .add_cte(topics)
        .execution_options(preserve_rowcount=True)
    )
    return (subscribed,)


def fresh_uids(count: int) -> Iterator[str]:
    """``count`` new subscriber uids, as ``tokens.new_uid`` makes them, from one read of the
    OS random source (``secrets.token_bytes`` reads the same source, 16 bytes a call)."""
    pool = os.urandom(16 * count)
    for start in range(0, len(pool), 16):
        yield base64.urlsafe_b64encode(pool[start : start + 16]).decode().rstrip("=")


def _batches(rows: Iterable[ImportRow], size: int) -> Iterator[list[ImportRow]]:
    it = iter(rows)
    while batch := list(itertools.islice(it, size)):
        yield batch


@contextlib.contextmanager
def staging(conn: sa.Connection, *, now: datetime, source: str) -> Iterator[Staging]:
    """The staging tables for one import on ``conn``, dropped afterwards."""
    stage = Staging(conn, now=now, source=source)
    with conn.begin():
        stage.create()
    try:
        yield stage
    except BaseException:
        # The import's own error is the one to report: a connection that cannot drop the
        # tables takes them with it when it closes, or the next import drops them first.
        with contextlib.suppress(sa.exc.DBAPIError):
            _drop(conn, stage)
        raise
    _drop(conn, stage)


def _drop(conn: sa.Connection, stage: Staging) -> None:
    if not conn.invalidated:
        with conn.begin():
            stage.drop()
