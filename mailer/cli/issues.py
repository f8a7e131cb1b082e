"""``mailer digest`` (send, upcoming; preview and test are in ``staffsend``) and ``mailer
issues`` (list, show, cancel, resume, retry)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from zoneinfo import ZoneInfo

import click
import sqlalchemy as sa
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mailer.cli.context import (
    PROCESSES,
    Context,
    by_option,
    err,
    left_over,
    out,
    pass_ctx,
    signer,
    waiting,
)
from mailer.cli.listing import format_option, print_table
from mailer.cli.review import print_review, review_actions
from mailer.clock import now
from mailer.config.load import with_processes
from mailer.db.schema import WAITING_ISSUE_STATUSES
from mailer.issues import progress
from mailer.issues.review_actions import DECISIONS, last_decision
from mailer.preflight import preflight


@click.group("digest")
def digest_group() -> None:
    """Preview, test or send a digest."""


@digest_group.command("send")
@click.argument("key")
@PROCESSES
@pass_ctx
def digest_send(ctx: Context, key: str, processes: int | None) -> None:
    """Make an issue now (or resume an unfinished one) and deliver it in the foreground."""
    # Imported before the helpers are forked, so they start with every module they need.
    from mailer.compose.rendering import Renderer, digest_templates
    from mailer.delivery.processes import Helpers
    from mailer.delivery.sending import check_issue, issue_report, send_issue
    from mailer.issues.staff import open_issue
    from mailer.staff.reports import queue_reports
    from mailer.staff.rounds import flush_outbox

    settings = with_processes(ctx.settings, processes)
    digest = settings.digest(key)
    sign = signer(settings)  # a bad [dkim] key is reported before anything starts
    preflight(settings, ("secret", "database", "smtp"))  # before the issue, before the helpers
    # The helper processes start before this command opens anything, so they are forked with
    # every module already imported, and get ready while the issue is made.
    helpers = Helpers(settings, fork=True)
    with helpers:
        engine = ctx.engine()
        # The templates compile in a thread while the database makes the issue and its
        # snapshot (the driver lets go of the GIL meanwhile): the first message does not
        # wait for them.
        renderer = Renderer()
        warming = threading.Thread(
            target=renderer.warm, args=(digest_templates(settings),), name="templates"
        )
        warming.start()
        try:
            issue = open_issue(engine, settings, digest, now=now(), renderer=Renderer())
        finally:
            warming.join()
        verb = "created" if issue.created else "resuming"
        out.print(
            f"issue {issue.issue_id} {verb}"
            + (
                f": {issue.articles} articles{left_over(issue.left_over)},"
                f" {issue.recipients} recipients"
                if issue.created
                else ""
            )
        )
        started = time.monotonic()
        with _progress_bar(engine, issue.issue_id) as advance:
            totals = send_issue(
                engine,
                settings,
                issue.issue_id,
                helpers,
                sign,
                on_batch=advance,
                on_wait=waiting,
                renderer=renderer,
            )
    report = issue_report(totals, helpers, time.monotonic() - started)
    out.print(report.summary())
    queue_reports(ctx.engine(), settings, now=now())  # the report mail, once the issue is final
    flush_outbox(ctx.engine(), settings, now=now(), sign=sign)  # reports, alerts meanwhile
    check_issue(ctx.engine(), settings, issue.issue_id, report, at=now())


@digest_group.command("upcoming")
@click.argument("key", required=False)
@click.option("--count", type=click.IntRange(1, 100), default=3, show_default=True)
@format_option
@pass_ctx
def digest_upcoming(ctx: Context, key: str | None, count: int, fmt: str) -> None:
    """Each digest's next slots, and what the next one would take if it were made now."""
    from mailer.cli.upcoming_output import print_csv, print_json, print_tables
    from mailer.issues.upcoming import upcoming

    found = upcoming(ctx.engine(), ctx.settings, now=now(), key=key, count=count)
    zone = ctx.settings.site.timezone
    {"table": print_tables, "csv": print_csv, "json": print_json}[fmt](found, zone)


@contextmanager
def _progress_bar(engine: sa.Engine, issue_id: int) -> Iterator[Callable[[dict[str, int]], None]]:
    """A progress bar on a terminal's standard error over the issue's due deliveries; gives
    the function that advances it by a batch's counts."""
    summary = progress.summarize(engine, issue_id)
    due = (
        summary.counts.get("queued", 0)
        + summary.counts.get("deferred", 0)
        + summary.counts.get("sending", 0)
    )
    with Progress(
        TextColumn("sending"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task("send", total=due)

        def advance(counts: dict[str, int]) -> None:
            bar.advance(task, sum(counts.values()))

        yield advance


@click.group("issues")
def issues_group() -> None:
    """List and inspect issues."""


@issues_group.command("list")
@click.option("--digest", help="Only this digest.")
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True)
@pass_ctx
def issues_list(ctx: Context, digest: str | None, limit: int) -> None:
    """Recent issues with their delivery counts."""
    zone = ctx.settings.site.timezone
    table = Table("id", "digest", "scheduled", "status", "sent", "pending", "subject")
    engine = ctx.engine()
    found = progress.list_issues(engine, digest=digest, limit=limit)
    who = review_actions(engine, [s.id for s in found])
    for s in found:
        pending = (
            s.counts.get("queued", 0) + s.counts.get("deferred", 0) + s.counts.get("sending", 0)
        )
        # An issue made for review says who decided (approved (ana)), until it is released.
        last = last_decision(who.get(s.id, ())) if s.status in DECISIONS else None
        table.add_row(
            str(s.id),
            s.digest,
            f"{s.scheduled_for.astimezone(ZoneInfo(zone)):%Y-%m-%d %H:%M %Z}",
            f"{s.status} ({last.by})" if last else s.status,
            str(s.counts.get("sent", 0)),
            str(pending),
            s.subject,
        )
    print_table(table)


@issues_group.command("show")
@click.argument("issue_id", type=int)
@pass_ctx
def issues_show(ctx: Context, issue_id: int) -> None:
    """One issue: its status, deliveries by status (and by reason for those not sent), and
    when the next retry is due."""
    zone = ctx.settings.site.timezone
    s = progress.summarize(ctx.engine(), issue_id)
    why = progress.reasons(ctx.engine(), issue_id)
    out.print(f"issue {s.id} {s.status}: {s.subject}", markup=False)
    out.print(f"  digest {s.digest}, scheduled {progress.local_time(s.scheduled_for, zone)}")
    if s.note:
        out.print(f"  editor's note (by {s.note_by}):", markup=False)
        for line in s.note.splitlines():
            out.print(f"    {line}".rstrip(), markup=False)
    print_review(ctx, issue_id)
    if not s.total and s.status in (*WAITING_ISSUE_STATUSES, "skipped"):
        return  # no delivery is made before its release
    for status, n in sorted(s.counts.items()):
        out.print(f"  {status:10} {n}")
        for reason, count in why.by_status.get(status, []):
            out.print(f"  {'':10} {count:>{len(str(n))}}  {reason}", markup=False)
    out.print(f"  {'total':10} {s.total}")
    if why.next_retry is not None:
        # Rows waiting with a due time already past are sent as soon as a worker claims them.
        when = why.next_retry
        shown = "due now" if when <= now() else progress.local_time(when, zone)
        out.print(f"  next {'attempt' if shown == 'due now' else 'retry'} {shown}")


@issues_group.command("cancel")
@click.argument("issue_id", type=int)
@pass_ctx
def issues_cancel(ctx: Context, issue_id: int) -> None:
    """Stop an issue that is sending: what has not gone out yet is cancelled.

    Its articles go back to the digest: the next issue takes them (a subscriber who already
    received one from this issue does not get it again).
    """
    count = progress.cancel(ctx.engine(), issue_id, now=now())
    out.print(
        f"issue {issue_id} cancelled; {count} deliveries will not be sent;"
        " its articles go in the digest's next issue"
    )


@issues_group.command("resume")
@click.argument("issue_id", type=int)
@click.option("--resend-unknown", is_flag=True, help="Also re-send deliveries held as unknown.")
@pass_ctx
def issues_resume(ctx: Context, issue_id: int, resend_unknown: bool) -> None:
    """Queue again, due now, what an issue still owes: deliveries cancelled by staff, deferred
    ones, and those that failed because the relay kept refusing; a worker or `mailer digest
    send` sends them."""
    count = progress.resume(ctx.engine(), issue_id, now=now(), resend_unknown=resend_unknown)
    out.print(f"issue {issue_id}: {count} deliveries queued again")


@issues_group.command("retry")
@click.argument("issue_id", type=int)
@by_option("retries it")
@pass_ctx
def issues_retry(ctx: Context, issue_id: int, by: str) -> None:
    """Make the deferred and unknown deliveries of an issue due now (same Message-ID; who was
    sent the issue is not sent it again); a worker or `mailer digest send` sends them."""
    count = progress.retry(ctx.engine(), issue_id, by=by, now=now())
    out.print(f"issue {issue_id}: {count} deliveries due now")
