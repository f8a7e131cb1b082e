"""Issues once made: what they hold and how they stand, and what staff do to them.

``load_content`` is what a composer renders; ``summarize``, ``list_issues``, ``reasons`` and
``unfinished`` are what ``issues show`` / ``issues list`` and a drain's last line say;
``cancel``, ``resume`` and ``retry`` are the staff commands; ``finish_if_done`` is how a worker
marks an issue sent. Making an issue is ``mailer.issues.create``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from mailer.config.settings import Settings
from mailer.content.store import ARTICLE_COLUMNS
from mailer.db import audit
from mailer.db.engine import reading
from mailer.db.schema import (
    SENDING_ROW,
    WAITING_ROW,
    articles,
    deliveries,
    issue_articles,
    issues,
)
from mailer.errors import DigestError, UnknownIssueError
from mailer.issues.corrections import correction_content
from mailer.models import Article, IssueContent


@dataclass(frozen=True)
class IssueSummary:
    """One issue and its deliveries counted by status."""

    id: int
    digest: str
    scheduled_for: datetime
    subject: str
    status: str
    created_at: datetime
    completed_at: datetime | None
    counts: dict[str, int]
    note: str = ""  # the editor's note (issues.note) and who wrote it
    note_by: str = ""

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def load_content(conn: sa.Connection, issue_id: int, settings: Settings) -> IssueContent:
    """Everything a composer needs to render an issue (without the articles dropped in
    review)."""
    row = conn.execute(sa.select(issues).where(issues.c.id == issue_id)).first()
    if row is None:
        raise UnknownIssueError(issue_id)
    if row.kind == "correction":
        return correction_content(conn, row, settings)
    # A digest since removed from the config still renders its issues, in the site's zone.
    digest = settings.find_digest(row.digest)
    zone = ZoneInfo(digest.timezone if digest else settings.site.timezone)
    return IssueContent(
        issue_id=row.id,
        digest_key=row.digest,
        digest_name=digest.name if digest else row.digest,
        subject=row.subject,
        date=row.scheduled_for.astimezone(zone),
        articles=kept_articles(conn, issue_id),
        note=row.note or "",
        note_by=row.note_by or "",
    )


def kept_articles(conn: sa.Connection, issue_id: int) -> tuple[Article, ...]:
    """The issue's articles in its order, without those dropped from it in review."""
    rows = conn.execute(
        sa.select(*ARTICLE_COLUMNS, articles.c.updated_at)
        .join(issue_articles, issue_articles.c.article_id == articles.c.id)
        .where(issue_articles.c.issue_id == issue_id, issue_articles.c.dropped_at.is_(None))
        .order_by(issue_articles.c.position)
    ).all()
    return tuple(Article(**r._mapping) for r in rows)


def summarize(engine: sa.Engine, issue_id: int) -> IssueSummary:
    """Issue ``issue_id`` with its deliveries counted by status; DigestError if there is none."""
    with reading(engine) as conn:
        row = conn.execute(sa.select(issues).where(issues.c.id == issue_id)).first()
        if row is None:
            raise UnknownIssueError(issue_id)
        return _summaries(conn, [row])[0]


def list_issues(
    engine: sa.Engine,
    *,
    digest: str | None = None,
    limit: int = 20,
    offset: int = 0,
    statuses: Sequence[str] | None = None,
) -> list[IssueSummary]:
    """The newest ``limit`` issues (of ``digest`` if given, in ``statuses`` if given), newest
    slot first, after the first ``offset`` of them (a page of a longer list)."""
    with reading(engine) as conn:
        query = (
            sa.select(issues)
            .order_by(issues.c.scheduled_for.desc(), issues.c.id.desc())
            .limit(limit)
            .offset(offset)
        )
        if digest is not None:
            query = query.where(issues.c.digest == digest)
        if statuses is not None:
            query = query.where(issues.c.status.in_(list(statuses)))
        return _summaries(conn, conn.execute(query).all())


def count_issues(engine: sa.Engine) -> int:
    """How many issues there are (of every digest and status): the length of ``list_issues``
    without a limit."""
    with reading(engine) as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(issues)).scalar_one())


def _summaries(conn: sa.Connection, rows: Sequence[sa.Row[Any]]) -> list[IssueSummary]:
    """The issues of ``rows`` with their deliveries counted by status, by one query."""
    counts: dict[int, dict[str, int]] = {row.id: {} for row in rows}
    if counts:
        for issue_id, status, n in conn.execute(
            sa.select(deliveries.c.issue_id, deliveries.c.status, sa.func.count())
            .where(deliveries.c.issue_id.in_(list(counts)))
            .group_by(deliveries.c.issue_id, deliveries.c.status)
        ):
            counts[issue_id][status] = n
    return [
        IssueSummary(
            id=row.id,
            digest=row.digest,
            scheduled_for=row.scheduled_for,
            subject=row.subject,
            status=row.status,
            created_at=row.created_at,
            completed_at=row.completed_at,
            counts=counts[row.id],
            note=row.note or "",
            note_by=row.note_by or "",
        )
        for row in rows
    ]


def finish_if_done(conn: sa.Connection, issue_id: int, now: datetime) -> bool:
    """Mark an issue sent once no delivery of it is queued, deferred or in flight."""
    # Two look-ups that each stop at the first row, off ix_deliveries_issue_waiting and
    # ix_deliveries_sending: a count over the issue's rows read all of them (a million at the end
    # of a million-subscriber issue).
    of_issue = deliveries.c.issue_id == issue_id
    pending = any(
        conn.execute(sa.select(deliveries.c.id).where(of_issue, condition).limit(1)).first()
        for condition in (WAITING_ROW, SENDING_ROW)
    )
    if pending:
        return False
    done = conn.execute(
        issues.update()
        .where(issues.c.id == issue_id, issues.c.status == "sending")
        .values(status="sent", completed_at=now)
    ).rowcount
    return bool(done)


CANCELLED_BY_STAFF = "cancelled by staff"


def cancel(engine: sa.Engine, issue_id: int, *, now: datetime) -> int:
    """Stop an issue: its waiting deliveries are cancelled; returns how many.

    Its articles count as not taken again (``selection.GIVES_BACK``): the digest's next
    issue takes them, and the never-twice rule spares whoever received them from this one.
    """
    with engine.begin() as conn:
        status = _status(conn, issue_id)
        if status != "sending":
            raise DigestError(
                f"issue {issue_id} is {status}; only a sending issue can be cancelled"
            )
        conn.execute(
            issues.update()
            .where(issues.c.id == issue_id)
            .values(status="cancelled", completed_at=now)
        )
        return conn.execute(
            deliveries.update()
            .where(
                deliveries.c.issue_id == issue_id, deliveries.c.status.in_(("queued", "deferred"))
            )
            .values(
                status="cancelled",
                last_reply=CANCELLED_BY_STAFF,
                lease_owner=None,
                lease_expires_at=None,
                updated_at=now,
            )
        ).rowcount


# A delivery that will never be sent as it stands: its message could not be built for this
# recipient (the last reply mailer.delivery.worker records starts so). Other failures gave up on a
# relay that kept refusing.
NOT_BUILT = "message not built:"


def resume(engine: sa.Engine, issue_id: int, *, now: datetime, resend_unknown: bool = False) -> int:
    """Queue again, due now, what an issue still owes: deliveries cancelled by staff (a
    cancelled issue is sent after all), deferred ones (after a relay outage, without waiting
    for their backoff) and those that failed because the relay kept refusing past
    ``[smtp].retry_max_age_hours``; with ``resend_unknown`` also those held as ``unknown``.
    Sent, bounced and unbuildable deliveries stay as they are."""
    with engine.begin() as conn:
        status = _status(conn, issue_id)
        requeue = sa.or_(
            sa.and_(
                deliveries.c.status == "cancelled", deliveries.c.last_reply == CANCELLED_BY_STAFF
            ),
            deliveries.c.status == "deferred",
            sa.and_(
                deliveries.c.status == "failed",
                sa.or_(
                    deliveries.c.last_reply.is_(None),
                    sa.not_(deliveries.c.last_reply.startswith(NOT_BUILT, autoescape=True)),
                ),
            ),
            deliveries.c.status.in_(["unknown"] if resend_unknown else []),
        )
        count = conn.execute(
            deliveries.update()
            .where(deliveries.c.issue_id == issue_id, requeue)
            .values(status="queued", next_attempt_at=now, last_reply=None, updated_at=now)
        ).rowcount
        if count or status == "cancelled":
            _reopen(conn, issue_id)
        return count


def retry(engine: sa.Engine, issue_id: int, *, by: str, now: datetime) -> int:
    """Make the deferred and unknown deliveries of an issue due now; returns how many.
    Recorded in the audit trail with who asked (``by``), from the console or the command line.

    They keep their Message-ID; sent deliveries are not touched, so no one who was sent the
    issue gets it again. (An ``unknown`` delivery was in flight when its worker died: it may
    have reached its recipient, who then gets a second copy with the same Message-ID.) An
    issue marked sent goes back to sending.
    """
    with engine.begin() as conn:
        if _status(conn, issue_id) == "cancelled":
            raise DigestError(
                f"issue {issue_id} is cancelled: `mailer issues resume {issue_id}` sends it"
                " after all"
            )
        deferred = conn.execute(
            deliveries.update()
            .where(deliveries.c.issue_id == issue_id, deliveries.c.status == "deferred")
            .values(next_attempt_at=now, updated_at=now)
        ).rowcount
        unknown = conn.execute(
            deliveries.update()
            .where(deliveries.c.issue_id == issue_id, deliveries.c.status == "unknown")
            .values(status="queued", next_attempt_at=now, updated_at=now)
        ).rowcount
        if deferred + unknown:
            _reopen(conn, issue_id)
        audit.record(
            conn, None, "staff.retry", now, by=by, issue=issue_id, deliveries=deferred + unknown
        )
        return deferred + unknown


def _status(conn: sa.Connection, issue_id: int) -> str:
    """The status of issue ``issue_id``; DigestError when there is none."""
    status: str | None = conn.execute(
        sa.select(issues.c.status).where(issues.c.id == issue_id)
    ).scalar_one_or_none()
    if status is None:
        raise UnknownIssueError(issue_id)
    return status


def _reopen(conn: sa.Connection, issue_id: int) -> None:
    conn.execute(
        issues.update()
        .where(issues.c.id == issue_id, issues.c.status.in_(("sent", "cancelled")))
        .values(status="sending", completed_at=None)
    )


# ---------------------------------------------------------------- what is not finished, and why

FINAL = ("sent", "bounced", "failed", "cancelled")
# Statuses whose last reply says why: counted by reason in `issues show`.
WITH_REASONS = ("deferred", "unknown", "failed", "bounced")
_ADDRESS = re.compile(r"<?[^\s<>@]+@[^\s<>]+>?")
REASON_WIDTH = 100


def short_reason(reply: str | None) -> str:
    """A last reply as a reason shared by many deliveries: one line, addresses masked (a
    refusal names its recipient), cut to ``REASON_WIDTH`` characters."""
    if not reply:
        return "no reply recorded"
    text = _ADDRESS.sub("<address>", " ".join(reply.split()))
    return text if len(text) <= REASON_WIDTH else text[: REASON_WIDTH - 1] + "…"


def local_time(moment: datetime, zone: str) -> str:
    """A time for staff: in the site's zone, with the zone's name (``2026-12-05 09:03:12 EST``).

    The tables of ``issues show`` and ``articles list`` use this sortable form; the schedule's
    sentences use ``schedule.local_time`` (``Fri 11 Dec 2026 07:00 EST``).
    """
    return moment.astimezone(ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M:%S %Z")


@dataclass(frozen=True)
class Reasons:
    """Why an issue's deliveries are where they are, for `issues show`."""

    by_status: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # most first
    next_retry: datetime | None = None  # the earliest due time of a waiting delivery


def reasons(engine: sa.Engine, issue_id: int) -> Reasons:
    """Counts by reason for the deferred, unknown, failed and bounced deliveries of an
    issue, and when the next waiting one is due."""
    of_issue = deliveries.c.issue_id == issue_id
    with reading(engine) as conn:
        rows = conn.execute(
            sa.select(deliveries.c.status, deliveries.c.last_reply, sa.func.count())
            .where(of_issue, deliveries.c.status.in_(WITH_REASONS))
            .group_by(deliveries.c.status, deliveries.c.last_reply)
        ).all()
        next_retry = conn.execute(
            sa.select(sa.func.min(deliveries.c.next_attempt_at)).where(of_issue, WAITING_ROW)
        ).scalar_one_or_none()
    counted: dict[str, Counter[str]] = {}
    for status, reply, n in rows:
        counted.setdefault(status, Counter())[short_reason(reply)] += n
    by_status = {
        status: sorted(counted[status].items(), key=lambda kv: (-kv[1], kv[0]))
        for status in WITH_REASONS
        if status in counted
    }
    return Reasons(by_status, next_retry)


@dataclass(frozen=True)
class Unfinished:
    """Deliveries left not final, for the one line a command exits 1 with."""

    counts: dict[str, int]  # by status
    reason: str | None  # the reason most of the deferred and unknown ones got
    next_retry: datetime | None
    issues: tuple[int, ...]  # the issues they belong to

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self, zone: str, now: datetime) -> str:
        order = ("deferred", "unknown", "queued", "sending")
        parts = [f"{self.counts[s]} {s}" for s in order if self.counts.get(s)]
        ids = ", ".join(map(str, self.issues))
        whose = f"issue {ids}" if len(self.issues) == 1 else f"issues {ids}"
        line = f"{whose} not finished: {', '.join(parts)}"
        if self.reason:
            line += f"; most got: {self.reason}"
        retried = bool(self.counts.get("deferred") or self.counts.get("unknown"))
        if self.next_retry is not None:
            when = "now" if self.next_retry <= now else local_time(self.next_retry, zone)
            line += f"; next {'retry' if retried else 'due'} {when}"
        if retried:
            target = ids if len(self.issues) == 1 else "ID"
            line += f" (`mailer issues retry {target}` retries now)"
        return line


def unfinished(
    engine: sa.Engine, issue_id: int | None = None, *, since: datetime | None = None
) -> Unfinished | None:
    """What is not final: every such delivery of ``issue_id``; or, across issues, the
    deferred and unknown ones written since ``since`` (what a drain left behind). None when
    nothing is left."""
    if issue_id is not None:
        where = [deliveries.c.issue_id == issue_id, deliveries.c.status.not_in(FINAL)]
    else:
        where = [deliveries.c.status.in_(("deferred", "unknown"))]
        if since is not None:
            where.append(deliveries.c.updated_at >= since)
    with reading(engine) as conn:
        rows = conn.execute(
            sa.select(
                deliveries.c.issue_id,
                deliveries.c.status,
                deliveries.c.last_reply,
                sa.func.count(),
            )
            .where(*where)
            .group_by(deliveries.c.issue_id, deliveries.c.status, deliveries.c.last_reply)
        ).all()
        if not rows:
            return None
        next_retry = conn.execute(
            sa.select(sa.func.min(deliveries.c.next_attempt_at)).where(*where, WAITING_ROW)
        ).scalar_one_or_none()
    counts: Counter[str] = Counter()
    why: Counter[str] = Counter()
    for _issue, status, reply, n in rows:
        counts[status] += n
        if status in ("deferred", "unknown"):
            why[short_reason(reply)] += n
    reason = why.most_common(1)[0][0] if why else None
    return Unfinished(dict(counts), reason, next_retry, tuple(sorted({r[0] for r in rows})))


# ---------------------------------------------------------------- sends in progress

# How far back the sending rate is measured: long enough to smooth one batch's commit, short
# enough that a send slowing down shows within a minute.
RATE_WINDOW_SECONDS = 60


@dataclass(frozen=True)
class SendProgress:
    """An issue sending now: its deliveries by status, its recent rate and the time left."""

    summary: IssueSummary
    rate: float  # messages sent per second over the last RATE_WINDOW_SECONDS (or since start)
    seconds_left: float | None  # the deliveries still due at ``rate``; None when nothing is sent

    @property
    def left(self) -> int:
        """Deliveries not final yet (queued, sending, deferred, unknown)."""
        return sum(n for status, n in self.summary.counts.items() if status not in FINAL)


def sending_now(engine: sa.Engine, *, now: datetime) -> list[SendProgress]:
    """Every issue sending now, oldest slot first, with its counts, rate and time left."""
    with reading(engine) as conn:
        rows = conn.execute(
            sa.select(issues).where(issues.c.status == "sending").order_by(issues.c.scheduled_for)
        ).all()
        summaries = _summaries(conn, rows)
        found = []
        for summary in summaries:
            of_issue = deliveries.c.issue_id == summary.id
            first = conn.execute(
                sa.select(sa.func.min(deliveries.c.sent_at)).where(of_issue)
            ).scalar_one_or_none()
            if first is None:
                found.append(SendProgress(summary, 0.0, None))
                continue
            start = max(first, now - timedelta(seconds=RATE_WINDOW_SECONDS))
            recent = conn.execute(
                sa.select(sa.func.count()).where(of_issue, deliveries.c.sent_at >= start)
            ).scalar_one()
            elapsed = max((now - start).total_seconds(), 1.0)
            rate = recent / elapsed
            left = sum(n for status, n in summary.counts.items() if status not in FINAL)
            found.append(SendProgress(summary, rate, left / rate if rate else None))
    return found
