"""What every console page shares: a database outage in the middle of a request is the app's
503 page (not a "no such record" 404 or a refused action), ids are read one way, a library's
message is worded one way, and a page number past the end shows the last page (TestClient,
SQLite and PostgreSQL)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from html import unescape
from typing import Any

import pytest
import sqlalchemy as sa

from mailer.console.inputs import MAX_ID_DIGITS, parse_id
from mailer.console.outcomes import no_slot
from mailer.console.wording import sentence
from mailer.content.store import upsert_articles
from mailer.subscribers import store
from mailer.web import SmtpConfirmationSender, create_app
from tests.console import staff_client
from tests.factories import BASE_CONFIG, NOW, Clock, make_article, make_settings, make_subscriber
from tests.smtp_server import FaultServer, smtp_server  # noqa: F401
from tests.test_console_issues import LOOKING, Setup, console_settings, in_review
from tests.test_console_records import Console, make_console, text_of


@pytest.fixture
def console(engine: sa.Engine, db_url: str) -> Iterator[Console]:
    yield make_console(engine, db_url)


@pytest.fixture
def issues_setup(engine: sa.Engine, db_url: str, smtp_server: FaultServer) -> Setup:  # noqa: F811
    return Setup(engine, console_settings(db_url, smtp_server), Clock(LOOKING))


@contextmanager
def connection_lost_at(engine: sa.Engine, marker: str) -> Iterator[list[str]]:
    """The database connection drops just before the first statement containing ``marker``
    (after the guard's own reads): the driver's real error for a closed connection, which the
    engine turns into ``DatabaseUnavailable``. Yields the statements it cut (one at most)."""
    cut: list[str] = []

    def drop(conn: sa.Connection, cursor: Any, statement: str, *args: Any, **kwargs: Any) -> None:
        if not cut and marker in statement:
            cut.append(statement)
            dbapi = conn.connection.dbapi_connection
            assert dbapi is not None
            dbapi.close()

    sa.event.listen(engine, "before_cursor_execute", drop)
    try:
        yield cut
    finally:
        sa.event.remove(engine, "before_cursor_execute", drop)


def assert_outage_page(response: Any, cut: list[str]) -> None:
    assert cut, "the statement was never run"
    assert response.status_code == 503, response.text[:300]
    assert response.headers["retry-after"] == "30"
    assert "Temporarily unavailable" in response.text


# --- a database outage mid-request ------------------------------------------------------------


def test_an_outage_reading_a_subscriber_is_503_not_no_such_subscriber(console: Console) -> None:
    sub = make_subscriber(console.engine)
    admin = console.client()
    with connection_lost_at(console.engine, "FROM subscribers") as cut:
        page = admin.get(f"/staff/subscribers/{sub.id}")
    assert_outage_page(page, cut)
    assert "No such subscriber" not in page.text
    assert admin.get(f"/staff/subscribers/{sub.id}").status_code == 200  # back again


def test_an_outage_unsubscribing_is_503_and_changes_nothing(console: Console) -> None:
    sub = make_subscriber(console.engine)
    admin = console.client()
    with connection_lost_at(console.engine, "UPDATE subscribers") as cut:
        answer = admin.post(f"/staff/subscribers/{sub.id}/unsubscribe")
    assert_outage_page(answer, cut)
    assert store.get(console.engine, sub.email).status == "active"


def test_an_outage_erasing_is_503_and_changes_nothing(console: Console) -> None:
    sub = make_subscriber(console.engine)
    admin = console.client()
    with connection_lost_at(console.engine, "DELETE FROM") as cut:
        answer = admin.post(f"/staff/subscribers/{sub.id}/erase")
    assert_outage_page(answer, cut)
    assert store.get(console.engine, sub.email).status == "active"


def test_an_outage_retracting_is_503_not_a_refused_retraction(console: Console) -> None:
    upsert_articles(console.engine, [make_article(title="Gate 4 closed")], now=NOW)
    with console.engine.connect() as conn:
        article_id = conn.execute(sa.text("SELECT id FROM articles")).scalar_one()
    editor = console.client("editor")
    with connection_lost_at(console.engine, "UPDATE articles") as cut:
        answer = editor.post(f"/staff/articles/{article_id}/retract", {"correction": ""})
    assert_outage_page(answer, cut)
    with console.engine.connect() as conn:
        removed = conn.execute(sa.text("SELECT removed_at FROM articles")).scalar_one()
    assert removed is None


def test_an_outage_deciding_an_issue_is_503_not_a_refused_action(issues_setup: Setup) -> None:
    s = issues_setup
    issue_id = in_review(s)
    with connection_lost_at(s.engine, "UPDATE issues") as cut:
        answer = s.staff.post(f"/staff/issues/{issue_id}/approve")
    assert_outage_page(answer, cut)
    assert "409" not in str(answer.status_code)
    with s.engine.connect() as conn:
        status = conn.execute(
            sa.text("SELECT status FROM issues WHERE id = :id"), {"id": issue_id}
        ).scalar_one()
    assert status == "review"


def test_an_outage_drawing_a_variant_is_503_not_no_such_variant(issues_setup: Setup) -> None:
    s = issues_setup
    issue_id = in_review(s)
    with connection_lost_at(s.engine, "FROM issues") as cut:
        frame = s.staff.get(f"/staff/issues/{issue_id}/variants/1")
    assert_outage_page(frame, cut)
    assert s.staff.get(f"/staff/issues/{issue_id}/variants/1").status_code == 200


# --- ids, numbers and messages ----------------------------------------------------------------


def test_one_id_parser_bounds_every_id() -> None:
    assert parse_id("42") == 42
    assert parse_id("9" * MAX_ID_DIGITS) == int("9" * MAX_ID_DIGITS)
    for junk in ("", "x", "-1", "4.2", " 4", "٣", "9" * (MAX_ID_DIGITS + 1), None, 4):
        assert parse_id(junk) is None, junk


def test_a_librarys_message_becomes_a_sentence_keeping_its_case() -> None:
    assert sentence("no subscriber Ana@Example.org") == "No subscriber Ana@Example.org."
    assert sentence(ValueError("issue 4 is sent; it cannot be held.")) == (
        "Issue 4 is sent; it cannot be held."
    )
    assert sentence("  Is it?  ") == "Is it?"
    assert sentence("") == ""


def test_ids_and_numbers_that_are_not_ones_are_named_for_what_they_are(
    issues_setup: Setup,
) -> None:
    s = issues_setup
    issue_id = in_review(s)
    too_long = "9" * (MAX_ID_DIGITS + 1)
    longest = "9" * MAX_ID_DIGITS  # an id, of no issue
    for path in ("/staff/issues/x", f"/staff/issues/{too_long}", f"/staff/issues/{longest}"):
        page = s.staff.get(path)
        assert page.status_code == 404 and "There is no such issue" in page.text
    assert s.staff.post(f"/staff/issues/{longest}/approve").status_code == 404
    for number in ("x", too_long):
        frame = s.staff.get(f"/staff/issues/{issue_id}/variants/{number}")
        assert frame.status_code == 404 and "There is no such variant" in frame.text
        assert "no such issue" not in frame.text.lower()
    # A page number that is not one is the first page, not "no such issue".
    listing = s.staff.get("/staff/issues?page=abc")
    assert listing.status_code == 200 and "Page 1" in text_of(listing.text)


# --- pages past the end -----------------------------------------------------------------------


def test_a_page_past_the_end_shows_the_last_page_of_subscribers(console: Console) -> None:
    for i in range(27):
        make_subscriber(console.engine, email=f"reader{i:02d}@example.org")
    page = console.client().get("/staff/subscribers?page=99")
    assert page.status_code == 200
    text = text_of(page.text)
    assert "27 subscribers; page 2 of 2." in text
    assert text.count("@example.org") == 2  # the last two rows, not an empty table
    assert "page=1" in page.text and "page=3" not in page.text


def test_a_page_past_the_end_shows_the_last_page_of_articles(console: Console) -> None:
    upsert_articles(
        console.engine, [make_article(title=f"Notice {i:02d}") for i in range(26)], now=NOW
    )
    page = console.client("editor").get("/staff/articles?page=99")
    assert page.status_code == 200
    text = text_of(page.text)
    assert "26 articles, newest first; page 2 of 2." in text
    assert text.count("Notice ") == 1


def test_a_page_past_the_end_shows_the_last_page_of_issues(issues_setup: Setup) -> None:
    s = issues_setup
    issue_id = in_review(s)
    page = s.staff.get("/staff/issues?page=99")
    assert page.status_code == 200
    text = text_of(page.text)
    assert "Page 1" in text and f"/staff/issues/{issue_id}" in page.text


# --- static files -----------------------------------------------------------------------------


def test_the_script_and_the_stylesheet_are_served_alike(console: Console) -> None:
    anyone = console.client().client
    for path, kind in (
        ("/staff/static/console.js", "text/javascript"),
        ("/staff/static/console.css", "text/css"),
    ):
        answer = anyone.get(path)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith(kind)
        assert answer.headers["cache-control"] == "public, max-age=3600"


def test_the_pager_keeps_the_listings_own_parameters(console: Console) -> None:
    upsert_articles(
        console.engine,
        [make_article(title=f"Notice {i:02d}", topic="base-alerts") for i in range(26)],
        now=NOW,
    )
    page = console.client("editor").get("/staff/articles?topic=base-alerts")
    assert 'href="/staff/articles?topic=base-alerts&amp;page=2">Older</a>' in page.text
    assert "Newer" not in page.text


# --- the dashboard ----------------------------------------------------------------------------

ON_ARRIVAL = {
    "key": "alerts",
    "name": "Base alerts",
    "subject": "Base alert",
    "trigger": "arrival",
    "topics": ["base-alerts"],
    "debounce_seconds": 30,
}


def test_an_arrival_digest_says_when_it_is_sent_and_an_ended_schedule_says_so(
    engine: sa.Engine, db_url: str
) -> None:
    settings = make_settings(db_url, digests=[*BASE_CONFIG["digests"], ON_ARRIVAL])
    app = create_app(settings, engine, SmtpConfirmationSender(settings), clock=lambda: NOW)
    text = text_of(staff_client(app, engine, now=NOW).get("/staff/").text)
    assert "Base alerts (alerts) Sent when its articles arrive (within 30 s of the first)." in text
    assert "No coming slot" not in text
    # A scheduled digest without a coming slot is one whose schedule has ended.
    assert no_slot(settings.digests[0]) == "No coming slot: its schedule has ended."
    assert no_slot(replace(settings.digest("alerts"), debounce_seconds=0)) == (
        "Sent when its articles arrive (as soon as the first one is stored)."
    )


# --- the variant frames -----------------------------------------------------------------------


def test_a_variant_frame_named_by_its_topics_counts_no_readers(issues_setup: Setup) -> None:
    s = issues_setup
    issue_id = in_review(s)
    page = s.staff.get(f"/staff/issues/{issue_id}")
    sources = re.findall(r'<iframe sandbox src="([^"]+)"', page.text)
    assert sources and all("?topics=" in src for src in sources), sources
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any, **kwargs: Any) -> None:
        statements.append(statement)

    sa.event.listen(s.engine, "before_cursor_execute", seen)
    try:
        framed = s.staff.get(unescape(sources[0]))
    finally:
        sa.event.remove(s.engine, "before_cursor_execute", seen)
    assert framed.status_code == 200 and "Gate 4 closed" in framed.text
    assert not [q for q in statements if "subscriber_topics" in q]
    # The same digest as the frame found by its number alone (an address kept from before).
    assert framed.text == s.staff.get(f"/staff/issues/{issue_id}/variants/1").text
    wrong = s.staff.get(f"/staff/issues/{issue_id}/variants/1?topics=no-such-topic")
    assert wrong.status_code == 404 and "has no variant for the topics no-such-topic" in wrong.text
