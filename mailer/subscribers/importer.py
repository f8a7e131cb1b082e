"""The database side of the CSV import: rows staged in temporary tables, checked in SQL.

One import holds one connection. Each chunk of validated rows is copied into a temporary
table (PostgreSQL's COPY, or executemany on SQLite, a few thousand rows at a time) and the
rest is a handful of set-based statements per chunk: the duplicate check against every
earlier row of the file (a second temporary table keyed by address, so the file is never held
in memory), the suppression list, the present subscribers, then the inserts of the new
subscribers, their topics, their digests and their ``subscribed`` events. Nothing in Python
runs per row after the copy, and the values copied are plain str and int: SQLAlchemy converts
the one timestamp of the import once per statement instead of four times per row.

Reading, validating and preparing the rows (uids, hashes, the COPY text) happens in a second
thread, up to a chunk ahead, while the database works on the current chunk (``read_ahead``).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from mailer.db.engine import upsert_insert
from mailer.db.schema import (
    UtcDateTime,
    events,
    subscriber_digests,
    subscriber_topics,
    subscribers,
    suppressions,
)
from mailer.subscribers.addresses import address_hash


class ImportRow(NamedTuple):
    """One valid CSV row: its line in the file, the address as given and normalized."""

    line: int
    raw_email: str
    email: str
    name: str
    topics: tuple[str, ...]
    status: str
    # The digests the row names; None: the file has no digests column (a new subscriber gets
    # the default digests, a present one keeps theirs).
    digests: tuple[str, ...] | None = None


# A row's choice of topics and of digests: numbered once per import, rows refer to the number.
Choices = tuple[tuple[str, ...], tuple[str, ...] | None]


@dataclass(frozen=True)
class RowError:
    """One rejected CSV row: its 1-based line number in the file, the address given, why."""

    row: int
    email: str
    reason: str

    def __str__(self) -> str:
        text = f"row {self.row} ({self.email or 'no email'}): {self.reason}"
        if text.isprintable():
            return text
        # The address and reason are the file's own characters: shown escaped, they never
        # reach a terminal or a log as control characters.
        return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


# What the reading of a file yields, in file order: a valid row, or a rejected one. Rejected
# rows travel with the valid ones so that they count towards a chunk and are handed on, in
# row order, with the chunk's outcome: memory never holds more than a chunk of them.
ReadRow = ImportRow | RowError


class Duplicate(NamedTuple):
    """A row whose address an earlier row of the file already had."""

    line: int
    raw_email: str
    first_line: int


class Present(NamedTuple):
    """A row whose address is already subscribed, with the name, topics and digests the row
    gives (digests None: the file has no digests column)."""

    subscriber_id: int
    name: str
    topics: tuple[str, ...]
    digests: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ChunkResult:
    """What one chunk did: counts, and the rows that were not inserted, with why."""

    added: int
    suppressed: int
    # Rejected while reading, and duplicates of an earlier row, in row order.
    rejected: list[RowError]
    # Filled only when asked for (an import with ``update``); otherwise they are ``unchanged``.
    present: list[Present]
    unchanged: int


@dataclass(frozen=True)
class Batch:
    """Up to ``STAGE_BATCH`` rows of one chunk, ready to be staged."""

    size: int  # valid rows
    # Choices of topics and digests first used in this batch, numbered on from the previous
    # batch's.
    topic_sets: list[Choices]
    # SQLite: the staging table's values, in its column order. PostgreSQL: the same values
    # as the text of a COPY (``copy``), and ``values`` is empty.
    values: list[tuple[Any, ...]]
    copy: bytes
    # The rows of the batch that were rejected while reading, in row order.
    rejected: list[RowError]


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

# Every address of the file so far, with the line it first appeared on. On PostgreSQL its key
# compares bytes ("C"): the database's collation (C.UTF-8 here) compares through strcoll,
# which made every insert into this index and every look-up in it slower, for the same
# answer (equality under a deterministic collation is equality of bytes).
_C_ADDRESS = sa.String(320).with_variant(sa.String(320, collation="C"), "postgresql")
_seen = sa.Table(
    "_import_seen",
    _staging,
    sa.Column("email", _C_ADDRESS, primary_key=True),
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
# The digests of each choice (its number is the topic set's): the row's, or the defaults.
_digest_sets = sa.Table(
    "_import_digest_sets",
    _staging,
    sa.Column("topic_set", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("digest", sa.String(40), primary_key=True),
    prefixes=["TEMPORARY"],
)

_STAGED_COLUMNS = [c.name for c in _rows.columns]
# Rows held in memory at a time while a chunk is staged.
STAGE_BATCH = 5_000
# SQLite's page cache during an import, in KiB (its default is 2,000).
SQLITE_CACHE_KIB = 32_768
# PostgreSQL's work_mem for each chunk's transaction (the server's default is 4 MB): a chunk's
# sort by line and its hash tables (6-7 MB at 50,000 rows) then stay in memory instead of
# going through temporary files. Per sort or hash node, and only as much as is used.
POSTGRES_WORK_MEM = "32MB"


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


# COPY's text format: a backslash, a tab, a newline and a carriage return inside a value are
# written as backslash sequences (every value is text or a number; none is NULL).
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_COPY_TABS = len(_STAGED_COLUMNS) - 1  # separators in a row of COPY text


class _Preparer:
    """Turns ImportRows into Batches: uids, address hashes, topic set numbers, event details.

    Runs in the read-ahead thread and owns the numbering of topic choices; the connection's
    thread inserts each new choice from the batch that first uses it. With a duplicate check,
    it hands each whole chunk's lines and addresses to it (``end_chunk``).
    """

    def __init__(
        self, *, postgres: bool, source: str, duplicates: DuplicateCheck | None = None
    ) -> None:
        self._postgres = postgres
        self._detail = EventDetail(source)
        self._numbers: dict[Choices, int] = {}
        self._duplicates = duplicates
        self._lines: list[int] = []
        self._emails: list[str] = []

    def end_chunk(self) -> None:
        """The chunk has all its rows."""
        if self._duplicates is not None and self._lines:
            self._duplicates.submit(self._lines, self._emails)
            self._lines, self._emails = [], []

    def __call__(self, read: list[ReadRow]) -> Batch:
        rows = [r for r in read if type(r) is ImportRow]
        rejected = [r for r in read if type(r) is RowError] if len(rows) < len(read) else []
        if self._duplicates is not None:
            self._lines += [r.line for r in rows]
            self._emails += [r.email for r in rows]
        new: list[Choices] = []
        numbers = self._numbers
        sets = []
        for r in rows:
            choice = (r.topics, r.digests)
            number = numbers.get(choice)
            if number is None:
                number = numbers[choice] = len(numbers)
                new.append(choice)
            sets.append(number)
        detail = self._detail
        values = [
            (
                r.line,
                r.raw_email,
                r.email,
                address_hash(r.email),
                uid,
                r.name,
                r.status,
                topic_set,
                detail(r.status, r.line),
            )
            for r, uid, topic_set in zip(rows, fresh_uids(len(rows)), sets, strict=True)
        ]
        if not self._postgres:
            return Batch(len(rows), new, values, b"", rejected)
        # An f-string per row: a third of the time of a join of str() of each value.
        text = "".join(
            [
                f"{line}\t{raw}\t{email}\t{hashed}\t{uid}\t{name}\t{status}\t{topics}\t{event}\n"
                for line, raw, email, hashed, uid, name, status, topics, event in values
            ]
        )
        if (
            "\\" in text
            or "\r" in text
            or text.count("\t") != _COPY_TABS * len(rows)
            or text.count("\n") != len(rows)
        ):
            # A value holds a character COPY must see escaped: escape every value of the
            # batch. Only then: str.translate to two-character escapes costs a dictionary
            # look-up per character (4.8 s of a million rows when done for every value).
            text = "".join(
                ["\t".join([str(v).translate(_COPY_ESCAPES) for v in row]) + "\n" for row in values]
            )
        return Batch(len(rows), new, [], text.encode(), rejected)


class Staging:
    """The staging tables of one import on one connection, and the statements over them."""

    def __init__(
        self,
        conn: sa.Connection,
        *,
        now: datetime,
        source: str,
        default_digests: tuple[str, ...] = (),
    ) -> None:
        self._conn = conn
        self._postgres = conn.dialect.name == "postgresql"
        self._source = source
        self._default_digests = default_digests
        # Every choice of topics and digests staged so far, in the order of their numbers.
        self._topic_sets: list[Choices] = []
        self._statements = _Statements(conn, now=now, source=source)
        self._cache_size = 0
        self._analyzed = False
        # PostgreSQL: the addresses seen so far are on the duplicate check's own connection.
        self._tables = [_rows, _topic_sets, _digest_sets]
        if not self._postgres:
            self._tables.append(_seen)
        self._duplicates: DuplicateCheck | None = None

    def create(self) -> None:
        # Tables left by an import whose connection failed before it could drop them.
        _staging.drop_all(self._conn, tables=self._tables, checkfirst=True)
        _staging.create_all(self._conn, tables=self._tables)
        if not self._postgres:
            self._cache_size = self._conn.exec_driver_sql("PRAGMA cache_size").scalar_one()
            # Every new subscriber's random uid lands on a random page of the uid index, and
            # SQLite's default 2 MB page cache misses most of them (32 MB: a million rows in
            # 21 s instead of 24, bench/README.md). Bounded, and given back at the end.
            self._conn.exec_driver_sql(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")

    def drop(self) -> None:
        _staging.drop_all(self._conn, tables=self._tables)
        if not self._postgres:
            self._conn.exec_driver_sql(f"PRAGMA cache_size = {int(self._cache_size)}")

    @contextlib.contextmanager
    def read_ahead(
        self, rows: Iterable[ReadRow], chunk_size: int
    ) -> Iterator[Iterable[Iterator[Batch]]]:
        """The chunks of ``rows``, each an iterator of its batches; the last may be empty.

        On PostgreSQL they are read and prepared in a thread (``ReadAhead``). On SQLite in
        this one, as they are staged: its executemany gives up the GIL around every row's
        step, and with a second thread busy each row then waited to get it back.
        """
        if not self._postgres:
            yield _Chunks(rows, chunk_size, _Preparer(postgres=False, source=self._source))
            return
        duplicates = DuplicateCheck(self._conn.engine)
        prepare = _Preparer(postgres=True, source=self._source, duplicates=duplicates)
        reader = ReadAhead(rows, chunk_size, prepare)
        self._duplicates = duplicates
        try:
            yield reader.chunks()
        finally:
            self._duplicates = None
            reader.close()
            duplicates.close()

    def import_chunk(self, batches: Iterable[Batch], *, present: bool) -> ChunkResult:
        """Stage one chunk's batches and insert the new rows, inside the caller's transaction."""
        self._clear()
        rejected: list[RowError] = []
        staged = self._copy(_valid(batches, rejected))
        if not staged:
            return ChunkResult(0, 0, rejected, [], 0)
        duplicates = self._drop_duplicates()
        suppressed = self._drop_suppressed()
        added = self._insert_new()
        found = self._present() if present else []
        kept = staged - len(duplicates) - suppressed
        rejected += [
            RowError(d.line, d.raw_email, f"duplicate of row {d.first_line}") for d in duplicates
        ]
        rejected.sort(key=lambda e: e.row)
        return ChunkResult(
            added=added,
            suppressed=suppressed,
            rejected=rejected,
            present=found,
            unchanged=0 if present else kept - added,
        )

    def _drop_duplicates(self) -> list[Duplicate]:
        """Remember the chunk's addresses; unstage (and return) the rows seen before."""
        sql, conn = self._statements, self._conn
        if self._duplicates is not None:
            first = dict(self._duplicates.result())  # line -> the line its address first had
            if not first:
                return []
            unstaged = conn.execute(sql.drop_lines, {"lines": list(first)})
            return [Duplicate(line, raw, first[line]) for line, raw in unstaged]
        conn.execute(sql.remember)
        duplicates = [Duplicate(*row) for row in conn.execute(sql.duplicates)]
        if duplicates:
            conn.execute(sql.drop_duplicates)
        return duplicates

    def _drop_suppressed(self) -> int:
        return self._conn.execute(self._statements.drop_suppressed).rowcount

    def _insert_new(self) -> int:
        """Insert the staged rows whose address is not subscribed; returns how many."""
        if self._postgres:
            return self._insert_new_postgres()
        first, *rest = self._statements.insert_new
        added = self._conn.execute(first).rowcount
        if added:
            for statement in rest:
                self._conn.execute(statement)
        return added

    def _insert_new_postgres(self) -> int:
        plain, skipping = self._statements.insert_new_postgres
        try:
            with self._conn.begin_nested():
                return self._conn.execute(plain).rowcount
        except sa.exc.IntegrityError as exc:
            if getattr(exc.orig, "sqlstate", None) != _UNIQUE_VIOLATION:
                raise
        # Another session inserted one of the chunk's addresses after this statement's
        # snapshot was taken (so the look-up did not see it): the same statement again, as
        # ON CONFLICT DO NOTHING, skips it.
        return self._conn.execute(skipping).rowcount

    def _present(self) -> list[Present]:
        sets = self._topic_sets
        return [
            Present(sid, name, *sets[topic_set])
            for sid, name, topic_set in self._conn.execute(self._statements.present)
        ]

    def _clear(self) -> None:
        # TRUNCATE on PostgreSQL: deleted rows of a temporary table are never vacuumed, and
        # every join of the import would scan them again. SQLite truncates a bare DELETE.
        if self._postgres:
            # For this transaction only. The per-row look-ups (below) put a chunk's estimated
            # cost over jit_above_cost: compiling its expressions took 10-15 ms a statement,
            # and past jit_optimize_above_cost (500,000, which a chunk of 50,000 rows nears)
            # it would optimize and inline them too, for statements whose time is spent
            # inserting index entries.
            self._conn.exec_driver_sql(
                f"SET LOCAL work_mem = '{POSTGRES_WORK_MEM}'; SET LOCAL jit = off"
            )
            self._conn.exec_driver_sql(f"TRUNCATE {_rows.name}")
        else:
            self._conn.execute(_rows.delete())

    def _copy(self, batches: Iterable[Batch]) -> int:
        """Stage the batches (each with at least one row); returns how many rows."""
        if self._postgres:
            count = self._copy_postgres(batches)
        else:
            count = 0
            for batch in batches:
                self._add_topic_sets(batch.topic_sets)
                # The values go to the driver as they are, without SQLAlchemy's per-value
                # type processing: all of them are str or int already.
                self._conn.exec_driver_sql(self._statements.stage, batch.values)
                count += batch.size
        if count and self._postgres and not self._analyzed:
            # The planner knows nothing of a temporary table until it is analyzed (autovacuum
            # never visits them): without statistics it took a chunk for a tenth of its size
            # and sorted both sides of each join by uid (a million rows: 26.7 s in the insert
            # statements instead of 23.2). Once is enough: TRUNCATE resets the row count but
            # keeps the columns' statistics, and with their widths the planner counts the
            # rows of the next chunks from their pages (within 5 %). ANALYZE of every chunk
            # cost 1.6 s of a million rows.
            self._conn.exec_driver_sql(f"ANALYZE {_rows.name}")
            self._analyzed = True
        return count

    def _add_topic_sets(self, topic_sets: list[Choices]) -> None:
        for topics, digests in topic_sets:
            number = len(self._topic_sets)
            self._topic_sets.append((topics, digests))
            if topics:
                self._conn.execute(
                    _topic_sets.insert(), [{"topic_set": number, "topic": t} for t in topics]
                )
            new_digests = self._default_digests if digests is None else digests
            if new_digests:
                self._conn.execute(
                    _digest_sets.insert(),
                    [{"topic_set": number, "digest": d} for d in new_digests],
                )

    def _copy_postgres(self, batches: Iterable[Batch]) -> int:
        # psycopg's COPY, on the connection (and in the transaction) SQLAlchemy holds: one
        # COPY per chunk, its text prepared by the read-ahead thread.
        import psycopg  # only PostgreSQL imports need it

        driver = self._conn.connection.driver_connection
        if not isinstance(driver, psycopg.Connection):
            raise TypeError(f"COPY needs a psycopg 3 connection, got {type(driver).__name__}")
        columns = ", ".join(_STAGED_COLUMNS)
        count = 0
        topic_sets: list[Choices] = []
        with (
            driver.cursor() as cursor,
            cursor.copy(f"COPY {_rows.name} ({columns}) FROM STDIN") as copy,
        ):
            for batch in batches:
                copy.write(batch.copy)
                topic_sets += batch.topic_sets
                count += batch.size
        # After the COPY: the connection takes no other statement while one is open.
        self._add_topic_sets(topic_sets)
        return count


_UNIQUE_VIOLATION = "23505"  # SQLSTATE
_T = TypeVar("_T")


def _valid(batches: Iterable[Batch], rejected: list[RowError]) -> Iterator[Batch]:
    """The batches that hold a row to stage; every batch's rejected rows go to ``rejected``."""
    for batch in batches:
        rejected += batch.rejected
        if batch.size:
            yield batch


class _Chunks:
    """The chunks of ``rows``, each an iterator of its batches, prepared a batch at a time as
    they are read; the last may be empty. A chunk must be read to its end before the next."""

    def __init__(
        self, rows: Iterable[ReadRow], chunk_size: int, prepare: Callable[[list[ReadRow]], Batch]
    ) -> None:
        self._rows = iter(rows)
        self._chunk_size = chunk_size
        self._prepare = prepare
        self.ended = False  # the rows ran out: the chunk read last was the last

    def __iter__(self) -> Iterator[Iterator[Batch]]:
        while not self.ended:
            yield self._chunk()

    def _chunk(self) -> Iterator[Batch]:
        left = self._chunk_size
        while left:
            rows = list(itertools.islice(self._rows, min(left, STAGE_BATCH)))
            if not rows:
                self.ended = True
                return
            yield self._prepare(rows)
            left -= len(rows)


_END = "end"  # the file has no more rows
_CHUNK_END = "chunk end"  # the chunk has all its rows


class ReadAhead:
    """Reads and prepares the rows of the next chunk in a thread while the current one is
    in the database.

    On PostgreSQL the import's own process was idle most of the time (6.5 CPU s of a 46 s
    import: the server did the rest), and the server waited in turn while the process read,
    validated and formatted each chunk. The thread holds the GIL while it works; the
    connection's thread waits on its socket without it. Rows are handed over a batch at a
    time, at most a chunk (and a batch) ahead, so memory does not grow with the file.
    """

    def __init__(self, rows: Iterable[ReadRow], chunk_size: int, prepare: _Preparer) -> None:
        self._chunks = _Chunks(rows, chunk_size, prepare)
        self._prepare = prepare
        ahead = -(-chunk_size // STAGE_BATCH) + 1  # a chunk's batches, and its end
        self._queue: queue.Queue[Batch | str | BaseException] = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._run, name="import-read-ahead", daemon=True)
        self._thread.start()

    def chunks(self) -> Iterator[Iterator[Batch]]:
        """Each chunk's batches, in file order; a chunk must be read to its end before the
        next one. The last chunk may be empty."""
        while not self._ended:
            yield self._chunk()

    def close(self) -> None:
        """Stop the thread (the import is over, or failed) and wait for it."""
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join(timeout=10)

    def _chunk(self) -> Iterator[Batch]:
        while True:
            item = self._get()
            if isinstance(item, Batch):
                yield item
            elif isinstance(item, BaseException):
                self._ended = True
                raise item
            else:
                self._ended = item == _END
                return

    def _get(self) -> Batch | str | BaseException:
        return _get(self._queue, self._thread)

    def _run(self) -> None:
        with contextlib.suppress(_Stopped):
            try:
                self._read()
            except _Stopped:
                raise
            except BaseException as exc:  # handed to the connection's thread, raised there
                self._put(exc)

    def _read(self) -> None:
        for chunk in self._chunks:
            for batch in chunk:
                self._put(batch)
            self._prepare.end_chunk()
            self._put(_END if self._chunks.ended else _CHUNK_END)

    def _put(self, item: Batch | str | BaseException) -> None:
        _put(self._queue, item, self._stop)


class DuplicateCheck:
    """The duplicate check of a PostgreSQL import: on a second connection, in a thread of its
    own, up to a chunk ahead of the inserts.

    It needs only each row's line and address, and the reading thread hands them over as
    soon as a chunk has all its rows: while the import's connection inserts one chunk, this
    one checks the next, on the other core (3.5 s of a million rows were on the import's
    connection, waited for). ``_import_seen`` is a temporary table of this connection.
    """

    def __init__(self, engine: sa.Engine) -> None:
        self._statement = _duplicates_postgres()
        self._conn = engine.connect()
        try:
            with self._conn.begin():
                _seen.drop(self._conn, checkfirst=True)
                _seen.create(self._conn)
        except BaseException:
            self._conn.close()
            raise
        self._chunks: queue.Queue[tuple[list[int], list[str]]] = queue.Queue(maxsize=2)
        self._results: queue.Queue[list[tuple[int, int]] | BaseException] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="import-duplicates", daemon=True)
        self._thread.start()

    def submit(self, lines: list[int], emails: list[str]) -> None:
        """The next chunk's lines and addresses (from the reading thread)."""
        _put(self._chunks, (lines, emails), self._stop)

    def result(self) -> list[tuple[int, int]]:
        """(line, first line) of the next submitted chunk's duplicates, in no order."""
        found = _get(self._results, self._thread)
        if isinstance(found, BaseException):
            raise found
        return found

    def close(self) -> None:
        """Stop the thread and drop the table (the import is over, or failed)."""
        self._stop.set()
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            return  # still in a statement: the connection is its, until the process ends
        with contextlib.suppress(sa.exc.DBAPIError):
            if not self._conn.invalidated:
                with self._conn.begin():
                    _seen.drop(self._conn)
        self._conn.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                lines, emails = self._chunks.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                with self._conn.begin():
                    self._conn.exec_driver_sql("SET LOCAL jit = off")
                    params = {"lines": lines, "emails": emails}
                    found = [
                        (line, first) for line, first in self._conn.execute(self._statement, params)
                    ]
            except BaseException as exc:  # handed to the import's thread, raised there
                self._results.put(exc)
                return
            self._results.put(found)


def _put(into: queue.Queue[_T], item: _T, stop: threading.Event) -> None:
    """Put, waiting for room until ``stop`` is set (then the putting thread ends)."""
    while not stop.is_set():
        try:
            into.put(item, timeout=0.1)
            return
        except queue.Full:
            continue
    raise _Stopped


def _get(source: queue.Queue[_T], thread: threading.Thread) -> _T:
    """Get, waiting as long as ``thread``, which puts, is running."""
    while True:
        try:
            return source.get(timeout=1)
        except queue.Empty:
            if not thread.is_alive() and source.empty():
                raise RuntimeError(f"the import's thread {thread.name} stopped") from None


class _Stopped(Exception):
    """The import stopped reading: the thread ends."""


class _Statements:
    """The set-based statements of one import (its ``now`` and ``source`` bound in)."""

    def __init__(self, conn: sa.Connection, *, now: datetime, source: str) -> None:
        at = sa.literal(now, UtcDateTime())
        postgres = conn.dialect.name == "postgresql"
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
        self.drop_lines = (
            sa.delete(_rows)
            .where(_rows.c.line == sa.any_(sa.bindparam("lines", type_=sa.ARRAY(sa.Integer))))
            .returning(_rows.c.line, _rows.c.raw_email)
        )
        self.drop_suppressed = sa.delete(_rows).where(
            sa.exists().where(suppressions.c.email_hash == _rows.c.email_hash)
        )
        present = sa.exists().where(subscribers.c.email == _rows.c.email)
        if postgres:
            # One look-up in the address index per staged row. As a join, PostgreSQL 15
            # hashes the whole subscribers table for every chunk (it cannot hash the smaller
            # side of an anti-join), and that grew with the table: 0.2-0.3 s per chunk at a
            # million subscribers. OFFSET 0 keeps the subquery a per-row look-up.
            present = sa.exists(
                sa.select(sa.literal_column("1"))
                .where(subscribers.c.email == _rows.c.email)
                .offset(sa.literal_column("0"))
            )
        columns = [
            "uid",
            "email",
            "name",
            "status",
            "created_at",
            "updated_at",
            "confirmed_at",
            "consent_source",
            "consent_at",
        ]
        new = (
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
            .where(~present)
            .order_by(_rows.c.line)
        )
        skipping = (
            upsert_insert(conn, subscribers)
            .from_select(columns, new)
            .on_conflict_do_nothing(index_elements=["email"])
        )
        if postgres:
            # Without ON CONFLICT, since the look-up above has found the chunk's present
            # addresses: a speculative insertion checks the address index once more per row
            # and takes a lock for it (2.3 s of a million rows). A concurrent insert of the
            # same address makes it fail instead, and the chunk falls back to ``skipping``.
            plain = subscribers.insert().from_select(columns, new)
            self.insert_new_postgres = (
                _insert_new_postgres(plain, at),
                _insert_new_postgres(skipping, at),
            )
        else:
            self.insert_new = _insert_new_sqlite(skipping, at)
        self.present = (
            sa.select(subscribers.c.id, _rows.c.name, _rows.c.topic_set)
            .join(subscribers, subscribers.c.email == _rows.c.email)
            .where(subscribers.c.uid != _rows.c.uid)
            .order_by(_rows.c.line)
        )


def _duplicates_postgres() -> sa.Select[Any]:
    """The duplicate check of one chunk as one statement: remember its addresses, and return
    (line, first line) for each row whose address an earlier row of the file had.

    The chunk's lines and addresses come as two arrays. The rows the INSERT returns are the
    first of their address in the file; every other row is a duplicate: of the returned row
    (same chunk), or of the row ``_import_seen`` held before the statement (its snapshot does
    not see the INSERT), looked up by its key only for those rows. (Joining the chunk with
    the whole of ``_import_seen``, as before, grew with the file.)
    """
    rows = (
        sa.func.unnest(
            sa.bindparam("lines", type_=postgresql.ARRAY(sa.Integer)),
            sa.bindparam("emails", type_=postgresql.ARRAY(sa.String)),
        )
        .table_valued("line", "email")
        .render_derived(name="chunk_rows")
    )
    chunk = sa.select(rows.c.line, rows.c.email).cte("chunk")
    first = (
        postgresql.insert(_seen)
        .from_select(
            ["email", "line"],
            sa.select(chunk.c.email, sa.func.min(chunk.c.line)).group_by(chunk.c.email),
        )
        .on_conflict_do_nothing(index_elements=["email"])
        .returning(_seen.c.email, _seen.c.line)
        .cte("first_rows")
    )
    email = chunk.c.email.collate("C")
    earlier = sa.select(_seen.c.line).where(_seen.c.email == email).scalar_subquery()
    return (
        sa.select(chunk.c.line, sa.func.coalesce(first.c.line, earlier))
        .select_from(chunk.outerjoin(first, first.c.email == email))
        .where(sa.or_(first.c.line.is_(None), first.c.line != chunk.c.line))
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
    digests = subscriber_digests.insert().from_select(
        ["subscriber_id", "digest", "chosen_at"],
        sa.select(subscribers.c.id, _digest_sets.c.digest, at).select_from(
            inserted.join(_digest_sets, _digest_sets.c.topic_set == _rows.c.topic_set)
        ),
    )
    subscribed = events.insert().from_select(
        ["subscriber_id", "kind", "at", "detail"],
        sa.select(subscribers.c.id, sa.literal("subscribed", sa.String()), at, _rows.c.detail)
        .select_from(inserted)
        .order_by(_rows.c.line),
    )
    # An INSERT's rowcount is kept only when asked for.
    return insert.execution_options(preserve_rowcount=True), topics, digests, subscribed


def _insert_new_postgres(insert: Any, at: sa.ColumnElement[Any]) -> sa.Executable:
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
    digests = (
        subscriber_digests.insert()
        .from_select(
            ["subscriber_id", "digest", "chosen_at"],
            sa.select(new.c.id, _digest_sets.c.digest, at).select_from(
                staged.join(_digest_sets, _digest_sets.c.topic_set == _rows.c.topic_set)
            ),
        )
        .cte("new_digests")
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
        .add_cte(digests)
        .execution_options(preserve_rowcount=True)
    )
    return subscribed


def fresh_uids(count: int) -> Iterator[str]:
    """``count`` new subscriber uids, as ``tokens.new_uid`` makes them, from one read of the
    OS random source (``secrets.token_bytes`` reads the same source, 16 bytes a call)."""
    pool = os.urandom(16 * count)
    for start in range(0, len(pool), 16):
        yield base64.urlsafe_b64encode(pool[start : start + 16]).decode().rstrip("=")


@contextlib.contextmanager
def staging(
    conn: sa.Connection, *, now: datetime, source: str, default_digests: tuple[str, ...] = ()
) -> Iterator[Staging]:
    """The staging tables for one import on ``conn``, dropped afterwards; a new subscriber
    whose row names no digests gets ``default_digests``."""
    stage = Staging(conn, now=now, source=source, default_digests=default_digests)
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
