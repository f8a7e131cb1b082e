"""Staff acting on an issue made for review: approve, hold, skip, drop an article, and what
was done, by whom and when.

Each action is one transaction on the issue's locked row (``review.locking``), checked
against the issue's status there, and recorded as an audit event with who and when; an
approve whose slot has passed releases the issue at once (``review.release_now``). The
review window itself (making the issue, the review mail, the release at the slot) is
``mailer.issues.review``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from mailer.compose.rendering import Renderer, leads
from mailer.config.settings import Digest, Settings
from mailer.db import audit
from mailer.db.engine import reading, writing
from mailer.db.schema import WAITING_ISSUE_STATUSES, articles, events, issue_articles, issues
from mailer.errors import DigestError, IssueStateError, RenderError, UnknownIssueError
from mailer.issues.notes import clean_note
from mailer.issues.progress import kept_articles
from mailer.issues.review import (
    Outcome,
    kept_topics,
    locking,
    log_released,
    outcome_of,
    release_now,
    set_status,
)
from mailer.models import Article
from mailer.text import one_line

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dropped:
    """What ``drop_article`` did."""

    issue_id: int
    article_id: int
    title: str
    digest: str
    left: int  # articles the issue still holds


@dataclass(frozen=True)
class Action:
    """One thing done to an issue in review, from the audit trail."""

    kind: str  # approved, held, skipped, article_dropped, released
    by: str
    at: datetime
    article_id: int | None = None


def approve(
    engine: sa.Engine, settings: Settings, issue_id: int, *, by: str, now: datetime
) -> Outcome:
    """Approve an issue in review or held: it goes out at its slot, or at once if the slot
    has passed."""
    with writing(engine) as conn:
        row = _acting(conn, issue_id, ("review", "held"), "approved")
        digest = _configured(settings, row.digest)
        set_status(conn, issue_id, "approved")
        audit.record(conn, None, "issue.approved", now, issue=issue_id, by=by)
        if row.scheduled_for <= now:
            outcome = release_now(conn, settings, digest, row, now, unreviewed=False)
        else:
            outcome = outcome_of(conn, row, "approved", digest, now)
    if outcome.released:
        log_released(engine, outcome)
    log.info("issue approved", extra={"issue": issue_id, "by": by, "status": outcome.status})
    return outcome


def hold(
    engine: sa.Engine, settings: Settings, issue_id: int, *, by: str, now: datetime
) -> Outcome:
    """Hold an issue in review or approved: at its slot it waits for ``approve``."""
    with writing(engine) as conn:
        row = _acting(conn, issue_id, ("review", "approved"), "held")
        set_status(conn, issue_id, "held")
        audit.record(conn, None, "issue.held", now, issue=issue_id, by=by)
        outcome = outcome_of(conn, row, "held", settings.find_digest(row.digest), now)
    log.info("issue held", extra={"issue": issue_id, "by": by})
    return outcome


def skip(
    engine: sa.Engine, settings: Settings, issue_id: int, *, by: str, now: datetime
) -> Outcome:
    """Skip an issue in review, approved or held: it is never sent (final), and its articles
    go back to the digest for its next issue (``selection.GIVES_BACK``)."""
    with writing(engine) as conn:
        row = _acting(conn, issue_id, WAITING_ISSUE_STATUSES, "skipped")
        conn.execute(
            issues.update()
            .where(issues.c.id == issue_id)
            .values(status="skipped", completed_at=now)
        )
        audit.record(conn, None, "issue.skipped", now, issue=issue_id, by=by)
        outcome = outcome_of(conn, row, "skipped", None, now)
    log.info("issue skipped", extra={"issue": issue_id, "by": by})
    return outcome


def drop_article(
    engine: sa.Engine,
    issue_id: int,
    article_id: int,
    *,
    by: str,
    now: datetime,
    settings: Settings | None = None,
    renderer: Renderer | None = None,
) -> Dropped:
    """Take an article out of an issue in review, approved or held; no later issue of the
    digest takes it either (``selection.taken_by``).

    With ``settings`` (the command line passes them) the issue's subject is made again from
    the articles it keeps: a subject naming its lead must not name one taken out."""
    with writing(engine) as conn:
        row = _acting(conn, issue_id, WAITING_ISSUE_STATUSES, "article_dropped")
        found = conn.execute(
            sa.select(articles.c.title, issue_articles.c.dropped_at, issue_articles.c.dropped_by)
            .join(articles, articles.c.id == issue_articles.c.article_id)
            .where(issue_articles.c.issue_id == issue_id, issue_articles.c.article_id == article_id)
        ).first()
        if found is None:
            raise DigestError(
                f"article {article_id} is not in issue {issue_id}"
                f" (`mailer issues show {issue_id}` lists its articles)"
            )
        if found.dropped_at is not None:
            raise IssueStateError(
                f"article {article_id} was dropped from issue {issue_id} already,"
                f" by {found.dropped_by}"
            )
        conn.execute(
            issue_articles.update()
            .where(issue_articles.c.issue_id == issue_id, issue_articles.c.article_id == article_id)
            .values(dropped_at=now, dropped_by=by[:200])
        )
        audit.record(
            conn, None, "issue.article_dropped", now, issue=issue_id, article=article_id, by=by
        )
        left = len(kept_topics(conn, issue_id)[1])
        if settings is not None:
            _resubject(conn, settings, renderer or Renderer(), row)
    log.info("article dropped", extra={"issue": issue_id, "article": article_id, "by": by})
    return Dropped(issue_id, article_id, found.title, row.digest, left)


def set_note(
    engine: sa.Engine, issue_id: int, text: str | None, *, by: str, now: datetime
) -> str | None:
    """Store ``text`` as the editor's note of an issue in review, approved or held (None
    removes it); returns the note as stored (``notes.clean_note``). Once an issue sends, some
    readers have it already: a note then would reach only the rest, so it is refused."""
    note = None if text is None else clean_note(text)
    with writing(engine) as conn:
        _acting(conn, issue_id, WAITING_ISSUE_STATUSES, "note_set")
        who = one_line(by, limit=200) if note is not None else None  # issues.note_by: 200
        conn.execute(issues.update().where(issues.c.id == issue_id).values(note=note, note_by=who))
        kind = "issue.note_set" if note is not None else "issue.note_cleared"
        audit.record(conn, None, kind, now, issue=issue_id, by=by)
    log.info("note set" if note else "note cleared", extra={"issue": issue_id, "by": by})
    return note


def _resubject(conn: sa.Connection, settings: Settings, renderer: Renderer, row: Any) -> None:
    """Render the subject of issue ``row`` again from the articles it keeps (kept as it was
    if its digest left the config or its subject no longer renders: logged)."""
    digest = settings.find_digest(row.digest)
    if digest is None:
        return
    kept = kept_articles(conn, row.id)
    date = row.scheduled_for.astimezone(ZoneInfo(digest.timezone))
    try:
        subject = renderer.render_subject(digest, date, leads(settings, kept))
    except RenderError as exc:
        log.warning("subject not made again", extra={"issue": row.id, "error": str(exc)})
        return
    conn.execute(issues.update().where(issues.c.id == row.id).values(subject=subject))


# ---------------------------------------------------------------- reading the state


@dataclass(frozen=True)
class ReviewState:
    """An issue made for review as ``issues show`` tells it."""

    outcome: Outcome
    actions: tuple[Action, ...]  # oldest first
    dropped: tuple[tuple[int, str, str], ...]  # (article id, title, by)
    kept: tuple[Article, ...] = ()  # what it holds, in its order


def review_state(
    engine: sa.Engine, settings: Settings, issue_id: int, *, now: datetime
) -> ReviewState:
    """The issue's slot, when it goes out, who it would go to now, and what staff did."""
    with reading(engine) as conn:
        row = conn.execute(sa.select(issues).where(issues.c.id == issue_id)).first()
        if row is None:
            raise UnknownIssueError(issue_id)
        digest = settings.find_digest(row.digest)
        outcome = outcome_of(conn, row, row.status, digest, now)
        dropped = conn.execute(
            sa.select(articles.c.id, articles.c.title, issue_articles.c.dropped_by)
            .join(articles, articles.c.id == issue_articles.c.article_id)
            .where(issue_articles.c.issue_id == issue_id, issue_articles.c.dropped_at.is_not(None))
            .order_by(issue_articles.c.position)
        ).all()
        acts = actions(conn, [issue_id]).get(issue_id, ())
        kept = kept_articles(conn, issue_id)
    gone = tuple((d.id, d.title, d.dropped_by or "") for d in dropped)
    return ReviewState(outcome, acts, gone, kept)


ACTION_KINDS = ("issue.approved", "issue.held", "issue.skipped", "issue.article_dropped",
                "issue.released")  # fmt: skip


def actions(conn: sa.Connection, issue_ids: list[int]) -> dict[int, tuple[Action, ...]]:
    """The review actions recorded for each of ``issue_ids``, oldest first."""
    if not issue_ids:
        return {}
    issue = events.c.detail["issue"].as_integer()
    rows = conn.execute(
        sa.select(events.c.kind, events.c.at, events.c.detail)
        .where(
            events.c.subscriber_id.is_(None),
            events.c.kind.in_(ACTION_KINDS),
            issue.in_(issue_ids),
        )
        .order_by(events.c.at, events.c.id)
    ).all()
    found: dict[int, list[Action]] = {}
    for kind, at, detail in rows:
        found.setdefault(int(detail["issue"]), []).append(
            Action(
                kind.removeprefix("issue."), str(detail.get("by", "")), at, detail.get("article")
            )
        )
    return {i: tuple(a) for i, a in found.items()}


# What staff (or the schedule) decided about an issue in review: its status after it.
DECISIONS = ("approved", "held", "skipped")


def last_decision(acts: tuple[Action, ...]) -> Action | None:
    """The last approve, hold or skip among ``acts`` (oldest first): where staff (or the
    schedule) left the issue."""
    decisions = [a for a in acts if a.kind in DECISIONS]
    return decisions[-1] if decisions else None


ACTION_NAMES = {
    "approved": "approved",
    "held": "held",
    "skipped": "skipped",
    "article_dropped": "have an article dropped",
    "note_set": "given a note (once it sends, some readers have it already)",
}


def _acting(
    conn: sa.Connection, issue_id: int, allowed: tuple[str, ...], action: str
) -> sa.Row[Any]:
    """The issue's locked row if its status is one of ``allowed``; else a one-line error."""
    row = conn.execute(locking(conn, issue_id)).first()
    if row is None:
        raise UnknownIssueError(issue_id)
    if row.status not in allowed:
        states = _either(allowed)
        raise IssueStateError(
            f"issue {issue_id} is {row.status}: only an issue {states} can be"
            f" {ACTION_NAMES[action]}"
        )
    return row


def _either(states: tuple[str, ...]) -> str:
    named = [f"in {s}" if s == "review" else s for s in states]
    return named[0] if len(named) == 1 else ", ".join(named[:-1]) + " or " + named[-1]


def _configured(settings: Settings, key: str) -> Digest:
    """The issue's digest, which must still be configured for the issue to go out."""
    found = settings.find_digest(key)
    if found is None:
        raise DigestError(f"the issue's digest {key} is no longer in the config: it cannot go out")
    return found
