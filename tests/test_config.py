"""Configuration: valid files load; every bad value is named with its file and key."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mailer.config.load import load_settings, parse_settings
from mailer.config.sections import DEFAULT_CONNECTIONS
from mailer.config.settings import BounceSettings
from mailer.errors import ConfigError
from tests.factories import SECRET, config_dict, make_settings, write_config

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_loads_with_every_design_key() -> None:
    settings = load_settings(ROOT / "config.example.toml", env={"MAILER_SECRET_KEY": SECRET})
    assert settings.site.domain == "news.example.org"
    assert settings.smtp.security == "none"
    assert settings.smtp.processes_auto
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
    (
        {"site__logo_url": "http://news.example.org/logo.png"},
        "[site].logo_url must be an absolute https URL, got 'http://news.example.org/logo.png'",
    ),
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
    (
        {"database": {"url": "sqlitex:///mailer.db"}},
        "[database].url must be a sqlite:/// or postgresql:// URL, got 'sqlitex:///mailer.db'",
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
        "[sources[0]].categories (source 'a') applies to feed sources only",
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
    (
        {
            "sources": [
                {"type": "directory", "path": "a", "topic": "base-alerts", "allow_private": True}
            ]
        },
        "[sources[0]].allow_private (source 'a') applies to feed sources only",
    ),
    (
        {
            "sources": [
                {
                    "type": "feed",
                    "url": "https://x.example/f",
                    "topic": "base-alerts",
                    "allow_private": "yes",
                }
            ]
        },
        "allow_private (source 'https://x.example/f') must be true or false, got 'yes'",
    ),
    ({"feeds": {"interval_minutes": -1}}, "[feeds].interval_minutes must be 0–1440"),
    ({"smtp": {"lease_seconds": 0.1}}, "[smtp].lease_seconds must be 0.2–86400"),
    ({"smtp__processes": 0}, '[smtp].processes must be a whole number 1–64 or "auto", got 0'),
    ({"smtp__processes": 65}, '[smtp].processes must be a whole number 1–64 or "auto", got 65'),
    (
        {"smtp__processes": "Auto"},
        "[smtp].processes must be a whole number 1–64 or \"auto\", got 'Auto'",
    ),
    (
        {"smtp__processes": 2.0},
        '[smtp].processes must be a whole number 1–64 or "auto", got 2.0',
    ),
    (
        {"smtp__processes": True},
        '[smtp].processes must be a whole number 1–64 or "auto", got True',
    ),
]


@pytest.mark.parametrize(("sections", "expected"), BAD, ids=[e.split(" ")[0] for _, e in BAD])
def test_bad_values_name_file_key_and_expectation(sections: dict[str, Any], expected: str) -> None:
    message = _error(**sections)
    assert message.startswith("/etc/mailer.toml: ")
    assert expected in message


def test_a_top_level_key_is_named_without_an_empty_table() -> None:
    assert _error(sitee={}).startswith("/etc/mailer.toml: sitee is not a known key (known: ")
    data = config_dict()
    del data["site"]
    with pytest.raises(ConfigError, match=r"^/etc/mailer\.toml: site is required$"):
        parse_settings(data, path=Path("/etc/mailer.toml"), env={})


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
        ({"max_articles": 0}, "[digests[0]].max_articles (digest 'weekly') must be 1–500"),
        ({"key": "Weekly Digest!"}, "[digests[0]].key (digest 'Weekly Digest!') must match"),
        (
            {"lookback_days": 0},
            "[digests[0]].lookback_days (digest 'weekly') must be 0.01–3650, got 0",
        ),
        ({"lookback_days": "7"}, "[digests[0]].lookback_days (digest 'weekly') must be a number"),
        (
            {"topics": ["base-alerts", "local-events", "base-alerts"]},
            "[digests[0]].topics (digest 'weekly') names 'base-alerts' more than once",
        ),
        (
            {"review_minutes": -1},
            "[digests[0]].review_minutes (digest 'weekly') must be 0–10080, got -1",
        ),
        (
            # The shortest week is the one that springs forward: 167 hours.
            {"review_minutes": 7 * 24 * 60 - 60},
            "[digests[0]].review_minutes (digest 'weekly') must be shorter than the time between"
            " two slots (10020 minutes for '0 7 * * fri'), got 10020",
        ),
        (
            {"on_unreviewed": "approve"},
            "[digests[0]].on_unreviewed (digest 'weekly') must be one of",
        ),
        (
            {"priority": "alert", "review_minutes": 5},
            "[digests[0]].review_minutes (digest 'weekly') applies to bulk digests only",
        ),
    ],
    ids=[
        "numeric-weekday",
        "four-fields",
        "unknown-topic",
        "zero-articles",
        "bad-key",
        "zero-lookback",
        "text-lookback",
        "repeated-topic",
        "negative-review",
        "review-longer-than-the-gap",
        "unknown-unreviewed-policy",
        "review-of-an-alert",
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


@pytest.mark.parametrize(
    ("source", "key"),
    [
        ({"env": {"MAILER_SECRET_KEY": "short"}}, "secret_key_env"),
        ({"file": b"short"}, "secret_key_file"),
    ],
    ids=["environment", "file"],
)
def test_a_short_secret_names_the_key_it_came_from(
    tmp_path: Path, source: dict[str, Any], key: str
) -> None:
    (tmp_path / "secret.key").write_bytes(source.get("file", b"s" * 40))
    data = config_dict(site__secret_key_file="secret.key")
    with pytest.raises(ConfigError, match=rf"\[site\]\.{key} the site secret must be at least 16"):
        parse_settings(data, path=tmp_path / "mailer.toml", env=source.get("env", {}))


def test_relative_paths_resolve_beside_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "secret.key").write_text("s" * 40, encoding="ascii")
    data = config_dict(site__secret_key_file="secret.key")
    settings = parse_settings(data, path=tmp_path / "mailer.toml", env={})
    assert settings.site.require_secret() == b"s" * 40
    assert settings.database.url == f"sqlite:///{tmp_path / 'mailer.db'}"


def _feed(categories: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {
            "type": "feed",
            "url": "https://news.example.org/feed",
            "topic": "base-alerts",
            "categories": categories,
        }
    ]


# What used to load and fail only later: when a scheduled firing built the issue (a subject),
# when the scheduler started (a schedule), or in every link of every message (base_url).
REFUSED_AT_LOAD = {
    "cron-minute-99": (
        {"digests": _digest(schedule="99 7 * * fri")},
        "[digests[0]].schedule (digest 'weekly') is not a valid cron expression ('99 7 * * fri'): "
        "Error validating expression '99': the last value (99) is higher than the maximum value",
    ),
    "cron-hour-25": (
        {"digests": _digest(schedule="0 25 * * fri")},
        "[digests[0]].schedule (digest 'weekly') is not a valid cron expression",
    ),
    "cron-bad-day-name": (
        {"digests": _digest(schedule="0 7 * * frx")},
        "[digests[0]].schedule (digest 'weekly') is not a valid cron expression ('0 7 * * frx'): "
        'Invalid weekday name "frx"',
    ),
    "cron-never-fires": (
        {"digests": _digest(schedule="0 7 31 2 *")},
        "[digests[0]].schedule (digest 'weekly') never fires ('0 7 31 2 *'",
    ),
    "subject-undefined-name": (
        {"digests": _digest(subject="{{ nope }}")},
        "[digests[0]].subject (digest 'weekly') cannot be rendered: 'nope' is undefined "
        "(tried with date 2026-01-02 07:00 EST and one sample article;",
    ),
    "subject-misspelt-attribute": (
        {"digests": _digest(subject="{{ digest.nme }}")},
        "[digests[0]].subject (digest 'weekly') cannot be rendered:"
        " 'mailer.config.settings.Digest object' has no"
        " attribute 'nme' (tried with date 2026-01-02 07:00 EST and one sample"
        " article; a subject sees digest.name, digest.key, date, lead.title, lead.topic, count and"
        " more)",
    ),
    "template-missing": (
        {"digests": _digest(template="digset")},
        "[digests[0]].template (digest 'weekly')"
        " names 'digset', but email/digset.html and email/digset.txt do not"
        " exist in",
    ),
    "subject-misspelt-lead": (
        {
            "digests": _digest(
                subject="{{ lead.titel }}{% if more %}, and {{ more }} more{% endif %}"
            )
        },
        "[digests[0]].subject (digest 'weekly')"
        " cannot be rendered: 'mailer.sandbox.Lead object' has no attribute"
        " 'titel' (tried with date 2026-01-02 07:00 EST and one sample article;",
    ),
    "subject-syntax": (
        {"digests": _digest(subject="{{ date.strftime( }}")},
        "[digests[0]].subject (digest 'weekly') cannot be rendered: syntax error",
    ),
    "subject-unknown-filter": (
        {"digests": _digest(subject="{{ date | shout }}")},
        "[digests[0]].subject (digest 'weekly')"
        " cannot be rendered: syntax error: No filter named 'shout'",
    ),
    "subject-unsafe-attribute": (
        {"digests": _digest(subject="{{ ''.__class__.__mro__ }}")},
        "[digests[0]].subject (digest 'weekly')"
        " cannot be rendered: access to attribute '__class__'",
    ),
    "subject-raises": (
        {"digests": _digest(subject="Week {{ 1 / 0 }}")},
        "[digests[0]].subject (digest 'weekly') cannot be rendered: ZeroDivisionError",
    ),
    "subject-fake-reply": (
        {"digests": _digest(subject="Re: {{ digest.name }}")},
        "[digests[0]].subject (digest 'weekly')"
        " cannot be rendered: must not look like a reply or forward",
    ),
    "subject-empty": (
        {"digests": _digest(subject="{{ '' }}")},
        "[digests[0]].subject (digest 'weekly') cannot be rendered: renders to an empty subject",
    ),
    "base-url-plain-http": (
        {"site__base_url": "http://news.example.org"},
        "[site].base_url must be https:// for a public host, got 'http://news.example.org'",
    ),
    "base-url-query": (
        {"site__base_url": "https://news.example.org/?ref=mail"},
        "[site].base_url must not have a query or fragment",
    ),
    "base-url-fragment": (
        {"site__base_url": "https://news.example.org/#top"},
        "[site].base_url must not have a query or fragment",
    ),
    "base-url-credentials": (
        {"site__base_url": "https://staff:pw@news.example.org"},
        "[site].base_url must not carry a user name or password",
    ),
    "base-url-port": (
        {"site__base_url": "https://news.example.org:99999"},
        "[site].base_url has an invalid port",
    ),
    "base-url-no-host": (
        {"site__base_url": "https:///news"},
        "[site].base_url must be an absolute http or https URL",
    ),
    "base-url-quote": (
        {"site__base_url": "https://news.example.org/a'b"},
        "[site].base_url must be an ASCII URL (punycode host)",
    ),
    "category-empty": (
        {"sources": _feed({" ": "base-alerts"})},
        "[sources[0]].categories (source 'https://news.example.org/feed') has an empty category"
        ' name ("" = ...)',
    ),
    "category-twice": (
        {"sources": _feed({"Base  Alerts": "base-alerts", "base alerts": "local-events"})},
        "[sources[0]].categories (source 'https://news.example.org/feed')"
        " names category 'base alerts' twice ('Base  Alerts' is the same",
    ),
    "category-unknown-topic": (
        {"sources": _feed({"Weather": "weather"})},
        "[sources[0]].categories (source 'https://news.example.org/feed')"
        " maps 'Weather' to unknown topic 'weather'",
    ),
    "bounces-soft-limit-0": (
        {"bounces": {"soft_limit": 0}},
        "[bounces].soft_limit must be 1–1000, got 0",
    ),
    "bounces-window-text": (
        {"bounces": {"soft_window_days": "30"}},
        "[bounces].soft_window_days must be a whole number 1–3660, got '30'",
    ),
    "bounces-unknown-key": (
        {"bounces": {"soft_limt": 2}},
        "[bounces].soft_limt is not a known key (known: soft_limit, soft_window_days)",
    ),
}


@pytest.mark.parametrize(
    ("sections", "expected"), REFUSED_AT_LOAD.values(), ids=REFUSED_AT_LOAD.keys()
)
def test_what_would_fail_later_is_refused_at_load_naming_file_and_key(
    sections: dict[str, Any], expected: str
) -> None:
    message = _error(**sections)
    assert message.startswith("/etc/mailer.toml: ")
    assert expected in message


def test_a_failed_subject_is_reported_from_the_file_by_load_settings(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "mailer.toml", "sqlite:///mailer.db", digests=_digest(subject="{{ nope }}")
    )
    with pytest.raises(ConfigError) as info:
        load_settings(config, env={})
    assert str(info.value).startswith(
        f"{config}: [digests[0]].subject (digest 'weekly') cannot be rendered"
    )
    assert (info.value.path, info.value.key) == (str(config), "digests[0].subject")


@pytest.mark.parametrize(
    "base_url",
    [
        "http://127.0.0.1:8000",
        "http://localhost:8000/",
        "http://[::1]:8000",
        "https://news.example.org/newsletter/",
    ],
    ids=["loopback-ip", "localhost", "loopback-v6", "https-with-path"],
)
def test_base_url_http_is_accepted_on_this_machine_and_https_anywhere(base_url: str) -> None:
    settings = parse_settings(config_dict(site__base_url=base_url), env={})
    assert settings.site.base_url == base_url.rstrip("/")


def test_a_secret_file_beside_the_variable_is_a_known_key_the_variable_wins(
    tmp_path: Path,
) -> None:
    (tmp_path / "secret.key").write_text("from-the-file-0123456789")
    data = config_dict(site__secret_key_file="secret.key")
    settings = parse_settings(
        data, path=tmp_path / "mailer.toml", env={"MAILER_SECRET_KEY": SECRET}
    )
    assert settings.site.require_secret() == SECRET.encode()
    alone = parse_settings(data, path=tmp_path / "mailer.toml", env={})
    assert alone.site.require_secret() == b"from-the-file-0123456789"


def test_logo_is_optional_https_and_alt_text_defaults_to_the_name() -> None:
    plain = make_settings()
    assert (plain.site.logo_url, plain.site.logo_alt) == (None, plain.site.name)
    logo = "https://news.example.org/static/logo.png"
    settings = make_settings(site__logo_url=logo, site__logo_alt="The Updates")
    assert (settings.site.logo_url, settings.site.logo_alt) == (logo, "The Updates")


def test_bounce_policy_defaults_and_values() -> None:
    assert make_settings().bounces == BounceSettings(soft_limit=3, soft_window_days=30)
    tight = make_settings(bounces={"soft_limit": 1, "soft_window_days": 7})
    assert tight.bounces == BounceSettings(soft_limit=1, soft_window_days=7)
    settings = load_settings(ROOT / "config.example.toml", env={"MAILER_SECRET_KEY": SECRET})
    assert settings.bounces == BounceSettings(soft_limit=3, soft_window_days=30)


def test_a_lease_of_a_fraction_of_a_second_is_accepted() -> None:
    settings = make_settings("sqlite://", smtp__lease_seconds=0.3)
    assert settings.smtp.lease_seconds == 0.3


@pytest.mark.parametrize(
    ("staff", "expected"),
    [
        ({"emails": ["editor"]}, "[staff].emails must list plain addresses"),
        ({"emails": "editor@news.example.org"}, "[staff].emails must be a list of strings"),
        (
            {"emails": ["a@news.example.org", "A@news.example.org"]},
            "[staff].emails lists 'A@news.example.org' twice",
        ),
        ({"alert_emails": ["Ed <ed@x.org>"]}, "[staff].alert_emails must list plain addresses"),
        ({"stall_minutes": 0}, "[staff].stall_minutes must be 1–10080"),
        ({"failure_percent": 101}, "[staff].failure_percent must be 0–100"),
        ({"feed_failures": 0}, "[staff].feed_failures must be 1–10000, got 0"),
        ({"emails": [], "typo": 1}, "[staff].typo"),
    ],
)
def test_staff_settings_are_checked_at_load(staff: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as raised:
        make_settings(staff=staff)
    assert expected in str(raised.value)


def test_staff_alert_emails_default_to_the_staff_emails() -> None:
    settings = make_settings(staff={"emails": ["editor@news.example.org"]})
    assert settings.staff.alert_emails == ("editor@news.example.org",)
    assert make_settings(staff={"emails": ["e@x.org"], "alert_emails": []}).staff.alert_emails == ()


def _smtp_defaults(db_url: str, **smtp: Any) -> Any:
    """The [smtp] settings of a config that gives only ``smtp`` (host and port else)."""
    data = config_dict(smtp={"host": "127.0.0.1", "port": 2525, **smtp})
    if "processes" not in smtp:
        del data["smtp"]["processes"]  # config_dict pins one process; these tests read the default
    data.setdefault("database", {})["url"] = db_url
    return parse_settings(data, env={"MAILER_SECRET_KEY": SECRET}).smtp


def test_processes_default_to_auto_one_per_cpu_this_process_may_use(tmp_path: Path) -> None:
    smtp = _smtp_defaults(f"sqlite:///{tmp_path / 'mailer.db'}")
    usable = len(os.sched_getaffinity(0))
    assert smtp.processes == min(usable, 64)
    assert smtp.processes_auto
    assert smtp.processes_from.startswith('[smtp].processes = "auto": ')
    assert f"{usable} CPU" in smtp.processes_from
    assert smtp.connections == DEFAULT_CONNECTIONS


def test_processes_auto_written_out_is_the_default(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'mailer.db'}"
    assert _smtp_defaults(url, processes="auto") == _smtp_defaults(url)


@pytest.mark.parametrize("count", [1, 3, 64], ids=["one", "three", "most"])
def test_processes_given_as_a_count_are_taken_as_given(tmp_path: Path, count: int) -> None:
    smtp = _smtp_defaults(f"sqlite:///{tmp_path / 'mailer.db'}", processes=count)
    assert (smtp.processes, smtp.processes_auto) == (count, False)
    assert smtp.processes_from == f"[smtp].processes = {count}"


def test_processes_auto_is_one_for_an_in_memory_database() -> None:
    smtp = _smtp_defaults("sqlite://")
    assert smtp.processes == 1
    assert smtp.processes_from == (
        '[smtp].processes = "auto": 1, an in-memory SQLite database is private to one process'
    )


def test_two_processes_on_an_in_memory_database_is_a_config_error() -> None:
    message = _error(database={"url": "sqlite://"}, smtp__processes=2)
    assert "[smtp].processes must be 1 with an in-memory SQLite database" in message


def test_processes_auto_counts_the_affinity_mask_not_the_machine() -> None:
    # A child pinned to one CPU (taskset, a container's cpuset) gets one process.
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))});"
        "from mailer.config.sections import read_processes;"
        "from mailer.config.table import Table;"
        "print(read_processes(Table({}, 'smtp', None)))"
    )
    shown = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    count, said = ast.literal_eval(shown)
    assert count == 1
    machine = os.cpu_count()
    expected = '[smtp].processes = "auto": 1 CPU'
    if machine and machine > 1:
        expected += f" of the machine's {machine}"
    assert said == expected + " this process may use"
