"""The review mail: what staff are sent when an issue is made for review.

It says when the issue goes out and what happens then if nobody acts, lists its variants
(topic sets with their reader counts, most common first) and its articles with their ids,
gives the commands that act on it, and then shows the digest as the most common variant's
reader will see it (neutral links). Templates: ``email/review.txt`` and ``email/review.html``;
the HTML summary is set above the digest inside the digest's own page.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from mailer.compose.messages import DigestComposer
from mailer.compose.rendering import Renderer, site_view
from mailer.config.settings import Digest, Settings
from mailer.issues.create import goes_out, recipients_by_topics
from mailer.issues.progress import load_content
from mailer.issues.schedule import local_time
from mailer.text import one_line

_BODY_TAG = re.compile(r"<body\b[^>]*>", re.IGNORECASE)


@dataclass(frozen=True)
class ReviewMail:
    """Subject, text and HTML of one review mail."""

    subject: str
    text: str
    html: str


@dataclass(frozen=True)
class Variant:
    """One topic set of the issue's readers: its topic names and how many read it."""

    topics: str
    readers: int


@dataclass(frozen=True)
class Listed:
    """One article of the issue, as the review mail lists it."""

    id: int
    title: str
    topic: str


def compose_review_mail(
    conn: sa.Connection,
    settings: Settings,
    digest: Digest,
    issue_id: int,
    renderer: Renderer,
    *,
    now: datetime,
) -> ReviewMail:
    """The review mail of issue ``issue_id`` (in review) as it stands at ``now``."""
    content = load_content(conn, issue_id, settings)
    zone = settings.site.timezone
    slot = content.date
    topics = {a.topic for a in content.articles}
    variants = recipients_by_topics(conn, digest, topics, now, variants=True)
    readers = sum(n for _, n in variants)
    names = {t.key: t.name for t in settings.topics}
    shown_slot = local_time(slot, zone)
    when = goes_out(digest, slot)
    if digest.on_unreviewed == "send":
        nobody = (
            f"If nobody acts, it goes out at {local_time(when, zone)} to the readers"
            " subscribed then, as it is below."
        )
    else:
        nobody = (
            "If nobody acts, it is held at its slot and goes out only after"
            f" `mailer issues approve {issue_id}`."
        )
    n = len(content.articles)
    subject = (
        f"[Review] {digest.name} for {shown_slot}: {n} article{'s' if n != 1 else ''},"
        f" {readers:,} reader{'s' if readers != 1 else ''}"
    )
    commands = (
        (f"mailer issues approve {issue_id}", "send it at its slot"),
        (f"mailer issues hold {issue_id}", "keep it until it is approved"),
        (f"mailer issues skip {issue_id}", "send nothing; its articles go in the next issue"),
        (
            f"mailer issues drop-article {issue_id} ARTICLE_ID",
            "take one article out (no later issue takes it)",
        ),
        (
            f'mailer issues note {issue_id} "TEXT"',
            "print a note from the editor at the top"
            + (" (replaces the one below)" if content.note else ""),
        ),
        (f"mailer digest test {digest.key} --to ADDRESS", "a test copy to your inbox"),
    )
    common = variants[0][0] if variants else tuple(digest.topics)
    html_preview, text_preview = DigestComposer(settings, content, renderer=renderer).preview(
        common
    )
    context: dict[str, Any] = {
        "site": site_view(settings),
        "issue_id": issue_id,
        "digest_name": digest.name,
        "subject": one_line(content.subject),
        "note": content.note,
        "note_by": content.note_by,
        "slot": shown_slot,
        "nobody": nobody,
        "readers": f"{readers:,}",
        "variants": [
            Variant(", ".join(names.get(t, t) for t in topic_set), count)
            for topic_set, count in variants
        ],
        "articles": [
            Listed(a.id, one_line(a.title), names.get(a.topic, a.topic)) for a in content.articles
        ],
        "commands": commands,
        "shown_as": ", ".join(names.get(t, t) for t in common),
        "preview": text_preview,
    }
    text = renderer.render("email/review.txt", context)
    summary = renderer.render("email/review.html", context)
    return ReviewMail(subject, text, _above(html_preview, summary))


def _above(page: str, summary: str) -> str:
    """``summary`` set at the top of the digest page's body, so the mail is one document."""
    found = _BODY_TAG.search(page)
    if found is None:
        return summary + page
    return page[: found.end()] + "\n" + summary + page[found.end() :]
