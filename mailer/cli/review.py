"""``mailer issues approve|hold|skip ID`` and ``mailer issues drop-article ID ARTICLE_ID``:
staff acting on an issue made for review (``mailer.issues.review``), each recorded with who
(``--by``, default the OS user) and when, each answered by one line saying what happens next.
"""

from __future__ import annotations

import getpass

import click

from mailer.cli.context import Context, out, pass_ctx
from mailer.clock import now
from mailer.issues.review import Outcome
from mailer.issues.schedule import local_time


def _os_user() -> str:
    try:
        return getpass.getuser()
    except OSError:  # no login name anywhere (a container without USER): still recorded
        return "staff"


BY = click.option("--by", default=_os_user, show_default="the OS user", help="Who acts (recorded).")


def _readers(n: int, *, about: bool) -> str:
    return f"{'about ' if about else ''}{n:,} reader{'s' if n != 1 else ''}"


def approved_line(outcome: Outcome, by: str, zone: str) -> str:
    """What happens to an issue just approved."""
    head = f"issue {outcome.issue_id} approved by {by}"
    if outcome.status == "empty":
        return f"{head}: its slot has passed and nobody would receive it now; it is empty"
    if outcome.released:
        when = "now" if outcome.goes_out is None else local_time(outcome.goes_out, zone)
        return f"{head}: its slot has passed; goes out {when} to {_readers(outcome.recipients, about=False)}"
    when = local_time(outcome.goes_out or outcome.scheduled_for, zone)
    quiet = " (after quiet hours)" if outcome.goes_out != outcome.scheduled_for else ""
    return f"{head}: goes out {when}{quiet} to {_readers(outcome.recipients, about=True)}"


@click.command("approve")
@click.argument("issue_id", type=int)
@BY
@pass_ctx
def approve(ctx: Context, issue_id: int, by: str) -> None:
    """Approve an issue in review or held: it goes out at its slot (at once if that passed)."""
    from mailer.issues import review

    outcome = review.approve(ctx.engine(), ctx.settings, issue_id, by=by, now=now())
    out.print(approved_line(outcome, by, ctx.settings.site.timezone), markup=False)


@click.command("hold")
@click.argument("issue_id", type=int)
@BY
@pass_ctx
def hold(ctx: Context, issue_id: int, by: str) -> None:
    """Hold an issue in review or approved: at its slot it waits for `issues approve`."""
    from mailer.issues import review

    outcome = review.hold(ctx.engine(), ctx.settings, issue_id, by=by, now=now())
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
    from mailer.issues import review

    outcome = review.skip(ctx.engine(), ctx.settings, issue_id, by=by, now=now())
    n = outcome.articles
    out.print(
        f"issue {issue_id} skipped by {by}: nothing is sent; its {n} article{'s' if n != 1 else ''}"
        f" go in the next issue of {outcome.digest}",
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
    from mailer.issues import review

    dropped = review.drop_article(ctx.engine(), issue_id, article_id, by=by, now=now())
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


COMMANDS = (approve, hold, skip, drop_article)
