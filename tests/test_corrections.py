"""`mailer articles retract ID [--correction TEXT]`: the article leaves every unsent issue, and
a correction reaches exactly the readers who received it, once, through a real SMTP server,
on both databases."""

from __future__ import annotations

import warnings
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from starlette.exceptions import StarletteDeprecationWarning

from mailer.cli import cli, main
from mailer.config.load import load_settings
from mailer.content.files import load_article_file
from mailer.content.store import upsert_articles
from mailer.db.engine import create_engine
from mailer.db.schema import deliveries, issue_articles, issues, subscriber_digests
from mailer.delivery.pool import SmtpPool
from mailer.delivery.worker import Deliverer
from mailer.subscribers.store import set_status
from mailer.web import SmtpConfirmationSender, create_app
from tests.compliance import assert_compliant
from tests.factories import (
    ALERTS,
    NOW,
    SECRET,
    TOPICS,
    config_dict,
    make_issue,
    make_subscriber,
    write_config,
)
from tests.smtp_server import FaultServer, smtp_server  # noqa: F401
from tests.test_article_commands import article_file

with warnings.catch_warnings():
    # Starlette 1.x prefers httpx2 for its TestClient and warns when it falls back to httpx.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

ALERT_AT = NOW + timedelta(minutes=10)
WEEKLY_AT = NOW + timedelta(hours=1)


@pytest.fixture
def config(
    tmp_path: Path,
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
    smtp_server: FaultServer,  # noqa: F811
) -> Path:
    monkeypatch.setenv("MAILER_SECRET_KEY", SECRET)
    for commands in ("articles", "issues", "running", "subscribers"):
        monkeypatch.setattr(f"mailer.cli.{commands}.now", lambda: WEEKLY_AT + timedelta(hours=1))
    weekly = config_dict()["digests"][0]
    return write_config(
        tmp_path / "mailer.toml",
        db_url,
        smtp={"host": "127.0.0.1", "port": smtp_server.port, "timeout": 5},
        digests=[weekly, ALERTS],
    )


def run(config: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--config", str(config), *args], catch_exceptions=False)


def add(config: Path, path: Path) -> None:
    """``mailer articles add PATH``, which must succeed."""
    result = run(config, "articles", "add", str(path))
    assert result.exit_code == 0, result.output


def article_ids(engine: sa.Engine, issue_id: int) -> list[int]:
    with engine.connect() as conn:
        return sorted(
            conn.scalars(
                sa.select(issue_articles.c.article_id).where(issue_articles.c.issue_id == issue_id)
            )
        )


async def send_all(engine: sa.Engine, config: Path, at: datetime) -> None:
    """Send everything due at ``at``, alerts and corrections first."""
    settings = load_settings(config)
    async with SmtpPool(settings.smtp) as pool:
        await Deliverer(engine, settings, pool, clock=lambda: at).drain()


async def test_a_correction_reaches_exactly_those_who_received_the_article_once(
    config: Path,
    tmp_path: Path,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    assert run(config, "init").exit_code == 0
    settings = load_settings(config)
    engine = create_engine(settings.database.url)
    try:
        everything = {"topics": ["base-alerts", "local-events"], "digests": ["alerts", "weekly"]}
        make_subscriber(engine, email="ann@example.org", **everything)
        make_subscriber(engine, email="cara@example.org", **everything)
        erin = make_subscriber(engine, email="erin@example.org", **everything)
        # Dan reads the weekly for local events only: his copy leaves the gate alert out.
        make_subscriber(
            engine, email="dan@example.org", topics=["local-events"], digests=["weekly"]
        )
        add(config, article_file(tmp_path, "gate", "Gate closed"))
        market = article_file(tmp_path, "market", "Market opens", "local-events")
        add(config, market)
        make_issue(engine, settings, "alerts", ALERT_AT)
        await send_all(engine, config, ALERT_AT)
        # The weekly takes the gate again: Ann, Cara and Erin had it already, so their copies
        # leave it out (never the same article twice).
        weekly = make_issue(engine, settings, "weekly", WEEKLY_AT).issue_id
        assert article_ids(engine, weekly) == [1, 2]
        await send_all(engine, config, WEEKLY_AT)
        # Since: Cara unsubscribed, Erin paused every digest, Bob joined.
        set_status(engine, "cara@example.org", "unsubscribed", now=WEEKLY_AT, source="test")
        with engine.begin() as conn:
            conn.execute(
                subscriber_digests.update()
                .where(subscriber_digests.c.subscriber_id == erin.id)
                .values(paused_until=WEEKLY_AT + timedelta(days=30))
            )
        make_subscriber(engine, email="bob@example.org", **everything)
        before = len(smtp_server.received)
        # The alert to three readers; the weekly to four (Dan's and the others' copies
        # without the gate).
        assert sorted(m.recipients[0] for m in smtp_server.received) == sorted(
            ["ann@example.org", "cara@example.org", "erin@example.org"] * 2 + ["dan@example.org"]
        )
        gate_copies = [m.recipients[0] for m in smtp_server.received if b"Gate closed" in m.data]
        assert sorted(gate_copies) == ["ann@example.org", "cara@example.org", "erin@example.org"]

        plain = run(config, "articles", "retract", "1", "--by", "editor")
        assert plain.exit_code == 0, plain.output
        assert plain.output == (
            "article 1 retracted (Gate closed); taken out of unsent issues: none\n"
            "3 readers received it; add --correction TEXT to tell them\n"
        )
        text = "The gate reopened at 06:00; the closure notice was sent in error."
        fixed = run(config, "articles", "retract", "1", "--correction", text, "--by", "editor")
        assert fixed.exit_code == 0, fixed.output
        assert fixed.output.splitlines()[0] == "article 1 was already retracted"
        with engine.connect() as conn:
            correction = conn.execute(sa.select(issues).where(issues.c.corrects_article == 1)).one()
            assert correction.kind == "correction"
            priorities = set(
                conn.scalars(
                    sa.select(deliveries.c.priority).where(deliveries.c.issue_id == correction.id)
                )
            )
        assert priorities == {1}  # claimed ahead of bulk mail, like an alert
        assert fixed.output.splitlines()[1] == (
            f"correction queued as issue {correction.id}: to 2 of the 3 readers who received it"
            " (the others no longer receive mail)"
        )
        await send_all(engine, config, WEEKLY_AT + timedelta(hours=1))
        # Retracting again sends no second correction.
        again = run(config, "articles", "retract", "1", "--correction", text)
        assert again.exit_code == 0
        assert f"a correction was already made for it (issue {correction.id})" in again.output
        await send_all(engine, config, WEEKLY_AT + timedelta(hours=2))
        with engine.connect() as conn:
            status = conn.execute(
                sa.select(issues.c.status).where(issues.c.id == correction.id)
            ).scalar_one()
        assert status == "sent"
        report = run(config, "issues", "report", str(correction.id))
        assert report.exit_code == 0, report.output
        assert "Correction: Gate closed" in report.output
        # Its "View in browser" link opens it on the web.
        app = create_app(
            settings, engine, SmtpConfirmationSender(settings), clock=lambda: WEEKLY_AT
        )
        page = TestClient(app).get(f"/archive/{correction.id}")
        assert page.status_code == 200
        assert "The gate reopened at 06:00" in page.text and "Gate closed" in page.text
    finally:
        engine.dispose()

    sent = smtp_server.received[before:]
    assert sorted(m.recipients[0] for m in sent) == ["ann@example.org", "erin@example.org"]
    for message in sent:
        msg = assert_compliant(message.data, settings)
        assert msg["Subject"] == "Correction: Gate closed"
        text_part, html = (p.get_content() for p in msg.iter_parts())
        for part in (text_part, html):
            assert "The gate reopened at 06:00" in part
            assert "https://news.example.org/gate" in part
            assert "Gate closed" in part
            # When it first went out, in the site's zone (07:10 EST).
            assert "07:10 EST" in part
        assert f"https://news.example.org/archive/{correction.id}" in text_part


async def test_retracting_a_never_sent_article_takes_it_out_and_refuses_a_correction(
    config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    assert run(config, "init").exit_code == 0
    settings = load_settings(config)
    engine = create_engine(settings.database.url)
    try:
        make_subscriber(engine, email="ann@example.org")
        add(config, article_file(tmp_path, "gate", "Gate closed"))
        market = article_file(tmp_path, "market", "Market opens", "local-events")
        add(config, market)
        weekly = make_issue(engine, settings, "weekly", WEEKLY_AT).issue_id
        assert article_ids(engine, weekly) == [1, 2]
        with pytest.raises(SystemExit) as exit_info:
            main(["--config", str(config), "articles", "retract", "1", "--correction", "Wrong."])
        assert exit_info.value.code == 1
        assert capsys.readouterr().err.splitlines() == [
            "error: article 1 was never sent to anyone: retracted, no correction needed"
        ]
        # The unsent weekly no longer holds it, and goes without it.
        assert article_ids(engine, weekly) == [2]
        with engine.connect() as conn:
            assert conn.scalar(sa.select(sa.func.count()).select_from(issues)) == 1
        await send_all(engine, config, WEEKLY_AT)
    finally:
        engine.dispose()
    [message] = smtp_server.received
    assert b"Gate closed" not in message.data and b"Market opens" in message.data


@pytest.mark.parametrize("text", ["", "   ", "x" * 2001])
def test_a_bad_correction_text_is_one_line_naming_the_option(
    config: Path, text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(config, "init").exit_code == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "articles", "retract", "1", "--correction", text])
    assert exit_info.value.code == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("error: --correction: ")


@pytest.mark.parametrize("include_updates", [True, False])
async def test_an_updated_article_is_marked_only_for_readers_who_got_the_first_version(
    config: Path,
    tmp_path: Path,
    db_url: str,
    include_updates: bool,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    weekly_digest = config_dict()["digests"][0] | {"include_updates": include_updates}
    write_config(
        config,
        db_url,
        smtp={"host": "127.0.0.1", "port": smtp_server.port, "timeout": 5},
        digests=[weekly_digest, ALERTS],
    )
    assert run(config, "init").exit_code == 0
    settings = load_settings(config)
    engine = create_engine(settings.database.url)
    gate = article_file(tmp_path, "gate", "Gate closed")
    try:
        make_subscriber(engine, email="ann@example.org", topics=["base-alerts"])
        make_subscriber(engine, email="bob@example.org", topics=["base-alerts"], digests=["weekly"])
        upsert_articles(
            engine,
            [load_article_file(gate, default_topic=None, known_topics=TOPICS, now=NOW)],
            now=NOW,
        )
        make_issue(engine, settings, "alerts", ALERT_AT)
        await send_all(engine, config, ALERT_AT)
        # The site corrects the alert after Ann got it: 07:20 EST.
        gate.write_text(gate.read_text().replace("details.", "new details."))
        changed = ALERT_AT + timedelta(minutes=10)
        report = upsert_articles(
            engine,
            [load_article_file(gate, default_topic=None, known_topics=TOPICS, now=changed)],
            now=changed,
        )
        assert report.updated == 1
        make_issue(engine, settings, "weekly", WEEKLY_AT)
        await send_all(engine, config, WEEKLY_AT)
    finally:
        engine.dispose()
    mark = "Updated Friday, 20 November 2026, 07:20 EST"
    copies = {m.recipients[0]: m for m in smtp_server.received[1:]}
    # Bob sees it for the first time: no mark, in either part.
    text, html = (
        p.get_content()
        for p in assert_compliant(copies["bob@example.org"].data, settings).iter_parts()
    )
    assert "new details." in text and "Updated" not in text and "Updated" not in html
    if not include_updates:
        # Never the same article twice: Ann's copy would be empty, so she gets none.
        assert list(copies) == ["bob@example.org"]
        return
    text, html = (
        p.get_content()
        for p in assert_compliant(copies["ann@example.org"].data, settings).iter_parts()
    )
    assert "new details." in text
    assert mark in text and mark in html


async def test_quiet_hours_do_not_hold_a_correction(
    config: Path,
    tmp_path: Path,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    quiet = {"quiet_hours": "06:00-23:00"}  # local time: the whole test runs inside them
    write_config(
        config,
        db_url,
        smtp={"host": "127.0.0.1", "port": smtp_server.port, "timeout": 5},
        digests=[config_dict()["digests"][0] | quiet, ALERTS | quiet],
    )
    assert run(config, "init").exit_code == 0
    settings = load_settings(config)
    engine = create_engine(settings.database.url)
    try:
        make_subscriber(engine, email="ann@example.org", topics=["base-alerts"])
        add(config, article_file(tmp_path, "gate", "Gate closed"))
        make_issue(engine, settings, "alerts", ALERT_AT)
        await send_all(engine, config, ALERT_AT)
        fixed = run(config, "articles", "retract", "1", "--correction", "Gate open again.")
        assert fixed.exit_code == 0, fixed.output
        await send_all(engine, config, WEEKLY_AT + timedelta(hours=1))  # 09:00 EST
    finally:
        engine.dispose()
    subjects = [assert_compliant(m.data, settings)["Subject"] for m in smtp_server.received]
    assert subjects == ["Base alert", "Correction: Gate closed"]
