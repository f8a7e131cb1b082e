"""`mailer articles show ID` and `mailer articles remove ID`, through the CLI, on both databases."""

from __future__ import annotations

from datetime import timedelta
from email import message_from_bytes, policy
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from mailer.cli import cli, main
from mailer.config.load import load_settings
from mailer.db.engine import create_engine
from mailer.db.schema import events, issue_articles
from mailer.delivery.pool import SmtpPool
from mailer.delivery.worker import Deliverer
from tests.factories import ALERTS, NOW, SECRET, config_dict, make_issue, write_config
from tests.smtp_server import FaultServer, smtp_server  # noqa: F401


def article_file(folder: Path, name: str, title: str, topic: str = "base-alerts") -> Path:
    path = folder / f"{name}.md"
    path.write_text(
        f'+++\ntitle = "{title}"\ntopic = "{topic}"\npublished = 2026-11-20T10:00:00Z\n'
        f'link = "https://news.example.org/{name}"\n+++\n## Summary\n\n{title}: details.\n\n'
        f"The body of {name}.\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def config(
    tmp_path: Path,
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
    smtp_server: FaultServer,  # noqa: F811
) -> Path:
    monkeypatch.setenv("MAILER_SECRET_KEY", SECRET)
    for commands in ("articles", "issues", "running", "subscribers", "bounces"):
        # 07:00 EST on 20 November 2026
        monkeypatch.setattr(f"mailer.cli.{commands}.now", lambda: NOW)
    weekly = config_dict()["digests"][0]
    return write_config(
        tmp_path / "mailer.toml",
        db_url,
        smtp={"host": "127.0.0.1", "port": smtp_server.port, "timeout": 5, "batch_size": 1},
        digests=[weekly, ALERTS],
    )


def run(config: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--config", str(config), *args], catch_exceptions=False)


def issue_article_ids(engine: sa.Engine, issue_id: int) -> list[int]:
    with engine.connect() as conn:
        return list(
            conn.scalars(
                sa.select(issue_articles.c.article_id).where(issue_articles.c.issue_id == issue_id)
            )
        )


async def test_show_gives_every_field_arrival_and_issues_in_the_site_zone(
    config: Path,
    tmp_path: Path,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    assert run(config, "init").exit_code == 0
    assert run(config, "subscribers", "add", "ann@example.org").exit_code == 0
    added = run(config, "articles", "add", str(article_file(tmp_path, "gate", "Gate closed")))
    assert added.output.startswith("1 added")
    settings = load_settings(config)
    engine = create_engine(settings.database.url)
    try:
        alert = make_issue(engine, settings, "alerts", NOW + timedelta(minutes=10)).issue_id
        weekly = make_issue(engine, settings, "weekly", NOW + timedelta(hours=1)).issue_id
        async with SmtpPool(settings.smtp) as pool:
            await Deliverer(
                engine, settings, pool, clock=lambda: NOW + timedelta(minutes=10)
            ).drain(issue_id=alert)
    finally:
        engine.dispose()
    shown = run(config, "articles", "show", "1")
    assert shown.exit_code == 0
    lines = shown.output.splitlines()
    assert "title:     Gate closed" in lines
    assert "guid:      https://news.example.org/gate" in lines
    assert "topic:     base-alerts" in lines
    assert "published: 2026-11-20 05:00:00 EST" in lines
    assert "arrived:   2026-11-20 07:00:00 EST" in lines
    assert "expires:   -" in lines
    assert f"  {alert}  alerts  2026-11-20 07:10:00 EST  sent" in lines
    assert f"  {weekly}  weekly  2026-11-20 08:00:00 EST  sending" in lines
    assert "Gate closed: details." in lines
    assert "The body of gate." in lines
    assert not any(line.startswith("removed:") for line in lines)


async def test_remove_takes_an_article_out_of_unsent_issues_and_records_it(
    config: Path,
    tmp_path: Path,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    run(config, "init")
    for email in ("ann@example.org", "bob@example.org"):
        run(config, "subscribers", "add", email)
    run(config, "articles", "add", str(article_file(tmp_path, "gate", "Gate closed")))
    market = article_file(tmp_path, "market", "Market opens", "local-events")
    run(config, "articles", "add", str(market))
    settings = load_settings(config)
    engine = create_engine(settings.database.url)
    try:
        alerts = make_issue(engine, settings, "alerts", NOW + timedelta(minutes=10)).issue_id
        async with SmtpPool(settings.smtp) as pool:
            await Deliverer(
                engine, settings, pool, clock=lambda: NOW + timedelta(minutes=10)
            ).drain(issue_id=alerts)
        run(config, "articles", "add", str(article_file(tmp_path, "drill", "Drill tonight")))
        weekly = make_issue(engine, settings, "weekly", NOW + timedelta(hours=1)).issue_id
        assert sorted(issue_article_ids(engine, weekly)) == [1, 2, 3]
        # A worker that has rendered the weekly issue once (batch_size = 1: one message).
        async with SmtpPool(settings.smtp) as pool:
            worker = Deliverer(engine, settings, pool, clock=lambda: NOW + timedelta(hours=1))
            assert await worker.run_batch(issue_id=weekly) == {"sent": 1}
            removed = run(config, "articles", "remove", "3", "--by", "editor")
            assert removed.exit_code == 0
            assert removed.output == (
                f"article 3 removed (Drill tonight); taken out of unsent issues: {weekly}; "
                "no later issue will take it\n"
            )
            await worker.drain(issue_id=weekly)
        assert sorted(issue_article_ids(engine, weekly)) == [1, 2]
        assert issue_article_ids(engine, make_issue(engine, settings, "alerts", NOW).issue_id) == []
        with engine.connect() as conn:
            audit = [tuple(row) for row in conn.execute(sa.select(events.c.kind, events.c.detail))]
        assert ("article_removed", {"article": 3, "by": "editor", "issues": [weekly]}) in audit
        # Both issues went out in full: removing the gate alert now changes none of them.
        gone = run(config, "articles", "remove", "1", "--by", "editor")
        assert "taken out of unsent issues: none" in gone.output
        assert sorted(issue_article_ids(engine, alerts)) == [1]
        assert sorted(issue_article_ids(engine, weekly)) == [1, 2]
    finally:
        engine.dispose()
    bodies = [
        message_from_bytes(m.data, policy=policy.default)
        .get_body(preferencelist=("plain",))
        .get_content()  # type: ignore[union-attr]
        for m in smtp_server.received
    ]
    # Two alerts (the gate), then the weekly: the first mail before the removal, the second
    # after it, from the same worker: its cached render of the issue was dropped.
    assert ["Drill tonight" in b for b in bodies] == [False, False, True, False]
    assert ["Market opens" in b for b in bodies] == [False, False, True, True]

    shown = run(config, "articles", "show", "3").output
    assert f"removed:   2026-11-20 07:00:00 EST by editor (from issues: {weekly})" in shown
    listed = run(config, "articles", "list").output.splitlines()
    (drill_row,) = [line for line in listed if "Drill" in line]
    assert drill_row.count("2026-11-20") == 2  # published, and removed
    again = run(config, "articles", "remove", "3")
    assert again.output.startswith("article 3 was already removed 2026-11-20 07:00:00 EST")


@pytest.mark.parametrize("command", ["show", "remove"])
def test_an_unknown_article_is_one_line_and_exit_1(
    config: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run(config, "init")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "articles", command, "42"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: no article 42: `mailer articles list` shows their ids"]


def test_issues_list_shows_when_each_issue_was_scheduled_in_the_sites_zone(config: Path) -> None:
    run(config, "init")
    settings = load_settings(config)
    engine = create_engine(settings.database.url)
    make_issue(engine, settings, "weekly", NOW)  # 12:00 UTC, 07:00 in New York
    listed = run(config, "issues", "list").output
    cells = [line.split("│")[3].strip() for line in listed.splitlines() if line.startswith("│")]
    assert cells == ["2026-11-20 07:00 EST"]  # whole, on one line: not a terminal
    engine.dispose()


def test_listings_print_whole_values_when_not_on_a_terminal(config: Path, tmp_path: Path) -> None:
    run(config, "init")
    title = "Gate 2 opens early Friday for the holiday convoy, and Gate 5 stays closed until noon"
    assert len(title) > 80
    run(config, "articles", "add", str(article_file(tmp_path, "gate", title)))
    listed = run(config, "articles", "list").output
    (row,) = [line for line in listed.splitlines() if "Gate 2" in line]
    assert title in row and "…" not in listed
    settings = load_settings(config)
    engine = create_engine(settings.database.url)
    make_issue(engine, settings, "weekly", NOW)
    issues = run(config, "issues", "list").output
    subject = "Camp Lejeune & New River Updates — week of 20 November"
    (issue_row,) = [line for line in issues.splitlines() if "Camp Lejeune" in line]
    assert subject in issue_row and len(issue_row) > 80 and "…" not in issues
    engine.dispose()


def test_show_and_list_print_an_alerts_priority(config: Path, tmp_path: Path) -> None:
    path = article_file(tmp_path, "gate", "Main Gate closed")
    path.write_text(path.read_text().replace("+++\ntitle", '+++\npriority = "alert"\ntitle'))
    article_file(tmp_path, "parade", "Parade route announced", topic="local-events")
    assert run(config, "articles", "add", str(path), str(tmp_path / "parade.md")).exit_code == 0
    listed = run(config, "articles", "list").output
    [gate] = [line for line in listed.splitlines() if "Main Gate closed" in line]
    [parade] = [line for line in listed.splitlines() if "Parade route" in line]
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in (gate, parade)]
    assert cells[0][-1] == "alert" and cells[1][-1] == ""
    article_id = cells[0][0]
    shown = run(config, "articles", "show", article_id).output
    assert "priority:  alert" in shown
