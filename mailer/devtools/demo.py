"""``mailer demo``: the whole path on embedded defaults, with nothing but the package.

A SQLite database and a capture SMTP server on an ephemeral loopback port; the sample
subscribers and articles shipped in the package (``devtools/examples``), copied into ``DIR``
dated this week (``copy_examples``) so that they can be edited and fetched again; one alert
issue and one weekly issue, each delivered to the readers who chose that digest (some chose
one, some both); one new reader who signs up and confirms as on the web (the confirmation
mail, then the welcome mail); every message written to ``DIR/mail/*.eml``; an HTML preview;
and the config it used written to ``DIR/mailer.toml`` so that any command can be pointed at
the demo's state. Last, a ``curl`` line that pushes one more article, signed, to
``POST /hooks/articles`` of the app ``mailer demo --serve`` runs (``DIR/hook-article.json``,
signed with the secret in ``DIR/hook.key``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shlex
import shutil
import sys
from datetime import date, datetime, timedelta
from email import message_from_bytes, policy
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.console import Console

from mailer.clock import now
from mailer.compose.messages import build_confirmation
from mailer.compose.rendering import Renderer
from mailer.config.load import load_settings
from mailer.config.settings import Settings
from mailer.content.files import load_article_file
from mailer.content.store import file_origin, upsert_articles
from mailer.db.engine import create_engine, migrate, reading
from mailer.db.schema import deliveries, issues, subscribers
from mailer.delivery.foreground import deliver_issue
from mailer.devtools.sink import Sink
from mailer.issues.progress import summarize
from mailer.issues.staff import open_issue, preview_next
from mailer.staff.reports import queue_reports
from mailer.staff.rounds import flush_outbox
from mailer.subscribers import csvfile, lifecycle
from mailer.subscribers.welcome_mail import send_welcome
from mailer.web.hooks import HOOK_PATH, SIGNATURE_HEADER, sign
from mailer.web.sender import SmtpConfirmationSender

# Package data: a wheel installs it as plain files.
EXAMPLES = Path(str(resources.files("mailer.devtools") / "examples"))

SITE = {
    "name": "Camp Lejeune & New River Updates",
    "tagline": "Essential base alerts, local events, and military news delivered to your inbox.",
    "base_url": "https://news.example.org",
    "from": "Camp Lejeune & New River Updates <digest@news.example.org>",
    "reply_to": "editor@news.example.org",
    "privacy_policy_url": "https://news.example.org/privacy",
    "privacy_policy_version": "2026-11-01",
    "postal_address": "Example Media, 100 Main Street, Jacksonville, NC 28540, USA",
    "publisher": "Example Media",
    "disclaimer": (
        "An independent local newsletter; not an official U.S. Marine Corps "
        "or Department of Defense publication."
    ),
    "timezone": "America/New_York",
    "secret_key_env": "MAILER_SECRET_KEY",
    "secret_key_file": "secret.key",
    "list_id": "updates.news.example.org",
    "unsubscribe_mailto": "unsubscribe@news.example.org",
}

TOPICS = [
    ("base-alerts", "Base alerts", "Gate closures, weather and safety notices."),
    ("local-events", "Local events", "Things to do in Jacksonville and Onslow County."),
    (
        "military-news",
        "Military news",
        "News about the Marines and sailors of Camp Lejeune and New River.",
    ),
]


# The demo's staff address: its report lands in DIR/mail beside the readers' copies.
DEMO_STAFF = "editor@news.example.org"
# The staff console's demo admin (``--serve`` prints the link that sets its password).
DEMO_ADMIN = "admin@news.example.org"
# The reader who signs up and confirms during the demo: their confirmation and welcome mail.
DEMO_READER = "new.reader@example.org"
DEMO_READER_TOPICS = ("base-alerts", "local-events")
DEMO_READER_DIGESTS = ("weekly", "alerts")


def _toml_value(value: Any) -> str:
    # JSON strings, numbers, booleans and arrays of them are valid TOML values.
    return json.dumps(value, ensure_ascii=False)


LOCAL_WEB = "http://127.0.0.1:8000"
# The example config's subjects: what the issue holds, its lead story first.
SUBJECT = "{{ lead.title }}{% if more %}, and {{ more }} more{% endif %}"
ALERT_SUBJECT = "Base alert: {{ lead.title }}{% if more %} (and {{ more }} more){% endif %}"
WEEKLY_DESCRIPTION = "Every Friday morning: the week's base alerts, events and news"
ALERTS_DESCRIPTION = "Breaking base alerts, as they happen"


def demo_config(out_dir: Path, smtp_port: int, *, serve: bool = False) -> str:
    """The demo's config file text.

    Links point at https://news.example.org, as in production (RFC 8058 wants an HTTPS
    unsubscribe URI); with ``--serve`` they point at the local web app instead, plain HTTP on
    loopback, so that a person can click through the captured mail.
    """
    site = dict(SITE)
    if serve:
        site["base_url"] = LOCAL_WEB
        site["privacy_policy_url"] = f"{LOCAL_WEB}/privacy"
    lines = ["# Written by `mailer demo`: point any command at it with --config.", "", "[site]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in site.items()]
    lines += [
        "",
        "[database]",
        'url = "sqlite:///mailer.db"',
        "",
        "[web]",
        'host = "127.0.0.1"',
        "port = 8000",
        "",
        "# The site pushes articles to POST /hooks/articles, signed with this secret.",
        "[hooks]",
        'secret_env = "MAILER_HOOK_SECRET"',
        'secret_file = "hook.key"',
    ]
    lines += [
        "",
        "[smtp]",
        'host = "127.0.0.1"',
        f"port = {smtp_port}",
        'security = "none"',
        "connections = 4",
        "timeout = 10",
        "",
        "# Review mails, reports and alerts: captured by the demo's SMTP server like the rest.",
        "[staff]",
        f"emails = [{_toml_value(DEMO_STAFF)}]",
    ]
    for key, name, description in TOPICS:
        lines += [
            "",
            "[[topics]]",
            f"key = {_toml_value(key)}",
            f"name = {_toml_value(name)}",
            f"description = {_toml_value(description)}",
        ]
    lines += [
        "",
        "[[sources]]",
        'type = "directory"',
        f"path = {_toml_value(str(out_dir / 'articles'))}",
        'topic = "military-news"',
        "",
        "[[digests]]",
        'key = "weekly"',
        'name = "Weekly digest"',
        "subject = " + _toml_value(SUBJECT),
        'schedule = "0 7 * * fri"',
        'timezone = "America/New_York"',
        'topics = ["base-alerts", "local-events", "military-news"]',
        "max_articles = 20",
        "public = true",
        "description = " + _toml_value(WEEKLY_DESCRIPTION),
        "",
        "[[digests]]",
        'key = "alerts"',
        'name = "Base alerts"',
        "subject = " + _toml_value(ALERT_SUBJECT),
        "# Made by `mailer run` 20 s after a new base alert is stored (the demo makes it now).",
        'trigger = "arrival"',
        "debounce_seconds = 20",
        'timezone = "America/New_York"',
        'topics = ["base-alerts"]',
        "max_articles = 5",
        'priority = "alert"',
        "public = true",
        "description = " + _toml_value(ALERTS_DESCRIPTION),
    ]
    return "\n".join(lines) + "\n"


# A date in the front matter of a sample article (TOML `key = 2026-11-19T12:00:00Z` or YAML
# `key: 2026-11-20`): the day is what the copies move.
_FRONT_MATTER_DATE = re.compile(
    r"^(?P<key>published|expires|event_end|ends)(?P<sep>\s*[:=]\s*)(?P<day>\d{4}-\d{2}-\d{2})",
    re.MULTILINE,
)


def copy_examples(dest: Path, today: date) -> None:
    """The sample articles (``dest/articles``) and subscribers (``dest/subscribers.csv``),
    the articles dated by whole days later so that the newest was published the day before
    ``today``.

    The samples carry fixed dates, and their events end on fixed dates: moved as one, the
    sample week keeps its shape, and no event in it is over whatever day the copy is made.
    The copies say the same dates as the store, so fetching them again changes nothing.
    """
    texts = {p.name: p.read_text(encoding="utf-8") for p in (EXAMPLES / "articles").iterdir()}
    published = [
        date.fromisoformat(m["day"])
        for text in texts.values()
        for m in _FRONT_MATTER_DATE.finditer(text)
        if m["key"] == "published"
    ]
    shift = today - timedelta(days=1) - max(published)

    def moved(m: re.Match[str]) -> str:
        return f"{m['key']}{m['sep']}{date.fromisoformat(m['day']) + shift}"

    shutil.rmtree(dest / "articles", ignore_errors=True)
    (dest / "articles").mkdir(parents=True)
    for name, text in texts.items():
        (dest / "articles" / name).write_text(_FRONT_MATTER_DATE.sub(moved, text), encoding="utf-8")
    shutil.copyfile(EXAMPLES / "subscribers.csv", dest / "subscribers.csv")


def _prepare(out_dir: Path) -> None:
    """Start from a clean demo state; never touch anything but the demo's own files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("mailer.db", "mailer.db-wal", "mailer.db-shm", "preview.html", "preview.txt"):
        (out_dir / name).unlink(missing_ok=True)
    shutil.rmtree(out_dir / "mail", ignore_errors=True)
    (out_dir / "mail").mkdir()
    copy_examples(out_dir, now().date())
    for name in ("secret.key", "hook.key"):
        secret = out_dir / name
        if not secret.exists():
            secret.write_text(secrets.token_urlsafe(32) + "\n", encoding="ascii")
            secret.chmod(0o600)


def run_demo(out_dir: Path, *, console: Console, serve: bool = False) -> dict[str, Any]:
    """Run the demo into ``out_dir`` and print what happened; returns the figures.

    With ``serve`` the web app then stays on http://127.0.0.1:8000 and the capture server keeps
    running (mail the web app sends, such as confirmations, lands in ``DIR/mail`` too) until
    Ctrl-C.
    """
    out_dir = out_dir.resolve()
    _prepare(out_dir)
    sink = Sink("127.0.0.1", 0, out_dir / "mail")
    sink.start()
    try:
        config_path = out_dir / "mailer.toml"
        config_path.write_text(demo_config(out_dir, sink.port, serve=serve), encoding="utf-8")
        settings = load_settings(config_path, env={})
        figures = _run(settings, out_dir, console)
        if serve:
            figures["staff_link"] = staff_login_link(settings, console)
            _serve(settings, console)
        return figures
    finally:
        sink.stop()


def staff_login_link(settings: Settings, console: Console) -> str:
    """Make the demo's admin (``DEMO_ADMIN``) and print the one-time link that sets its
    password: the way into the staff console at /staff/."""
    from mailer.console import accounts

    engine = create_engine(settings.database.url)
    try:
        link = accounts.add(engine, DEMO_ADMIN, "admin", now(), by="demo")
    finally:
        engine.dispose()
    url = accounts.link_url(settings, link.token)
    console.print(
        f"  staff login           {url}  (sets the password of {DEMO_ADMIN}, an admin; once)",
        markup=False,
        soft_wrap=True,
    )
    return url


def _serve(settings: Settings, console: Console) -> None:
    """The whole service on the demo's state, as ``mailer run`` runs it: the web app, and the
    scheduler and worker behind it, so that a sign-up is welcomed and an article pushed to
    ``/hooks/articles`` goes out to the alert digest's readers within seconds."""
    from mailer.delivery.sending import serve
    from mailer.service import Parts

    console.print(
        f"  web app               {LOCAL_WEB}/  with the scheduler and worker of `mailer run`"
        " (Ctrl-C stops them and the capture server)"
    )
    engine = create_engine(settings.database.url)
    try:
        serve(engine, settings, Parts(), drain=False, sign=None)
    finally:
        engine.dispose()


def _run(settings: Settings, out_dir: Path, console: Console) -> dict[str, Any]:
    engine = create_engine(settings.database.url)
    migrate(engine, settings.digests)
    moment = now()
    with (out_dir / "subscribers.csv").open(encoding="utf-8", newline="") as stream:
        imported = csvfile.import_csv(
            engine,
            stream,
            known_topics=settings.topic_keys,
            digests=settings.digests,
            now=moment,
            source="demo",
        )
    source = settings.sources[0]
    assert source.path is not None
    parsed = [
        load_article_file(
            p, default_topic=source.topic, known_topics=settings.topic_keys, now=moment
        )
        for p in sorted(source.path.iterdir())
        if p.is_file()
    ]
    added = upsert_articles(engine, parsed, now=moment, origin=file_origin(source.path))
    digest, alerts = settings.digest("weekly"), settings.digest("alerts")
    renderer = Renderer()
    preview = preview_next(engine, settings, digest, now=moment, renderer=renderer)
    (out_dir / "preview.html").write_text(preview.html, encoding="utf-8")
    (out_dir / "preview.txt").write_text(preview.text, encoding="utf-8")
    # The alert goes first, as it would: a reader of both digests then gets the weekly issue
    # without the alerts they already have.
    alert = open_issue(engine, settings, alerts, now=moment, renderer=renderer)
    alert_totals = asyncio.run(deliver_issue(engine, settings, alert.issue_id, renderer=renderer))
    issue = open_issue(engine, settings, digest, now=moment, renderer=renderer)
    totals = asyncio.run(deliver_issue(engine, settings, issue.issue_id, renderer=renderer))
    summary = summarize(engine, issue.issue_id)
    alert_summary = summarize(engine, alert.issue_id)
    who = who_got_what(engine, (alert.issue_id, issue.issue_id))
    # The issue ended: its report goes to [staff].emails, captured beside the readers' copies.
    queue_reports(engine, settings, now=now())
    flush_outbox(engine, settings, now=now(), sign=None)
    asyncio.run(join(engine, settings, now=now(), renderer=renderer))
    captured = sorted((out_dir / "mail").glob("*.eml"))
    staff_mail = [p for p in captured if DEMO_STAFF in p.name]
    joined = [p for p in captured if DEMO_READER in p.name]
    mail = [p for p in captured if p not in staff_mail and p not in joined]
    subjects = _subjects_by_digest(mail)
    engine.dispose()
    figures = {
        "subscribers_imported": imported.added,
        "articles_added": added.added,
        "issue": issue.issue_id,
        "issue_articles": issue.articles,
        "recipients": issue.recipients,
        "sent": totals.counts.get("sent", 0),
        "alert_issue": alert.issue_id,
        "alert_articles": alert.articles,
        "alert_recipients": alert.recipients,
        "alert_sent": alert_totals.counts.get("sent", 0),
        "who_got_what": who,
        "messages_captured": len(mail),
        "staff_mail": len(staff_mail),
        "new_reader_mail": [p.name for p in joined],
    }
    console.print(f"[bold]{settings.site.name}[/bold]: demo complete")
    console.print(
        f"  subscribers imported  {imported.added} ({len(imported.errors)} rows rejected)"
    )
    console.print(f"  articles added        {added.added}")
    for label, made, status, sent in (
        ("alert issue", alert, alert_summary.status, alert_totals),
        ("weekly issue", issue, summary.status, totals),
    ):
        console.print(
            f"  {f'{label} {made.issue_id}':<21} {status}: {made.articles} articles, "
            f"{sent.counts.get('sent', 0)} of {made.recipients} readers sent, "
            f"{sent.counts.get('deferred', 0)} deferred, in {sent.elapsed:.2f}s",
            markup=False,
        )
        key = alerts.key if made is alert else digest.key
        for subject in subjects.get(key, ()):
            console.print(f"  {'':<21} subject: {subject}", markup=False)
    for editions_got, readers in who.items():
        console.print(f"  {editions_got:<21} {', '.join(readers)}", markup=False)
    console.print(f"  captured mail         {out_dir / 'mail'} ({len(mail)} .eml files)")
    for path in staff_mail:
        console.print(f"  mail to staff         {_subject(path)}  ({path.name})", markup=False)
    for path in joined:
        console.print(f"  new reader            {_subject(path)}  ({path.name})", markup=False)
    console.print(f"  HTML preview          {out_dir / 'preview.html'}")
    console.print(f"  config                {out_dir / 'mailer.toml'}")
    config = shlex.quote(str(out_dir / "mailer.toml"))
    console.print(
        f"  try                   {mailer_command()} --config {config} subscribers list",
        markup=False,
    )
    figures["hook_curl"] = hook_curl(settings, out_dir, moment)
    # soft_wrap: one line however narrow the terminal, so that it can be copied whole.
    console.print(f"  push (with --serve)   {figures['hook_curl']}", markup=False, soft_wrap=True)
    return figures


# The article the demo's curl line pushes: a base alert, so it leads the next alert issue.
HOOK_ARTICLE = {
    "guid": "https://news.example.org/alerts/main-gate-reopened",
    "title": "Main Gate open again after the morning closure",
    "topic": "base-alerts",
    "summary": "All lanes of the Main Gate on Holcomb Boulevard are open again.",
    "why_it_matters": "Commuters can use their usual route; expect slow traffic until 9 a.m.",
    "body": "Military police reopened the gate at 7:40 a.m. after clearing a disabled truck.",
    "link": "https://news.example.org/alerts/main-gate-reopened",
    "priority": "alert",
}


def hook_curl(settings: Settings, out_dir: Path, moment: datetime) -> str:
    """Write ``DIR/hook-article.json`` and return a ``curl`` line that posts it, signed with
    the demo's hook secret, to the local web app (``mailer demo --serve``).

    The signature is computed here over the exact bytes written, so the line runs as printed;
    after editing the file, sign it again as README "Pushing articles from the site" shows.
    """
    body = json.dumps(HOOK_ARTICLE | {"published": moment.isoformat()}, indent=2).encode()
    path = out_dir / "hook-article.json"
    path.write_bytes(body)
    assert settings.hooks.secret is not None  # the demo's config names hook.key
    signature = sign(settings.hooks.secret, body)
    return (
        f"curl -sS -X POST {LOCAL_WEB}{HOOK_PATH} -H 'Content-Type: application/json'"
        f" -H '{SIGNATURE_HEADER}: {signature}' --data-binary @{shlex.quote(str(path))}"
    )


async def join(engine: sa.Engine, settings: Settings, *, now: datetime, renderer: Renderer) -> None:
    """``DEMO_READER`` signs up and confirms through the calls the web app makes: the sign-up
    recorded, the confirmation mail sent, the button's confirmation, then the welcome mail."""
    sender = SmtpConfirmationSender(settings)
    consent = lifecycle.Consent(
        source="demo", ip=None, user_agent=None, policy_version=settings.site.privacy_policy_version
    )
    recipient = lifecycle.record_signup(
        engine,
        DEMO_READER,
        DEMO_READER_TOPICS,
        consent,
        DEMO_READER_DIGESTS,
        now=now,
        domain=settings.site.domain,
        daily_cap=1,
    )
    if recipient is None:
        return
    await sender.send(recipient, build_confirmation(settings, recipient, now, renderer=renderer))
    outcome, account = lifecycle.confirm(engine, recipient.uid, ip=None, user_agent=None, now=now)
    if outcome is lifecycle.Confirmed.ACTIVATED and account is not None:
        await send_welcome(engine, settings, sender, account.id, now=now, renderer=renderer)


def _subject(path: Path) -> str:
    """A captured message's subject on one line (a folded header unfolds with a leading
    space in the email package)."""
    subject = message_from_bytes(path.read_bytes(), policy=policy.default)["Subject"]
    return " ".join(str(subject).split())


def _subjects_by_digest(mail: list[Path]) -> dict[str, list[str]]:
    """The distinct subjects readers got, per digest key (from each Message-ID's prefix,
    ``issues.create.message_id_prefix``): a reader whose topics leave articles out gets a
    subject of their own copy."""
    found: dict[str, list[str]] = {}
    for path in mail:
        message = message_from_bytes(path.read_bytes(), policy=policy.default)
        key = str(message["Message-ID"]).strip().lstrip("<").split(".", 1)[0]
        subject = " ".join(str(message["Subject"]).split())
        if subject not in found.setdefault(key, []):
            found[key].append(subject)
    return found


def who_got_what(engine: sa.Engine, issue_ids: tuple[int, ...]) -> dict[str, list[str]]:
    """Which readers got which of the demo's issues: "got weekly only", "got alerts only",
    "got both", each with the addresses, in that order."""
    with reading(engine) as conn:
        rows = conn.execute(
            sa.select(subscribers.c.email, issues.c.digest)
            .join(deliveries, deliveries.c.subscriber_id == subscribers.c.id)
            .join(issues, issues.c.id == deliveries.c.issue_id)
            .where(deliveries.c.issue_id.in_(issue_ids), deliveries.c.status == "sent")
            .order_by(subscribers.c.email)
        ).all()
    got: dict[str, set[str]] = {}
    for email, key in rows:
        got.setdefault(email, set()).add(key)
    labels = {
        ("weekly",): "got weekly only",
        ("alerts",): "got alerts only",
        ("alerts", "weekly"): "got both",
    }
    out: dict[str, list[str]] = {label: [] for label in labels.values()}
    for email, keys in got.items():
        chosen = tuple(sorted(keys))
        out.setdefault(labels.get(chosen, "got " + " and ".join(chosen)), []).append(email)
    return {label: emails for label, emails in out.items() if emails}


def mailer_command(executable: str | None = None, cwd: Path | None = None) -> str:
    """How to run ``mailer`` from here: the script beside the running interpreter.

    ``make demo`` installs into ``.venv`` without putting it on PATH, so a bare ``mailer``
    would not be found. Relative to ``cwd`` when the script lies inside it
    (``.venv/bin/mailer``), else absolute; ``python -m mailer`` when there is no script.
    """
    python = Path(os.path.abspath(executable or sys.executable))  # not resolved: a venv's link
    here = Path(os.path.abspath(cwd or Path.cwd()))
    script = python.parent / ("mailer.exe" if os.name == "nt" else "mailer")
    if not script.is_file():
        return f"{shlex.quote(str(python))} -m mailer"
    try:
        relative = script.relative_to(here)
    except ValueError:
        return shlex.quote(str(script))
    # A shell looks a bare name up on PATH: beside it, say ./mailer.
    return shlex.quote(str(relative) if relative.parent != Path(".") else f"./{relative}")
