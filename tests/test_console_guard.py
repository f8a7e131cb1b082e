"""The console's guard: sessions in a signed cookie, roles, CSRF, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from mailer.console import sessions
from mailer.db.schema import staff_sessions

NOW = datetime(2026, 12, 4, 15, 0, tzinfo=UTC)
SECRET = b"s" * 32


def test_a_cookie_names_its_session_only_with_our_signature() -> None:
    value = sessions.cookie_value(SECRET, "abc")
    assert sessions.session_id_from(SECRET, value) == "abc"
    assert sessions.session_id_from(b"t" * 32, value) is None
    assert sessions.session_id_from(SECRET, "abc.") is None
    assert sessions.session_id_from(SECRET, "abd." + value.partition(".")[2]) is None
    assert sessions.session_id_from(SECRET, None) is None
    assert sessions.session_id_from(SECRET, "x" * 500) is None


@pytest.mark.parametrize(
    ("later", "open_"),
    [
        (timedelta(minutes=29), True),
        (timedelta(minutes=30), False),  # idle too long
    ],
)
def test_a_session_ends_when_idle(engine: sa.Engine, later: timedelta, open_: bool) -> None:
    from tests.console import add_account

    rules = sessions.Rules(idle=timedelta(minutes=30), lifetime=timedelta(hours=12))
    account = add_account(engine, "ed@news.example.org", now=NOW)
    with engine.begin() as conn:
        session_id = sessions.open_session(conn, account, now=NOW, rules=rules, ip=None)
    found = sessions.find_session(engine, session_id, now=NOW + later, rules=rules)
    assert (found is not None) is open_
    with engine.connect() as conn:
        rows = conn.scalar(sa.select(sa.func.count()).select_from(staff_sessions))
    assert rows == (1 if open_ else 0)  # an ended session is deleted when met


def test_a_session_ends_at_its_lifetime_however_busy(engine: sa.Engine) -> None:
    from tests.console import add_account

    rules = sessions.Rules(idle=timedelta(minutes=30), lifetime=timedelta(hours=1))
    account = add_account(engine, "ed@news.example.org", now=NOW)
    with engine.begin() as conn:
        session_id = sessions.open_session(conn, account, now=NOW, rules=rules, ip="10.0.0.1")
    for minutes in (20, 40, 59):  # never idle for 30 minutes
        at = NOW + timedelta(minutes=minutes)
        assert sessions.find_session(engine, session_id, now=at, rules=rules) is not None
    end = NOW + timedelta(hours=1)
    assert sessions.find_session(engine, session_id, now=end, rules=rules) is None


def test_closing_every_session_of_an_account(engine: sa.Engine) -> None:
    from tests.console import add_account

    rules = sessions.Rules()
    account = add_account(engine, "ed@news.example.org", now=NOW)
    with engine.begin() as conn:
        first = sessions.open_session(conn, account, now=NOW, rules=rules, ip=None)
        second = sessions.open_session(conn, account, now=NOW, rules=rules, ip=None)
        assert first != second
        assert sessions.close_all(conn, account) == 2
    assert sessions.find_session(engine, first, now=NOW, rules=rules) is None
