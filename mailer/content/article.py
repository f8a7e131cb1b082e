"""An article as read, before it is stored: ``ParsedArticle``, its field limits, and the keys
that tell one story from another (the normalised text, the canonical link under the title).

Article files (``mailer.content.files``) and feeds (``mailer.content.feedparse``) both give a
``ParsedArticle``; the article store (``mailer.content.store``) keeps one article per story.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# Field limits: the title, guid and link ones are the column sizes in mailer/db/schema.py.
MAX_TITLE = 500
MAX_GUID = 500
MAX_LINK = 1000
MAX_SUMMARY = 5_000
MAX_WHY = 5_000
MAX_BODY = 200_000
# An article's priority (``articles.priority``): "alert" leads every issue that takes it.
PRIORITIES = ("bulk", "alert")

# Curly quotes read as straight ones: the same text typed on a phone or pasted from a page.
QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})


@dataclass(frozen=True)
class ParsedArticle:
    """One article read from a file or feed: validated, cleaned, ready to store.

    Text fields are plain text (or Markdown for a Markdown body); templates escape them. It
    has no id: the store (``mailer.content.store``) gives one when it stores it, and what the
    store gives back is a ``mailer.models.Article``. ``content_hash``, ``text_key`` and
    ``link_key`` are what the store compares a new version and another story with.
    """

    guid: str
    topic: str
    title: str
    summary: str
    why_it_matters: str
    body: str
    link: str | None
    published_at: datetime
    expires_at: datetime | None = None
    # False when the file named no date and published_at is the time it was read. Re-adding such
    # a file later must not move it into a newer digest, so the store keeps the first date.
    date_given: bool = True
    priority: str = "bulk"

    @property
    def content_hash(self) -> str:
        """SHA-256 of the content fields: equal hashes mean there is nothing to update."""
        fields = [
            self.topic,
            self.title,
            self.summary,
            self.why_it_matters,
            self.body,
            self.link,
            self.published_at.astimezone(UTC).isoformat() if self.date_given else None,
            self.expires_at.astimezone(UTC).isoformat() if self.expires_at else None,
        ]
        # Only an alert adds to the hash: every bulk article stored before priorities existed
        # keeps its hash, so the next fetch does not see them all as changed.
        if self.priority != "bulk":
            fields.append(self.priority)
        return hashlib.sha256(json.dumps(fields).encode("ascii")).hexdigest()

    @property
    def text_key(self) -> str | None:
        """The normalised text (title, summary, why it matters, body): equal keys are the same
        story, whatever the guid or source. None for a title alone, which is too little to tell
        two stories apart ("Main gate closed" is posted again and again)."""
        if not (self.summary.strip() or self.why_it_matters.strip() or self.body.strip()):
            return None
        texts = [self.title, self.summary, self.why_it_matters, self.body]
        return _key("text", *(_normalised(t) for t in texts))

    @property
    def link_key(self) -> str | None:
        """The canonical link under the normalised title: the same story as published on the
        site, however a feed or a file words its text. None without a link."""
        if self.link is None:
            return None
        return _key("link", canonical_link(self.link), _normalised(self.title))


def _normalised(text: str) -> str:
    folded = unicodedata.normalize("NFKC", text).translate(QUOTES).casefold()
    return " ".join(folded.split())


def _key(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


# Query parameters that say where a reader came from, not what they read.
_TRACKING = re.compile(r"^(utm_\w+|fbclid|gclid|mc_cid|mc_eid)$", re.IGNORECASE)


def canonical_link(link: str) -> str:
    """The link with what does not change the page dropped: http vs https, case and ``www.`` of
    the host, a default port, a trailing slash, the fragment and tracking parameters."""
    parts = urlsplit(link.strip())
    host = (parts.hostname or "").removeprefix("www.")
    if parts.port is not None and parts.port not in (80, 443):
        host = f"{host}:{parts.port}"
    query = urlencode(
        sorted(
            (k, v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
            if not _TRACKING.match(k)
        )
    )
    return urlunsplit(("https", host, parts.path.rstrip("/") or "/", query, ""))
