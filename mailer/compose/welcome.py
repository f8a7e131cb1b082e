"""The welcome mail: what a reader signed up for, when each digest first reaches them, and the
latest stories in their topics, built the way a digest is (the same headers, footer links,
postal address, MIME shape) so that it passes every check a digest passes.

It is list mail, not a transactional one like the confirmation: it goes to a subscriber, so it
carries List-Id, List-Unsubscribe and List-Unsubscribe-Post (RFC 2369, RFC 8058) and the
reader's own unsubscribe and preferences links. The content comes from
``mailer.subscribers.welcome.welcome_for``, which the confirmed page renders too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from mailer.compose.messages import (
    list_message,
    reader_links,
    require_links,
)
from mailer.compose.rendering import Renderer, article_view, site_view
from mailer.config.settings import Settings
from mailer.models import Article, Recipient
from mailer.sandbox import paragraphs
from mailer.subscribers.links import links_for
from mailer.text import one_line

TEMPLATE = "email/welcome"


@dataclass(frozen=True)
class Arrival:
    """One digest the reader receives and when it next arrives (``when`` in the site's zone,
    e.g. "Friday 11 December, 7:00 AM EST"; empty for a schedule that has ended)."""

    key: str
    name: str
    at: datetime | None  # UTC: when its deliveries are first due (after quiet hours)
    when: str
    # Made as news arrives (``trigger = "arrival"``): no next time to name.
    on_arrival: bool = False


@dataclass(frozen=True)
class Story:
    """One of the latest stories: one-line title, its summary's first paragraph, safe link."""

    title: str
    summary: str
    link: str | None


def story(article: Article) -> Story:
    """The welcome's view of ``article``: as a digest shows it (``article_view``), the summary
    cut to its first paragraph."""
    view = article_view(article)
    return Story(view.title, (paragraphs(view.summary) or [""])[0], view.link)


@dataclass(frozen=True)
class Welcome:
    """What a new reader is told, by mail and on the confirmed page alike."""

    topics: tuple[str, ...]  # the names of the topics they chose, in configured order
    digests: tuple[Arrival, ...]  # the digests they receive, soonest first
    articles: tuple[Story, ...]  # the latest stories in their topics, newest first


def welcome_subject(settings: Settings) -> str:
    """``Welcome to <site name>``, on one line."""
    return f"Welcome to {one_line(settings.site.name)}"


def welcome_message_id(settings: Settings, now: datetime, nonce: str) -> str:
    """A fresh Message-ID on the site's domain for one welcome mail."""
    return f"<welcome.{now:%Y%m%d%H%M%S}.{nonce}@{settings.site.domain}>"


def build_welcome(
    settings: Settings,
    welcome: Welcome,
    recipient: Recipient,
    now: datetime,
    *,
    renderer: Renderer,
) -> bytes:
    """The RFC 5322 bytes (CRLF) of ``recipient``'s welcome mail.

    Rendered in full and assembled as a digest copy is (``messages.list_message``: the same
    headers and MIME shape); a template that drops the unsubscribe, preferences or
    privacy link or the postal address is refused, as for a digest.
    """
    site = settings.site
    links = links_for(site, recipient.uid)
    # No issue to view in the browser yet: the footer's archive link is the archive.
    view = reader_links(settings, links.unsubscribe, links.preferences, site.base_url + "/archive")
    context = {"site": site_view(settings), "welcome": welcome, "links": view}
    html = renderer.render_html(f"{TEMPLATE}.html", context)
    text = renderer.render(f"{TEMPLATE}.txt", context)
    require_links(
        html, text, (view.unsubscribe, view.preferences, view.privacy), settings, TEMPLATE
    )
    return list_message(
        settings,
        to=recipient.email,
        message_id=recipient.message_id,
        subject=welcome_subject(settings),
        unsubscribe=links.unsubscribe,
        text=text,
        html=html,
        now=now,
    )
