"""Staff accounts (mailer.console.accounts, mailer.console.logins) and ``mailer staff``, on
SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from argon2 import PasswordHasher
from click.testing import CliRunner, Result

from mailer.cli import cli, main
from mailer.console import accounts, logins, sessions
from mailer.db.schema import events, staff_accounts, staff_login_attempts, staff_sessions
from mailer.errors import AddressError, PasswordRejected, StaffAccountError, StaffLinkError
from tests.factories import NOW, SECRET, write_config
from tests.smtp_server import FaultServer, smtp_server  # noqa: F401

GOOD = "quilt harbor velvet 1987 tram"


def kinds(engine: sa.Engine) -> list[tuple[str, dict[str, object]]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(events.c.kind, events.c.detail).order_by(events.c.id))
        return [(row.kind, dict(row.detail)) for row in rows]


def session_count(engine: sa.Engine, account_id: int) -> int:
    with engine.connect() as conn:
        return int(
            conn.scalar(
                sa.select(sa.func.count())
                .select_from(staff_sessions)
                .where(staff_sessions.c.account_id == account_id)
            )
            or 0
        )


def open_session(engine: sa.Engine, account_id: int) -> str:
    with engine.begin() as conn:
        return sessions.open_session(
            conn, account_id, now=NOW, rules=sessions.Rules(), ip="127.0.0.1"
        )


def test_add_stores_only_the_link_hash_and_normalizes_the_address(engine: sa.Engine) -> None:
    link = accounts.add(engine, " Ann@News.Example.org ", "editor", NOW, by="chief")
    assert link.email == "ann@news.example.org"
    assert link.expires_at == NOW + timedelta(hours=24)
    with engine.connect() as conn:
        row = conn.execute(sa.select(staff_accounts)).one()
    assert row.email == "ann@news.example.org"
    assert row.password_hash is None
    assert row.link_hash != link.token and len(row.link_hash) == 64
    assert link.token not in json.dumps([list(map(str, row))])
    assert kinds(engine) == [
        ("staff.added", {"by": "chief", "email": "ann@news.example.org", "role": "editor"})
    ]


@pytest.mark.parametrize(
    ("email", "role", "error"),
    [
        ("not an address", "editor", AddressError),
        ("ann@news.example.org", "owner", StaffAccountError),
    ],
    ids=["bad-address", "bad-role"],
)
def test_add_refuses_bad_input(
    engine: sa.Engine, email: str, role: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        accounts.add(engine, email, role, NOW)


def test_add_refuses_an_existing_account(engine: sa.Engine) -> None:
    accounts.add(engine, "ann@news.example.org", "editor", NOW)
    with pytest.raises(StaffAccountError) as info:
        accounts.add(engine, "ANN@news.example.org", "admin", NOW)
    assert info.value.reason == "exists"


def test_a_link_sets_the_password_once_and_ends_every_session(engine: sa.Engine) -> None:
    link = accounts.add(engine, "ann@news.example.org", "editor", NOW)
    account = accounts.find(engine, "ann@news.example.org")
    assert account is not None
    open_session(engine, account.id)
    done = accounts.set_password(engine, link.token, GOOD, NOW + timedelta(hours=1))
    assert done.has_password and done.link_expires_at is None
    assert session_count(engine, account.id) == 0
    with engine.connect() as conn:
        stored = conn.scalar(sa.select(staff_accounts.c.password_hash))
    assert stored.startswith("$argon2id$")
    with pytest.raises(StaffLinkError) as info:
        accounts.set_password(engine, link.token, GOOD + " again", NOW + timedelta(hours=2))
    assert info.value.reason == "unknown"
    assert kinds(engine)[-1][0] == "staff.password_set"


def test_an_expired_link_is_refused(engine: sa.Engine) -> None:
    link = accounts.add(engine, "ann@news.example.org", "editor", NOW)
    with pytest.raises(StaffLinkError) as info:
        accounts.set_password(engine, link.token, GOOD, NOW + timedelta(hours=24))
    assert info.value.reason == "expired"
    assert accounts.verify(engine, "ann@news.example.org", GOOD, NOW) is None


@pytest.mark.parametrize(
    ("password", "reason"),
    [
        ("short words", "short"),
        ("password1234", "weak"),
        ("qwertyuiop123", "weak"),
        ("annabelle-river-quilt-77", "local_part"),
        ("x" * 300, "long"),
    ],
    ids=["short", "common", "keyboard", "local-part", "too-long"],
)
def test_weak_passwords_are_refused_with_a_reason(
    engine: sa.Engine, password: str, reason: str
) -> None:
    link = accounts.add(engine, "annabelle@news.example.org", "editor", NOW)
    with pytest.raises(PasswordRejected) as info:
        accounts.set_password(engine, link.token, password, NOW)
    assert info.value.reason == reason
    if reason == "weak":  # zxcvbn's own words are in the message
        said = [info.value.warning, *info.value.suggestions]
        assert any(said)
        assert all(part in str(info.value) for part in said if part)
    # the link is still good after a refused password
    assert accounts.link_account(engine, link.token, NOW).email == "annabelle@news.example.org"


def test_verify_accepts_the_password_only(engine: sa.Engine) -> None:
    link = accounts.add(engine, "ann@news.example.org", "editor", NOW)
    assert accounts.verify(engine, "ann@news.example.org", GOOD, NOW) is None  # none set yet
    accounts.set_password(engine, link.token, GOOD, NOW)
    found = accounts.verify(engine, "ANN@news.example.org", GOOD, NOW)
    assert found is not None and found.email == "ann@news.example.org"
    assert accounts.verify(engine, "ann@news.example.org", GOOD + "x", NOW) is None
    assert accounts.verify(engine, "nobody@news.example.org", GOOD, NOW) is None
    assert accounts.verify(engine, "not an address", GOOD, NOW) is None


def test_verify_rehashes_a_hash_made_with_older_parameters(engine: sa.Engine) -> None:
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(GOOD)
    with engine.begin() as conn:
        conn.execute(
            staff_accounts.insert().values(
                email="ann@news.example.org", role="editor", created_at=NOW, password_hash=weak
            )
        )
    assert accounts.verify(engine, "ann@news.example.org", GOOD, NOW) is not None
    with engine.connect() as conn:
        stored = conn.scalar(sa.select(staff_accounts.c.password_hash))
    assert stored != weak and not PasswordHasher().check_needs_rehash(stored)


def test_reset_clears_the_password_and_ends_sessions(engine: sa.Engine) -> None:
    first = accounts.add(engine, "ann@news.example.org", "editor", NOW)
    accounts.set_password(engine, first.token, GOOD, NOW)
    account = accounts.find(engine, "ann@news.example.org")
    assert account is not None
    open_session(engine, account.id)
    second = accounts.reset(engine, "ann@news.example.org", NOW, by="chief")
    assert session_count(engine, account.id) == 0
    assert accounts.verify(engine, "ann@news.example.org", GOOD, NOW) is None
    assert second.token != first.token
    accounts.set_password(engine, second.token, GOOD, NOW)
    assert accounts.verify(engine, "ann@news.example.org", GOOD, NOW) is not None
    assert ("staff.reset", {"by": "chief", "email": "ann@news.example.org", "sessions": 1}) in (
        kinds(engine)
    )


def test_remove_ends_sessions_and_keeps_the_last_admin(engine: sa.Engine) -> None:
    accounts.add(engine, "boss@news.example.org", "admin", NOW)
    accounts.add(engine, "ann@news.example.org", "editor", NOW)
    ann = accounts.find(engine, "ann@news.example.org")
    assert ann is not None
    open_session(engine, ann.id)
    accounts.remove(engine, "ann@news.example.org", NOW, by="boss@news.example.org")
    assert session_count(engine, ann.id) == 0
    assert accounts.find(engine, "ann@news.example.org") is None
    with pytest.raises(StaffAccountError) as info:
        accounts.remove(engine, "boss@news.example.org", NOW, by="cli-user")
    assert info.value.reason == "last_admin"
    accounts.add(engine, "deputy@news.example.org", "admin", NOW)
    with pytest.raises(StaffAccountError) as info:
        accounts.remove(engine, "boss@news.example.org", NOW, by="boss@news.example.org")
    assert info.value.reason == "self"
    accounts.remove(engine, "boss@news.example.org", NOW, by="deputy@news.example.org")
    with pytest.raises(StaffAccountError) as info:
        accounts.remove(engine, "nobody@news.example.org", NOW)
    assert info.value.reason == "unknown"


def test_login_limits_count_failures_per_account_and_per_address(engine: sa.Engine) -> None:
    limits = logins.Limits(per_account=5, per_address=20, window=timedelta(minutes=15))
    at = NOW
    for n in range(5):
        tried = logins.attempt(engine, "ann@x.org", "10.0.0.1", now=at, limits=limits)
        assert tried.blocked is None  # a wrong password: the row stays a failure
        at += timedelta(minutes=1) if n < 4 else timedelta(0)
    blocked = logins.attempt(engine, "ann@x.org", "10.0.0.2", now=at, limits=limits).blocked
    assert blocked is not None and blocked.by == "account"
    assert blocked.minutes == 11  # the first failure (NOW) leaves the window at NOW + 15 min
    # the limit lifts when the first failure leaves the window
    later = NOW + timedelta(minutes=15)
    tried = logins.attempt(engine, "ann@x.org", "10.0.0.1", now=later, limits=limits)
    assert tried.blocked is None
    logins.succeeded(engine, tried.id)  # a right password no longer counts as a failure
    # per client address: 20 failures over many typed addresses
    for n in range(20):
        assert (
            logins.attempt(engine, f"u{n}@x.org", "10.9.9.9", now=at, limits=limits).blocked is None
        )
    blocked = logins.attempt(engine, "fresh@x.org", "10.9.9.9", now=at, limits=limits).blocked
    assert blocked is not None and blocked.by == "address" and blocked.minutes == 15
    # old rows go as new ones come
    hour_later = at + timedelta(hours=1)
    logins.attempt(engine, "ann@x.org", "10.0.0.1", now=hour_later, limits=limits)
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(staff_login_attempts)) == 1


def test_account_key_normalizes_what_is_an_address() -> None:
    assert logins.account_key(" Ann@News.Example.ORG ") == "ann@news.example.org"
    assert logins.account_key("  Not An Address ") == "not an address"


# -- the command line --------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MAILER_SECRET_KEY", SECRET)
    return write_config(tmp_path / "mailer.toml", db_url)


def run(config: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--config", str(config), *args], catch_exceptions=False)


def fails(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(["--config", str(config), *args])
    return int(info.value.code or 0), capsys.readouterr().err


def test_cli_staff_add_prints_the_one_time_link_that_sets_a_password(
    config: Path, engine: sa.Engine
) -> None:
    result = run(config, "staff", "add", "Ann@News.Example.org", "--role", "admin")
    assert result.exit_code == 0, result.output
    found = re.search(r"https://news\.example\.org/staff/welcome/(\S+)", result.output)
    assert found, result.output
    assert "valid once, until" in result.output
    added = accounts.find(engine, "ann@news.example.org")
    assert added is not None and added.role == "admin"
    accounts.set_password(engine, found.group(1), GOOD, added.created_at)
    assert accounts.verify(engine, "ann@news.example.org", GOOD, NOW) is not None
    assert kinds(engine)[0][0] == "staff.added"


def test_cli_staff_list_formats(config: Path) -> None:
    run(config, "staff", "add", "ann@news.example.org", "--role", "editor")
    run(config, "staff", "add", "boss@news.example.org", "--role", "admin")
    table = run(config, "staff", "list")
    assert table.exit_code == 0
    assert "ann@news.example.org" in table.output and "boss@news.example.org" in table.output
    rows = list(csv.DictReader(io.StringIO(run(config, "staff", "list", "--format", "csv").output)))
    assert [(r["email"], r["role"], r["password"]) for r in rows] == [
        ("ann@news.example.org", "editor", "link"),
        ("boss@news.example.org", "admin", "link"),
    ]
    listed = json.loads(run(config, "staff", "list", "--format", "json").output)
    assert [r["email"] for r in listed] == ["ann@news.example.org", "boss@news.example.org"]
    assert set(listed[0]) == {
        "email",
        "role",
        "password",
        "password_set_at",
        "link_expires_at",
        "created_at",
    }


def test_cli_staff_reset_and_remove(
    config: Path, engine: sa.Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    run(config, "staff", "add", "ann@news.example.org", "--role", "editor")
    run(config, "staff", "add", "boss@news.example.org", "--role", "admin")
    reset = run(config, "staff", "reset", "ann@news.example.org")
    assert reset.exit_code == 0 and "/staff/welcome/" in reset.output
    removed = run(config, "staff", "remove", "ann@news.example.org")
    assert removed.exit_code == 0 and "removed ann@news.example.org" in removed.output
    code, err = fails(config, capsys, "staff", "remove", "ann@news.example.org")
    assert code == 1 and "no staff account for ann@news.example.org" in err
    code, err = fails(config, capsys, "staff", "remove", "boss@news.example.org")
    assert code == 1 and "last admin" in err
    code, err = fails(config, capsys, "staff", "add", "nope", "--role", "editor")
    assert code == 1 and "invalid email address" in err
    code, _ = fails(config, capsys, "staff", "add", "x@news.example.org", "--role", "owner")
    assert code == 2


# -- [staff_web] -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"idle_minutes": 0}, "[staff_web].idle_minutes must be"),
        ({"idle_minutes": 600, "session_hours": 2}, "is longer than session_hours"),
        ({"host": "10.0.0.5"}, "[staff_web].host needs [staff_web].port too"),
        ({"port": 8000}, "is the web app's own"),
        ({"port": 70000}, "[staff_web].port must be 1–65535"),
        ({"base_url": "intranet"}, "[staff_web].base_url must be an absolute"),
        ({"idle": 5}, "[staff_web].idle is not a known key"),
        ({"port": 8001}, "[staff_web].base_url is needed with [staff_web].port"),
        (
            {"port": 8001, "base_url": "http://10.0.0.5:8001"},
            "[staff_web].base_url must be https:// for a host other than this machine",
        ),
        ({"base_url": "http://staff.example.org"}, "TLS proxy"),
    ],
    ids=[
        "idle-zero",
        "idle-over-lifetime",
        "host-alone",
        "same-port",
        "port-range",
        "url",
        "typo",
        "port-without-url",
        "port-plain-http",
        "plain-http",
    ],
)
def test_staff_web_is_checked_when_the_config_loads(table: dict[str, object], message: str) -> None:
    from mailer.errors import ConfigError
    from tests.factories import make_settings

    with pytest.raises(ConfigError) as info:
        make_settings(staff_web=table)
    assert message in str(info.value)


def test_staff_web_sets_session_rules_and_the_links_address(db_url: str) -> None:
    from mailer.web import SmtpConfirmationSender, create_app
    from tests.factories import make_settings

    settings = make_settings(
        db_url,
        staff_web={
            "idle_minutes": 10,
            "session_hours": 2,
            "base_url": "https://staff.news.example.org/",
        },
    )
    app = create_app(settings, sa.create_engine(db_url), SmtpConfirmationSender(settings))
    rules = app.state.console.guard.rules
    assert (rules.idle, rules.lifetime) == (timedelta(minutes=10), timedelta(hours=2))
    assert accounts.link_url(settings, "T") == "https://staff.news.example.org/staff/welcome/T"


@pytest.mark.parametrize("command", ["web", "run"])
def test_the_console_on_its_own_listener(
    tmp_path: Path,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    import os
    import signal
    import subprocess
    import sys

    import httpx

    from tests.pg_cluster import free_port

    web_port, staff_port = free_port(), free_port()
    config = write_config(
        tmp_path / "mailer.toml",
        db_url,
        smtp={"host": "127.0.0.1", "port": smtp_server.port, "timeout": 2},
        web={"port": web_port},
        staff_web={
            "host": "127.0.0.1",
            "port": staff_port,
            "base_url": f"http://127.0.0.1:{staff_port}",
        },
        scheduler={"catch_up": "none"},
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "mailer", "--config", str(config), command],
        cwd=Path(__file__).resolve().parent.parent,
        env=dict(os.environ, MAILER_SECRET_KEY=SECRET),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert f"staff console on http://127.0.0.1:{staff_port}/staff/" in line, line
        public = f"http://127.0.0.1:{web_port}"
        staff = f"http://127.0.0.1:{staff_port}"
        with httpx.Client(timeout=5) as client:
            # the line is printed once both listen
            answer = client.get(f"{staff}/staff/login")
            assert answer.status_code == 200 and "Log in to the staff console" in answer.text
            assert client.get(f"{staff}/").headers["location"] == "/staff/"
            assert client.get(f"{staff}/privacy").status_code == 404
            assert client.get(f"{public}/staff/login").status_code == 404
            assert client.get(f"{public}/privacy").status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
    assert process.returncode in (0, -signal.SIGTERM), err


def test_the_demo_prints_a_login_link_for_its_admin(db_url: str, engine: sa.Engine) -> None:
    from rich.console import Console

    from mailer.devtools.demo import DEMO_ADMIN, staff_login_link
    from tests.factories import make_settings

    settings = make_settings(db_url, site__base_url="http://127.0.0.1:8000")
    printed = io.StringIO()
    url = staff_login_link(settings, Console(file=printed, width=300))
    assert url.startswith("http://127.0.0.1:8000/staff/welcome/")
    assert url in printed.getvalue() and DEMO_ADMIN in printed.getvalue()
    token = url.rsplit("/", 1)[1]
    account = accounts.link_account(engine, token, NOW)
    assert (account.email, account.role) == ("admin@news.example.org", "admin")
