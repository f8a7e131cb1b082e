"""The article store: the one module that writes the ``articles`` table.

Storing keeps one article per story: besides the guid, the normalised text (``text_key``) and
the canonical link under the normalised title (``link_key``) are unique, so the same story
from another source or guid is reported as a duplicate of the stored article, not stored again.
Statements are bulk-friendly Core, the same on SQLite and PostgreSQL.

Staff see one article whole (``show``) and take it back (``remove``) from every issue that has
not gone out in full. Removal is a mark, not a delete: the row stays, with when, by whom and
which issues it was taken out of, so ``articles show`` and ``articles list`` can say so and no
later ingest of the same guid or content brings it back.

Which articles an issue takes is a query of its own: ``mailer.content.selection``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from mailer.content.article import MAX_GUID, MAX_LINK, MAX_TITLE, ParsedArticle
from mailer.db import audit
from mailer.db.engine import reading, upsert_insert
from mailer.db.schema import articles, issue_articles, issues
from mailer.errors import ArticleError, UnknownArticleError
from mailer.models import Article

log = logging.getLogger(__name__)

UPSERT_CHUNK = 500  # guids per IN (...) list: well under SQLite's and PostgreSQL's bind limits

# Where an article came from, as ``upsert_articles`` records it in ``articles.origin``:
# "feed:<url>", "websub:<feed url>", "file:<folder>", "push", "cli".
PUSH_ORIGIN = "push"
CLI_ORIGIN = "cli"


def feed_origin(url: str, *, websub: bool = False) -> str:
    """The origin of articles a feed gave (fetched, or delivered by its WebSub hub)."""
    return ("websub:" if websub else "feed:") + url


def file_origin(path: object) -> str:
    """The origin of articles read from a ``[[sources]]`` folder."""
    return f"file:{path}"


@dataclass(frozen=True)
class Origin:
    """Where an article came from: ``kind`` is feed, websub, file, push or cli; ``where`` the
    feed URL or folder (empty for push and cli)."""

    kind: str
    where: str = ""

    @classmethod
    def parse(cls, text: str) -> Origin:
        kind, _, where = text.partition(":")
        return cls(kind, where)

    def __str__(self) -> str:
        labels = {
            "feed": "feed",
            "websub": "feed (WebSub push)",
            "file": "file",
            "push": "pushed by the site",
            "cli": "mailer articles add",
        }
        label = labels.get(self.kind, self.kind)
        return f"{label} {self.where}" if self.where else label


@dataclass(frozen=True)
class Duplicate:
    """An article not stored because article ``of`` holds the same content."""

    guid: str
    title: str
    of: int


@dataclass
class UpsertReport:
    """What ``upsert_articles`` did, one count per distinct guid; ``duplicates`` lists the
    articles skipped because another article (another guid) holds the same content."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    duplicates: list[Duplicate] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Storing what sources give

_CONTENT_COLUMNS = (
    "topic",
    "title",
    "summary",
    "why_it_matters",
    "body",
    "link",
    "expires_at",
    "priority",
)


def _values(item: ParsedArticle) -> dict[str, Any]:
    for name, value, limit in (
        ("guid", item.guid, MAX_GUID),
        ("title", item.title, MAX_TITLE),
        ("link", item.link or "", MAX_LINK),
    ):
        if len(value) > limit:
            raise ArticleError(
                f"article {item.guid[:80]!r}: {name} is {len(value):,} characters; "
                f"the limit is {limit:,}"
            )
    return {
        "guid": item.guid,
        "topic": item.topic,
        "title": item.title,
        "summary": item.summary,
        "why_it_matters": item.why_it_matters,
        "body": item.body,
        "link": item.link,
        "published_at": item.published_at,
        "expires_at": item.expires_at,
        "priority": item.priority,
        "content_hash": item.content_hash,
        "text_key": item.text_key,
        "link_key": item.link_key,
    }


def upsert_articles(
    engine: sa.Engine,
    items: Sequence[ParsedArticle],
    *,
    now: datetime,
    keep_topic: bool = False,
    origin: str = "",
) -> UpsertReport:
    """Store articles by guid: new ones are added, changed ones updated, the rest left alone.

    A guid given twice keeps its last version. "Changed" means a different ``content_hash``; an
    article whose file gave no date keeps the publication date it was first stored with.
    With ``keep_topic``, a stored article keeps the topic it was first stored with (feeds: the
    same story often sits in two category feeds, and a category map can change; letting the
    last fetch win would flip its topic back and forth, each flip an update that could send it
    again). It keeps the stored ``priority`` too: a feed cannot say one, so the site's push of
    an alert (``POST /hooks/articles``) is not turned back into bulk by the next fetch of the
    same guid. Runs in one transaction, with a few bulk statements per chunk of guids.

    ``origin`` says where the articles came from (``feed_origin``, ``file_origin``,
    ``PUSH_ORIGIN``, ``CLI_ORIGIN``); each article added keeps it in ``articles.origin``, and
    an update never changes it.
    """
    latest: dict[str, ParsedArticle] = {}
    for item in items:
        latest[item.guid] = item
    unique = list(latest.values())
    report = UpsertReport()
    with engine.begin() as conn:
        for start in range(0, len(unique), UPSERT_CHUNK):
            _upsert_chunk(
                conn, unique[start : start + UPSERT_CHUNK], report, now, keep_topic, origin
            )
    return report


def _upsert_chunk(
    conn: sa.Connection,
    chunk: list[ParsedArticle],
    report: UpsertReport,
    now: datetime,
    keep_topic: bool = False,
    origin: str = "",
) -> None:
    stored: dict[str, tuple[int, str, str, str]] = {
        guid: (id_, content_hash, topic, priority)
        for id_, guid, content_hash, topic, priority in conn.execute(
            sa.select(
                articles.c.id,
                articles.c.guid,
                articles.c.content_hash,
                articles.c.topic,
                articles.c.priority,
            ).where(articles.c.guid.in_([item.guid for item in chunk]))
        )
    }
    if keep_topic:
        chunk = [
            dataclasses.replace(item, topic=stored[item.guid][2], priority=stored[item.guid][3])
            if item.guid in stored
            and (stored[item.guid][2], stored[item.guid][3]) != (item.topic, item.priority)
            else item
            for item in chunk
        ]
    rows = {item.guid: _values(item) for item in chunk}
    duplicates_before = len(report.duplicates)
    owners = _key_owners(conn, rows.values())
    new: list[dict[str, Any]] = []
    for guid, row in rows.items():
        if guid in stored:
            continue
        holder = _holder(owners, row, guid)
        if holder is not None:
            report.duplicates.append(Duplicate(guid, row["title"], holder))
            continue
        new.append(row)
    added = 0
    if new:
        # No conflict target: a guid, or content (the unique text_key and link_key indexes),
        # stored meanwhile by a concurrent ingest or by an earlier row of this chunk makes the
        # row a no-op; the article that holds it is named below.
        inserted: dict[str, int] = {
            guid: id_
            for guid, id_ in conn.execute(
                upsert_insert(conn, articles)
                .on_conflict_do_nothing()
                .returning(articles.c.guid, articles.c.id),
                [
                    row | {"created_at": now, "updated_at": now, "origin": origin or None}
                    for row in new
                ],
            )
        }
        _lost_races(conn, [row for row in new if row["guid"] not in inserted], report)
        for guid, id_ in inserted.items():
            _claim(owners, rows[guid], id_, guid)
        added = len(inserted)
    changed: list[ParsedArticle] = []
    for item in chunk:
        if item.guid not in stored or stored[item.guid][1] == rows[item.guid]["content_hash"]:
            continue
        holder = _holder(owners, rows[item.guid], item.guid)
        if holder is not None and holder != stored[item.guid][0]:
            # The edit made it the copy of another article: keep the stored version.
            report.duplicates.append(Duplicate(item.guid, item.title, holder))
            continue
        # Its new content is now held: a later row of this chunk that edits into the same
        # content is a duplicate, not an UPDATE the unique indexes refuse.
        _claim(owners, rows[item.guid], stored[item.guid][0], item.guid)
        changed.append(item)
    for with_date in (True, False):
        group = [item for item in changed if item.date_given is with_date]
        if not group:
            continue
        columns = (*_CONTENT_COLUMNS, "content_hash", "text_key", "link_key") + (
            ("published_at",) if with_date else ()
        )
        statement = (
            articles.update()
            .where(articles.c.guid == sa.bindparam("b_guid"))
            .values({name: sa.bindparam(f"b_{name}") for name in columns} | {"updated_at": now})
        )
        conn.execute(
            statement,
            [{f"b_{name}": rows[item.guid][name] for name in (*columns, "guid")} for item in group],
        )
    duplicates = len(report.duplicates) - duplicates_before
    report.added += added
    report.updated += len(changed)
    report.unchanged += len(chunk) - added - len(changed) - duplicates


@dataclass(frozen=True)
class Stored:
    """What storing one article did: "added", "updated", "unchanged", or "duplicate" (another
    guid holds the same story, and ``article_id`` is that article)."""

    outcome: str
    article_id: int


def store_one(engine: sa.Engine, item: ParsedArticle, *, now: datetime) -> Stored:
    """Store one article (``upsert_articles``) and say what happened to it, with its id: the
    answer to the site when it pushes one (``POST /hooks/articles``)."""
    report = upsert_articles(engine, [item], now=now, origin=PUSH_ORIGIN)
    if report.duplicates:
        return Stored("duplicate", report.duplicates[0].of)
    with reading(engine) as conn:
        article_id = conn.execute(
            sa.select(articles.c.id).where(articles.c.guid == item.guid)
        ).scalar_one()
    outcome = "added" if report.added else "updated" if report.updated else "unchanged"
    return Stored(outcome, article_id)


_Owners = dict[tuple[str, str], tuple[int, str]]


def _key_owners(conn: sa.Connection, rows: Any) -> _Owners:
    """(key name, key) → (article id, guid) of the stored articles holding these keys."""
    owners: _Owners = {}
    for name in ("text_key", "link_key"):
        column = articles.c[name]
        keys = sorted({row[name] for row in rows if row[name] is not None})
        if not keys:
            continue
        for id_, guid, key in conn.execute(
            sa.select(articles.c.id, articles.c.guid, column).where(column.in_(keys))
        ):
            owners[name, key] = (id_, guid)
    return owners


def _holder(owners: _Owners, row: dict[str, Any], guid: str) -> int | None:
    """The id of another article (another guid) holding this row's content, if any."""
    for name in ("text_key", "link_key"):
        owner = owners.get((name, row[name])) if row[name] is not None else None
        if owner is not None and owner[1] != guid:
            return owner[0]
    return None


def _claim(owners: _Owners, row: dict[str, Any], id_: int, guid: str) -> None:
    """Record that article ``id_`` now holds this row's content keys."""
    for name in ("text_key", "link_key"):
        if row[name] is not None:
            owners[name, row[name]] = (id_, guid)


def _lost_races(conn: sa.Connection, rows: list[dict[str, Any]], report: UpsertReport) -> None:
    """Name the article that holds each row the INSERT skipped: a duplicate of this chunk, or
    content a concurrent ingest stored first (a guid stored meanwhile is simply unchanged)."""
    if not rows:
        return
    owners = _key_owners(conn, rows)
    for row in rows:
        holder = _holder(owners, row, row["guid"])
        if holder is not None:
            report.duplicates.append(Duplicate(row["guid"], row["title"], holder))


ARTICLE_COLUMNS = (
    articles.c.id,
    articles.c.guid,
    articles.c.topic,
    articles.c.title,
    articles.c.summary,
    articles.c.why_it_matters,
    articles.c.body,
    articles.c.link,
    articles.c.published_at,
    articles.c.expires_at,
    articles.c.removed_at,
    articles.c.priority,
)


def _newest_first(query: sa.Select[Any], limit: int) -> sa.Select[Any]:
    if limit < 0:
        raise ValueError(f"limit must be 0 or more, got {limit}")
    return query.order_by(articles.c.published_at.desc(), articles.c.id.desc()).limit(limit)


def fetch(bind: sa.Engine | sa.Connection, query: sa.Select[Any]) -> list[Article]:
    """The Articles a query of ``ARTICLE_COLUMNS`` selects, on an Engine or in a Connection."""
    if isinstance(bind, sa.Connection):
        return [Article(**row._mapping) for row in bind.execute(query)]
    with reading(bind) as conn:
        return [Article(**row._mapping) for row in conn.execute(query)]


def list_articles(
    engine: sa.Engine | sa.Connection, *, topic: str | None = None, limit: int = 50
) -> list[Article]:
    """The newest ``limit`` articles, newest first, optionally of one topic (expired ones too).

    ``engine`` may also be a Connection, to read inside a caller's transaction.
    """
    query = sa.select(*ARTICLE_COLUMNS)
    if topic is not None:
        query = query.where(articles.c.topic == topic)
    return fetch(engine, _newest_first(query, limit))


# ---------------------------------------------------------------------------------------------
# One article for staff: show it, take it back

# An issue whose every delivery reached its end keeps its articles: it is the record of what
# went out (the archive shows it). Every other issue still renders from issue_articles.
SENT = "sent"


@dataclass(frozen=True)
class TakenBy:
    """One issue that took the article."""

    issue_id: int
    digest: str
    scheduled_for: datetime
    status: str


@dataclass(frozen=True)
class ArticleDetail:
    """One stored article, when it arrived and changed, what took it, and its removal if any."""

    article: Article
    created_at: datetime  # arrival in the store
    updated_at: datetime
    removed_by: str | None
    removed_from: tuple[int, ...]
    issues: tuple[TakenBy, ...]
    origin: Origin | None = None  # None: stored before origins were recorded


@dataclass(frozen=True)
class Removal:
    """What ``remove`` did: the issues the article was taken out of, or that it already was."""

    article_id: int
    title: str
    issues: tuple[int, ...]
    already: bool
    removed_at: datetime
    removed_by: str


def _issue_ids(text: str | None) -> tuple[int, ...]:
    return tuple(int(part) for part in (text or "").split(";") if part)


def show(engine: sa.Engine, article_id: int) -> ArticleDetail:
    """The article ``article_id`` with the issues that took it; UnknownArticleError if none."""
    with reading(engine) as conn:
        row = conn.execute(
            sa.select(
                *ARTICLE_COLUMNS,
                articles.c.created_at,
                articles.c.updated_at,
                articles.c.removed_by,
                articles.c.removed_from,
                articles.c.origin,
            ).where(articles.c.id == article_id)
        ).first()
        if row is None:
            raise UnknownArticleError(article_id)
        taken = conn.execute(
            sa.select(issues.c.id, issues.c.digest, issues.c.scheduled_for, issues.c.status)
            .join(issue_articles, issue_articles.c.issue_id == issues.c.id)
            .where(issue_articles.c.article_id == article_id, issue_articles.c.dropped_at.is_(None))
            .order_by(issues.c.scheduled_for, issues.c.id)
        ).all()
    values = row._mapping
    return ArticleDetail(
        article=Article(**{c.name: values[c.name] for c in ARTICLE_COLUMNS}),
        created_at=row.created_at,
        updated_at=row.updated_at,
        removed_by=row.removed_by,
        removed_from=_issue_ids(row.removed_from),
        issues=tuple(TakenBy(*t) for t in taken),
        origin=Origin.parse(row.origin) if row.origin else None,
    )


def remove(engine: sa.Engine, article_id: int, *, by: str, now: datetime) -> Removal:
    """Take the article out of every issue not sent in full, and out of every later issue.

    Deliveries still queued or deferred render from issue_articles when they are sent, so they
    go without it; a running worker sees the change at its next claim (``Deliverer`` checks
    the issues of every batch it claims). Recorded on the article and in the audit trail.
    Removing a removed article again changes nothing.
    """
    with engine.begin() as conn:
        query = sa.select(
            articles.c.title, articles.c.removed_at, articles.c.removed_by, articles.c.removed_from
        ).where(articles.c.id == article_id)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        row = conn.execute(query).first()
        if row is None:
            raise UnknownArticleError(article_id)
        if row.removed_at is not None:
            return Removal(
                article_id,
                row.title,
                _issue_ids(row.removed_from),
                True,
                row.removed_at,
                row.removed_by or "",
            )
        unsent = sorted(
            conn.scalars(
                sa.select(issue_articles.c.issue_id)
                .join(issues, issues.c.id == issue_articles.c.issue_id)
                .where(issue_articles.c.article_id == article_id, issues.c.status != SENT)
            ).all()
        )
        if unsent:
            conn.execute(
                issue_articles.delete().where(
                    issue_articles.c.article_id == article_id,
                    issue_articles.c.issue_id.in_(unsent),
                )
            )
        conn.execute(
            articles.update()
            .where(articles.c.id == article_id)
            .values(
                removed_at=now,
                removed_by=by[:200],
                removed_from=";".join(str(i) for i in unsent),
            )
        )
        audit.record(conn, None, "article_removed", now, article=article_id, by=by, issues=unsent)
    log.info("article removed", extra={"article": article_id, "by": by, "issues": unsent})
    return Removal(article_id, row.title, tuple(unsent), False, now, by)


# ---------------------------------------------------------------------------------------------
# The latest articles for staff (the console's articles page)


@dataclass(frozen=True)
class Listed:
    """One article of ``latest``: when it arrived, where from, and the issues that took it."""

    article: Article
    created_at: datetime
    origin: Origin | None  # None: stored before origins were recorded
    issues: tuple[TakenBy, ...]


@dataclass(frozen=True)
class Latest:
    """One page of ``latest`` and how many articles there are in all."""

    articles: tuple[Listed, ...]
    total: int


def latest(
    engine: sa.Engine, *, topic: str | None = None, limit: int = 25, offset: int = 0
) -> Latest:
    """The newest articles (as ``list_articles``: by publication, newest first), the page of
    ``limit`` from ``offset``, each with its arrival, origin and issues."""
    if limit < 1 or offset < 0:
        raise ValueError(f"limit must be 1 or more and offset 0 or more, got {limit}, {offset}")
    query = sa.select(*ARTICLE_COLUMNS, articles.c.created_at, articles.c.origin)
    counting = sa.select(sa.func.count()).select_from(articles)
    if topic is not None:
        query = query.where(articles.c.topic == topic)
        counting = counting.where(articles.c.topic == topic)
    with reading(engine) as conn:
        total = conn.execute(counting).scalar_one()
        rows = conn.execute(_newest_first(query, limit).offset(offset)).all()
        ids = [row.id for row in rows]
        taken: dict[int, list[TakenBy]] = {i: [] for i in ids}
        if ids:
            for article_id, *issue in conn.execute(
                sa.select(
                    issue_articles.c.article_id,
                    issues.c.id,
                    issues.c.digest,
                    issues.c.scheduled_for,
                    issues.c.status,
                )
                .join(issues, issues.c.id == issue_articles.c.issue_id)
                .where(issue_articles.c.article_id.in_(ids), issue_articles.c.dropped_at.is_(None))
                .order_by(issues.c.scheduled_for, issues.c.id)
            ):
                taken[article_id].append(TakenBy(*issue))
    return Latest(
        tuple(
            Listed(
                Article(**{c.name: row._mapping[c.name] for c in ARTICLE_COLUMNS}),
                row.created_at,
                Origin.parse(row.origin) if row.origin else None,
                tuple(taken[row.id]),
            )
            for row in rows
        ),
        total,
    )
