"""The subscriber store: add, import, export, list, show, unsubscribe and erase.

Bulk paths use Core statements in chunks: one ORM object per row is fifty times slower here.
The CSV import reads and validates rows here and leaves the database work to mailer/importer.py.
"""

from __future__ import annotations

import csv
import functools
import io
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

import sqlalchemy as sa

from mailer.db import events
from mailer.db.engine import upsert_insert
from mailer.db.schema import (
    SUBSCRIBER_STATUSES,
    subscriber_topics,
    subscribers,
    suppressions,
)
from mailer.errors import AddressError, SubscriberError, SuppressedError
from mailer.subscribers import importer
from mailer.subscribers.addresses import MAX_ADDRESS_LENGTH, address_hash, normalize_address
from mailer.subscribers.importer import ImportRow, ReadRow
from mailer.subscribers.importer import RowError as RowError
from mailer.subscribers.tokens import new_uid

CSV_COLUMNS = ("email", "name", "topics", "status")
IMPORT_CHUNK = 50_000
_REFRESH_BATCH = 5_000
MAX_NAME_LENGTH = 200


@dataclass(frozen=True)
class Subscriber:
    id: int
    uid: str
    email: str
    name: str
    status: str
    topics: tuple[str, ...]
    created_at: datetime
    confirmed_at: datetime | None
    unsubscribed_at: datetime | None
    consent_source: str
    consent_at: datetime | None
    consent_ip: str | None
    consent_user_agent: str | None
    consent_policy_version: str | None


@dataclass
class ImportReport:
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


def clean_name(raw: str) -> str:
    """A display name with control characters removed (they never reach a header or page)."""
    printable = raw if raw.isprintable() else "".join(ch for ch in raw if ch.isprintable())
    name = printable.strip()
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"name longer than {MAX_NAME_LENGTH} characters")
    return name


def parse_topics(raw: str | Iterable[str], known: Sequence[str]) -> tuple[str, ...]:
    """Topic keys from ``a;b`` or a list; unknown keys raise ValueError naming them.

    An empty choice means every topic: a subscriber imported without topics still gets the
    whole newsletter they signed up for.
    """
    items = raw.split(";") if isinstance(raw, str) else list(raw)
    chosen = [t.strip() for t in items if t.strip()]
    unknown = [t for t in chosen if t not in known]
    if unknown:
        raise ValueError(f"unknown topic {unknown[0]!r} (known: {', '.join(known)})")
    if not chosen:
        return tuple(known)
    return tuple(t for t in known if t in chosen)


def _pairs(conn: sa.Connection, query: sa.Select[Any]) -> dict[Any, Any]:
    """A two-column query as a dict of first column to second."""
    return {key: value for key, value in conn.execute(query)}


def _topics_of(conn: sa.Connection, ids: Sequence[int]) -> dict[int, tuple[str, ...]]:
    result: dict[int, list[str]] = {i: [] for i in ids}
    if ids:
        rows = conn.execute(
            sa.select(subscriber_topics.c.subscriber_id, subscriber_topics.c.topic)
            .where(subscriber_topics.c.subscriber_id.in_(ids))
            .order_by(subscriber_topics.c.topic)
        )
        for sid, topic in rows:
            result[sid].append(topic)
    return {k: tuple(v) for k, v in result.items()}


def _to_subscriber(row: Any, topics: tuple[str, ...]) -> Subscriber:
    m = row._mapping
    return Subscriber(
        id=m["id"],
        uid=m["uid"],
        email=m["email"],
        name=m["name"],
        status=m["status"],
        topics=topics,
        created_at=m["created_at"],
        confirmed_at=m["confirmed_at"],
        unsubscribed_at=m["unsubscribed_at"],
        consent_source=m["consent_source"],
        consent_at=m["consent_at"],
        consent_ip=m["consent_ip"],
        consent_user_agent=m["consent_user_agent"],
        consent_policy_version=m["consent_policy_version"],
    )


def suppression_reason(conn: sa.Connection, email: str) -> str | None:
    """Why an address is suppressed, or None."""
    return conn.execute(
        sa.select(suppressions.c.reason).where(suppressions.c.email_hash == address_hash(email))
    ).scalar_one_or_none()


def suppress(conn: sa.Connection, email: str, reason: str, now: datetime) -> None:
    """Put an address on the suppression list (idempotent)."""
    stmt = upsert_insert(conn, suppressions).values(
        email_hash=address_hash(email), reason=reason, created_at=now
    )
    conn.execute(stmt.on_conflict_do_nothing(index_elements=["email_hash"]))


def get(engine: sa.Engine, email: str) -> Subscriber:
    """The subscriber with this address; SubscriberError if there is none."""
    address = normalize_address(email)
    with engine.connect() as conn:
        row = conn.execute(sa.select(subscribers).where(subscribers.c.email == address)).first()
        if row is None:
            raise SubscriberError(f"no subscriber {address}", email=address)
        return _to_subscriber(row, _topics_of(conn, [row.id])[row.id])


def get_by_uid(conn: sa.Connection, uid: str) -> Subscriber | None:
    row = conn.execute(sa.select(subscribers).where(subscribers.c.uid == uid)).first()
    if row is None:
        return None
    return _to_subscriber(row, _topics_of(conn, [row.id])[row.id])


def add(
    engine: sa.Engine,
    email: str,
    *,
    known_topics: Sequence[str],
    now: datetime,
    name: str = "",
    topics: Iterable[str] = (),
    status: str = "active",
    source: str = "cli",
    ip: str | None = None,
    user_agent: str | None = None,
    policy_version: str | None = None,
) -> Subscriber:
    """Add one subscriber. Raises AddressError, SuppressedError, or SubscriberError if present."""
    address = normalize_address(email)
    if status not in SUBSCRIBER_STATUSES:
        raise SubscriberError(
            f"unknown status {status!r} (known: {', '.join(SUBSCRIBER_STATUSES)})"
        )
    try:
        chosen = parse_topics(list(topics), known_topics)
        display = clean_name(name)
    except ValueError as exc:
        raise SubscriberError(str(exc), email=address) from exc
    with engine.begin() as conn:
        reason = suppression_reason(conn, address)
        if reason is not None:
            raise SuppressedError(address, reason)
        exists = conn.execute(
            sa.select(subscribers.c.id).where(subscribers.c.email == address)
        ).first()
        if exists is not None:
            raise SubscriberError(f"{address} is already subscribed", email=address)
        sid: int = conn.execute(
            subscribers.insert()
            .returning(subscribers.c.id)
            .values(
                uid=new_uid(),
                email=address,
                name=display,
                status=status,
                created_at=now,
                updated_at=now,
                confirmed_at=now if status == "active" else None,
                consent_source=source,
                consent_at=now,
                consent_ip=ip,
                consent_user_agent=user_agent,
                consent_policy_version=policy_version,
            )
        ).scalar_one()
        conn.execute(
            subscriber_topics.insert(), [{"subscriber_id": sid, "topic": t} for t in chosen]
        )
        events.record(
            conn, sid, "subscribed", now, source=source, status=status, topics=list(chosen)
        )
    return get(engine, address)


# A dot-atom local part in ASCII (RFC 5322 §3.4.1): the only kind the fast path below takes.
_DOT_ATOM_LOCAL = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
)
_LOCAL_PART_LIMIT = 64  # RFC 5321 §4.5.3.1.1, as email-validator enforces it


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
            and len(local) <= _LOCAL_PART_LIMIT
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


def _read_csv(stream: TextIO, known_topics: Sequence[str]) -> Iterator[ReadRow]:
    """The rows of the file in order: valid ones, and a RowError for each rejected one.

    Duplicates are not looked for here: the staging tables find them (see mailer/importer.py).
    """
    reader = csv.reader(stream)
    try:
        header = next(reader)
    except StopIteration:
        return
    except UnicodeDecodeError as exc:
        raise SubscriberError(_not_utf8(exc)) from exc
    except csv.Error as exc:
        raise SubscriberError(f"cannot read the CSV header: {exc}") from exc
    parse = _RowParser(header, known_topics)
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

    def __init__(self, header: list[str], known_topics: Sequence[str]) -> None:
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
        return ImportRow(line, raw_email, email, name, topics, status)


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
    source: str = "import",
    update: bool = False,
    chunk_size: int = IMPORT_CHUNK,
    on_rejected: Callable[[list[RowError]], None] | None = None,
) -> ImportReport:
    """Import ``email,name,topics,status`` rows; bad rows are reported, valid rows all go in.

    New addresses are inserted. Present ones are left alone (``update=True`` refreshes their name
    and topics, never their status: an import must not resubscribe someone who left).
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
    readable = _Readable(_read_csv(stream, known_topics))
    with (
        engine.connect() as conn,
        importer.staging(conn, now=now, source=source) as stage,
        # The file is read, validated and prepared in a thread, a chunk ahead of the
        # database.
        stage.read_ahead(readable, chunk_size) as chunks,
    ):
        for chunk in chunks:
            with conn.begin():
                result = stage.import_chunk(chunk, present=update)
                _count(report, result)
                if update:
                    _refresh(conn, result.present, report, now=now, source=source)
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


def _refresh(
    conn: sa.Connection,
    present: list[importer.Present],
    report: ImportReport,
    *,
    now: datetime,
    source: str,
) -> None:
    """``update=True``: give present subscribers the name and topics of their row."""
    # A chunk can hold more present rows than SQLite takes bound values in one IN list.
    for start in range(0, len(present), _REFRESH_BATCH):
        _refresh_batch(conn, present[start : start + _REFRESH_BATCH], report, now, source)


def _refresh_batch(
    conn: sa.Connection,
    present: list[importer.Present],
    report: ImportReport,
    now: datetime,
    source: str,
) -> None:
    current = _topics_of(conn, [p.subscriber_id for p in present])
    names = _pairs(
        conn,
        sa.select(subscribers.c.id, subscribers.c.name).where(subscribers.c.id.in_(current)),
    )
    for sid, name, topics in present:
        if names[sid] == name and current[sid] == topics:
            report.unchanged += 1
            continue
        conn.execute(
            subscribers.update().where(subscribers.c.id == sid).values(name=name, updated_at=now)
        )
        _set_topics(conn, sid, topics)
        events.record(conn, sid, "preferences", now, source=source, topics=list(topics))
        report.updated += 1


def _set_topics(conn: sa.Connection, sid: int, topics: Iterable[str]) -> None:
    conn.execute(subscriber_topics.delete().where(subscriber_topics.c.subscriber_id == sid))
    rows = [{"subscriber_id": sid, "topic": t} for t in topics]
    if rows:
        conn.execute(subscriber_topics.insert(), rows)


def iter_subscribers(
    engine: sa.Engine, *, status: str | None = None, topic: str | None = None, batch: int = 5_000
) -> Iterator[Subscriber]:
    """Every subscriber in address order, streamed in batches (keyset pagination)."""
    after = ""
    while True:
        query = (
            sa.select(subscribers)
            .where(subscribers.c.email > after)
            .order_by(subscribers.c.email)
            .limit(batch)
        )
        if status is not None:
            query = query.where(subscribers.c.status == status)
        if topic is not None:
            query = query.where(
                subscribers.c.id.in_(
                    sa.select(subscriber_topics.c.subscriber_id).where(
                        subscriber_topics.c.topic == topic
                    )
                )
            )
        with engine.connect() as conn:
            rows = conn.execute(query).all()
            topics = _topics_of(conn, [r.id for r in rows])
        if not rows:
            return
        for row in rows:
            yield _to_subscriber(row, topics[row.id])
        after = rows[-1].email


def export_csv(engine: sa.Engine, out: TextIO, *, status: str | None = None) -> int:
    """Write every subscriber as ``email,name,topics,status``; returns the row count."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    count = 0
    for sub in iter_subscribers(engine, status=status):
        writer.writerow([sub.email, _csv_safe(sub.name), ";".join(sub.topics), sub.status])
        count += 1
    return count


def _csv_safe(value: str) -> str:
    # A cell starting with = + - @ runs as a formula when staff open the export in a spreadsheet.
    return "'" + value if value[:1] in ("=", "+", "-", "@") else value


def set_status(
    engine: sa.Engine, email: str, status: str, *, now: datetime, source: str, **detail: Any
) -> Subscriber:
    """Change one subscriber's status and record why."""
    sub = get(engine, email)
    with engine.begin() as conn:
        change_status(conn, sub.id, status, now=now, source=source, **detail)
    return get(engine, sub.email)


def change_status(
    conn: sa.Connection, sid: int, status: str, *, now: datetime, source: str, **detail: Any
) -> bool:
    """Set a status inside a transaction; returns False (and records nothing) if already so."""
    values: dict[str, Any] = {"status": status, "updated_at": now}
    if status == "unsubscribed":
        values["unsubscribed_at"] = now
    if status == "active":
        values["confirmed_at"] = now
    changed = conn.execute(
        subscribers.update()
        .where(subscribers.c.id == sid, subscribers.c.status != status)
        .values(**values)
    ).rowcount
    if changed:
        events.record(conn, sid, status, now, source=source, **detail)
    return bool(changed)


def erase(engine: sa.Engine, email: str, *, now: datetime, reason: str = "erased") -> None:
    """Delete everything held about a person; keep only the address hash on the suppression list.

    Their deliveries and events go too (cascade); issue totals keep counting them nowhere.
    """
    address = normalize_address(email)
    with engine.begin() as conn:
        row = conn.execute(
            sa.select(subscribers.c.id).where(subscribers.c.email == address)
        ).first()
        if row is None and suppression_reason(conn, address) is None:
            raise SubscriberError(f"no subscriber {address}", email=address)
        if row is not None:
            conn.execute(subscribers.delete().where(subscribers.c.id == row.id))
        suppress(conn, address, reason, now)
        events.record(conn, None, "erased", now, email_hash=address_hash(address))


def counts_by_status(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(subscribers.c.status, sa.func.count()).group_by(subscribers.c.status)
        )
        return {status: n for status, n in rows}


def export_text(engine: sa.Engine) -> str:
    """The CSV export as a string (small lists and tests)."""
    buffer = io.StringIO()
    export_csv(engine, buffer)
    return buffer.getvalue()
