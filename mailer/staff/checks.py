"""What staff are alerted of, looked for in the store: each check a function of ``now``.

Each check reads, decides and raises its causes through ``raise_alert`` (at most once an hour
per cause, whichever process sees it). The staff round (mailer.staff.rounds) runs them; the
causes seen where they happen (the relay refusing our login or every connection, a firing
given up) are raised there, with the texts made here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from mailer.config.settings import Digest, Settings
from mailer.db.buckets import below
from mailer.db.engine import reading
from mailer.db.schema import SENDING_ROW, WAITING_ROW, deliveries, events, feed_state, issues
from mailer.issues.schedule import local_time, slots_between
from mailer.staff.alerts import raise_alert

log = logging.getLogger(__name__)

# A slot is missed once its misfire grace and this margin have passed without its issue (a
# firing retried to the end of its grace still needs a moment to commit).
MISSED_MARGIN = timedelta(minutes=2)
# How far back beyond that the check looks: longer than any gap between two runs of it.
MISSED_WINDOW = timedelta(hours=1)
# The bulk-sender limits of Gmail and Yahoo, over 30 days.
RATE_WINDOW = timedelta(days=30)
COMPLAINT_LIMIT = 0.001
HARD_BOUNCE_LIMIT = 0.02
# Below this many messages in the window a rate says nothing (one complaint in 50 is 2 %).
RATE_MIN_MESSAGES = 100


def missed_slot_cause(digest: Digest) -> str:
    """One cause per digest: a service down for hours misses many slots, and staff need one
    mail saying which, not one per slot."""
    return f"missed:{digest.key}"


def alert_missed_slots(
    engine: sa.Engine,
    settings: Settings,
    digest: Digest,
    slots: Sequence[datetime],
    *,
    now: datetime,
) -> bool:
    """Raise the alert for slots of ``digest`` that passed without their issue."""
    zone = settings.site.timezone
    shown = ", ".join(local_time(slot, zone) for slot in slots)
    one = len(slots) == 1
    return raise_alert(
        engine,
        settings,
        cause=missed_slot_cause(digest),
        subject=(
            f"the {digest.name} of {shown} was not made"
            if one
            else f"{len(slots)} issues of the {digest.name} were not made"
        ),
        text=(
            f"{'The slot' if one else 'The slots'} {shown} of the digest {digest.name!r}"
            f" ({digest.key}) passed without {'its issue' if one else 'their issues'}: no"
            " process made it within [scheduler].misfire_grace_seconds"
            f" ({settings.scheduler.misfire_grace_seconds} s). Was `mailer run` running, and"
            " did its log say why the issue failed?\n\n"
            f"To send the digest now: mailer digest send {digest.key}\n"
        ),
        now=now,
    )


def check_missed_slots(engine: sa.Engine, settings: Settings, *, now: datetime) -> int:
    """Alert, per digest, the slots of the last hour beyond their misfire grace that have no
    issue; returns how many digests were alerted.

    Only slots after the first issue this database ever made count: before it the service
    was not running yet (a new installation, a restored database), and there is nothing
    staff could have expected.
    """
    end = now - timedelta(seconds=settings.scheduler.misfire_grace_seconds) - MISSED_MARGIN
    with reading(engine) as conn:
        first = conn.execute(sa.select(sa.func.min(issues.c.created_at))).scalar_one_or_none()
    if first is None:
        return 0
    start = max(end - MISSED_WINDOW, first)
    raised = 0
    for digest in settings.digests:
        slots = slots_between(digest, start, end)
        if not slots:
            continue
        with reading(engine) as conn:
            made = set(
                conn.scalars(
                    sa.select(issues.c.scheduled_for).where(
                        issues.c.digest == digest.key,
                        issues.c.scheduled_for > start,
                        issues.c.scheduled_for <= end,
                    )
                )
            )
        missed = [slot for slot in slots if slot not in made]
        if missed and alert_missed_slots(engine, settings, digest, missed, now=now):
            raised += 1
    return raised


def check_arrivals(engine: sa.Engine, settings: Settings, *, now: datetime) -> int:
    """Alert, per arrival digest, articles of its topics that no issue took ``arrival.LATE``
    after their issue was due and they were published (an arrival digest has no slots to
    miss: this is its missed-slot check); returns how many digests were alerted.

    The round runs only in a service, so a store filled while no service ran is not alerted
    until one runs, and then only if that service does not make the issue either.
    """
    from mailer.issues import arrival  # the issue-making side: only where the round runs

    raised = 0
    for digest in settings.digests:
        if not digest.on_arrival:
            continue
        with reading(engine) as conn:
            found = arrival.waiting(conn, digest, now)
            # Waiting already ``LATE`` ago, and due by then: an article stored ahead of its
            # publication date counts from that date, not from its arrival.
            then = now - arrival.LATE
            before = arrival.waiting(conn, digest, then) if found is not None else None
        if found is None or before is None or before.due > then:
            continue
        zone = settings.site.timezone
        late = int((now - found.first).total_seconds() // 60)
        if raise_alert(
            engine,
            settings,
            cause=f"arrival:{digest.key}",
            subject=f"the {digest.name} has not sent what arrived {late} minutes ago",
            text=(
                f"An article of the digest {digest.name!r} ({digest.key}) arrived at"
                f" {local_time(found.first, zone)} and no issue has taken it: its issue was"
                f' due at {local_time(found.due, zone)} (trigger = "arrival",'
                f" debounce_seconds = {digest.debounce_seconds}). Does the log of"
                " `mailer run` say why the issue failed?\n\n"
                f"To send the digest now: mailer digest send {digest.key}\n"
            ),
            now=now,
        ):
            raised += 1
    return raised


@dataclass(frozen=True)
class Stall:
    """A sending issue with deliveries due and none of its deliveries touched since ``since``."""

    issue_id: int
    digest: str
    slot: datetime
    waiting: int  # queued, deferred or in flight
    since: datetime  # its deliveries' latest change


def find_stalls(engine: sa.Engine, settings: Settings, *, now: datetime) -> list[Stall]:
    """Sending issues whose deliveries have been due (or whose leases ran out) for
    ``[staff].stall_minutes`` with none of them changed in that time.

    Per sending issue, cheapest first, each on the partial indexes of waiting and in-flight
    rows: a lease that was live within the span means a worker had it (claims and heartbeats
    write ``updated_at``); no row overdue means nothing waits. Only an issue left after both
    has its rows' latest change read, which scans the issue.
    """
    cut = now - timedelta(minutes=settings.staff.stall_minutes)
    remaining = sa.or_(WAITING_ROW, SENDING_ROW)
    lease_gone = sa.or_(
        deliveries.c.lease_expires_at.is_(None), deliveries.c.lease_expires_at <= cut
    )
    overdue = sa.or_(
        sa.and_(WAITING_ROW, deliveries.c.next_attempt_at <= cut, lease_gone),
        sa.and_(SENDING_ROW, deliveries.c.lease_expires_at <= cut),
    )
    stalls = []
    with reading(engine) as conn:
        sending = conn.execute(
            sa.select(issues.c.id, issues.c.digest, issues.c.scheduled_for).where(
                issues.c.status == "sending"
            )
        ).all()
        for issue_id, digest, slot in sending:
            of_issue = deliveries.c.issue_id == issue_id
            held = sa.select(deliveries.c.id).where(
                of_issue, remaining, deliveries.c.lease_expires_at > cut
            )
            due = sa.select(deliveries.c.id).where(of_issue, overdue)
            if conn.scalar(held.limit(1)) is not None or conn.scalar(due.limit(1)) is None:
                continue
            latest, waiting = conn.execute(
                sa.select(
                    sa.func.max(deliveries.c.updated_at), sa.func.count().filter(remaining)
                ).where(of_issue)
            ).one()
            if latest is not None and latest <= cut:
                stalls.append(Stall(int(issue_id), digest, slot, int(waiting), latest))
    return stalls


def check_stalls(engine: sa.Engine, settings: Settings, *, now: datetime) -> int:
    """Alert each stalled issue (``find_stalls``); returns how many were raised."""
    zone = settings.site.timezone
    raised = 0
    for stall in find_stalls(engine, settings, now=now):
        since = local_time(stall.since, zone)
        minutes = int((now - stall.since).total_seconds() // 60)
        if raise_alert(
            engine,
            settings,
            cause=f"stall:issue:{stall.issue_id}",
            subject=f"issue {stall.issue_id} has stalled: {stall.waiting} deliveries waiting",
            text=(
                f"Issue {stall.issue_id} ({stall.digest}, slot {local_time(stall.slot, zone)})"
                f" has {stall.waiting} deliveries waiting, due, and none of its deliveries has"
                f" changed since {since} ({minutes} minutes; [staff].stall_minutes ="
                f" {settings.staff.stall_minutes:g}).\n\n"
                "Is a delivery worker running? `mailer run` includes one; else start one with"
                " `mailer worker`.\n"
                f"What is left and why: mailer issues show {stall.issue_id}\n"
            ),
            now=now,
        ):
            raised += 1
    return raised


def check_feeds(engine: sa.Engine, settings: Settings, *, now: datetime) -> int:
    """Alert each configured feed that failed ``[staff].feed_failures`` fetches in a row."""
    urls = [s.url for s in settings.sources if s.type == "feed" and s.url]
    if not urls:
        return 0
    limit = settings.staff.feed_failures
    with reading(engine) as conn:
        failing = conn.execute(
            sa.select(
                feed_state.c.url,
                feed_state.c.consecutive_failures,
                feed_state.c.last_error,
                feed_state.c.last_success_at,
            ).where(feed_state.c.url.in_(urls), feed_state.c.consecutive_failures >= limit)
        ).all()
    zone = settings.site.timezone
    raised = 0
    for url, failures, error, success in failing:
        last_ok = "never" if success is None else local_time(success, zone)
        if raise_alert(
            engine,
            settings,
            cause=f"feed:{url}",
            subject=f"the feed {url} failed {failures} times in a row",
            text=(
                f"The feed {url} failed its last {failures} fetches"
                f" ([staff].feed_failures = {limit}); its articles are not coming in.\n"
                f"Last error: {error or 'unknown'}\n"
                f"Last fetched successfully: {last_ok}\n\n"
                "See every source's state: mailer articles sources\n"
                "Try it again now: mailer articles fetch\n"
            ),
            now=now,
        ):
            raised += 1
    return raised


@dataclass(frozen=True)
class Rates:
    """The last 30 days of sending as the bulk-sender limits count it.

    ``accepted``: deliveries the relay accepted (their ``sent_at`` in the window, including
    those a DSN bounced later); ``attempted``: those plus the deliveries the relay refused with
    a 5xx at send time (bounced, no ``sent_at``, refused in the window). ``complaints``:
    complaint events (feedback-loop reports) in the window; ``hard_bounces``: bounce events of
    type hard in the window, from a DSN or a 5xx at send time (policy refusals, 5.7.x, are
    "blocked", not hard: the address is fine).
    """

    accepted: int
    attempted: int
    complaints: int
    hard_bounces: int

    @property
    def complaint_rate(self) -> float:
        return self.complaints / self.accepted if self.accepted else 0.0

    @property
    def hard_bounce_rate(self) -> float:
        return self.hard_bounces / self.attempted if self.attempted else 0.0


def _accepted(since: datetime, until: datetime) -> sa.ColumnElement[bool]:
    """Deliveries the relay accepted in [since, until]."""
    return sa.and_(deliveries.c.sent_at >= since, deliveries.c.sent_at <= until)


def _refused(since: datetime, until: datetime) -> sa.ColumnElement[bool]:
    """Deliveries the relay refused with a 5xx at send time in [since, until]."""
    return sa.and_(
        deliveries.c.status == "bounced",
        deliveries.c.sent_at.is_(None),
        deliveries.c.updated_at >= since,
        deliveries.c.updated_at <= until,
    )


HARD_BOUNCE = sa.and_(events.c.kind == "bounce", events.c.detail["type"].as_string() == "hard")


def measure_rates(engine: sa.Engine, *, now: datetime) -> Rates:
    """``Rates`` over the 30 days before ``now``."""
    since = now - RATE_WINDOW
    accepted, refused = _accepted(since, now), _refused(since, now)
    with reading(engine) as conn:
        sent, tried = conn.execute(
            sa.select(
                sa.func.count().filter(accepted), sa.func.count().filter(sa.or_(accepted, refused))
            ).where(sa.or_(accepted, refused))
        ).one()
        complaints, hard_bounces = conn.execute(
            sa.select(
                sa.func.count().filter(events.c.kind == "complaint"),
                sa.func.count().filter(HARD_BOUNCE),
            ).where(
                events.c.at >= since,
                events.c.at <= now,
                events.c.kind.in_(("complaint", "bounce")),
            )
        ).one()
    return Rates(int(sent), int(tried), int(complaints), int(hard_bounces))


def measure_rates_at(engine: sa.Engine, moments: Sequence[datetime]) -> list[Rates]:
    """``measure_rates`` at each of ``moments``, in their order: what the check would have
    measured then (the console draws it day by day).

    Two queries whatever the number of moments, each reading the span of all the windows
    once: a row's timestamp is placed among the windows' ends and starts
    (``mailer.db.buckets``), the rows are counted by place, and each window adds up the
    places inside it (a row at ``t`` is in the window of ``m`` when m - 30 days <= t <= m).
    For one moment ``measure_rates`` is cheaper.
    """
    if not moments:
        return []
    ends = sorted(set(moments))
    starts = [end - RATE_WINDOW for end in ends]
    first, last = starts[0], ends[-1]
    accepted, refused = _accepted(first, last), _refused(first, last)
    hard = HARD_BOUNCE
    # Sent: when the relay accepted it; refused at send time: when it was refused.
    sent_or_refused = sa.func.coalesce(deliveries.c.sent_at, deliveries.c.updated_at)
    sending = _placed(
        sent_or_refused,
        ends,
        starts,
        sa.case((deliveries.c.sent_at.is_not(None), 1), else_=0),
        sa.literal(1),
        where=sa.or_(accepted, refused),
    )
    reports = _placed(
        events.c.at,
        ends,
        starts,
        sa.case((events.c.kind == "complaint", 1), else_=0),
        sa.case((hard, 1), else_=0),
        where=sa.and_(
            events.c.at >= first,
            events.c.at <= last,
            sa.or_(events.c.kind == "complaint", hard),
        ),
    )
    with reading(engine) as conn:
        sent, tried = _windows(conn, sending, len(ends))
        complaints, hard_bounces = _windows(conn, reports, len(ends))
    found = {
        end: Rates(sent[i], tried[i], complaints[i], hard_bounces[i]) for i, end in enumerate(ends)
    }
    return [found[moment] for moment in moments]


def _placed(
    at: sa.ColumnElement[datetime],
    ends: Sequence[datetime],
    starts: Sequence[datetime],
    *counted: sa.ColumnElement[int],
    where: sa.ColumnElement[bool],
) -> sa.Select[Any]:
    """Per place of ``at`` among the windows (the first window whose end is not before it,
    and the first whose start is after it), the sums of ``counted``."""
    rows = sa.select(
        below(at, ends).label("first"),
        below(at, starts, or_at=True).label("past"),
        *(value.label(f"v{i}") for i, value in enumerate(counted)),
    ).where(where)
    placed = rows.subquery()
    return sa.select(
        placed.c.first,
        placed.c.past,
        *(sa.func.sum(placed.c[f"v{i}"]) for i in range(len(counted))),
    ).group_by(placed.c.first, placed.c.past)


def _windows(conn: sa.Connection, query: sa.Select[Any], n: int) -> list[list[int]]:
    """The sums of ``_placed`` added up per window: one list per counted value."""
    totals: list[list[int]] = []
    for first, past, *sums in conn.execute(query):
        while len(totals) < len(sums):
            totals.append([0] * n)
        for window in range(first, past):
            for i, value in enumerate(sums):
                totals[i][window] += int(value or 0)
    return totals or [[0] * n, [0] * n]


def check_rates(engine: sa.Engine, settings: Settings, *, now: datetime) -> int:
    """Alert a complaint rate above 0.1 % or a hard-bounce rate above 2 % over 30 days."""
    rates = measure_rates(engine, now=now)
    raised = 0
    if rates.attempted < RATE_MIN_MESSAGES:
        return 0
    advice = (
        "Gmail and Yahoo throttle or refuse bulk mail from senders above it. Look at the"
        " recent issues' reports (`mailer issues list`, `mailer issues report ID`)."
    )
    if rates.complaint_rate > COMPLAINT_LIMIT and raise_alert(
        engine,
        settings,
        cause="rate:complaints",
        subject=f"complaint rate {rates.complaint_rate:.2%} over 30 days (limit 0.1 %)",
        text=(
            f"{rates.complaints} spam complaints for {rates.accepted} messages accepted by the"
            f" relay in the last 30 days: {rates.complaint_rate:.2%}, above the 0.1 % limit.\n"
            f"{advice} Make sure every issue is what its subscribers signed up for, and that"
            " unsubscribing is easy to find.\n"
        ),
        now=now,
    ):
        raised += 1
    if rates.hard_bounce_rate > HARD_BOUNCE_LIMIT and raise_alert(
        engine,
        settings,
        cause="rate:bounces",
        subject=f"hard-bounce rate {rates.hard_bounce_rate:.2%} over 30 days (limit 2 %)",
        text=(
            f"{rates.hard_bounces} hard bounces for {rates.attempted} messages sent in the last"
            f" 30 days: {rates.hard_bounce_rate:.2%}, above the 2 % limit.\n"
            f"{advice} An imported list with old addresses is the usual cause.\n"
        ),
        now=now,
    ):
        raised += 1
    return raised


def relay_auth_alert(engine: sa.Engine, settings: Settings, error: str, *, now: datetime) -> bool:
    """The relay refused our login: nothing goes out until the config is fixed."""
    where = f"{settings.smtp.host}:{settings.smtp.port}"
    return raise_alert(
        engine,
        settings,
        cause="relay:auth",
        subject=f"the SMTP relay {where} refuses our login",
        text=(
            f"{error}\n\nNo mail goes out until it is fixed; deliveries wait in the queue."
            " Fix [smtp].username or the password in the variable [smtp].password_env names,"
            " then start the service again (`mailer run` or `mailer worker`).\n"
        ),
        now=now,
    )


def web_stopped_alert(engine: sa.Engine, settings: Settings, reason: str, *, now: datetime) -> bool:
    """The web app of a running service stopped: sign-up and every link in the mail are down."""
    where = f"{settings.web.host}:{settings.web.port}"
    return raise_alert(
        engine,
        settings,
        cause="web:stopped",
        subject=f"the web app on {where} stopped: {reason}",
        text=(
            f"The web app of `mailer run` on {where} stopped while the service ran: {reason}\n\n"
            "The sign-up page, confirmation, preferences and unsubscribe links were down, so the"
            " service stopped too. Start it again once the cause is fixed; deliveries resume"
            " where they stopped.\n"
        ),
        now=now,
    )


def relay_down_alert(engine: sa.Engine, settings: Settings, reason: str, *, now: datetime) -> bool:
    """The relay refuses every connection: deliveries are deferred until it answers."""
    where = f"{settings.smtp.host}:{settings.smtp.port}"
    return raise_alert(
        engine,
        settings,
        cause="relay:down",
        subject=f"the SMTP relay {where} is unreachable",
        text=(
            f"Connecting to the SMTP relay {where} failed: {reason}\n\n"
            "Deliveries are deferred and retried until it answers (this mail waited for it"
            " too). Check that the relay runs and [smtp].host, port and security.\n"
        ),
        now=now,
    )
