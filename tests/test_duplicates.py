"""Duplicate content is one article: the same story from two sources (or guids) is stored once."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from mailer.content.article import ParsedArticle, canonical_link
from mailer.content.files import load_article_file
from mailer.content.sources import fetch_sources_sync
from mailer.content.store import UpsertReport, _upsert_chunk, upsert_articles
from mailer.db.engine import create_engine
from mailer.db.schema import UtcDateTime, articles
from tests.factories import NOW, SECRET, TOPICS, make_settings, write_config

ROOT = Path(__file__).resolve().parent.parent
STORY = """+++
title = "Sneads Ferry Gate closed overnight"
topic = "base-alerts"
published = 2026-11-19T14:00:00Z
+++
## Summary

The Sneads Ferry Gate closes from 10 p.m. to 5 a.m. through Sunday for lane work.

The Main Gate stays open around the clock.
"""


def item(n: int, **overrides: Any) -> ParsedArticle:
    values: dict[str, Any] = {
        "guid": f"urn:test:dup:{n}",
        "topic": "base-alerts",
        "title": f"Story {n}",
        "summary": f"Summary {n}.",
        "why_it_matters": "",
        "body": f"Body {n}.",
        "link": None,
        "published_at": NOW,
    }
    values.update(overrides)
    return ParsedArticle(**values)


def rows(engine: sa.Engine) -> list[tuple[int, str]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(articles.c.id, articles.c.guid))]  # type: ignore[misc]


def test_a_file_added_by_hand_and_found_by_a_directory_source_is_stored_once(
    engine: sa.Engine, db_url: str, tmp_path: Path
) -> None:
    by_hand = tmp_path / "gate-closure.md"
    by_hand.write_text(STORY, encoding="utf-8")
    folder = tmp_path / "articles"
    folder.mkdir()
    (folder / "2026-11-19-sneads-ferry-gate.md").write_text(STORY, encoding="utf-8")
    parsed = load_article_file(by_hand, default_topic=None, known_topics=TOPICS, now=NOW)
    assert upsert_articles(engine, [parsed], now=NOW).added == 1
    ((article_id, guid),) = rows(engine)

    settings = make_settings(
        db_url, sources=[{"type": "directory", "path": str(folder), "topic": "base-alerts"}]
    )
    (result,) = fetch_sources_sync(engine, settings, now=NOW)
    assert (result.added, result.updated, result.unchanged) == (0, 0, 0)
    assert [(d.title, d.of) for d in result.duplicates] == [
        ("Sneads Ferry Gate closed overnight", article_id)
    ]
    assert result.duplicates[0].guid != guid
    assert rows(engine) == [(article_id, guid)]
    # Fetched again: still one row, still named as a duplicate (no error: the source is fine).
    (again,) = fetch_sources_sync(engine, settings, now=NOW)
    assert (len(again.duplicates), again.ok) == (1, True)
    assert len(rows(engine)) == 1


def test_the_cli_reports_the_duplicate_and_the_article_it_duplicates(
    db_url: str, tmp_path: Path
) -> None:
    folder = tmp_path / "articles"
    folder.mkdir()
    (folder / "copy.md").write_text(STORY, encoding="utf-8")
    (tmp_path / "original.md").write_text(STORY, encoding="utf-8")
    config = write_config(
        tmp_path / "mailer.toml",
        db_url,
        sources=[{"type": "directory", "path": str(folder), "topic": "base-alerts"}],
    )

    def mailer(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mailer", "--config", str(config), *args],
            cwd=ROOT,
            env=dict(os.environ, MAILER_SECRET_KEY=SECRET),
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert mailer("init").returncode == 0
    added = mailer("articles", "add", str(tmp_path / "original.md"))
    assert (added.returncode, added.stdout.strip()) == (0, "1 added, 0 updated, 0 unchanged")
    fetched = mailer("articles", "fetch")
    assert fetched.returncode == 0, fetched.stderr
    assert f"{folder}: 0 added, 0 updated, 0 unchanged, 1 skipped as duplicates" in fetched.stdout
    assert "(Sneads Ferry Gate closed overnight): a duplicate of article 1" in fetched.stdout
    again = mailer("articles", "add", str(folder / "copy.md"))
    assert again.returncode == 0
    assert "0 added, 0 updated, 0 unchanged, 1 skipped as duplicates" in again.stdout
    assert "a duplicate of article 1" in again.stdout
    listed = mailer("articles", "list")
    cells = [line.split("│")[1].strip() for line in listed.stdout.splitlines() if "│" in line]
    assert [c for c in cells if c] == ["1"]


def test_the_same_link_and_title_is_one_story_and_a_shared_page_is_not(
    engine: sa.Engine,
) -> None:
    page = "https://news.example.org/2026/11/19/gate/"
    report = upsert_articles(
        engine,
        [
            item(1, title="Gate closed", link=page),
            # The same story from a feed: its own guid and wording, the link with tracking.
            item(
                2,
                title="Gate  Closed",
                link="http://NEWS.example.org/2026/11/19/gate?utm_source=rss#top",
            ),
            # Alerts that all link to one page are different stories.
            item(3, title="Wind advisory", link="https://news.example.org/alerts"),
            item(4, title="Flood advisory", link="https://news.example.org/alerts"),
            # A title alone is too little to call two items the same.
            item(5, title="Road closed", summary="", body=""),
            item(6, title="Road closed", summary="", body=""),
        ],
        now=NOW,
    )
    assert (report.added, report.unchanged) == (5, 0)
    assert [(d.guid, d.of) for d in report.duplicates] == [("urn:test:dup:2", 1)]


def test_canonical_links_drop_what_does_not_change_the_page() -> None:
    same = {
        canonical_link(link)
        for link in (
            "https://news.example.org/a/b",
            "http://NEWS.example.org/a/b/",
            "https://www.news.example.org:443/a/b?utm_campaign=x#comments",
        )
    }
    assert same == {"https://news.example.org/a/b"}
    assert canonical_link("https://news.example.org/a?id=2&page=1") == (
        "https://news.example.org/a?id=2&page=1"
    )
    assert canonical_link("https://news.example.org/a?page=1&id=2") != canonical_link(
        "https://news.example.org/a?id=3&page=1"
    )
    # The order of the parameters does not change the page either.
    assert canonical_link("https://news.example.org/a?page=1&id=2&utm_source=rss") == (
        "https://news.example.org/a?id=2&page=1"
    )


def test_an_edit_that_copies_another_article_is_refused_and_reported(engine: sa.Engine) -> None:
    upsert_articles(engine, [item(1), item(2)], now=NOW)
    copy = replace(item(2), title="Story 1", summary="Summary 1.", body="Body 1.")
    report = upsert_articles(engine, [copy], now=NOW)
    assert (report.updated, report.unchanged, [d.of for d in report.duplicates]) == (0, 0, [1])
    with engine.connect() as conn:
        title = conn.scalar(sa.select(articles.c.title).where(articles.c.guid == copy.guid))
    assert title == "Story 2"


def test_an_edit_that_copies_an_article_of_the_same_batch_is_reported_not_a_crash(
    engine: sa.Engine,
) -> None:
    upsert_articles(engine, [item(1), item(2)], now=NOW)
    # A new article, and a stored one edited into its copy, in one batch.
    copy = replace(item(1), title="Story 3", summary="Summary 3.", body="Body 3.")
    report = upsert_articles(engine, [item(3), copy], now=NOW)
    assert (report.added, report.updated, report.unchanged) == (1, 0, 0)
    ids = {guid: id_ for id_, guid in rows(engine)}
    assert [(d.guid, d.of) for d in report.duplicates] == [(copy.guid, ids[item(3).guid])]
    # Two stored articles edited into the same new content: the first edit holds it.
    one = replace(item(1), title="Story 4", summary="Summary 4.", body="Body 4.")
    two = replace(item(2), title="Story 4", summary="Summary 4.", body="Body 4.")
    report = upsert_articles(engine, [one, two], now=NOW)
    assert (report.updated, [(d.guid, d.of) for d in report.duplicates]) == (
        1,
        [(two.guid, ids[one.guid])],
    )
    with engine.connect() as conn:
        titles = {
            guid: title
            for guid, title in conn.execute(sa.select(articles.c.guid, articles.c.title))
        }
    assert titles == {one.guid: "Story 4", two.guid: "Story 2", item(3).guid: "Story 3"}


def test_the_database_refuses_a_second_copy_whatever_the_code_checked(engine: sa.Engine) -> None:
    upsert_articles(engine, [item(1)], now=NOW)
    twin = item(1, guid="urn:test:dup:twin")
    row = {
        "guid": twin.guid,
        "topic": twin.topic,
        "title": twin.title,
        "published_at": NOW,
        "content_hash": twin.content_hash,
        "text_key": twin.text_key,
        "created_at": NOW,
        "updated_at": NOW,
    }
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(articles.insert().values(row))


@pytest.mark.postgres
def test_two_ingests_racing_on_postgresql_store_one_copy(postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("TRUNCATE articles RESTART IDENTITY CASCADE")
        first, second = item(1), item(1, guid="urn:test:dup:other")
        reports: list[UpsertReport] = []
        with engine.connect() as holder:
            # The first ingest has inserted and not committed: the second one's check sees
            # nothing, so only the unique index can stop its insert.
            holder.begin()
            _upsert_chunk(holder, [first], UpsertReport(), NOW)
            racer = threading.Thread(
                target=lambda: reports.append(upsert_articles(engine, [second], now=NOW))
            )
            racer.start()
            deadline = time.monotonic() + 20
            with engine.connect() as probe:
                while time.monotonic() < deadline:
                    waiting = probe.execute(
                        sa.text(
                            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        )
                    ).scalar_one()
                    probe.rollback()
                    if waiting:
                        break
                    time.sleep(0.02)
            assert racer.is_alive(), "the second ingest did not wait for the first"
            holder.commit()
            racer.join(timeout=30)
        ((article_id, guid),) = rows(engine)
        assert guid == first.guid
        assert [(d.guid, d.of) for d in reports[0].duplicates] == [(second.guid, article_id)]
        assert (reports[0].added, reports[0].unchanged) == (0, 0)
    finally:
        engine.dispose()


def test_migration_0007_keys_stored_articles_first_come_first_and_keeps_issues(
    empty_url: str,
) -> None:
    from alembic import command

    from mailer.db.engine import _alembic_config

    engine = create_engine(empty_url)
    try:
        config = _alembic_config(engine)
        command.upgrade(config, "0006")
        old = sa.table(
            "articles",
            *(sa.column(c) for c in ("guid", "topic", "title", "summary", "why_it_matters")),
            *(sa.column(c) for c in ("body", "link", "content_hash")),
            sa.column("published_at", UtcDateTime),
            sa.column("created_at", UtcDateTime),
            sa.column("updated_at", UtcDateTime),
        )
        story = {
            "topic": "base-alerts",
            "title": "Gate closed",
            "summary": "Closed tonight.",
            "why_it_matters": "",
            "body": "Use the Main Gate.",
            "link": None,
            "content_hash": "x",
            "published_at": NOW,
            "created_at": NOW,
            "updated_at": NOW,
        }
        with engine.begin() as conn:
            conn.execute(old.insert(), [story | {"guid": "a"}, story | {"guid": "b"}])
            conn.execute(
                sa.text(
                    "INSERT INTO issues (digest, scheduled_for, window_end, subject, topics,"
                    " status, created_at) VALUES ('weekly', :t, :t, 's', 't', 'sent', :t)"
                ),
                {"t": NOW.replace(tzinfo=None)},
            )
            conn.execute(sa.text("INSERT INTO issue_articles VALUES (1, 1, 0), (1, 2, 1)"))
        command.upgrade(config, "head")
        with engine.connect() as conn:
            # 0008 rebuilds `issues` on SQLite: the rows that reference it stay.
            kept = conn.execute(sa.text("SELECT count(*) FROM issue_articles")).scalar_one()
            assert kept == 2
            keys = conn.execute(
                sa.select(articles.c.guid, articles.c.text_key).order_by(articles.c.id)
            ).all()
        assert keys == [
            ("a", item(0, **{k: story[k] for k in ("title", "summary", "body")}).text_key),
            ("b", None),
        ]
        command.downgrade(config, "0006")
        with engine.connect() as conn:
            links = conn.execute(sa.text("SELECT count(*) FROM issue_articles")).scalar_one()
            columns = {c["name"] for c in sa.inspect(conn).get_columns("articles")}
        assert links == 2
        assert "text_key" not in columns
        command.upgrade(config, "head")
    finally:
        engine.dispose()
