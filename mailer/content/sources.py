"""Sources: run every configured ``[[sources]]`` once and store what they hold.

Feeds are fetched concurrently (bounded) with conditional GET, parsed off the event loop and
upserted; ``directory`` sources are read file by file. One broken source (or file, or entry) is a
``SourceResult`` with an error, never an exception that stops the others: partial failure is data.
The ``mailer articles fetch`` command and the scheduler's fetch job both call ``fetch_sources``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import sqlalchemy as sa

from mailer.config.settings import Settings, Source
from mailer.content.article import ParsedArticle
from mailer.content.feeds.backoff import is_due, next_fetch_at
from mailer.content.feeds.fetch import (
    FETCH_DEADLINE,
    MAX_FEED_BYTES,
    READ_TIMEOUT,
    create_client,
    fetch_feed,
    user_agent,
)
from mailer.content.feeds.parse import category_topics, parse_feed
from mailer.content.feeds.state import FeedState, load_feed_states, record_failure, record_success
from mailer.content.feeds.websub import Subscription, load_subscriptions, maintain, poll_due
from mailer.content.files import load_article_file
from mailer.content.store import (
    Duplicate,
    UpsertReport,
    feed_origin,
    file_origin,
    upsert_articles,
)
from mailer.errors import ArticleError, FeedError

log = logging.getLogger(__name__)

FEED_CONCURRENCY = 4
# Files a directory source reads; others (images, notes, editor backups) sit there unread.
ARTICLE_SUFFIXES = (".md", ".markdown", ".txt")


@dataclass(frozen=True)
class SourceResult:
    """What one source gave in one run.

    ``error`` is set when the whole source failed (feed unreachable, HTTP error, not a feed,
    directory missing); ``status`` is the feed's HTTP status when the server answered.
    ``skipped`` names the files or entries left out, each with its reason, while the rest went
    in. ``not_modified`` is a feed that answered 304: nothing was read or stored.
    """

    source: Source
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    not_modified: bool = False
    error: str | None = None
    status: int | None = None
    skipped: tuple[str, ...] = ()
    # Not stored: another article (another guid, maybe another source) holds the same content.
    duplicates: tuple[Duplicate, ...] = ()
    # Not fetched this round: the feed failed ``failures`` times in a row and waits until then.
    backing_off_until: datetime | None = None
    failures: int = 0
    # Not fetched this round: the feed's WebSub hub delivers, so it is polled only then.
    hub_delivers_until: datetime | None = None

    @property
    def name(self) -> str:
        """The feed URL or the directory path."""
        return self.source.url or str(self.source.path)

    @property
    def ok(self) -> bool:
        """True when nothing failed and nothing was skipped."""
        return self.error is None and not self.skipped


@dataclass
class _Run:
    engine: sa.Engine
    client: httpx.AsyncClient
    known_topics: tuple[str, ...]
    states: dict[str, FeedState]
    subscriptions: dict[str, Subscription]
    # Where the hub calls back and what signs the callback, or None: no WebSub this run.
    websub: tuple[str, bytes] | None
    # How often a feed whose hub delivers is still polled.
    websub_poll: timedelta
    now: datetime
    max_bytes: int
    deadline: float
    # The fetch interval failing feeds back off from; None fetches every feed (staff asked).
    backoff: timedelta | None
    limit: asyncio.Semaphore
    # SQLite has one writer: feeds that finish together would queue on its busy timeout in
    # threads; queuing them here keeps the writes short and in one place.
    db_lock: asyncio.Lock


async def fetch_sources(
    engine: sa.Engine,
    settings: Settings,
    *,
    now: datetime,
    client: httpx.AsyncClient | None = None,
    concurrency: int = FEED_CONCURRENCY,
    read_timeout: float = READ_TIMEOUT,
    max_bytes: int = MAX_FEED_BYTES,
    deadline: float = FETCH_DEADLINE,
    honour_backoff: bool = False,
) -> list[SourceResult]:
    """Fetch every source in ``settings.sources``; one result per source, in config order.

    With ``honour_backoff`` (the scheduler's round) a feed that failed and is not due again yet
    (``mailer.content.feeds.backoff``) is not fetched: its result says until when it backs off.
    Without it (``mailer articles fetch``, asked for by staff) every source is fetched.

    Feeds run at most ``concurrency`` at a time on ``client`` (default: ``create_client()`` with
    ``read_timeout`` to connect and per read, naming the site in its User-Agent, closed on
    return); each fetch reads at most ``max_bytes`` and ends within ``deadline`` seconds. A
    feed's ETag / Last-Modified from its last good fetch are sent back, so an unchanged feed
    costs one 304. Its ``feed_state`` row records each outcome. Raises only for what stops every
    source alike (the database, a category map naming an unknown topic).
    """
    for source in settings.sources:
        category_topics(source.categories, settings.topic_keys)  # fail before any fetch
    async with contextlib.AsyncExitStack() as stack:
        if client is None:
            agent = user_agent(settings.site.base_url)
            client = await stack.enter_async_context(
                create_client(connect_timeout=read_timeout, read_timeout=read_timeout, agent=agent)
            )
        run = _Run(
            engine=engine,
            client=client,
            known_topics=settings.topic_keys,
            states=await asyncio.to_thread(load_feed_states, engine),
            subscriptions=await asyncio.to_thread(load_subscriptions, engine),
            websub=(
                (settings.site.base_url, settings.site.secret_key)
                if settings.feeds.websub and settings.site.secret_key
                else None
            ),
            websub_poll=timedelta(minutes=settings.feeds.websub_poll_minutes),
            now=now,
            max_bytes=max_bytes,
            deadline=deadline,
            backoff=timedelta(minutes=settings.feeds.interval_minutes) if honour_backoff else None,
            limit=asyncio.Semaphore(concurrency),
            db_lock=asyncio.Lock(),
        )
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(_run_source(run, source), name=f"source {_name(source)}")
                    for source in settings.sources
                ]
        except* Exception as failures:
            # Sources turn their own failures into results; what gets here stops every source
            # alike (the database is down). Raise it as itself, as callers catch it by type.
            raise failures.exceptions[0] from None
    return [task.result() for task in tasks]


def fetch_sources_sync(
    engine: sa.Engine,
    settings: Settings,
    *,
    now: datetime,
    concurrency: int = FEED_CONCURRENCY,
    read_timeout: float = READ_TIMEOUT,
    max_bytes: int = MAX_FEED_BYTES,
    deadline: float = FETCH_DEADLINE,
) -> list[SourceResult]:
    """``fetch_sources`` on a new event loop with its own client, for the CLI."""
    return asyncio.run(
        fetch_sources(
            engine,
            settings,
            now=now,
            concurrency=concurrency,
            read_timeout=read_timeout,
            max_bytes=max_bytes,
            deadline=deadline,
        )
    )


def _name(source: Source) -> str:
    return source.url or str(source.path)


async def _run_source(run: _Run, source: Source) -> SourceResult:
    if source.type == "feed":
        return await _run_feed(run, source)
    return await _run_directory(run, source)


@dataclass(frozen=True)
class Deferred:
    """Why the scheduled round does not fetch a feed now, and until when."""

    until: datetime
    backing_off: bool  # failures in a row (else: its WebSub hub delivers, polled rarely)


def deferred(
    state: FeedState | None,
    subscription: Subscription | None,
    *,
    interval: timedelta,
    poll_every: timedelta,
    now: datetime,
) -> Deferred | None:
    """Whether the scheduled round starting at ``now`` leaves the feed for later: backing off
    after failures, or polled rarely while its hub delivers; None when it fetches it. The one
    rule the round follows and ``mailer articles sources`` shows."""
    if not is_due(state, interval, now):
        until = next_fetch_at(state, interval)
        assert until is not None  # not due means a failure set a time
        return Deferred(until, backing_off=True)
    polled = poll_due(
        subscription, state.last_fetched_at if state else None, now, poll_every=poll_every
    )
    if polled is not None and polled > now:
        return Deferred(polled, backing_off=False)
    return None


async def _run_feed(run: _Run, source: Source) -> SourceResult:
    url = source.url
    if url is None:  # the config refuses this; kept so the type checker knows
        return SourceResult(source, error="a feed source needs a url")
    state = run.states.get(url)
    later = (
        None
        if run.backoff is None
        else deferred(
            state,
            run.subscriptions.get(url),
            interval=run.backoff,
            poll_every=run.websub_poll,
            now=run.now,
        )
    )
    if later is not None and later.backing_off:
        return SourceResult(
            source,
            backing_off_until=later.until,
            failures=state.consecutive_failures if state else 0,
        )
    if later is not None:
        return SourceResult(source, hub_delivers_until=later.until)
    try:
        async with run.limit:
            fetched = await fetch_feed(
                run.client,
                url,
                etag=state.etag if state else None,
                last_modified=state.last_modified if state else None,
                max_bytes=run.max_bytes,
                deadline=run.deadline,
                allow_private=source.allow_private,
            )
            if fetched.not_modified:
                feed = None
            else:
                # Parsing a few MB of XML takes a while; off the loop the other fetches go on.
                feed = await asyncio.to_thread(
                    parse_feed,
                    fetched.content,
                    url=url,
                    topic=source.topic,
                    now=run.now,
                    categories=source.categories,
                    known_topics=run.known_topics,
                    content_type=fetched.content_type,
                    base_url=fetched.final_url,
                )
    except FeedError as exc:
        async with run.db_lock:
            await asyncio.to_thread(record_failure, run.engine, url, exc, now=run.now)
        return SourceResult(source, error=str(exc), status=exc.status)

    report = UpsertReport()
    async with run.db_lock:
        if feed is not None:
            report = await asyncio.to_thread(
                upsert_articles,
                run.engine,
                feed.articles,
                now=run.now,
                keep_topic=True,
                origin=feed_origin(url),
            )
        # A 304 may carry fresher validators (RFC 9110 §15.4.5); otherwise keep the stored ones.
        etag = fetched.etag or (state.etag if state and fetched.not_modified else None)
        modified = fetched.last_modified or (
            state.last_modified if state and fetched.not_modified else None
        )
        await asyncio.to_thread(
            record_success,
            run.engine,
            url,
            status=fetched.status,
            etag=etag,
            last_modified=modified,
            now=run.now,
        )
    if feed is not None and feed.warning:
        log.info("feed parsed despite an error", extra={"url": url, "warning": feed.warning})
    named = feed.hub is not None if feed is not None else url in run.subscriptions
    if run.websub is not None and named:
        # After the articles are stored, so the first subscription follows the first fetch;
        # not under db_lock: the hub's answer may take seconds, the writes are one row each.
        callback_base, site_secret = run.websub
        await maintain(
            run.engine,
            run.client,
            url,
            hub=feed.hub if feed is not None else None,
            topic=feed.self_url if feed is not None else None,
            callback_base=callback_base,
            site_secret=site_secret,
            now=run.now,
            allow_private=source.allow_private,
        )
    return SourceResult(
        source,
        added=report.added,
        updated=report.updated,
        unchanged=report.unchanged,
        not_modified=fetched.not_modified,
        status=fetched.status,
        skipped=feed.skipped if feed is not None else (),
        duplicates=tuple(report.duplicates),
    )


async def _run_directory(run: _Run, source: Source) -> SourceResult:
    try:
        parsed, skipped = await asyncio.to_thread(
            read_directory,
            source.path,
            topic=source.topic,
            known_topics=run.known_topics,
            now=run.now,
        )
    except ArticleError as exc:
        return SourceResult(source, error=str(exc))
    async with run.db_lock:
        report = await asyncio.to_thread(
            upsert_articles, run.engine, parsed, now=run.now, origin=file_origin(source.path)
        )
    return SourceResult(
        source,
        added=report.added,
        updated=report.updated,
        unchanged=report.unchanged,
        skipped=tuple(skipped),
        duplicates=tuple(report.duplicates),
    )


def read_directory(
    path: Path | None, *, topic: str, known_topics: Sequence[str], now: datetime
) -> tuple[list[ParsedArticle], list[str]]:
    """Parse every article file (``ARTICLE_SUFFIXES``, not hidden) in ``path``, by name.

    Returns the articles and one error message per file that could not be read; files are
    not searched for in subfolders. Raises ArticleError when ``path`` is not a readable folder.
    """
    if path is None:
        raise ArticleError("a directory source needs a path")
    try:
        files = sorted(
            entry
            for entry in path.iterdir()
            if entry.suffix.lower() in ARTICLE_SUFFIXES
            and not entry.name.startswith(".")
            and entry.is_file()
        )
    except OSError as exc:
        raise ArticleError(
            f"cannot read the folder: {exc.strerror or exc}", path=str(path)
        ) from exc
    parsed: list[ParsedArticle] = []
    errors: list[str] = []
    for file in files:
        try:
            parsed.append(
                load_article_file(file, default_topic=topic, known_topics=known_topics, now=now)
            )
        except ArticleError as exc:
            errors.append(str(exc))
    return parsed, errors


def log_results(results: Sequence[SourceResult]) -> None:
    """One log line per source (failures and skipped items as warnings), for the service.

    ``fetch_sources`` returns results and leaves reporting to its caller: the CLI prints them,
    the scheduler's job logs them.
    """
    for result in results:
        fields = {
            "source": result.name,
            "added": result.added,
            "updated": result.updated,
            "unchanged": result.unchanged,
            "not_modified": result.not_modified,
        }
        if result.error:
            log.warning("source failed", extra=fields | {"error": result.error})
            continue
        if result.backing_off_until is not None:
            log.info(
                "source skipped: backing off",
                extra={
                    "source": result.name,
                    "failures": result.failures,
                    "until": result.backing_off_until.isoformat(),
                },
            )
            continue
        if result.hub_delivers_until is not None:
            log.info(
                "source skipped: its WebSub hub delivers",
                extra={"source": result.name, "until": result.hub_delivers_until.isoformat()},
            )
            continue
        for problem in result.skipped:
            log.warning("source item skipped", extra={"source": result.name, "problem": problem})
        for duplicate in result.duplicates:
            log.info(
                "duplicate skipped",
                extra={"source": result.name, "guid": duplicate.guid, "article": duplicate.of},
            )
        log.info("source fetched", extra=fields)
