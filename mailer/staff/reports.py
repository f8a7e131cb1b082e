"""The report mail when an issue ends, and the alert when too much of it failed.

``queue_reports`` finds every issue in a final state whose report was not queued yet, claims
it (``reported_at``, in one statement, so two processes never both report it) and queues the
report mail in that same transaction. An issue that ended with more than
``[staff].failure_percent`` failed or bounced then raises an alert. It is a function of
``now`` for the staff round (``reports_round``), and ``digest send`` calls it when its issue is
done.

An empty issue is never reported: an alert digest makes one every few minutes, and "nothing
to send" is not news. Migration 0008 marked the issues that ended before it as reported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

import sqlalchemy as sa

from mailer.compose.rendering import Renderer
from mailer.config.settings import Settings
from mailer.db.engine import reading, writing
from mailer.db.schema import issues
from mailer.errors import DatabaseUnavailable
from mailer.issues.report import IssueReport, build_report
from mailer.issues.report_text import render_report
from mailer.issues.schedule import local_time
from mailer.logs import describe_error
from mailer.staff.alerts import raise_alert
from mailer.staff.outbox import enqueue
from mailer.text import one_line

log = logging.getLogger(__name__)

# Final states that get a report (not "empty").
REPORTED = ("sent", "cancelled", "skipped")


def queue_reports(engine: sa.Engine, settings: Settings, *, now: datetime) -> list[int]:
    """Queue the report of every final issue not reported yet; returns their ids.

    Each report is built before its claim (reads only, so SQLite's write lock is held just
    for the claim and the insert); a process that loses the claim to another drops its copy.
    """
    with reading(engine) as conn:
        due = list(
            conn.scalars(
                sa.select(issues.c.id)
                .where(issues.c.status.in_(REPORTED), issues.c.reported_at.is_(None))
                .order_by(issues.c.id)
            )
        )
    if not due:
        return []  # the common case, every round: no template environment built for nothing
    renderer = Renderer()
    queued = []
    for issue_id in due:
        try:
            report = build_report(engine, settings, issue_id, now=now)
            subject, text, html = render_report(report, settings, renderer=renderer)
        except (sa.exc.OperationalError, DatabaseUnavailable):
            raise  # the database: every report would fail; the round logs it once
        except Exception as exc:
            # One issue's report (a template, a bug) must not hold back the others'; it is
            # tried again every round and alerted once an hour.
            _alert_unreported(engine, settings, issue_id, exc, now=now)
            continue
        with writing(engine) as conn:
            claimed = conn.execute(
                issues.update()
                .where(issues.c.id == issue_id, issues.c.reported_at.is_(None))
                .values(reported_at=now)
            ).rowcount
            if not claimed:
                continue
            enqueue(
                conn,
                kind="report",
                cause=f"report:{issue_id}",
                to=settings.staff.emails,
                subject=subject,
                text=text,
                html=html,
                now=now,
            )
        log.info("issue reported", extra={"issue": issue_id, "subject": subject})
        queued.append(issue_id)
        check_failures(engine, settings, report, now=now)
    return queued


def _alert_unreported(
    engine: sa.Engine, settings: Settings, issue_id: int, exc: Exception, *, now: datetime
) -> None:
    reason = one_line(describe_error(exc)) or type(exc).__name__
    raise_alert(
        engine,
        settings,
        cause=f"report-failed:issue:{issue_id}",
        subject=f"the report of issue {issue_id} cannot be made: {reason}",
        text=(
            f"The report of issue {issue_id} failed: {reason}\n\n"
            "It is tried again every round; the other issues' reports go out meanwhile."
            f" Run `mailer -v issues report {issue_id}` to see the error in full.\n"
        ),
        now=now,
    )


def reports_round(engine: sa.Engine, settings: Settings) -> Callable[[datetime], list[int]]:
    """``queue_reports`` on this engine and config, as a function of ``now`` (for a round)."""

    def run(now: datetime) -> list[int]:
        return queue_reports(engine, settings, now=now)

    return run


def check_failures(
    engine: sa.Engine, settings: Settings, report: IssueReport, *, now: datetime
) -> bool:
    """Raise the ``failures:issue:<id>`` alert when failed and bounced deliveries are more than
    ``[staff].failure_percent`` percent of the issue's; True if raised."""
    o = report.outcomes
    share = 100 * report.failure_share
    limit = settings.staff.failure_percent
    if not o.total or share <= limit:
        return False
    when = local_time(report.slot, report.zone)
    subject = (
        f"issue {report.issue_id} ({report.digest_name}, {when}) ended with {share:.1f} %"
        f" failed or bounced (over {limit:g} %)"
    )
    lines = [
        f"Issue {report.issue_id} of {report.digest_name} ({when}) ended {report.status}:",
        f"{o.failed:,} failed and {o.bounced:,} bounced of {o.total:,} deliveries"
        f" ({share:.1f} %; [staff].failure_percent = {limit:g}); {o.sent:,} sent.",
    ]
    for status in ("failed", "bounced"):
        if report.reasons.get(status):
            lines += ["", f"Top {status} reasons:"]
            lines += [f"  {r.count:>7,}  {r.reason}" for r in report.reasons[status]]
    lines += [
        "",
        f"`mailer issues report {report.issue_id}` shows the whole report;"
        f" `mailer issues resume {report.issue_id}` queues again what failed because the"
        " relay kept refusing.",
    ]
    return raise_alert(
        engine,
        settings,
        cause=f"failures:issue:{report.issue_id}",
        subject=subject,
        text="\n".join(lines) + "\n",
        now=now,
    )
