"""``mailer subscribers``: add, import, export, list, show, remove, erase and purge."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from zoneinfo import ZoneInfo

import click
from rich.table import Table

from mailer.cli.context import Context, err, out, pass_ctx
from mailer.cli.listing import format_option, print_csv, print_json, print_table
from mailer.clock import now
from mailer.db.schema import SUBSCRIBER_STATUSES
from mailer.errors import MailerError
from mailer.subscribers import csvfile, editions, personal, store
from mailer.subscribers.importer import RowError


@click.group("subscribers")
def group() -> None:
    """Add, import, export, list, show, remove and erase subscribers."""


@group.command("add")
@click.argument("email")
@click.option("--name", default="", help="Display name.")
@click.option("--topic", "topics", multiple=True, help="A topic key (repeat; default: all).")
@click.option(
    "--digest",
    "digests",
    multiple=True,
    help="A digest key (repeat; default: the digests with default = true).",
)
@click.option(
    "--status",
    type=click.Choice(["active", "pending"]),
    default="active",
    show_default=True,
    help="pending sends nothing until the subscriber confirms.",
)
@pass_ctx
def subscribers_add(
    ctx: Context,
    email: str,
    name: str,
    topics: tuple[str, ...],
    digests: tuple[str, ...],
    status: str,
) -> None:
    """Add one subscriber (with consent obtained by staff, recorded as source "cli")."""
    try:
        chosen = editions.parse_digests(digests, ctx.settings.digests)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--digest'") from exc
    sub = store.add(
        ctx.engine(),
        email,
        name=name,
        topics=topics,
        digests=chosen,
        status=status,
        known_topics=ctx.settings.topic_keys,
        now=now(),
        source="cli",
        policy_version=ctx.settings.site.privacy_policy_version,
    )
    out.print(
        f"added {sub.email} ({sub.status}; topics: {', '.join(sub.topics)};"
        f" digests: {', '.join(sub.digest_keys) or 'none'})",
        markup=False,
    )


@group.command("import")
@click.argument("csv_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--update",
    is_flag=True,
    help="Refresh names, topics and digests (if the file has them) of present subscribers.",
)
@pass_ctx
def subscribers_import(ctx: Context, csv_file: Path, update: bool) -> None:
    """Import a CSV file with columns email,name,topics,status,digests (topics and digests
    separated by ;; a row without digests gets the default ones)."""

    def show(rejected: list[RowError]) -> None:
        # As each chunk is committed, so a file of bad rows is never held whole in memory; as
        # plain text (rich's console took about 0.1 ms a line: 100 s for a million). A
        # RowError shows the file's control characters escaped.
        click.echo("\n".join(f"{csv_file}: {error}" for error in rejected), err=True)

    with csv_file.open(encoding="utf-8", newline="") as stream:
        report = csvfile.import_csv(
            ctx.engine(),
            stream,
            known_topics=ctx.settings.topic_keys,
            digests=ctx.settings.digests,
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


@group.command("export")
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
        data = personal.export(ctx.engine(), store.get(ctx.engine(), person).uid)
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        if csv_file is None:
            sys.stdout.write(text)
        else:
            csv_file.write_text(text, encoding="utf-8")
            out.print(f"wrote everything held about {person} to {csv_file}", markup=False)
        return
    if csv_file is None:
        csvfile.export_csv(ctx.engine(), sys.stdout, status=status)
        return
    with csv_file.open("w", encoding="utf-8", newline="") as stream:
        count = csvfile.export_csv(ctx.engine(), stream, status=status)
    out.print(f"exported {count} subscribers to {csv_file}")


@group.command("list")
@click.option("--status", type=click.Choice(SUBSCRIBER_STATUSES), help="Only this status.")
@click.option("--topic", help="Only subscribers of this topic.")
@click.option("--digest", help="Only subscribers who receive this digest.")
@click.option("--limit", type=click.IntRange(1), default=100, show_default=True)
@format_option
@pass_ctx
def subscribers_list(
    ctx: Context, status: str | None, topic: str | None, digest: str | None, limit: int, fmt: str
) -> None:
    """List subscribers in address order, and how many the filters select by status.

    csv has the import/export columns and ``since`` (ISO 8601, the site's time zone); json is an
    array of objects with those keys (topics as a list).
    """
    known = ctx.settings.topic_keys
    if topic is not None and topic not in known:
        raise click.BadParameter(
            f"{topic!r} is not a topic (known: {', '.join(known)})", param_hint="'--topic'"
        )
    digest_keys = [d.key for d in ctx.settings.digests]
    if digest is not None and digest not in digest_keys:
        raise click.BadParameter(
            f"{digest!r} is not a digest (known: {', '.join(digest_keys)})",
            param_hint="'--digest'",
        )
    engine = ctx.engine()
    # One batch of ``limit`` rows: the default batch would read 5,000 rows (and their topics)
    # to show 100.
    listed = list(
        itertools.islice(
            store.iter_subscribers(engine, status=status, topic=topic, digest=digest, batch=limit),
            limit,
        )
    )
    counts = store.counts_by_status(engine, status=status, topic=topic, digest=digest)
    selected = sum(counts.values())
    shown = f"the first {limit} of {selected} shown (raise --limit for more)"
    zone = ZoneInfo(ctx.settings.site.timezone)
    if fmt == "csv":
        rows = [
            csvfile.csv_row(sub) | {"since": sub.created_at.astimezone(zone).isoformat()}
            for sub in listed
        ]
        print_csv([*csvfile.CSV_COLUMNS, "since"], rows)
    elif fmt == "json":
        print_json([_as_json(sub, zone) for sub in listed])
    if fmt != "table":
        if selected > len(listed):  # on standard error: the output stays what it says
            err.print(shown, markup=False)
        return
    table = Table("email", "name", "status", "topics", "digests", "since")
    for sub in listed:
        table.add_row(
            sub.email,
            sub.name,
            sub.status,
            ";".join(sub.topics),
            ";".join(sub.digest_keys),
            f"{sub.created_at.astimezone(zone):%Y-%m-%d}",
        )
    print_table(table)
    total = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    if selected > len(listed):
        total += f"; {shown}"
    out.print(total or "no subscribers", markup=False)


def _as_json(sub: store.Subscriber, zone: ZoneInfo) -> dict[str, object]:
    """The CSV columns as JSON: the name as given (no spreadsheet guard), topics a list."""
    return {
        "email": sub.email,
        "name": sub.name,
        "topics": list(sub.topics),
        "status": sub.status,
        "digests": list(sub.digest_keys),
        "since": sub.created_at.astimezone(zone).isoformat(),
    }


@group.command("show")
@click.argument("email")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: everything held about the person, the file they download themselves.",
)
@pass_ctx
def subscribers_show(ctx: Context, email: str, fmt: str) -> None:
    """Show one subscriber: status first, then topics, digests (each with its pause) and
    consent evidence; or, as json, everything held about them (GDPR Art. 15 and 20)."""
    sub = store.get(ctx.engine(), email)
    if fmt == "json":
        site = ctx.settings.site
        text = personal.document(
            ctx.engine(), sub.uid, newsletter=site.name, publisher=site.publisher, now=now()
        )
        if text is None:  # erased between the two reads
            raise MailerError(f"no subscriber {sub.email}")
        sys.stdout.write(text)
        return
    out.print(sub.status)
    zone = ZoneInfo(ctx.settings.site.timezone)
    for label, value in [
        ("email", sub.email),
        ("name", sub.name),
        ("topics", ", ".join(sub.topics)),
        *[("digest", _digest_line(ctx, choice, zone)) for choice in sub.digests],
        *([] if sub.digests else [("digests", "none: receives no issue")]),
        ("created", sub.created_at.isoformat()),
        ("confirmed", sub.confirmed_at.isoformat() if sub.confirmed_at else "-"),
        ("unsubscribed", sub.unsubscribed_at.isoformat() if sub.unsubscribed_at else "-"),
        ("consent source", sub.consent_source),
        ("consent ip", sub.consent_ip or "-"),
        ("consent policy", sub.consent_policy_version or "-"),
    ]:
        out.print(f"  {label:15} {value}", markup=False)


def _digest_line(ctx: Context, choice: editions.Choice, zone: ZoneInfo) -> str:
    """One chosen digest for ``show``: its key and name, and whether it is paused."""
    known = {d.key: d for d in ctx.settings.digests}
    if choice.key not in known:
        return f"{choice.key} (not in the config: no issue is made for it)"
    text = f"{choice.key} ({known[choice.key].name})"
    if choice.until_resumed:
        return text + ", paused until resumed"
    if choice.paused(now()) and choice.paused_until is not None:
        return text + f", paused until {choice.paused_until.astimezone(zone):%Y-%m-%d %H:%M %Z}"
    return text


@group.command("remove")
@click.argument("email")
@pass_ctx
def subscribers_remove(ctx: Context, email: str) -> None:
    """Unsubscribe someone (their record stays; use erase to delete it)."""
    sub = store.set_status(ctx.engine(), email, "unsubscribed", now=now(), source="cli")
    out.print(f"{sub.email} is {sub.status}")


@group.command("erase")
@click.argument("email")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
def subscribers_erase(ctx: Context, email: str, yes: bool) -> None:
    """Delete all data about a person (GDPR Art. 17); a hash stays so they are never mailed."""
    if not yes:
        click.confirm(f"Erase everything held about {email}?", abort=True)
    personal.erase(ctx.engine(), email, now=now())
    out.print(f"erased {email}; its hash is on the suppression list")


@group.command("purge")
@pass_ctx
def subscribers_purge(ctx: Context) -> None:
    """Delete sign-ups not confirmed in time (GDPR storage limitation)."""
    from mailer.subscribers.lifecycle import UNCONFIRMED_TTL, purge_unconfirmed

    count = purge_unconfirmed(ctx.engine(), UNCONFIRMED_TTL, now=now())
    out.print(f"{count} unconfirmed sign-ups older than {UNCONFIRMED_TTL.days} days deleted")
