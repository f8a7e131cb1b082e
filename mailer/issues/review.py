"""The review window: an issue made before its slot waits for staff, then goes out or waits.

A digest with ``review_minutes`` has each issue made that long before its slot, in status
``review`` (``create.create_issue``): the articles are fixed, nobody is snapshotted yet. Staff
get the review mail (``review_mail``) and may approve, hold or skip it or drop an article
from it (``review_actions``, each an audit event with who and when). At the slot
``release_due`` sends an approved issue (the recipients are snapshotted then, so whoever left
or joined during the window is honoured) and gives an unreviewed one ``on_unreviewed``: sent
as if approved, or ``held`` with an alert to staff. A held issue waits for an approve.

``open_due_reviews`` and ``release_due`` take only a ``now``: a periodic round calls them, and
``Service.fire`` releases a slot's issue the moment its cron fires. Every decision is one
transaction on the issue's row, so two processes (or a process and a staff command) never
both release, or release what was just held.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from mailer.compose.rendering import Renderer, SubjectRenderer
from mailer.config.settings import Digest, Settings
from mailer.db import audit
from mailer.db.engine import reading, refresh_statistics, writing
from mailer.db.schema import (
    WAITING_ISSUE_STATUSES,
    articles,
    deliveries,
    issue_articles,
    issues,
    staff_mail,
)
from mailer.issues import schedule
from mailer.issues.create import (
    count_recipients,
    create_issue,
    goes_out,
    snapshot,
    snapshotted,
)
from mailer.issues.review_mail import compose_review_mail
from mailer.staff.alerts import raise_alert
from mailer.staff.outbox import enqueue

log = logging.getLogger(__name__)

# Who an automatic decision is recorded as being by.
BY_SCHEDULE = "schedule"
# Why an issue made after its slot (the review window missed) is held.
MISSED_WINDOW = (
    'its review window passed while no process ran, and its digest has on_unreviewed = "hold"'
)


@dataclass(frozen=True)
class Outcome:
    """Where an issue stands after an action or a release."""

    issue_id: int
    digest: str
    status: str
    scheduled_for: datetime
    # When its deliveries are (or will be) first due: the slot, or the end of quiet hours.
    goes_out: datetime | None
    # Snapshotted when released; else how many it would go to now.
    recipients: int
    articles: int  # articles it holds (dropped ones not counted)
    released: bool = False  # this call snapshotted its recipients


# ---------------------------------------------------------------- the periodic steps


def open_due_reviews(
    engine: sa.Engine,
    settings: Settings,
    *,
    now: datetime,
    render_subject: SubjectRenderer,
    renderer: Renderer,
) -> list[int]:
    """Make the issue of every digest whose review window is open, and queue its review mail.

    For each digest with ``review_minutes``, its next slot: when ``slot - review <= now <
    slot`` and no issue exists for it, it is made (in review; idempotent across processes).
    Then every issue in review without its review mail gets it (``queue_review_mails``), so a
    crash between making an issue and queueing its mail loses no mail. Returns the ids of the
    issues this call made.
    """
    made: list[int] = []
    for digest in settings.digests:
        if digest.review_minutes <= 0:
            continue
        found = schedule.upcoming([digest], now)
        if not found:
            continue
        slot = found[0][1]
        if not slot - digest.review <= now < slot or _exists(engine, digest.key, slot):
            continue
        created = create_issue(
            engine, settings, digest, scheduled_for=slot, now=now, render_subject=render_subject
        )
        if created.created:
            made.append(created.issue_id)
            log.info(
                "issue made for review",
                extra={
                    "digest": digest.key,
                    "issue": created.issue_id,
                    "slot": schedule.local_time(slot, settings.site.timezone),
                    "status": created.status,
                },
            )
    queue_review_mails(engine, settings, now=now, renderer=renderer)
    return made


def queue_review_mails(
    engine: sa.Engine, settings: Settings, *, now: datetime, renderer: Renderer
) -> list[int]:
    """Queue the review mail of every issue in review before its slot that has none yet
    (cause ``review:<id>``); returns the issue ids. Nothing without ``[staff].emails``."""
    if not settings.staff.emails:
        return []
    with reading(engine) as conn:
        waiting = conn.scalars(
            sa.select(issues.c.id)
            .where(issues.c.status == "review", issues.c.scheduled_for > now, ~_has_mail())
            .order_by(issues.c.scheduled_for, issues.c.id)
        ).all()
    queued: list[int] = []
    digests = {d.key: d for d in settings.digests}
    for issue_id in waiting:
        with reading(engine) as conn:
            row = conn.execute(sa.select(issues).where(issues.c.id == issue_id)).first()
            digest = digests.get(row.digest) if row is not None else None
            if digest is None:
                continue  # gone, or a digest no longer configured: released or held at its slot
            mail = compose_review_mail(conn, settings, digest, issue_id, renderer, now=now)
        with writing(engine) as conn:
            # Locked, then asked again: two processes rendering the same mail queue it once.
            status = conn.execute(locking(conn, issue_id)).first()
            if status is None or status.status != "review":
                continue
            if conn.execute(sa.select(_has_mail()).where(issues.c.id == issue_id)).scalar():
                continue
            enqueue(
                conn,
                kind="review",
                cause=review_cause(issue_id),
                to=settings.staff.emails,
                subject=mail.subject,
                text=mail.text,
                html=mail.html,
                now=now,
            )
        queued.append(issue_id)
    return queued


def review_cause(issue_id: int) -> str:
    """The staff mail cause of an issue's review mail."""
    return f"review:{issue_id}"


def _has_mail() -> sa.Exists:
    cause = sa.literal("review:") + sa.cast(issues.c.id, sa.String)
    return (
        sa.select(staff_mail.c.id)
        .where(staff_mail.c.kind == "review", staff_mail.c.cause == cause)
        .exists()
    )


def release_due(engine: sa.Engine, settings: Settings, *, now: datetime) -> list[Outcome]:
    """Release every issue in review or approved whose slot has come (see ``release``)."""
    with reading(engine) as conn:
        due = conn.scalars(
            sa.select(issues.c.id)
            .where(issues.c.status.in_(("review", "approved")), issues.c.scheduled_for <= now)
            .order_by(issues.c.scheduled_for, issues.c.id)
        ).all()
    outcomes = []
    for issue_id in due:
        outcome = release(engine, settings, issue_id, now=now)
        if outcome is not None:
            outcomes.append(outcome)
    return outcomes


def release(
    engine: sa.Engine, settings: Settings, issue_id: int, *, now: datetime
) -> Outcome | None:
    """At its slot: an approved issue goes out; one in review gets ``on_unreviewed``.

    Going out is the snapshot of its recipients, first due at ``goes_out(digest, now)``
    (quiet hours apply), and status ``sending`` (``empty`` if nobody is left). "hold" makes
    it ``held`` and raises an alert naming the command that sends it. None when the issue is
    not in review or approved, or its slot has not come.
    """
    with reading(engine) as conn:
        # Every cron firing whose issue exists asks: most are not made for review, and need
        # no write lock to say so.
        current = conn.scalar(sa.select(issues.c.status).where(issues.c.id == issue_id))
    if current not in ("review", "approved"):
        return None
    digests = {d.key: d for d in settings.digests}
    why = ""
    with writing(engine) as conn:
        row = conn.execute(locking(conn, issue_id)).first()
        if row is None or row.status not in ("review", "approved") or row.scheduled_for > now:
            return None
        digest = digests.get(row.digest)
        if digest is None:
            why = f"its digest {row.digest} is no longer in the config"
        elif row.status == "review" and digest.on_unreviewed == "hold":
            why = 'nobody reviewed it and its digest has on_unreviewed = "hold"'
        if why:
            set_status(conn, issue_id, "held")
            audit.record(conn, None, "issue.held", now, issue=issue_id, by=BY_SCHEDULE)
            outcome = outcome_of(conn, row, "held", digest, now)
        else:
            assert digest is not None
            outcome = release_now(
                conn, settings, digest, row, now, unreviewed=row.status == "review"
            )
    if why:
        alert_held(
            engine,
            settings,
            issue_id=issue_id,
            digest_key=outcome.digest,
            scheduled_for=outcome.scheduled_for,
            why=why,
            now=now,
        )
    else:
        log_released(engine, outcome)
    return outcome


def alert_held(
    engine: sa.Engine,
    settings: Settings,
    *,
    issue_id: int,
    digest_key: str,
    scheduled_for: datetime,
    why: str,
    now: datetime,
) -> None:
    """Tell staff that an issue reached its slot held (cause ``held:issue:<id>``)."""
    slot = schedule.local_time(scheduled_for, settings.site.timezone)
    i = issue_id
    # An issue whose digest left the config cannot be approved (``review_actions.approve``
    # refuses it) until the digest is back.
    approve = f"`mailer issues approve {i}`"
    if settings.find_digest(digest_key) is None:
        approve = f"you put the digest {digest_key} back in the config and run {approve}"
    raise_alert(
        engine,
        settings,
        cause=f"held:issue:{i}",
        subject=f"issue {i} of {digest_key} for {slot} is held",
        text=(
            f"Issue {i} of {digest_key} reached its slot ({slot}) and was not sent: {why}.\n"
            f"It waits until {approve} (it then goes out at once to the readers subscribed"
            f" at that moment), or `mailer issues skip {i}` (its articles then go in the next"
            " issue).\n"
        ),
        now=now,
    )


# ---------------------------------------------------------------- inside a transaction


def _exists(engine: sa.Engine, digest_key: str, slot: datetime) -> bool:
    with reading(engine) as conn:
        return (
            conn.execute(
                sa.select(issues.c.id).where(
                    issues.c.digest == digest_key, issues.c.scheduled_for == slot
                )
            ).first()
            is not None
        )


def locking(conn: sa.Connection, issue_id: int) -> sa.Select[Any]:
    """The issue's row, locked until the transaction ends (PostgreSQL; SQLite's writing
    transaction already holds the database's write lock)."""
    query = sa.select(issues).where(issues.c.id == issue_id)
    return query.with_for_update() if conn.dialect.name == "postgresql" else query


def set_status(conn: sa.Connection, issue_id: int, status: str) -> None:
    conn.execute(issues.update().where(issues.c.id == issue_id).values(status=status))


def kept_topics(conn: sa.Connection, issue_id: int) -> tuple[set[str], list[int]]:
    """The topics of the articles the issue holds (not dropped), and their ids."""
    rows = conn.execute(
        sa.select(articles.c.id, articles.c.topic)
        .join(issue_articles, issue_articles.c.article_id == articles.c.id)
        .where(issue_articles.c.issue_id == issue_id, issue_articles.c.dropped_at.is_(None))
    ).all()
    return {r.topic for r in rows}, [r.id for r in rows]


def outcome_of(
    conn: sa.Connection, row: sa.Row[Any], status: str, digest: Digest | None, now: datetime
) -> Outcome:
    """Where an issue not (yet) released stands: who it would go to if released now."""
    topics, kept = kept_topics(conn, row.id)
    waiting = status in WAITING_ISSUE_STATUSES
    recipients = (
        count_recipients(conn, row.digest, topics, now) if waiting else snapshotted(conn, row.id)
    )
    when = None
    if digest is not None and waiting:
        when = goes_out(digest, max(row.scheduled_for, now))
    return Outcome(row.id, row.digest, status, row.scheduled_for, when, recipients, len(kept))


def release_now(
    conn: sa.Connection,
    settings: Settings,
    digest: Digest,
    row: sa.Row[Any],
    now: datetime,
    *,
    unreviewed: bool,
) -> Outcome:
    """Snapshot the issue's recipients now; ``sending``, or ``empty`` if nobody is left."""
    topics, kept = kept_topics(conn, row.id)
    recipients = snapshot(conn, settings, digest, row.id, row.scheduled_for, topics, now)
    status = "sending" if recipients else "empty"
    conn.execute(
        issues.update()
        .where(issues.c.id == row.id)
        .values(status=status, completed_at=None if recipients else now)
    )
    audit.record(
        conn,
        None,
        "issue.released",
        now,
        issue=row.id,
        by=BY_SCHEDULE,
        unreviewed=unreviewed,
        recipients=recipients,
    )
    return Outcome(
        row.id,
        row.digest,
        status,
        row.scheduled_for,
        goes_out(digest, now),
        recipients,
        len(kept),
        released=True,
    )


def log_released(engine: sa.Engine, outcome: Outcome) -> None:
    if outcome.recipients:
        refresh_statistics(engine, deliveries)
    log.info(
        "issue released",
        extra={
            "issue": outcome.issue_id,
            "digest": outcome.digest,
            "status": outcome.status,
            "recipients": outcome.recipients,
        },
    )


def review_opens(digest: Digest, slot: datetime) -> datetime | None:
    """When the issue of ``slot`` is made for review (None: a digest without review)."""
    return slot - digest.review if digest.review_minutes > 0 else None


def round_steps(
    engine: sa.Engine,
    settings: Settings,
    *,
    renderer: Renderer,
    render_subject: SubjectRenderer,
    on_release: Callable[[], None] | None = None,
) -> list[Callable[[datetime], None]]:
    """The review window's two steps of a periodic staff round, each given the round's now:
    open the windows that are due (with their mails), then release the slots that came.
    ``on_release`` is called when an issue went out (a service wakes its worker)."""

    def open_reviews(now: datetime) -> None:
        open_due_reviews(
            engine, settings, now=now, render_subject=render_subject, renderer=renderer
        )

    def release_slots(now: datetime) -> None:
        released = release_due(engine, settings, now=now)
        if on_release is not None and any(o.status == "sending" for o in released):
            on_release()

    return [open_reviews, release_slots]
