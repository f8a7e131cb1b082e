"""``mailer articles``: add, fetch, list, show and remove articles."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import click
from rich.table import Table

from mailer.cli.context import Context, by_option, err, out, pass_ctx, site_time
from mailer.cli.listing import print_table
from mailer.clock import now
from mailer.content.files import load_article_file
from mailer.content.store import CLI_ORIGIN, Duplicate, list_articles, upsert_articles
from mailer.errors import MailerError


@click.group("articles")
def group() -> None:
    """Add, list, show, remove and retract articles."""


@group.command("add")
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--topic", help="Topic for files that do not name one.")
@pass_ctx
def articles_add(ctx: Context, files: tuple[Path, ...], topic: str | None) -> None:
    """Add article files (the site's text format, or Markdown with front matter)."""
    moment = now()
    parsed = []
    failed = 0
    for path in files:
        try:
            parsed.append(
                load_article_file(
                    path, default_topic=topic, known_topics=ctx.settings.topic_keys, now=moment
                )
            )
        except MailerError as exc:
            err.print(str(exc), markup=False)
            failed += 1
    report = upsert_articles(ctx.engine(), parsed, now=moment, origin=CLI_ORIGIN)
    line = f"{report.added} added, {report.updated} updated, {report.unchanged} unchanged"
    if report.duplicates:
        line += f", {len(report.duplicates)} skipped as duplicates"
    out.print(line)
    _print_duplicates("", report.duplicates)
    if failed:
        raise MailerError(f"{failed} of {len(files)} files could not be read (listed above)")


@group.command("fetch")
@pass_ctx
def articles_fetch(ctx: Context) -> None:
    """Fetch every [[sources]] feed and folder once, now; store new and changed articles.

    Feeds backing off after failures are fetched too: the scheduled round skips them until
    they are due (see `mailer articles sources`), this command does not.
    """
    from mailer.content.feeds.state import load_feed_states
    from mailer.content.sources import fetch_sources_sync

    feeds = ctx.settings.feeds
    # Read before the fetch: a success resets the count this command reports as overridden.
    backing_off = {
        url: state.consecutive_failures
        for url, state in load_feed_states(ctx.engine()).items()
        if state.consecutive_failures
    }
    results = fetch_sources_sync(
        ctx.engine(),
        ctx.settings,
        now=now(),
        concurrency=feeds.concurrency,
        read_timeout=feeds.timeout,
        max_bytes=feeds.max_bytes,
    )
    for result in results:
        if result.error:
            err.print(result.error, markup=False)
            continue
        if result.source.url in backing_off:
            failures = backing_off[result.source.url]
            out.print(
                f"{result.name}: fetched although it had failed {failures} times in a row"
                " (the scheduled round backs off; this command does not)",
                markup=False,
            )
        if result.not_modified:
            what = "not modified (304)"
        else:
            what = f"{result.added} added, {result.updated} updated, {result.unchanged} unchanged"
        if result.duplicates:
            what += f", {len(result.duplicates)} skipped as duplicates"
        out.print(f"{result.name}: {what}", markup=False)
        _print_duplicates(f"{result.name}: ", result.duplicates)
        for problem in result.skipped:
            err.print(f"{result.name}: skipped {problem}", markup=False)
    failed = [r for r in results if not r.ok]
    if failed:
        raise MailerError(
            f"{len(failed)} of {len(results)} sources failed or skipped items (listed above)"
        )


@group.command("sources")
@pass_ctx
def articles_sources(ctx: Context) -> None:
    """Every [[sources]] entry: its last fetch, its last error and when it is fetched next.

    A feed that failed backs off (the wait doubles with each failure in a row, up to an
    hour); `mailer articles fetch` fetches it at once regardless.
    """
    from mailer.content.source_status import hub_state, next_attempt, source_statuses

    settings = ctx.settings
    moment = now()
    at = functools.partial(site_time, settings)
    if not settings.sources:
        out.print("no [[sources]] configured")
        return
    for index, found in enumerate(source_statuses(ctx.engine(), settings, now=moment)):
        source = found.source
        if index:
            out.print("")
        if not found.is_feed:
            out.print(f"{source.path} (directory, topic {source.topic})", markup=False)
            out.print("  read on every fetch round", markup=False)
            continue
        private = ", private addresses allowed" if source.allow_private else ""
        out.print(f"{source.url or ''} (feed, topic {source.topic}{private})", markup=False)
        state = found.state
        if state is None:
            out.print("  never fetched", markup=False)
            continue
        status = f" (HTTP {state.last_status})" if state.last_status else ""
        rows = [
            ("last fetched", at(state.last_fetched_at) + status),
            ("last success", at(state.last_success_at) if state.last_success_at else "never"),
            ("next attempt", next_attempt(found, settings, at)),
        ]
        if state.last_error:
            rows.append(("last error", state.last_error))
        subscription = found.subscription
        if subscription is None:
            rows.append(("hub", "no hub"))
        else:
            rows.append(("hub", hub_state(subscription, moment, at)))
            if subscription.last_error:
                rows.append(("hub error", subscription.last_error))
        for name, value in rows:
            out.print(f"  {name + ':':<14}{value}", markup=False)


def _print_duplicates(prefix: str, duplicates: Sequence[Duplicate]) -> None:
    for d in duplicates:
        out.print(
            f"{prefix}skipped {d.guid} ({d.title}): a duplicate of article {d.of}", markup=False
        )


@group.command("list")
@click.option("--topic", help="Only this topic.")
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True)
@pass_ctx
def articles_list(ctx: Context, topic: str | None, limit: int) -> None:
    """List articles, newest first (times in the site's time zone)."""
    table = Table("id", "published", "topic", "title", "removed", "priority")
    for a in list_articles(ctx.engine(), topic=topic, limit=limit):
        removed = site_time(ctx.settings, a.removed_at) if a.removed_at else ""
        priority = a.priority if a.priority != "bulk" else ""
        table.add_row(
            str(a.id), site_time(ctx.settings, a.published_at), a.topic, a.title, removed, priority
        )
    print_table(table)


@group.command("show")
@click.argument("article_id", type=int)
@pass_ctx
def articles_show(ctx: Context, article_id: int) -> None:
    """Every field of one article, when it arrived, and the issues that took it."""
    from mailer.content.store import show

    detail = show(ctx.engine(), article_id)
    a = detail.article
    at = functools.partial(site_time, ctx.settings)
    fields = [
        ("id", str(a.id)),
        ("guid", a.guid),
        ("topic", a.topic),
        ("title", a.title),
        ("priority", a.priority),
        ("link", a.link or "-"),
        ("published", at(a.published_at)),
        ("expires", at(a.expires_at)),
        ("arrived", at(detail.created_at)),
        ("updated", at(detail.updated_at)),
    ]
    if a.removed_at is not None:
        where = ", ".join(str(i) for i in detail.removed_from) or "none"
        fields.append(
            ("removed", f"{at(a.removed_at)} by {detail.removed_by} (from issues: {where})")
        )
    for name, value in fields:
        out.print(f"{name + ':':<11}{value}", markup=False)
    out.print("issues:" if detail.issues else "issues:    none")
    for t in detail.issues:
        out.print(f"  {t.issue_id}  {t.digest}  {at(t.scheduled_for)}  {t.status}", markup=False)
    for name, text in (
        ("summary", a.summary),
        ("why it matters", a.why_it_matters),
        ("body", a.body),
    ):
        out.print(f"\n{name}:", markup=False)
        out.print(text or "-", markup=False)


@group.command("remove")
@click.argument("article_id", type=int)
@by_option("removes it")
@pass_ctx
def articles_remove(ctx: Context, article_id: int, by: str) -> None:
    """Take an article out of every issue not yet sent in full, and out of every later one."""
    from mailer.content.store import remove

    removal = remove(ctx.engine(), article_id, by=by, now=now())
    issues_text = ", ".join(str(i) for i in removal.issues) or "none"
    if removal.already:
        when = site_time(ctx.settings, removal.removed_at)
        out.print(
            f"article {article_id} was already removed {when} by {removal.removed_by}"
            f" (from issues: {issues_text})",
            markup=False,
        )
        return
    out.print(
        f"article {article_id} removed ({removal.title}); taken out of unsent issues: "
        f"{issues_text}; no later issue will take it",
        markup=False,
    )


@group.command("retract")
@click.argument("article_id", type=int)
@click.option(
    "--correction",
    metavar="TEXT",
    help="What was wrong: sent at once, as a correction, to everyone who received the article.",
)
@by_option("retracts it")
@pass_ctx
def articles_retract(ctx: Context, article_id: int, correction: str | None, by: str) -> None:
    """Take an article back; with --correction, tell those who received it.

    The article leaves every issue not yet sent, as with `remove`. With --correction, a
    correction mail goes to exactly the readers who received it.

    The correction is an issue of its own, sent ahead of bulk mail and not held by quiet
    hours. It goes to readers still subscribed, paused ones included; never to an unsubscribed
    or suppressed address. Retracting again sends no second correction; adding --correction
    to an article retracted without one sends it then.
    """
    from mailer.issues.corrections import retract

    done = retract(ctx.engine(), ctx.settings, article_id, correction=correction, by=by, now=now())
    removal = done.removal
    issues_text = ", ".join(str(i) for i in removal.issues) or "none"
    if removal.already:
        out.print(f"article {article_id} was already retracted", markup=False)
    else:
        out.print(
            f"article {article_id} retracted ({removal.title}); taken out of unsent issues: "
            f"{issues_text}",
            markup=False,
        )
    if done.already_corrected:
        out.print(
            f"a correction was already made for it (issue {done.correction_issue}); "
            "none sent again",
            markup=False,
        )
    elif done.correction_issue is not None:
        who = f"the {done.received} readers who received it"
        if done.recipients < done.received:
            who = f"{done.recipients} of {who} (the others no longer receive mail)"
        out.print(f"correction queued as issue {done.correction_issue}: to {who}", markup=False)
    elif correction is not None:
        raise MailerError(
            f"article {article_id} was never sent to anyone: retracted, no correction needed"
        )
    elif done.received:
        out.print(
            f"{done.received} readers received it; add --correction TEXT to tell them",
            markup=False,
        )
