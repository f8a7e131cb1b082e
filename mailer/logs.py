"""Logging: one line per event, with the structured fields (``extra=``) as key=value pairs; and
one line for an error (``describe_error``), for the CLI and for the log alike."""

from __future__ import annotations

import logging
import sys
import time

import sqlalchemy as sa

from mailer.errors import MailerError

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class KeyValueFormatter(logging.Formatter):
    """Log lines as text followed by the record's extra fields as sorted ``key=value`` pairs."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """The machine's local time with its zone's name, so that a log line's time is not
        taken for the site's (every other time shown to staff names its zone)."""
        zone = time.strftime("%Z", self.converter(record.created))
        return f"{super().formatTime(record, datefmt)} {zone}"

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in sorted(fields.items()))
        return line


def configure(level: int) -> None:
    """Send every log record at ``level`` and above to standard error, one line each."""
    handler = logging.StreamHandler()
    handler.setFormatter(KeyValueFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The scheduler says "Running job" and "executed successfully" for every run of every
    # job: with the staff round every few seconds that drowns the log at -v. Our own jobs log
    # what they did; the scheduler's words stay for -vv (and its warnings and errors always).
    quiet = logging.DEBUG if level <= logging.DEBUG else logging.WARNING
    logging.getLogger("apscheduler.executors").setLevel(quiet)


def operational_errors() -> tuple[type[Exception], ...]:
    """What is not the program's fault but its surroundings': the database (beyond what
    mailer.db turns into DatabaseUnavailable), the network and the file system, the SMTP relay
    (aiosmtplib's errors only where it was loaded: importing it costs every command time)."""
    found: tuple[type[Exception], ...] = (sa.exc.DBAPIError, OSError)
    smtp = sys.modules.get("aiosmtplib")
    return found if smtp is None else (*found, smtp.SMTPException)


def describe_error(exc: BaseException) -> str:
    """One line for an error: what failed and the words of whoever refused."""
    if isinstance(exc, MailerError):
        return str(exc)
    if isinstance(exc, sa.exc.DBAPIError):
        words = str(exc.orig).strip().splitlines()
        return f"the database refused the operation: {words[0] if words else type(exc.orig)}"
    smtp = sys.modules.get("aiosmtplib")
    if smtp is not None and isinstance(exc, smtp.SMTPException):
        return f"the SMTP relay failed: {' '.join(str(exc.message).split())}"
    if isinstance(exc, OSError):
        what = f"{exc.filename}: " if exc.filename else ""
        return f"{what}{exc.strerror or exc}"
    return str(exc)
