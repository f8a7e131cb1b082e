"""Subscriber store on SQLite and PostgreSQL."""

from __future__ import annotations

import io

import pytest
import sqlalchemy as sa

from mailer.db.schema import events
from mailer.errors import AddressError, SubscriberError, SuppressedError
from mailer.subscribers import csvfile, personal, store
from tests.factories import NOW, TOPICS, make_subscriber


def test_add_normalizes_and_shows(engine: sa.Engine) -> None:
    sub = make_subscriber(engine, email="  Ann.Smith@Example.ORG ", topics=["base-alerts"])
    shown = store.get(engine, "ann.smith@example.org")
    assert shown.email == "ann.smith@example.org"
    assert shown.topics == ("base-alerts",)
    assert shown.status == "active" and shown.id == sub.id


def test_add_twice_is_an_error_naming_the_address(engine: sa.Engine) -> None:
    make_subscriber(engine, email="ann@example.org")
    with pytest.raises(SubscriberError, match=r"ann@example\.org is already subscribed"):
        make_subscriber(engine, email="ANN@example.org")


def test_add_rejects_invalid_address(engine: sa.Engine) -> None:
    with pytest.raises(AddressError, match="not-an-address"):
        make_subscriber(engine, email="not-an-address")


def test_erase_deletes_everything_and_suppresses(engine: sa.Engine) -> None:
    sub = make_subscriber(engine, email="gone@example.org")
    personal.erase(engine, "gone@example.org", now=NOW)
    with pytest.raises(SubscriberError):
        store.get(engine, "gone@example.org")
    with engine.connect() as conn:
        assert (
            conn.execute(sa.select(events).where(events.c.subscriber_id == sub.id)).first() is None
        )
        assert store.suppression_reason(conn, "gone@example.org") == "erased"
    with pytest.raises(SuppressedError, match="suppressed"):
        make_subscriber(engine, email="gone@example.org")


CSV = (
    "email,name,topics,status\n"
    "ann@example.org,Ann,base-alerts;local-events,active\n"
    "not-an-address,Bob,,active\n"
    "cy@example.org,Cy,astrology,active\n"
    "dee@example.org,Dee,,unsubscribed\n"
    "ANN@example.org,Ann again,,active\n"
    "eve@example.org,Eve,military-news\n"
    "fay@example.org,Fay,,sleeping\n"
)


def test_import_reports_bad_rows_by_number_and_keeps_good_ones(engine: sa.Engine) -> None:
    report = csvfile.import_csv(engine, io.StringIO(CSV), known_topics=TOPICS, now=NOW)
    assert report.added == 2
    assert [(e.row, e.email) for e in report.errors] == [
        (3, "not-an-address"),
        (4, "cy@example.org"),
        (6, "ANN@example.org"),
        (7, "eve@example.org"),
        (8, "fay@example.org"),
    ]
    assert "astrology" in report.errors[1].reason
    assert "duplicate of row 2" in report.errors[2].reason
    assert store.get(engine, "ann@example.org").topics == ("base-alerts", "local-events")
    assert store.get(engine, "dee@example.org").topics == TOPICS
    assert store.get(engine, "dee@example.org").status == "unsubscribed"


def test_reimporting_the_same_file_changes_nothing(engine: sa.Engine) -> None:
    csvfile.import_csv(engine, io.StringIO(CSV), known_topics=TOPICS, now=NOW)
    before = csvfile.export_text(engine)
    report = csvfile.import_csv(engine, io.StringIO(CSV), known_topics=TOPICS, now=NOW)
    assert report.added == 0 and report.unchanged == 2
    assert csvfile.export_text(engine) == before


def test_import_skips_suppressed_addresses(engine: sa.Engine) -> None:
    make_subscriber(engine, email="ann@example.org")
    personal.erase(engine, "ann@example.org", now=NOW)
    report = csvfile.import_csv(engine, io.StringIO(CSV), known_topics=TOPICS, now=NOW)
    assert report.suppressed == 1 and report.added == 1


def test_import_rejects_a_file_without_email_column(engine: sa.Engine) -> None:
    with pytest.raises(SubscriberError, match="'email' column"):
        csvfile.import_csv(engine, io.StringIO("name,topics\nAnn,\n"), known_topics=TOPICS, now=NOW)


def test_export_round_trips_through_import(engine: sa.Engine) -> None:
    csvfile.import_csv(engine, io.StringIO(CSV), known_topics=TOPICS, now=NOW)
    exported = csvfile.export_text(engine)
    assert exported.splitlines()[0] == "email,name,topics,status,digests"
    assert "ann@example.org,Ann,base-alerts;local-events,active," in exported
