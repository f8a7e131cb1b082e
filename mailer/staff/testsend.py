"""Test sends: the message a reader would get from the digest's next issue, sent to staff.

``prepare`` finds the next issue (``issues.nextissue``) and whose copy to show
(``issues.sample``); ``test_copies`` makes one test copy (``compose.testcopy``) for each staff
address and ``send_test`` sends them through ``staff.transport``: the subscribers' relay and
DKIM key, the plain envelope sender, and never the ledger (no delivery row, no event, no
count). ``digest preview`` shows the same copy, addressed to the reader, without sending it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from mailer.compose.rendering import Renderer
from mailer.compose.staffmail import staff_message_id
from mailer.compose.testcopy import TEST_PREFIX, build_test_copy
from mailer.config.settings import Digest, Settings
from mailer.db.engine import reading
from mailer.delivery.policy import SendResult
from mailer.errors import DigestError, MailerError
from mailer.issues.nextissue import NextIssue, next_issue
from mailer.issues.sample import Reader, named_reader, sample_reader
from mailer.staff.transport import Outgoing, send_now


class NotStaffError(MailerError, ValueError):
    """A test copy would go to an address not in ``[staff].emails``; ``addresses`` are those."""

    def __init__(self, addresses: Sequence[str]) -> None:
        self.addresses = tuple(addresses)
        shown = ", ".join(self.addresses)
        verb = "is" if len(self.addresses) == 1 else "are"
        super().__init__(
            f"{shown} {verb} not in [staff].emails: add {'it' if verb == 'is' else 'them'}"
            " there, or pass --force to send a test copy anyway"
        )


@dataclass(frozen=True)
class Prepared:
    """The next issue and the reader whose copy of it is shown."""

    issue: NextIssue
    reader: Reader


def check_staff(settings: Settings, addresses: Sequence[str], *, force: bool) -> None:
    """Refuse any address not in ``[staff].emails`` (compared without case) unless ``force``:
    a test copy carries a reader's variant of the issue, for staff eyes."""
    if force:
        return
    staff = {a.casefold() for a in settings.staff.emails}
    outside = [a for a in addresses if a.casefold() not in staff]
    if outside:
        raise NotStaffError(outside)


def prepare(
    engine: sa.Engine,
    settings: Settings,
    digest: Digest,
    *,
    now: datetime,
    renderer: Renderer,
    as_email: str | None = None,
) -> Prepared:
    """The next issue of ``digest`` and the reader ``as_email`` (default: the reader of the
    most common variant); SubscriberError if that reader would not receive it."""
    with reading(engine) as conn:
        issue = next_issue(
            conn, digest, now=now, render_subject=renderer.render_subject, settings=settings
        )
        if as_email is None:
            reader = sample_reader(conn, settings, digest, issue.content, now=now)
        else:
            reader = named_reader(conn, settings, digest, issue.content, as_email, now=now)
    return Prepared(issue, reader)


def prepare_issue(
    engine: sa.Engine,
    settings: Settings,
    issue_id: int,
    digest_key: str,
    *,
    now: datetime,
    renderer: Renderer,
) -> Prepared:
    """``prepare`` for issue ``issue_id`` of ``digest_key``, which must be the digest's next
    issue (a test copy is of the issue readers get next); DigestError naming it otherwise."""
    digest = settings.find_digest(digest_key)
    if digest is None:
        raise DigestError(
            f"the digest {digest_key} is no longer in the config: it has no next issue to test"
        )
    prepared = prepare(engine, settings, digest, now=now, renderer=renderer)
    if prepared.issue.issue_id != issue_id:
        which = (
            f"issue {prepared.issue.issue_id}" if prepared.issue.made else "an issue not made yet"
        )
        raise DigestError(
            f"a test copy is of the next issue of {digest_key}, which is {which}, not issue"
            f" {issue_id}"
        )
    return prepared


def reader_copy(
    settings: Settings,
    prepared: Prepared,
    *,
    to: str,
    now: datetime,
    renderer: Renderer,
    subject_prefix: str = TEST_PREFIX,
) -> bytes:
    """The reader's message with inert links, addressed to ``to``, under a fresh Message-ID."""
    return build_test_copy(
        settings,
        prepared.issue.content,
        uid=prepared.reader.uid,
        topics=prepared.reader.shown,
        to=to,
        message_id=staff_message_id(settings, "test"),
        now=now,
        renderer=renderer,
        subject_prefix=subject_prefix,
    )


def test_copies(
    settings: Settings,
    prepared: Prepared,
    to: Sequence[str],
    *,
    now: datetime,
    renderer: Renderer,
) -> list[Outgoing]:
    """One test copy for each of ``to`` (checked by ``check_staff`` first), ready to send.
    Rendering is CPU work: an event loop calls this in a thread."""
    return [
        Outgoing(address, reader_copy(settings, prepared, to=address, now=now, renderer=renderer))
        for address in to
    ]


async def send_test(
    settings: Settings,
    copies: Sequence[Outgoing],
    *,
    sign: Callable[[bytes], bytes] | None,
) -> list[SendResult]:
    """Send the test ``copies`` (``test_copies``); the relay's answer for each, in order.
    Nothing is recorded."""
    return await send_now(settings, copies, sign=sign)
