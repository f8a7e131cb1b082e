"""``mailer doctor``: what a send will use and why; exit 1 with one line per problem."""

from __future__ import annotations

import sys

import click

from mailer.cli.context import Context, err, out, pass_ctx


@click.command()
@pass_ctx
def doctor(ctx: Context) -> None:
    """Show what `digest send`, `worker` and `run` will use (processes, connections, rate,
    database, DKIM, relay) and why; exit 1 with one line per problem."""
    from mailer.doctor import diagnose

    settings = ctx.settings
    items = diagnose(settings)
    width = max(len(item.label) for item in items)
    out.print(f"{'config'.ljust(width)}  {settings.path or '(none)'}", markup=False)
    for item in items:
        mark = "" if item.problem is None else ": PROBLEM (below)"
        out.print(f"{item.label.ljust(width)}  {item.said}{mark}", markup=False)
    problems = [item.problem for item in items if item.problem is not None]
    for problem in problems:
        err.print(f"error: {problem}", markup=False)
    if problems:
        sys.exit(1)
