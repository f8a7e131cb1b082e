"""Plain data passed between the layers (the store fills them, the pure core reads them)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Article:
    """An article as stored: the digest shows title, summary, why it matters and a link."""

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
