"""``mailer issues report ID``: how an issue went (or is going), as the report mail says it."""

from __future__ import annotations

import json

import click

from mailer.cli.context import Context, out, pass_ctx
from mailer.clock import now


@click.command("report")
@click.argument("issue_id", type=int)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
)
@pass_ctx
def issues_report(ctx: Context, issue_id: int, fmt: str) -> None:
    """An issue's report: deliveries by outcome and by topic set, time and rate, the top
    reasons, the suppressions it caused, and the unsubscribes and complaints in the 72 hours
    after it (so far, while they run). Works on an issue still sending."""
    from mailer.issues.report import build_report
    from mailer.issues.report_text import render_report, report_json

    report = build_report(ctx.engine(), ctx.settings, issue_id, now=now())
    if fmt == "json":
        out.print(json.dumps(report_json(report), indent=2), markup=False)
        return
    _subject, text, _html = render_report(report, ctx.settings)
    out.print(text.rstrip("\n"), markup=False)
