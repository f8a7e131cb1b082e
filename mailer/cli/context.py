"""What every command shares: the config path loaded on first use, the consoles, and the
few lines that several commands print alike."""

from __future__ import annotations

import getpass
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click
import sqlalchemy as sa
from rich.console import Console

from mailer.config.load import load_settings
from mailer.config.settings import Settings
from mailer.db.engine import check_schema, create_engine
from mailer.issues.progress import local_time

if TYPE_CHECKING:
    from mailer.delivery.ledger import Holding

# soft_wrap: a long line (an error naming a path) stays one line, as scripts expect.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass
class Context:
    """What every command gets: the config path, loaded and connected on first use."""

    config_path: Path
    _settings: Settings | None = None
    _engine: sa.Engine | None = field(default=None, repr=False)

    @property
    def settings(self) -> Settings:
        """The config, loaded (and validated) the first time a command asks."""
        if self._settings is None:
            self._settings = load_settings(self.config_path)
        return self._settings

    def engine(self, *, check: bool = True) -> sa.Engine:
        """The database engine; ``check``: first make sure the schema is the newest."""
        if self._engine is None:
            self._engine = create_engine(self.settings.database.url)
            if check:
                check_schema(self._engine)
        return self._engine

    def close(self) -> None:
        """Dispose of the engine, if one was made."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


pass_ctx = click.make_pass_decorator(Context)


def signer(settings: Settings) -> Callable[[bytes], bytes] | None:
    """The DKIM signing function for ``[dkim]``, or None; a bad key fails here, at start-up."""
    from mailer.compose.dkim import signer_for

    return signer_for(settings)


PROCESSES = click.option(
    "--processes",
    type=click.IntRange(1, 64),
    help="Sending processes, each with [smtp].connections connections (default: [smtp].processes).",
)


def site_time(settings: Settings, moment: datetime | None) -> str:
    """A time as staff read it: in the site's time zone, with the zone's name."""
    return "-" if moment is None else local_time(moment, settings.site.timezone)


def left_over(count: int) -> str:
    """What max_articles leaves for the issue after, said where the issue's count is shown."""
    return f" ({count} more wait for the next issue: max_articles)" if count else ""


def waiting(holdings: Sequence[Holding], at: datetime) -> None:
    """What a drain prints while other workers hold the deliveries it waits for (the drain
    tells it when the holders change, else once per heartbeat interval)."""
    for holding in holdings:
        err.print(f"waiting for {holding.describe(at)}", markup=False)


def web_line(settings: Settings, sock: socket.socket) -> str:
    """Where the web app listens, and the public address its links use."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    line = f"web app on http://{shown}:{port}/ (public address {settings.site.base_url}/)"
    staff = settings.staff_web
    if staff.separate:
        staff_host = f"[{staff.host}]" if staff.host and ":" in staff.host else staff.host
        # The listener speaks plain HTTP; staff open the console at its base_url (the TLS
        # proxy's https:// address, or this machine's own).
        address = (staff.base_url or settings.site.base_url).rstrip("/")
        line += (
            f"; staff console on http://{staff_host}:{staff.port}/staff/"
            f" (staff open {address}/staff/)"
        )
    return line


def started(line: str) -> None:
    """The one start-up line, out at once even when standard output is a file or a pipe."""
    out.print(line, markup=False)
    sys.stdout.flush()


def _os_user() -> str:
    try:
        return getpass.getuser()
    except OSError:  # no login name anywhere (a container without USER): still recorded
        return "staff"


def by_option(what: str) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """``--by NAME``: who does ``what`` (recorded), the OS user unless given. One option for
    every command that records a person, so they all record the same name."""
    return click.option(
        "--by", default=_os_user, show_default="the OS user", help=f"Who {what} (recorded)."
    )
