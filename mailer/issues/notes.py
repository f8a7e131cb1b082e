"""The editor's note: a few plain-text paragraphs printed at the top of an issue.

Two ways in, both stored in ``issues.note`` / ``issues.note_by`` (migration 0009):

* ``mailer issues note ID TEXT [--by NAME]`` (``--clear`` removes it) while the issue has not
  started sending: in review, approved or held. Once deliveries exist, some readers may have
  the issue already, so the note is refused rather than given to half of them.
* A file ``note-<digest key>.txt`` beside the config file, read when an issue of that digest
  is made. One file per digest, so a note meant for the weekly digest is not taken by an alert
  made a minute earlier. Once the issue holding it is made, the file is renamed to
  ``note-<digest key>.txt.issue-<id>``: the next issue does not repeat it, and the text stays
  on disk beside the config as a record of where it went.

The note is plain text (escaped in the HTML part; blank lines make paragraphs), at most
``NOTE_LIMIT`` characters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from mailer.config.settings import Digest, Settings
from mailer.errors import DigestError
from mailer.text import strip_controls

log = logging.getLogger(__name__)

NOTE_LIMIT = 2000  # a note, not an article: about 300 words


@dataclass(frozen=True)
class Note:
    """A note read from a digest's note file, before the issue holding it is made."""

    text: str
    by: str
    path: Path


def note_path(settings: Settings, digest_key: str) -> Path | None:
    """Where the note file of ``digest_key`` is looked for: beside the config (None without
    a config file, as in tests that build settings in memory)."""
    if settings.path is None:
        return None
    return Path(settings.path).parent / f"note-{digest_key}.txt"


def clean_note(text: str) -> str:
    """``text`` as a note is stored: controls dropped, line ends LF, blank ends stripped.

    DigestError (one line) when it is empty or longer than ``NOTE_LIMIT``.
    """
    cleaned = strip_controls(text).strip()
    if not cleaned:
        raise DigestError("the note is empty (use --clear to remove a note)")
    if len(cleaned) > NOTE_LIMIT:
        raise DigestError(f"the note has {len(cleaned)} characters; at most {NOTE_LIMIT}")
    return cleaned


def waiting_file(settings: Settings, digest: Digest) -> Note | None:
    """The digest's note file if there is one with text in it, else None.

    An unreadable or bad file is logged and left where it is (the issue goes out without the
    note: a note is never worth holding an issue back for); staff see the warning.
    """
    path = note_path(settings, digest.key)
    if path is None or not path.is_file():
        return None
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("note file not used", extra={"path": str(path), "error": str(exc)})
        return None
    if not raw.strip():
        return None  # an empty file: no note this time
    try:
        text = clean_note(raw)
    except DigestError as exc:
        log.warning("note file not used", extra={"path": str(path), "error": str(exc)})
        return None
    return Note(text, f"file {path.name}", path)


def taken(note: Note, issue_id: int) -> None:
    """Rename the note file once issue ``issue_id`` holds its text, so no other issue repeats
    it. A failure is logged: the text is in the issue already."""
    target = note.path.with_name(f"{note.path.name}.issue-{issue_id}")
    try:
        note.path.rename(target)
    except OSError as exc:
        log.warning(
            "note file not renamed: the next issue would repeat it; move it away",
            extra={"path": str(note.path), "error": str(exc)},
        )
    else:
        log.info("note file taken", extra={"issue": issue_id, "path": str(target)})
