"""``mailer bounces``: apply delivery status notifications and complaints."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import click

from mailer.cli.context import Context, out, pass_ctx
from mailer.clock import now


@click.group("bounces")
def group() -> None:
    """Process bounces (DSN) and complaints (ARF)."""


@group.command("process")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--soft-limit",
    type=click.IntRange(1),
    default=None,
    help="Soft bounces within the window that make a subscriber bounced "
    "(default: [bounces].soft_limit, 3).",
)
@click.option(
    "--soft-window-days",
    type=click.IntRange(1),
    default=None,
    help="The window, in days (default: [bounces].soft_window_days, 30).",
)
@pass_ctx
def bounces_process(
    ctx: Context, path: Path, soft_limit: int | None, soft_window_days: int | None
) -> None:
    """Apply the DSNs (RFC 3464) and ARF complaints (RFC 5965) in a Maildir, mbox or file."""

    from mailer.bounces.apply import process_path

    policy = ctx.settings.bounces
    soft_limit = policy.soft_limit if soft_limit is None else soft_limit
    soft_window_days = policy.soft_window_days if soft_window_days is None else soft_window_days
    summary = process_path(
        ctx.engine(),
        path,
        now=now(),
        soft_limit=soft_limit,
        soft_window=timedelta(days=soft_window_days),
        envelope_from=ctx.settings.envelope_from,
    )
    out.print(str(summary), markup=False)
