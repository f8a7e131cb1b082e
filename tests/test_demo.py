"""`mailer demo` on embedded defaults: every captured message meets the compliance rules."""

from __future__ import annotations

import io
import os
import shlex
import subprocess
import sys
from datetime import UTC, date, datetime
from email import message_from_bytes, policy
from pathlib import Path

import pytest
from rich.console import Console

from mailer.config.load import load_settings
from mailer.content.files import load_article_file
from mailer.db.engine import create_engine
from mailer.devtools.demo import (
    DEMO_READER,
    DEMO_STAFF,
    copy_examples,
    mailer_command,
    run_demo,
)
from mailer.subscribers.csvfile import export_text
from tests.compliance import assert_compliant

pytestmark = pytest.mark.slow


def test_demo_delivers_compliant_mail_and_leaves_a_usable_config(tmp_path: Path) -> None:
    console = Console(file=io.StringIO(), width=200)
    figures = run_demo(tmp_path, console=console)

    captured = sorted((tmp_path / "mail").glob("*.eml"))
    mail = [p for p in captured if DEMO_STAFF not in p.name and DEMO_READER not in p.name]
    assert figures["sent"] == figures["recipients"] > 0
    assert figures["alert_sent"] == figures["alert_recipients"] > 0
    assert figures["sent"] + figures["alert_sent"] == len(mail)
    # Both editions, each to the readers who chose it: some one, some both.
    assert figures["alert_articles"] == 2
    who = figures["who_got_what"]
    assert set(who) == {"got weekly only", "got alerts only", "got both"}
    assert "tom.nguyen@example.org" in who["got alerts only"]
    assert "james.okafor@example.com" in who["got weekly only"]
    assert "hannah.pike@example.net" in who["got both"]
    # Every sample article goes out, whatever the day: the sample week is dated this week.
    assert figures["issue_articles"] == figures["articles_added"] == 6
    settings = load_settings(tmp_path / "mailer.toml", env={})
    assert settings.site.base_url.startswith("https://")
    for path in mail:
        message = assert_compliant(path.read_bytes(), settings)
        assert message["To"] in path.name
    assert (tmp_path / "preview.html").read_text(encoding="utf-8").startswith("<!")
    engine = create_engine(settings.database.url)
    assert "maria.alvarez@example.org" in export_text(engine)
    engine.dispose()
    output = console.file.getvalue()  # type: ignore[attr-defined]
    assert "demo complete" in output and str(tmp_path / "mailer.toml") in output
    # Each issue's report, mailed to the demo's staff address and captured with the rest.
    reports = [
        message_from_bytes(p.read_bytes(), policy=policy.default)
        for p in captured
        if DEMO_STAFF in p.name
    ]
    assert len(reports) == 2
    [message] = [m for m in reports if "Weekly digest" in m["Subject"]]
    assert message["Subject"].startswith("[Report] Weekly digest")
    assert message["List-Unsubscribe"] is None
    assert f"{figures['sent']} sent" in message["Subject"]
    assert "mail to staff         [Report] Weekly digest" in output
    # A new reader signed up and confirmed: the confirmation mail, then the welcome mail.
    confirmation, welcome = [p for p in captured if DEMO_READER in p.name]
    assert figures["new_reader_mail"] == [confirmation.name, welcome.name]
    assert_compliant(confirmation.read_bytes(), settings, list_mail=False)
    message = assert_compliant(welcome.read_bytes(), settings)
    assert message["Subject"] == "Welcome to Camp Lejeune & New River Updates"
    text = message.get_body(preferencelist=("plain",))
    assert text is not None and "Weekly digest: next on " in text.get_content()
    assert "Base alerts: sent as soon as news arrives" in text.get_content()
    assert (
        f"new reader            Welcome to Camp Lejeune & New River Updates  ({welcome.name})"
        in output
    )
    assert "got alerts only       sara.whitfield@example.org, tom.nguyen@example.org" in output


def test_the_try_line_names_a_mailer_that_runs_from_here(tmp_path: Path) -> None:
    console = Console(file=io.StringIO(), width=400)
    run_demo(tmp_path / "out", console=console)
    output = console.file.getvalue()  # type: ignore[attr-defined]
    [line] = [line for line in output.splitlines() if line.strip().startswith("try ")]
    command = shlex.split(line.split("try", 1)[1])
    # The test runs with the project's .venv from the checkout: the path is relative to it.
    assert command[0] == mailer_command()
    if Path(sys.executable).parent.parent.parent == Path.cwd():
        assert command[0] == f"{Path(sys.executable).parent.parent.name}/bin/mailer"
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=60, env=os.environ | {"COLUMNS": "200"}
    )
    assert done.returncode == 0, done.stderr
    assert "maria.alvarez@example.org" in done.stdout


def test_mailer_command_is_the_script_beside_the_interpreter(tmp_path: Path) -> None:
    bin_dir = tmp_path / "project" / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python"
    python.write_text("", encoding="utf-8")
    assert mailer_command(str(python), tmp_path / "project") == f"{python} -m mailer"
    (bin_dir / "mailer").write_text("", encoding="utf-8")
    assert mailer_command(str(python), tmp_path / "project") == ".venv/bin/mailer"
    assert mailer_command(str(python), bin_dir) == "./mailer"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert mailer_command(str(python), elsewhere) == str(bin_dir / "mailer")
    spaced = tmp_path / "my files" / "bin"
    spaced.mkdir(parents=True)
    (spaced / "mailer").write_text("", encoding="utf-8")
    assert shlex.split(mailer_command(str(spaced / "python"), elsewhere)) == [
        str(spaced / "mailer")
    ]


def test_demo_runs_again_from_a_clean_state(tmp_path: Path) -> None:
    console = Console(file=io.StringIO())
    first = run_demo(tmp_path, console=console)
    second = run_demo(tmp_path, console=console)
    assert (first["sent"], first["alert_sent"]) == (second["sent"], second["alert_sent"])
    assert first["new_reader_mail"] and len(second["new_reader_mail"]) == 2
    captured = len(list((tmp_path / "mail").glob("*.eml")))
    # The two issues, their two reports, and the new reader's confirmation and welcome mail.
    assert captured == second["sent"] + second["alert_sent"] + 2 + 2


def test_the_sample_week_is_copied_dated_the_week_before_any_day(tmp_path: Path) -> None:
    today = date(2031, 3, 4)
    copy_examples(tmp_path, today)
    moment = datetime(2031, 3, 4, tzinfo=UTC)
    topics = ("base-alerts", "local-events", "military-news")
    parsed = [
        load_article_file(p, default_topic="military-news", known_topics=topics, now=moment)
        for p in sorted((tmp_path / "articles").iterdir())
    ]
    dated = [a for a in parsed if a.date_given]
    assert len(parsed) == 6 and len(dated) == 5
    assert max(a.published_at.date() for a in dated) == date(2031, 3, 3)
    assert all(a.expires_at > moment for a in dated if a.expires_at is not None)
    assert (tmp_path / "subscribers.csv").read_bytes().startswith(b"email")
