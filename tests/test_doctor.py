"""``mailer doctor``: what a send will use and why, against a real relay and real databases.

The CLI as staff run it (a subprocess), a real aiosmtpd on port 0, SQLite and PostgreSQL.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mailer.compose.dkim import generate_keypair
from mailer.config.sections import DEFAULT_CONNECTIONS
from mailer.db.engine import SCHEMA_HEAD, safe_url
from tests.factories import SECRET, write_config
from tests.pg_cluster import free_port
from tests.smtp_server import FaultServer, make_smtp_server, smtp_server  # noqa: F401

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def doctor(config: Path, *, secret: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MAILER_SECRET_KEY"}
    if secret:
        env["MAILER_SECRET_KEY"] = SECRET
    return subprocess.run(
        [sys.executable, "-m", "mailer", "--config", str(config), "doctor"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def config_for(tmp_path: Path, db_url: str, port: int, **smtp: Any) -> Path:
    """A config that sends to ``port``; ``smtp`` replaces the test base config's values
    (``None``: the key left out, its default applies; the factories pin ``processes = 1``
    unless told, so ``processes="auto"`` stands for the default, tested equal in
    tests/test_config.py)."""
    values: dict[str, Any] = {"host": "127.0.0.1", "port": port, "timeout": 2, "processes": 1}
    values.update(smtp)
    values = {k: v for k, v in values.items() if v is not None}
    return write_config(tmp_path / "mailer.toml", db_url, smtp=values)


def report(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """The report's lines by label (the label, two or more spaces, the rest)."""
    lines = {}
    for line in result.stdout.splitlines():
        label, said = re.split(r"\s{2,}", line, maxsplit=1)
        lines[label] = said
    return lines


def test_doctor_says_what_a_send_will_use_and_exits_0(
    tmp_path: Path,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    config = config_for(tmp_path, db_url, smtp_server.port, processes="auto", connections=None)
    result = doctor(config)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = report(result)
    assert list(lines) == [
        "config",
        "processes",
        "connections",
        "rate limit",
        "database",
        "DKIM",
        "relay",
        "site secret",
    ]
    cpus = len(os.sched_getaffinity(0))
    plural = "s" if cpus != 1 else ""
    assert lines["processes"].startswith(f'{cpus} ([smtp].processes = "auto": {cpus} CPU{plural}')
    n = DEFAULT_CONNECTIONS
    assert lines["connections"].startswith(f"{n} per process, {n * cpus} in all (default {n})")
    assert lines["rate limit"] == "none ([smtp].rate_per_second = 0)"
    driver = "SQLite 3." if db_url.startswith("sqlite") else "PostgreSQL through psycopg 3."
    assert lines["database"].startswith(f"{safe_url(db_url)}: {driver}")
    assert lines["database"].endswith(f"schema {SCHEMA_HEAD} (current: {SCHEMA_HEAD})")
    assert lines["DKIM"] == "off (no [dkim] table): messages are not signed"
    assert re.fullmatch(
        rf"127\.0\.0\.1:{smtp_server.port} \(security none\): answers EHLO in \d+ ms"
        r" \(timeout 2 s per step\)",
        lines["relay"],
    )
    assert lines["site secret"].startswith("set")
    assert smtp_server.connections == 1  # one probe, then QUIT
    assert smtp_server.received == []


def test_doctor_names_counts_given_in_the_config_and_the_dkim_key(
    tmp_path: Path,
    smtp_server: FaultServer,  # noqa: F811
    sqlite_template: Path,
) -> None:
    db = tmp_path / "mailer.db"
    db.write_bytes(sqlite_template.read_bytes())
    key = tmp_path / "dkim.pem"
    generate_keypair(key, 2048)
    config = config_for(tmp_path, f"sqlite:///{db}", smtp_server.port, processes=3, connections=20)
    with config.open("a", encoding="utf-8") as f:
        f.write(
            f'[dkim]\ndomain = "news.example.org"\nselector = "mail"\nprivate_key_file = "{key}"\n'
        )
    result = doctor(config)
    assert result.returncode == 0, result.stderr
    lines = report(result)
    assert lines["processes"].startswith("3 ([smtp].processes = 3)")
    assert lines["connections"].startswith(
        f"20 per process, 60 in all (default {DEFAULT_CONNECTIONS}); a relay may"
    )
    assert lines["DKIM"] == f"on: RSA-2048 (rsa-sha256), d=news.example.org s=mail, {key}"


def test_doctor_gives_one_line_per_problem_and_exits_1(
    tmp_path: Path, sqlite_template: Path
) -> None:
    port = free_port()  # nothing listens: the relay does not answer
    missing_db = tmp_path / "absent.db"
    config = config_for(tmp_path, f"sqlite:///{missing_db}", port)
    with config.open("a", encoding="utf-8") as f:
        f.write(
            "[dkim]\n"
            'domain = "news.example.org"\n'
            'selector = "mail"\n'
            f'private_key_file = "{tmp_path / "no-such-key.pem"}"\n'
        )
    result = doctor(config, secret=False)
    assert result.returncode == 1
    problems = result.stderr.splitlines()
    assert len(problems) == 4, result.stderr
    assert problems[0] == (f"error: the database {missing_db} does not exist: run `mailer init`")
    assert problems[1].startswith(f"error: {tmp_path / 'no-such-key.pem'}: [dkim].private_key_file")
    assert problems[2].startswith(f"error: the SMTP relay 127.0.0.1:{port} does not answer")
    assert problems[3].startswith("error: the site secret is not set: export MAILER_SECRET_KEY")
    lines = report(result)
    for label in ("database", "DKIM", "relay", "site secret"):
        assert lines[label].endswith(": PROBLEM (below)")
    assert lines["processes"] == "1 ([smtp].processes = 1)"


@pytest.mark.postgres
def test_doctor_reports_an_unreachable_postgresql_with_its_url(
    tmp_path: Path,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    url = f"postgresql://mailer:secret@127.0.0.1:{free_port()}/mailer"
    result = doctor(config_for(tmp_path, url, smtp_server.port))
    assert result.returncode == 1
    (problem,) = result.stderr.splitlines()
    assert problem.startswith("error: cannot reach the database postgresql://mailer:***@127.0.0.1:")
    assert ":secret@" not in result.stdout + result.stderr  # the password is never shown
    lines = report(result)
    assert lines["database"].startswith("postgresql://mailer:***@127.0.0.1:")
    assert lines["relay"].startswith("127.0.0.1:")
    assert "answers EHLO" in lines["relay"]
