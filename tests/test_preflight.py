"""Before run, worker, digest send and web create or claim anything, they check what they need.

Real processes (the CLI as staff run it), a real SMTP server, real databases: each failure is
one line on stderr, exit 1, and nothing made.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from mailer.config.load import load_settings
from mailer.db.engine import SCHEMA_HEAD, _alembic_config, create_engine
from mailer.db.schema import issues
from mailer.issues.schedule import local_time, upcoming
from mailer.preflight import PreflightError, check_relay
from tests.factories import SECRET, make_settings, make_subscriber, write_config
from tests.pg_cluster import free_port
from tests.smtp_server import FaultServer, make_smtp_server, smtp_server  # noqa: F401

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def mailer(
    config: Path, *args: str, secret: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MAILER_SECRET_KEY"}
    if secret:
        env["MAILER_SECRET_KEY"] = SECRET
    return subprocess.run(
        [sys.executable, "-m", "mailer", "--config", str(config), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another program is listening on for the whole test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def issue_count(db_url: str) -> int:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return int(conn.scalar(sa.select(sa.func.count()).select_from(issues)) or 0)
    finally:
        engine.dispose()


def add_subscriber(db_url: str) -> None:
    engine = create_engine(db_url)
    make_subscriber(engine)
    engine.dispose()


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback, no log noise
    return lines[0]


def config_for(tmp_path: Path, db_url: str, smtp_port: int, **sections: object) -> Path:
    # A catch-up window of eight days: a `run` that got as far as starting would make the
    # weekly digest's latest issue at once.
    sections.setdefault("scheduler", {"catch_up_hours": 24 * 8})
    return write_config(
        tmp_path / "mailer.toml",
        db_url,
        smtp={"host": "127.0.0.1", "port": smtp_port, "timeout": 2},
        **sections,
    )


@pytest.fixture
def sqlite_url(tmp_path: Path, sqlite_template: Path) -> str:
    path = tmp_path / "mailer.db"
    path.write_bytes(sqlite_template.read_bytes())
    return f"sqlite:///{path}"


def test_run_without_the_site_secret_stops_before_anything(
    tmp_path: Path,
    sqlite_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    add_subscriber(sqlite_url)
    config = config_for(tmp_path, sqlite_url, smtp_server.port, web={"port": free_port()})
    line = one_error_line(mailer(config, "run", secret=False))
    assert line == (
        "error: the site secret is not set: export MAILER_SECRET_KEY "
        "(named by [site].secret_key_env) or set [site].secret_key_file; make one with"
        ' python3 -c "import secrets; print(secrets.token_urlsafe(32))"'
    )
    assert issue_count(sqlite_url) == 0
    assert smtp_server.connections == 0


def test_digest_send_with_the_relay_down_makes_no_issue(tmp_path: Path, db_url: str) -> None:
    add_subscriber(db_url)
    port = free_port()
    config = config_for(tmp_path, db_url, port)
    line = one_error_line(mailer(config, "digest", "send", "weekly"))
    assert line.startswith(f"error: the SMTP relay 127.0.0.1:{port} does not answer (connect: ")
    assert line.endswith("start it, or check [smtp].host, port and security")
    assert issue_count(db_url) == 0


def test_a_database_at_an_old_revision_is_refused_with_the_fix(
    tmp_path: Path,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    from alembic import command

    path = tmp_path / "old.db"
    engine = create_engine(f"sqlite:///{path}")
    command.upgrade(_alembic_config(engine), "0005")
    engine.dispose()
    config = config_for(tmp_path, f"sqlite:///{path}", smtp_server.port)
    for args in (("worker", "--drain"), ("digest", "send", "weekly")):
        line = one_error_line(mailer(config, *args))
        assert line == (
            f"error: the database sqlite:///{path} is at revision 0005, "
            f"this version needs {SCHEMA_HEAD}: run `mailer init`"
        )
    assert issue_count(f"sqlite:///{path}") == 0
    assert smtp_server.connections == 0


def test_an_unreachable_database_is_one_line(
    tmp_path: Path,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    port = free_port()
    url = f"postgresql://postgres@127.0.0.1:{port}/mailer"
    config = config_for(tmp_path, url, smtp_server.port)
    line = one_error_line(mailer(config, "digest", "send", "weekly"))
    assert line.startswith(f"error: cannot reach the database {url}: ")
    assert "Connection refused" in line and line.endswith("(check [database].url)")
    assert smtp_server.connections == 0


@pytest.mark.parametrize("command", ["run", "web"])
def test_a_web_port_in_use_is_one_line_and_nothing_starts(
    tmp_path: Path,
    sqlite_url: str,
    smtp_server: FaultServer,  # noqa: F811
    taken_port: int,
    command: str,
) -> None:
    add_subscriber(sqlite_url)
    config = config_for(tmp_path, sqlite_url, smtp_server.port, web={"port": taken_port})
    line = one_error_line(mailer(config, command))
    assert line == (
        f"error: cannot listen on 127.0.0.1:{taken_port}: Address already in use (is another "
        "`mailer run` or `mailer web` running? stop it, or set [web].port)"
    )
    assert issue_count(sqlite_url) == 0


@pytest.mark.parametrize("command", ["run", "web"])
def test_run_and_web_say_where_they_listen_and_what_comes_next(
    tmp_path: Path,
    sqlite_url: str,
    smtp_server: FaultServer,  # noqa: F811
    command: str,
) -> None:
    port = free_port()
    alert = {
        "key": "alerts",
        "name": "Alerts",
        "subject": "Base alerts",
        "schedule": "*/10 * * * *",
        "timezone": "UTC",  # shown in the site's time zone all the same
        "topics": ["base-alerts"],
    }
    weekly = make_settings().digests[0]
    weekly_table = {
        "key": weekly.key,
        "name": weekly.name,
        "subject": weekly.subject,
        "schedule": weekly.schedule,
        "topics": list(weekly.topics),
    }
    config = config_for(
        tmp_path,
        sqlite_url,
        smtp_server.port,
        web={"port": port},
        scheduler={"catch_up": "none"},
        digests=[weekly_table, alert],
    )
    env = dict(os.environ, MAILER_SECRET_KEY=SECRET)
    process = subprocess.Popen(
        [sys.executable, "-m", "mailer", "--config", str(config), command],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().rstrip("\n")
        started = datetime.now(UTC)
    finally:
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
    # uvicorn (``mailer web``) raises the signal again once it has shut down gracefully.
    assert process.returncode in ((0, -signal.SIGTERM) if command == "web" else (0,)), err
    where = f"web app on http://127.0.0.1:{port}/ (public address https://news.example.org/)"
    if command == "web":
        assert line == f"mailer web: {where}"
        return
    settings = load_settings(config, env={"MAILER_SECRET_KEY": SECRET})
    # The line was computed just before ``started``: the same slots, unless one fell between.
    shown = ", ".join(
        f"{d.key} {local_time(slot, 'America/New_York', year=False)}"
        for d, slot in upcoming(settings.digests, started)
    )
    assert line == f"mailer run: {where}; next: {shown}"
    assert " EST" in line or " EDT" in line


def test_the_relay_check_logs_in_and_quits(
    make_smtp_server: Callable[..., FaultServer],  # noqa: F811
) -> None:
    server = make_smtp_server(users={"alice": "s3cret"})
    smtp = make_settings(
        smtp={"port": server.port, "username": "alice", "password_env": "SMTP_PASSWORD"}
    ).smtp
    check_relay(replace(smtp, password="s3cret"))
    assert server.logins and server.quits == 1 and server.received == []
    with pytest.raises(PreflightError) as info:
        check_relay(replace(smtp, password="guess"))
    assert info.value.check == "smtp"
    assert str(info.value).startswith(
        f"the SMTP relay 127.0.0.1:{server.port}: the SMTP server refused the login for 'alice'"
    )
