"""How an issue went: the report staff get when it ends, and `mailer issues report` prints.

``build_report`` reads it all from the ledger and the audit trail as of ``now``: it works on
an issue still sending (counts so far) as on a final one, and keeps changing after the end
while bounce reports, complaints and unsubscribes come in. Rendering it is
``mailer.issues.report_text``; queueing the mail when an issue ends is
``mailer.staff.reports``.

What happened next is attributed by two rules. A complaint whose feedback report names the
original Message-ID belongs to that message's issue. An unsubscribe (and a complaint without
a Message-ID) belongs to the last issue the reader was sent before it, if it came within
``AFTER`` (72 hours) of that send: the reader left over that issue, or at least right after it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import sqlalchemy as sa

from mailer.compose.messages import shown_topics
from mailer.config.settings import Settings
from mailer.db.engine import reading
from mailer.db.schema import deliveries, events, issues, subscriber_topics
from mailer.errors import UnknownIssueError
from mailer.issues.progress import load_content, reasons
from mailer.models import IssueContent

# An issue in one of these will not send anything more (a retry can reopen a sent one).
FINAL_ISSUE = ("sent", "empty", "cancelled", "skipped")
# How long after a reader was sent an issue their unsubscribe or complaint is put down to it.
AFTER = timedelta(hours=72)
# How many reasons a report lists per status.
TOP_REASONS = 5
# Unsubscribes a reader made (the links in the message, the one-click POST); not staff's.
READER_SOURCES = ("web",)


@dataclass(frozen=True)
class Outcomes:
    """The issue's deliveries counted by where they stand."""

    sent: int = 0
    deferred: int = 0  # refused for now (4xx), to be tried again
    bounced: int = 0  # refused for good (5xx), at send time or by a report since
    failed: int = 0  # given up after deferrals, or no message could be built
    cancelled: int = 0  # by staff, or nothing in the reader's topics
    unknown: int = 0  # in flight when a worker died, held for staff
    waiting: int = 0  # queued or being sent now

    @property
    def total(self) -> int:
        return (
            self.sent
            + self.deferred
            + self.bounced
            + self.failed
            + self.cancelled
            + self.unknown
            + self.waiting
        )


@dataclass(frozen=True)
class TopicSet:
    """One variant of the issue: the recipients who chose exactly these of its topics."""

    topics: tuple[str, ...]  # keys, in configured order; () for none with articles
    names: tuple[str, ...]
    recipients: int
    sent: int


@dataclass(frozen=True)
class Reason:
    """A last reply shared by ``count`` deliveries (``progress.short_reason``)."""

    reason: str
    count: int


@dataclass(frozen=True)
class Suppressions:
    """Subscribers this issue's bounces and complaints made bounced or complained."""

    bounced: int = 0
    complained: int = 0


@dataclass(frozen=True)
class Aftermath:
    """Unsubscribes and complaints attributed to the issue in the ``AFTER`` hours after it."""

    unsubscribes: int
    complaints: int
    since: datetime  # the first message sent
    until: datetime  # ``AFTER`` past the last message sent: when the count is complete
    hours: int  # how far along it is, in whole hours since ``since`` (at most ``AFTER``)
    complete: bool


@dataclass(frozen=True)
class IssueReport:
    """Everything the report says about one issue, as of ``as_of``."""

    issue_id: int
    digest_key: str
    digest_name: str
    subject: str
    slot: datetime
    zone: str  # the site's time zone, in which staff read the times
    status: str
    final: bool
    outcomes: Outcomes
    retried: int  # sent after at least one failed attempt
    topic_sets: tuple[TopicSet, ...]  # most recipients first
    first_sent_at: datetime | None
    last_sent_at: datetime | None
    completed_at: datetime | None
    elapsed_seconds: float | None  # first send to the last, or to completion
    rate: float | None  # messages sent per second over ``elapsed_seconds``
    reasons: dict[str, tuple[Reason, ...]]  # deferred, unknown, failed, bounced: top five
    suppressions: Suppressions
    aftermath: Aftermath | None  # None until a message has been sent
    as_of: datetime

    @property
    def failure_share(self) -> float:
        """Failed and bounced deliveries as a share (0–1) of all the issue's deliveries."""
        total = self.outcomes.total
        return (self.outcomes.failed + self.outcomes.bounced) / total if total else 0.0


def build_report(
    engine: sa.Engine, settings: Settings, issue_id: int, *, now: datetime
) -> IssueReport:
    """The report on issue ``issue_id`` as of ``now``; ``UnknownIssueError`` if there is none.

    Deliveries are counted as the ledger has them now: a person erased since (their
    deliveries go with them) is no longer counted anywhere, and topic sets are the current
    choices of each recipient cut to the topics the issue has articles in, which is the
    variant they were sent unless they changed their topics since.
    """
    with reading(engine) as conn:
        row = conn.execute(sa.select(issues).where(issues.c.id == issue_id)).first()
        if row is None:
            raise UnknownIssueError(issue_id)
        content = load_content(conn, issue_id, settings)
        outcomes, retried = _outcomes(conn, issue_id)
        topic_sets = topic_sets_of(conn, settings, issue_id, content)
        first, last = conn.execute(
            sa.select(sa.func.min(deliveries.c.sent_at), sa.func.max(deliveries.c.sent_at)).where(
                deliveries.c.issue_id == issue_id
            )
        ).one()
        about = _about_its_messages(conn, issue_id)
        aftermath, complaint_reports = None, set[str]()
        if first is not None and last is not None:
            aftermath, complaint_reports = _aftermath(conn, issue_id, first, last, about, now)
        ours = {a.report for a in about if a.report} | complaint_reports
        suppressions = _suppressions(conn, issue_id, row.created_at, ours)
    final = row.status in FINAL_ISSUE
    elapsed = None
    if first is not None and last is not None:
        end = max(last, row.completed_at) if final and row.completed_at else last
        elapsed = (end - first).total_seconds()
    why = reasons(engine, issue_id).by_status
    if aftermath is not None and not final:
        # An issue still sending has more messages to come: its window is not complete.
        aftermath = replace(aftermath, complete=False)
    return IssueReport(
        issue_id=row.id,
        digest_key=row.digest,
        digest_name=content.digest_name,
        subject=row.subject,
        slot=row.scheduled_for,
        zone=settings.site.timezone,
        status=row.status,
        final=final,
        outcomes=outcomes,
        retried=retried,
        topic_sets=topic_sets,
        first_sent_at=first,
        last_sent_at=last,
        completed_at=row.completed_at,
        elapsed_seconds=elapsed,
        rate=outcomes.sent / elapsed if elapsed else None,
        reasons={
            status: tuple(Reason(r, n) for r, n in counted[:TOP_REASONS])
            for status, counted in why.items()
        },
        suppressions=suppressions,
        aftermath=aftermath,
        as_of=now,
    )


def _outcomes(conn: sa.Connection, issue_id: int) -> tuple[Outcomes, int]:
    counts: dict[str, int] = {}
    retried = 0
    again = sa.func.sum(sa.case((deliveries.c.attempts > 1, 1), else_=0))
    for status, tried_again, n in conn.execute(
        sa.select(deliveries.c.status, again, sa.func.count())
        .where(deliveries.c.issue_id == issue_id)
        .group_by(deliveries.c.status)
    ):
        key = "waiting" if status in ("queued", "sending") else status
        counts[key] = counts.get(key, 0) + n
        if status == "sent":
            retried = int(tried_again or 0)
    return Outcomes(**counts), retried


def topic_sets_of(
    conn: sa.Connection, settings: Settings, issue_id: int, content: IssueContent
) -> tuple[TopicSet, ...]:
    """Recipients and sent messages per variant, counted in the database: each delivery's
    topics among the issue's become a bit mask (a handful of topics: a small integer), and
    the masks are counted, so a million recipients are never read into Python."""
    present = shown_topics(settings, content, {a.topic for a in content.articles})
    if present:
        bit = sa.case(
            *((subscriber_topics.c.topic == t, 1 << i) for i, t in enumerate(present)), else_=0
        )
        mask: sa.ColumnElement[int] = sa.func.coalesce(sa.func.sum(bit), 0)
        joined: sa.FromClause = deliveries.outerjoin(
            subscriber_topics,
            sa.and_(
                subscriber_topics.c.subscriber_id == deliveries.c.subscriber_id,
                subscriber_topics.c.topic.in_(present),
            ),
        )
    else:
        mask = sa.literal(0)
        joined = deliveries
    per = (
        sa.select(deliveries.c.id, deliveries.c.status, mask.label("mask"))
        .select_from(joined)
        .where(deliveries.c.issue_id == issue_id)
        .group_by(deliveries.c.id, deliveries.c.status)
        .subquery()
    )
    counted: dict[int, list[int]] = {}
    for value, status, n in conn.execute(
        sa.select(per.c.mask, per.c.status, sa.func.count()).group_by(per.c.mask, per.c.status)
    ):
        both = counted.setdefault(int(value), [0, 0])
        both[0] += n
        if status == "sent":
            both[1] += n
    names = {t.key: t.name for t in settings.topics}
    sets = []
    for value, (recipients, sent) in counted.items():
        keys = tuple(t for i, t in enumerate(present) if value & (1 << i))
        sets.append(TopicSet(keys, tuple(names.get(k, k) for k in keys), recipients, sent))
    return tuple(sorted(sets, key=lambda s: (-s.recipients, s.names)))


_REPORT = events.c.detail["report"].as_string()
_MESSAGE_ID = events.c.detail["message_id"].as_string()


@dataclass(frozen=True)
class _About:
    """A bounce or complaint event naming one of the issue's messages."""

    kind: str  # bounce, complaint
    report: str | None  # the report's id (``smtp:<Message-ID>`` for a refusal at send time)
    at: datetime
    sent_at: datetime | None  # when that message was sent (None: refused at send time)


def _about_its_messages(conn: sa.Connection, issue_id: int) -> list[_About]:
    """The bounces and complaints whose report names a Message-ID of this issue.

    Found through the issue's deliveries, by subscriber (an indexed join), not by scanning
    the audit trail.
    """
    rows = conn.execute(
        sa.select(events.c.kind, _REPORT, events.c.at, deliveries.c.sent_at)
        .join(
            deliveries,
            sa.and_(
                deliveries.c.subscriber_id == events.c.subscriber_id,
                deliveries.c.message_id == _MESSAGE_ID,
            ),
        )
        .where(deliveries.c.issue_id == issue_id, events.c.kind.in_(("bounce", "complaint")))
    ).all()
    return [_About(kind, report, at, sent_at) for kind, report, at, sent_at in rows]


def _suppressions(
    conn: sa.Connection, issue_id: int, made: datetime, reports: set[str]
) -> Suppressions:
    """Recipients of the issue made bounced or complained by one of ``reports`` (the
    bounces and complaints put down to it): a status change is an event naming the report
    that caused it."""
    changed = conn.execute(
        sa.select(events.c.kind, _REPORT)
        .join(deliveries, deliveries.c.subscriber_id == events.c.subscriber_id)
        .where(
            deliveries.c.issue_id == issue_id,
            events.c.kind.in_(("bounced", "complained")),
            events.c.at >= made,
        )
    ).all()
    bounced = sum(1 for kind, report in changed if kind == "bounced" and report in reports)
    complained = sum(1 for kind, report in changed if kind == "complained" and report in reports)
    return Suppressions(bounced, complained)


def _aftermath(
    conn: sa.Connection,
    issue_id: int,
    first: datetime,
    last: datetime,
    about: list[_About],
    now: datetime,
) -> tuple[Aftermath, set[str]]:
    """Unsubscribes and complaints put down to this issue, and the report ids of those
    complaints. A complaint naming one of its messages counts within ``AFTER`` of that
    message; an unsubscribe, or a complaint naming no message, counts for the last issue the
    reader was sent before it, within ``AFTER`` of that send."""
    named = [
        a
        for a in about
        if a.kind == "complaint"
        and a.at <= now
        and (a.sent_at is None or a.at - a.sent_at <= AFTER)
    ]
    complaints = len(named)
    complaint_reports = {a.report for a in named if a.report}
    mine = deliveries.alias("mine")
    later = deliveries.alias("later")
    no_message_id = sa.or_(_MESSAGE_ID.is_(None), _MESSAGE_ID == "")
    rows = conn.execute(
        sa.select(events.c.kind, _REPORT, events.c.at, mine.c.sent_at)
        .join(mine, mine.c.subscriber_id == events.c.subscriber_id)
        .where(
            mine.c.issue_id == issue_id,
            mine.c.sent_at.is_not(None),
            events.c.at >= mine.c.sent_at,
            events.c.at <= min(now, last + AFTER),
            sa.or_(
                sa.and_(
                    events.c.kind == "unsubscribed",
                    events.c.detail["source"].as_string().in_(READER_SOURCES),
                ),
                sa.and_(events.c.kind == "complaint", no_message_id),
            ),
            ~sa.exists().where(
                later.c.subscriber_id == mine.c.subscriber_id,
                later.c.id != mine.c.id,
                later.c.sent_at > mine.c.sent_at,
                later.c.sent_at <= events.c.at,
            ),
        )
    ).all()
    unsubscribes = 0
    for kind, report, at, sent_at in rows:
        if at - sent_at > AFTER:
            continue
        if kind == "unsubscribed":
            unsubscribes += 1
        else:
            complaints += 1
            if report:
                complaint_reports.add(report)
    until = last + AFTER
    hours = int(min(max(now - first, timedelta(0)), AFTER) / timedelta(hours=1))
    aftermath = Aftermath(
        unsubscribes=unsubscribes,
        complaints=complaints,
        since=first,
        until=until,
        hours=hours,
        complete=now >= until,
    )
    return aftermath, complaint_reports
