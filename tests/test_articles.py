"""Articles: the site's text format, Markdown with front matter, the store and the selection."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.content import site_text
from mailer.content.article import ParsedArticle
from mailer.content.files import MAX_TEXT, load_article_file, parse_article
from mailer.content.selection import select_for_issue
from mailer.content.store import UPSERT_CHUNK, list_articles, upsert_articles
from mailer.db.schema import articles as articles_table
from mailer.errors import ArticleError
from mailer.models import Article
from mailer.subscribers import csvfile, store
from tests.factories import ALERTS, NOW, TOPICS, config_dict, make_article, make_settings

EXAMPLES = Path(__file__).resolve().parent.parent / "mailer" / "devtools" / "examples"
SEED = EXAMPLES / "articles" / "000-putin-visits-india.txt"
SIGNUP_BOX = (
    "Get Camp Lejeune",
    "New River Updates",
    "Essential base alerts",
    "delivered to your inbox",
    "spam",
    "privacy policy",
)


def parse(text: str, **overrides: Any) -> ParsedArticle:
    values: dict[str, Any] = {
        "source": "a.md",
        "default_topic": "base-alerts",
        "known_topics": TOPICS,
        "now": NOW,
    }
    values.update(overrides)
    return parse_article(text, **values)


# ------------------------------------------------------------------ the site's format: the seed


def test_seed_article_parses_title_summary_why_and_body() -> None:
    article = load_article_file(SEED, default_topic="military-news", known_topics=TOPICS, now=NOW)
    assert article.title == "Putin visits India for talks on defense, trade ties"
    assert article.summary == (
        "President Putin visits India to bolster defense and trade ties amid U.S. tariffs and "
        "pressure over Russian oil imports."
    )
    assert article.why_it_matters.startswith("The visit underscores India's strategic balancing")
    assert article.body.startswith("Russian President Vladimir Putin arrived in India on Thursday")
    assert article.body.endswith("“the most stable relationship in modern times.”")
    assert article.body.count("\n\n") == 10  # eleven paragraphs, one blank line apart
    assert article.topic == "military-news"
    assert article.link is None
    assert article.published_at == NOW and not article.date_given


def test_seed_signup_box_is_stripped_from_every_field() -> None:
    article = load_article_file(SEED, default_topic="military-news", known_topics=TOPICS, now=NOW)
    for field in (article.title, article.summary, article.why_it_matters, article.body):
        for chrome in SIGNUP_BOX:
            assert chrome not in field
    assert "Get Camp Lejeune" in SEED.read_text(encoding="utf-8")  # the file itself keeps it


def test_seed_parses_the_same_with_crlf_and_a_bom() -> None:
    text = SEED.read_text(encoding="utf-8")
    windows = "\ufeff" + text.replace("\n", "\r\n")
    assert parse(windows, source=SEED.name) == parse(text, source=SEED.name)


def test_seed_guid_is_stable_per_file_name_and_title() -> None:
    text = SEED.read_text(encoding="utf-8")
    first = parse(text, source="/srv/articles/putin.txt")
    assert parse(text, source="putin.txt", now=NOW + timedelta(days=3)).guid == first.guid
    assert parse(text, source="other.txt").guid != first.guid
    assert first.guid.startswith("urn:mailer:article:")


SITE_BODY = "Body paragraph one.\n\nBody paragraph two."


@pytest.mark.parametrize(
    "text",
    [
        "Title\n\nSummary\n\nThe summary.\n\nWhy this matters\n\nThe reason.\n\n" + SITE_BODY,
        "Title\n\nSUMMARY:\n\nThe summary.\n\nwhy this matters:\n\nThe reason.\n\n" + SITE_BODY,
        "Title\nSummary\nThe summary.\nWhy it matters\nThe reason.\n\n" + SITE_BODY,
        "Title\n\nSummary: The summary.\n\nWhy this matters: The reason.\n\n" + SITE_BODY,
        "  Title  \n\n## Summary\n\nThe summary.\n\n## Why this matters\n\nThe reason.\n\n"
        + SITE_BODY,
        "\n\nTitle\n\nWhy this matters\n\nThe reason.\n\nSummary\n\nThe summary.\n\n" + SITE_BODY,
    ],
    ids=["seed-layout", "caps-and-colons", "no-blank-lines", "inline", "hashes", "why-first"],
)
def test_site_headings_are_found_in_any_case_with_or_without_colons(text: str) -> None:
    article = parse(text + "\n\nGet Camp Lejeune & New River Updates\n")
    assert (article.title, article.summary, article.why_it_matters, article.body) == (
        "Title",
        "The summary.",
        "The reason.",
        SITE_BODY,
    )


def test_site_summary_runs_over_paragraphs_up_to_the_why_heading() -> None:
    article = parse("T\n\nSummary\n\nOne.\n\nTwo.\n\nWhy this matters\n\nW.\n\nB.")
    assert (article.summary, article.why_it_matters, article.body) == ("One.\n\nTwo.", "W.", "B.")


def test_site_article_without_sections_is_all_body() -> None:
    article = parse("A title\n\nFirst paragraph.\n\nSecond.\n")
    assert (article.summary, article.why_it_matters, article.body) == (
        "",
        "",
        "First paragraph.\n\nSecond.",
    )


def test_a_why_heading_deep_in_the_body_does_not_swallow_the_body() -> None:
    paragraphs = "\n\n".join(f"P{i}." for i in range(8))
    article = parse(f"T\n\nSummary\n\nS.\n\n{paragraphs}\n\nWhy this matters\n\nLate.")
    assert article.summary == "S."
    assert article.why_it_matters == ""
    assert article.body.startswith("P0.") and article.body.endswith("Why this matters\n\nLate.")


@pytest.mark.parametrize(
    "box",
    [
        "Get Camp Lejeune & New River Updates\n\nEssential base alerts, local events, and "
        "military news delivered to your inbox.\n\nWe don't spam! Read our privacy policy for "
        "more info.",
        "GET CAMP LEJEUNE &amp; NEW RIVER UPDATES\nEmail address\nSubscribe\n"
        "We don’t spam!\nRead our privacy policy for more info.\n\n\n",
        "Essential base alerts, local events, and military news delivered to your inbox",
    ],
    ids=["as-briefed", "html-copy-with-form", "tagline-only"],
)
def test_signup_box_variants_are_stripped(box: str) -> None:
    article = parse(f"Title\n\nSummary\n\nS.\n\nWhy this matters\n\nW.\n\nBody.\n\n{box}")
    assert article.body == "Body."


def test_signup_box_lines_inside_the_body_are_dropped_but_the_text_around_stays() -> None:
    article = parse(
        "Title\n\nBefore.\n\nGet Camp Lejeune & New River Updates\n\n"
        "We don't spam! Read our privacy policy for more info.\n\nAfter."
    )
    assert article.body == "Before.\n\nAfter."


def test_a_last_paragraph_that_only_resembles_the_form_is_kept() -> None:
    # "Subscribe" and "Email" are chrome only next to the box; alone they are the author's words.
    article = parse("Title\n\nBody.\n\nSubscribe\n\nEmail")
    assert article.body == "Body.\n\nSubscribe\n\nEmail"


def test_control_characters_are_stripped_but_newlines_and_tabs_kept() -> None:
    article = parse("Ti\x00tle\x1b\n\nBody\twith a tab\x07.\n\nNext\x85 line.")
    assert article.title == "Title"
    assert article.body == "Body\twith a tab.\n\nNext line."


# ------------------------------------------------------------------ Markdown with front matter

TOML_ARTICLE = """\
+++
title = "Main Gate lane closure"
topic = "base-alerts"
link = "https://news.example.org/2026/11/main-gate"
published = 2026-11-19T08:30:00-05:00
expires = 2026-12-01
summary = "One inbound lane closes."
why_it_matters = "Expect delays."
+++

Crews will **repave** the lane.

## Details

More text.
"""

YAML_ARTICLE = """\
---
title: Holiday concert at the Riverwalk
topic: local-events
published: 2026-11-21
guid: concert-2026
why: Free and family-friendly.
---
## Summary

The concert starts at 6 p.m.

Bring a chair.
"""


def test_markdown_with_toml_front_matter() -> None:
    article = parse(TOML_ARTICLE)
    assert article == ParsedArticle(
        guid="https://news.example.org/2026/11/main-gate",
        topic="base-alerts",
        title="Main Gate lane closure",
        summary="One inbound lane closes.",
        why_it_matters="Expect delays.",
        body="Crews will **repave** the lane.\n\n## Details\n\nMore text.",
        link="https://news.example.org/2026/11/main-gate",
        published_at=datetime(2026, 11, 19, 13, 30, tzinfo=UTC),
        expires_at=datetime(2026, 12, 1, tzinfo=UTC),
    )


def test_markdown_with_yaml_front_matter_takes_the_summary_from_the_body() -> None:
    article = parse(YAML_ARTICLE, default_topic=None)
    assert article.guid == "concert-2026"
    assert article.topic == "local-events"
    assert article.summary == "The concert starts at 6 p.m."
    assert article.why_it_matters == "Free and family-friendly."
    assert article.body == "Bring a chair."
    assert article.published_at == datetime(2026, 11, 21, tzinfo=UTC)
    assert article.date_given


def test_markdown_body_sections_supply_summary_and_why() -> None:
    article = parse(
        "+++\ntitle = 'T'\n+++\n# Why it matters:\n\nW.\n\n## summary\n\nS.\n\nBody.\n\n"
        "```\n## Summary\n```\n"
    )
    assert (article.summary, article.why_it_matters) == ("S.", "W.")
    assert article.body == "Body.\n\n```\n## Summary\n```"


def test_markdown_summary_runs_to_the_next_heading_when_why_follows() -> None:
    article = parse("---\ntitle: T\n---\n## Summary\n\nA.\n\nB.\n\n## Why this matters\n\nW.\n\nC.")
    assert (article.summary, article.why_it_matters, article.body) == ("A.\n\nB.", "W.", "C.")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("published = 2026-11-20", datetime(2026, 11, 20, tzinfo=UTC)),
        ("published = 2026-11-20T09:00:00-05:00", datetime(2026, 11, 20, 14, tzinfo=UTC)),
        ("published = 2026-11-20T09:00:00", datetime(2026, 11, 20, 9, tzinfo=UTC)),
        ('published = "2026-11-20"', datetime(2026, 11, 20, tzinfo=UTC)),
        ('published = "2026-11-20T09:00:00Z"', datetime(2026, 11, 20, 9, tzinfo=UTC)),
    ],
    ids=["date", "offset", "naive-is-utc", "date-string", "zulu-string"],
)
def test_published_dates_are_read_as_utc(line: str, expected: datetime) -> None:
    assert parse(f"+++\ntitle = 'T'\n{line}\n+++\n").published_at == expected


def test_yaml_dates_with_offsets_are_converted_to_utc() -> None:
    article = parse("---\ntitle: T\npublished: 2026-11-20T09:00:00-05:00\n---\n")
    assert article.published_at == datetime(2026, 11, 20, 14, tzinfo=UTC)


def test_guid_is_the_guid_then_the_link_then_a_hash_of_file_and_title() -> None:
    both = parse("+++\ntitle = 'T'\nguid = 'g-1'\nlink = 'https://x.example.org/1'\n+++\n")
    link = parse("+++\ntitle = 'T'\nlink = 'https://x.example.org/1'\n+++\n")
    neither = parse("+++\ntitle = 'T'\n+++\n", source="dir/t.md")
    assert both.guid == "g-1"
    assert link.guid == "https://x.example.org/1"
    assert neither.guid == parse("+++\ntitle = 't'\n+++\n", source="t.md").guid
    assert neither.guid != parse("+++\ntitle = 'T2'\n+++\n", source="t.md").guid


def test_topic_comes_from_front_matter_else_the_source_default() -> None:
    assert parse("+++\ntitle = 'T'\ntopic = 'local-events'\n+++\n").topic == "local-events"
    assert parse("+++\ntitle = 'T'\n+++\n", default_topic="military-news").topic == (
        "military-news"
    )


def test_title_is_one_line() -> None:
    assert parse('+++\ntitle = "  Two\\nlines\\t here "\n+++\n').title == "Two lines here"


# ------------------------------------------------------------------ errors

_LONG = "x" * 501

ERRORS: list[tuple[str, str, dict[str, Any], str, int | None]] = [
    ("empty", "", {}, "the file is empty", None),
    ("blank-with-bom", "\ufeff \r\n\t\n", {}, "the file is empty", None),
    (
        "only-signup-box",
        "Get Camp Lejeune & New River Updates\n\nWe don't spam! Read our privacy policy.\n",
        {},
        "only the newsletter sign-up box",
        None,
    ),
    ("heading-as-title", "\nSummary\n\nText.\n", {}, "put the article's title above it", 2),
    (
        "unknown-default-topic",
        "Title\n\nBody.",
        {"default_topic": "weather"},
        r"unknown topic 'weather' \(known: base-alerts, local-events, military-news\)",
        None,
    ),
    (
        "no-topic",
        "Title\n\nBody.",
        {"default_topic": None},
        r"no topic: name one in the front matter \(topic: KEY\), pass --topic KEY to"
        r" `mailer articles add`, or give its \[\[sources\]\] entry a topic \(known: ",
        None,
    ),
    (
        "unknown-front-matter-topic",
        "+++\ntitle = 'T'\ntopic = 'sports'\n+++\n",
        {},
        "unknown topic 'sports'",
        3,
    ),
    ("toml-unclosed", "+++\ntitle = 'T'\n", {}, "opened by '\\+\\+\\+' on line 1 is never", 1),
    ("yaml-unclosed", "---\ntitle: T\n  ---\n", {}, "never closed", 1),
    ("toml-syntax", "+++\ntitle = 'T'\ntopic = = 1\n+++\n", {}, "invalid TOML", 3),
    ("toml-syntax-at-end", "+++\ntitle = 'T'\ntopic =\n+++\n", {}, "invalid TOML", 3),
    ("yaml-syntax", "---\ntitle: T\n  bad: indent\n---\n", {}, "invalid YAML", 3),
    ("yaml-bad-date", "---\ntitle: T\npublished: 2026-13-45\n---\n", {}, "invalid YAML", 1),
    ("yaml-not-a-mapping", "---\n- a\n- b\n---\n", {}, "must be 'key: value' lines", 2),
    (
        "yaml-unsafe-tag",
        "---\ntitle: !!python/object/apply:os.system ['true']\n---\n",
        {},
        "invalid YAML",
        2,
    ),
    (
        "unknown-key",
        "+++\ntitle = 'T'\nauthor = 'Ann'\n+++\n",
        {},
        "unknown front-matter key 'author' \\(known: title, topic",
        3,
    ),
    ("missing-title", "+++\ntopic = 'base-alerts'\n+++\nBody.", {}, "no 'title'", 1),
    ("empty-front-matter", "---\n---\nBody.", {}, "no 'title'", 1),
    ("blank-title", "---\ntitle: '  '\n---\n", {}, "the title is empty", 2),
    ("title-not-text", "---\ntopic: base-alerts\ntitle: 2026\n---\n", {}, "title must be text", 3),
    (
        "date-not-a-date",
        "+++\ntitle = 'T'\npublished = 'next Tuesday'\n+++\n",
        {},
        "published must be a date like 2026-11-20",
        3,
    ),
    ("date-is-a-time", "+++\ntitle = 'T'\nexpires = 09:30:00\n+++\n", {}, "got time", 3),
    ("date-is-a-list", "---\ntitle: T\npublished: [1]\n---\n", {}, "got list", 3),
    (
        "expires-before-published",
        "+++\ntitle = 'T'\npublished = 2026-11-20\nexpires = 2026-11-19\n+++\n",
        {},
        "expires .* is not after published",
        4,
    ),
    (
        "link-not-http",
        "+++\ntitle = 'T'\nlink = 'javascript:alert(1)'\n+++\n",
        {},
        "link must be an http\\(s\\) URL",
        3,
    ),
    ("empty-guid", "+++\ntitle = 'T'\nguid = ' '\n+++\n", {}, "guid is empty", 3),
    (
        "title-too-long",
        f"+++\ntitle = '{_LONG}'\n+++\n",
        {},
        "title is 501 characters; the limit is 500",
        2,
    ),
    ("site-title-too-long", f"{_LONG}\n\nBody.", {}, "title is 501 characters", 1),
    ("guid-too-long", f"+++\ntitle = 'T'\nguid = '{_LONG}'\n+++\n", {}, "guid is 501", 3),
    (
        "summary-too-long",
        "T\n\nSummary\n\n" + "y" * 5001 + "\n\nBody.",
        {},
        "summary is 5,001 characters; the limit is 5,000",
        3,
    ),
    (
        "body-too-long",
        "+++\ntitle = 'T'\n+++\n\n" + "z" * 200_001,
        {},
        "body is 200,001 characters",
        5,
    ),
    ("file-too-long", "x" * (MAX_TEXT + 1), {}, "the limit is 1,000,000", None),
    (
        "why-and-why-it-matters",
        "+++\ntitle = 'T'\nwhy_it_matters = 'a'\nwhy = 'b'\n+++\n",
        {},
        "give 'why_it_matters' or 'why', not both",
        4,
    ),
    (
        "summary-given-twice",
        "+++\ntitle = 'T'\nsummary = 'a'\n+++\nBody.\n\n## Summary\n\nb\n",
        {},
        "summary is given twice: in the front matter \\(line 3\\)",
        7,
    ),
    (
        "two-summary-sections",
        "---\ntitle: T\n---\n## Summary\n\na\n\n## Summary\n\nb\n",
        {},
        "a second '## Summary' section \\(the first is on line 4\\)",
        8,
    ),
]


@pytest.mark.parametrize(
    ("text", "overrides", "message", "line"),
    [case[1:] for case in ERRORS],
    ids=[case[0] for case in ERRORS],
)
def test_invalid_articles_raise_article_error_with_path_and_line(
    text: str, overrides: dict[str, Any], message: str, line: int | None
) -> None:
    with pytest.raises(ArticleError, match=message) as caught:
        parse(text, **overrides)
    assert caught.value.path == "a.md"
    assert caught.value.line == line
    assert str(caught.value).startswith("a.md" if line is None else f"a.md:{line}: ")


def test_load_article_file_names_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.md"
    with pytest.raises(ArticleError, match="cannot read the file") as caught:
        load_article_file(missing, default_topic=None, known_topics=TOPICS, now=NOW)
    assert caught.value.path == str(missing)


def test_load_article_file_refuses_non_utf8_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("Title\n\nCaf\u00e9\n".encode("latin-1"))
    with pytest.raises(ArticleError, match="not UTF-8 \\(byte 0xe9\\)") as caught:
        load_article_file(path, default_topic="base-alerts", known_topics=TOPICS, now=NOW)
    assert (caught.value.path, caught.value.line) == (str(path), 3)


def test_load_article_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.md"
    path.write_text("+++\ntitle = 'T'\nauthor = 'A'\n+++\n", encoding="utf-8")
    with pytest.raises(ArticleError, match=rf"^{path}:3: unknown front-matter key"):
        load_article_file(path, default_topic="base-alerts", known_topics=TOPICS, now=NOW)


def test_load_article_file_decides_the_format_by_the_first_line(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("---\ntitle: From YAML\n---\nBody.", encoding="utf-8")
    loaded = load_article_file(path, default_topic="base-alerts", known_topics=TOPICS, now=NOW)
    assert (loaded.title, loaded.body) == ("From YAML", "Body.")
    path.write_text("Plain title\n---\nBody.", encoding="utf-8")
    loaded = load_article_file(path, default_topic="base-alerts", known_topics=TOPICS, now=NOW)
    assert (loaded.title, loaded.body) == ("Plain title", "---\nBody.")


# ------------------------------------------------------------------ property tests

_CHAR = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs"))


def _is_plain(line: str) -> bool:
    """A generated line the parsers must keep as text: no heading, no sign-up box line."""
    return (
        site_text._SITE_HEADING.match(line) is None
        and site_text._chrome_key(line) not in site_text._SIGNUP_BOX
    )


_LINE = st.text(_CHAR, min_size=1, max_size=40).map(str.strip).filter(bool).filter(_is_plain)
_PARAGRAPH = st.lists(_LINE, min_size=1, max_size=3).map("\n".join)
_PARAGRAPHS = st.lists(_PARAGRAPH, min_size=1, max_size=4).map("\n\n".join)
PROPERTY = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.filter_too_much]
)


# A first line of "+++" or "---" opens front matter, and a leading U+FEFF is a byte-order mark:
# by definition neither is the start of a site-format title.
_TITLE = _LINE.filter(lambda line: line not in ("+++", "---") and not line.startswith("\ufeff"))


@PROPERTY
@given(title=_TITLE, summary=_PARAGRAPH, why=_PARAGRAPH, body=_PARAGRAPHS, crlf=st.booleans())
def test_site_format_round_trips(title: str, summary: str, why: str, body: str, crlf: bool) -> None:
    text = (
        f"{title}\n\nSummary\n\n{summary}\n\nWhy this matters\n\n{why}\n\n{body}\n\n"
        "Get Camp Lejeune & New River Updates\n\n"
        "Essential base alerts, local events, and military news delivered to your inbox\n\n"
        "We don’t spam! Read our privacy policy for more info."
    )
    if crlf:
        text = text.replace("\n", "\r\n")
    article = parse(text)
    assert (article.title, article.summary, article.why_it_matters, article.body) == (
        " ".join(title.split()),
        summary,
        why,
        body,
    )


def _toml(value: str) -> str:
    # A JSON string without ASCII escaping is a valid TOML basic string.
    return json.dumps(value, ensure_ascii=False)


_TEXT = st.text(_CHAR, min_size=1, max_size=200).map(str.strip).filter(bool)


@PROPERTY
@given(
    style=st.sampled_from(["toml", "yaml"]),
    title=_TEXT,
    summary=_TEXT,
    why=_TEXT,
    body=_PARAGRAPHS,
    topic=st.sampled_from(TOPICS),
    published=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
)
def test_front_matter_round_trips(
    style: str, title: str, summary: str, why: str, body: str, topic: str, published: datetime
) -> None:
    published = published.replace(microsecond=0)
    if style == "toml":
        head = "\n".join(
            [
                "+++",
                f"title = {_toml(title)}",
                f"topic = {_toml(topic)}",
                f"published = {published.isoformat()}",
                f"summary = {_toml(summary)}",
                f"why_it_matters = {_toml(why)}",
                "+++",
            ]
        )
    else:
        fields = {
            "title": title,
            "topic": topic,
            "published": published,
            "summary": summary,
            "why_it_matters": why,
        }
        head = "---\n" + yaml.safe_dump(fields, allow_unicode=True, sort_keys=False) + "---"
    article = parse(f"{head}\n{body}\n", default_topic=None)
    assert article.title == " ".join(title.split())
    assert (article.topic, article.summary, article.why_it_matters) == (topic, summary, why)
    assert article.body == body
    assert article.published_at == published


_FRAGMENTS = st.sampled_from(
    [
        "+++\n",
        "---\n",
        "\n",
        "\r\n",
        "\ufeff",
        "\x00",
        "title = 'x'\n",
        "title: x\n",
        'title = """\n',
        "topic: base-alerts\n",
        "topic = 'nope'\n",
        "published = 2026-11-20\n",
        "published: 2026-13-45\n",
        "expires: 1999-01-01\n",
        "link = 'javascript:x'\n",
        "guid: [1, 2]\n",
        "why: a\nwhy_it_matters: b\n",
        "Summary\n",
        "## Summary\n",
        "Why this matters:\n",
        "```\n",
        "    indented\n",
        "Get Camp Lejeune & New River Updates\n",
        "We don't spam! Read our privacy policy for more info.\n",
        "&anchor [",
        "{",
        "*alias ",
        "!!binary ",
        "9999-12-31T23:59:59-05:00",
    ]
)


@PROPERTY
@given(
    text=st.one_of(
        st.text(max_size=300),
        st.lists(st.one_of(_FRAGMENTS, st.text(max_size=8)), max_size=25).map("".join),
    ),
    default_topic=st.sampled_from([None, "base-alerts", "astrology"]),
)
def test_any_text_parses_or_raises_article_error(text: str, default_topic: str | None) -> None:
    try:
        article = parse(text, default_topic=default_topic)
    except ArticleError as exc:
        assert exc.path == "a.md"
        return
    assert article.title and "\n" not in article.title
    assert article.topic in TOPICS
    for field in (article.title, article.summary, article.why_it_matters, article.body):
        assert not any(ch in field for ch in "\x00\r\x1b")


# ------------------------------------------------------------------ examples


def test_every_example_file_is_an_article() -> None:
    week_end = datetime(2026, 11, 25, tzinfo=UTC)
    loaded = [
        load_article_file(path, default_topic="military-news", known_topics=TOPICS, now=week_end)
        for path in sorted((EXAMPLES / "articles").iterdir())
    ]
    by_topic = {topic: [a for a in loaded if a.topic == topic] for topic in TOPICS}
    assert len(by_topic["base-alerts"]) >= 2
    assert len(by_topic["local-events"]) >= 2
    assert len(by_topic["military-news"]) >= 2  # the seed and one more
    assert len({a.guid for a in loaded}) == len(loaded)
    for article in loaded:
        assert article.summary and article.why_it_matters and article.body
        if article.date_given:
            assert week_end - timedelta(days=7) <= article.published_at < week_end


def test_example_subscribers_import_cleanly(engine: sa.Engine) -> None:
    with (EXAMPLES / "subscribers.csv").open(encoding="utf-8", newline="") as stream:
        digests = make_settings(digests=[config_dict()["digests"][0], ALERTS]).digests
        report = csvfile.import_csv(engine, stream, known_topics=TOPICS, digests=digests, now=NOW)
    assert report.errors == []
    assert report.added >= 10
    counts = store.counts_by_status(engine)
    assert counts.get("unsubscribed") == 1 and counts.get("pending") == 1


def test_example_articles_store_and_fill_a_window(engine: sa.Engine) -> None:
    now = datetime(2026, 11, 25, tzinfo=UTC)
    loaded = [
        load_article_file(path, default_topic="military-news", known_topics=TOPICS, now=now)
        for path in sorted((EXAMPLES / "articles").iterdir())
    ]
    assert upsert_articles(engine, loaded, now=now).added == len(loaded)
    chosen = _select(engine, now=now, lookback=timedelta(days=3650))
    assert {a.guid for a in chosen} == {a.guid for a in loaded}
    assert chosen[0].title == "Putin visits India for talks on defense, trade ties"
    assert "’" in chosen[0].body  # UTF-8 text survives both databases


# ------------------------------------------------------------------ store


def _stored(engine: sa.Engine, guid: str) -> sa.Row[Any]:
    with engine.connect() as conn:
        return conn.execute(sa.select(articles_table).where(articles_table.c.guid == guid)).one()


def test_upsert_adds_then_reports_unchanged(engine: sa.Engine) -> None:
    items = [make_article(), make_article()]
    first = upsert_articles(engine, items, now=NOW)
    again = upsert_articles(engine, items, now=NOW + timedelta(hours=1))
    assert (first.added, first.updated, first.unchanged) == (2, 0, 0)
    assert (again.added, again.updated, again.unchanged) == (0, 0, 2)
    assert _stored(engine, items[0].guid).updated_at == NOW


def test_keep_topic_keeps_the_first_topic_and_still_updates_the_content(
    engine: sa.Engine,
) -> None:
    item = make_article(topic="base-alerts", summary="Old.")
    upsert_articles(engine, [item], now=NOW)
    moved = replace(item, topic="local-events")
    kept = upsert_articles(engine, [moved], now=NOW, keep_topic=True)
    assert (kept.added, kept.updated, kept.unchanged) == (0, 0, 1)
    edited = replace(moved, summary="New.")
    report = upsert_articles(engine, [edited], now=NOW, keep_topic=True)
    assert (report.updated, _stored(engine, item.guid).topic) == (1, "base-alerts")
    assert _stored(engine, item.guid).summary == "New."
    upsert_articles(engine, [moved], now=NOW)
    assert _stored(engine, item.guid).topic == "local-events"


def test_upsert_updates_changed_content_keeping_id_and_created_at(engine: sa.Engine) -> None:
    item = make_article(summary="Old.")
    upsert_articles(engine, [item], now=NOW)
    before = _stored(engine, item.guid)
    later = NOW + timedelta(hours=2)
    changed = replace(item, summary="New.", published_at=item.published_at + timedelta(hours=1))
    report = upsert_articles(engine, [changed], now=later)
    after = _stored(engine, item.guid)
    assert (report.added, report.updated, report.unchanged) == (0, 1, 0)
    assert (after.id, after.created_at) == (before.id, before.created_at)
    assert (after.summary, after.updated_at) == ("New.", later)
    assert after.published_at == changed.published_at
    assert after.content_hash == changed.content_hash != before.content_hash


def test_re_adding_an_undated_file_keeps_its_first_date(engine: sa.Engine) -> None:
    text = SEED.read_text(encoding="utf-8")
    first = parse(text, source=SEED.name)
    later = NOW + timedelta(days=2)
    upsert_articles(engine, [first], now=NOW)
    report = upsert_articles(engine, [parse(text, source=SEED.name, now=later)], now=later)
    assert report.unchanged == 1
    edited = parse(text.replace("two-day visit", "2-day visit"), source=SEED.name, now=later)
    assert upsert_articles(engine, [edited], now=later).updated == 1
    stored = _stored(engine, first.guid)
    assert stored.published_at == NOW and "2-day visit" in stored.body


def test_upsert_dedupes_a_guid_given_twice_keeping_the_last(engine: sa.Engine) -> None:
    item = make_article(title="First")
    report = upsert_articles(engine, [item, replace(item, title="Second")], now=NOW)
    assert (report.added, report.updated, report.unchanged) == (1, 0, 0)
    assert _stored(engine, item.guid).title == "Second"


def test_upsert_works_across_chunks(engine: sa.Engine) -> None:
    items = [make_article() for _ in range(UPSERT_CHUNK * 2 + 7)]
    assert upsert_articles(engine, items, now=NOW).added == len(items)
    mixed = [replace(item, body="Changed.") for item in items[::2]] + items[1::2]
    report = upsert_articles(engine, mixed, now=NOW)
    assert (report.added, report.updated, report.unchanged) == (
        0,
        len(items[::2]),
        len(items[1::2]),
    )


def test_upsert_refuses_an_oversized_field_naming_the_article(engine: sa.Engine) -> None:
    with pytest.raises(ArticleError, match="guid is 501 characters"):
        upsert_articles(engine, [make_article(guid="g" * 501)], now=NOW)


def test_list_articles_is_newest_first_and_filters_by_topic(engine: sa.Engine) -> None:
    items = [
        make_article(topic=topic, published_at=NOW - timedelta(hours=hours))
        for topic, hours in [("base-alerts", 3), ("local-events", 1), ("base-alerts", 2)]
    ]
    upsert_articles(engine, items, now=NOW)
    assert [a.guid for a in list_articles(engine)] == [items[1].guid, items[2].guid, items[0].guid]
    assert [a.guid for a in list_articles(engine, topic="base-alerts", limit=1)] == [items[2].guid]


# ------------------------------------------------------------------ the selection query

START = NOW - timedelta(days=7)


def _select(engine: sa.Engine | sa.Connection, **overrides: Any) -> list[Article]:
    values: dict[str, Any] = {
        "digest_key": "weekly",
        "topics": TOPICS,
        "lookback": timedelta(days=7),
        "limit": 20,
        "now": NOW,
    }
    values.update(overrides)
    if isinstance(engine, sa.Connection):
        return select_for_issue(engine, **values).articles
    with engine.connect() as conn:
        return select_for_issue(conn, **values).articles


def _window(engine: sa.Engine | sa.Connection, **overrides: Any) -> list[str]:
    return [a.title for a in _select(engine, **overrides)]


def test_lookback_excludes_its_start_and_future_dates(engine: sa.Engine) -> None:
    second = timedelta(seconds=1)
    upsert_articles(
        engine,
        [
            make_article(title="at-start", published_at=START),
            make_article(title="after-start", published_at=START + second),
            make_article(title="at-end", published_at=NOW),
            make_article(title="after-end", published_at=NOW + second),
        ],
        now=NOW,
    )
    assert _window(engine) == ["at-end", "after-start"]
    assert _window(engine, lookback=timedelta(days=8)) == ["at-end", "after-start", "at-start"]


def test_window_drops_articles_expired_at_now(engine: sa.Engine) -> None:
    upsert_articles(
        engine,
        [
            make_article(title="no-expiry", published_at=NOW - timedelta(hours=1)),
            make_article(
                title="expires-now", expires_at=NOW, published_at=NOW - timedelta(hours=2)
            ),
            make_article(
                title="expires-later",
                expires_at=NOW + timedelta(seconds=1),
                published_at=NOW - timedelta(hours=3),
            ),
            make_article(
                title="expired",
                expires_at=NOW - timedelta(hours=1),
                published_at=NOW - timedelta(hours=4),
            ),
        ],
        now=NOW,
    )
    assert _window(engine) == ["no-expiry", "expires-later"]
    assert "expired" in [a.title for a in list_articles(engine)]


def test_selection_is_capped_to_the_oldest_arrivals_shown_newest_first(
    engine: sa.Engine,
) -> None:
    # Stored one a minute, the oldest publication first: arrival, not date, decides what goes.
    for h in range(5, -1, -1):
        item = make_article(title=f"h{h}", published_at=NOW - timedelta(hours=h))
        upsert_articles(engine, [item], now=NOW - timedelta(minutes=h))
    assert _window(engine, limit=3) == ["h3", "h4", "h5"]
    assert [a.title for a in _select(engine, limit=2)] == ["h4", "h5"]
    with engine.connect() as conn:
        selection = select_for_issue(
            conn, digest_key="d", topics=TOPICS, lookback=timedelta(days=7), limit=4, now=NOW
        )
    assert selection.left_over == 2
    assert _window(engine, limit=0) == []


def test_window_keeps_only_the_digest_topics(engine: sa.Engine) -> None:
    upsert_articles(
        engine,
        [
            make_article(title="alert", topic="base-alerts"),
            make_article(title="event", topic="local-events"),
            make_article(title="news", topic="military-news"),
        ],
        now=NOW,
    )
    assert sorted(_window(engine, topics=["local-events", "military-news"])) == ["event", "news"]
    assert _window(engine, topics=[]) == []


def test_window_reads_inside_a_callers_transaction(engine: sa.Engine) -> None:
    item = make_article(title="inside")
    with engine.begin() as conn:
        conn.execute(
            articles_table.insert().values(
                guid=item.guid,
                topic=item.topic,
                title=item.title,
                published_at=item.published_at,
                content_hash=item.content_hash,
                created_at=NOW,
                updated_at=NOW,
            )
        )
        assert _window(conn) == ["inside"]


def test_parsed_articles_are_returned_as_model_articles(engine: sa.Engine) -> None:
    upsert_articles(engine, [parse(TOML_ARTICLE)], now=NOW)
    (stored,) = _select(engine, lookback=timedelta(days=3650))
    assert stored.link == "https://news.example.org/2026/11/main-gate"
    assert stored.published_at == datetime(2026, 11, 19, 13, 30, tzinfo=UTC)
    assert stored.expires_at == datetime(2026, 12, 1, tzinfo=UTC)
    assert stored.published_at.tzinfo is not None
