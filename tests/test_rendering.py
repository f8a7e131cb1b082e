"""Rendering: the sandbox, strict undefined names, escaping, CSS inlining and the digest layout."""

from __future__ import annotations

import shutil
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from mailer.compose.messages import DigestComposer, render_digest
from mailer.compose.rendering import (
    TEMPLATE_DIR,
    LinkView,
    Renderer,
    digest_templates,
    isolate_links,
    leads,
    safe_link,
    sections,
)
from mailer.errors import RenderError, TemplateError
from mailer.models import Article, IssueContent
from mailer.sandbox import SUBJECT_LIMIT, paragraphs
from tests.factories import ALERTS, BASE_CONFIG, NOW, make_settings

SETTINGS = make_settings()
RENDERER = Renderer()
LINKS = LinkView(
    unsubscribe="https://news.example.org/unsubscribe/TOKEN-U",
    preferences="https://news.example.org/preferences/TOKEN-P",
    privacy="https://news.example.org/privacy",
    archive="https://news.example.org/archive/7",
    home="https://news.example.org/",
    personal=True,
)
HOSTILE_TITLE = '<script>alert(1)</script> "><img src=x onerror=alert(1)> {{ 7*7 }}\r\nBcc: x'


def article(n: int = 1, **overrides: Any) -> Article:
    values: dict[str, Any] = {
        "id": n,
        "guid": f"guid-{n}",
        "topic": "base-alerts",
        "title": f"Gate {n} closed for resurfacing",
        "summary": "The main gate closes Saturday.\n\nUse the Sneads Ferry gate instead.",
        "why_it_matters": "Expect longer lines on the way in.",
        "body": "",
        "link": f"https://news.example.org/articles/{n}",
        "published_at": NOW,
    }
    values.update(overrides)
    return Article(**values)


def issue(*articles: Article) -> IssueContent:
    return IssueContent(
        issue_id=7,
        digest_key="weekly",
        digest_name="Weekly digest",
        subject="Camp Lejeune & New River Updates — week of 20 November",
        date=NOW,
        articles=articles,
    )


def render(*articles: Article, links: LinkView = LINKS) -> tuple[str, str]:
    topics = tuple({a.topic for a in articles})
    return render_digest(SETTINGS, issue(*articles), topics, links, RENDERER)


def template_dir(tmp_path: Path, **files: str) -> Path:
    """A copy of the project's templates with some email/ files replaced."""
    target = tmp_path / "templates"
    shutil.copytree(TEMPLATE_DIR, target)
    for name, text in files.items():
        (target / "email" / name.replace("__", ".")).write_text(text, encoding="utf-8")
    return target


class Tags(HTMLParser):
    """Every start tag and its attributes, and the visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def flat(text: str) -> str:
    """``text`` with wrapping undone: every whitespace run one space."""
    return " ".join(text.split())


def tags(html: str) -> Tags:
    parser = Tags()
    parser.feed(html)
    return parser


# --- subject ----------------------------------------------------------------------------------


def test_subject_renders_digest_and_date() -> None:
    subject = RENDERER.render_subject(SETTINGS.digest("weekly"), NOW)
    assert subject == "Camp Lejeune & New River Updates — week of 20 November"


def test_subject_is_one_line_whatever_the_template_emits() -> None:
    digest = SETTINGS.digest("weekly")
    staff = type(digest)(**{**digest.__dict__, "subject": "{{ digest.name }}\r\nBcc: x\n\t{{ 1 }}"})
    assert RENDERER.render_subject(staff, NOW) == "Weekly digest Bcc: x 1"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ nope }}", "'nope' is undefined"),
        ("{{ ''.__class__.__mro__ }}", "unsafe"),
        ("{{ date.strftime( }}", "syntax error"),
        ("   ", "empty subject"),
        ("RE: {{ digest.name }}", "reply or forward"),
        ("Fwd:{{ digest.name }}", "reply or forward"),
    ],
    ids=["undefined", "sandbox", "syntax", "empty", "fake-reply", "fake-forward"],
)
def test_subject_failures_are_template_errors(source: str, expected: str) -> None:
    digest = SETTINGS.digest("weekly")
    staff = type(digest)(**{**digest.__dict__, "subject": source})
    with pytest.raises(TemplateError, match=expected) as caught:
        RENDERER.render_subject(staff, NOW)
    assert "'weekly' subject" in str(caught.value)


# --- the environment --------------------------------------------------------------------------


def test_sandbox_refuses_unsafe_attributes(tmp_path: Path) -> None:
    renderer = Renderer(template_dir(tmp_path, x__html="ok\n{{ ''.__class__.__mro__ }}\n"))
    with pytest.raises(TemplateError, match="unsafe") as caught:
        renderer.render("email/x.html", {})
    assert isinstance(caught.value, RenderError)
    assert (caught.value.template, caught.value.line) == ("email/x.html", 2)


def test_undefined_variable_is_named_with_its_line(tmp_path: Path) -> None:
    renderer = Renderer(template_dir(tmp_path, x__txt="one\ntwo\n{{ site.nmae }}\n"))
    with pytest.raises(RenderError, match="nmae") as caught:
        renderer.render("email/x.txt", {"site": {"name": "N"}})
    assert caught.value.line == 3
    assert "email/x.txt, line 3" in str(caught.value)


def test_error_in_an_included_template_names_that_template(tmp_path: Path) -> None:
    renderer = Renderer(
        template_dir(tmp_path, x__txt='{% include "email/y.txt" %}\n', y__txt="\n{{ 1 / 0 }}\n")
    )
    with pytest.raises(RenderError, match="ZeroDivisionError") as caught:
        renderer.render("email/x.txt", {})
    assert (caught.value.template, caught.value.line) == ("email/y.txt", 2)


def test_syntax_error_names_template_and_line(tmp_path: Path) -> None:
    renderer = Renderer(template_dir(tmp_path, x__html="<p>\n{% for %}\n"))
    with pytest.raises(RenderError, match="syntax error") as caught:
        renderer.render("email/x.html", {})
    assert (caught.value.template, caught.value.line) == ("email/x.html", 2)


def test_missing_template_is_a_template_error(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="not found"):
        Renderer(tmp_path).render("email/nope.html", {})


def test_html_is_autoescaped_and_text_is_not(tmp_path: Path) -> None:
    renderer = Renderer(template_dir(tmp_path, x__html="<p>{{ v }}</p>", x__txt="{{ v }}"))
    assert renderer.render("email/x.html", {"v": "<b>&"}) == "<p>&lt;b&gt;&amp;</p>"
    assert renderer.render("email/x.txt", {"v": "<b>&"}) == "<b>&"


def test_css_is_inlined_and_media_queries_are_kept() -> None:
    html, _text = render(article())
    assert 'class="masthead"' in html
    masthead = next(attrs for tag, attrs in tags(html).tags if attrs.get("class") == "masthead")
    assert "background-color: #17324d" in (masthead.get("style") or "")
    assert "@media only screen and (max-width: 620px)" in html


def test_isolate_links_puts_each_href_on_its_own_line() -> None:
    html = '<p>a href="x" b</p><a class="c" href="https://e.org/?a=1&amp;b" style="s">t</a>'
    assert isolate_links(html) == (
        '<p>a href="x" b</p><a class="c"\nhref="https://e.org/?a=1&amp;b"\nstyle="s">t</a>'
    )
    assert isolate_links('<a href="u">') == '<a\nhref="u"\n>'


# --- view helpers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://e.org/a?b=1", "https://e.org/a?b=1"),
        ("http://e.org/a", "https://e.org/a"),
        ("javascript:alert(1)", None),
        ("data:text/html,x", None),
        ("https://e.org/a b", None),
        ("//e.org/a", None),
        ("", None),
        (None, None),
    ],
    ids=["https", "http-upgraded", "javascript", "data", "space", "relative", "empty", "none"],
)
def test_safe_link(url: str | None, expected: str | None) -> None:
    assert safe_link(url) == expected


def test_paragraphs_split_on_blank_lines_and_join_the_rest() -> None:
    assert paragraphs("a\nb\r\n\r\n  c  \n \n\n") == ["a b", "c"]


def test_sections_follow_the_configured_topic_order() -> None:
    articles = [
        article(1, topic="military-news"),
        article(2, topic="base-alerts"),
        article(3, topic="retired-topic"),
        article(4, topic="military-news"),
    ]
    result = sections(SETTINGS, articles)
    assert [(s.key, s.name) for s in result] == [
        ("base-alerts", "Base alerts"),
        ("military-news", "Military news"),
        ("retired-topic", "retired-topic"),
    ]
    assert [a.title for a in result[1].articles] == [
        "Gate 1 closed for resurfacing",
        "Gate 4 closed for resurfacing",
    ]


# --- the digest -------------------------------------------------------------------------------


def test_digest_shows_every_article_field_in_both_parts() -> None:
    html, text = render(article(1), article(2, topic="local-events", link=None))
    visible = flat(" ".join(tags(html).text))
    for part in (visible, flat(text)):
        assert "Camp Lejeune & New River Updates" in part
        assert "Essential base alerts, local events" in part
        assert "Gate 1 closed for resurfacing" in part
        assert "The main gate closes Saturday." in part
        assert "Why this matters" in part
        assert "Expect longer lines on the way in." in part
    assert visible.index("Base alerts") < visible.index("Local events")
    hrefs = [attrs["href"] for tag, attrs in tags(html).tags if tag == "a"]
    assert hrefs.count("https://news.example.org/articles/1") == 2  # title and "Read more"
    assert "https://news.example.org/articles/2" not in html + text
    assert "Read more:\nhttps://news.example.org/articles/1\n" in text


def test_an_article_without_a_summary_is_shown_by_its_body_in_both_parts() -> None:
    alone = article(1, summary="", body="Gate 3 closed for repairs until 18:00.\n\nUse Gate 5.")
    linked = article(
        2, summary="", link="https://news.example.org/a/2", body="First part.\n\nSecond part."
    )
    html, text = render(replace(alone, link=None), linked)
    visible = flat(" ".join(tags(html).text))
    for part in (visible, flat(text)):
        # No link to read it at: all of it; with a link: its first paragraph, then Read more.
        assert "Gate 3 closed for repairs until 18:00." in part and "Use Gate 5." in part
        assert "First part." in part and "Second part." not in part


def test_footer_has_every_compliance_item_in_both_parts() -> None:
    html, text = render(article())
    visible = flat(" ".join(tags(html).text))
    hrefs = {attrs["href"] for tag, attrs in tags(html).tags if tag == "a"}
    assert {LINKS.unsubscribe, LINKS.preferences, LINKS.privacy, LINKS.archive} <= hrefs
    for url in (LINKS.unsubscribe, LINKS.preferences, LINKS.privacy, LINKS.archive):
        assert f"\n{url}\n" in text  # alone on its line
    for part in (visible, flat(text)):
        assert "You are receiving this because you subscribed to" in part
        assert "https://news.example.org" in part
        assert "Published by Example Media." in part
        assert "Not an official U.S. Marine Corps or Department of Defense" in part
        assert "100 Main Street, Jacksonville, NC 28540, USA" in part


def test_html_has_no_active_content_and_only_https_links() -> None:
    hostile = article(title=HOSTILE_TITLE, summary=HOSTILE_TITLE, why_it_matters=HOSTILE_TITLE)
    html, text = render(hostile, article(2, link="javascript:alert(1)"))
    parsed = tags(html)
    names = {tag for tag, _attrs in parsed.tags}
    assert not names & {"script", "form", "iframe", "object", "embed", "input", "img"}
    for _tag, attrs in parsed.tags:
        assert not [name for name in attrs if name.startswith("on")]
        assert "display: none" not in (attrs.get("style") or "")
        if "href" in attrs:
            assert (attrs["href"] or "").startswith("https://")
    assert "&lt;script&gt;" in html
    assert "{{ 7*7 }}" in html and "49" not in html
    assert "<script>alert(1)</script>" in text  # plain text: shown, not run
    assert "{{ 7*7 }} Bcc: x" in flat(text)  # the title's CR/LF became a space
    assert "\r" not in text
    assert "javascript:" not in html + text


def test_template_without_the_unsubscribe_link_is_refused(tmp_path: Path) -> None:
    source = (TEMPLATE_DIR / "email" / "digest.txt").read_text(encoding="utf-8")
    broken = template_dir(tmp_path, digest__txt=source.replace("{{ links.unsubscribe }}", ""))
    with pytest.raises(TemplateError, match=r"email/digest\.txt: must contain"):
        render_digest(SETTINGS, issue(article()), ("base-alerts",), LINKS, Renderer(broken))


def test_preview_web_copy_has_no_personal_links() -> None:
    html, text = DigestComposer(SETTINGS, issue(article()), renderer=RENDERER).preview(
        ["base-alerts"]
    )
    for part in (html, text):
        assert "/unsubscribe/" not in part and "/preferences/" not in part
        assert "web copy" in part
        assert "https://news.example.org/privacy" in part
        assert "100 Main Street" in part


def test_preview_sample_shows_subscriber_style_links() -> None:
    html, text = DigestComposer(SETTINGS, issue(article()), renderer=RENDERER).preview(
        ["base-alerts"], sample=True
    )
    for part in (html, text):
        assert "https://news.example.org/unsubscribe/sample-subscriber-0000." in part


def test_empty_digest_says_so() -> None:
    html, text = DigestComposer(SETTINGS, issue(article()), renderer=RENDERER).preview(
        ["local-events"]
    )
    assert "No new articles" in html and "No new articles" in text


def test_issue_date_is_written_out_in_full() -> None:
    html, text = render(article())
    assert "Friday, 20 November 2026" in html and "Friday, 20 November 2026" in text


# --- subjects from content, the lead, contents, note, logo, alerts ---------------------------

CONTENT_SUBJECT = "{{ lead.title }}{% if more %}, and {{ more }} more{% endif %}"


def staff_subject(source: str) -> Any:
    digest = SETTINGS.digest("weekly")
    return type(digest)(**{**digest.__dict__, "subject": source})


def test_subject_names_the_lead_and_counts_the_rest() -> None:
    digest = staff_subject(CONTENT_SUBJECT + " [{{ lead.topic }}, {{ count }}]")
    one = leads(SETTINGS, [article(1)])
    three = leads(SETTINGS, [article(1), article(2, topic="local-events"), article(3)])
    assert (
        RENDERER.render_subject(digest, NOW, one)
        == "Gate 1 closed for resurfacing [Base alerts, 1]"
    )
    assert (
        RENDERER.render_subject(digest, NOW, three)
        == "Gate 1 closed for resurfacing, and 2 more [Base alerts, 3]"
    )


def test_a_long_subject_is_cut_at_a_word_boundary() -> None:
    title = "Gate closures " + "and detours around the air station " * 8
    subject = RENDERER.render_subject(
        staff_subject(CONTENT_SUBJECT), NOW, leads(SETTINGS, [article(1, title=title), article(2)])
    )
    assert len(subject) <= SUBJECT_LIMIT and subject.endswith("…")
    assert title.startswith(subject.removesuffix("…")) and title[len(subject) - 1] == " "


def test_an_empty_issue_has_a_subject_even_when_the_template_names_the_lead() -> None:
    empty = RENDERER.render_subject(staff_subject(CONTENT_SUBJECT), NOW, ())
    assert empty == "Weekly digest, Friday, 20 November 2026: no new articles"
    # A subject that does without a lead is rendered as ever.
    assert RENDERER.render_subject(staff_subject("{{ digest.name }} ({{ count }})"), NOW, ()) == (
        "Weekly digest (0)"
    )


def test_the_lead_opens_the_digest_and_is_not_repeated_below() -> None:
    lead = article(1, summary="First part.\n\nSecond part of the lead.", link=None)
    html, text = render(lead, article(2, topic="local-events"))
    visible = flat(" ".join(tags(html).text))
    for part in (visible, flat(text)):
        assert part.count("Gate 1 closed for resurfacing") == 2  # the preview line and the lead
        assert "Second part of the lead." in part  # the whole summary
        assert part.index("Gate 1 closed") < part.index("Gate 2 closed")
    assert text.startswith("Gate 1 closed for resurfacing — First part.\n")


def test_in_this_issue_from_two_sections_or_four_articles() -> None:
    def has_contents(*articles: Article) -> bool:
        html, text = render(*articles)
        assert ("In this issue" in html) == ("IN THIS ISSUE" in text)
        return "In this issue" in html

    assert not has_contents(article(1), article(2), article(3))
    assert has_contents(article(1), article(2), article(3), article(4))
    assert has_contents(article(1), article(2, topic="local-events"))
    # Each link names a heading below by its id; every other link is https.
    html, _text = render(
        article(1), article(2, topic="local-events"), article(3, topic="military-news")
    )
    parsed = tags(html)
    ids = {attrs["id"] for _tag, attrs in parsed.tags if attrs.get("id")}
    fragments = [
        a["href"] for t, a in parsed.tags if t == "a" and (a["href"] or "").startswith("#")
    ]
    assert fragments == ["#topic-local-events", "#topic-military-news"]
    assert {f[1:] for f in fragments} <= ids


def test_the_note_is_plain_text_in_paragraphs_in_both_parts() -> None:
    content = replace(
        issue(article(1)),
        note="Hello <b>readers</b> & friends.\n\nSecond {{ 7*7 }}.",
        note_by="ana",
    )
    html, text = render_digest(SETTINGS, content, ("base-alerts",), LINKS, RENDERER)
    assert "Hello &lt;b&gt;readers&lt;/b&gt; &amp; friends." in html and "<b>readers" not in html
    assert "Second {{ 7*7 }}." in html and "49" not in html
    assert "FROM THE EDITOR\n\nHello <b>readers</b> & friends.\n\nSecond {{ 7*7 }}.\n" in text
    assert "ana" not in text  # who wrote it is for staff (issues show), not for readers
    plain, plain_text = render(article(1))
    assert "From the editor" not in plain and "FROM THE EDITOR" not in plain_text


def test_the_logo_is_in_the_masthead_with_its_size_and_alt_text() -> None:
    site = {"logo_url": "https://news.example.org/logo.png", "logo_width": 240, "logo_height": 60}
    settings = make_settings(**{f"site__{k}": v for k, v in site.items()})
    html, _text = render_digest(settings, issue(article(1)), ("base-alerts",), LINKS, RENDERER)
    images = [attrs for tag, attrs in tags(html).tags if tag == "img"]
    assert len(images) == 1
    logo = images[0]
    assert (logo["src"], logo["width"], logo["height"]) == (site["logo_url"], "240", "60")
    assert logo["alt"] == "Camp Lejeune & New River Updates"
    assert "max-width: 100%" in (logo["style"] or "")
    assert 'class="brand"' not in html  # the logo stands for the name


def test_an_alert_digest_renders_as_an_alert() -> None:
    settings = make_settings(digests=[BASE_CONFIG["digests"][0], ALERTS])
    content = replace(issue(article(1), article(2)), digest_key="alerts", digest_name="Base alerts")
    assert settings.digest("alerts").template == "alert"
    html, text = render_digest(settings, content, ("base-alerts",), LINKS, RENDERER)
    assert 'class="alert-banner"' in html and "07:00" not in html  # NOW is 12:00 UTC
    assert "12:00 UTC" in html and "BASE ALERTS · 12:00 UTC" in text
    for part in (html, text):
        assert "In this issue" not in part and "IN THIS ISSUE" not in part
        assert part.index("Gate 1 closed") < part.index("Gate 2 closed")
    assert "section-title" not in html
    assert LINKS.unsubscribe in html and LINKS.unsubscribe in text  # the same footer


def test_an_article_title_that_reads_like_a_reply_does_not_make_the_subject_one() -> None:
    replying = leads(SETTINGS, [article(1, title="RE: the budget talks")])
    subject = RENDERER.render_subject(staff_subject(CONTENT_SUBJECT), NOW, replying)
    assert subject == "Weekly digest: RE: the budget talks"
    # The template's own text still may not (the config check refuses it at load).
    with pytest.raises(TemplateError, match="reply or forward"):
        RENDERER.render_subject(staff_subject("Fwd: {{ lead.title }}"), NOW, replying)


def test_warm_compiles_the_digest_templates_before_the_first_render(tmp_path: Path) -> None:
    renderer = Renderer(template_dir(tmp_path))
    weekly = BASE_CONFIG["digests"][0]
    names = digest_templates(make_settings(digests=[weekly, {**weekly, "key": "again"}, ALERTS]))
    # Each template once, whatever the number of digests that use it.
    assert names == ["email/digest.html", "email/digest.txt", "email/alert.html", "email/alert.txt"]
    assert renderer.env.cache is not None
    assert not renderer.env.cache
    renderer.warm(names)
    compiled = {key[1] for key in list(renderer.env.cache)}
    assert set(names) <= compiled  # in Jinja's cache, compiled: the first render finds them


def test_warm_leaves_a_broken_template_for_its_render_to_report(tmp_path: Path) -> None:
    renderer = Renderer(template_dir(tmp_path, x__html="<p>\n{% for %}\n"))
    renderer.warm(["email/x.html", "email/digest.html"])
    with pytest.raises(RenderError, match="syntax error") as caught:
        renderer.render("email/x.html", {})
    assert (caught.value.template, caught.value.line) == ("email/x.html", 2)
