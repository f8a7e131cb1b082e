"""Plain data passed between the rooms (the stores fill them, the pure core reads them).

They live here, at the top, because each crosses rooms: ``Article`` is filled by the article
store and read by issues and compose; ``Recipient`` is made by subscribers, delivery and the
web app and read by compose; ``IssueContent`` is loaded by issues and rendered by compose. In
any one room they would make the others import it sideways (compose from content and issues,
the web app from compose).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Article:
    """An article as stored (``mailer.content.store``): the digest shows title, summary, why
    it matters and a link.

    Before it is stored it is a ``mailer.content.article.ParsedArticle``: the same content,
    without the ``id`` the store gives it and the staff removal, with what only ingest needs
    (whether the file gave a date, the keys that find the same story again).
    """

    id: int
    guid: str
    topic: str
    title: str
    summary: str
    why_it_matters: str
    body: str
    link: str | None
    published_at: datetime
    expires_at: datetime | None = None
    removed_at: datetime | None = None  # taken back by staff (`mailer articles remove`)
    priority: str = "bulk"  # "alert": leads every issue that takes it
    # When its content last changed (articles.updated_at): read with an issue's articles.
    updated_at: datetime | None = None
    # Set on the copy for a reader who received an earlier version of it (a digest with
    # include_updates sends it again): the copy marks it "Updated" with ``updated_at``.
    marked_updated: bool = False


@dataclass(frozen=True)
class Recipient:
    """One person one message goes to: what differs between two copies of the same digest."""

    email: str  # normalized, ASCII
    name: str
    uid: str  # the subscriber's public id, signed into their links
    message_id: str  # "<...@site-domain>", fixed per delivery so a resend carries the same id


@dataclass(frozen=True)
class IssueContent:
    """What one issue of a digest holds, before it is cut per subscriber topic set."""

    issue_id: int
    digest_key: str
    digest_name: str
    subject: str  # rendered, one line
    date: datetime  # the issue date, aware, in the digest's time zone
    articles: tuple[Article, ...]  # newest first
    # The editor's note printed at the top (issues.note, plain text) and who wrote it.
    note: str = ""
    note_by: str = ""
    # Set on a correction issue (``mailer articles retract --correction``): its one article is
    # the one it corrects, ``note`` its text; rendered by email/correction.html/.txt.
    correction: Correction | None = None


@dataclass(frozen=True)
class Correction:
    """What a correction mail says about the article it corrects."""

    text: str
    by: str
    first_sent: datetime | None  # when the article first went out, in the site's time zone
