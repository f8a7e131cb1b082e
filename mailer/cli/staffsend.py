"""``mailer digest preview`` and ``mailer digest test``: the next issue as a reader receives it,
on the screen, in a file, or in staff's own inboxes (``mailer.staff.testsend``)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING

import click
import sqlalchemy as sa

from mailer.cli.context import Context, by_option, left_over, out, pass_ctx, signer
from mailer.clock import now
from mailer.config.settings import Digest, Settings
from mailer.db import audit
from mailer.db.engine import writing
from mailer.delivery.policy import Outcome, SendResult
from mailer.errors import DeliveryError, SubscriberError
from mailer.issues.schedule import local_time
from mailer.preflight import preflight

if TYPE_CHECKING:
    from mailer.compose.rendering import Renderer
    from mailer.staff.testsend import Prepared

AS_OPTION = click.option(
    "--as",
    "as_email",
    metavar="EMAIL",
    help="Show the copy this subscriber gets (default: a reader of the most common topic set).",
)


def describe(settings: Settings, digest: Digest, prepared: Prepared) -> str:
    """``"Weekly digest" (issue of Fri 11 Dec 2026 07:00 EST) as reader@example.org (topics:
    Base alerts, Local events)``: which issue, and whose copy of it."""
    from mailer.issues.sample import topic_names

    issue = prepared.issue
    zone = settings.site.timezone
    when = local_time(issue.slot, zone) if issue.slot else "made now: no slot left"
    made = f"issue {issue.issue_id}, {issue.status}, of" if issue.made else "issue of"
    reader = prepared.reader
    return (
        f'"{digest.name}" ({made} {when}) as {reader.email}'
        f" (topics: {topic_names(settings, reader.shown)})"
    )


@click.command("test")
@click.argument("key")
@click.option(
    "--to",
    "to",
    metavar="ADDR",
    multiple=True,
    required=True,
    help="Send a test copy here (repeatable); only addresses in [staff].emails unless --force.",
)
@AS_OPTION
@click.option("--force", is_flag=True, help="Also send to addresses not in [staff].emails.")
@by_option("sends the test copies")
@pass_ctx
def digest_test(
    ctx: Context, key: str, to: tuple[str, ...], as_email: str | None, force: bool, by: str
) -> None:
    """Send staff the message a subscriber would get from the next issue, marked [TEST] and
    with inert links; never recorded as a delivery. Each copy is an audit event
    (``staff.test_send``: the issue, the address, whose copy, whether the relay took it, who
    sent it), as a test copy sent from the staff console is."""
    from mailer.compose.messages import check_address
    from mailer.compose.rendering import Renderer
    from mailer.compose.testcopy import TEST_PREFIX
    from mailer.staff.testsend import check_staff, prepare, send_test, test_copies

    settings = ctx.settings
    digest = settings.digest(key)
    addresses = list(dict.fromkeys(check_address(a.strip()) for a in to))
    check_staff(settings, addresses, force=force)
    sign = signer(settings)  # a bad [dkim] key is reported before anything is sent
    preflight(settings, ("secret", "database", "smtp"))
    renderer = Renderer()
    at = now()
    prepared = prepare(ctx.engine(), settings, digest, now=at, renderer=renderer, as_email=as_email)
    copies = test_copies(settings, prepared, addresses, now=at, renderer=renderer)
    results = asyncio.run(send_test(settings, copies, sign=sign))
    what = f"test copy of {describe(settings, digest, prepared)}"
    subject = TEST_PREFIX + prepared.issue.content.subject
    refused = 0
    for address, result in zip(addresses, results, strict=True):
        if result.outcome is Outcome.SENT:
            out.print(f"{what} sent to {address}: {subject}", markup=False)
        else:
            refused += 1
            reply = f"{result.code} {result.reply}" if result.code else result.reply
            out.print(f"{what} refused for {address}: {reply}", markup=False)
    # After the lines above: if the database fails now, what was sent has been said.
    record_test_sends(ctx.engine(), prepared, addresses, results, by=by, at=at)
    if refused:
        raise DeliveryError(f"{refused} of {len(addresses)} test copies refused by the relay")


def record_test_sends(
    engine: sa.Engine,
    prepared: Prepared,
    addresses: list[str],
    results: list[SendResult],
    *,
    by: str,
    at: datetime,
) -> None:
    """One ``staff.test_send`` event per copy, with the fields the console records."""
    issue = prepared.issue
    details = [
        (
            None,
            {
                "issue": issue.issue_id if issue.made else None,
                "digest": issue.content.digest_key,
                "to": address,
                "reader": prepared.reader.id,
                "sent": result.outcome is Outcome.SENT,
                "by": by,
            },
        )
        for address, result in zip(addresses, results, strict=True)
    ]
    with writing(engine) as conn:
        audit.record_each(conn, "staff.test_send", at, details)


@click.command("preview")
@click.argument("key")
@AS_OPTION
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path))
@pass_ctx
def digest_preview(ctx: Context, key: str, as_email: str | None, out_dir: Path | None) -> None:
    """Show the next scheduled issue as a subscriber receives it (links inert), or write it
    to DIR as KEY.eml, KEY.html and KEY.txt."""
    from mailer.compose.rendering import Renderer
    from mailer.staff.testsend import prepare, reader_copy

    settings = ctx.settings
    digest = settings.digest(key)
    renderer = Renderer()
    at = now()
    try:
        prepared = prepare(
            ctx.engine(), settings, digest, now=at, renderer=renderer, as_email=as_email
        )
    except SubscriberError as exc:
        if as_email is not None:
            raise
        _web_copy(ctx, digest, out_dir, renderer, reason=str(exc))
        return
    data = reader_copy(
        settings, prepared, to=prepared.reader.email, now=at, renderer=renderer, subject_prefix=""
    )
    msg = message_from_bytes(data, policy=policy.default)
    text, html = _part(msg, "plain"), _part(msg, "html")
    issue = prepared.issue
    shows = f"the next issue of {describe(settings, digest, prepared)}"
    extra = left_over(issue.left_over)
    if out_dir is None:
        out.print(f"{shows}{extra}; its links are inert", markup=False)
        for name in ("From", "To", "Subject"):
            out.print(f"{name}: {msg[name]}", markup=False)
        out.print("", markup=False)
        out.print(text, markup=False)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{key}.eml").write_bytes(data)
    (out_dir / f"{key}.html").write_text(html, encoding="utf-8")
    (out_dir / f"{key}.txt").write_text(text, encoding="utf-8")
    count = len(issue.content.articles)
    out.print(
        f"{shows}: {msg['Subject']!r}, {count} article{'' if count == 1 else 's'}{extra}"
        f" → {out_dir / f'{key}.eml'} (and .html, .txt); its links are inert",
        markup=False,
    )


def _part(msg: EmailMessage, subtype: str) -> str:
    body = msg.get_body(preferencelist=(subtype,))
    if body is None:  # the composer always makes both parts
        raise DeliveryError(f"the message has no text/{subtype} part")
    content: str = body.get_content()
    return content.replace("\r\n", "\n")  # the wire's line ends, not a file's or a screen's


def _web_copy(
    ctx: Context, digest: Digest, out_dir: Path | None, renderer: Renderer, *, reason: str
) -> None:
    """No reader would get the issue: show its web copy (every topic, no personal link)."""
    from mailer.issues.staff import preview_next

    preview = preview_next(ctx.engine(), ctx.settings, digest, now=now(), renderer=renderer)
    out.print(f"{reason}; showing the web copy of the next issue instead", markup=False)
    if out_dir is None:
        out.print(preview.text, markup=False)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{digest.key}.html").write_text(preview.html, encoding="utf-8")
    (out_dir / f"{digest.key}.txt").write_text(preview.text, encoding="utf-8")
    out.print(
        f"{preview.subject!r}: {preview.articles} articles{left_over(preview.left_over)}"
        f" → {out_dir / f'{digest.key}.html'}",
        markup=False,
    )
