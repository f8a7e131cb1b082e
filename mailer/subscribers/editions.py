"""Which digests (editions) a subscriber receives, and the pause of each.

An issue goes only to subscribers with a ``subscriber_digests`` row for its digest that is not
paused at the time (``mailer.issues.create.recipients_where``). The config says which digests
readers are offered (``public``) and which are ticked for a new sign-up (``default``); the
rows say what each reader chose. Welcome mails, the preference centre and ``subscribers
show`` all ask ``chosen_digests`` for "the digests this subscriber receives".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy as sa

from mailer.config.settings import Digest, Settings
from mailer.db.schema import subscriber_digests

# A pause "until I resume it": later than any issue will be made.
UNTIL_RESUMED = datetime(9999, 12, 31, tzinfo=UTC)


@dataclass(frozen=True)
class Choice:
    """One digest a subscriber chose, as stored: its key and its pause."""

    key: str
    paused_until: datetime | None = None

    def paused(self, now: datetime) -> bool:
        """Whether this digest is paused at ``now``."""
        return self.paused_until is not None and self.paused_until > now

    @property
    def until_resumed(self) -> bool:
        """Paused with no end: until the reader resumes it."""
        return self.paused_until is not None and self.paused_until >= UNTIL_RESUMED


@dataclass(frozen=True)
class ChosenDigest(Choice):
    """A digest from the config that a subscriber receives, with that subscriber's pause."""

    digest: Digest = field(kw_only=True)


def public(digests: Sequence[Digest]) -> tuple[Digest, ...]:
    """The digests readers are offered, in config order."""
    return tuple(d for d in digests if d.public)


def defaults(digests: Sequence[Digest]) -> tuple[str, ...]:
    """The keys ticked for a new sign-up and given when a row or a command names none."""
    return tuple(d.key for d in digests if d.default)


def parse_digests(raw: str | Iterable[str], digests: Sequence[Digest]) -> tuple[str, ...]:
    """Digest keys from ``a;b`` or a list, in config order; none named gives the defaults.

    An unknown key raises ValueError naming it (and the known ones).
    """
    items = raw.split(";") if isinstance(raw, str) else list(raw)
    chosen = [k.strip() for k in items if k.strip()]
    known = [d.key for d in digests]
    unknown = [k for k in chosen if k not in known]
    if unknown:
        raise ValueError(f"unknown digest {unknown[0]!r} (known: {', '.join(known) or 'none'})")
    if not chosen:
        return defaults(digests)
    return tuple(k for k in known if k in chosen)


def choices_of(conn: sa.Connection, ids: Sequence[int]) -> dict[int, tuple[Choice, ...]]:
    """The digests each subscriber id chose, each in key order."""
    result: dict[int, list[Choice]] = {i: [] for i in ids}
    if ids:
        rows = conn.execute(
            sa.select(
                subscriber_digests.c.subscriber_id,
                subscriber_digests.c.digest,
                subscriber_digests.c.paused_until,
            )
            .where(subscriber_digests.c.subscriber_id.in_(ids))
            .order_by(subscriber_digests.c.digest)
        )
        for sid, key, until in rows:
            result[sid].append(Choice(key, until))
    return {k: tuple(v) for k, v in result.items()}


def chosen_digests(
    conn: sa.Connection, settings: Settings, subscriber_id: int
) -> list[ChosenDigest]:
    """The digests this subscriber receives, in config order, each with its pause.

    A chosen key the config no longer has is left out: no issue of it is made.
    """
    mine = {c.key: c for c in choices_of(conn, [subscriber_id])[subscriber_id]}
    return [
        ChosenDigest(d.key, mine[d.key].paused_until, digest=d)
        for d in settings.digests
        if d.key in mine
    ]


def replace(conn: sa.Connection, sid: int, keys: Iterable[str], *, now: datetime) -> bool:
    """Make ``keys`` the subscriber's digests, in the caller's transaction; True if changed.

    A digest kept keeps its pause and when it was chosen; nothing is recorded here (the
    caller records the change it made).
    """
    wanted = set(keys)
    have = {
        key
        for (key,) in conn.execute(
            sa.select(subscriber_digests.c.digest).where(subscriber_digests.c.subscriber_id == sid)
        )
    }
    gone, new = have - wanted, wanted - have
    if gone:
        conn.execute(
            subscriber_digests.delete().where(
                subscriber_digests.c.subscriber_id == sid,
                subscriber_digests.c.digest.in_(sorted(gone)),
            )
        )
    if new:
        conn.execute(
            subscriber_digests.insert(),
            [{"subscriber_id": sid, "digest": k, "chosen_at": now} for k in sorted(new)],
        )
    return bool(gone or new)


def pause(conn: sa.Connection, sid: int, keys: Iterable[str], until: datetime | None) -> list[str]:
    """Pause these of the subscriber's digests until ``until`` (None resumes them).

    Returns the keys changed (a key the subscriber did not choose is not theirs to pause).
    """
    wanted = sorted(set(keys))
    if not wanted:
        return []
    mine = (
        conn.execute(
            sa.select(subscriber_digests.c.digest).where(
                subscriber_digests.c.subscriber_id == sid,
                subscriber_digests.c.digest.in_(wanted),
            )
        )
        .scalars()
        .all()
    )
    if mine:
        conn.execute(
            subscriber_digests.update()
            .where(
                subscriber_digests.c.subscriber_id == sid,
                subscriber_digests.c.digest.in_(mine),
            )
            .values(paused_until=until)
        )
    return sorted(mine)
