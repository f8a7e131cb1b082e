"""Factories: valid defaults, overridden per test."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from mailer.compose.rendering import Renderer
from mailer.config.load import parse_settings
from mailer.config.settings import Settings
from mailer.content.article import ParsedArticle
from mailer.content.store import upsert_articles
from mailer.db.engine import create_engine
from mailer.issues.create import IssueCreated, create_issue
from mailer.subscribers import store
from tests.smtp_server import Delay, FaultServer

SECRET = "test-secret-0123456789abcdef0123"
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)

BASE_CONFIG: dict[str, Any] = {
    "site": {
        "name": "Camp Lejeune & New River Updates",
        "tagline": (
            "Essential base alerts, local events, and military news delivered to your inbox."
        ),
        "base_url": "https://news.example.org",
        "from": "Camp Lejeune & New River Updates <digest@news.example.org>",
        "reply_to": "editor@news.example.org",
        "privacy_policy_url": "https://news.example.org/privacy",
        "postal_address": "Example Media, 100 Main Street, Jacksonville, NC 28540, USA",
        "publisher": "Example Media",
        "disclaimer": "Not an official U.S. Marine Corps or Department of Defense publication.",
        "timezone": "America/New_York",
        "secret_key_env": "MAILER_SECRET_KEY",
        "list_id": "updates.news.example.org",
        "unsubscribe_mailto": "unsubscribe@news.example.org",
    },
    "smtp": {"host": "127.0.0.1", "port": 2525, "connections": 2, "timeout": 5, "processes": 1},
    "topics": [
        {"key": "base-alerts", "name": "Base alerts"},
        {"key": "local-events", "name": "Local events"},
        {"key": "military-news", "name": "Military news"},
    ],
    "digests": [
        {
            "key": "weekly",
            "name": "Weekly digest",
            "subject": "Camp Lejeune & New River Updates — week of {{ date.strftime('%-d %B') }}",
            "schedule": "0 7 * * fri",
            "topics": ["base-alerts", "local-events", "military-news"],
            "max_articles": 20,
        }
    ],
}

TOPICS = ("base-alerts", "local-events", "military-news")
# Every digest key a test config names: a subscriber made by ``make_subscriber`` receives each
# (a key the config in use lacks selects no issue).
DIGESTS = ("weekly", "alerts", "daily")
# An alert digest beside the base config's weekly one: every ten minutes, two days' lookback.
ALERTS = {
    "key": "alerts",
    "name": "Base alerts",
    "subject": "Base alert",
    "schedule": "*/10 * * * *",
    "topics": ["base-alerts"],
    "max_articles": 5,
    "priority": "alert",
    "lookback_days": 2,
}


def config_dict(**sections: Any) -> dict[str, Any]:
    """The base config with whole sections or ``section__key`` values replaced."""
    data = copy.deepcopy(BASE_CONFIG)
    for name, value in sections.items():
        if "__" in name:
            section, key = name.split("__", 1)
            data.setdefault(section, {})[key] = value
        else:
            data[name] = value
    smtp = data.get("smtp")
    if isinstance(smtp, dict):
        # One sending process unless a test asks for more: the default ("auto") would start one
        # per CPU of whatever machine runs the tests.
        smtp.setdefault("processes", 1)
    return data


def make_settings(
    db_url: str = "sqlite:///:memory:", path: Path | None = None, **sections: Any
) -> Settings:
    data = config_dict(**sections)
    data.setdefault("database", {})["url"] = db_url
    return parse_settings(data, path=path, env={"MAILER_SECRET_KEY": SECRET})


def server_settings(db_url: str, server: FaultServer, **sections: Any) -> Settings:
    """Settings that send to ``server`` (5 s timeouts), otherwise like make_settings; ``smtp``
    values given are added to the server's."""
    smtp = {"host": "127.0.0.1", "port": server.port, "timeout": 5, **sections.pop("smtp", {})}
    return make_settings(db_url, smtp=smtp, **sections)


class Clock:
    """A clock the test moves by hand (``clock.value += timedelta(...)``)."""

    def __init__(self, start: datetime = NOW) -> None:
        self.value = start

    def __call__(self) -> datetime:
        return self.value


_counter = iter(range(1, 10**9))


def make_subscriber(engine: sa.Engine, **overrides: Any) -> store.Subscriber:
    n = next(_counter)
    values: dict[str, Any] = {
        "email": f"reader{n}@example.org",
        "name": f"Reader {n}",
        "topics": TOPICS,
        "digests": DIGESTS,
        "status": "active",
        "known_topics": TOPICS,
        "now": NOW,
    }
    values.update(overrides)
    email = values.pop("email")
    return store.add(engine, email, **values)


def write_config(path: Path, db_url: str, **sections: Any) -> Path:
    """A config file for ``mailer --config``: the base config, overridden like config_dict."""
    data = config_dict(**sections)
    data.setdefault("database", {})["url"] = db_url
    lines = []
    for name, value in data.items():
        if isinstance(value, list):
            for table in value:
                lines.append(f"[[{name}]]")
                lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
        else:
            lines.append(f"[{name}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in value.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def article(n: int, published: datetime) -> ParsedArticle:
    """Base alert ``n``, published at ``published``."""
    return make_article(
        guid=f"urn:test:{n}",
        title=f"Alert {n}",
        summary="Summary.",
        why_it_matters="Why.",
        body="Body.",
        link="https://news.example.org/a",
        published_at=published,
    )


def make_article(**overrides: Any) -> ParsedArticle:
    """A valid article (a base alert published a day before NOW), fields overridden."""
    n = next(_counter)
    values: dict[str, Any] = {
        "guid": f"https://news.example.org/a/{n}",
        "topic": "base-alerts",
        "title": f"Article {n}",
        "summary": "A summary.",
        "why_it_matters": "A reason.",
        "body": "The body.",
        "link": f"https://news.example.org/a/{n}",
        "published_at": NOW - timedelta(days=1),
        "expires_at": None,
    }
    values.update(overrides)
    return ParsedArticle(**values)


def make_issue(
    engine: sa.Engine,
    settings: Settings,
    key: str | None = None,
    at: datetime = NOW,
    made: datetime | None = None,
) -> IssueCreated:
    """The issue of digest ``key`` (default: the config's first) for the slot ``at``, created
    at ``made`` (default: the slot's instant)."""
    digest = settings.digests[0] if key is None else settings.digest(key)
    return create_issue(
        engine,
        settings,
        digest,
        scheduled_for=at,
        now=made or at,
        render_subject=Renderer().render_subject,
    )


def ready_to_send(
    db_url: str,
    config: Path,
    server: FaultServer,
    emails: Sequence[str],
    *,
    hold: float | None = None,
    smtp: dict[str, Any] | None = None,
    **sections: Any,
) -> Path:
    """A config for ``mailer --config`` that sends to ``server``, one article of the last hour
    (commands run on the real clock: it is within the lookback) and ``emails`` as active
    subscribers; with ``hold``, the server holds each of their messages that many seconds."""
    write_config(
        config,
        db_url,
        smtp={"host": "127.0.0.1", "port": server.port, "timeout": 5, **(smtp or {})},
        **sections,
    )
    engine = create_engine(db_url)
    now = datetime.now(UTC)
    upsert_articles(engine, [article(1, now - timedelta(hours=1))], now=now)
    for email in emails:
        make_subscriber(engine, email=email)
        if hold is not None:
            server.script(email, [Delay(hold)], stage="data")
    engine.dispose()
    return config
