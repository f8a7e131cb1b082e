"""Whose copy of the next issue staff look at: a reader they name, or the reader of the
variant most readers get.

Readers whose topics with articles in the issue are the same get the same digest (one
variant, ``compose.messages.shown_topics``). By default staff see the most common variant
among the issue's would-be recipients (``create.recipients_where``, the snapshot's own
clause), as its first reader (lowest id) gets it: the same reader every time, while nothing
changes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from mailer.compose.messages import shown_topics
from mailer.config.settings import Digest, Settings
from mailer.errors import SubscriberError
from mailer.issues.create import chosen_topics
from mailer.issues.schedule import local_time
from mailer.models import IssueContent
from mailer.subscribers import store
from mailer.subscribers.addresses import normalize_address


@dataclass(frozen=True)
class Reader:
    """The reader whose copy is shown: who, their topics, and the variant's topics (those of
    theirs with articles in the issue, in configured order)."""

    id: int
    uid: str
    email: str
    topics: tuple[str, ...]
    shown: tuple[str, ...]
    # How many would-be recipients get this variant (None when staff named the reader).
    readers: int | None = None


def topic_names(settings: Settings, keys: tuple[str, ...]) -> str:
    """``Base alerts, Local events``: the topics as readers see them named."""
    names = {t.key: t.name for t in settings.topics}
    return ", ".join(names.get(k, k) for k in keys)


def named_reader(
    conn: sa.Connection,
    settings: Settings,
    digest: Digest,
    content: IssueContent,
    email: str,
    *,
    now: datetime,
) -> Reader:
    """The subscriber ``email`` as a reader of ``content``; SubscriberError saying why the
    issue would not go to them (unknown, not active, paused, none of its topics)."""
    address = normalize_address(email)
    found = store.load_by_email(conn, address)
    if found is None:
        raise SubscriberError(f"no subscriber {address}", email=address)
    if found.status != "active":
        raise SubscriberError(
            f"{address} is {found.status}, not active: the issue would not go to them",
            email=address,
        )
    choice = found.choice(digest.key)
    if choice is None:
        raise SubscriberError(
            f"{address} does not receive {digest.key} ({digest.name}): the issue would not go"
            " to them",
            email=address,
        )
    if choice.paused_until is not None and choice.paused(now):
        until = local_time(choice.paused_until, settings.site.timezone)
        raise SubscriberError(
            f"{address} has paused {digest.key} until {until}: the issue would not go to them",
            email=address,
        )
    shown = shown_topics(settings, content, set(found.topics) & set(digest.topics))
    if not shown:
        present = shown_topics(settings, content, digest.topics)
        what = (
            f"any of the topics with articles in it ({topic_names(settings, present)})"
            if present
            else "anything: it has no articles yet"
        )
        raise SubscriberError(
            f"{address} chose none of the topics of the next issue of {digest.key}: "
            f"it would not get {what}",
            email=address,
        )
    return Reader(found.id, found.uid, found.email, found.topics, shown)


def sample_reader(
    conn: sa.Connection,
    settings: Settings,
    digest: Digest,
    content: IssueContent,
    *,
    now: datetime,
) -> Reader:
    """The first reader of the variant most would-be recipients get; SubscriberError if the
    issue would go to nobody."""
    present = {a.topic for a in content.articles} & set(digest.topics)
    nobody = f"no active subscriber would receive the next issue of {digest.key} ({digest.name})"
    if not present:
        raise SubscriberError(f"{nobody}: it has no articles yet")
    sets = chosen_topics(conn, digest.key, present, now, within=present)
    if not sets:
        names = topic_names(settings, shown_topics(settings, content, present))
        raise SubscriberError(
            f"{nobody}: none who receive (and do not pause) it chose one of its topics ({names})"
        )
    variants: dict[tuple[str, ...], list[int]] = {}
    for sid, topics in sets.items():
        variants.setdefault(shown_topics(settings, content, topics), []).append(sid)
    counts = Counter({shown: len(ids) for shown, ids in variants.items()})
    order = {key: i for i, key in enumerate(settings.topic_keys)}
    # Most readers first; a tie goes to the variant of the earlier-configured topics.
    shown, readers = min(
        counts.items(),
        key=lambda item: (-item[1], [order.get(k, len(order)) for k in item[0]]),
    )
    found = store.load_by_id(conn, min(variants[shown]))
    if found is None:  # erased between the two reads
        raise SubscriberError(f"{nobody}: its readers changed while they were read; try again")
    return Reader(found.id, found.uid, found.email, found.topics, shown, readers)
