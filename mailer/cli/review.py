"""``mailer issues approve|hold|skip ID`` and ``mailer issues drop-article ID ARTICLE_ID``:
staff acting on an issue made for review (``mailer.issues.review``), each recorded with who
(``--by``, default the OS user) and when, each answered by one line saying what happens next.
"""

from __future__ import annotations

import sys
from datetime import datetime

import click
import sqlalchemy as sa

from mailer.cli.context import Context, by_option, out, pass_ctx
from mailer.clock import now
from mailer.db.schema import WAITING_ISSUE_STATUSES
from mailer.issues.review import Outcome
from mailer.issues.review_actions import Action
from mailer.issues.schedule import local_time

BY = by_option("acts")


def _readers(n: int, *, about: bool) -> str:
    return f"{'about ' if about else ''}{n:,} reader{'s' if n != 1 else ''}"


def approved_line(outcome: Outcome, by: str, zone: str, at: datetime) -> str:
    """What happens to an issue approved at ``at``."""
    head = f"issue {outcome.issue_id} approved by {by}"
    if outcome.status == "empty":
        return f"{head}: its slot has passed and nobody would receive it now; it is empty"
    going = outcome.goes_out or outcome.scheduled_for
    if outcome.released:
        when = "now" if going <= at else f"at {local_time(going, zone)} (after quiet hours)"
        readers = _readers(outcome.recipients, about=False)
        return f"{head}: its slot has passed; goes out {when} to {readers}"
    quiet = " (after quiet hours)" if going != outcome.scheduled_for else ""
    readers = _readers(outcome.recipients, about=True)
    return f"{head}: goes out {local_time(going, zone)}{quiet} to {readers}"


@click.command("approve")
@click.argument("issue_id", type=int)
@BY
@pass_ctx
def approve(ctx: Context, issue_id: int, by: str) -> None:
    """Approve an issue in review or held: it goes out at its slot (at once if that passed)."""
    from mailer.issues import review_actions

    at = now()
    outcome = review_actions.approve(ctx.engine(), ctx.settings, issue_id, by=by, now=at)
    out.print(approved_line(outcome, by, ctx.settings.site.timezone, at), markup=False)


@click.command("hold")
@click.argument("issue_id", type=int)
@BY
@pass_ctx
def hold(ctx: Context, issue_id: int, by: str) -> None:
    """Hold an issue in review or approved: at its slot it waits for `issues approve`."""
    from mailer.issues import review_actions

    outcome = review_actions.hold(ctx.engine(), ctx.settings, issue_id, by=by, now=now())
    slot = local_time(outcome.scheduled_for, ctx.settings.site.timezone)
    out.print(
        f"issue {issue_id} held by {by}: it does not go out at {slot}; it waits for"
        f" `mailer issues approve {issue_id}` (or `mailer issues skip {issue_id}`)",
        markup=False,
    )


@click.command("skip")
@click.argument("issue_id", type=int)
@BY
@pass_ctx
def skip(ctx: Context, issue_id: int, by: str) -> None:
    """Skip an issue in review, approved or held: nothing is sent, and its articles go in the
    digest's next issue."""
    from mailer.issues import review_actions

    outcome = review_actions.skip(ctx.engine(), ctx.settings, issue_id, by=by, now=now())
    n = outcome.articles
    given = f"its {n} articles go" if n != 1 else "its article goes"
    out.print(
        f"issue {issue_id} skipped by {by}: nothing is sent; {given} in the next issue of"
        f" {outcome.digest}",
        markup=False,
    )


@click.command("drop-article")
@click.argument("issue_id", type=int)
@click.argument("article_id", type=int)
@BY
@pass_ctx
def drop_article(ctx: Context, issue_id: int, article_id: int, by: str) -> None:
    """Take an article out of an issue in review, approved or held; no later issue of the
    digest takes it."""
    from mailer.issues import review_actions

    dropped = review_actions.drop_article(
        ctx.engine(), issue_id, article_id, by=by, now=now(), settings=ctx.settings
    )
    left = dropped.left
    rest = (
        f"{left} article{'s' if left != 1 else ''} left"
        if left
        else "no article left: it will be empty"
    )
    out.print(
        f"article {article_id} ({dropped.title}) dropped from issue {issue_id} by {by}: {rest};"
        f" no later issue of {dropped.digest} takes it",
        markup=False,
    )


@click.command("note")
@click.argument("issue_id", type=int)
@click.argument("text", required=False)
@click.option("--clear", is_flag=True, help="Remove the issue's note.")
@BY
@pass_ctx
def note(ctx: Context, issue_id: int, text: str | None, clear: bool, by: str) -> None:
    """Set the editor's note printed at the top of an issue in review, approved or held
    (plain text; blank lines part paragraphs; TEXT "-" reads it from standard input)."""
    from mailer.issues import review_actions

    if clear == (text is not None):
        raise click.UsageError("give the note's TEXT, or --clear to remove the note")
    if text == "-":
        text = sys.stdin.read()
    stored = review_actions.set_note(ctx.engine(), issue_id, text, by=by, now=now())
    if stored is None:
        out.print(f"issue {issue_id}: note removed by {by}", markup=False)
    else:
        words = len(stored.split())
        out.print(
            f"issue {issue_id}: note of {words} word{'' if words == 1 else 's'} set by {by}",
            markup=False,
        )


COMMANDS = (approve, hold, skip, drop_article, note)


def print_review(ctx: Context, issue_id: int) -> None:
    """The review part of ``issues show``: slot, state, who acted, who it would go to."""
    from mailer.issues import review_actions
    from mailer.issues.progress import local_time as table_time

    zone = ctx.settings.site.timezone
    at = now()
    state = review_actions.review_state(ctx.engine(), ctx.settings, issue_id, now=at)
    o = state.outcome
    if o.status in WAITING_ISSUE_STATUSES:
        digest = {d.key: d for d in ctx.settings.digests}.get(o.digest)
        passed = o.scheduled_for <= at
        if o.status == "held":
            then = f"waits for `mailer issues approve {issue_id}`"
        elif o.status == "approved":
            then = "goes out"
        elif digest is not None and digest.on_unreviewed == "hold":
            then = "is held unless approved (on_unreviewed = hold)"
        else:
            then = "goes out unless held or skipped (on_unreviewed = send)"
        when = "its slot has passed" if passed else f"at {local_time(o.scheduled_for, zone)}"
        out.print(f"  review: {when}, it {then}", markup=False)
        going = f", from {local_time(o.goes_out, zone)}" if o.goes_out else ""
        out.print(f"  would go to {_readers(o.recipients, about=False)} now{going}", markup=False)
    for action in state.actions:
        what = action.kind.replace("_", " ")
        if action.article_id is not None:
            what += f" {action.article_id}"
        out.print(f"  {what} by {action.by} {table_time(action.at, zone)}", markup=False)
    if o.status in (*WAITING_ISSUE_STATUSES, "skipped"):
        out.print(f"  articles ({len(state.kept)}):", markup=False)
        for article in state.kept:
            out.print(f"    {article.id:>6}  [{article.topic}] {article.title}", markup=False)
    for article_id, title, by in state.dropped:
        out.print(f"  dropped {article_id:>6}  {title} (by {by})", markup=False)


def review_actions(engine: sa.Engine, issue_ids: list[int]) -> dict[int, tuple[Action, ...]]:
    """The review actions of ``issue_ids`` (for ``issues list``)."""
    from mailer.db.engine import reading
    from mailer.issues import review_actions

    with reading(engine) as conn:
        return review_actions.actions(conn, issue_ids)
