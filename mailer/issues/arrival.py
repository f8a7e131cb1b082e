"""Digests made on arrival (``trigger = "arrival"``): an issue as soon as articles come.

Whatever stores an article (``articles add`` in another process, a feed fetch, a push from
the site) writes a row to ``articles``; the watch reads that table, not any one path. Each
``mailer run`` polls it (``ArrivalWatch.step``, every ``POLL_SECONDS``) with the clause that
an issue selects by (``selection.untaken``): the oldest arrival (``created_at``) among the
articles of the digest's topics that none of its issues has taken yet.

The issue is due ``debounce_seconds`` after that first arrival, so that alerts arriving
together go in one mail; it takes every untaken article when it is made. Its nominal time
(``scheduled_for``) is that due time, computed the same by every process from the database
alone (the arrival truncated to the second, plus the debounce; after the digest's newest
issue), so that ``create_issue``'s INSERT … ON CONFLICT (digest, scheduled_for) lets one
process of several make it: the same rule as a slot.

An issue that fails to be made is logged at ERROR and tried again after a doubling wait (the
article stays untaken, so nothing is lost); the staff round alerts when an article has waited
``LATE`` past its due time (``mailer.staff.checks.check_arrivals``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa

from mailer.compose.rendering import SubjectRenderer
from mailer.config.settings import Digest, Settings
from mailer.content.selection import lookback_start, untaken
from mailer.db.engine import reading
from mailer.db.schema import articles, issues
from mailer.issues.create import IssueCreated, create_issue
from mailer.logs import describe_error
from mailer.text import one_line

log = logging.getLogger(__name__)

# How often the watch reads the store: an arrival is seen within this (plus the debounce).
POLL_SECONDS = 0.5
# An article untaken this long past its issue's due time, while a service runs, is alerted.
LATE = timedelta(minutes=5)
SECOND = timedelta(seconds=1)


@dataclass(frozen=True)
class Waiting:
    """Articles of an arrival digest that no issue has taken: the first one's arrival, and
    when (and for which ``scheduled_for``) the issue that takes them is due."""

    first: datetime
    due: datetime


def debounce(digest: Digest) -> timedelta:
    """How long the issue waits after the first untaken article arrives (an article stored
    with ``priority = "alert"`` does not wait: see ``waiting``)."""
    return timedelta(seconds=digest.debounce_seconds)


def due_time(
    first: datetime, digest: Digest, previous: datetime | None, *, wait: bool = True
) -> datetime:
    """The issue's ``scheduled_for``: ``first`` to the second plus the debounce (none
    without ``wait``), and after the digest's newest issue (an article stored in the same
    second as an issue was made must not fall on that issue's time and be taken by nobody)."""
    due = first.replace(microsecond=0) + (debounce(digest) if wait else timedelta(0))
    if previous is not None and due <= previous:
        due = previous.replace(microsecond=0) + SECOND
    return due


def waiting(conn: sa.Connection, digest: Digest, now: datetime) -> Waiting | None:
    """What the digest's next arrival issue would take at ``now``, or None (nothing new).

    Two indexed reads: the digest's newest issue (UNIQUE(digest, scheduled_for)) and the
    oldest untaken article of its topics in its lookback (topic, published_at).
    """
    since = lookback_start(conn, digest.key, digest.lookback, now)
    pending = untaken(digest.key, digest.topics, since=since, now=now)
    first, first_alert = conn.execute(
        sa.select(
            sa.func.min(articles.c.created_at),
            # An article the site pushed as an alert goes at once: the debounce only gathers
            # news arriving together, and an alert is not held back to wait for company.
            sa.func.min(articles.c.created_at).filter(articles.c.priority == "alert"),
        ).where(pending)
    ).one()
    if first is None:
        return None
    previous = conn.execute(
        sa.select(sa.func.max(issues.c.scheduled_for)).where(issues.c.digest == digest.key)
    ).scalar_one_or_none()
    due = due_time(first, digest, previous)
    if first_alert is not None:
        due = min(due, due_time(first_alert, digest, previous, wait=False))
    return Waiting(first, due)


@dataclass
class _Backoff:
    """A digest whose issue failed to be made: not tried before ``until``."""

    until: datetime
    delay: float
    attempts: int


@dataclass(frozen=True)
class Step:
    """What one ``ArrivalWatch.step`` did: the issues it made and when the next is due."""

    made: list[IssueCreated]
    next_due: datetime | None  # the earliest issue waiting for its debounce (or a retry)


class ArrivalWatch:
    """The service's watch over the arrival digests: ``step(now)`` makes what is due."""

    def __init__(
        self,
        engine: sa.Engine,
        settings: Settings,
        *,
        render_subject: SubjectRenderer,
        retry_seconds: float,
        retry_max_seconds: float,
        shown: Callable[[datetime], str],
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.render_subject = render_subject
        self.retry_seconds = retry_seconds
        self.retry_max_seconds = retry_max_seconds
        self.shown = shown  # a time as the log shows it (the site's zone)
        self.digests = tuple(d for d in settings.digests if d.on_arrival)
        self.failing: dict[str, _Backoff] = {}

    def step(self, now: datetime) -> Step:
        """Make each arrival digest's issue that is due at ``now``; a failure is logged at
        ERROR and retried after a doubling wait, never raised."""
        made: list[IssueCreated] = []
        later: list[datetime] = []
        for digest in self.digests:
            backoff = self.failing.get(digest.key)
            if backoff is not None and now < backoff.until:
                later.append(backoff.until)
                continue
            try:
                issue, due = self._one(digest, now)
            except Exception as exc:
                # The database, a template, a bug: the articles stay untaken, so a later
                # attempt takes them; the staff round alerts if they wait too long.
                later.append(self._failed(digest, now, exc))
                continue
            if issue is not None:
                made.append(issue)
            elif due is not None:
                later.append(due)
        return Step(made, min(later, default=None))

    def _one(self, digest: Digest, now: datetime) -> tuple[IssueCreated | None, datetime | None]:
        with reading(self.engine) as conn:
            found = waiting(conn, digest, now)
        if found is None:
            self.failing.pop(digest.key, None)
            return None, None
        if now < found.due:
            return None, found.due
        issue = create_issue(
            self.engine,
            self.settings,
            digest,
            scheduled_for=found.due,
            now=now,
            render_subject=self.render_subject,
        )
        backoff = self.failing.pop(digest.key, None)
        if backoff is not None:
            log.info(
                "arrival issue made on retry",
                extra={"digest": digest.key, "attempt": backoff.attempts + 1},
            )
        if not issue.created:
            return None, None  # another process made it
        log.info(
            "issue created on arrival",
            extra={
                "digest": digest.key,
                "issue": issue.issue_id,
                "first_arrival": self.shown(found.first),
                "lag_s": f"{(now - found.first).total_seconds():.3f}",
            },
        )
        return issue, None

    def _failed(self, digest: Digest, now: datetime, exc: Exception) -> datetime:
        previous = self.failing.get(digest.key)
        delay = (
            self.retry_seconds
            if previous is None
            else min(previous.delay * 2, self.retry_max_seconds)
        )
        attempts = 1 if previous is None else previous.attempts + 1
        until = now + timedelta(seconds=delay)
        self.failing[digest.key] = _Backoff(until, delay, attempts)
        log.error(
            "creating the arrival issue failed: %s (retried in %.0f s)",
            one_line(describe_error(exc)) or type(exc).__name__,
            delay,
            extra={"digest": digest.key, "attempt": attempts},
            exc_info=log.isEnabledFor(logging.INFO),
        )
        return until
