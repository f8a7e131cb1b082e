"""The staff console's login and sessions under pressure, on SQLite and PostgreSQL: many wrong
logins at once get no more password checks than the limit allows; a script's JSON reads do not
keep a session alive and answer 401 as JSON; console pages answer while another connection
holds the write lock; anonymous requests write no audit rows; notices name no one and belong
to one session; two admins removing each other leave one; and the smaller walls (``next``,
IPv6 client addresses, 403 pages, Reset's confirmation, ended sessions, ``[staff_web]``)."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import sqlite3
import threading
import time
import warnings
from collections import Counter
from datetime import timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning

from mailer.cli.context import web_line
from mailer.console import accounts, logins, sessions
from mailer.db.engine import create_engine
from mailer.db.schema import events, staff_accounts, staff_login_attempts, staff_sessions
from mailer.errors import StaffAccountError
from mailer.subscribers import store
from tests.console import BASE, make_app, staff_client
from tests.factories import NOW, Clock, make_settings, make_subscriber

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

PASSWORD = "quilt harbor velvet 1987 tram"
ANN = "ann@news.example.org"


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def app(engine: sa.Engine, db_url: str, clock: Clock) -> Starlette:
    return make_app(engine, db_url, clock)


def new_account(engine: sa.Engine, email: str = ANN, role: str = "admin") -> int:
    link = accounts.add(engine, email, role, NOW)
    return accounts.set_password(engine, link.token, PASSWORD, NOW).id


def form_token(html: str) -> str:
    found = re.search(r'name="form_token" value="([^"]+)"', html)
    assert found
    return found.group(1)


def login(client: TestClient, email: str = ANN, password: str = PASSWORD, **more: str) -> Any:
    token = form_token(client.get("/staff/login").text)
    data = {"form_token": token, "email": email, "password": password, "next": "", **more}
    return client.post("/staff/login", data=data, follow_redirects=False)


def event_kinds(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(sa.select(events.c.kind).order_by(events.c.id)))


# -- 1. logins at once ------------------------------------------------------------------------


def test_wrong_logins_sent_at_once_get_no_more_password_checks_than_the_limit(
    engine: sa.Engine, db_url: str, clock: Clock
) -> None:
    new_account(engine)
    app = make_app(engine, db_url, clock, staff_login_per_account=3, staff_login_per_address=1000)

    async def storm(n: int) -> tuple[list[int], int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
            token = form_token((await client.get("/staff/login")).text)

            async def one(i: int) -> int:
                data = {"form_token": token, "email": ANN, "password": f"wrong guess {i}"}
                return (await client.post("/staff/login", data=data)).status_code

            codes = await asyncio.gather(*(one(i) for i in range(n)))
            right = {"form_token": token, "email": ANN, "password": PASSWORD}
            after = (await client.post("/staff/login", data=right)).status_code
            return list(codes), after

    codes, after = asyncio.run(storm(12))
    counted = Counter(codes)
    # 401: the password was checked (and wrong); 429: refused before any check.
    assert counted[401] == 3 and counted[429] == 9, counted
    assert after == 429  # the limit holds for the right password too
    with engine.connect() as conn:
        kept = list(conn.scalars(sa.select(staff_login_attempts.c.succeeded)))
    assert kept == [False] * 3  # the refused attempts checked nothing and are not kept
    assert event_kinds(engine).count("staff.login_refused") == 3


def test_a_right_password_marks_its_attempt_a_success(
    app: Starlette, engine: sa.Engine, clock: Clock
) -> None:
    new_account(engine)
    client = TestClient(app, base_url=BASE)
    assert login(client, password="wrong guess").status_code == 401
    assert login(client).status_code == 303
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(staff_login_attempts.c.account, staff_login_attempts.c.succeeded).order_by(
                staff_login_attempts.c.id
            )
        ).all()
    assert [tuple(r) for r in rows] == [(ANN, False), (ANN, True)]


# -- 2. a script's reads do not keep a session alive ----------------------------------------


def test_polling_progress_json_does_not_restart_the_idle_clock(
    app: Starlette, engine: sa.Engine, clock: Clock
) -> None:
    editor = staff_client(app, engine, now=NOW)

    def last_seen() -> Any:
        with engine.connect() as conn:
            return conn.scalar(sa.select(staff_sessions.c.last_seen_at))

    clock.value = NOW + timedelta(minutes=20)
    assert editor.get("/staff/progress.json").status_code == 200
    assert last_seen() == NOW  # a read by script leaves the idle clock alone
    clock.value = NOW + timedelta(minutes=31)  # idle 30 minutes since the last page
    answer = editor.get("/staff/progress.json")
    assert answer.status_code == 401
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.headers["cache-control"] == "no-store"
    assert answer.json()["error"].startswith("Your session has ended")


def test_a_page_restarts_the_idle_clock(app: Starlette, engine: sa.Engine, clock: Clock) -> None:
    editor = staff_client(app, engine, now=NOW)
    clock.value = NOW + timedelta(minutes=20)
    assert editor.get("/staff/issues").status_code == 200
    clock.value = NOW + timedelta(minutes=45)  # 25 minutes after the page
    assert editor.get("/staff/progress.json").status_code == 200


def test_json_reads_refuse_as_json(app: Starlette, engine: sa.Engine) -> None:
    anonymous = TestClient(app, base_url=BASE)
    answer = anonymous.get("/staff/progress.json")
    assert answer.status_code == 401
    assert answer.json() == {
        "error": "Your session has ended: log in to the staff console again.",
        "status": 401,
    }


# -- 3. pages answer while another connection writes -----------------------------------------


def test_console_pages_answer_while_another_connection_holds_the_write_lock(
    engine: sa.Engine, db_url: str, clock: Clock
) -> None:
    sub = make_subscriber(engine, email="reader@example.org")
    if engine.dialect.name == "sqlite":
        app_engine = engine
    else:
        # A lookup that waited for the lock would fail after 5 s instead of hanging.
        app_engine = create_engine(db_url, connect_args={"options": "-c lock_timeout=5000"})
    app = make_app(app_engine, db_url, clock)
    admin = staff_client(app, engine, now=NOW, role="admin")
    admin.client = TestClient(
        app, base_url=BASE, raise_server_exceptions=False, cookies=admin.client.cookies
    )
    clock.value = NOW + timedelta(seconds=30)  # inside TOUCH_EVERY: nothing to write
    engine.dispose()
    if engine.dialect.name == "sqlite":
        path = engine.url.database
        assert path
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # a writer (the worker, say) holds the lock
        release = other.close  # closing rolls back
    else:
        holding = create_engine(db_url)
        holder = holding.connect()
        holder.exec_driver_sql(
            "LOCK TABLE staff_sessions, staff_accounts, staff_login_attempts, subscribers"
            " IN EXCLUSIVE MODE"  # everything but plain reads waits
        )

        def release() -> None:
            holder.close()
            holding.dispose()
            app_engine.dispose()

    try:
        for path in (
            "/staff/issues",
            "/staff/accounts",
            "/staff/subscribers?q=reader",
            f"/staff/subscribers/{sub.id}",
        ):
            started = time.monotonic()
            answer = admin.get(path)
            assert answer.status_code == 200, (path, answer.status_code)
            assert time.monotonic() - started < 3, path
    finally:
        release()
        admin.client.close()


# -- 4. anonymous requests write no audit rows ----------------------------------------------


def test_anonymous_refusals_write_no_audit_rows_but_a_wrong_password_does(
    engine: sa.Engine, db_url: str, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailer.console.login")
    new_account(engine)
    app = make_app(engine, db_url, clock, staff_login_per_account=2)
    anonymous = TestClient(app, base_url=BASE)
    before = event_kinds(engine)
    for n in range(5):  # no form token at all
        answer = anonymous.post(
            "/staff/login", data={"email": f"junk{n}" * 30, "password": "p"}, follow_redirects=False
        )
        assert answer.status_code == 403
    assert event_kinds(engine) == before
    assert "form token missing or wrong" in caplog.text
    for n in range(2):
        assert login(anonymous, password=f"wrong guess {n}").status_code == 401
    assert login(anonymous).status_code == 429  # over the limit: a log line, no audit row
    assert event_kinds(engine)[len(before) :] == ["staff.login_refused"] * 2
    assert "too many failures" in caplog.text


# -- 5. notices ------------------------------------------------------------------------------


def test_notices_name_records_by_number_and_belong_to_one_session(
    app: Starlette, engine: sa.Engine
) -> None:
    sub = make_subscriber(engine, email="leaving@example.org")
    admin = staff_client(app, engine, now=NOW, role="admin")
    done = admin.post(f"/staff/subscribers/{sub.id}/unsubscribe")
    assert done.status_code == 303
    location = done.headers["location"]
    assert "leaving" not in location and "example.org" not in location
    shown = admin.get(location)
    assert f"Subscriber {sub.id} is unsubscribed" in shown.text
    assert store.get(engine, sub.email).status == "unsubscribed"
    # The same link in another session shows no notice: its signature is this session's.
    other = staff_client(app, engine, now=NOW, role="admin", email="other@news.example.org")
    assert f"Subscriber {sub.id} is unsubscribed" not in other.get(location).text

    editor_id = staff_client(app, engine, now=NOW, role="editor").account_id
    removed = admin.post(f"/staff/accounts/{editor_id}/remove")
    assert removed.status_code == 303
    assert "editor" not in removed.headers["location"]
    assert f"Staff account {editor_id} removed" in admin.get(removed.headers["location"]).text


def test_the_welcome_notice_names_no_address(app: Starlette, engine: sa.Engine) -> None:
    link = accounts.add(engine, ANN, "editor", NOW)
    client = TestClient(app, base_url=BASE)
    page = client.get(f"/staff/welcome/{link.token}")
    answer = client.post(
        f"/staff/welcome/{link.token}",
        data={"form_token": form_token(page.text), "password": PASSWORD, "confirm": PASSWORD},
        follow_redirects=False,
    )
    assert answer.status_code == 303
    assert "ann" not in answer.headers["location"]
    assert "Your password is set" in client.get(answer.headers["location"]).text


# -- 6. two admins removing each other ------------------------------------------------------


def test_two_admins_removing_each_other_at_once_leave_one(db_url: str, engine: sa.Engine) -> None:
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite's BEGIN IMMEDIATE lets one writer in at a time already")
    first = new_account(engine, "first@news.example.org")
    second = new_account(engine, "second@news.example.org")
    holding = create_engine(db_url)
    holder = holding.connect()
    # Hold both admin rows, so that both removals start and wait at the same point.
    holder.execute(
        sa.select(staff_accounts.c.id).where(staff_accounts.c.role == "admin").with_for_update()
    )
    outcomes: dict[str, str] = {}

    def remove(who: str, whom: str) -> None:
        try:
            accounts.remove(engine, whom, NOW, by=who)
            outcomes[who] = "removed"
        except StaffAccountError as exc:
            outcomes[who] = exc.reason or "refused"

    threads = [
        threading.Thread(target=remove, args=("first@news.example.org", "second@news.example.org")),
        threading.Thread(target=remove, args=("second@news.example.org", "first@news.example.org")),
    ]
    for thread in threads:
        thread.start()
    watcher = create_engine(db_url)
    deadline = time.monotonic() + 10
    with watcher.connect() as conn:
        while time.monotonic() < deadline:  # both wait on a lock
            waiting = conn.scalar(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database()"
                )
            )
            conn.rollback()
            if waiting == 2:
                break
        assert waiting == 2
    watcher.dispose()
    holder.rollback()
    holder.close()
    holding.dispose()
    for thread in threads:
        thread.join(10)
    assert sorted(outcomes.values()) == ["last_admin", "removed"], outcomes
    with engine.connect() as conn:
        left = list(conn.scalars(sa.select(staff_accounts.c.id)))
    assert len(left) == 1 and left[0] in (first, second)


# -- 7. the smaller walls --------------------------------------------------------------------


def test_the_dummy_hash_is_made_at_import(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert accounts._DUMMY_HASH.startswith("$argon2id$")
    verified: list[str] = []
    real = accounts._hasher

    class Watched:
        """The real hasher, watched: which hashes a login verifies against, and no new one."""

        def verify(self, hash_: str, password: str) -> bool:
            verified.append(hash_)
            return real.verify(hash_, password)

        def hash(self, password: str) -> str:
            raise AssertionError("a login made a hash: the first unknown login would be slower")

    monkeypatch.setattr(accounts, "_hasher", Watched())
    # An unknown account: one verification, against the hash made at import, and no other.
    assert accounts.verify(engine, "nobody@news.example.org", "a long guess here", NOW) is None
    assert verified == [accounts._DUMMY_HASH]


@pytest.mark.parametrize(
    ("client", "key"),
    [
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("192.0.2.7", "192.0.2.7"),
        (None, "unknown"),
        ("testclient", "testclient"),
    ],
)
def test_client_addresses_are_keyed_by_their_ipv6_64(client: str | None, key: str) -> None:
    assert logins.address_key(client) == key


@pytest.mark.parametrize(
    "asked",
    [
        "/staff/%2e%2e/privacy",
        "/staff/%2E%2E/privacy",
        "/staff/.%2e/privacy",
        "/staff/issues%2f..%2f..%2fprivacy",
        "/staff/\\evil.example",
        "/staff//evil.example",
        "/staff/./issues",
    ],
)
def test_next_must_be_a_clean_console_path(app: Starlette, engine: sa.Engine, asked: str) -> None:
    new_account(engine)
    answer = login(TestClient(app, base_url=BASE), next=asked)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/staff/"


def test_a_403_page_is_not_cached_and_names_no_address(app: Starlette, engine: sa.Engine) -> None:
    editor = staff_client(app, engine, now=NOW, role="editor")
    answer = editor.get("/staff/subscribers")
    assert answer.status_code == 403
    assert answer.headers["cache-control"] == "no-store"
    assert editor.email not in answer.text
    assert "your account is an editor" in answer.text


def test_reset_asks_for_confirmation_first(app: Starlette, engine: sa.Engine) -> None:
    admin = staff_client(app, engine, now=NOW, role="admin")
    editor = staff_client(app, engine, now=NOW, role="editor")
    listed = admin.get("/staff/accounts").text
    assert f'action="/staff/accounts/{editor.account_id}/reset"' not in listed
    assert f'href="/staff/accounts/{editor.account_id}/reset"' in listed
    confirm = admin.get(f"/staff/accounts/{editor.account_id}/reset")
    assert confirm.status_code == 200
    assert f"Reset {editor.email}?" in confirm.text
    assert f'action="/staff/accounts/{editor.account_id}/reset"' in confirm.text
    assert accounts.get(engine, editor.account_id).link_expires_at is None  # a GET changes nothing
    done = admin.post(f"/staff/accounts/{editor.account_id}/reset")
    assert done.status_code == 200
    assert accounts.get(engine, editor.account_id).link_expires_at is not None


def test_login_deletes_the_accounts_ended_sessions(
    app: Starlette, engine: sa.Engine, clock: Clock
) -> None:
    account_id = new_account(engine)
    rules = sessions.Rules()
    with engine.begin() as conn:
        for _ in range(3):  # browsers that never came back
            sessions.open_session(conn, account_id, now=NOW, rules=rules, ip=None)
    clock.value = NOW + timedelta(hours=1)
    with engine.begin() as conn:  # one still open (seen 10 minutes ago)
        sessions.open_session(
            conn, account_id, now=clock.value - timedelta(minutes=10), rules=rules, ip=None
        )
    assert login(TestClient(app, base_url=BASE)).status_code == 303
    with engine.connect() as conn:
        left = conn.scalar(
            sa.select(sa.func.count())
            .select_from(staff_sessions)
            .where(staff_sessions.c.account_id == account_id)
        )
    assert left == 2  # the open one and the new one


def test_web_line_names_the_consoles_address(db_url: str) -> None:
    settings = make_settings(
        db_url,
        staff_web={"host": "127.0.0.1", "port": 8001, "base_url": "https://staff.example.org"},
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        line = web_line(settings, sock)
    assert "staff console on http://127.0.0.1:8001/staff/" in line
    assert "(staff open https://staff.example.org/staff/)" in line
