"""Subscriber CSV files: reading and checking rows for an import, and the export.

The rows are read and validated here (``email,name,topics,status,digests``); the database work of an
import is the COPY fast path in ``importer``.
"""

from __future__ import annotations

import csv
import functools
import io
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TextIO

import sqlalchemy as sa

from mailer.config.settings import Digest
from mailer.db.schema import SUBSCRIBER_STATUSES
from mailer.errors import AddressError, SubscriberError
from mailer.subscribers import editions, importer, store
from mailer.subscribers.addresses import MAX_ADDRESS_LENGTH, MAX_LOCAL_PART, normalize_address
from mailer.subscribers.importer import ImportRow, ReadRow, RowError
from mailer.subscribers.store import Subscriber, clean_name, parse_topics
from mailer.text import DOT_ATOM

CSV_COLUMNS = ("email", "name", "topics", "status", "digests")
IMPORT_CHUNK = 50_000


@dataclass
class ImportReport:
    """What an import did, one count per row read."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    suppressed: int = 0
    rejected: int = 0
    # The rejected rows, in row order; empty when they were handed to ``on_rejected``.
    errors: list[RowError] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.added + self.updated + self.unchanged + self.suppressed + self.rejected


# A dot-atom local part in ASCII (RFC 5322 §3.4.1): the only kind the fast path below takes.
_DOT_ATOM_LOCAL = re.compile(DOT_ATOM)


class _ImportNormalizer:
    """``normalize_address`` for a whole import, with each domain validated once.

    email-validator spends most of its ≈60 µs per address on the domain (IDNA, special-use
    names), and a list has few distinct domains. For an ASCII dot-atom local part of at most
    64 characters, the address is valid exactly when its domain is and the whole stays within
    254 characters, and normalizes to the local part with the normalized domain, lower-cased
    (tests/test_import_fast.py holds this to ``normalize_address``). Everything else, and
    every address whose domain is refused, goes through ``normalize_address`` itself, so the
    errors are its own.
    """

    def __init__(self) -> None:
        self._domains: dict[str, str | None] = {}  # domain as written -> normalized, or None

    def __call__(self, raw: str) -> str:
        candidate = raw.strip()
        local, at, domain = candidate.rpartition("@")
        if (
            at
            and candidate.isascii()
            and len(candidate) <= MAX_ADDRESS_LENGTH
            and len(local) <= MAX_LOCAL_PART
            and _DOT_ATOM_LOCAL.fullmatch(local)
        ):
            normalized = self._domains.get(domain, "")
            if normalized == "":
                try:
                    normalized = normalize_address("x@" + domain).partition("@")[2]
                except AddressError:
                    normalized = None
                self._domains[domain] = normalized
            if normalized is not None:
                address = f"{local}@{normalized}".lower()
                if len(address) <= MAX_ADDRESS_LENGTH:
                    return address
        return normalize_address(raw)


def _read_csv(
    stream: TextIO, known_topics: Sequence[str], digests: Sequence[Digest] = ()
) -> Iterator[ReadRow]:
    """The rows of the file in order: valid ones, and a RowError for each rejected one.

    Duplicates are not looked for here: the staging tables find them (see ``importer``).
    """
    reader = csv.reader(stream)
    try:
        header = next(reader)
    except StopIteration:
        # Not even a header: a wrong or truncated file, not an empty list.
        raise SubscriberError(
            "the file is empty: the CSV header must name an 'email' column"
        ) from None
    except UnicodeDecodeError as exc:
        raise SubscriberError(_not_utf8(exc)) from exc
    except csv.Error as exc:
        raise SubscriberError(f"cannot read the CSV header: {exc}") from exc
    parse = _RowParser(header, known_topics, digests)
    while True:
        line = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except UnicodeDecodeError as exc:
            raise SubscriberError(f"row {line}: " + _not_utf8(exc)) from exc
        except csv.Error as exc:
            yield RowError(line, "", f"malformed CSV: {exc}")
            continue
        line = reader.line_num
        if parse.blank(cells):
            continue
        if len(cells) != parse.width:
            yield RowError(
                line, cells[0] if cells else "", f"expected {parse.width} fields, got {len(cells)}"
            )
            continue
        try:
            row = parse(line, cells)
        except AddressError as exc:
            yield RowError(line, parse.email(cells), exc.reason)
            continue
        except ValueError as exc:
            yield RowError(line, parse.email(cells), str(exc))
            continue
        yield row


class _RowParser:
    """The cells of one row as an ImportRow; AddressError or ValueError says what is wrong."""

    def __init__(
        self, header: list[str], known_topics: Sequence[str], digests: Sequence[Digest] = ()
    ) -> None:
        columns = [h.strip().lower().lstrip("\ufeff") for h in header]
        if "email" not in columns:
            raise SubscriberError(
                f"the CSV header must name an 'email' column, got {','.join(header)!r}"
            )
        unknown = [c for c in columns if c not in CSV_COLUMNS]
        if unknown:
            raise SubscriberError(
                f"unknown CSV column {unknown[0]!r} (expected {','.join(CSV_COLUMNS)})"
            )
        self.width = len(columns)
        self._email = columns.index("email")
        self._name = columns.index("name") if "name" in columns else None
        self._topics = columns.index("topics") if "topics" in columns else None
        self._status = columns.index("status") if "status" in columns else None
        self._digests = columns.index("digests") if "digests" in columns else None
        self._parse_digests = functools.lru_cache(maxsize=1024)(
            functools.partial(editions.parse_digests, digests=tuple(digests))
        )
        self._every_topic = tuple(known_topics)
        self._normalize = _ImportNormalizer()
        # A file repeats a few topic cells: each is parsed once (a bounded cache, since a
        # hostile file can make every cell different).
        self._parse_topics = functools.lru_cache(maxsize=1024)(
            functools.partial(parse_topics, known=self._every_topic)
        )

    def blank(self, cells: list[str]) -> bool:
        """A row with nothing but whitespace (skipped, as a blank line)."""
        if len(cells) > self._email and cells[self._email].strip():
            return False  # the common case, decided without looking at every cell
        return not any(c.strip() for c in cells)

    def email(self, cells: list[str]) -> str:
        return cells[self._email]

    def __call__(self, line: int, cells: list[str]) -> ImportRow:
        raw_email = cells[self._email]
        email = self._normalize(raw_email)
        name = "" if self._name is None else clean_name(cells[self._name])
        topics = (
            self._every_topic if self._topics is None else self._parse_topics(cells[self._topics])
        )
        status = "active" if self._status is None else cells[self._status].strip().lower()
        status = status or "active"
        if status not in SUBSCRIBER_STATUSES:
            raise ValueError(f"unknown status {status!r} (known: {', '.join(SUBSCRIBER_STATUSES)})")
        # A blank cell names no choice: a new subscriber gets the default digests, an existing
        # one (--update) keeps theirs (an export writes "" for a reader who chose none).
        cell = "" if self._digests is None else cells[self._digests]
        digests = self._parse_digests(cell) if cell.replace(";", "").strip() else None
        return ImportRow(line, raw_email, email, name, topics, status, digests)


def _not_utf8(exc: UnicodeDecodeError) -> str:
    return (
        f"the file is not UTF-8 text ({exc.reason} near byte {exc.start}); "
        "save it as UTF-8 CSV and import it again (nothing was imported from this point)"
    )


class _Readable:
    """The rows of a reader, stopping at a file that cannot be read any further.

    The rows read before that point still go in, as the error says; the error is raised once
    they have.
    """

    def __init__(self, rows: Iterator[ReadRow]) -> None:
        self._rows = rows
        self.error: SubscriberError | None = None

    def __iter__(self) -> Iterator[ReadRow]:
        try:
            yield from self._rows
        except SubscriberError as exc:
            self.error = exc


def import_csv(
    engine: sa.Engine,
    stream: TextIO,
    *,
    known_topics: Sequence[str],
    now: datetime,
    digests: Sequence[Digest] = (),
    source: str = "import",
    update: bool = False,
    chunk_size: int = IMPORT_CHUNK,
    on_rejected: Callable[[list[RowError]], None] | None = None,
) -> ImportReport:
    """Import ``email,name,topics,status,digests`` rows; bad rows are reported, valid rows all
    go in.

    ``digests`` is the config's ``[[digests]]``: a row's digests cell names some of them (``;``
    separated); a row without one, or a file without the column, gives a new subscriber the
    default ones. New addresses are inserted. Present ones are left alone (``update=True``
    refreshes their name, topics and, when the file has the column, digests; never their
    status: an import must not resubscribe someone who left).
    Suppressed addresses are skipped. Running the same file twice changes nothing.
    ``report.errors`` is in row order. With ``on_rejected``, the rejected rows are handed to it
    instead, in row order, after the chunk that holds them has been committed (so memory does
    not grow with a file of bad rows), and ``report.errors`` stays empty. A file that stops
    decoding raises SubscriberError after the rows before that point have gone in (and their
    rejected rows have been handed over).

    Each ``chunk_size`` rows are one transaction: on SQLite it holds the write lock for about a
    second at 50,000 rows (other writers wait, up to their busy timeout); fewer, larger
    transactions are what makes a big import fast there (every commit rewrites the index pages
    it touched, and a random uid touches most of them).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    report = ImportReport()
    readable = _Readable(_read_csv(stream, known_topics, digests))
    with (
        engine.connect() as conn,
        importer.staging(
            conn, now=now, source=source, default_digests=editions.defaults(digests)
        ) as stage,
        # The file is read, validated and prepared in a thread, a chunk ahead of the
        # database.
        stage.read_ahead(readable, chunk_size) as chunks,
    ):
        for chunk in chunks:
            with conn.begin():
                result = stage.import_chunk(chunk, present=update)
                _count(report, result)
                if update:
                    updated, unchanged = store.refresh(conn, result.present, now=now, source=source)
                    report.updated += updated
                    report.unchanged += unchanged
            # The chunk is committed: its rejected rows are handed on, in row order.
            if on_rejected is None:
                report.errors += result.rejected
            elif result.rejected:
                on_rejected(result.rejected)
    if readable.error is not None:
        raise readable.error
    return report


def _count(report: ImportReport, result: importer.ChunkResult) -> None:
    report.added += result.added
    report.suppressed += result.suppressed
    report.unchanged += result.unchanged
    report.rejected += len(result.rejected)


def export_csv(engine: sa.Engine, out: TextIO, *, status: str | None = None) -> int:
    """Write every subscriber as ``email,name,topics,status,digests``; returns the row count."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    count = 0
    for sub in store.iter_subscribers(engine, status=status):
        row = csv_row(sub)
        writer.writerow([row[column] for column in CSV_COLUMNS])
        count += 1
    return count


def csv_row(sub: Subscriber) -> dict[str, str]:
    """One subscriber as the export writes it (and the import reads it): ``CSV_COLUMNS``."""
    return {
        "email": sub.email,
        "name": _csv_safe(sub.name),
        "topics": ";".join(sub.topics),
        "status": sub.status,
        "digests": ";".join(sub.digest_keys),
    }


def _csv_safe(value: str) -> str:
    # A cell starting with = + - @ runs as a formula when staff open the export in a spreadsheet.
    return "'" + value if value[:1] in ("=", "+", "-", "@") else value


def export_text(engine: sa.Engine) -> str:
    """The CSV export as a string (small lists and tests)."""
    buffer = io.StringIO()
    export_csv(engine, buffer)
    return buffer.getvalue()
