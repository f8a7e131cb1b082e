"""The subscriber store: the one record of a subscriber, and the statements over its tables.

This package owns the ``subscribers``, ``subscriber_topics`` and ``suppressions`` tables; the
web app, the CLI, the importer and bounce handling change them through it. Here: the record and
its loader, add, status, topics, suppression, listing and counts. Sign-up and a link holder's
changes are in ``lifecycle``, a person's data (export, erase) in ``personal``, CSV files in
``csvfile`` (over the COPY fast path in ``importer``).

Bulk paths use Core statements in chunks: one ORM object per row is fifty times slower here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from mailer.db import audit
from mailer.db.engine import reading, upsert_insert
from mailer.db.schema import (
    SUBSCRIBER_STATUSES,
    subscriber_digests,
    subscriber_topics,
    subscribers,
    suppressions,
)
from mailer.errors import SubscriberError, SuppressedError
from mailer.subscribers import editions
from mailer.subscribers.addresses import address_hash, normalize_address
from mailer.subscribers.editions import Choice
from mailer.subscribers.importer import Present
from mailer.subscribers.tokens import new_uid

MAX_NAME_LENGTH = 200
# A chunk can hold more present rows than SQLite takes bound values in one IN list.
_REFRESH_BATCH = 5_000


@dataclass(frozen=True)
class Subscriber:
    """A subscriber as stored: for the CLI, the web pages and bounce handling alike."""

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
    # The digests chosen, each with its pause (``editions``), in key order.
    digests: tuple[Choice, ...] = ()

    @property
    def digest_keys(self) -> tuple[str, ...]:
        return tuple(c.key for c in self.digests)

    def choice(self, key: str) -> Choice | None:
        """The subscriber's choice of digest ``key``, or None if they do not receive it."""
        return next((c for c in self.digests if c.key == key), None)


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


# --- the record and its loader --------------------------------------------------------------


def topics_of(conn: sa.Connection, ids: Sequence[int]) -> dict[int, tuple[str, ...]]:
    """The topics of each subscriber id, each in key order."""
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


def _to_subscriber(row: Any, topics: tuple[str, ...], digests: tuple[Choice, ...]) -> Subscriber:
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
        digests=digests,
    )


def _load(
    conn: sa.Connection, where: sa.ColumnElement[bool], *, lock: bool = False
) -> Subscriber | None:
    query = sa.select(subscribers).where(where)
    if lock:
        # Serializes concurrent changes of one subscriber on PostgreSQL (a sign-up's daily
        # cap is a count-then-insert, a bounce's duplicate check a read-then-write); SQLite's
        # BEGIN IMMEDIATE already serializes every writer.
        query = query.with_for_update()
    row = conn.execute(query).first()
    if row is None:
        return None
    return _to_subscriber(
        row, topics_of(conn, [row.id])[row.id], editions.choices_of(conn, [row.id])[row.id]
    )


def load_by_uid(conn: sa.Connection, uid: str, *, lock: bool = False) -> Subscriber | None:
    """The subscriber a link token names, or None (purged or erased)."""
    return _load(conn, subscribers.c.uid == uid, lock=lock)


def load_by_id(conn: sa.Connection, sid: int, *, lock: bool = False) -> Subscriber | None:
    """The subscriber with this id, or None."""
    return _load(conn, subscribers.c.id == sid, lock=lock)


def load_by_email(conn: sa.Connection, address: str, *, lock: bool = False) -> Subscriber | None:
    """The subscriber with this normalized address, or None."""
    return _load(conn, subscribers.c.email == address, lock=lock)


def find(engine: sa.Engine, uid: str) -> Subscriber | None:
    """The subscriber a link token names, or None if there is none (purged or erased)."""
    with engine.connect() as conn:
        return load_by_uid(conn, uid)


def get(engine: sa.Engine, email: str) -> Subscriber:
    """The subscriber with this address; SubscriberError if there is none."""
    address = normalize_address(email)
    with engine.connect() as conn:
        found = load_by_email(conn, address)
    if found is None:
        raise SubscriberError(f"no subscriber {address}", email=address)
    return found


# --- lookups by what a bounce names ---------------------------------------------------------


def id_by_uid(conn: sa.Connection, uid: str) -> int | None:
    """The id of the subscriber with this uid (a VERP tag, an unsubscribe token), or None.

    Some MTAs lower-case the address they deliver a bounce to; uids are base64url, so an
    all-lower-case uid with no exact match is looked up again without case, and counts only if
    it names one subscriber (≈ 115 bits are left: a clash is not a real risk).
    """
    sid: int | None = conn.scalar(sa.select(subscribers.c.id).where(subscribers.c.uid == uid))
    if sid is None and uid == uid.lower():
        rows = conn.scalars(
            sa.select(subscribers.c.id).where(sa.func.lower(subscribers.c.uid) == uid).limit(2)
        ).all()
        sid = rows[0] if len(rows) == 1 else None
    return sid


def id_by_email(conn: sa.Connection, address: str) -> int | None:
    """The id of the subscriber with this normalized address, or None."""
    sid: int | None = conn.scalar(sa.select(subscribers.c.id).where(subscribers.c.email == address))
    return sid


def id_by_confirmation(conn: sa.Connection, message_id: str) -> int | None:
    """The id of the subscriber whose confirmation mail had this Message-ID, or None."""
    sid: int | None = conn.scalar(
        sa.select(subscribers.c.id)
        .where(subscribers.c.confirmation_message_id == message_id)
        .limit(1)
    )
    return sid


# --- add, status, topics, suppression -------------------------------------------------------


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


def add(
    engine: sa.Engine,
    email: str,
    *,
    known_topics: Sequence[str],
    now: datetime,
    name: str = "",
    topics: Iterable[str] = (),
    digests: Iterable[str] = (),
    status: str = "active",
    source: str = "cli",
    ip: str | None = None,
    user_agent: str | None = None,
    policy_version: str | None = None,
) -> Subscriber:
    """Add one subscriber receiving ``digests`` (keys the caller has checked against the
    config: ``editions.parse_digests``). Raises AddressError, SuppressedError, or
    SubscriberError if present."""
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
        if id_by_email(conn, address) is not None:
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
        editions.replace(conn, sid, digests, now=now)
        audit.record(
            conn,
            sid,
            "subscribed",
            now,
            source=source,
            status=status,
            topics=list(chosen),
            digests=list(digests),
        )
    return get(engine, address)


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
        audit.record(conn, sid, status, now, source=source, **detail)
    return bool(changed)


def count_bounce(conn: sa.Connection, sid: int, *, now: datetime) -> None:
    """Add one to a subscriber's bounce count (a hard or soft bounce was applied)."""
    conn.execute(
        subscribers.update()
        .where(subscribers.c.id == sid)
        .values(bounce_count=subscribers.c.bounce_count + 1, updated_at=now)
    )


def replace_topics(conn: sa.Connection, sid: int, topics: Iterable[str]) -> None:
    """Make ``topics`` the subscriber's topics, inside the caller's transaction.

    Nothing is recorded: the caller records the change it made (a form, an import).
    """
    conn.execute(subscriber_topics.delete().where(subscriber_topics.c.subscriber_id == sid))
    rows = [{"subscriber_id": sid, "topic": t} for t in topics]
    if rows:
        conn.execute(subscriber_topics.insert(), rows)


def touch(conn: sa.Connection, sid: int, *, now: datetime, **values: Any) -> None:
    """Set ``updated_at`` (and the given columns) of one subscriber."""
    conn.execute(
        subscribers.update().where(subscribers.c.id == sid).values(updated_at=now, **values)
    )


def refresh(
    conn: sa.Connection, present: Sequence[Present], *, now: datetime, source: str
) -> tuple[int, int]:
    """Give present subscribers the name, topics and (when the file has them) digests of their
    import row; a digest kept keeps its pause.

    Returns (updated, unchanged); each update records a ``preferences`` event.
    """
    updated = unchanged = 0
    for start in range(0, len(present), _REFRESH_BATCH):
        batch = present[start : start + _REFRESH_BATCH]
        current = topics_of(conn, [p.subscriber_id for p in batch])
        chosen = editions.choices_of(conn, [p.subscriber_id for p in batch])
        query = sa.select(subscribers.c.id, subscribers.c.name).where(subscribers.c.id.in_(current))
        names = {sid: name for sid, name in conn.execute(query)}
        changed = [
            p
            for p in batch
            if (names[p.subscriber_id], current[p.subscriber_id]) != (p.name, p.topics)
            or (
                p.digests is not None and set(p.digests) != {c.key for c in chosen[p.subscriber_id]}
            )
        ]
        unchanged += len(batch) - len(changed)
        if changed:
            _refresh_changed(conn, changed, now=now, source=source)
            updated += len(changed)
    return updated, unchanged


def _refresh_changed(
    conn: sa.Connection, changed: Sequence[Present], *, now: datetime, source: str
) -> None:
    # A handful of statements for the whole batch, not four per subscriber: an import with
    # --update can change every row of a 50,000-row chunk.
    conn.execute(
        subscribers.update()
        .where(subscribers.c.id == sa.bindparam("b_id"))
        .values(name=sa.bindparam("b_name"), updated_at=sa.bindparam("b_at")),
        [{"b_id": p.subscriber_id, "b_name": p.name, "b_at": now} for p in changed],
    )
    ids = [p.subscriber_id for p in changed]
    conn.execute(subscriber_topics.delete().where(subscriber_topics.c.subscriber_id.in_(ids)))
    rows = [{"subscriber_id": p.subscriber_id, "topic": t} for p in changed for t in p.topics]
    if rows:
        conn.execute(subscriber_topics.insert(), rows)
    for p in changed:
        if p.digests is not None:
            editions.replace(conn, p.subscriber_id, p.digests, now=now)
    audit.record_each(
        conn,
        "preferences",
        now,
        [
            (
                p.subscriber_id,
                {"source": source, "topics": list(p.topics)}
                | ({} if p.digests is None else {"digests": list(p.digests)}),
            )
            for p in changed
        ],
    )


# --- listing --------------------------------------------------------------------------------


def _selecting(
    query: sa.Select[Any], status: str | None, topic: str | None, digest: str | None = None
) -> sa.Select[Any]:
    """``query`` narrowed to one status, one topic and one digest, when given."""
    if digest is not None:
        query = query.where(
            subscribers.c.id.in_(
                sa.select(subscriber_digests.c.subscriber_id).where(
                    subscriber_digests.c.digest == digest
                )
            )
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
    return query


def iter_subscribers(
    engine: sa.Engine,
    *,
    status: str | None = None,
    topic: str | None = None,
    digest: str | None = None,
    batch: int = 5_000,
) -> Iterator[Subscriber]:
    """Every subscriber in address order, streamed in batches (keyset pagination)."""
    after = ""
    while True:
        query = _selecting(
            sa.select(subscribers)
            .where(subscribers.c.email > after)
            .order_by(subscribers.c.email)
            .limit(batch),
            status,
            topic,
            digest,
        )
        with engine.connect() as conn:
            rows = conn.execute(query).all()
            topics = topics_of(conn, [r.id for r in rows])
            chosen = editions.choices_of(conn, [r.id for r in rows])
        if not rows:
            return
        for row in rows:
            yield _to_subscriber(row, topics[row.id], chosen[row.id])
        after = rows[-1].email


def counts_by_status(
    engine: sa.Engine,
    *,
    status: str | None = None,
    topic: str | None = None,
    digest: str | None = None,
) -> dict[str, int]:
    """How many subscribers hold each status (statuses nobody holds are absent), of those
    ``status`` and ``topic`` select, as ``iter_subscribers`` does."""
    with engine.connect() as conn:
        rows = conn.execute(
            _selecting(
                sa.select(subscribers.c.status, sa.func.count()).group_by(subscribers.c.status),
                status,
                topic,
                digest,
            )
        )
        return {status: n for status, n in rows}


# --- search (the staff console) -------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    """One page of a search: the subscribers on it and how many match in all."""

    subscribers: tuple[Subscriber, ...]
    total: int


def _like(text: str) -> str:
    """``text`` as a LIKE pattern that matches it anywhere, its wildcards taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def search(
    engine: sa.Engine,
    text: str = "",
    *,
    status: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> Found:
    """Subscribers whose address or name contains ``text`` (any case), of one ``status`` if
    given, in address order: the page of ``limit`` from ``offset``, and the total."""
    if status is not None and status not in SUBSCRIBER_STATUSES:
        raise SubscriberError(
            f"unknown status {status!r} (known: {', '.join(SUBSCRIBER_STATUSES)})"
        )
    if limit < 1 or offset < 0:
        raise ValueError(f"limit must be 1 or more and offset 0 or more, got {limit}, {offset}")
    where: list[sa.ColumnElement[bool]] = []
    wanted = text.strip().lower()
    if wanted:
        pattern = _like(wanted)
        where.append(
            sa.or_(
                sa.func.lower(subscribers.c.email).like(pattern, escape="\\"),
                sa.func.lower(subscribers.c.name).like(pattern, escape="\\"),
            )
        )
    if status is not None:
        where.append(subscribers.c.status == status)
    with reading(engine) as conn:
        total = conn.execute(
            sa.select(sa.func.count()).select_from(subscribers).where(*where)
        ).scalar_one()
        rows = conn.execute(
            sa.select(subscribers)
            .where(*where)
            .order_by(subscribers.c.email)
            .limit(limit)
            .offset(offset)
        ).all()
        ids = [r.id for r in rows]
        topics = topics_of(conn, ids)
        chosen = editions.choices_of(conn, ids)
    return Found(tuple(_to_subscriber(r, topics[r.id], chosen[r.id]) for r in rows), total)


def get_by_id(engine: sa.Engine, sid: int) -> Subscriber:
    """The subscriber with this id; SubscriberError if there is none (erased, purged)."""
    with reading(engine) as conn:
        found = load_by_id(conn, sid)
    if found is None:
        raise SubscriberError(f"no subscriber with id {sid} (erased, or never there)")
    return found
