"""``POST /hooks/articles``: the site pushes signed articles, on SQLite and PostgreSQL.

Driven in process by Starlette's TestClient like tests/test_web.py; the demo's curl line is
run as printed, with curl, against the app served by uvicorn on an ephemeral port.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import shlex
import shutil
import subprocess
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from rich.console import Console
from starlette.exceptions import StarletteDeprecationWarning

from mailer.compose.rendering import Renderer
from mailer.config.load import load_settings, parse_settings
from mailer.config.settings import Settings
from mailer.content.files import parse_article
from mailer.content.pushed import REQUIRED
from mailer.content.store import list_articles, show
from mailer.db.schema import articles, issue_articles
from mailer.devtools.demo import LOCAL_WEB, run_demo
from mailer.errors import ArticleError, ConfigError
from mailer.issues.create import create_issue
from mailer.web import SmtpConfirmationSender, create_app
from tests.factories import ALERTS, NOW, SECRET, TOPICS, config_dict
from tests.served import serve

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

HOOK_SECRET = "hook-secret-0123456789abcdef"
PATH = "/hooks/articles"


def hook_settings(db_url: str, hooks: dict[str, Any] | None = None, **env: str) -> Settings:
    data = config_dict(digests=[config_dict()["digests"][0], ALERTS])
    data["database"] = {"url": db_url}
    if hooks is not None:
        data["hooks"] = hooks
    environment = {"MAILER_SECRET_KEY": SECRET, "MAILER_HOOK_SECRET": HOOK_SECRET, **env}
    return parse_settings(data, env=environment)


def client_for(engine: sa.Engine, settings: Settings) -> TestClient:
    sender = SmtpConfirmationSender(settings, local_hostname="client.test")
    return TestClient(create_app(settings, engine, sender, clock=lambda: NOW))


@pytest.fixture
def settings(db_url: str) -> Settings:
    return hook_settings(db_url, {"secret_env": "MAILER_HOOK_SECRET"})


@pytest.fixture
def client(engine: sa.Engine, settings: Settings) -> TestClient:
    return client_for(engine, settings)


def article(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "guid": "https://news.example.org/alerts/gate-closed",
        "title": "Main Gate closed after a crash",
        "topic": "base-alerts",
        "summary": "The Main Gate on Holcomb Boulevard is closed in both directions.",
        "why_it_matters": "Use the Piney Green gate until further notice.",
        "body": "Military police closed the gate at 6:10 a.m.",
        "link": "https://news.example.org/alerts/gate-closed",
        "published": (NOW - timedelta(minutes=5)).isoformat(),
    }
    data.update(changes)
    return {k: v for k, v in data.items() if v is not ...}


def encode(data: Any) -> bytes:
    return json.dumps(data).encode()


def signature(body: bytes, secret: str = HOOK_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post(client: TestClient, body: bytes, sig: str | None = "sign") -> Any:
    headers = {"Content-Type": "application/json"}
    if sig == "sign":
        sig = signature(body)
    if sig is not None:
        headers["X-Mailer-Signature"] = sig
    return client.post(PATH, content=body, headers=headers)


def count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(sa.select(sa.func.count()).select_from(articles)) or 0)


def test_signed_post_adds_then_the_same_body_is_unchanged_and_new_content_updates(
    client: TestClient, engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailer.web.hooks")
    body = encode(article())
    first = post(client, body)
    assert first.status_code == 201, first.text
    assert first.headers["content-type"] == "application/json"
    assert first.headers["cache-control"] == "no-store"
    added = first.json()
    assert added["outcome"] == "added" and added["guid"] == article()["guid"]
    stored = show(engine, added["id"])
    assert stored.article.title == "Main Gate closed after a crash"
    assert stored.article.priority == "bulk"
    assert stored.article.published_at == NOW - timedelta(minutes=5)

    # A replay of the same body (a retry whose answer was lost) changes nothing.
    again = post(client, body)
    assert again.status_code == 200
    assert again.json() == {"id": added["id"], "guid": added["guid"], "outcome": "unchanged"}
    assert show(engine, added["id"]).updated_at == stored.updated_at

    changed = post(client, encode(article(title="Main Gate closed after a crash; one hurt")))
    assert changed.status_code == 200
    assert changed.json()["outcome"] == "updated" and changed.json()["id"] == added["id"]
    assert show(engine, added["id"]).article.title == "Main Gate closed after a crash; one hurt"
    assert count(engine) == 1
    lines = [r for r in caplog.records if r.name == "mailer.web.hooks"]
    assert [(r.levelname, r.outcome, r.article) for r in lines] == [  # type: ignore[attr-defined]
        ("INFO", "added", added["id"]),
        ("INFO", "unchanged", added["id"]),
        ("INFO", "updated", added["id"]),
    ]


@pytest.mark.parametrize(
    "sig",
    [
        None,
        "sha256=" + "0" * 64,
        signature(encode(article(title="Another body"))),
        signature(encode(article()), secret="not-the-hook-secret-0000"),
        "sha1=" + hmac.new(HOOK_SECRET.encode(), encode(article()), hashlib.sha1).hexdigest(),
        signature(encode(article())).removeprefix("sha256="),
        "sha256=",
        "sha256=\u00e9",
    ],
    ids=["unsigned", "zeros", "other-body", "other-secret", "sha1", "no-prefix", "empty", "latin"],
)
def test_a_missing_or_wrong_signature_is_401_stores_nothing_and_logs_the_ip(
    client: TestClient, engine: sa.Engine, caplog: pytest.LogCaptureFixture, sig: str | None
) -> None:
    caplog.set_level(logging.INFO, logger="mailer.web.hooks")
    body = encode(article())
    headers: dict[str, Any] = {"Content-Type": "application/json"}
    if sig is not None:
        headers["X-Mailer-Signature"] = sig.encode("latin-1")  # bytes: "é" goes as sent
    response = client.post(PATH, content=body, headers=headers)
    assert response.status_code == 401
    assert "X-Mailer-Signature" in response.json()["error"]
    assert count(engine) == 0
    [record] = [r for r in caplog.records if r.name == "mailer.web.hooks"]
    assert record.levelname == "WARNING" and record.ip == "testclient"  # type: ignore[attr-defined]
    assert "Main Gate" not in caplog.text


def test_refused_signatures_past_the_limit_are_429_and_not_logged(
    client: TestClient, engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailer.web.hooks")
    codes = [post(client, encode(article()), sig="sha256=00").status_code for _ in range(22)]
    assert codes == [401] * 20 + [429] * 2
    assert len([r for r in caplog.records if r.name == "mailer.web.hooks"]) == 20
    # A signed post from the same address still goes through.
    assert post(client, encode(article())).status_code == 201


def refused(client: TestClient, body: bytes) -> dict[str, Any]:
    response = post(client, body)
    assert response.status_code == 400, response.text
    answer: dict[str, Any] = response.json()
    return answer


def test_each_missing_field_is_400_naming_it(client: TestClient, engine: sa.Engine) -> None:
    for name in REQUIRED:
        answer = refused(client, encode(article(**{name: ...})))
        assert answer == {"error": f"{name} is missing", "field": name}
    assert count(engine) == 0


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        (b"{not json", None, "not JSON"),
        (b"\xff\xfe", None, "not UTF-8"),
        (b"[1, 2]", None, "one JSON object, got an array"),
        (b"[" * 100_000 + b"]" * 100_000, None, "not JSON"),
        (encode(article(topic="weather")), "topic", "unknown topic 'weather'"),
        (encode(article(title=" ")), "title", "title is blank"),
        (encode(article(summary=12)), "summary", "summary must be a string, got a number"),
        (encode(article(guid=None)), "guid", "guid must be a string, got null"),
        (encode(article(published="next Tuesday")), "published", "published must be a date"),
        (encode(article(expires="2026-13-01")), "expires", "expires must be a date"),
        (encode(article(expires="2026-11-01")), "expires", "is not after published"),
        (encode(article(link="ftp://news.example.org/x")), "link", "http(s) URL"),
        (encode(article(link="javascript:alert(1)")), "link", "http(s) URL"),
        (encode(article(priority="urgent")), "priority", "priority must be one of bulk, alert"),
        (encode(article(title="x" * 501)), "title", "the limit is 500"),
        (encode(article(colour="red", author="x")), "author", "unknown fields 'author', 'colour'"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_a_malformed_body_is_400_naming_the_field_and_stores_nothing(
    client: TestClient, engine: sa.Engine, body: bytes, field: str | None, words: str
) -> None:
    answer = refused(client, body)
    assert answer["field"] == field
    assert words in answer["error"]
    assert "\n" not in answer["error"]
    assert count(engine) == 0


def test_an_oversized_body_is_413_before_it_is_read(client: TestClient, engine: sa.Engine) -> None:
    body = encode(article(body="x" * 300_000))
    response = post(client, body)
    assert response.status_code == 413
    assert "262,144 bytes" in response.json()["error"]

    def chunks() -> Any:  # no Content-Length: counted while read
        yield body[:200_000]
        yield body[200_000:]

    response = client.post(PATH, content=chunks(), headers={"X-Mailer-Signature": signature(body)})
    assert response.status_code == 413
    assert count(engine) == 0
    # The cap is the hook's, not the forms' 16 KB: a long article goes through.
    long = encode(article(body="x" * 100_000))
    assert post(client, long).status_code == 201


def test_methods_other_than_post_are_405(client: TestClient) -> None:
    for method in ("GET", "PUT", "DELETE"):
        response = client.request(method, PATH)
        assert response.status_code == 405, method


def test_without_hooks_or_their_secret_the_route_is_503_and_start_up_warns(
    engine: sa.Engine, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mailer.web.app")
    absent = client_for(engine, hook_settings(db_url))
    assert not caplog.records  # no [hooks] table: the site does not push, nothing to say
    response = post(absent, encode(article()))
    assert response.status_code == 503
    assert response.json() == {"error": "hooks are not configured"}
    unset = hook_settings(db_url, {"secret_env": "SITE_PUSH_SECRET"})
    client = client_for(engine, unset)
    [warning] = caplog.records
    assert "export SITE_PUSH_SECRET" in warning.getMessage()
    assert post(client, encode(article())).status_code == 503
    assert count(engine) == 0


def test_the_hook_secret_is_checked_like_the_site_secret(db_url: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[hooks\]\.secret_env.*at least 16 characters"):
        hook_settings(db_url, {}, MAILER_HOOK_SECRET="short")
    with pytest.raises(ConfigError, match=r"\[hooks\]\.secret_env"):
        hook_settings(db_url, {"secret_env": "lower-case"})
    with pytest.raises(ConfigError, match=r"\[hooks\]\.secret_file.*cannot be read"):
        hook_settings(db_url, {"secret_file": str(tmp_path / "missing.key")}, MAILER_HOOK_SECRET="")
    with pytest.raises(ConfigError, match=r"\[hooks\]\.secrets.*not a known key"):
        hook_settings(db_url, {"secrets": "x"})
    (tmp_path / "hook.key").write_text("from-a-file-0123456789\n")
    from_file = hook_settings(
        db_url, {"secret_file": str(tmp_path / "hook.key")}, MAILER_HOOK_SECRET=""
    )
    assert from_file.hooks.secret == b"from-a-file-0123456789"
    assert "from-a-file" not in repr(from_file)


def test_an_alert_is_stored_as_one_and_leads_the_next_issue(
    client: TestClient, engine: sa.Engine, settings: Settings
) -> None:
    newer = article(
        guid="https://news.example.org/news/parade",
        title="Parade route announced",
        link="https://news.example.org/news/parade",
        summary="The homecoming parade follows Lejeune Boulevard.",
        published=(NOW - timedelta(minutes=1)).isoformat(),
    )
    assert post(client, encode(newer)).status_code == 201
    alert = post(client, encode(article(priority="alert"))).json()
    assert show(engine, alert["id"]).article.priority == "alert"
    made = create_issue(
        engine,
        settings,
        settings.digest("alerts"),
        scheduled_for=NOW,
        now=NOW,
        render_subject=Renderer().render_subject,
    )
    with engine.connect() as conn:
        order = conn.scalars(
            sa.select(issue_articles.c.article_id)
            .where(issue_articles.c.issue_id == made.issue_id)
            .order_by(issue_articles.c.position)
        ).all()
    # Published four minutes before the parade, and still first: it is the alert.
    assert order[0] == alert["id"] and len(order) == 2
    # Marking it bulk again is a change: an update, not an unchanged replay.
    back = post(client, encode(article(priority="bulk"))).json()
    assert back["outcome"] == "updated"
    assert [a.priority for a in list_articles(engine)] == ["bulk", "bulk"]


def test_front_matter_sets_the_priority_and_refuses_an_unknown_one() -> None:
    text = "---\ntitle: Gate closed\ntopic: base-alerts\npriority: alert\n---\nBody.\n"
    parsed = parse_article(text, known_topics=TOPICS, now=NOW)
    assert parsed.priority == "alert"
    plain = parse_article(text.replace("priority: alert\n", ""), known_topics=TOPICS, now=NOW)
    assert plain.priority == "bulk"
    # Bulk articles hash as before priorities existed: stored ones are not all "changed".
    assert plain.content_hash != parsed.content_hash
    with pytest.raises(ArticleError, match=r":4: priority must be one of bulk, alert"):
        parse_article(
            text.replace("priority: alert", "priority: high"), known_topics=TOPICS, now=NOW
        )


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_demos_curl_line_pushes_its_article_to_the_served_app(tmp_path: Path) -> None:
    console = Console(file=io.StringIO(), width=200)
    figures = run_demo(tmp_path, console=console)
    output = console.file.getvalue()  # type: ignore[attr-defined]
    lines = output.splitlines()
    [index] = [i for i, line in enumerate(lines) if line.strip().startswith("push (with --serve)")]
    assert lines[index - 1].strip().startswith("try ")  # right after the "try" line
    command = lines[index].split("push (with --serve)", 1)[1].strip()
    assert command == figures["hook_curl"]  # one line, however narrow the console
    settings = load_settings(tmp_path / "mailer.toml", env={})
    before = count_in(settings)
    with serve(lambda base_url: settings) as (server, engine, _):
        # The line as printed, with the demo's address swapped for the test server's.
        served = command.replace(LOCAL_WEB, server.url)
        assert served != command
        done = subprocess.run(
            ["sh", "-c", served], capture_output=True, text=True, timeout=30, check=False
        )
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert answer["outcome"] == "added"
        assert show(engine, answer["id"]).article.priority == "alert"
        again = subprocess.run(["sh", "-c", served], capture_output=True, text=True, timeout=30)
        assert json.loads(again.stdout)["outcome"] == "unchanged"
    assert count_in(settings) == before + 1
    assert shlex.split(command)[0] == "curl"


def count_in(settings: Settings) -> int:
    from mailer.db.engine import create_engine

    engine = create_engine(settings.database.url)
    try:
        return count(engine)
    finally:
        engine.dispose()


def test_migration_0011_keeps_stored_articles_bulk_and_unchanged(empty_url: str) -> None:
    from alembic import command

    from mailer.content.article import ParsedArticle
    from mailer.content.store import upsert_articles
    from mailer.db.engine import SCHEMA_HEAD, _alembic_config, create_engine, migrate

    engine = create_engine(empty_url)
    try:
        config = _alembic_config(engine)
        command.upgrade(config, "0010")
        item = ParsedArticle(
            guid="g-1",
            topic="base-alerts",
            title="Gate closed",
            summary="Use the other gate.",
            why_it_matters="",
            body="",
            link=None,
            published_at=NOW,
        )
        row = {
            "guid": item.guid,
            "topic": item.topic,
            "title": item.title,
            "summary": item.summary,
            "hash": item.content_hash,
            "t": NOW,
        }
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO articles (guid, topic, title, summary, why_it_matters, body,"
                    " published_at, content_hash, created_at, updated_at)"
                    " VALUES (:guid, :topic, :title, :summary, '', '', :t, :hash, :t, :t)"
                ),
                row,
            )
        assert migrate(engine) == SCHEMA_HEAD
        [stored] = list_articles(engine)
        assert stored.priority == "bulk"
        # The hash of a bulk article did not change: the next ingest of it changes nothing.
        assert upsert_articles(engine, [item], now=NOW).unchanged == 1
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(articles.update().values(priority="urgent"))
        command.downgrade(config, "0010")
        with engine.connect() as conn:
            columns = {c["name"] for c in sa.inspect(conn).get_columns("articles")}
        assert "priority" not in columns
    finally:
        engine.dispose()


def test_a_feed_fetch_of_a_pushed_alert_keeps_it_an_alert(
    client: TestClient, engine: sa.Engine, settings: Settings
) -> None:
    from mailer.content.pushed import parse_pushed
    from mailer.content.store import upsert_articles

    pushed = post(client, encode(article(priority="alert"))).json()
    # The same story as the site's feed gives it (feeds carry no priority), stored the way
    # feed fetches store (keep_topic).
    as_in_feed = parse_pushed(encode(article()), known_topics=settings.topic_keys, now=NOW)
    assert as_in_feed.priority == "bulk"
    report = upsert_articles(engine, [as_in_feed], now=NOW, keep_topic=True)
    assert (report.unchanged, report.updated) == (1, 0)
    assert show(engine, pushed["id"]).article.priority == "alert"
