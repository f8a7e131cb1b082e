"""Digests the reader picks: the config keys, who gets which issue, a pause per digest, the
migration that gave every existing subscriber the digests they were getting, CSV and CLI."""

from __future__ import annotations

import csv
import io
import re
import shutil
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from mailer.cli import cli
from mailer.config.settings import Settings
from mailer.db.engine import SCHEMA_HEAD, _alembic_config, create_engine, migrate
from mailer.db.schema import UtcDateTime, deliveries, subscriber_digests, subscribers
from mailer.errors import ConfigError, MailerError
from mailer.issues.create import recipients_where
from mailer.subscribers import csvfile, editions, lifecycle, store
from mailer.subscribers.editions import Choice
from mailer.subscribers.tokens import Purpose, make_token
from mailer.web.server import ServerThread
from tests.browser import DESKTOP, PHONE, fits, page_at
from tests.factories import (
    ALERTS,
    NOW,
    SECRET,
    TOPICS,
    config_dict,
    make_settings,
    make_subscriber,
    server_settings,
    write_config,
)
from tests.served import at, serve
from tests.smtp_server import FaultServer, smtp_server  # noqa: F401
from tests.test_content_rules import issue, publish, send

WEEKLY = config_dict()["digests"][0] | {"description": "Every Friday morning"}
ALERT_DIGEST = ALERTS | {"description": "Breaking base alerts, as they happen"}


def both(db_url: str, server: FaultServer | None = None, **extra: Any) -> Settings:
    """Settings with the weekly digest and the alerts, both public."""
    digests = [WEEKLY | extra.pop("weekly", {}), ALERT_DIGEST | extra.pop("alerts", {})]
    if server is None:
        return make_settings(db_url, digests=digests, **extra)
    return server_settings(db_url, server, digests=digests, **extra)


# --- config ---------------------------------------------------------------------------------


def test_digests_are_public_undescribed_and_default_unless_told() -> None:
    settings = make_settings(digests=[config_dict()["digests"][0]])
    (weekly,) = settings.digests
    assert (weekly.public, weekly.description, weekly.default) == (True, "", True)
    hidden = make_settings(digests=[WEEKLY | {"public": False}])
    assert (hidden.digests[0].public, hidden.digests[0].default) == (False, False)
    assert editions.defaults(both("sqlite://", alerts={"default": False}).digests) == ("weekly",)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"public": False, "default": True},
            r"\[digests\[1\]\]\.default \(digest 'alerts'\) cannot be true when public = false",
        ),
        ({"public": "yes"}, r"\[digests\[1\]\]\.public \(digest 'alerts'\) must be true or false"),
        ({"default": 1}, r"\[digests\[1\]\]\.default \(digest 'alerts'\) must be true or false"),
        (
            {"description": "Breaking\nalerts"},
            r"\[digests\[1\]\]\.description \(digest 'alerts'\) must be one line",
        ),
        ({"description": "x" * 201}, r"\[digests\[1\]\]\.description .* at most 200 characters"),
        ({"description": 3}, r"\[digests\[1\]\]\.description \(digest 'alerts'\) must be a string"),
    ],
    ids=["default-not-public", "public-not-bool", "default-not-bool", "two-lines", "long", "int"],
)
def test_bad_edition_keys_name_the_digest_and_key(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        both("sqlite://", alerts=entry)


def test_parse_digests_names_an_unknown_key_and_gives_the_defaults_for_none() -> None:
    digests = both("sqlite://", alerts={"default": False}).digests
    assert editions.parse_digests("alerts; weekly", digests) == ("weekly", "alerts")
    assert editions.parse_digests("", digests) == ("weekly",)
    with pytest.raises(ValueError, match=r"unknown digest 'monthly' \(known: weekly, alerts\)"):
        editions.parse_digests("weekly;monthly", digests)


# --- who gets which issue -------------------------------------------------------------------


def recipients(server: FaultServer) -> list[tuple[str, set[str]]]:
    """Each accepted message as (recipient, the article titles in it), in order."""
    out = []
    for received in server.received:
        text = received.data.decode("ascii")
        out.append(
            (received.recipients[0], {t for t in ("alpha", "bravo", "charlie") if t in text})
        )
    return out


async def test_each_reader_gets_only_the_digests_they_chose_and_no_article_twice(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    settings = both(db_url, smtp_server)
    make_subscriber(engine, email="weekly@example.org", digests=["weekly"])
    make_subscriber(engine, email="alerts@example.org", digests=["alerts"])
    make_subscriber(engine, email="both@example.org", digests=["weekly", "alerts"])
    publish(engine, "alpha", "base-alerts", NOW - timedelta(hours=3))
    issue(engine, settings, "alerts", NOW)
    await send(engine, settings, NOW)
    assert sorted(recipients(smtp_server)) == [
        ("alerts@example.org", {"alpha"}),
        ("both@example.org", {"alpha"}),
    ]
    # The weekly issue takes alpha too (both digests take it) and bravo.
    publish(engine, "bravo", "local-events", NOW + timedelta(hours=1))
    weekly = issue(engine, settings, "weekly", NOW + timedelta(hours=2))
    await send(engine, settings, NOW + timedelta(hours=2))
    assert sorted(recipients(smtp_server)[2:]) == [
        ("both@example.org", {"bravo"}),  # alpha came with the alert: not again
        ("weekly@example.org", {"alpha", "bravo"}),
    ]
    with engine.connect() as conn:
        took = conn.scalar(
            sa.text("SELECT count(*) FROM issue_articles WHERE issue_id = :i"), {"i": weekly}
        )
    assert took == 2


async def test_a_pause_stops_one_digest_and_leaves_the_other(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    settings = both(db_url, smtp_server)
    reader = make_subscriber(engine, email="ann@example.org", digests=["weekly", "alerts"])
    lifecycle.pause(engine, reader.uid, ["weekly"], NOW + timedelta(days=14), now=NOW)
    publish(engine, "alpha", "base-alerts", NOW - timedelta(hours=1))
    assert issue(engine, settings, "alerts", NOW)
    weekly = issue(engine, settings, "weekly", NOW + timedelta(minutes=5))
    await send(engine, settings, NOW + timedelta(minutes=5))
    assert recipients(smtp_server) == [("ann@example.org", {"alpha"})]
    with engine.connect() as conn:
        queued = conn.scalar(sa.select(sa.func.count()).where(deliveries.c.issue_id == weekly))
    assert queued == 0  # the weekly issue was made without the paused reader
    # The pause ends: the next weekly issue comes (what the alert brought is not repeated).
    publish(engine, "bravo", "local-events", NOW + timedelta(days=15))
    issue(engine, settings, "weekly", NOW + timedelta(days=15, hours=1))
    await send(engine, settings, NOW + timedelta(days=15, hours=1))
    assert recipients(smtp_server)[1:] == [("ann@example.org", {"bravo"})]


async def test_pausing_after_the_snapshot_cancels_what_is_not_sent_yet(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    settings = both(db_url, smtp_server)
    ann = make_subscriber(engine, email="ann@example.org", digests=["alerts"])
    make_subscriber(engine, email="bob@example.org", digests=["alerts"])
    publish(engine, "alpha", "base-alerts", NOW - timedelta(hours=1))
    alert = issue(engine, settings, "alerts", NOW)
    lifecycle.pause(engine, ann.uid, None, editions.UNTIL_RESUMED, now=NOW)
    await send(engine, settings, NOW)
    assert recipients(smtp_server) == [("bob@example.org", {"alpha"})]
    with engine.connect() as conn:
        rows = dict(
            conn.execute(
                sa.select(subscribers.c.email, deliveries.c.status)
                .join(subscribers, subscribers.c.id == deliveries.c.subscriber_id)
                .where(deliveries.c.issue_id == alert)
            ).all()
        )
    assert rows == {"ann@example.org": "cancelled", "bob@example.org": "sent"}


def test_chosen_digests_are_in_config_order_with_their_pause(engine: sa.Engine) -> None:
    settings = both("sqlite://")
    reader = make_subscriber(engine, digests=["alerts", "weekly", "retired"])
    lifecycle.pause(engine, reader.uid, ["alerts"], NOW + timedelta(days=7), now=NOW)
    with engine.connect() as conn:
        chosen = editions.chosen_digests(conn, settings, reader.id)
    assert [(c.key, c.paused_until) for c in chosen] == [
        ("weekly", None),
        ("alerts", NOW + timedelta(days=7)),
    ]
    assert chosen[1].paused(NOW) and not chosen[1].paused(NOW + timedelta(days=7))


# --- the migration --------------------------------------------------------------------------


OLD_SUBSCRIBERS = sa.table(
    "subscribers",
    sa.column("id"),
    sa.column("uid"),
    sa.column("email"),
    sa.column("status"),
    sa.column("created_at", UtcDateTime),
    sa.column("updated_at", UtcDateTime),
    sa.column("paused_until", UtcDateTime),
)
# (email, status, topics, paused for days): the mix a list at 0009 holds.
PEOPLE = [
    ("all@example.org", "active", TOPICS, None),
    ("alerts-only@example.org", "active", ("base-alerts",), None),
    ("events@example.org", "active", ("local-events",), None),
    ("paused@example.org", "active", ("base-alerts", "military-news"), 9),
    ("left@example.org", "unsubscribed", TOPICS, None),
]


def old_recipients(conn: sa.Connection, topics: tuple[str, ...], now: datetime) -> set[str]:
    """Who an issue with articles in ``topics`` went to at revision 0009 (its own clause)."""
    rows = conn.execute(
        sa.text(
            "SELECT email FROM subscribers WHERE status = 'active'"
            " AND id IN (SELECT subscriber_id FROM subscriber_topics WHERE topic IN :topics)"
            " AND (paused_until IS NULL OR paused_until <= :now)"
        ).bindparams(
            sa.bindparam("topics", expanding=True), sa.bindparam("now", type_=UtcDateTime)
        ),
        {"topics": list(topics), "now": now},
    )
    return {email for (email,) in rows}


def new_recipients(
    conn: sa.Connection, key: str, topics: tuple[str, ...], now: datetime
) -> set[str]:
    return set(
        conn.scalars(sa.select(subscribers.c.email).where(recipients_where(key, set(topics), now)))
    )


def test_migration_0010_keeps_everyones_mail_and_their_pause(empty_url: str) -> None:
    from alembic import command

    settings = both(empty_url)
    engine = create_engine(empty_url)
    try:
        command.upgrade(_alembic_config(engine), "0009")
        with engine.begin() as conn:
            for n, (email, status, topics, days) in enumerate(PEOPLE, start=1):
                until = NOW + timedelta(days=days) if days else None
                conn.execute(
                    OLD_SUBSCRIBERS.insert().values(
                        id=n,
                        uid=f"u{n}",
                        email=email,
                        status=status,
                        created_at=NOW,
                        updated_at=NOW,
                        paused_until=until,
                    )
                )
                conn.execute(
                    sa.text("INSERT INTO subscriber_topics VALUES (:s, :t)"),
                    [{"s": n, "t": t} for t in topics],
                )
        moments = (NOW, NOW + timedelta(days=10))
        sets = [d.topics for d in settings.digests] + [("local-events",), ("military-news",)]
        with engine.connect() as conn:
            before = {(t, m): old_recipients(conn, t, m) for t in sets for m in moments}
        # Without the config's digests the upgrade refuses, and leaves 0009 as it was.
        with pytest.raises(MailerError, match=r"needs the config's \[\[digests\]\]"):
            migrate(engine)
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT version_num FROM alembic_version")) == "0009"
        assert migrate(engine, settings.digests) == SCHEMA_HEAD
        with engine.connect() as conn:
            for digest in settings.digests:
                for topics in [t for t in sets if set(t) <= set(digest.topics)]:
                    for moment in moments:
                        assert (
                            new_recipients(conn, digest.key, topics, moment)
                            == before[(topics, moment)]
                        ), (digest.key, topics, moment)
            chosen = conn.execute(
                sa.select(
                    subscribers.c.email,
                    subscriber_digests.c.digest,
                    subscriber_digests.c.paused_until,
                )
                .join(subscribers, subscribers.c.id == subscriber_digests.c.subscriber_id)
                .order_by(subscribers.c.email, subscriber_digests.c.digest)
            ).all()
            columns = {c["name"] for c in sa.inspect(conn).get_columns("subscribers")}
        assert "paused_until" not in columns
        paused = NOW + timedelta(days=9)
        assert [tuple(r) for r in chosen] == [
            ("alerts-only@example.org", "alerts", None),
            ("alerts-only@example.org", "weekly", None),
            ("all@example.org", "alerts", None),
            ("all@example.org", "weekly", None),
            ("events@example.org", "weekly", None),
            ("left@example.org", "alerts", None),
            ("left@example.org", "weekly", None),
            ("paused@example.org", "alerts", paused),
            ("paused@example.org", "weekly", paused),
        ]
        # Back down: the one pause again, for whoever paused every digest.
        command.downgrade(_alembic_config(engine), "0009")
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(OLD_SUBSCRIBERS.c.email, OLD_SUBSCRIBERS.c.paused_until)
            ).all()
            back = {email: until for email, until in rows}
        assert back["paused@example.org"] == paused and back["all@example.org"] is None
    finally:
        engine.dispose()


# --- CSV and the command line ---------------------------------------------------------------

CSV = (
    "email,name,topics,status,digests\n"
    "ann@example.org,Ann,base-alerts,active,alerts\n"
    "bob@example.org,Bob,,active,weekly;alerts\n"
    "cy@example.org,Cy,local-events,active,\n"
    "dee@example.org,Dee,,active,monthly\n"
)


def test_csv_digests_go_in_and_come_back_out_unchanged(engine: sa.Engine) -> None:
    settings = both("sqlite://", alerts={"default": False})
    report = csvfile.import_csv(
        engine, io.StringIO(CSV), known_topics=TOPICS, digests=settings.digests, now=NOW
    )
    assert report.added == 3
    assert [str(e) for e in report.errors] == [
        "row 5 (dee@example.org): unknown digest 'monthly' (known: weekly, alerts)"
    ]
    exported = csvfile.export_text(engine)
    rows = {r["email"]: r["digests"] for r in csv.DictReader(io.StringIO(exported))}
    # An empty cell gives the defaults (here only the weekly).
    assert rows == {
        "ann@example.org": "alerts",
        "bob@example.org": "alerts;weekly",
        "cy@example.org": "weekly",
    }
    again = csvfile.import_csv(
        engine,
        io.StringIO(exported),
        known_topics=TOPICS,
        digests=settings.digests,
        now=NOW,
        update=True,
    )
    assert (again.added, again.updated, again.unchanged) == (0, 0, 3)
    assert csvfile.export_text(engine) == exported


def test_a_blank_digests_cell_keeps_an_existing_readers_choice(engine: sa.Engine) -> None:
    settings = both("sqlite://")
    make_subscriber(engine, email="ann@example.org", topics=["base-alerts"], digests=[])
    make_subscriber(engine, email="bob@example.org", topics=["base-alerts"], digests=["alerts"])
    exported = csvfile.export_text(engine)
    assert {r["email"]: r["digests"] for r in csv.DictReader(io.StringIO(exported))} == {
        "ann@example.org": "",
        "bob@example.org": "alerts",
    }
    blank = "email,name,topics,digests\nbob@example.org,,base-alerts,\nnew@example.org,,,\n"
    for text in (exported, blank):
        csvfile.import_csv(
            engine,
            io.StringIO(text),
            known_topics=TOPICS,
            digests=settings.digests,
            now=NOW,
            update=True,
        )
        # Nobody is signed up to the defaults by a round trip or a blank cell.
        assert store.get(engine, "ann@example.org").digest_keys == ()
        assert store.get(engine, "bob@example.org").digest_keys == ("alerts",)
    # A new reader with a blank cell gets the defaults.
    assert store.get(engine, "new@example.org").digest_keys == ("alerts", "weekly")


def test_csv_update_changes_digests_only_when_the_file_has_them(engine: sa.Engine) -> None:
    settings = both("sqlite://")
    ann = make_subscriber(engine, email="ann@example.org", topics=["base-alerts"], name="Ann")
    lifecycle.pause(engine, ann.uid, ["alerts"], NOW + timedelta(days=7), now=NOW)
    without = "email,name,topics\nann@example.org,Ann,base-alerts\nnew@example.org,New,\n"
    report = csvfile.import_csv(
        engine,
        io.StringIO(without),
        known_topics=TOPICS,
        digests=settings.digests,
        now=NOW,
        update=True,
    )
    assert (report.added, report.unchanged) == (1, 1)
    assert store.get(engine, "new@example.org").digest_keys == ("alerts", "weekly")
    with_column = "email,name,topics,digests\nann@example.org,Ann,base-alerts,alerts\n"
    report = csvfile.import_csv(
        engine,
        io.StringIO(with_column),
        known_topics=TOPICS,
        digests=settings.digests,
        now=NOW,
        update=True,
    )
    assert report.updated == 1
    # The digest kept keeps its pause.
    assert store.get(engine, "ann@example.org").digests == (
        Choice("alerts", NOW + timedelta(days=7)),
    )


@pytest.fixture
def config(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MAILER_SECRET_KEY", SECRET)
    return write_config(
        tmp_path / "mailer.toml", db_url, digests=[WEEKLY, ALERT_DIGEST | {"default": False}]
    )


def run(config: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--config", str(config), *args], catch_exceptions=False)


def test_cli_add_show_and_list_by_digest(config: Path, db_url: str) -> None:
    assert run(config, "init").exit_code == 0
    added = run(config, "subscribers", "add", "ann@example.org", "--digest", "alerts")
    assert "digests: alerts)" in added.output
    plain = run(config, "subscribers", "add", "bob@example.org")
    assert "digests: weekly)" in plain.output  # the defaults
    bad = run(config, "subscribers", "add", "cy@example.org", "--digest", "monthly")
    assert bad.exit_code == 2
    assert "unknown digest 'monthly' (known: weekly, alerts)" in bad.output
    engine = create_engine(db_url)
    try:
        ann = store.get(engine, "ann@example.org")
        lifecycle.pause(engine, ann.uid, ["alerts"], editions.UNTIL_RESUMED, now=NOW)
    finally:
        engine.dispose()
    shown = run(config, "subscribers", "show", "ann@example.org").output
    assert "digest          alerts (Base alerts), paused until resumed" in shown
    bob = run(config, "subscribers", "show", "bob@example.org").output
    assert re.search(r"digest +weekly \(Weekly digest\)\n", bob)
    listed = run(config, "subscribers", "list", "--digest", "alerts", "--format", "csv")
    assert [r["email"] for r in csv.DictReader(io.StringIO(listed.output))] == ["ann@example.org"]
    unknown = run(config, "subscribers", "list", "--digest", "monthly")
    assert unknown.exit_code == 2 and "'monthly' is not a digest" in unknown.output


# --- the pages ------------------------------------------------------------------------------


@pytest.fixture
def site(
    tmp_path: Path,
    sqlite_template: Path,
    smtp_server: FaultServer,  # noqa: F811
) -> Iterator[tuple[ServerThread, sa.Engine, Settings]]:
    """The app with both digests on 127.0.0.1 and an ephemeral port."""
    database = tmp_path / "mailer.db"
    shutil.copy(sqlite_template, database)
    url = f"sqlite:///{database}"
    with serve(lambda base: both(url, smtp__port=smtp_server.port, **at(base))) as site:
        yield site


@pytest.mark.browser
@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone", "desktop"])
def test_sign_up_with_a_digest_choice_in_a_real_browser(
    site: tuple[ServerThread, sa.Engine, Settings],
    browser: Any,
    shots: Path,
    viewport: dict[str, int],
) -> None:
    server, engine, _settings = site
    size = viewport["width"]
    page = page_at(browser, viewport)
    try:
        page.goto(server.url + "/")
        assert page.inner_text("#digests legend") == "Which emails?"
        assert "Breaking base alerts, as they happen" in page.inner_text("#digests")
        assert not page.is_checked("#digest-weekly") and not page.is_checked("#digest-alerts")
        assert fits(page)
        page.screenshot(path=shots / f"editions-{size}-01-signup.png", full_page=True)
        page.fill("#email", f"reader{size}@example.org")
        page.check("#topic-base-alerts")
        page.check("#consent")
        page.click("button[type=submit]")
        assert "Choose at least one email to receive." in page.inner_text(".error-summary")
        assert page.is_checked("#topic-base-alerts")
        assert fits(page)
        page.screenshot(path=shots / f"editions-{size}-02-no-digest.png", full_page=True)
        page.check("#digest-alerts")
        page.check("#consent")
        page.click("button[type=submit]")
        page.wait_for_selector("text=Check your inbox")
        reader = store.get(engine, f"reader{size}@example.org")
        assert (reader.status, reader.digest_keys) == ("pending", ("alerts",))
    finally:
        page.context.close()


@pytest.mark.browser
@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone", "desktop"])
def test_pause_the_weekly_and_keep_the_alerts_in_a_real_browser(
    site: tuple[ServerThread, sa.Engine, Settings],
    browser: Any,
    shots: Path,
    viewport: dict[str, int],
) -> None:
    server, engine, settings = site
    size = viewport["width"]
    reader = make_subscriber(engine, email="ann@example.org", digests=["weekly", "alerts"])
    token = make_token(settings.site.require_secret(), Purpose.PREFERENCES, reader.uid)
    page = page_at(browser, viewport)
    try:
        page.goto(f"{server.url}/preferences/{token}")
        assert fits(page)
        page.screenshot(path=shots / f"editions-{size}-03-preferences.png", full_page=True)
        page.select_option("#pause-weekly", "14")
        page.click("form.pause:has(#pause-weekly) button")
        page.wait_for_selector("text=Weekly digest: paused for 14 days")
        choices = {c.key: c for c in store.get(engine, "ann@example.org").digests}
        assert choices["weekly"].paused_until is not None and choices["alerts"].paused_until is None
        assert page.is_visible("button:text('Resume Weekly digest')")
        assert fits(page)
        page.screenshot(path=shots / f"editions-{size}-04-weekly-paused.png", full_page=True)
        page.select_option("#pause-all", "resume")
        page.click("form.pause:has(#pause-all) button")
        page.wait_for_selector("text=Everything: paused until you resume it.")
        assert all(c.until_resumed for c in store.get(engine, "ann@example.org").digests)
        page.click("button:text('Resume everything')")
        page.wait_for_selector("text=Resumed")
        assert all(c.paused_until is None for c in store.get(engine, "ann@example.org").digests)
        page.uncheck("#digest-weekly")
        page.click("button:text('Save emails')")
        page.wait_for_selector("text=Saved. You will get: Base alerts.")
        assert store.get(engine, "ann@example.org").digest_keys == ("alerts",)
    finally:
        page.context.close()


def test_personal_export_lists_the_digests_with_their_pause(engine: sa.Engine) -> None:
    from mailer.subscribers import personal

    reader = make_subscriber(engine, digests=["weekly", "alerts"])
    lifecycle.pause(engine, reader.uid, ["weekly"], NOW + timedelta(days=7), now=NOW)
    data = personal.export(engine, reader.uid)
    assert data is not None
    assert data["digests"] == [
        {"digest": "alerts", "chosen_at": NOW.isoformat(), "paused_until": None},
        {
            "digest": "weekly",
            "chosen_at": NOW.isoformat(),
            "paused_until": (NOW + timedelta(days=7)).isoformat(),
        },
    ]
    assert "paused_until" not in data["subscriber"]


def test_the_sign_up_form_offers_public_digests_only_and_asks_for_one(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    from tests.test_web import make_web

    web = make_web(
        engine,
        db_url,
        smtp_server,
        config={"digests": [WEEKLY, ALERT_DIGEST | {"public": False, "default": False}]},
    )
    html = web.client.get("/").text
    assert 'value="weekly"' in html and "Every Friday morning" in html
    assert 'value="alerts"' not in html
    shown = {"digests_shown": "1"}
    none = web.subscribe("ann@example.org", **shown)
    assert none.status_code == 400 and "Choose at least one email to receive." in none.text
    hidden = web.subscribe("ann@example.org", digest="alerts", **shown)
    assert hidden.status_code == 400 and "“alerts” is not one of our emails" in hidden.text
    assert web.subscribe("ann@example.org", digest="weekly", **shown).status_code == 200
    assert store.get(engine, "ann@example.org").digest_keys == ("weekly",)
    # A form made before digests could be chosen (an old embed) sends none: the defaults.
    assert web.subscribe("bob@example.org").status_code == 200
    assert store.get(engine, "bob@example.org").digest_keys == ("weekly",)


def test_signing_up_again_after_leaving_starts_unpaused(engine: sa.Engine) -> None:
    reader = make_subscriber(engine, email="ann@example.org", digests=["weekly"])
    lifecycle.pause(engine, reader.uid, None, editions.UNTIL_RESUMED, now=NOW)
    lifecycle.unsubscribe(engine, reader.uid, now=NOW, via="page")
    consent = lifecycle.Consent("web:signup", None, None, "1")
    lifecycle.record_signup(
        engine,
        "ann@example.org",
        TOPICS,
        consent,
        ["weekly", "alerts"],
        now=NOW,
        domain="news.example.org",
        daily_cap=3,
    )
    assert store.get(engine, "ann@example.org").digests == (Choice("alerts"), Choice("weekly"))
