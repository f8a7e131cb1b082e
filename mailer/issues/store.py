"""Issues: one per (digest, nominal time), created once, with a snapshot of its recipients.

``create_issue`` is idempotent: the INSERT … ON CONFLICT DO NOTHING on UNIQUE(digest,
scheduled_for) picks one winner, and only the winner selects the articles and snapshots the
recipients, in the same transaction. Two processes firing the same slot create one issue.

An issue takes the articles its digest has not taken yet (``articles.select_for_issue``): by
arrival in the store, not by publication date, so an article fetched after its slot's issue
was made goes in the next one. Issues of one digest are made one at a time (SQLite's write
lock; a transaction-scoped advisory lock per digest on PostgreSQL), so two of them never take
the same article.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from mailer.config import Digest, Settings
from mailer.content.articles import ARTICLE_COLUMNS, Selection, lookback_start, select_for_issue
from mailer.db.engine import refresh_statistics, upsert_insert
from mailer.db.schema import (
    SENDING_ROW,
    WAITING_ROW,
    articles,
    deliveries,
    issue_articles,
    issues,
    subscriber_topics,
    subscribers,
)
from mailer.errors import DigestError
from mailer.issues.schedule import quiet_until
from mailer.models import Article, IssueContent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IssueCreated:
    issue_id: int
    created: bool  # False: the issue already existed (another firing or process won)
    articles: int
    recipients: int
    # Articles this issue could have taken beyond max_articles: the next issue takes them.
    left_over: int = 0


@dataclass(frozen=True)
class IssueSummary:
    id: int
    digest: str
    scheduled_for: datetime
    subject: str
    status: str
    created_at: datetime
    completed_at: datetime | None
    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def message_id_prefix(digest_key: str, scheduled_for: datetime, issue_id: int) -> str:
    """The fixed left part of every Message-ID in an issue; the subscriber uid completes it."""
    return f"{digest_key}.{scheduled_for:%Y%m%d%H%M}.{issue_id}."


def articles_for(
    conn: sa.Connection, digest: Digest, *, now: datetime, since: datetime | None = None
) -> Selection:
    """What an issue of ``digest`` made at ``now`` takes: ``create_issue`` makes it so and the
    preview of the next issue shows it, by the one call."""
    return select_for_issue(
        conn,
        digest_key=digest.key,
        topics=digest.topics,
        lookback=digest.lookback,
        limit=digest.max_articles,
        now=now,
        since=since,
    )


def create_issue(
    engine: sa.Engine,
    settings: Settings,
    digest: Digest,
    *,
    scheduled_for: datetime,
    now: datetime,
    render_subject: Callable[[Digest, datetime], str],
) -> IssueCreated:
    """Create the issue for (digest, scheduled_for) unless it exists; snapshot its recipients.

    The issue takes what ``articles.select_for_issue`` gives at ``now`` (the moment it is
    made); its window records the publication dates that could go in, (window_start, now].
    """
    local_date = scheduled_for.astimezone(ZoneInfo(digest.timezone))
    subject = render_subject(digest, local_date)
    with engine.begin() as conn:
        since = lookback_start(conn, digest.key, digest.lookback, now)
        insert = upsert_insert(conn, issues)
        issue_id = conn.execute(
            insert.values(
                digest=digest.key,
                scheduled_for=scheduled_for,
                window_start=since,
                window_end=now,
                subject=subject,
                topics=";".join(digest.topics),
                status="sending",
                created_at=now,
            )
            .on_conflict_do_nothing(index_elements=["digest", "scheduled_for"])
            .returning(issues.c.id)
        ).scalar_one_or_none()
        if issue_id is None:
            existing = conn.execute(
                sa.select(issues.c.id).where(
                    issues.c.digest == digest.key, issues.c.scheduled_for == scheduled_for
                )
            ).scalar_one()
            return IssueCreated(existing, False, 0, 0)
        _one_issue_at_a_time(conn, digest.key)
        selection = articles_for(conn, digest, now=now, since=since)
        chosen = selection.articles
        if chosen:
            conn.execute(
                issue_articles.insert(),
                [
                    {"issue_id": issue_id, "article_id": a.id, "position": i}
                    for i, a in enumerate(chosen)
                ],
            )
        recipients = _snapshot(
            conn, settings, digest, issue_id, scheduled_for, {a.topic for a in chosen}, now
        )
        if recipients == 0:
            conn.execute(
                issues.update()
                .where(issues.c.id == issue_id)
                .values(status="empty", completed_at=now)
            )
    if recipients:
        refresh_statistics(engine, deliveries)
    log.info(
        "issue created",
        extra={
            "issue": issue_id,
            "digest": digest.key,
            "articles": len(chosen),
            "left_over": selection.left_over,
            "recipients": recipients,
        },
    )
    return IssueCreated(issue_id, True, len(chosen), recipients, selection.left_over)


def _one_issue_at_a_time(conn: sa.Connection, digest_key: str) -> None:
    """Hold the digest's issue lock until this transaction ends.

    Two issues of one digest made at once (a scheduled slot and a ``digest send``, or two
    slots caught up by two processes) would each see the other's articles as not taken yet.
    SQLite already runs one writing transaction at a time (BEGIN IMMEDIATE); PostgreSQL gets a
    transaction-scoped advisory lock keyed on the digest, after which this transaction's next
    statements see what the other one committed (READ COMMITTED).
    """
    if conn.dialect.name != "postgresql":
        return
    digest_hash = hashlib.sha256(f"mailer.issue:{digest_key}".encode()).digest()
    key = int.from_bytes(digest_hash[:8], "big", signed=True)
    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))


def _snapshot(
    conn: sa.Connection,
    settings: Settings,
    digest: Digest,
    issue_id: int,
    scheduled_for: datetime,
    topics: set[str],
    now: datetime,
) -> int:
    """Queue one delivery per active subscriber who chose a topic this issue has articles in."""
    if not topics:
        return 0
    prefix = "<" + message_id_prefix(digest.key, scheduled_for, issue_id)
    alert = digest.priority == "alert"
    # A bulk issue made in quiet hours waits for their end; an alert never waits.
    due = (None if alert else quiet_until(digest.quiet_hours, digest.timezone, now)) or now
    suffix = f"@{settings.site.domain}>"
    wanted = sa.select(subscriber_topics.c.subscriber_id).where(
        subscriber_topics.c.topic.in_(sorted(topics))
    )
    select = sa.select(
        sa.literal(issue_id),
        subscribers.c.id,
        sa.literal("queued"),
        sa.literal(due, type_=deliveries.c.next_attempt_at.type),
        (sa.literal(prefix) + subscribers.c.uid + sa.literal(suffix)),
        sa.literal(now, type_=deliveries.c.created_at.type),
        sa.literal(now, type_=deliveries.c.updated_at.type),
        sa.literal(1 if alert else 0),
    ).where(
        subscribers.c.status == "active",
        subscribers.c.id.in_(wanted),
        # Paused from the preferences page: no issue while the pause lasts.
        sa.or_(subscribers.c.paused_until.is_(None), subscribers.c.paused_until <= now),
    )
    conn.execute(
        deliveries.insert().from_select(
            [
                "issue_id",
                "subscriber_id",
                "status",
                "next_attempt_at",
                "message_id",
                "created_at",
                "updated_at",
                "priority",
            ],
            select,
        )
    )
    # Counted, not taken from rowcount: drivers disagree on it for INSERT … SELECT.
    return int(
        conn.execute(
            sa.select(sa.func.count())
            .select_from(deliveries)
            .where(deliveries.c.issue_id == issue_id)
        ).scalar_one()
    )


def last_scheduled(engine: sa.Engine, digest_key: str) -> datetime | None:
    """The slot of the digest's newest issue, if any."""
    with engine.connect() as conn:
        return conn.execute(
            sa.select(sa.func.max(issues.c.scheduled_for)).where(issues.c.digest == digest_key)
        ).scalar_one_or_none()


def load_content(conn: sa.Connection, issue_id: int, settings: Settings) -> IssueContent:
    """Everything a composer needs to render an issue."""
    row = conn.execute(sa.select(issues).where(issues.c.id == issue_id)).first()
    if row is None:
        raise DigestError(f"no issue {issue_id}")
    rows = conn.execute(
        sa.select(*ARTICLE_COLUMNS)
        .join(issue_articles, issue_articles.c.article_id == articles.c.id)
        .where(issue_articles.c.issue_id == issue_id)
        .order_by(issue_articles.c.position)
    ).all()
    # A digest since removed from the config still renders its issues, in the site's zone.
    digest = {d.key: d for d in settings.digests}.get(row.digest)
    zone = ZoneInfo(digest.timezone if digest else settings.site.timezone)
    return IssueContent(
        issue_id=row.id,
        digest_key=row.digest,
        digest_name=digest.name if digest else row.digest,
        subject=row.subject,
        date=row.scheduled_for.astimezone(zone),
        articles=tuple(Article(**r._mapping) for r in rows),
    )


def summarize(engine: sa.Engine, issue_id: int) -> IssueSummary:
    with engine.connect() as conn:
        row = conn.execute(sa.select(issues).where(issues.c.id == issue_id)).first()
        if row is None:
            raise DigestError(f"no issue {issue_id}")
        counts = {
            status: n
            for status, n in conn.execute(
                sa.select(deliveries.c.status, sa.func.count())
                .where(deliveries.c.issue_id == issue_id)
                .group_by(deliveries.c.status)
            )
        }
    return IssueSummary(
        id=row.id,
        digest=row.digest,
        scheduled_for=row.scheduled_for,
        subject=row.subject,
        status=row.status,
        created_at=row.created_at,
        completed_at=row.completed_at,
        counts=counts,
    )


def list_issues(
    engine: sa.Engine, *, digest: str | None = None, limit: int = 20
) -> list[IssueSummary]:
    with engine.connect() as conn:
        query = sa.select(issues.c.id).order_by(issues.c.scheduled_for.desc()).limit(limit)
        if digest is not None:
            query = query.where(issues.c.digest == digest)
        ids: Sequence[int] = conn.scalars(query).all()
    return [summarize(engine, i) for i in ids]


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

    Its articles count as not taken again (``articles.GIVES_BACK``): the digest's next
    issue takes them, and the never-twice rule spares whoever received them from this one.
    """
    with engine.begin() as conn:
        summary_row = conn.execute(
            sa.select(issues.c.status).where(issues.c.id == issue_id)
        ).first()
        if summary_row is None:
            raise DigestError(f"no issue {issue_id}")
        if summary_row.status not in ("sending",):
            raise DigestError(
                f"issue {issue_id} is {summary_row.status}; only a sending issue can be cancelled"
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
        row = conn.execute(sa.select(issues.c.status).where(issues.c.id == issue_id)).first()
        if row is None:
            raise DigestError(f"no issue {issue_id}")
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
        if count or row.status == "cancelled":
            _reopen(conn, issue_id)
        return count


def retry(engine: sa.Engine, issue_id: int, *, now: datetime) -> int:
    """Make the deferred and unknown deliveries of an issue due now; returns how many.

    They keep their Message-ID; sent deliveries are not touched, so no one who was sent the
    issue gets it again. (An ``unknown`` delivery was in flight when its worker died: it may
    have reached its recipient, who then gets a second copy with the same Message-ID.) An
    issue marked sent goes back to sending.
    """
    with engine.begin() as conn:
        row = conn.execute(sa.select(issues.c.status).where(issues.c.id == issue_id)).first()
        if row is None:
            raise DigestError(f"no issue {issue_id}")
        if row.status == "cancelled":
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
        return deferred + unknown


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
    """A time for staff: in the site's zone, with the zone's name (``2026-12-05 09:03:12 EST``)."""
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
    with engine.connect() as conn:
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
    with engine.connect() as conn:
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
