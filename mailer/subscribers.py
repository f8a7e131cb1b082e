"""The subscriber store: add, import, export, list, show, unsubscribe and erase.

Bulk paths use Core statements in chunks: one ORM object per row is fifty times slower here.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

import sqlalchemy as sa

from mailer import events
from mailer.addresses import MAX_ADDRESS_LENGTH, address_hash, normalize_address
from mailer.db import upsert_insert
from mailer.errors import AddressError, SubscriberError, SuppressedError
from mailer.schema import (
    SUBSCRIBER_STATUSES,
    subscriber_topics,
    subscribers,
    suppressions,
)
from mailer.tokens import new_uid

CSV_COLUMNS = ("email", "name", "topics", "status")
IMPORT_CHUNK = 5_000
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


@dataclass(frozen=True)
class RowError:
    """One rejected CSV row: its 1-based line number in the file, the address given, why."""

    row: int
    email: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.row} ({self.email or 'no email'}): {self.reason}"


@dataclass
class ImportReport:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    suppressed: int = 0
    errors: list[RowError] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.added + self.updated + self.unchanged + self.suppressed + len(self.errors)


def clean_name(raw: str) -> str:
    """A display name with control characters removed (they never reach a header or page)."""
    name = "".join(ch for ch in raw if ch.isprintable()).strip()
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


@dataclass(frozen=True)
class _Row:
    line: int
    email: str
    name: str
    topics: tuple[str, ...]
    status: str


def _read_csv(stream: TextIO, known_topics: Sequence[str], report: ImportReport) -> Iterator[_Row]:
    reader = csv.reader(stream)
    try:
        header = next(reader)
    except StopIteration:
        return
    except UnicodeDecodeError as exc:
        raise SubscriberError(_not_utf8(exc)) from exc
    except csv.Error as exc:
        raise SubscriberError(f"cannot read the CSV header: {exc}") from exc
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
    index = {c: columns.index(c) for c in CSV_COLUMNS if c in columns}
    seen: dict[str, int] = {}
    normalize = _ImportNormalizer()
    while True:
        line = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except UnicodeDecodeError as exc:
            raise SubscriberError(f"row {line}: " + _not_utf8(exc)) from exc
        except csv.Error as exc:
            report.errors.append(RowError(line, "", f"malformed CSV: {exc}"))
            continue
        line = reader.line_num
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(columns):
            report.errors.append(
                RowError(
                    line,
                    cells[0] if cells else "",
                    f"expected {len(columns)} fields, got {len(cells)}",
                )
            )
            continue
        raw_email = cells[index["email"]]
        try:
            email = normalize(raw_email)
            name = clean_name(cells[index["name"]]) if "name" in index else ""
            chosen = (
                parse_topics(cells[index["topics"]], known_topics)
                if "topics" in index
                else tuple(known_topics)
            )
            status = cells[index["status"]].strip().lower() if "status" in index else "active"
            status = status or "active"
            if status not in SUBSCRIBER_STATUSES:
                raise ValueError(
                    f"unknown status {status!r} (known: {', '.join(SUBSCRIBER_STATUSES)})"
                )
        except AddressError as exc:
            report.errors.append(RowError(line, raw_email, exc.reason))
            continue
        except ValueError as exc:
            report.errors.append(RowError(line, raw_email, str(exc)))
            continue
        if email in seen:
            report.errors.append(RowError(line, raw_email, f"duplicate of row {seen[email]}"))
            continue
        seen[email] = line
        yield _Row(line, email, name, chosen, status)


def _not_utf8(exc: UnicodeDecodeError) -> str:
    return (
        f"the file is not UTF-8 text ({exc.reason} near byte {exc.start}); "
        "save it as UTF-8 CSV and import it again (nothing was imported from this point)"
    )


def _chunks(rows: Iterable[_Row], size: int) -> Iterator[list[_Row]]:
    chunk: list[_Row] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def import_csv(
    engine: sa.Engine,
    stream: TextIO,
    *,
    known_topics: Sequence[str],
    now: datetime,
    source: str = "import",
    update: bool = False,
) -> ImportReport:
    """Import ``email,name,topics,status`` rows; bad rows are reported, valid rows all go in.

    New addresses are inserted. Present ones are left alone (``update=True`` refreshes their name
    and topics, never their status: an import must not resubscribe someone who left).
    Suppressed addresses are skipped. Running the same file twice changes nothing.
    """
    report = ImportReport()
    for chunk in _chunks(_read_csv(stream, known_topics, report), IMPORT_CHUNK):
        with engine.begin() as conn:
            _import_chunk(conn, chunk, report, now=now, source=source, update=update)
    return report


def _import_chunk(
    conn: sa.Connection,
    chunk: list[_Row],
    report: ImportReport,
    *,
    now: datetime,
    source: str,
    update: bool,
) -> None:
    hashes = {address_hash(r.email): r for r in chunk}
    blocked = set(
        conn.scalars(
            sa.select(suppressions.c.email_hash).where(suppressions.c.email_hash.in_(list(hashes)))
        )
    )
    rows = [r for h, r in hashes.items() if h not in blocked]
    report.suppressed += len(chunk) - len(rows)
    existing = _pairs(
        conn,
        sa.select(subscribers.c.email, subscribers.c.id).where(
            subscribers.c.email.in_([r.email for r in rows])
        ),
    )
    new = [r for r in rows if r.email not in existing]
    if new:
        conn.execute(
            upsert_insert(conn, subscribers).on_conflict_do_nothing(index_elements=["email"]),
            [
                {
                    "uid": new_uid(),
                    "email": r.email,
                    "name": r.name,
                    "status": r.status,
                    "created_at": now,
                    "updated_at": now,
                    "confirmed_at": now if r.status == "active" else None,
                    "consent_source": source,
                    "consent_at": now,
                }
                for r in new
            ],
        )
        ids = _pairs(
            conn,
            sa.select(subscribers.c.email, subscribers.c.id).where(
                subscribers.c.email.in_([r.email for r in new])
            ),
        )
        conn.execute(
            upsert_insert(conn, subscriber_topics).on_conflict_do_nothing(),
            [{"subscriber_id": ids[r.email], "topic": t} for r in new for t in r.topics],
        )
        events.record_many(
            conn,
            (
                {
                    "subscriber_id": ids[r.email],
                    "kind": "subscribed",
                    "at": now,
                    "detail": {"source": source, "status": r.status, "row": r.line},
                }
                for r in new
            ),
        )
        report.added += len(new)
    present = [r for r in rows if r.email in existing]
    if not update:
        report.unchanged += len(present)
        return
    current = _topics_of(conn, [existing[r.email] for r in present])
    names = _pairs(
        conn,
        sa.select(subscribers.c.id, subscribers.c.name).where(subscribers.c.id.in_(current)),
    )
    for r in present:
        sid = existing[r.email]
        if names[sid] == r.name and current[sid] == r.topics:
            report.unchanged += 1
            continue
        conn.execute(
            subscribers.update().where(subscribers.c.id == sid).values(name=r.name, updated_at=now)
        )
        _set_topics(conn, sid, r.topics)
        events.record(conn, sid, "preferences", now, source=source, topics=list(r.topics))
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
