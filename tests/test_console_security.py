"""The staff console's walls, spoken to over HTTP (Starlette's TestClient over https), on
SQLite and PostgreSQL: every /staff/ route refuses without a session, a POST without the
session's CSRF token changes nothing, an editor cannot reach admin actions, a session ends at
logout and at a password reset, the session id changes at login, login limits hold across two
app instances on one database, a one-time link works once and expires, the timing of a login
does not tell whether an account exists, and the cookie carries its attributes."""

from __future__ import annotations

import re
import statistics
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning
from starlette.routing import Mount, Route

from mailer.clock import now as clock_now
from mailer.console import accounts, sessions
from mailer.db.engine import create_engine
from mailer.db.schema import events, metadata, staff_sessions
from tests.console import BASE, StaffClient, add_account, make_app, staff_client
from tests.factories import NOW, Clock, make_settings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

PASSWORD = "quilt harbor velvet 1987 tram"
# Routes under /staff that answer without a session, by design: the login pages, and the
# console's stylesheet and script (static files that hold no data).
PUBLIC = {"/static/console.css", "/static/console.js", "/login", "/welcome/{token}"}


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def app(engine: sa.Engine, db_url: str, clock: Clock) -> Starlette:
    return make_app(engine, db_url, clock)


def staff_routes(app: Starlette) -> list[Route]:
    """Every route of the app's /staff mount: routes added later are covered too."""
    mounts = [r for r in app.routes if isinstance(r, Mount) and r.path == "/staff"]
    assert len(mounts) == 1
    routes = [r for r in mounts[0].routes if isinstance(r, Route)]
    assert routes
    return routes


def filled(route: Route) -> str:
    return "/staff" + re.sub(r"\{[^}]+\}", "1", route.path)


def snapshot(engine: sa.Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table: to prove a request changed nothing."""
    with engine.connect() as conn:
        return {
            table.name: sorted(map(tuple, conn.execute(sa.select(table))), key=repr)
            for table in metadata.sorted_tables
        }


def new_account(engine: sa.Engine, email: str, role: str = "editor") -> None:
    link = accounts.add(engine, email, role, NOW)
    accounts.set_password(engine, link.token, PASSWORD, NOW)


def form_token(client: TestClient, path: str = "/staff/login") -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    found = re.search(r'name="form_token" value="([^"]+)"', page.text)
    assert found
    return found.group(1)


def login(
    client: TestClient,
    email: str,
    password: str = PASSWORD,
    *,
    token: str | None = None,
    next_path: str = "",
) -> Any:
    data = {
        "form_token": token or form_token(client),
        "email": email,
        "password": password,
        "next": next_path,
    }
    return client.post("/staff/login", data=data, follow_redirects=False)


def kinds(engine: sa.Engine) -> list[tuple[str, dict[str, Any]]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(events.c.kind, events.c.detail).order_by(events.c.id))
        return [(r.kind, dict(r.detail)) for r in rows]


# -- without a session ---------------------------------------------------------------------


def test_every_staff_route_refuses_without_a_session(app: Starlette) -> None:
    client = TestClient(app, base_url=BASE)
    checked = 0
    for route in staff_routes(app):
        if route.path in PUBLIC:
            continue
        path = filled(route)
        methods = route.methods or set()
        if "GET" in methods:
            answer = client.get(path, follow_redirects=False)
            assert answer.status_code in (303, 401), (path, answer.status_code)
            if answer.status_code == 303:
                assert answer.headers["location"].startswith("/staff/login?next="), path
            checked += 1
        if "POST" in methods:
            answer = client.post(path, data={"csrf": "x"}, follow_redirects=False)
            assert answer.status_code in (401, 403), (path, answer.status_code)
            checked += 1
    assert checked >= 5


def test_a_forged_or_foreign_cookie_is_no_session(app: Starlette, engine: sa.Engine) -> None:
    client = TestClient(app, base_url=BASE)
    client.cookies.set(sessions.COOKIE_NAME, "abc." + "0" * 64)
    assert client.get("/staff/accounts", follow_redirects=False).status_code == 303
    other = sessions.cookie_value(b"another secret" * 3, "abc")
    client.cookies.set(sessions.COOKIE_NAME, other)
    assert client.get("/staff/accounts", follow_redirects=False).status_code == 303


# -- CSRF and roles ------------------------------------------------------------------------


@pytest.mark.parametrize("sent", [None, "wrong-token"], ids=["without", "wrong"])
def test_a_post_without_the_csrf_token_changes_nothing(
    app: Starlette, engine: sa.Engine, sent: str | None
) -> None:
    admin = staff_client(app, engine, now=NOW, role="admin")
    add_account(engine, "ann@news.example.org", "editor", now=NOW)
    before = snapshot(engine)
    posted = 0
    for route in staff_routes(app):
        if "POST" not in (route.methods or set()) or route.path in PUBLIC:
            continue
        data: dict[str, str] = {"email": "new@news.example.org", "role": "admin"}
        if sent is not None:
            data["csrf"] = sent
        for account_id in ("1", "2"):
            path = "/staff" + re.sub(r"\{[^}]+\}", account_id, route.path)
            answer = admin.client.post(path, data=data, follow_redirects=False)
            assert answer.status_code == 403, (path, answer.status_code)
            posted += 1
    assert posted >= 4
    assert snapshot(engine) == before


def test_an_editor_cannot_reach_admin_actions(app: Starlette, engine: sa.Engine) -> None:
    editor = staff_client(app, engine, now=NOW, role="editor")
    target = add_account(engine, "ann@news.example.org", "editor", now=NOW)
    before = snapshot(engine)
    assert editor.get("/staff/accounts").status_code == 403
    assert editor.get(f"/staff/accounts/{target}/remove").status_code == 403
    for path, data in [
        ("/staff/accounts", {"email": "new@news.example.org", "role": "admin"}),
        (f"/staff/accounts/{target}/reset", {}),
        (f"/staff/accounts/{target}/remove", {}),
    ]:
        assert editor.post(path, data).status_code == 403, path
    assert snapshot(engine) == before


# -- login, logout, rotation ----------------------------------------------------------------


def test_login_sets_a_strict_cookie_and_lands_on_the_dashboard(
    app: Starlette, engine: sa.Engine
) -> None:
    new_account(engine, "ann@news.example.org", "admin")
    client = TestClient(app, base_url=BASE)
    answer = login(client, "Ann@News.Example.org")
    assert answer.status_code == 303
    assert answer.headers["location"] == "/staff/"
    cookie = next(v for v in answer.headers.get_list("set-cookie") if v.startswith("mailer_staff="))
    attributes = {part.strip().split("=")[0].lower(): part for part in cookie.split(";")}
    assert "secure" in attributes and "httponly" in attributes
    assert attributes["samesite"].strip().lower() == "samesite=strict"
    assert attributes["path"].strip() == "Path=/staff"
    # A browser-session cookie: the server ends the session at its idle time or lifetime.
    assert "max-age" not in attributes and "expires" not in attributes
    assert client.get("/staff/accounts", follow_redirects=False).status_code == 200
    assert ("staff.login", {"by": "ann@news.example.org", "ip": "testclient"}) in kinds(engine)


@pytest.mark.parametrize(
    ("asked", "landed"),
    [
        ("/staff/accounts", "/staff/accounts"),
        ("https://evil.example/staff/", "/staff/"),
        ("//evil.example/staff/", "/staff/"),
        ("/\\evil.example", "/staff/"),
        ("/archive", "/staff/"),
        ("/staff/../archive", "/staff/"),
    ],
    ids=["staff-path", "other-host", "scheme-relative", "backslash", "outside", "dot-dot"],
)
def test_login_goes_back_only_to_a_staff_path(
    app: Starlette, engine: sa.Engine, asked: str, landed: str
) -> None:
    new_account(engine, "ann@news.example.org", "admin")
    client = TestClient(app, base_url=BASE)
    answer = login(client, "ann@news.example.org", next_path=asked)
    assert answer.status_code == 303
    assert answer.headers["location"] == landed


def test_a_login_post_without_the_form_token_is_refused(app: Starlette, engine: sa.Engine) -> None:
    new_account(engine, "ann@news.example.org")
    client = TestClient(app, base_url=BASE)
    good = form_token(client)
    for token in ("", "abc.1.def", good.rsplit(".", 1)[0] + ".0" * 32):
        data = {"form_token": token, "email": "ann@news.example.org", "password": PASSWORD}
        answer = client.post("/staff/login", data=data, follow_redirects=False)
        assert answer.status_code == 403
    # the token without its cookie (another browser) is refused too
    stranger = TestClient(app, base_url=BASE)
    answer = login(stranger, "ann@news.example.org", token=good)
    assert answer.status_code == 403
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(staff_sessions)) == 0


def test_wrong_password_is_refused_and_recorded(app: Starlette, engine: sa.Engine) -> None:
    new_account(engine, "ann@news.example.org")
    client = TestClient(app, base_url=BASE)
    answer = login(client, "ann@news.example.org", "not the password at all")
    assert answer.status_code == 401
    assert "Wrong address or password." in answer.text
    assert "mailer_staff=" not in " ".join(answer.headers.get_list("set-cookie"))
    refused = [d for k, d in kinds(engine) if k == "staff.login_refused"]
    assert refused == [{"by": "ann@news.example.org", "reason": "password", "ip": "testclient"}]


def test_the_session_id_changes_at_login(app: Starlette, engine: sa.Engine) -> None:
    new_account(engine, "ann@news.example.org")
    client = TestClient(app, base_url=BASE)
    assert login(client, "ann@news.example.org").status_code == 303
    first = client.cookies.get(sessions.COOKIE_NAME)
    assert login(client, "ann@news.example.org").status_code == 303
    second = client.cookies.get(sessions.COOKIE_NAME)
    assert first and second and first != second
    with engine.connect() as conn:  # the old session was closed, not left beside the new
        assert conn.scalar(sa.select(sa.func.count()).select_from(staff_sessions)) == 1
    stale = TestClient(app, base_url=BASE)
    stale.cookies.set(sessions.COOKIE_NAME, first)
    assert stale.get("/staff/accounts", follow_redirects=False).status_code == 303


def test_a_planted_session_id_is_replaced_at_login(app: Starlette, engine: sa.Engine) -> None:
    planted = staff_client(app, engine, now=NOW, role="editor", email="ann@news.example.org")
    link = accounts.reset(engine, "ann@news.example.org", NOW)
    accounts.set_password(engine, link.token, PASSWORD, NOW)
    before = planted.client.cookies.get(sessions.COOKIE_NAME)
    answer = login(planted.client, "ann@news.example.org")
    assert answer.status_code == 303
    after = answer.cookies.get(sessions.COOKIE_NAME)
    assert after and after != before
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(staff_sessions)) == 1
    stale = TestClient(app, base_url=BASE)
    stale.cookies.set(sessions.COOKIE_NAME, before or "")
    assert stale.get("/staff/accounts", follow_redirects=False).status_code == 303


def test_a_cookie_from_before_logout_is_refused(app: Starlette, engine: sa.Engine) -> None:
    new_account(engine, "ann@news.example.org", "admin")
    client = TestClient(app, base_url=BASE)
    login(client, "ann@news.example.org")
    kept = client.cookies.get(sessions.COOKIE_NAME)
    page = client.get("/staff/accounts")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf
    answer = client.post("/staff/logout", data={"csrf": csrf.group(1)}, follow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["location"].startswith("/staff/login?notice=")
    cleared = next(v for v in answer.headers.get_list("set-cookie") if "mailer_staff=" in v)
    assert "Max-Age=0" in cleared or "expires=" in cleared.lower()
    replay = TestClient(app, base_url=BASE)
    replay.cookies.set(sessions.COOKIE_NAME, kept or "")
    assert replay.get("/staff/accounts", follow_redirects=False).status_code == 303
    assert replay.post("/staff/logout", data={"csrf": csrf.group(1)}).status_code == 401
    assert ("staff.logout", {"by": "ann@news.example.org"}) in kinds(engine)


def test_a_cookie_from_before_a_password_reset_is_refused(
    app: Starlette, engine: sa.Engine
) -> None:
    new_account(engine, "ann@news.example.org", "editor")
    admin = staff_client(app, engine, now=NOW, role="admin")
    client = TestClient(app, base_url=BASE)
    login(client, "ann@news.example.org")
    assert client.get("/staff/accounts", follow_redirects=False).status_code == 403  # in, editor
    ann = accounts.find(engine, "ann@news.example.org")
    assert ann is not None
    answer = admin.post(f"/staff/accounts/{ann.id}/reset")
    assert answer.status_code == 200
    assert "/staff/welcome/" in answer.text
    assert client.get("/staff/accounts", follow_redirects=False).status_code == 303  # out
    assert login(client, "ann@news.example.org").status_code == 401  # the password is gone too
    assert ("staff.reset", {"by": admin.email, "email": "ann@news.example.org", "sessions": 1}) in (
        kinds(engine)
    )


# -- login limits ---------------------------------------------------------------------------


def test_the_login_limit_holds_across_two_app_instances(
    engine: sa.Engine, db_url: str, clock: Clock
) -> None:
    new_account(engine, "ann@news.example.org")
    other_engine = create_engine(db_url)
    try:
        first = TestClient(make_app(engine, db_url, clock), base_url=BASE)
        second = TestClient(make_app(other_engine, db_url, clock), base_url=BASE)
        for n in range(5):
            client = (first, second)[n % 2]
            assert login(client, "ann@news.example.org", f"wrong guess {n}").status_code == 401
            clock.value += timedelta(minutes=1)
        # over the limit: the right password is not even checked, on either instance
        for client in (first, second):
            answer = login(client, "ann@news.example.org")
            assert answer.status_code == 429
            assert "Too many failed logins for this account. Wait 10 minutes" in answer.text
        clock.value = NOW + timedelta(minutes=15)
        assert login(second, "ann@news.example.org").status_code == 303
    finally:
        other_engine.dispose()
    refused = [d["reason"] for k, d in kinds(engine) if k == "staff.login_refused"]
    # A refusal by the limit is a log line, not an audit event (anyone can cause one).
    assert refused == ["password"] * 5


def test_the_login_limit_per_client_address(engine: sa.Engine, db_url: str, clock: Clock) -> None:
    app = make_app(engine, db_url, clock, staff_login_per_address=3)
    client = TestClient(app, base_url=BASE)
    token = form_token(client)
    for n in range(3):
        assert login(client, f"user{n}@news.example.org", "x" * 12, token=token).status_code == 401
    answer = login(client, "other@news.example.org", "x" * 12, token=token)
    assert answer.status_code == 429
    assert "your network address. Wait 15 minutes" in answer.text


# -- one-time links ---------------------------------------------------------------------------


def test_a_one_time_link_works_once(app: Starlette, engine: sa.Engine) -> None:
    link = accounts.add(engine, "ann@news.example.org", "editor", NOW)
    client = TestClient(app, base_url=BASE)
    path = f"/staff/welcome/{link.token}"
    before = snapshot(engine)
    token = form_token(client, path)
    assert snapshot(engine) == before  # the GET does not use the link
    weak = client.post(
        path, data={"form_token": token, "password": "password1234", "confirm": "password1234"}
    )
    assert weak.status_code == 400 and "too easy to guess" in weak.text
    answer = client.post(
        path,
        data={"form_token": token, "password": PASSWORD, "confirm": PASSWORD},
        follow_redirects=False,
    )
    assert answer.status_code == 303
    assert answer.headers["location"].startswith("/staff/login?notice=")
    assert client.get(path).status_code == 404
    again = client.post(
        path, data={"form_token": token, "password": PASSWORD + "!", "confirm": PASSWORD + "!"}
    )
    assert again.status_code == 404
    assert login(client, "ann@news.example.org").status_code == 303
    assert "staff.password_set" in [k for k, _ in kinds(engine)]


def test_an_expired_link_is_refused(app: Starlette, engine: sa.Engine, clock: Clock) -> None:
    link = accounts.add(engine, "ann@news.example.org", "editor", NOW)
    client = TestClient(app, base_url=BASE)
    path = f"/staff/welcome/{link.token}"
    token = form_token(client, path)
    clock.value = NOW + timedelta(hours=24)
    page = client.get(path)
    assert page.status_code == 410 and "expired" in page.text
    answer = client.post(
        path, data={"form_token": token, "password": PASSWORD, "confirm": PASSWORD}
    )
    assert answer.status_code == 410
    assert accounts.verify(engine, "ann@news.example.org", PASSWORD, NOW) is None


def test_an_unknown_link_is_a_404(app: Starlette) -> None:
    client = TestClient(app, base_url=BASE)
    assert client.get("/staff/welcome/not-a-real-token").status_code == 404


def test_odd_ids_and_tokens_are_answered_not_crashed_on(app: Starlette, engine: sa.Engine) -> None:
    admin = staff_client(app, engine, now=NOW, role="admin")
    for odd in ("²", "9" * 40, "-1", "x"):
        assert admin.get(f"/staff/accounts/{odd}/remove").status_code == 404
        assert admin.post(f"/staff/accounts/{odd}/reset").status_code == 404
    client = TestClient(app, base_url=BASE)
    token = form_token(client)
    nonce, issued, mac = token.split(".")
    for forged in (f"{nonce}.²{issued}.{mac}", f"{nonce}.{issued}9.{mac}", "." * 5):
        data = {"form_token": forged, "email": "a@news.example.org", "password": PASSWORD}
        assert client.post("/staff/login", data=data).status_code == 403


# -- timing ---------------------------------------------------------------------------------


def test_login_timing_does_not_tell_whether_an_account_exists(
    engine: sa.Engine, db_url: str, clock: Clock
) -> None:
    app = make_app(
        engine, db_url, clock, staff_login_per_account=1000, staff_login_per_address=1000
    )
    new_account(engine, "ann@news.example.org")
    client = TestClient(app, base_url=BASE)
    token = form_token(client)

    def timed(email: str) -> float:
        start = time.perf_counter()
        answer = login(client, email, "not the password at all", token=token)
        elapsed = time.perf_counter() - start
        assert answer.status_code == 401
        return elapsed

    timed("nobody@news.example.org")  # warm up: the dummy hash is made once per process
    known: list[float] = []
    unknown: list[float] = []
    for _ in range(15):  # interleaved, so that a busy moment of the machine hits both
        known.append(timed("ann@news.example.org"))
        unknown.append(timed("nobody@news.example.org"))
    ratio = statistics.median(known) / statistics.median(unknown)
    assert 0.5 < ratio < 2.0, (statistics.median(known), statistics.median(unknown))


# -- the Staff page ---------------------------------------------------------------------------


def test_the_staff_page_adds_shows_the_link_once_and_removes_behind_a_confirmation(
    app: Starlette, engine: sa.Engine
) -> None:
    admin: StaffClient = staff_client(app, engine, now=NOW, role="admin")
    added = admin.post("/staff/accounts", {"email": "Ann@News.Example.org", "role": "editor"})
    assert added.status_code == 200
    found = re.search(r"https://news\.example\.org/staff/welcome/([A-Za-z0-9_-]+)", added.text)
    assert found
    listing = admin.get("/staff/accounts")
    assert "ann@news.example.org" in listing.text and found.group(1) not in listing.text
    duplicate = admin.post("/staff/accounts", {"email": "ann@news.example.org", "role": "admin"})
    assert duplicate.status_code == 400 and "already has a staff account" in duplicate.text
    ann = accounts.find(engine, "ann@news.example.org")
    assert ann is not None
    confirm = admin.get(f"/staff/accounts/{ann.id}/remove")
    assert confirm.status_code == 200 and "Remove ann@news.example.org?" in confirm.text
    removed = admin.post(f"/staff/accounts/{ann.id}/remove")
    assert removed.status_code == 303
    assert accounts.find(engine, "ann@news.example.org") is None
    # an admin cannot remove themselves, nor the last admin
    assert f"/staff/accounts/{admin.account_id}/remove" not in admin.get("/staff/accounts").text
    refused = admin.post(f"/staff/accounts/{admin.account_id}/remove")
    assert refused.status_code == 400 and "your own account" in refused.text
    assert accounts.find(engine, admin.email) is not None
    assert [k for k, _ in kinds(engine)] == ["staff.added", "staff.removed"]
    assert all(d["by"] == admin.email for _, d in kinds(engine))


# -- in a real browser ------------------------------------------------------------------------


def test_in_chromium_set_a_password_log_in_and_out(browser: Any, db_url: str, shots: Path) -> None:
    from tests.browser import DESKTOP, PHONE, page_at
    from tests.served import at, serve

    with serve(lambda base: make_settings(db_url, **at(base))) as (server, engine, settings):
        link = accounts.add(engine, "admin@news.example.org", "admin", clock_now())
        page = page_at(browser, PHONE)
        try:
            page.goto(accounts.link_url(settings, link.token))
            assert page.get_by_role("heading", name="Set your password").is_visible()
            page.get_by_label("New password").fill(PASSWORD)
            page.get_by_label("The same again").fill(PASSWORD)
            assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
            page.screenshot(path=str(shots / "staff-welcome-phone.png"), full_page=True)
            page.get_by_role("button", name="Set password").click()
            page.wait_for_url(re.compile(r".*/staff/login\?notice=.*"))
            assert "Your password is set" in page.inner_text("main")
            page.get_by_label("Email address").fill("admin@news.example.org")
            page.get_by_label("Password").fill(PASSWORD)
            assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
            page.screenshot(path=str(shots / "staff-login-phone.png"), full_page=True)
            page.get_by_role("button", name="Log in").click()
            # The dashboard's URL, whatever page is there yet.
            page.wait_for_url(f"{server.url}/staff/")
            cookie = next(c for c in page.context.cookies() if c["name"] == sessions.COOKIE_NAME)
            assert cookie["secure"] and cookie["httpOnly"]
            assert cookie["sameSite"] == "Strict" and cookie["path"] == "/staff"
            page.goto(f"{server.url}/staff/accounts")
            assert page.get_by_role("heading", name="Staff accounts").is_visible()
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= PHONE["width"], width  # no sideways scroll
            page.screenshot(path=str(shots / "staff-accounts-phone.png"), full_page=True)
            page.set_viewport_size(DESKTOP)
            assert page.evaluate("document.documentElement.scrollWidth") <= DESKTOP["width"]
            page.screenshot(path=str(shots / "staff-accounts-desktop.png"), full_page=True)
            page.set_viewport_size(PHONE)
            page.get_by_role("button", name="Log out").click()
            page.wait_for_url(re.compile(r".*/staff/login\?notice=.*"))
            assert "You are logged out." in page.inner_text("main")
            assert all(c["name"] != sessions.COOKIE_NAME for c in page.context.cookies())
            page.goto(f"{server.url}/staff/accounts")
            assert "/staff/login?next=" in page.url
        finally:
            page.context.close()
