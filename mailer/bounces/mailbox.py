"""Reading the mailbox bounces and complaints arrive in: a Maildir, an mbox, or one message."""

from __future__ import annotations

import logging
import mailbox
from collections.abc import Iterator
from pathlib import Path

from mailer.errors import MailerError

log = logging.getLogger(__name__)


class MailboxError(MailerError, OSError):
    """A mailbox path cannot be read; ``path`` names it."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def read_mailbox(path: Path) -> Iterator[bytes]:
    """Every message in a Maildir (``cur/`` and ``new/``), an mbox file, or one message file.

    A file that does not start with an mbox ``From `` line is read as a single message. The
    mailbox is only read: nothing is moved, flagged or deleted (reprocessing is harmless).
    Raises ``MailboxError`` naming the path when it cannot be read.
    """
    path = Path(path)
    if path.is_dir():
        if not ((path / "cur").is_dir() or (path / "new").is_dir()):
            raise MailboxError(path, "is a directory but not a Maildir (no cur/ or new/)")
        yield from _read_maildir(path)
        return
    try:
        with path.open("rb") as file:
            head = file.read(5)
    except OSError as exc:
        raise MailboxError(path, f"cannot be read: {exc.strerror}") from exc
    if head == b"From ":
        yield from _read_mbox(path)
        return
    try:
        yield path.read_bytes()
    except OSError as exc:
        raise MailboxError(path, f"cannot be read: {exc.strerror}") from exc


def _read_maildir(path: Path) -> Iterator[bytes]:
    box = mailbox.Maildir(path, factory=None, create=False)
    try:
        keys = sorted(box.iterkeys())
    except OSError as exc:
        raise MailboxError(path, f"cannot be listed: {exc.strerror}") from exc
    for key in keys:
        if key.startswith("."):
            continue  # not a message: the Maildir convention for editors' and tools' files
        try:
            yield box.get_bytes(key)
        except KeyError:
            # Moved or deleted by a mail client since the listing: not ours to process now.
            log.info("message %s left %s while it was read", key, path)
        except OSError as exc:
            raise MailboxError(path, f"message {key} cannot be read: {exc.strerror}") from exc


def _read_mbox(path: Path) -> Iterator[bytes]:
    box = mailbox.mbox(path, factory=None, create=False)
    try:
        keys = list(box.iterkeys())
        for key in keys:
            yield box.get_bytes(key)
    except OSError as exc:
        raise MailboxError(path, f"cannot be read: {exc.strerror}") from exc
    finally:
        box.close()
