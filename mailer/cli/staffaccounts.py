"""``mailer staff``: add, list, remove and reset the staff console's accounts
(``mailer.console.accounts``, the functions the console's Staff page calls)."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import click
from rich.table import Table

from mailer.cli.context import Context, by_option, out, pass_ctx, site_time
from mailer.cli.listing import format_option, print_csv, print_json, print_table
from mailer.clock import now
from mailer.db.schema import STAFF_ROLES

COLUMNS = ("email", "role", "password", "password_set_at", "link_expires_at", "created_at")


@click.group("staff")
def group() -> None:
    """Staff console accounts: add, list, remove, reset."""


def _link_lines(ctx: Context, email: str, token: str, expires_at: datetime, what: str) -> None:
    from mailer.console.accounts import link_url

    out.print(f"{what} {email}: one-time link to set a password:", markup=False)
    out.print(link_url(ctx.settings, token), markup=False)
    out.print(f"valid once, until {site_time(ctx.settings, expires_at)}", markup=False)


@group.command("add")
@click.argument("email")
@click.option("--role", type=click.Choice(STAFF_ROLES), required=True, help="editor or admin.")
@by_option("adds the account")
@pass_ctx
def staff_add(ctx: Context, email: str, role: str, by: str) -> None:
    """Add a staff account and print its one-time link (valid 24 hours) to set a password."""
    from mailer.console import accounts

    link = accounts.add(ctx.engine(), email, role, now(), by=by)
    _link_lines(ctx, link.email, link.token, link.expires_at, f"added {role}")


@group.command("list")
@format_option
@pass_ctx
def staff_list(ctx: Context, fmt: str) -> None:
    """List the staff accounts. csv and json carry the columns email, role, password (set,
    link or none) and the times in ISO 8601, the site's time zone."""
    from mailer.console import accounts

    listed = accounts.list_accounts(ctx.engine())
    zone = ZoneInfo(ctx.settings.site.timezone)

    def iso(moment: datetime | None) -> str | None:
        return moment.astimezone(zone).isoformat() if moment is not None else None

    rows = [
        {
            "email": a.email,
            "role": a.role,
            "password": "set" if a.has_password else ("link" if a.link_expires_at else "none"),
            "password_set_at": iso(a.password_set_at),
            "link_expires_at": iso(a.link_expires_at),
            "created_at": iso(a.created_at),
        }
        for a in listed
    ]
    if fmt == "csv":
        print_csv(COLUMNS, rows)
        return
    if fmt == "json":
        print_json(rows)
        return
    if not rows:
        out.print("no staff accounts: mailer staff add EMAIL --role admin makes the first")
        return
    table = Table("email", "role", "password", "since")
    for account, row in zip(listed, rows, strict=True):
        if account.has_password:
            since = f"set {site_time(ctx.settings, account.password_set_at)}"
        elif account.link_expires_at is not None:
            since = f"link until {site_time(ctx.settings, account.link_expires_at)}"
        else:
            since = ""
        table.add_row(account.email, account.role, row["password"], since)
    print_table(table)


@group.command("remove")
@click.argument("email")
@by_option("removes the account")
@pass_ctx
def staff_remove(ctx: Context, email: str, by: str) -> None:
    """Remove a staff account; its sessions end at once (not the last admin)."""
    from mailer.console import accounts

    gone = accounts.remove(ctx.engine(), email, now(), by=by)
    out.print(f"removed {gone.email} ({gone.role}); its sessions have ended", markup=False)


@group.command("reset")
@click.argument("email")
@by_option("resets the account")
@pass_ctx
def staff_reset(ctx: Context, email: str, by: str) -> None:
    """Clear an account's password, end its sessions, and print a new one-time link."""
    from mailer.console import accounts

    link = accounts.reset(ctx.engine(), email, now(), by=by)
    _link_lines(ctx, link.email, link.token, link.expires_at, "reset")
