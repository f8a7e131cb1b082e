"""An issue's report as staff read it: a subject, a text part (what `mailer issues report`
prints) and an HTML table, from the templates ``email/report.txt`` and ``email/report.html``.

The numbers are formatted here (thousands separators, times in the site's zone, widths for
alignment), so the two templates only lay out the same rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from mailer.compose.rendering import Renderer, site_view
from mailer.config.settings import Settings
from mailer.issues.report import AFTER, IssueReport
from mailer.issues.schedule import local_time

# The statuses whose reasons a report lists, in this order, with their headings.
REASON_HEADINGS = (
    ("deferred", "Deferred"),
    ("unknown", "Unknown"),
    ("failed", "Failed"),
    ("bounced", "Bounced"),
)


def render_report(
    report: IssueReport, settings: Settings, *, renderer: Renderer | None = None
) -> tuple[str, str, str]:
    """The report's subject, text and HTML."""
    renderer = renderer or Renderer()
    view = report_view(report)
    context = {"site": site_view(settings), "report": view}
    text = renderer.render("email/report.txt", context)
    html = renderer.render("email/report.html", context)
    return view["subject"], text, html


def report_subject(report: IssueReport) -> str:
    """``[Report] Weekly digest, Fri 11 Dec 2026 07:00 EST: 1,198 sent, 4 bounced, 2 failed``
    (``cancelled, …`` or ``skipped, …`` for an issue that ended so; ``… so far`` before the end)."""
    o = report.outcomes
    counts = f"{o.sent:,} sent, {o.bounced:,} bounced, {o.failed:,} failed"
    if not report.final:
        counts += " so far"
    elif report.status != "sent":
        counts = f"{report.status}, {counts}"
    return f"[Report] {_title(report)}: {counts}"


def report_json(report: IssueReport) -> dict[str, Any]:
    """The report as a JSON object: the dataclass's fields, times in ISO 8601 (UTC)."""
    return {
        **_plain(dataclasses.asdict(report)),
        "failure_percent": round(100 * report.failure_share, 2),
    }


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _title(report: IssueReport) -> str:
    return f"{report.digest_name}, {local_time(report.slot, report.zone)}"


def report_view(report: IssueReport) -> dict[str, Any]:
    """What the templates see: formatted rows and the widths that align them."""
    zone = report.zone
    o = report.outcomes
    status = f"{report.status} ({'final' if report.final else 'not final'})"
    if report.completed_at is not None and report.final:
        status += f", ended {local_time(report.completed_at, zone)}"
    facts = [
        ("Issue", f"{report.issue_id} of {report.digest_name} ({report.digest_key})"),
        ("Slot", local_time(report.slot, zone)),
        ("Subject", report.subject),
        ("Status", status),
        ("Time", _timing(report)),
        ("Suppressed", _suppressed(report)),
        ("Next", _next(report)),
        ("As of", local_time(report.as_of, zone)),
    ]
    retried = f"{report.retried:,} after a retry" if report.retried else ""
    held = f"held: `mailer issues resume {report.issue_id} --resend-unknown`"
    outcomes = [
        ("sent", o.sent, retried),
        ("deferred", o.deferred, "to be tried again" if o.deferred else ""),
        ("bounced", o.bounced, ""),
        ("failed", o.failed, ""),
        ("cancelled", o.cancelled, ""),
        ("unknown", o.unknown, held if o.unknown else ""),
        ("still waiting", o.waiting, ""),
        ("total", o.total, ""),
    ]
    sets = [
        (", ".join(s.names) or "(no topic with articles)", f"{s.recipients:,}", f"{s.sent:,}")
        for s in report.topic_sets
    ]
    reason_blocks = [
        (heading, [(f"{r.count:,}", r.reason) for r in report.reasons[status_key]])
        for status_key, heading in REASON_HEADINGS
        if report.reasons.get(status_key)
    ]
    return {
        "title": _title(report),
        "subject": report_subject(report),
        "facts": facts,
        "facts_width": max(len(label) for label, _ in facts),
        "outcomes": [(label, f"{n:,}", note) for label, n, note in outcomes],
        "outcomes_width": _width(label for label, _n, _note in outcomes),
        "counts_width": _width(f"{n:,}" for _label, n, _note in outcomes),
        "sets": sets,
        "sets_width": _width([name for name, _r, _s in sets] + ["Topic set"]),
        "sets_counts_width": _width(
            [r for _n, r, _s in sets] + [s for _n, _r, s in sets] + ["recipients"]
        ),
        "reasons": reason_blocks,
        "reasons_width": _width(c for _h, rows in reason_blocks for c, _r in rows),
    }


def _width(values: Sequence[str] | Any) -> int:
    return max((len(v) for v in values), default=0)


def _timing(report: IssueReport) -> str:
    if report.first_sent_at is None or report.elapsed_seconds is None:
        return "nothing sent yet" if not report.final else "nothing sent"
    zone = report.zone
    start = local_time(report.first_sent_at, zone)
    if not report.elapsed_seconds:
        return f"all sent at {start}"
    end_at = report.first_sent_at + timedelta(seconds=report.elapsed_seconds)
    line = f"{_duration(report.elapsed_seconds)} from {start} to {local_time(end_at, zone)}"
    if report.rate is not None:
        line += f", {_rate(report.rate)} messages/s"
    return line


def _duration(seconds: float) -> str:
    """``0.04 s``, ``2.5 s``, ``4 min 10 s``, ``3 h 5 min``."""
    if seconds < 1:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s".replace(".0 s", " s")
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours:,} h {minutes} min"


def _rate(rate: float) -> str:
    if rate >= 10:
        return f"{rate:,.0f}"
    if rate >= 1:
        return f"{rate:.1f}"
    return f"{rate:.2g}"


def _suppressed(report: IssueReport) -> str:
    s = report.suppressions
    return f"{s.bounced:,} made bounced, {s.complained:,} made complained by this issue"


def _next(report: IssueReport) -> str:
    """What happened next: final over the whole window, else how far along it is."""
    after = report.aftermath
    if after is None:
        return "nothing sent, nothing to follow"
    counts = f"{_n(after.unsubscribes, 'unsubscribe')}, {_n(after.complaints, 'complaint')}"
    if after.complete:
        return f"in the {AFTER // timedelta(hours=1)} hours after: {counts}"
    return (
        f"so far, {_n(after.hours, 'hour')} after: {counts};"
        f" complete {local_time(after.until, report.zone)}"
    )


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"
