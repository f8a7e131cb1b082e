"""The console's charts: their figures from a seeded store, the SVG pygal draws of them, the
endpoints that serve it and the tables behind it, on SQLite and PostgreSQL."""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from itertools import count
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.testclient import TestClient

from mailer.console import charts, figures, sessions
from mailer.console.chartviews import CHARTS
from mailer.db.buckets import below
from mailer.db.engine import create_engine
from mailer.db.schema import UtcDateTime, deliveries, events, issues, subscribers
from mailer.staff.checks import Rates
from mailer.web import SmtpConfirmationSender, create_app
from tests.browser import DESKTOP, PHONE, page_at
from tests.console import BASE, add_account, staff_client
from tests.factories import Clock, make_settings
from tests.served import at, serve

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
ZONE = ZoneInfo("UTC")
SVG_NAMESPACES = {b"http://www.w3.org/2000/svg", b"http://www.w3.org/1999/xlink"}
_numbers = count(1)


def ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


def add_subscriber(
    conn: sa.Connection,
    status: str,
    *,
    confirmed: datetime | None,
    left: datetime | None = None,
    updated: datetime | None = None,
) -> int:
    n = next(_numbers)
    sid: int = conn.execute(
        subscribers.insert()
        .values(
            uid=f"uid{n:029d}",
            email=f"reader{n}@example.org",
            status=status,
            created_at=ago(200),
            updated_at=updated or left or confirmed or ago(200),
            confirmed_at=confirmed,
            unsubscribed_at=left,
        )
        .returning(subscribers.c.id)
    ).scalar_one()
    return sid


def add_issue(conn: sa.Connection, status: str, slot: datetime) -> int:
    issue_id: int = conn.execute(
        issues.insert()
        .values(
            digest="daily",
            scheduled_for=slot,
            window_end=slot,
            subject=f"Issue of {slot:%d %b}",
            topics="local",
            status=status,
            created_at=slot,
        )
        .returning(issues.c.id)
    ).scalar_one()
    return issue_id


def add_delivery(
    conn: sa.Connection, issue_id: int, sid: int, status: str, at: datetime, *, sent: bool
) -> None:
    conn.execute(
        deliveries.insert().values(
            issue_id=issue_id,
            subscriber_id=sid,
            status=status,
            next_attempt_at=at,
            message_id=f"<{issue_id}.{sid}@news.example.org>",
            created_at=at,
            updated_at=at,
            sent_at=at if sent else None,
        )
    )


def add_event(conn: sa.Connection, sid: int | None, kind: str, at: datetime, **detail: Any) -> None:
    conn.execute(events.insert().values(subscriber_id=sid, kind=kind, at=at, detail=detail))


# The seeded store, week by week (weeks end at NOW - 7k days, k = 11 … 0):
#   a: active, confirmed long before the 12 weeks: active at every week's end
#   b: active, confirmed 10 days ago: active at the last two ends
#   c: confirmed 60 days ago, unsubscribed 20 days ago: active at the ends of days -56 … -21
#   d: confirmed 30 days ago, bounced 3 days ago: active at the ends of days -28 … -7
#   e: pending, never confirmed: never active
ACTIVE = [1, 1, 1, 2, 2, 2, 2, 3, 3, 2, 3, 2]
SIGNUPS = [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 1, 1]
UNSUBSCRIBES = [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0]


@pytest.fixture
def seeded(engine: sa.Engine) -> dict[str, int]:
    return seed(engine)


def seed(engine: sa.Engine) -> dict[str, int]:
    with engine.begin() as conn:
        a = add_subscriber(conn, "active", confirmed=ago(100))
        b = add_subscriber(conn, "active", confirmed=ago(10))
        c = add_subscriber(conn, "unsubscribed", confirmed=ago(60), left=ago(20))
        d = add_subscriber(conn, "bounced", confirmed=ago(30), updated=ago(3))
        e = add_subscriber(conn, "pending", confirmed=None)
        add_event(conn, a, "confirmed", ago(100), source="web")  # before the 12 weeks
        add_event(conn, b, "confirmed", ago(10), source="web")
        add_event(conn, c, "confirmed", ago(60), source="web")
        add_event(conn, d, "confirmed", ago(30), source="web")
        add_event(conn, a, "subscribed", ago(2), source="cli", status="active")  # staff added
        add_event(conn, e, "subscribed", ago(2), source="web", status="pending")  # not yet
        add_event(conn, c, "unsubscribed", ago(20), source="web")
        add_event(conn, d, "unsubscribed", ago(7), source="web")  # a week's end is in it
        first = add_issue(conn, "sent", ago(40))
        add_delivery(conn, first, a, "sent", ago(40), sent=True)
        add_delivery(conn, first, b, "sent", ago(40), sent=True)
        add_delivery(conn, first, c, "bounced", ago(40), sent=False)  # refused at send time
        add_delivery(conn, first, d, "failed", ago(40), sent=False)
        second = add_issue(conn, "sending", ago(5))
        add_delivery(conn, second, a, "sent", ago(5), sent=True)
        add_delivery(conn, second, b, "deferred", ago(5), sent=False)
        add_delivery(conn, second, c, "cancelled", ago(5), sent=False)
        add_delivery(conn, second, d, "queued", ago(5), sent=False)
        add_delivery(conn, second, e, "unknown", ago(5), sent=False)
        add_issue(conn, "review", NOW + timedelta(days=1))  # not out yet: not charted
        add_event(conn, a, "complaint", ago(1), type="complaint")
        add_event(conn, b, "bounce", ago(1), type="hard")
        add_event(conn, c, "bounce", ago(1), type="soft")  # not a hard bounce
    return {"first": first, "second": second}


def make_app(engine: sa.Engine, db_url: str) -> Starlette:
    settings = make_settings(db_url)
    sender = SmtpConfirmationSender(settings, local_hostname="client.test")
    return create_app(settings, engine, sender, clock=Clock(NOW))


# -- the figures


@pytest.mark.parametrize(
    ("days", "before", "before_or_at"),
    [(4, 0, 0), (3, 0, 1), (2.5, 1, 1), (2, 1, 2), (1, 2, 3), (0, 3, 3)],
    ids=["earlier", "at-first", "between", "at-middle", "at-last", "later"],
)
def test_a_timestamp_is_placed_among_boundaries_exactly(
    engine: sa.Engine, days: float, before: int, before_or_at: int
) -> None:
    bounds = [ago(3), ago(2), ago(1)]
    value = sa.literal(ago(days), UtcDateTime())
    with engine.connect() as conn:
        found = conn.execute(
            sa.select(below(value, bounds), below(value, bounds, or_at=True))
        ).one()
    assert tuple(found) == (before, before_or_at)


def test_active_subscribers_sign_ups_and_unsubscribes_per_week(
    engine: sa.Engine, seeded: dict[str, int]
) -> None:
    weeks = figures.subscriber_weeks(engine, now=NOW)
    assert [w.end for w in weeks] == [NOW - timedelta(weeks=k) for k in range(11, -1, -1)]
    assert [w.active for w in weeks] == ACTIVE
    assert [w.signups for w in weeks] == SIGNUPS
    assert [w.unsubscribes for w in weeks] == UNSUBSCRIBES


def test_deliveries_by_outcome_of_the_issues_that_went_out(
    engine: sa.Engine, seeded: dict[str, int]
) -> None:
    found = figures.issue_outcomes(engine)
    assert [i.issue_id for i in found] == [seeded["first"], seeded["second"]]  # oldest first
    assert found[0].counts == {
        "sent": 2, "deferred": 0, "bounced": 1, "failed": 1, "cancelled": 0, "other": 0
    }  # fmt: skip
    assert found[1].counts == {
        "sent": 1, "deferred": 1, "bounced": 0, "failed": 0, "cancelled": 1, "other": 2
    }  # fmt: skip


def test_rates_day_by_day_are_what_the_staff_check_measures(
    engine: sa.Engine, seeded: dict[str, int]
) -> None:
    from mailer.staff.checks import measure_rates

    days = figures.rates_by_day(engine, now=NOW)
    assert len(days) == 30
    assert days[-1].at == NOW
    for day in (days[0], days[12], days[-1]):
        assert day.rates == measure_rates(engine, now=day.at)
    # Today: issue 2's one accepted message, one complaint, one hard bounce (the soft one
    # does not count), issue 1 out of the window.
    assert days[-1].rates == Rates(accepted=1, attempted=1, complaints=1, hard_bounces=1)
    # 29 days ago the window held issue 1: two accepted, one refused at send time.
    assert days[0].rates == Rates(accepted=2, attempted=3, complaints=0, hard_bounces=0)
    assert not days[-1].enough


# -- the pictures


def values_of(svg: bytes) -> list[str]:
    """The values pygal wrote into the SVG, series after series, point after point."""
    return [v.decode() for v in re.findall(rb'<desc class="value">([^<]*)</desc>', svg)]


def assert_self_contained(svg: bytes) -> ET.Element:
    root = ET.fromstring(svg)  # well-formed XML
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert root.get("viewBox") and root.get("width") is None  # takes its box's width
    assert not [el for el in root.iter() if str(el.tag).lower().endswith("script")]
    assert b"<script" not in svg.lower()
    assert set(re.findall(rb"https?://[^\s\"'<>)]+", svg)) <= SVG_NAMESPACES
    assert b"@import" not in svg and b"href" not in svg
    return root


def texts(root: ET.Element) -> list[str]:
    return ["".join(el.itertext()) for el in root.iter("{http://www.w3.org/2000/svg}text")]


def test_each_chart_is_self_contained_svg_with_its_numbers(
    engine: sa.Engine, seeded: dict[str, int]
) -> None:
    weeks = figures.subscriber_weeks(engine, now=NOW)
    svg = charts.subscribers_chart(weeks, ZONE)
    assert_self_contained(svg)
    assert values_of(svg) == [str(n) for n in ACTIVE + SIGNUPS + UNSUBSCRIBES]

    svg = charts.deliveries_chart(figures.issue_outcomes(engine), ZONE)
    root = assert_self_contained(svg)
    assert values_of(svg) == ["2", "1", "0", "1", "1", "0", "1", "0", "0", "1", "0", "2"]
    assert "Queued or unknown" in texts(root)


@pytest.mark.parametrize(
    ("complaints", "limit"), [(True, "0.1"), (False, "2")], ids=["complaints", "bounces"]
)
def test_a_rate_chart_draws_its_limit_as_a_named_line(
    engine: sa.Engine, seeded: dict[str, int], complaints: bool, limit: str
) -> None:
    days = figures.rates_by_day(engine, now=NOW)
    svg = charts.rate_chart(days, ZONE, complaints=complaints)
    root = assert_self_contained(svg)
    assert f"Limit {limit} % (Gmail, Yahoo)" in texts(root)
    # Two lines: the rate, and the limit, level across the 30 days at its height.
    lines = root.findall(".//{http://www.w3.org/2000/svg}path[@class='line reactive nofill']")
    assert len(lines) == 2
    points = re.findall(r"([\d.]+) ([\d.]+)", lines[1].get("d") or "")
    assert len(points) == 30 and len({y for _, y in points}) == 1
    # The rate's values are the table's: in percent, one per day with mail in its 30 days.
    assert values_of(svg)[-1] == "100.00 %"
    assert len(values_of(svg)) == sum(1 for day in days if day.rates.attempted)


@pytest.mark.parametrize("name", list(CHARTS))
def test_a_chart_without_data_says_so(engine: sa.Engine, name: str) -> None:
    weeks = figures.subscriber_weeks(engine, now=NOW)
    days = figures.rates_by_day(engine, now=NOW)
    svg = {
        "subscribers": lambda: charts.subscribers_chart(weeks, ZONE),
        "deliveries": lambda: charts.deliveries_chart(figures.issue_outcomes(engine), ZONE),
        "complaints": lambda: charts.rate_chart(days, ZONE, complaints=True),
        "bounces": lambda: charts.rate_chart(days, ZONE, complaints=False),
    }[name]()
    root = assert_self_contained(svg)
    said = texts(root)
    assert any(t.startswith("No ") for t in said), said
    assert values_of(svg) == []  # and no frame of axes around nothing
    assert not [el for el in root.iter() if (el.get("class") or "").startswith("axis")]


# -- the endpoints and the tables


class Tables(HTMLParser):
    """The cells of each table of a page, by row, and the images' src and alt."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.images: list[dict[str, str | None]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def test_the_charts_refuse_without_a_session(engine: sa.Engine, db_url: str) -> None:
    client = TestClient(make_app(engine, db_url), base_url=BASE)
    for name in CHARTS:
        response = client.get(f"/staff/charts/{name}.svg", follow_redirects=False)
        assert response.status_code == 401
        assert b"<svg" not in response.content
    page = client.get("/staff/charts", follow_redirects=False)
    assert page.status_code == 303
    assert page.headers["location"].startswith("/staff/login?next=")


def test_a_chart_is_served_as_svg_that_runs_nothing(
    engine: sa.Engine, db_url: str, seeded: dict[str, int]
) -> None:
    staff = staff_client(make_app(engine, db_url), engine, now=NOW)
    for name in CHARTS:
        response = staff.get(f"/staff/charts/{name}.svg")
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/svg+xml"
        assert response.headers["cache-control"] == "no-store"
        csp = response.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script" not in csp
        assert_self_contained(response.content)
    assert staff.get("/staff/charts/nothing.svg").status_code == 404


def test_a_page_computes_each_figure_once_and_draws_nothing(
    engine: sa.Engine, db_url: str, seeded: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page needs the figures and their tables; the picture is the ``.svg``'s work."""
    calls: dict[str, int] = {}

    def counted(module: Any, name: str) -> None:
        real = getattr(module, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] = calls.get(name, 0) + 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    for name in ("subscriber_weeks", "issue_outcomes", "rates_by_day"):
        counted(figures, name)
    for name in ("subscribers_chart", "deliveries_chart", "rate_chart"):
        counted(charts, name)
    staff = staff_client(make_app(engine, db_url), engine, now=NOW)
    assert staff.get("/staff/").status_code == 200
    assert calls == {"subscriber_weeks": 1, "issue_outcomes": 1}
    calls.clear()
    assert staff.get("/staff/charts").status_code == 200
    assert calls == {"subscriber_weeks": 1, "issue_outcomes": 1, "rates_by_day": 1}
    calls.clear()
    assert staff.get("/staff/charts/deliveries.svg").status_code == 200
    assert calls == {"issue_outcomes": 1, "deliveries_chart": 1}


def test_the_charts_page_has_each_chart_with_the_same_numbers_in_a_table(
    engine: sa.Engine, db_url: str, seeded: dict[str, int]
) -> None:
    staff = staff_client(make_app(engine, db_url), engine, now=NOW)
    response = staff.get("/staff/charts")
    assert response.status_code == 200
    assert "style=" not in response.text and "<script" not in response.text
    page = Tables()
    page.feed(response.text)
    assert [img["src"] for img in page.images] == [f"/staff/charts/{n}.svg" for n in CHARTS]
    alts = [img["alt"] or "" for img in page.images]
    assert alts[0].startswith("Chart: Active subscribers, last 12 weeks.")
    assert "2 active subscribers now" in alts[0]
    assert alts[2].startswith("Chart: Complaint rate over 30 days, against the 0.1 % limit.")
    assert alts[3].startswith("Chart: Hard-bounce rate over 30 days, against the 2 % limit.")
    assert len(page.tables) == 4

    by_name = dict(zip(CHARTS, page.tables, strict=True))
    for name, table in by_name.items():
        svg = staff.get(f"/staff/charts/{name}.svg").content
        body = table[1:]
        columns = list(zip(*body, strict=True))
        if name in ("complaints", "bounces"):
            # The chart draws the rate of the days with mail; the table writes "—" for others.
            drawn = values_of(svg)
            rates = [cell for cell in columns[3] if cell != "—"]
            assert drawn[: len(rates)] == rates
        else:
            first = 1 if name == "subscribers" else 2  # the columns that name the row
            assert values_of(svg) == [cell for column in columns[first:] for cell in column]

    weeks = by_name["subscribers"]
    assert weeks[0] == ["Week ending", "Active", "Sign-ups", "Unsubscribes"]
    assert [int(row[1]) for row in weeks[1:]] == ACTIVE
    issues_table = by_name["deliveries"]
    assert issues_table[1][0] == f"#{seeded['first']} daily"
    assert issues_table[2][2:] == ["1", "1", "0", "0", "1", "2"]
    assert by_name["complaints"][-1][1:] == ["1", "1", "100.00 %"]
    assert by_name["bounces"][-1][1:] == ["1", "1", "100.00 %"]


def test_the_charts_page_of_a_new_installation_says_there_is_nothing_yet(
    engine: sa.Engine, db_url: str
) -> None:
    staff = staff_client(make_app(engine, db_url), engine, now=NOW)
    response = staff.get("/staff/charts")
    assert response.status_code == 200
    page = Tables()
    page.feed(response.text)
    assert page.tables == []
    assert response.text.count("Nothing to count yet.") == 4
    alts = [img["alt"] or "" for img in page.images]
    assert alts == [
        "Chart: Active subscribers, last 12 weeks. No confirmed subscribers yet.",
        "Chart: Deliveries by outcome, last 12 issues. No issue has gone out yet.",
        "Chart: Complaint rate over 30 days, against the 0.1 % limit. No mail sent in the"
        " last 30 days: no complaint rate to show.",
        "Chart: Hard-bounce rate over 30 days, against the 2 % limit. No mail sent in the"
        " last 30 days: no hard-bounce rate to show.",
    ]


@pytest.mark.browser
def test_the_charts_show_in_chromium_on_a_phone_and_a_desktop(
    tmp_path: Path, sqlite_template: Path, browser: Any, shots: Path
) -> None:
    """The page's CSP lets the pictures in (img-src 'self'), each is drawn as an image, and
    nothing scrolls sideways."""
    database = tmp_path / "mailer.db"
    shutil.copy(sqlite_template, database)
    url = f"sqlite:///{database}"
    engine = create_engine(url)
    seed(engine)
    account = add_account(engine, "editor@news.example.org", "editor", now=NOW)
    with engine.begin() as conn:
        session_id = sessions.open_session(
            conn, account, now=NOW, rules=sessions.Rules(), ip="127.0.0.1"
        )
    try:
        with serve(lambda base: make_settings(url, **at(base)), engine, clock=Clock(NOW)) as (
            _server,
            _engine,
            settings,
        ):
            base = settings.site.base_url
            cookie = sessions.cookie_value(settings.site.require_secret(), session_id)
            for label, viewport in (("phone", PHONE), ("desktop", DESKTOP)):
                page = page_at(browser, viewport)
                problems: list[str] = []
                page.on(
                    "console",
                    lambda m, seen=problems: (
                        seen.append(f"{m.text} ({m.location.get('url')})")
                        if m.type == "error"
                        else None
                    ),
                )
                failed: list[str] = []
                page.on(
                    "response",
                    lambda r, seen=failed: seen.append(r.url) if r.status >= 400 else None,
                )
                page.context.add_cookies(
                    [{"name": sessions.COOKIE_NAME, "value": cookie, "url": base}]
                )
                page.goto(base + "/staff/charts")
                page.wait_for_load_state("load")
                # Each picture decodes as an image (a broken or refused one rejects); the
                # lower ones are lazy, so they are asked for now.
                decoded = page.evaluate(
                    """Promise.all([...document.querySelectorAll('img.chart-image')].map(
                        i => { i.loading = 'eager'; return i.decode().then(() => i.width); }))"""
                )
                assert len(decoded) == 4 and all(width > 300 for width in decoded), decoded
                wide = page.evaluate(
                    "document.documentElement.scrollWidth - document.documentElement.clientWidth"
                )
                assert wide <= 0
                page.click("#chart-deliveries summary")
                assert page.is_visible("#chart-deliveries table")
                page.screenshot(path=shots / f"console-charts-{label}.png", full_page=True)
                page.context.close()
                assert failed == []
                # The browser asks for a favicon of its own accord; the site has none.
                assert [p for p in problems if "/favicon.ico" not in p] == []  # no CSP report
    finally:
        engine.dispose()
