"""The staff CLI, run in process against a real config file and database."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from mailer.cli import cli, main
from tests.factories import SECRET, write_config
from tests.test_bounces import dsn


@pytest.fixture
def config(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MAILER_SECRET_KEY", SECRET)
    return write_config(tmp_path / "mailer.toml", db_url)


def run(config: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--config", str(config), *args], catch_exceptions=False)


def test_show_prints_the_status_word_first(config: Path) -> None:
    assert run(config, "init").exit_code == 0
    assert run(config, "subscribers", "add", "Ann@Example.org", "--name", "Ann").exit_code == 0
    result = run(config, "subscribers", "show", "ann@example.org")
    assert result.exit_code == 0
    assert result.output.splitlines()[0] == "active"


def test_import_lists_rejected_rows_and_exits_1(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(config, "init")
    csv_file = tmp_path / "people.csv"
    csv_file.write_text(
        "email,name,topics,status\nann@example.org,Ann,,active\nnope,Bob,,active\n",
        encoding="utf-8",
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "subscribers", "import", str(csv_file)])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert "row 3 (nope)" in captured.err
    assert "2 rows: 1 added" in captured.out
    assert run(config, "subscribers", "show", "ann@example.org").output.startswith("active")


def test_import_lists_rejected_rows_in_order_with_control_characters_escaped(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(config, "init")
    csv_file = tmp_path / "people.csv"
    rows = [f"bad{i},N" for i in range(7)]
    rows[3] = "\x1b[2Jclear@,N"  # an escape sequence would clear the staff's terminal
    rows.insert(5, "ann@example.org,Ann")
    csv_file.write_text("email,name\n" + "\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "subscribers", "import", str(csv_file)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err
    listed = [
        line.split(": row ")[1].split(" ")[0] for line in err.splitlines() if ": row " in line
    ]
    assert listed == ["2", "3", "4", "5", "6", "8", "9"]
    assert "row 5 (\\x1b[2Jclear@)" in err
    assert "7 rows rejected" in err


def test_project_errors_are_one_line_with_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "fresh.toml", f"sqlite:///{tmp_path / 'fresh.db'}")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "subscribers", "list"])
    assert exit_info.value.code == 1
    assert (
        capsys.readouterr().err.strip()
        == "error: the database is not initialized: run `mailer init`"
    )


def test_bad_usage_exits_2(config: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "subscribers", "add"])
    assert exit_info.value.code == 2


def test_bad_config_names_the_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[site]\nname = "x"\n', encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(bad), "init"])
    assert exit_info.value.code == 1
    assert f"{bad.resolve()}: [site].base_url is required" in capsys.readouterr().err


def test_erase_then_add_is_refused(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(config, "init")
    run(config, "subscribers", "add", "ann@example.org")
    assert run(config, "subscribers", "erase", "ann@example.org", "--yes").exit_code == 0
    with pytest.raises(SystemExit):
        main(["--config", str(config), "subscribers", "add", "ann@example.org"])
    assert "ann@example.org is suppressed (erased)" in capsys.readouterr().err


def test_export_person_gives_everything_held_as_json(config: Path) -> None:
    run(config, "init")
    run(config, "subscribers", "add", "ann@example.org", "--name", "Ann", "--topic", "base-alerts")
    result = run(config, "subscribers", "export", "--person", "ANN@example.org")
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["subscriber"]["email"] == "ann@example.org"
    assert data["topics"] == ["base-alerts"]
    assert data["consent"]["source"] == "cli"
    assert [e["kind"] for e in data["events"]] == ["subscribed"]


def test_bounces_process_takes_its_policy_from_the_config_and_options_override_it(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAILER_SECRET_KEY", SECRET)
    config = write_config(tmp_path / "mailer.toml", db_url, bounces={"soft_limit": 2})
    run(config, "init")
    recent = datetime.now(UTC) - timedelta(days=1)
    for person in ("full", "other"):
        run(config, "subscribers", "add", f"{person}@example.com")
        (tmp_path / f"{person}.mbox").write_bytes(
            b"".join(
                b"From MAILER-DAEMON Thu Nov 19 12:00:00 2026\n"
                + dsn(
                    recipient=f"{person}@example.com",
                    report_id=f"<{person}{n}@mx>",
                    message_id=f"<{person}{n}@news.example.org>",
                    date=recent,
                ).replace(b"\r\n", b"\n")
                + b"\n"
                for n in range(2)
            )
        )
    # Two soft bounces reach [bounces].soft_limit = 2; --soft-limit 3 overrides it.
    assert run(config, "bounces", "process", str(tmp_path / "full.mbox")).exit_code == 0
    overridden = run(
        config, "bounces", "process", str(tmp_path / "other.mbox"), "--soft-limit", "3"
    )
    assert overridden.exit_code == 0
    assert run(config, "subscribers", "show", "full@example.com").output.startswith("bounced")
    assert run(config, "subscribers", "show", "other@example.com").output.startswith("active")


def test_log_lines_name_the_zone_of_their_time() -> None:
    # Times shown to staff name their zone; a log line's bare "20:43" beside an issue's
    # "15:43 EST" reads as two different moments.
    script = (
        "import logging; from mailer import logs; logs.configure(logging.WARNING);"
        " logging.getLogger('mailer.x').warning('relay down')"
    )
    env = {**os.environ, "TZ": "America/New_York"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} E[SD]T WARNING mailer\.x: relay down\n", done.stderr
    )


def test_list_refuses_an_unknown_status_as_bad_usage(config: Path) -> None:
    run(config, "init")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "subscribers", "list", "--status", "bogus"])
    assert exit_info.value.code == 2


def test_list_refuses_an_unknown_topic_as_bad_usage_naming_the_known_ones(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(config, "init")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), "subscribers", "list", "--topic", "base-alert"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "'base-alert' is not a topic" in message
    assert "base-alerts, local-events, military-news" in message


def test_list_shows_the_first_subscribers_up_to_the_limit_and_counts_all(config: Path) -> None:
    run(config, "init")
    for who in ("cy", "ann", "bob"):
        assert run(config, "subscribers", "add", f"{who}@example.org").exit_code == 0
    result = run(config, "subscribers", "list", "--limit", "2")
    assert result.exit_code == 0
    assert "ann@example.org" in result.output and "bob@example.org" in result.output
    assert "cy@example.org" not in result.output
    last = result.output.splitlines()[-1]
    assert last == "3 active; the first 2 of 3 shown (raise --limit for more)"


LONG = "first.middle.lastname.of.someone.with.a.long.address@mail.camp-lejeune.example.org"


def some_subscribers(config: Path) -> None:
    """Five subscribers: three active (one with a long address), one pending, one paused."""
    run(config, "init")
    people = [
        (LONG, "Someone With A Long Name", "base-alerts", "active"),
        ("ann@example.org", "Ann", "base-alerts", "active"),
        ("bob@example.org", "=Bob", "local-events", "active"),
        ("cy@example.org", "Cy", "base-alerts", "pending"),
    ]
    for email, name, topic, status in people:
        added = run(
            config,
            "subscribers",
            "add",
            email,
            "--name",
            name,
            "--topic",
            topic,
            "--status",
            status,
        )
        assert added.exit_code == 0, added.output


def test_list_prints_whole_addresses_when_not_on_a_terminal(config: Path) -> None:
    some_subscribers(config)
    result = run(config, "subscribers", "list")
    assert result.exit_code == 0
    assert len(LONG) > 80
    (row,) = [line for line in result.output.splitlines() if "long.address" in line]
    assert LONG in row and "Someone With A Long Name" in row and "…" not in result.output
    assert result.output.splitlines()[-1] == "3 active, 1 pending"


@pytest.mark.parametrize(
    ("filters", "listed", "totals"),
    [
        (["--status", "active"], ["ann", "bob", "first"], "3 active"),
        (["--topic", "base-alerts"], ["ann", "cy", "first"], "2 active, 1 pending"),
        (["--topic", "base-alerts", "--status", "pending"], ["cy"], "1 pending"),
        (["--topic", "military-news"], [], "no subscribers"),
    ],
    ids=["status", "topic", "topic-and-status", "none"],
)
def test_list_totals_count_what_the_filters_select(
    config: Path, filters: list[str], listed: list[str], totals: str
) -> None:
    some_subscribers(config)
    result = run(config, "subscribers", "list", *filters)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    rows = [line.split("│")[1].strip() for line in lines if line.startswith("│")]
    assert [row.split("@")[0].split(".")[0] for row in rows] == listed
    assert lines[-1] == totals


def test_list_as_csv_has_the_export_columns_and_since(config: Path) -> None:
    some_subscribers(config)
    result = run(config, "subscribers", "list", "--format", "csv", "--topic", "base-alerts")
    assert result.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert list(rows[0]) == ["email", "name", "topics", "status", "digests", "since"]
    assert [(r["email"], r["status"], r["topics"]) for r in rows] == [
        ("ann@example.org", "active", "base-alerts"),
        ("cy@example.org", "pending", "base-alerts"),
        (LONG, "active", "base-alerts"),
    ]
    assert datetime.fromisoformat(rows[0]["since"]).utcoffset() is not None
    # The same columns the import reads: the listing goes back in unchanged.
    everyone = run(config, "subscribers", "list", "--format", "csv").output
    assert "'=Bob" in everyone  # the export's spreadsheet guard


def test_list_as_json_is_an_array_of_objects(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    some_subscribers(config)
    main(["--config", str(config), "subscribers", "list", "--format", "json", "--limit", "2"])
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data[0] | {"since": ""} == {
        "email": "ann@example.org",
        "name": "Ann",
        "topics": ["base-alerts"],
        "status": "active",
        "digests": ["weekly"],
        "since": "",
    }
    assert [d["email"] for d in data] == ["ann@example.org", "bob@example.org"]
    assert data[1]["name"] == "=Bob"  # JSON is not a spreadsheet: the name as given
    assert captured.err.strip() == "the first 2 of 4 shown (raise --limit for more)"
