"""The staff command line: a thin layer that parses arguments and calls the library.

One module per command group; this one holds the group itself, ``init`` and ``main``.
Exit codes: 0 success, 1 a project error (one line on stderr), 2 bad usage.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from mailer import logs
from mailer.cli import (
    articles,
    bounces,
    devtools,
    dkim,
    doctor,
    issues,
    report,
    review,
    running,
    staffaccounts,
    staffsend,
    subscribers,
)
from mailer.cli.context import Context, err, out, pass_ctx
from mailer.config.load import DEFAULT_CONFIG_NAME
from mailer.db.engine import migrate, safe_url
from mailer.errors import MailerError
from mailer.logs import describe_error, operational_errors

log = logging.getLogger(__name__)


@click.group()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"Config file (default: $MAILER_CONFIG, else ./{DEFAULT_CONFIG_NAME}).",
)
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
@click.version_option(package_name="mailer")
@click.pass_context
def cli(ctx: click.Context, config_path: Path | None, verbose: int) -> None:
    """Camp Lejeune & New River Updates: the newsletter service for staff."""
    logs.configure([logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)])
    path = config_path or Path(os.environ.get("MAILER_CONFIG") or DEFAULT_CONFIG_NAME)
    ctx.obj = Context(path)
    ctx.call_on_close(ctx.obj.close)


@cli.command()
@pass_ctx
def init(ctx: Context) -> None:
    """Create the database, or upgrade it to the newest schema."""
    revision = migrate(ctx.engine(check=False), ctx.settings.digests)
    out.print(f"database ready at revision {revision}: {safe_url(ctx.settings.database.url)}")


for command in (
    subscribers.group,
    articles.group,
    issues.digest_group,
    issues.issues_group,
    running.run,
    running.worker,
    running.web,
    doctor.doctor,
    bounces.group,
    dkim.group,
    devtools.sink,
    devtools.demo,
    staffaccounts.group,
):
    cli.add_command(command)
for command in review.COMMANDS:
    issues.issues_group.add_command(command)
issues.issues_group.add_command(report.issues_report)
issues.digest_group.add_command(staffsend.digest_preview)
issues.digest_group.add_command(staffsend.digest_test)


def main(argv: list[str] | None = None) -> None:
    """Entry point: project and operational errors become one line and exit code 1.

    An operational error (the database, the network, the relay) is not a bug: it gets the
    same one line as a project error; its traceback goes to the log at INFO (``-v``).
    """
    try:
        cli.main(args=argv, prog_name="mailer", standalone_mode=False)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        if not isinstance(exc, (MailerError, *operational_errors())):
            raise  # a bug: its traceback is what a report needs
        log.info("the error below, traced", exc_info=exc)
        err.print(f"error: {describe_error(exc)}", markup=False)
        sys.exit(1)
