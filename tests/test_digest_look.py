"""The digest as a reader sees it, in a real headless Chromium at phone and mail-column width.

A realistic issue (the sample articles shipped in ``mailer/devtools/examples``) is composed by
the real ``DigestComposer`` for one reader, and the HTML part of those bytes, as a mail client
gets it, is opened in Chromium at 390 and 600 px: a weekly digest with an editor's note and a
logo, and an alert. Screenshots go to ``shots`` (``$MAILER_SCREENSHOTS`` keeps them).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import replace
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

import pytest

from mailer.compose.messages import DigestComposer
from mailer.compose.rendering import Renderer
from mailer.config.settings import Settings
from mailer.content.files import load_article_file
from mailer.devtools.demo import EXAMPLES
from mailer.models import Article, IssueContent, Recipient
from tests.browser import MAIL_COLUMN, PHONE, fits, page_at
from tests.factories import ALERTS, BASE_CONFIG, NOW, TOPICS, make_settings

pytestmark = pytest.mark.browser

LOGO_URL = "https://news.example.org/static/logo.png"
NOTE = (
    "Welcome to the new look of the digest.\n\n"
    "Tell us what works for you: <b>reply</b> & we read every answer."
)
READER = Recipient(
    "reader@example.org", "Ann Reader", "LookReader000000000001", "<1.look@news.example.org>"
)


def example_articles() -> tuple[Article, ...]:
    """The shipped sample articles, newest first (the order an issue holds them in)."""
    folder = EXAMPLES / "articles"
    parsed = [
        load_article_file(path, default_topic="military-news", known_topics=TOPICS, now=NOW)
        for path in sorted(folder.iterdir())
        if path.is_file() and not path.name.startswith("000-")  # a long wire story, not local
    ]
    parsed.sort(key=lambda a: a.published_at, reverse=True)
    return tuple(
        Article(
            id=n,
            guid=a.guid,
            topic=a.topic,
            title=a.title,
            summary=a.summary,
            why_it_matters=a.why_it_matters,
            body=a.body,
            link=a.link,
            published_at=a.published_at,
        )
        for n, a in enumerate(parsed, start=1)
    )


def weekly_settings() -> Settings:
    return make_settings(
        site__logo_url=LOGO_URL,
        site__logo_alt="Camp Lejeune & New River Updates",
        site__logo_width=240,
        site__logo_height=60,
        digests=[
            {
                **BASE_CONFIG["digests"][0],
                "subject": "{{ lead.title }}{% if more %}, and {{ more }} more{% endif %}",
            },
            {**ALERTS, "subject": "Base alert: {{ lead.title }}"},
        ],
    )


def reader_html(settings: Settings, content: IssueContent) -> tuple[EmailMessage, str]:
    """The message the reader gets (the fast path's bytes) and its HTML part."""
    composer = DigestComposer(settings, content, renderer=Renderer())
    raw = composer.message(READER, TOPICS, NOW)
    assert raw is not None
    msg = cast(EmailMessage, message_from_bytes(raw, policy=policy.default))
    html = msg.get_body(("html",))
    assert html is not None
    return msg, html.get_content()


def weekly_issue(settings: Settings) -> IssueContent:
    articles = example_articles()
    digest = settings.digest("weekly")
    subject = Renderer().render_subject(digest, NOW, tuple(_leads(settings, articles)))
    return IssueContent(
        issue_id=7,
        digest_key="weekly",
        digest_name=digest.name,
        subject=subject,
        date=NOW,
        articles=articles,
        note=NOTE,
        note_by="ana",
    )


def _leads(settings: Settings, articles: tuple[Article, ...]) -> Any:
    from mailer.compose.rendering import leads

    return leads(settings, articles)


def png(width: int, height: int) -> bytes:
    """A white PNG with an amber bar (the masthead's colours): a stand-in logo."""
    rows = b""
    for y in range(height):
        colour = b"\xf2\xc1\x4e" if y >= height - 12 else b"\xff\xff\xff"
        rows += b"\x00" + colour * width

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def opened(browser: Any) -> Iterator[Any]:
    """open(html, viewport) → a page showing ``html``, the logo served by the test."""
    pages: list[Any] = []
    logo = png(480, 120)

    def open_(html: str, viewport: dict[str, int]) -> Any:
        page = page_at(browser, viewport, javascript=True)
        page.route(LOGO_URL, lambda route: route.fulfill(body=logo, content_type="image/png"))
        page.set_content(html, wait_until="load")
        pages.append(page)
        return page

    yield open_
    for page in pages:
        page.context.close()


def top(page: Any, selector: str) -> float:
    box = page.locator(selector).first.bounding_box()
    assert box is not None, selector
    return float(box["y"])


@pytest.mark.parametrize("viewport", [PHONE, MAIL_COLUMN], ids=["390px", "600px"])
def test_weekly_digest_as_the_reader_sees_it(
    opened: Any, shots: Path, viewport: dict[str, int]
) -> None:
    settings = weekly_settings()
    content = weekly_issue(settings)
    msg, html = reader_html(settings, content)
    lead = content.articles[0]
    # A long Subject is folded after "Subject:" (RFC 5322 §2.2.3); unfolded it reads the same.
    assert msg["Subject"].strip() == f"{lead.title}, and {len(content.articles) - 1} more"

    page = opened(html, viewport)
    page.screenshot(path=str(shots / f"digest-weekly-{viewport['width']}.png"), full_page=True)
    assert fits(page)

    # The preview line is the first thing the message says (what an inbox shows after the
    # subject), and it is shown, not hidden (COMPLIANCE 4.13): visible, full size, in colour.
    preheader = page.locator(".preheader")
    assert preheader.is_visible()
    shown = preheader.inner_text()
    assert shown.startswith(lead.title + " — " + " ".join(lead.summary.split())[:40])
    body_text = page.evaluate("document.body.innerText").strip()
    assert body_text.startswith(shown)
    style = preheader.evaluate(
        "e => { const s = getComputedStyle(e); return [s.fontSize, s.color, s.opacity,"
        " s.visibility, s.display, e.getBoundingClientRect().height] }"
    )
    assert float(style[0].removesuffix("px")) >= 12 and style[1] != "rgb(238, 241, 245)"
    assert style[2] == "1" and style[3] == "visible" and style[4] != "none" and style[5] > 10

    # The logo: loaded, at its width attribute on a mail column, never wider than the screen.
    logo = page.locator("img.logo")
    assert logo.get_attribute("alt") == "Camp Lejeune & New River Updates"
    assert page.evaluate("document.querySelector('img.logo').naturalWidth") == 480
    box = logo.bounding_box()
    assert box is not None and box["width"] <= min(240, viewport["width"])

    # The editor's note first, escaped (its "<b>" is text), then the lead, then the rest.
    note = page.locator(".note")
    assert note.is_visible()
    assert "reply</b> & we read every answer" in note.inner_text()
    assert page.locator(".note b").count() == 0
    assert page.locator(".top-title").inner_text() == lead.title
    assert top(page, ".note") < top(page, ".top-title") < top(page, ".contents")
    titles = page.locator(".article-title").all_inner_texts()
    assert lead.title not in titles
    assert sorted([lead.title, *titles]) == sorted(a.title for a in content.articles)
    assert top(page, ".top-title") < min(
        top(page, f".article-title >> nth={i}") for i in range(len(titles))
    )
    # The lead has more room: a larger title, its whole summary and why it matters.
    sizes = page.evaluate(
        "[getComputedStyle(document.querySelector('.top-title')).fontSize,"
        " getComputedStyle(document.querySelector('.article-title')).fontSize]"
    )
    assert float(sizes[0].removesuffix("px")) > float(sizes[1].removesuffix("px"))
    lead_box = " ".join(page.locator(".top").inner_text().split())
    assert " ".join(lead.summary.split()) in lead_box
    assert " ".join(lead.why_it_matters.split()) in lead_box

    # "In this issue" links to each section below, by its heading's id.
    links = page.locator(".contents a")
    sections = page.locator(".section-title").all_text_contents()
    assert links.all_inner_texts() == sections and len(sections) >= 2
    last = links.nth(links.count() - 1)
    target = last.get_attribute("href")
    assert target is not None and target.startswith("#")
    assert page.locator(target).text_content() == sections[-1]
    before = page.evaluate("window.scrollY")
    last.click()
    page.wait_for_function(f"window.scrollY > {before}")


@pytest.mark.parametrize("viewport", [PHONE, MAIL_COLUMN], ids=["390px", "600px"])
def test_alert_as_the_reader_sees_it(opened: Any, shots: Path, viewport: dict[str, int]) -> None:
    settings = replace(weekly_settings(), site=replace(weekly_settings().site, logo_url=None))
    alerts = tuple(a for a in example_articles() if a.topic == "base-alerts")
    digest = settings.digest("alerts")
    assert digest.template == "alert"  # chosen by priority = "alert"
    content = IssueContent(
        issue_id=8,
        digest_key="alerts",
        digest_name=digest.name,
        subject=Renderer().render_subject(digest, NOW, _leads(settings, alerts)),
        date=NOW.astimezone(ZoneInfo(digest.timezone)),
        articles=alerts,
    )
    msg, html = reader_html(settings, content)
    assert msg["Subject"].strip() == f"Base alert: {alerts[0].title}"

    page = opened(html, viewport)
    page.screenshot(path=str(shots / f"digest-alert-{viewport['width']}.png"), full_page=True)
    assert fits(page)

    banner = page.locator(".alert-banner")
    assert banner.is_visible()
    said = banner.inner_text()
    assert "BASE ALERTS" in said.upper() and content.date.strftime("%H:%M") in said
    # No digest furniture: no contents list, no section headings; the alerts up front, in order.
    assert page.locator(".contents").count() == 0 and page.locator(".section-title").count() == 0
    assert page.locator(".top-title").all_inner_texts() == [a.title for a in alerts]
    assert top(page, ".alert-banner") < top(page, ".top-title")
    assert page.locator("img").count() == 0  # no logo configured: the name alone
    assert page.locator(".brand").inner_text() == settings.site.name
