"""Configuration: valid files load; every bad value is named with its file and key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mailer.config import load_settings, parse_settings
from mailer.errors import ConfigError
from tests.factories import SECRET, config_dict, make_settings

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_loads_with_every_design_key() -> None:
    settings = load_settings(ROOT / "config.example.toml", env={"MAILER_SECRET_KEY": SECRET})
    assert settings.site.domain == "news.example.org"
    assert settings.smtp.security == "none"
    assert [t.key for t in settings.topics] == ["base-alerts", "local-events", "military-news"]
    assert settings.digests[0].schedule == "0 7 * * fri"
    assert [(d.key, d.lookback_days) for d in settings.digests] == [("weekly", 7), ("alerts", 2)]
    assert make_settings().digests[0].lookback_days == 7
    assert settings.database.url == "sqlite:///" + str(ROOT / "mailer.db")


def test_secret_comes_from_the_named_environment_variable() -> None:
    settings = make_settings()
    assert settings.site.require_secret() == SECRET.encode()
    bare = parse_settings(config_dict(), env={})
    with pytest.raises(ConfigError, match="MAILER_SECRET_KEY"):
        bare.site.require_secret()


def _error(**sections: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_settings(config_dict(**sections), path=Path("/etc/mailer.toml"), env={})
    return str(info.value)


BAD = [
    ({"smtp__port": "abc"}, "[smtp].port must be a whole number 1–65535, got 'abc'"),
    ({"smtp__port": 70000}, "[smtp].port must be 1–65535, got 70000"),
    ({"smtp__security": "ssl"}, "[smtp].security must be one of none, starttls, tls"),
    ({"smtp__prot": 25}, "[smtp].prot is not a known key"),
    (
        {"site__base_url": "news.example.org"},
        "[site].base_url must be an absolute http or https URL",
    ),
    ({"site__timezone": "Mars/Olympus"}, "[site].timezone must be an IANA time zone"),
    ({"site__name": "Bad\r\nBcc: x@evil.test"}, "[site].name must be one line"),
    (
        {"site__postal_address": " "},
        "[site].postal_address must be a valid physical postal address",
    ),
    ({"smtp__username": "u"}, "[smtp].password_env is required when [smtp].username is set"),
    (
        {"database": {"url": "mysql://x"}},
        "[database].url must be a sqlite:/// or postgresql:// URL",
    ),
    ({"topics": []}, "at least one [[topics]] table is required"),
    (
        {
            "sources": [
                {
                    "type": "directory",
                    "path": "a",
                    "topic": "base-alerts",
                    "categories": {"A": "base-alerts"},
                }
            ]
        },
        "categories applies to feed sources only",
    ),
    (
        {
            "sources": [
                {
                    "type": "feed",
                    "url": "https://x.example/f",
                    "topic": "base-alerts",
                    "categories": {"A": "gossip"},
                }
            ]
        },
        "maps 'A' to unknown topic 'gossip'",
    ),
    ({"feeds": {"interval_minutes": -1}}, "[feeds].interval_minutes must be 0–1440"),
]


@pytest.mark.parametrize(("sections", "expected"), BAD, ids=[e.split(" ")[0] for _, e in BAD])
def test_bad_values_name_file_key_and_expectation(sections: dict[str, Any], expected: str) -> None:
    message = _error(**sections)
    assert message.startswith("/etc/mailer.toml: ")
    assert expected in message


def _digest(**overrides: Any) -> list[dict[str, Any]]:
    digest = dict(config_dict()["digests"][0])
    digest.update(overrides)
    return [digest]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"schedule": "0 7 * * 5"}, "day of week must use names mon..sun"),
        ({"schedule": "0 7 * *"}, "must be a 5-field cron expression"),
        ({"topics": ["weather"]}, "names unknown topic 'weather'"),
        ({"max_articles": 0}, "[digests[0]].max_articles must be 1–500"),
        ({"key": "Weekly Digest!"}, "[digests[0]].key must match"),
        ({"lookback_days": 0}, "[digests[0]].lookback_days must be 0.01–3650, got 0"),
        ({"lookback_days": "7"}, "[digests[0]].lookback_days must be a number"),
    ],
    ids=[
        "numeric-weekday",
        "four-fields",
        "unknown-topic",
        "zero-articles",
        "bad-key",
        "zero-lookback",
        "text-lookback",
    ],
)
def test_bad_digests_are_refused(overrides: dict[str, Any], expected: str) -> None:
    assert expected in _error(digests=_digest(**overrides))


def test_missing_file_and_bad_toml_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[site\nname = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.toml: is not valid TOML"):
        load_settings(bad)


def test_relative_paths_resolve_beside_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "secret.key").write_text("s" * 40, encoding="ascii")
    data = config_dict(site__secret_key_file="secret.key")
    settings = parse_settings(data, path=tmp_path / "mailer.toml", env={})
    assert settings.site.require_secret() == b"s" * 40
    assert settings.database.url == f"sqlite:///{tmp_path / 'mailer.db'}"
