"""The CSV import through staging tables equals the row-by-row import it replaced.

``reference_import`` is that earlier implementation, kept here as the oracle: it read the whole
file's addresses into a dict for the duplicate check and inserted each chunk with executemany.
The same file, on the same seeded database (SQLite and PostgreSQL), must leave the same rows in
every table (ids aside, but in the same order) and give the same report.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any, TextIO

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.db import audit
from mailer.db.engine import upsert_insert
from mailer.db.schema import (
    SUBSCRIBER_STATUSES,
    events,
    metadata,
    subscriber_topics,
    suppressions,
)
from mailer.db.schema import subscribers as subscriber_table
from mailer.errors import AddressError, SubscriberError
from mailer.subscribers import csvfile, importer, personal
from mailer.subscribers.addresses import address_hash, normalize_address
from mailer.subscribers.csvfile import ImportReport
from mailer.subscribers.importer import RowError
from mailer.subscribers.store import clean_name, parse_topics
from mailer.subscribers.tokens import UID_RE, new_uid
from tests.factories import NOW, TOPICS, make_subscriber

# ------------------------------------------------------------------ the oracle


def reference_import(
    engine: sa.Engine,
    stream: TextIO,
    *,
    known_topics: Sequence[str],
    now: datetime,
    source: str = "import",
    update: bool = False,
    chunk: int = 5_000,
) -> ImportReport:
    report = ImportReport()
    rows = list(_reference_rows(stream, known_topics, report))
    for start in range(0, len(rows), chunk):
        with engine.begin() as conn:
            _reference_chunk(
                conn, rows[start : start + chunk], report, now=now, source=source, update=update
            )
    report.rejected = len(report.errors)
    return report


Row = tuple[int, str, str, tuple[str, ...], str, str]  # line, email, name, topics, status, raw


def _reference_rows(
    stream: TextIO, known_topics: Sequence[str], report: ImportReport
) -> Iterator[Row]:
    reader = csv.reader(stream)
    try:
        header = next(reader)
    except StopIteration:
        return
    columns = [h.strip().lower().lstrip("\ufeff") for h in header]
    if "email" not in columns or any(c not in csvfile.CSV_COLUMNS for c in columns):
        raise SubscriberError("bad header")
    index = {c: columns.index(c) for c in csvfile.CSV_COLUMNS if c in columns}
    seen: dict[str, int] = {}
    while True:
        line = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
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
            email = normalize_address(raw_email)
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
        yield (line, email, name, chosen, status, raw_email)


def _reference_chunk(
    conn: sa.Connection,
    chunk: list[Row],
    report: ImportReport,
    *,
    now: datetime,
    source: str,
    update: bool,
) -> None:
    hashes = {address_hash(r[1]): r for r in chunk}
    blocked = set(
        conn.scalars(
            sa.select(suppressions.c.email_hash).where(suppressions.c.email_hash.in_(list(hashes)))
        )
    )
    rows = [r for h, r in hashes.items() if h not in blocked]
    report.suppressed += len(chunk) - len(rows)
    existing = _ids(conn, [r[1] for r in rows])
    new = [r for r in rows if r[1] not in existing]
    if new:
        conn.execute(
            upsert_insert(conn, subscriber_table).on_conflict_do_nothing(index_elements=["email"]),
            [
                {
                    "uid": new_uid(),
                    "email": email,
                    "name": name,
                    "status": status,
                    "created_at": now,
                    "updated_at": now,
                    "confirmed_at": now if status == "active" else None,
                    "consent_source": source,
                    "consent_at": now,
                }
                for _, email, name, _, status, _ in new
            ],
        )
        ids = _ids(conn, [r[1] for r in new])
        conn.execute(
            upsert_insert(conn, subscriber_topics).on_conflict_do_nothing(),
            [{"subscriber_id": ids[r[1]], "topic": t} for r in new for t in r[3]],
        )
        conn.execute(
            events.insert(),
            [
                {
                    "subscriber_id": ids[email],
                    "kind": "subscribed",
                    "at": now,
                    "detail": {"source": source, "status": status, "row": line},
                }
                for line, email, _, _, status, _ in new
            ],
        )
        report.added += len(new)
    present = [r for r in rows if r[1] in existing]
    if not update:
        report.unchanged += len(present)
        return
    for _, email, name, topics, _, _ in present:
        sid = existing[email]
        current = tuple(
            conn.scalars(
                sa.select(subscriber_topics.c.topic)
                .where(subscriber_topics.c.subscriber_id == sid)
                .order_by(subscriber_topics.c.topic)
            )
        )
        held = conn.scalar(sa.select(subscriber_table.c.name).where(subscriber_table.c.id == sid))
        if held == name and current == topics:
            report.unchanged += 1
            continue
        conn.execute(
            subscriber_table.update()
            .where(subscriber_table.c.id == sid)
            .values(name=name, updated_at=now)
        )
        conn.execute(subscriber_topics.delete().where(subscriber_topics.c.subscriber_id == sid))
        if topics:
            conn.execute(
                subscriber_topics.insert(), [{"subscriber_id": sid, "topic": t} for t in topics]
            )
        audit.record(conn, sid, "preferences", now, source=source, topics=list(topics))
        report.updated += 1


def _ids(conn: sa.Connection, emails: list[str]) -> dict[str, int]:
    query = sa.select(subscriber_table.c.email, subscriber_table.c.id).where(
        subscriber_table.c.email.in_(emails)
    )
    return {email: sid for email, sid in conn.execute(query)}


# ------------------------------------------------------------------ the comparison


def seed(engine: sa.Engine) -> None:
    """Someone already subscribed and someone erased (so suppressed), before each import."""
    for table in reversed(metadata.sorted_tables):
        with engine.begin() as conn:
            conn.execute(table.delete())
    make_subscriber(engine, email="old@example.org", name="Old", topics=["base-alerts"])
    make_subscriber(engine, email="gone@example.org", name="Gone")
    personal.erase(engine, "gone@example.org", now=NOW)


def contents(engine: sa.Engine) -> dict[str, list[Any]]:
    """Every row the import can touch, ids replaced by addresses, in id order."""
    with engine.connect() as conn:
        people = conn.execute(sa.select(subscriber_table).order_by(subscriber_table.c.id)).all()
        email_of = {p.id: p.email for p in people}
        uids = [p.uid for p in people]
        assert all(UID_RE.match(uid) for uid in uids) and len(set(uids)) == len(uids)
        topics = sorted(
            (email_of[sid], topic)
            for sid, topic in conn.execute(
                sa.select(subscriber_topics.c.subscriber_id, subscriber_topics.c.topic)
            )
        )
        # The JSON as stored, text for text (PostgreSQL's json keeps it as written). In id
        # order within each kind: where an update's "preferences" events fall among the
        # "subscribed" ones depends on where the chunks end, in either implementation.
        logged = conn.execute(
            sa.select(
                events.c.kind,
                events.c.subscriber_id,
                events.c.at,
                sa.cast(events.c.detail, sa.Text),
            ).order_by(events.c.kind, events.c.id)
        )
        log = [(kind, email_of.get(sid), at, detail) for kind, sid, at, detail in logged]
        suppressed = sorted(tuple(r) for r in conn.execute(sa.select(suppressions)))
    rows = [tuple(v for k, v in p._mapping.items() if k not in ("id", "uid")) for p in people]
    return {"subscribers": rows, "topics": topics, "events": log, "suppressions": suppressed}


def both_ways(
    engine: sa.Engine,
    text: str,
    *,
    chunk_size: int,
    update: bool = False,
    source: str = "import:f.csv",
) -> tuple[tuple[ImportReport, dict[str, list[Any]]], tuple[ImportReport, dict[str, list[Any]]]]:
    """(report, contents) of the reference import, then of import_csv, each on a fresh seed."""
    seed(engine)
    expected = reference_import(
        engine,
        io.StringIO(text),
        known_topics=TOPICS,
        now=NOW,
        source=source,
        update=update,
    )
    before = contents(engine)
    seed(engine)
    actual = csvfile.import_csv(
        engine,
        io.StringIO(text),
        known_topics=TOPICS,
        now=NOW,
        source=source,
        update=update,
        chunk_size=chunk_size,
    )
    return (expected, before), (actual, contents(engine))


EVERY_CASE = (
    "email,name,topics,status\n"
    "ann@example.org,Ann,base-alerts;local-events,active\n"
    "not-an-address,Bob,,active\n"
    "cy@example.org,Cy,astrology,active\n"
    "dee@example.org,Dee,,unsubscribed\n"
    "ANN@example.org,Ann again,,active\n"
    "OLD@example.org,Old renamed,military-news,active\n"
    "gone@example.org,Gone,,active\n"
    "eve@example.org,Eve,military-news\n"
    "fay@example.org,Fay,,sleeping\n"
    "\n"
    '"gus@example.org","Gus, ""G""",local-events,Pending\n'
    "hal@example.org,Hal\x07,,bounced\n"
    "Gone@Example.org,Gone again,,active\n"
    "ivy@b\u00fccher.ch,Ivy,,complained\n"
    " dee@example.org ,Dee twice,,active\n"
    "old@example.org,Old,base-alerts,active\n"
)


@pytest.mark.parametrize("update", [False, True], ids=["insert-only", "update"])
@pytest.mark.parametrize("chunk_size", [1, 3, 50_000], ids=["chunk-1", "chunk-3", "one-chunk"])
def test_import_leaves_what_the_row_by_row_import_left(
    engine: sa.Engine, chunk_size: int, update: bool
) -> None:
    expected, actual = both_ways(engine, EVERY_CASE, chunk_size=chunk_size, update=update)
    assert actual == expected
    report = actual[0]
    assert (report.added, report.suppressed) == (5, 1)
    assert (report.updated, report.unchanged) == ((1, 0) if update else (0, 1))
    assert [e.row for e in report.errors] == [3, 4, 6, 9, 10, 14, 16, 17]


def test_rejected_rows_are_handed_on_in_row_order_after_their_chunk_commits(
    engine: sa.Engine,
) -> None:
    seed(engine)
    everything = csvfile.import_csv(
        engine, io.StringIO(EVERY_CASE), known_topics=TOPICS, now=NOW, chunk_size=3
    )
    seed(engine)
    handed: list[tuple[list[RowError], int]] = []  # each hand-over, and the subscribers then

    def on_rejected(rejected: list[RowError]) -> None:
        # Counted on another connection: it sees only what is committed.
        handed.append((rejected, _count_subscribers(engine)))

    report = _handing_on(engine, EVERY_CASE, chunk_size=3, on_rejected=on_rejected)
    assert report.errors == []
    assert report.rejected == everything.rejected == len(everything.errors) == 8
    assert [e for rejected, _ in handed for e in rejected] == everything.errors
    assert len(handed) > 1  # a hand-over per chunk with rejections, not one at the end
    # Each hand-over comes after the rows before its rejections are committed: ann (row 2)
    # is in by the time row 3 is handed on, and every new subscriber by the last.
    seeded = _count_subscribers(engine) - report.added
    assert handed[0][1] >= seeded + 1
    assert handed[-1][1] == seeded + report.added


def test_a_file_of_bad_rows_is_handed_on_a_chunk_at_a_time(engine: sa.Engine) -> None:
    text = "email,name\n" + "".join(f"not an address {i},N\n" for i in range(1_000))
    sizes: list[int] = []
    rows: list[int] = []

    def on_rejected(rejected: list[RowError]) -> None:
        sizes.append(len(rejected))
        rows.extend(e.row for e in rejected)

    report = _handing_on(engine, text, chunk_size=100, on_rejected=on_rejected)
    assert (report.added, report.rejected, report.rows, report.errors) == (0, 1_000, 1_000, [])
    assert rows == list(range(2, 1_002))
    assert max(sizes) <= 100  # never more than a chunk's rows held


def _handing_on(
    engine: sa.Engine,
    text: str,
    *,
    chunk_size: int,
    on_rejected: Callable[[list[RowError]], None],
) -> ImportReport:
    return csvfile.import_csv(
        engine,
        io.StringIO(text),
        known_topics=TOPICS,
        now=NOW,
        chunk_size=chunk_size,
        on_rejected=on_rejected,
    )


def _count_subscribers(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return conn.scalar(sa.select(sa.func.count()).select_from(subscriber_table)) or 0


# Values that COPY's text format must escape (backslash, tab, newline, carriage return), in
# the address as given, the name and the source (the event's JSON).
ESCAPED = (
    "email,name,topics,status\n"
    "ann@example.org,Back\\slash,base-alerts,active\n"
    'bob@example.org,"Two\tcells",,active\n'
    '"\tann@example.org",Ann again,,active\n'
    '" bob@example.org\r\n",Bob again,,active\n'
    'dee@example.org,"new\nline",,pending\n'
    "eve@example.org,\\N,,active\n"
)


@pytest.mark.parametrize("chunk_size", [1, 50_000], ids=["chunk-1", "one-chunk"])
def test_values_with_copy_escapes_import_as_given(engine: sa.Engine, chunk_size: int) -> None:
    source = 'import:C:\\lists\\"tab\tbed".csv'
    expected, actual = both_ways(engine, ESCAPED, chunk_size=chunk_size, source=source)
    assert actual == expected
    report = actual[0]
    assert report.added == 4
    assert [(e.row, e.email) for e in report.errors] == [
        (4, "\tann@example.org"),
        (6, " bob@example.org\r\n"),
    ]


_EMAILS = st.sampled_from(
    [
        "ann@example.org",
        "ANN@Example.ORG",
        " bob@example.org ",
        "bob@example.org",
        "old@example.org",
        "gone@example.org",
        "cy@b\u00fccher.ch",
        "not-an-address",
        "dee@example..org",
        "",
        "eve@[127.0.0.1]",
        "x" * 65 + "@example.org",
    ]
)
_CELLS = {
    "name": st.sampled_from(["", "Ann", " Bob ", "Cy\x07", "=SUM(A1)", "Zo\u00eb, Z.", "n" * 201]),
    "topics": st.sampled_from(
        ["", "base-alerts", "local-events;base-alerts", " military-news ; ", "astrology", ";;"]
    ),
    "status": st.sampled_from(["", "active", "Pending", "unsubscribed", " bounced ", "vip"]),
}


@st.composite
def csv_files(draw: st.DrawFn) -> str:
    others = draw(st.lists(st.sampled_from(list(_CELLS)), unique=True))
    header = draw(st.permutations(["email", *others]))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for _ in range(draw(st.integers(0, 12))):
        cells = [draw(_EMAILS) if c == "email" else draw(_CELLS[c]) for c in header]
        shape = draw(st.sampled_from(["row"] * 8 + ["blank", "short", "long"]))
        if shape == "blank":
            out.write("\n")
            continue
        if shape == "short":
            cells = cells[:-1]
        if shape == "long":
            cells = [*cells, "extra"]
        writer.writerow(cells)
    return out.getvalue()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=csv_files(), chunk_size=st.integers(1, 4), update=st.booleans())
def test_any_file_imports_as_the_row_by_row_import_did(
    engine: sa.Engine, text: str, chunk_size: int, update: bool
) -> None:
    expected, actual = both_ways(engine, text, chunk_size=chunk_size, update=update)
    assert actual == expected


# ------------------------------------------------------------------ the parts


@pytest.mark.parametrize("status", SUBSCRIBER_STATUSES)
@pytest.mark.parametrize(
    "source", ["import", "import:people.csv", 'import:"q"\\.csv', "import:Zo\u00eb\u2028.csv"]
)
@pytest.mark.parametrize("line", [2, 10, 1_000_001])
def test_event_detail_is_the_json_that_json_dumps_writes(
    source: str, status: str, line: int
) -> None:
    detail = importer.EventDetail(source)
    assert detail(status, line) == json.dumps({"source": source, "status": status, "row": line})


def test_fresh_uids_look_like_new_uid_and_differ() -> None:
    uids = list(importer.fresh_uids(10_000))
    assert len(uids) == len(set(uids)) == 10_000
    assert all(UID_RE.match(uid) for uid in uids)
    assert {len(uid) for uid in uids} == {len(new_uid())}


def test_duplicates_name_the_first_row_across_chunks(engine: sa.Engine) -> None:
    text = "email\n" + "".join(f"r{i}@example.org\n" for i in range(9)) + "R1@example.org\n"
    report = csvfile.import_csv(
        engine, io.StringIO(text), known_topics=TOPICS, now=NOW, chunk_size=2
    )
    assert report.added == 9
    assert report.errors == [RowError(11, "R1@example.org", "duplicate of row 3")]


def test_rows_before_an_undecodable_byte_are_kept(engine: sa.Engine) -> None:
    good = "".join(f"reader{i}@example.org\n" for i in range(1_000))  # 24 KB: 3 decoded blocks
    raw = ("email\n" + good).encode() + b"b\xe9@example.org\n"
    stream = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8", newline="")
    with pytest.raises(SubscriberError, match=r"not UTF-8 .*nothing was imported from this point"):
        csvfile.import_csv(engine, stream, known_topics=TOPICS, now=NOW, chunk_size=100)
    with engine.connect() as conn:
        emails = conn.scalars(
            sa.select(subscriber_table.c.email).order_by(subscriber_table.c.id)
        ).all()
    # Everything the decoder handed over before the bad block went in, in file order.
    assert len(emails) >= 600
    assert emails == [f"reader{i}@example.org" for i in range(len(emails))]


def test_no_staging_table_outlives_an_import(engine: sa.Engine) -> None:
    csvfile.import_csv(engine, io.StringIO(EVERY_CASE), known_topics=TOPICS, now=NOW)
    with pytest.raises(SubscriberError):
        csvfile.import_csv(
            engine, io.StringIO("email,shoe_size\na@example.org,9\n"), known_topics=TOPICS, now=NOW
        )
    with engine.connect() as conn:
        names = set(sa.inspect(conn).get_table_names()) | _temporary_tables(conn)
        if conn.dialect.name == "sqlite":  # the import's bigger page cache is given back
            assert conn.exec_driver_sql("PRAGMA cache_size").scalar_one() == -2000
    assert not {n for n in names if re.match(r"_import_", n)}


def _temporary_tables(conn: sa.Connection) -> set[str]:
    if conn.dialect.name == "sqlite":
        return set(conn.scalars(sa.text("SELECT name FROM sqlite_temp_master WHERE type='table'")))
    return set(
        conn.scalars(sa.text("SELECT tablename FROM pg_tables WHERE schemaname LIKE 'pg_temp%'"))
    )


def test_an_update_of_more_rows_than_one_in_list_takes(engine: sa.Engine) -> None:
    # 33,000 present rows in one chunk: more than the 32,766 bound values per statement of
    # SQLite's default build (Debian's allows 250,000, so the default is set here).
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _default_sqlite_variable_limit)
    text = "email,name\n" + "".join(f"r{i}@example.org,R {i}\n" for i in range(33_000))
    first = csvfile.import_csv(engine, io.StringIO(text), known_topics=TOPICS, now=NOW)
    again = csvfile.import_csv(engine, io.StringIO(text), known_topics=TOPICS, now=NOW, update=True)
    assert (first.added, again.added, again.updated, again.unchanged) == (33_000, 0, 0, 33_000)


def _default_sqlite_variable_limit(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    dbapi_connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 32_766)


# ------------------------------------------------------------------ concurrency and failures


def test_an_address_inserted_meanwhile_is_skipped(engine: sa.Engine) -> None:
    """Another session inserts an address of the file after the import's look-up: the chunk
    skips it, as the row-by-row import's ON CONFLICT did."""
    if engine.dialect.name != "postgresql":
        pytest.skip("an SQLite import holds the write lock: nobody inserts meanwhile")
    text = "email,name\na@example.org,A\nb@example.org,B from the file\nc@example.org,C\n"
    with engine.connect() as other:
        held = other.begin()
        other.execute(
            subscriber_table.insert().values(
                uid=new_uid(),
                email="b@example.org",
                name="B",
                status="active",
                created_at=NOW,
                updated_at=NOW,
                consent_source="form",
            )
        )
        reports: list[ImportReport] = []
        importing = threading.Thread(
            target=lambda: reports.append(
                csvfile.import_csv(engine, io.StringIO(text), known_topics=TOPICS, now=NOW)
            )
        )
        importing.start()
        _wait_for_a_lock_wait(engine)  # the import's INSERT waits for the open transaction
        held.commit()
    importing.join(timeout=30)
    assert not importing.is_alive()
    [report] = reports
    assert (report.added, report.unchanged, report.errors) == (2, 1, [])
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(subscriber_table.c.email, subscriber_table.c.name).order_by(
                subscriber_table.c.email
            )
        ).all()
        logged = conn.scalars(
            sa.select(subscriber_table.c.email)
            .join(events, events.c.subscriber_id == subscriber_table.c.id)
            .order_by(events.c.id)
        ).all()
    assert [tuple(r) for r in rows] == [
        ("a@example.org", "A"),
        ("b@example.org", "B"),
        ("c@example.org", "C"),
    ]
    assert logged == ["a@example.org", "c@example.org"]


def _wait_for_a_lock_wait(engine: sa.Engine) -> None:
    deadline = time.monotonic() + 10
    with engine.connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.scalar(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
            conn.rollback()
            if waiting:
                return
            time.sleep(0.01)
    raise AssertionError("the import never waited for the other transaction")


def _reading_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "import-read-ahead"]


class _FailingFile(io.RawIOBase):
    """A file whose reading fails once its data has been read."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = self._data.readinto(buffer)
        if not count:
            raise OSError("the disk went away")
        return count


def test_a_reading_error_ends_the_import_after_the_chunks_before_it(engine: sa.Engine) -> None:
    data = ("email\n" + "".join(f"r{i}@example.org\n" for i in range(250))).encode()
    stream = io.TextIOWrapper(io.BufferedReader(_FailingFile(data)), encoding="utf-8", newline="")
    with pytest.raises(OSError, match="the disk went away"):
        csvfile.import_csv(engine, stream, known_topics=TOPICS, now=NOW, chunk_size=100)
    with engine.connect() as conn:
        count = conn.scalar(sa.select(sa.func.count()).select_from(subscriber_table))
    assert count == 200  # two whole chunks; the third was rolled back
    assert not _reading_threads()


def test_a_database_error_stops_the_reading_thread(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = 0
    real = importer.Staging.import_chunk

    def failing(self: importer.Staging, *args: Any, **kwargs: Any) -> importer.ChunkResult:
        nonlocal chunks
        chunks += 1
        if chunks == 2:
            raise sa.exc.OperationalError("INSERT", {}, Exception("connection lost"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(importer.Staging, "import_chunk", failing)
    text = "email\n" + "".join(f"r{i}@example.org\n" for i in range(50_000))
    with pytest.raises(sa.exc.OperationalError, match="connection lost"):
        csvfile.import_csv(
            engine, io.StringIO(text), known_topics=TOPICS, now=NOW, chunk_size=1_000
        )
    assert not _reading_threads()


def test_an_update_of_many_changed_rows_leaves_what_the_row_by_row_import_left(
    engine: sa.Engine,
) -> None:
    first = "email,name,topics\n" + "".join(
        f"p{i}@example.org,P {i},base-alerts\n" for i in range(7)
    )
    # Renamed, topics changed and both, in turn; the last row is left alone.
    second = (
        "email,name,topics\n"
        + "".join(
            f"p{i}@example.org,{f'Q {i}' if i % 3 != 1 else f'P {i}'},"
            f"{'base-alerts' if i % 3 == 0 else 'local-events;military-news'}\n"
            for i in range(6)
        )
        + "p6@example.org,P 6,base-alerts\n"
    )
    outcomes = []
    for run_import in (reference_import, csvfile.import_csv):
        seed(engine)
        csvfile.import_csv(engine, io.StringIO(first), known_topics=TOPICS, now=NOW)
        report = run_import(
            engine,
            io.StringIO(second),
            known_topics=TOPICS,
            now=NOW + timedelta(days=1),
            source="import:f.csv",
            update=True,
        )
        outcomes.append(((report.updated, report.unchanged), contents(engine)))
    assert outcomes[0] == outcomes[1]
    assert outcomes[1][0] == (6, 1)
    assert [e[0] for e in outcomes[1][1]["events"]].count("preferences") == 6


def test_an_empty_file_is_refused_as_having_no_header(engine: sa.Engine) -> None:
    with pytest.raises(SubscriberError, match=r"the file is empty: .*'email' column"):
        csvfile.import_csv(engine, io.StringIO(""), known_topics=TOPICS, now=NOW)
    header_only = csvfile.import_csv(engine, io.StringIO("email\n"), known_topics=TOPICS, now=NOW)
    assert header_only.rows == 0
