"""The staff command line: a thin layer that parses arguments and calls the library.

Exit codes: 0 success, 1 a project error (one line on stderr), 2 bad usage.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from zoneinfo import ZoneInfo

import click
import sqlalchemy as sa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mailer import logs
from mailer.clock import now
from mailer.config import DEFAULT_CONFIG_NAME, Settings, load_settings
from mailer.content import articles
from mailer.db.engine import check_schema, create_engine, migrate, safe_url
from mailer.db.schema import SUBSCRIBER_STATUSES
from mailer.errors import ConfigError, MailerError
from mailer.issues import store as issues
from mailer.logs import describe_error, operational_errors
from mailer.preflight import preflight
from mailer.subscribers import store as subscribers

if TYPE_CHECKING:
    from mailer.delivery.ledger import Holding
    from mailer.delivery.pacing import SharedSchedule
    from mailer.delivery.processes import HelperExit, Helpers
    from mailer.delivery.worker import Totals
    from mailer.service import Parts

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger(__name__)

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
        if self._settings is None:
            self._settings = load_settings(self.config_path)
        return self._settings

    def engine(self, *, check: bool = True) -> sa.Engine:
        if self._engine is None:
            self._engine = create_engine(self.settings.database.url)
            if check:
                check_schema(self._engine)
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


pass_ctx = click.make_pass_decorator(Context)


def signer(settings: Settings) -> Callable[[bytes], bytes] | None:
    """The DKIM signing function for ``[dkim]``, or None; a bad key fails here, at start-up."""
    from mailer.compose.dkim import signer_for

    return signer_for(settings)


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
    revision = migrate(ctx.engine(check=False))
    out.print(f"database ready at revision {revision}: {safe_url(ctx.settings.database.url)}")


# ---------------------------------------------------------------- subscribers


@cli.group("subscribers")
def subscribers_group() -> None:
    """Add, import, export, list, show, remove and erase subscribers."""


@subscribers_group.command("add")
@click.argument("email")
@click.option("--name", default="", help="Display name.")
@click.option("--topic", "topics", multiple=True, help="A topic key (repeat; default: all).")
@click.option(
    "--status",
    type=click.Choice(["active", "pending"]),
    default="active",
    show_default=True,
    help="pending sends nothing until the subscriber confirms.",
)
@pass_ctx
def subscribers_add(
    ctx: Context, email: str, name: str, topics: tuple[str, ...], status: str
) -> None:
    """Add one subscriber (with consent obtained by staff, recorded as source "cli")."""
    sub = subscribers.add(
        ctx.engine(),
        email,
        name=name,
        topics=topics,
        status=status,
        known_topics=ctx.settings.topic_keys,
        now=now(),
        source="cli",
        policy_version=ctx.settings.site.privacy_policy_version,
    )
    out.print(f"added {sub.email} ({sub.status}; topics: {', '.join(sub.topics)})")


@subscribers_group.command("import")
@click.argument("csv_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--update", is_flag=True, help="Refresh names and topics of present subscribers.")
@pass_ctx
def subscribers_import(ctx: Context, csv_file: Path, update: bool) -> None:
    """Import a CSV file with columns email,name,topics,status (topics separated by ;)."""

    def show(rejected: list[subscribers.RowError]) -> None:
        # As each chunk is committed, so a file of bad rows is never held whole in memory; as
        # plain text (rich's console took about 0.1 ms a line: 100 s for a million). A
        # RowError shows the file's control characters escaped.
        click.echo("\n".join(f"{csv_file}: {error}" for error in rejected), err=True)

    with csv_file.open(encoding="utf-8", newline="") as stream:
        report = subscribers.import_csv(
            ctx.engine(),
            stream,
            known_topics=ctx.settings.topic_keys,
            now=now(),
            source=f"import:{csv_file.name}",
            update=update,
            on_rejected=show,
        )
    out.print(
        f"{report.rows} rows: {report.added} added, {report.updated} updated, "
        f"{report.unchanged} unchanged, {report.suppressed} suppressed, "
        f"{report.rejected} rejected"
    )
    if report.rejected:
        raise MailerError(
            f"{report.rejected} rows rejected (listed above); the others were imported"
        )


@subscribers_group.command("export")
@click.argument("csv_file", type=click.Path(dir_okay=False, path_type=Path), required=False)
@click.option("--status", type=click.Choice(SUBSCRIBER_STATUSES))
@click.option(
    "--person",
    metavar="EMAIL",
    help="Instead: everything held about one person, as JSON (GDPR Art. 15 and 20).",
)
@pass_ctx
def subscribers_export(
    ctx: Context, csv_file: Path | None, status: str | None, person: str | None
) -> None:
    """Export subscribers as CSV (to a file, or standard output), or one person as JSON."""
    if person is not None:
        from mailer.web.store import export

        data = export(ctx.engine(), subscribers.get(ctx.engine(), person).uid)
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        if csv_file is None:
            sys.stdout.write(text)
        else:
            csv_file.write_text(text, encoding="utf-8")
            out.print(f"wrote everything held about {person} to {csv_file}", markup=False)
        return
    if csv_file is None:
        subscribers.export_csv(ctx.engine(), sys.stdout, status=status)
        return
    with csv_file.open("w", encoding="utf-8", newline="") as stream:
        count = subscribers.export_csv(ctx.engine(), stream, status=status)
    out.print(f"exported {count} subscribers to {csv_file}")


@subscribers_group.command("list")
@click.option("--status", help="Only this status.")
@click.option("--topic", help="Only subscribers of this topic.")
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True)
@pass_ctx
def subscribers_list(ctx: Context, status: str | None, topic: str | None, limit: int) -> None:
    """List subscribers in address order."""
    table = Table("email", "name", "status", "topics", "since")
    for i, sub in enumerate(subscribers.iter_subscribers(ctx.engine(), status=status, topic=topic)):
        if i >= limit:
            break
        table.add_row(
            sub.email, sub.name, sub.status, ";".join(sub.topics), f"{sub.created_at:%Y-%m-%d}"
        )
    out.print(table)
    counts = subscribers.counts_by_status(ctx.engine())
    out.print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no subscribers")


@subscribers_group.command("show")
@click.argument("email")
@pass_ctx
def subscribers_show(ctx: Context, email: str) -> None:
    """Show one subscriber: status first, then topics and consent evidence."""
    sub = subscribers.get(ctx.engine(), email)
    out.print(sub.status)
    for label, value in [
        ("email", sub.email),
        ("name", sub.name),
        ("topics", ", ".join(sub.topics)),
        ("created", sub.created_at.isoformat()),
        ("confirmed", sub.confirmed_at.isoformat() if sub.confirmed_at else "-"),
        ("unsubscribed", sub.unsubscribed_at.isoformat() if sub.unsubscribed_at else "-"),
        ("consent source", sub.consent_source),
        ("consent ip", sub.consent_ip or "-"),
        ("consent policy", sub.consent_policy_version or "-"),
    ]:
        out.print(f"  {label:15} {value}", markup=False)


@subscribers_group.command("remove")
@click.argument("email")
@pass_ctx
def subscribers_remove(ctx: Context, email: str) -> None:
    """Unsubscribe someone (their record stays; use erase to delete it)."""
    sub = subscribers.set_status(ctx.engine(), email, "unsubscribed", now=now(), source="cli")
    out.print(f"{sub.email} is {sub.status}")


@subscribers_group.command("erase")
@click.argument("email")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
def subscribers_erase(ctx: Context, email: str, yes: bool) -> None:
    """Delete all data about a person (GDPR Art. 17); a hash stays so they are never mailed."""
    if not yes:
        click.confirm(f"Erase everything held about {email}?", abort=True)
    subscribers.erase(ctx.engine(), email, now=now())
    out.print(f"erased {email}; its hash is on the suppression list")


@subscribers_group.command("purge")
@pass_ctx
def subscribers_purge(ctx: Context) -> None:
    """Delete sign-ups not confirmed in time (GDPR storage limitation)."""
    from mailer.web import UNCONFIRMED_TTL, purge_unconfirmed

    count = purge_unconfirmed(ctx.engine(), UNCONFIRMED_TTL, now=now())
    out.print(f"{count} unconfirmed sign-ups older than {UNCONFIRMED_TTL.days} days deleted")


# ---------------------------------------------------------------- articles


@cli.group("articles")
def articles_group() -> None:
    """Add and list articles."""


@articles_group.command("add")
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
                articles.load_article_file(
                    path, default_topic=topic, known_topics=ctx.settings.topic_keys, now=moment
                )
            )
        except MailerError as exc:
            err.print(str(exc), markup=False)
            failed += 1
    report = articles.upsert_articles(ctx.engine(), parsed, now=moment)
    line = f"{report.added} added, {report.updated} updated, {report.unchanged} unchanged"
    if report.duplicates:
        line += f", {len(report.duplicates)} skipped as duplicates"
    out.print(line)
    _print_duplicates("", report.duplicates)
    if failed:
        raise MailerError(f"{failed} of {len(files)} files could not be read (listed above)")


@articles_group.command("fetch")
@pass_ctx
def articles_fetch(ctx: Context) -> None:
    """Fetch every [[sources]] feed and folder once; store new and changed articles."""
    from mailer.content.sources import fetch_sources_sync

    feeds = ctx.settings.feeds
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


def _print_duplicates(prefix: str, duplicates: Sequence[articles.Duplicate]) -> None:
    for d in duplicates:
        out.print(
            f"{prefix}skipped {d.guid} ({d.title}): a duplicate of article {d.of}", markup=False
        )


def _site_time(settings: Settings, moment: datetime | None) -> str:
    """A time as staff read it: in the site's time zone, with the zone's name."""
    return "-" if moment is None else issues.local_time(moment, settings.site.timezone)


@articles_group.command("list")
@click.option("--topic", help="Only this topic.")
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True)
@pass_ctx
def articles_list(ctx: Context, topic: str | None, limit: int) -> None:
    """List articles, newest first (times in the site's time zone)."""
    table = Table("id", "published", "topic", "title", "removed")
    for a in articles.list_articles(ctx.engine(), topic=topic, limit=limit):
        removed = _site_time(ctx.settings, a.removed_at) if a.removed_at else ""
        table.add_row(
            str(a.id), _site_time(ctx.settings, a.published_at), a.topic, a.title, removed
        )
    out.print(table)


@articles_group.command("show")
@click.argument("article_id", type=int)
@pass_ctx
def articles_show(ctx: Context, article_id: int) -> None:
    """Every field of one article, when it arrived, and the issues that took it."""
    from mailer.content.admin import show

    detail = show(ctx.engine(), article_id)
    a = detail.article
    at = functools.partial(_site_time, ctx.settings)
    fields = [
        ("id", str(a.id)),
        ("guid", a.guid),
        ("topic", a.topic),
        ("title", a.title),
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


@articles_group.command("remove")
@click.argument("article_id", type=int)
@click.option(
    "--by",
    default=lambda: os.environ.get("USER") or os.environ.get("LOGNAME") or "staff",
    show_default="$USER",
    help="Who removes it (recorded).",
)
@pass_ctx
def articles_remove(ctx: Context, article_id: int, by: str) -> None:
    """Take an article out of every issue not yet sent in full, and out of every later one."""
    from mailer.content.admin import remove

    removal = remove(ctx.engine(), article_id, by=by, now=now())
    issues_text = ", ".join(str(i) for i in removal.issues) or "none"
    if removal.already:
        when = _site_time(ctx.settings, removal.removed_at)
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


# ---------------------------------------------------------------- digests and issues


@cli.group("digest")
def digest_group() -> None:
    """Preview or send a digest."""


@digest_group.command("preview")
@click.argument("key")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path))
@pass_ctx
def digest_preview(ctx: Context, key: str, out_dir: Path | None) -> None:
    """Render the next issue of a digest without sending it."""
    from mailer.issues.staff import preview_next

    preview = preview_next(ctx.engine(), ctx.settings, ctx.settings.digest(key), now=now())
    if out_dir is None:
        out.print(preview.text, markup=False)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{key}.html").write_text(preview.html, encoding="utf-8")
    (out_dir / f"{key}.txt").write_text(preview.text, encoding="utf-8")
    out.print(
        f"{preview.subject!r}: {preview.articles} articles{_left_over(preview.left_over)}"
        f" → {out_dir / f'{key}.html'}",
        markup=False,
    )


def _left_over(count: int) -> str:
    """What max_articles leaves for the issue after, said where the issue's count is shown."""
    return f" ({count} more wait for the next issue: max_articles)" if count else ""


PROCESSES = click.option(
    "--processes",
    type=click.IntRange(1, 64),
    help="Sending processes, each with [smtp].connections connections (default: [smtp].processes).",
)


def with_processes(settings: Settings, processes: int | None) -> Settings:
    from mailer.config import with_processes as set_processes

    return settings if processes is None else set_processes(settings, processes)


@digest_group.command("send")
@click.argument("key")
@PROCESSES
@pass_ctx
def digest_send(ctx: Context, key: str, processes: int | None) -> None:
    """Make an issue now (or resume an unfinished one) and deliver it in the foreground."""
    # Imported before the helpers are forked, so they start with them.
    from mailer.delivery.processes import Helpers
    from mailer.issues.staff import deliver_issue, open_issue  # noqa: F401
    from mailer.signals import stop_on_signals  # noqa: F401

    settings = with_processes(ctx.settings, processes)
    digest = settings.digest(key)
    sign = signer(settings)  # a bad [dkim] key is reported before anything starts
    preflight(settings, ("secret", "database", "smtp"))  # before the issue, before the helpers
    # The helper processes start before this command opens anything, so they are forked with
    # every module already imported, and get ready while the issue is made.
    helpers = Helpers(settings, fork=True)
    with helpers:
        engine = ctx.engine()
        issue = open_issue(engine, settings, digest, now=now())
        verb = "created" if issue.created else "resuming"
        out.print(
            f"issue {issue.issue_id} {verb}"
            + (
                f": {issue.articles} articles{_left_over(issue.left_over)},"
                f" {issue.recipients} recipients"
                if issue.created
                else ""
            )
        )
        started = time.monotonic()
        totals = _send_issue(engine, settings, issue.issue_id, helpers, sign)
    elapsed = time.monotonic() - started
    totals.add(helpers.report.counts)
    c = totals.counts
    rate = c.get("sent", 0) / elapsed if elapsed > 0 else 0.0
    spread = f", {settings.smtp.processes} processes" if settings.smtp.processes > 1 else ""
    out.print(
        f"sent {c.get('sent', 0)}, deferred {c.get('deferred', 0)}, bounced {c.get('bounced', 0)}, "
        f"failed {c.get('failed', 0)}, cancelled {c.get('cancelled', 0)} in {elapsed:.2f}s "
        f"({rate:.0f} msg/s{spread})"
    )
    # A sending process that died is reported, and so is what is left of the issue; this
    # command took over the dead process's deliveries, so often nothing is.
    died = [f.describe() for f in helpers.report.failed]
    left = issues.unfinished(ctx.engine(), issue.issue_id)
    if left is not None:
        raise MailerError("; ".join([*died, left.describe(settings.site.timezone, now())]))
    if died:
        raise MailerError(
            "; ".join(died) + f": issue {issue.issue_id} is complete all the same"
            " (this command sent the deliveries it held)"
        )


def _waiting(holdings: Sequence[Holding], at: datetime) -> None:
    """What a drain prints while other workers hold the deliveries it waits for (the drain
    tells it when the holders change, else once per heartbeat interval)."""
    for holding in holdings:
        err.print(f"waiting for {holding.describe(at)}", markup=False)


def _send_issue(
    engine: sa.Engine,
    settings: Settings,
    issue_id: int,
    helpers: Helpers,
    sign: Callable[[bytes], bytes] | None,
) -> Totals:
    """Deliver an issue here and in the helpers, with a progress bar; this process's totals."""
    from mailer.delivery.processes import Job

    summary = issues.summarize(engine, issue_id)
    due = (
        summary.counts.get("queued", 0)
        + summary.counts.get("deferred", 0)
        + summary.counts.get("sending", 0)
    )
    with Progress(
        TextColumn("sending"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as progress:
        task = progress.add_task("send", total=due)

        def advance(counts: dict[str, int]) -> None:
            progress.advance(task, sum(counts.values()))

        helpers.assign(Job(issue_id, drain=True), on_batch=advance)
        totals, stopped = asyncio.run(
            _deliver_issue(engine, settings, issue_id, advance, sign, _waiting, helpers.schedule)
        )
        if stopped:
            helpers.stop()
    return totals


async def _deliver_issue(
    engine: sa.Engine,
    settings: Settings,
    issue_id: int,
    advance: Callable[[dict[str, int]], None],
    sign: Callable[[bytes], bytes] | None,
    on_wait: Callable[[Sequence[Holding], datetime], None] | None = None,
    schedule: SharedSchedule | None = None,
) -> tuple[Totals, bool]:
    """This process's share of an issue; SIGTERM/SIGINT stop it after the current messages."""
    from mailer.issues.staff import deliver_issue
    from mailer.signals import stop_on_signals

    stop = asyncio.Event()
    with stop_on_signals(stop):
        totals = await deliver_issue(
            engine,
            settings,
            issue_id,
            on_batch=advance,
            sign=sign,
            stop=stop,
            on_wait=on_wait,
            schedule=schedule,
        )
    return totals, stop.is_set()


def _check_helpers(failed: list[HelperExit], settings: Settings) -> None:
    if failed:
        raise MailerError(
            "; ".join(f.describe() for f in failed)
            + ": the deliveries it held go back to the queue at once for a worker on this host,"
            f" elsewhere when their lease ends ([smtp].lease_seconds ="
            f" {settings.smtp.lease_seconds:g}); then a worker or another `mailer digest send`"
            " sends them"
        )


@cli.group("issues")
def issues_group() -> None:
    """List and inspect issues."""


@issues_group.command("list")
@click.option("--digest", help="Only this digest.")
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True)
@pass_ctx
def issues_list(ctx: Context, digest: str | None, limit: int) -> None:
    """Recent issues with their delivery counts."""
    zone = ctx.settings.site.timezone
    table = Table("id", "digest", "scheduled", "status", "sent", "pending", "subject")
    for s in issues.list_issues(ctx.engine(), digest=digest, limit=limit):
        pending = (
            s.counts.get("queued", 0) + s.counts.get("deferred", 0) + s.counts.get("sending", 0)
        )
        table.add_row(
            str(s.id),
            s.digest,
            f"{s.scheduled_for.astimezone(ZoneInfo(zone)):%Y-%m-%d %H:%M %Z}",
            s.status,
            str(s.counts.get("sent", 0)),
            str(pending),
            s.subject,
        )
    out.print(table)


@issues_group.command("show")
@click.argument("issue_id", type=int)
@pass_ctx
def issues_show(ctx: Context, issue_id: int) -> None:
    """One issue: its status, deliveries by status (and by reason for those not sent), and
    when the next retry is due."""
    zone = ctx.settings.site.timezone
    s = issues.summarize(ctx.engine(), issue_id)
    why = issues.reasons(ctx.engine(), issue_id)
    out.print(f"issue {s.id} {s.status}: {s.subject}", markup=False)
    out.print(f"  digest {s.digest}, scheduled {issues.local_time(s.scheduled_for, zone)}")
    for status, n in sorted(s.counts.items()):
        out.print(f"  {status:10} {n}")
        for reason, count in why.by_status.get(status, []):
            out.print(f"  {'':10} {count:>{len(str(n))}}  {reason}", markup=False)
    out.print(f"  {'total':10} {s.total}")
    if why.next_retry is not None:
        # Rows waiting with a due time already past are sent as soon as a worker claims them.
        when = why.next_retry
        shown = "due now" if when <= now() else issues.local_time(when, zone)
        out.print(f"  next {'attempt' if shown == 'due now' else 'retry'} {shown}")


@cli.command()
@click.option("--host", default=None, help="Listen address (default: [web].host).")
@click.option(
    "--port", type=click.IntRange(1, 65535), default=None, help="Listen port (default: [web].port)."
)
@pass_ctx
def web(ctx: Context, host: str | None, port: int | None) -> None:
    """Serve the subscriber web app: sign-up, confirm, unsubscribe, preferences, archive."""
    from mailer.web.sender import SmtpConfirmationSender
    from mailer.web.server import serve

    settings = ctx.settings
    web_settings = replace(
        settings.web, host=host or settings.web.host, port=port or settings.web.port
    )
    settings = replace(settings, web=web_settings)
    sender = SmtpConfirmationSender(settings, sign=signer(settings))
    sock = preflight(settings, ("secret", "database", "web"))
    assert sock is not None
    line = f"mailer web: {_web_line(settings, sock)}"
    with sock:
        serve(settings, ctx.engine(), sender, sock=sock, on_started=lambda: _started(line))


@issues_group.command("cancel")
@click.argument("issue_id", type=int)
@pass_ctx
def issues_cancel(ctx: Context, issue_id: int) -> None:
    """Stop an issue that is sending: what has not gone out yet is cancelled.

    Its articles go back to the digest: the next issue takes them (a subscriber who already
    received one from this issue does not get it again).
    """
    count = issues.cancel(ctx.engine(), issue_id, now=now())
    out.print(
        f"issue {issue_id} cancelled; {count} deliveries will not be sent;"
        " its articles go in the digest's next issue"
    )


@issues_group.command("resume")
@click.argument("issue_id", type=int)
@click.option("--resend-unknown", is_flag=True, help="Also re-send deliveries held as unknown.")
@pass_ctx
def issues_resume(ctx: Context, issue_id: int, resend_unknown: bool) -> None:
    """Queue again, due now, what an issue still owes: deliveries cancelled by staff, deferred
    ones, and those that failed because the relay kept refusing; a worker or `mailer digest
    send` sends them."""
    count = issues.resume(ctx.engine(), issue_id, now=now(), resend_unknown=resend_unknown)
    out.print(f"issue {issue_id}: {count} deliveries queued again")


@issues_group.command("retry")
@click.argument("issue_id", type=int)
@pass_ctx
def issues_retry(ctx: Context, issue_id: int) -> None:
    """Make the deferred and unknown deliveries of an issue due now (same Message-ID; who was
    sent the issue is not sent it again); a worker or `mailer digest send` sends them."""
    count = issues.retry(ctx.engine(), issue_id, now=now())
    out.print(f"issue {issue_id}: {count} deliveries due now")


@cli.command()
@click.option("--no-web", is_flag=True, help="Leave the web app to `mailer web` elsewhere.")
@pass_ctx
def run(ctx: Context, no_web: bool) -> None:
    """Scheduler, delivery worker and web app, until SIGTERM or Ctrl-C (with [smtp].processes
    > 1, more processes deliver beside it)."""
    from mailer.issues.schedule import local_time, upcoming
    from mailer.service import Parts

    settings = ctx.settings
    sock = preflight(settings, ("secret", "database", "smtp", *(() if no_web else ("web",))))
    web_line = "web app off (--no-web)" if sock is None else _web_line(settings, sock)
    zone = settings.site.timezone

    def started() -> None:
        slots = upcoming(settings.digests, now())
        listed = ", ".join(f"{d.key} {local_time(slot, zone, year=False)}" for d, slot in slots)
        _started(f"mailer run: {web_line}; next: {listed or 'no digest is scheduled'}")

    try:
        _serve(
            ctx, settings, Parts(web=not no_web), drain=False, web_socket=sock, on_started=started
        )
    finally:
        if sock is not None:
            sock.close()


def _web_line(settings: Settings, sock: socket.socket) -> str:
    """Where the web app listens, and the public address its links use."""
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"web app on http://{shown}:{port}/ (public address {settings.site.base_url}/)"


def _started(line: str) -> None:
    """The one start-up line, out at once even when standard output is a file or a pipe."""
    out.print(line, markup=False)
    sys.stdout.flush()


@cli.command()
@click.option("--drain", is_flag=True, help="Exit when nothing is due.")
@PROCESSES
@pass_ctx
def worker(ctx: Context, drain: bool, processes: int | None) -> None:
    """Deliver due mail only (no scheduler, no web), until SIGTERM or Ctrl-C."""
    from mailer.service import Parts

    settings = with_processes(ctx.settings, processes)
    preflight(settings, ("secret", "database", "smtp"))
    started = now()
    c = _serve(ctx, settings, Parts(scheduler=False, web=False), drain=drain).counts
    out.print(
        f"sent {c.get('sent', 0)}, deferred {c.get('deferred', 0)}, bounced {c.get('bounced', 0)}, "
        f"failed {c.get('failed', 0)}"
    )
    if drain:
        left = issues.unfinished(ctx.engine(), since=started)
        if left is not None:
            raise MailerError(left.describe(settings.site.timezone, now()))


def _serve(
    ctx: Context,
    settings: Settings,
    parts: Parts,
    *,
    drain: bool,
    web_socket: socket.socket | None = None,
    on_started: Callable[[], None] | None = None,
) -> Totals:
    """Run the service here and its helper processes beside it; the totals of all of them."""
    from mailer.delivery.processes import Helpers, Job
    from mailer.service import Service

    helpers = Helpers(settings, Job(None, drain=drain))
    service = Service(
        ctx.engine(),
        settings,
        parts=parts,
        sign=signer(settings),
        web_socket=web_socket,
        on_wait=_waiting,
        schedule=helpers.schedule,
    )
    with helpers:
        totals = asyncio.run(service.run(drain=drain, on_started=on_started))
        if service.stop.is_set():
            helpers.stop()
    totals.add(helpers.report.counts)
    _check_helpers(helpers.report.failed, settings)
    return totals


@cli.group("bounces")
def bounces_group() -> None:
    """Process bounces (DSN) and complaints (ARF)."""


@bounces_group.command("process")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--soft-limit",
    type=click.IntRange(1),
    default=None,
    help="Soft bounces within the window that make a subscriber bounced "
    "(default: [bounces].soft_limit, 3).",
)
@click.option(
    "--soft-window-days",
    type=click.IntRange(1),
    default=None,
    help="The window, in days (default: [bounces].soft_window_days, 30).",
)
@pass_ctx
def bounces_process(
    ctx: Context, path: Path, soft_limit: int | None, soft_window_days: int | None
) -> None:
    """Apply the DSNs (RFC 3464) and ARF complaints (RFC 5965) in a Maildir, mbox or file."""

    from mailer.bounces.reports import process_path

    policy = ctx.settings.bounces
    soft_limit = policy.soft_limit if soft_limit is None else soft_limit
    soft_window_days = policy.soft_window_days if soft_window_days is None else soft_window_days
    summary = process_path(
        ctx.engine(),
        path,
        now=now(),
        soft_limit=soft_limit,
        soft_window=timedelta(days=soft_window_days),
        envelope_from=ctx.settings.envelope_from,
    )
    out.print(str(summary), markup=False)


@cli.group("dkim")
def dkim_group() -> None:
    """DKIM keys and DNS records."""


@dkim_group.command("keygen")
@click.option("--bits", type=click.IntRange(1024, 4096), default=2048, show_default=True)
@click.option(
    "--force", is_flag=True, help="Replace an existing key (signatures fail until DNS is updated)."
)
@pass_ctx
def dkim_keygen(ctx: Context, bits: int, force: bool) -> None:
    """Write [dkim].private_key_file (RSA, mode 0600) and print the DNS TXT record."""
    from mailer.compose.dkim import dns_record_name, generate_keypair, zone_file_line

    settings = ctx.settings.dkim
    if settings is None:
        raise ConfigError(
            "has no [dkim] table: set domain, selector and private_key_file, then run this again",
            path=str(ctx.config_path),
        )
    value = generate_keypair(settings.private_key_file, bits, overwrite=force)
    name = dns_record_name(settings)
    out.print(f"wrote {settings.private_key_file} ({bits}-bit RSA, mode 0600)", markup=False)
    out.print(f"publish this TXT record at {name}:", markup=False)
    out.print(value, markup=False)
    out.print("in a zone file:", markup=False)
    out.print(zone_file_line(name, value), markup=False)


@dkim_group.command("record")
@pass_ctx
def dkim_record(ctx: Context) -> None:
    """Print the DNS TXT record for the configured key (checks that the key is usable)."""
    from mailer.compose.dkim import DkimSigner, dns_record_name

    settings = ctx.settings.dkim
    if settings is None:
        raise ConfigError("has no [dkim] table", path=str(ctx.config_path))
    out.print(f"{dns_record_name(settings)} TXT", markup=False)
    out.print(DkimSigner.from_settings(settings).dns_record(), markup=False)


# ---------------------------------------------------------------- sink and demo


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=1025, show_default=True)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("mail"),
    show_default=True,
)
def sink(host: str, port: int, out_dir: Path) -> None:
    """A local capture SMTP server: one .eml file per message received."""
    from mailer.devtools.sink import run_sink

    run_sink(
        host,
        port,
        out_dir,
        on_ready=lambda bound: out.print(
            f"capturing on {host}:{bound} into {out_dir}/ (Ctrl-C stops)"
        ),
        on_message=lambda m: out.print(f"{m.path.name}", markup=False),
    )


@cli.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-output"),
    show_default=True,
)
@click.option(
    "--serve",
    is_flag=True,
    help="Then keep the web app on http://127.0.0.1:8000 and the capture server running.",
)
def demo(out_dir: Path, serve: bool) -> None:
    """Run the whole path on embedded defaults: subscribers, articles, one digest delivered."""
    from mailer.devtools.demo import run_demo

    run_demo(out_dir, console=out, serve=serve)


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
