"""Hostile input, everywhere: each gets a clear error (or is neutralized), nothing valid is lost.

One table, one row per input, the exact outcome of each. The count of rows is the figure the
robustness note reports.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from mailer.compose.rendering import Renderer
from mailer.config.load import parse_settings
from mailer.content.files import parse_article
from mailer.errors import (
    AddressError,
    ArticleError,
    ConfigError,
    MailerError,
    SubscriberError,
    TemplateError,
    TokenError,
)
from mailer.subscribers import csvfile, store
from mailer.subscribers.addresses import normalize_address
from mailer.subscribers.tokens import Purpose, make_token, read_token
from tests.factories import NOW, SECRET, TOPICS, config_dict, make_settings

SETTINGS = make_settings()
DIGEST = SETTINGS.digests[0]
DATE = datetime(2026, 11, 27, 7, tzinfo=UTC)
UID = "A" * 22
GOOD_TOKEN = make_token(SECRET.encode(), Purpose.UNSUBSCRIBE, UID)


def address(raw: str) -> Callable[[], object]:
    return lambda: normalize_address(raw)


def subject(template: str) -> Callable[[], object]:
    return lambda: Renderer().render_subject(replace(DIGEST, subject=template), DATE)


def token(raw: str, purpose: Purpose = Purpose.UNSUBSCRIBE) -> Callable[[], object]:
    return lambda: read_token(SECRET.encode(), purpose, raw)


def article(text: str) -> Callable[[], object]:
    return lambda: parse_article(
        text, source="x.md", default_topic="base-alerts", known_topics=TOPICS, now=NOW
    )


def config(**sections: Any) -> Callable[[], object]:
    return lambda: parse_settings(config_dict(**sections), env={})


RAISES: list[tuple[str, Callable[[], object], type[MailerError], str]] = [
    ("address-empty", address(""), AddressError, "empty"),
    ("address-no-at", address("ann.example.org"), AddressError, "@"),
    (
        "address-crlf-injection",
        address("ann@example.org\r\nBcc: all@evil.example"),
        AddressError,
        "line break",
    ),
    ("address-nul", address("ann\x00@example.org"), AddressError, "NUL"),
    (
        "address-unicode-local",
        address("jos\u00e9@example.org"),
        AddressError,
        "invalid email address",
    ),
    ("address-two-ats", address("a@b@example.org"), AddressError, "invalid email address"),
    (
        "address-too-long",
        address("a" * 250 + "@example.org"),
        AddressError,
        "invalid email address",
    ),
    (
        "address-display-name",
        address("Ann <ann@example.org>"),
        AddressError,
        "invalid email address",
    ),
    ("subject-unsafe-attribute", subject("{{ ''.__class__.__mro__ }}"), TemplateError, ""),
    ("subject-undefined", subject("{{ nope }}"), TemplateError, "nope"),
    ("subject-fake-reply", subject("Re: {{ digest.name }}"), TemplateError, ""),
    ("token-garbage", token("not-a-token"), TokenError, "malformed"),
    ("token-truncated", token(GOOD_TOKEN[:-1]), TokenError, "malformed"),
    (
        "token-forged-mac",
        token(GOOD_TOKEN[:-2] + ("AA" if GOOD_TOKEN[-2:] != "AA" else "BB")),
        TokenError,
        "does not match",
    ),
    ("token-other-purpose", token(GOOD_TOKEN, Purpose.CONFIRM), TokenError, "does not match"),
    ("token-unicode", token("\u0410" * 22 + "." + "A" * 22), TokenError, "malformed"),
    ("article-empty", article(""), ArticleError, ""),
    ("article-huge-title", article("T" * 5000 + "\n\nSummary\n\nS\n\nBody"), ArticleError, "title"),
    (
        "article-unknown-topic",
        article("+++\ntitle = 'x'\ntopic = 'gossip'\n+++\nbody"),
        ArticleError,
        "gossip",
    ),
    (
        "article-bad-date",
        article("---\ntitle: x\npublished: 2026-13-45\n---\nbody"),
        ArticleError,
        "",
    ),
    (
        "article-js-link",
        article("---\ntitle: x\nlink: 'javascript:alert(1)'\n---\nbody"),
        ArticleError,
        "link",
    ),
    ("config-port-text", config(smtp__port="25; rm -rf /"), ConfigError, "[smtp].port"),
    (
        "config-name-crlf",
        config(site__name="News\r\nBcc: x@evil.example"),
        ConfigError,
        "[site].name",
    ),
    (
        "config-numeric-weekday",
        config(digests=[{**config_dict()["digests"][0], "schedule": "0 7 * * 1"}]),
        ConfigError,
        "day of week",
    ),
    ("config-unknown-key", config(smtp__passwrod="x"), ConfigError, "passwrod"),
]


@pytest.mark.parametrize(
    ("make", "error", "words"), [r[1:] for r in RAISES], ids=[r[0] for r in RAISES]
)
def test_hostile_input_gets_a_clear_error(
    make: Callable[[], object], error: type[MailerError], words: str
) -> None:
    with pytest.raises(error) as info:
        make()
    assert words in str(info.value)


NEUTRALIZED: list[tuple[str, Callable[[], object], Callable[[Any], bool]]] = [
    (
        "subject-crlf",
        subject("Digest\r\nBcc: all@evil.example"),
        lambda s: "\r" not in s and "\n" not in s,
    ),
    (
        "subject-rtl-override",
        subject("Digest \u202e{{ digest.name }}"),
        lambda s: "\u202e" not in s,
    ),
    (
        "article-script",
        article("+++\ntitle = '<script>alert(1)</script>'\n+++\nbody"),
        lambda a: a.title == "<script>alert(1)</script>",
    ),
    (
        "article-control-chars",
        article("+++\ntitle = 'a\\u0007b'\n+++\nbody"),
        lambda a: "\x07" not in a.title,
    ),
]


@pytest.mark.parametrize(
    ("make", "check"), [r[1:] for r in NEUTRALIZED], ids=[r[0] for r in NEUTRALIZED]
)
def test_hostile_input_is_neutralized(
    make: Callable[[], object], check: Callable[[Any], bool]
) -> None:
    assert check(make())


CSV_CASES = [
    ("crlf-in-name", 'email,name\nann@example.org,"Ann\r\nBcc: x@evil.example"\n', 1, 0, None),
    ("rtl-override-name", "email,name\nann@example.org,Ann\u202eevil\n", 1, 0, None),
    (
        "huge-name",
        "email,name\nann@example.org," + "n" * 1000 + "\nbob@example.org,Bob\n",
        1,
        1,
        "name longer",
    ),
    (
        "missing-field",
        "email,name,topics\nann@example.org,Ann\nbob@example.org,Bob,\n",
        1,
        1,
        "expected 3 fields",
    ),
    (
        "extra-field",
        "email,name\nann@example.org,Ann,extra\nbob@example.org,Bob\n",
        1,
        1,
        "expected 2 fields",
    ),
    ("duplicate-row", "email\nann@example.org\nANN@example.org\n", 1, 1, "duplicate of row 2"),
    ("formula-name", 'email,name\nann@example.org,=HYPERLINK("x")\n', 1, 0, None),
    ("invalid-address", "email\nnot-an-address\nbob@example.org\n", 1, 1, "@-sign"),
    (
        "unknown-status",
        "email,status\nann@example.org,vip\nbob@example.org,active\n",
        1,
        1,
        "unknown status",
    ),
    ("blank-lines", "email\n\n\nann@example.org\n\n", 1, 0, None),
]


@pytest.mark.parametrize(
    ("text", "added", "rejected", "reason"),
    [c[1:] for c in CSV_CASES],
    ids=[c[0] for c in CSV_CASES],
)
def test_hostile_csv_rows_are_reported_and_valid_rows_kept(
    engine: sa.Engine, text: str, added: int, rejected: int, reason: str | None
) -> None:
    report = csvfile.import_csv(engine, io.StringIO(text), known_topics=TOPICS, now=NOW)
    assert (report.added, len(report.errors)) == (added, rejected)
    if reason:
        assert reason in report.errors[0].reason
    for sub in store.iter_subscribers(engine):
        assert sub.name.isprintable()
    exported = csvfile.export_text(engine)
    assert "\n=" not in exported and ",=" not in exported  # no spreadsheet formula survives


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"\xff\xfeemail\n", "not UTF-8"),
        (b"name,topics\nAnn,\n", "'email' column"),
        (b"email,shoe_size\nann@example.org,9\n", "unknown CSV column 'shoe_size'"),
        (b"email\nann@example.org\nb\xe9@example.org\n", "not UTF-8"),
    ],
    ids=["utf16-bom", "no-email-column", "unknown-column", "latin1-row"],
)
def test_unreadable_csv_files_are_refused_with_the_reason(
    engine: sa.Engine, raw: bytes, words: str
) -> None:
    stream = io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8", newline="")
    with pytest.raises(SubscriberError, match=words):
        csvfile.import_csv(engine, stream, known_topics=TOPICS, now=NOW)


def test_count_of_hostile_inputs() -> None:
    # The figure quoted in the robustness note; update it when the tables grow.
    assert len(RAISES) + len(NEUTRALIZED) + len(CSV_CASES) + 4 == 43
