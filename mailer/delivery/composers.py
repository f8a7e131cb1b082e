"""What a worker composes: each issue's content, and a composer per set of articles left out.

An issue's content is read once, as its first batch starts, and read again when its articles
change (an article removed by staff); a subscriber's message leaves out the articles another
issue already brought them (``claims.Claimed.seen``) and those that expired since the issue was
made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from zoneinfo import ZoneInfo

import sqlalchemy as sa

from mailer.compose.messages import DigestComposer
from mailer.compose.rendering import Renderer
from mailer.config.settings import Settings
from mailer.db.engine import reading
from mailer.db.schema import issue_articles
from mailer.delivery.claims import Claimed
from mailer.issues.progress import load_content
from mailer.models import Article, IssueContent


class Composers:
    """The composers of the issues a worker sends, cached per issue and articles left out."""

    def __init__(
        self,
        engine: sa.Engine,
        settings: Settings,
        clock: Callable[[], datetime],
        renderer: Renderer,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.clock = clock
        self.renderer = renderer
        self._contents: dict[int, IssueContent] = {}
        # Keyed by the articles left out; dropped with the issue's content when its articles
        # change (`articles remove`, see refresh).
        self._composers: dict[tuple[int, frozenset[int], frozenset[int]], DigestComposer] = {}
        self._digests = {d.key: d for d in settings.digests}

    def composer(
        self,
        issue_id: int,
        hidden: frozenset[int] = frozenset(),
        updated: frozenset[int] = frozenset(),
    ) -> DigestComposer:
        """The composer for an issue without the ``hidden`` articles, the ``updated`` ones
        marked "Updated" with their change time in the site's zone.

        Subscribers who hide and see updated the same articles (none, usually) share one
        composer, and so one render per topic set.
        """
        content = self._contents[issue_id]  # read as its batch started (refresh)
        now = self.clock()
        # An article that expired since the issue was made is dropped from what is not sent yet.
        expired = {
            a.id for a in content.articles if a.expires_at is not None and a.expires_at <= now
        }
        key = (issue_id, hidden | expired, updated)
        composer = self._composers.get(key)
        if composer is None:
            zone = ZoneInfo(self.settings.site.timezone)
            shown = tuple(
                _marked(a, zone) if a.id in updated else a
                for a in content.articles
                if a.id not in key[1]
            )
            composer = DigestComposer(
                self.settings, replace(content, articles=shown), renderer=self.renderer
            )
            self._composers[key] = composer
        return composer

    def refresh(self, issue_ids: set[int]) -> None:
        """Read the content of the batch's issues: those not cached yet, and cached ones whose
        articles changed since (an article removed by staff). One small query per batch, so
        that only the batch being sent when the article was removed (at most
        ``[smtp].batch_size`` messages) may still carry it."""
        cached = {i: self._contents[i] for i in issue_ids if i in self._contents}
        missing = issue_ids - cached.keys()
        current: dict[int, set[int]] = {i: set() for i in cached}
        with reading(self.engine) as conn:
            for issue_id in missing:
                self._contents[issue_id] = load_content(conn, issue_id, self.settings)
            if not cached:
                return
            for issue_id, article_id in conn.execute(
                sa.select(issue_articles.c.issue_id, issue_articles.c.article_id).where(
                    issue_articles.c.issue_id.in_(sorted(cached)),
                    issue_articles.c.dropped_at.is_(None),
                )
            ):
                current[issue_id].add(article_id)
            # A correction holds the article it corrects outside issue_articles: it never
            # changes.
            changed = [
                issue_id
                for issue_id, content in cached.items()
                if content.correction is None
                and current[issue_id] != {a.id for a in content.articles}
            ]
            for issue_id in changed:
                self._contents[issue_id] = load_content(conn, issue_id, self.settings)
        if changed:
            # Composers render the articles they were made with: the changed issues' go too.
            self._composers = {k: c for k, c in self._composers.items() if k[0] not in changed}

    def left_out(self, d: Claimed) -> tuple[frozenset[int], frozenset[int]]:
        """What this subscriber already received, in one pass: the articles not to send again
        (never twice), and those sent again because they changed since and the digest has
        ``include_updates`` (their copy marks them "Updated"; someone seeing an article for
        the first time sees no mark)."""
        digest = self._digests.get(d.digest)
        if digest is None or not digest.include_updates:
            return frozenset(aid for aid, _updated in d.seen), frozenset()
        hidden = frozenset(aid for aid, updated in d.seen if not updated)
        return hidden, frozenset(aid for aid, updated in d.seen if updated)


def _marked(article: Article, zone: ZoneInfo) -> Article:
    """The article as shown to a reader who got an earlier version of it."""
    if article.updated_at is None:
        return article
    return replace(article, marked_updated=True, updated_at=article.updated_at.astimezone(zone))
