"""``GET|POST /websub/{token}``: the callback a WebSub hub calls for a feed we subscribed to.

The token is signed like every link token (``Purpose.WEBSUB``) and names the subscription's
random callback id: a forged or unknown one is 404, as is anything we did not ask for.

GET is the hub's intent verification: ``hub.challenge`` is echoed only for a subscribe we
asked for and are waiting on, for the same ``hub.topic``; the granted ``hub.lease_seconds``
is recorded. ``hub.mode=denied`` records the refusal. POST is content distribution: the body
(up to ``[feeds].max_bytes``) must carry ``X-Hub-Signature-256: sha256=<hex>`` (or
``X-Hub-Signature`` with sha1/256/384/512), the HMAC of the raw body under the subscription's
secret. Unsigned or wrongly signed content is ignored with a 2xx answer, as the spec asks (a
hub must not learn which secret guesses fail), and logged; signed content is parsed by the
feed parser and stored the way a fetch stores it, so arrival digests fire.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import timedelta

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from mailer.config.settings import Source
from mailer.content.feeds import websub
from mailer.content.feeds.parse import parse_feed
from mailer.content.store import feed_origin, upsert_articles
from mailer.errors import FeedError, TokenError
from mailer.subscribers.tokens import Purpose, read_token
from mailer.web.context import NO_STORE, WebContext
from mailer.web.hooks import read_capped
from mailer.web.signatures import signed_by

log = logging.getLogger(__name__)

# The route is the callback URL given to the hub: one definition for both.
WEBSUB_PATH = websub.CALLBACK_PATH
# The spec's signature methods (WebSub §8). sha1 stays: HMAC-SHA1 is still a sound MAC, and
# widely used hubs sign with it.
DIGESTS = {
    "sha1": hashlib.sha1,
    "sha256": hashlib.sha256,
    "sha384": hashlib.sha384,
    "sha512": hashlib.sha512,
}
MAX_LEASE = timedelta(days=366)


def signature_ok(secret: bytes, body: bytes, headers: dict[str, str]) -> bool:
    """True if ``X-Hub-Signature-256`` (else ``X-Hub-Signature``) is ``<method>=<hex>``, the
    HMAC of ``body`` under ``secret``; compared in constant time."""
    value = headers.get("x-hub-signature-256") or headers.get("x-hub-signature")
    return signed_by(secret, body, value, DIGESTS)


def _not_found() -> Response:
    return Response(status_code=404, headers=NO_STORE)


class WebSubViews:
    """The callback route: verification (GET) and content (POST)."""

    def __init__(self, web: WebContext) -> None:
        self.web = web

    async def _subscription(self, request: Request) -> websub.Subscription | None:
        try:
            callback_id = read_token(
                self.web.settings.site.require_secret(),
                Purpose.WEBSUB,
                request.path_params["token"],
            )
        except TokenError:
            return None
        return await run_in_threadpool(websub.by_callback, self.web.engine, callback_id)

    async def verify(self, request: Request) -> Response:
        subscription = await self._subscription(request)
        if subscription is None:
            return _not_found()
        query = request.query_params
        mode, topic = query.get("hub.mode"), query.get("hub.topic")
        now = self.web.clock()
        if mode == "denied" and topic == subscription.topic:
            reason = " ".join(query.get("hub.reason", "").split())[:500]
            await run_in_threadpool(
                websub.denied, self.web.engine, subscription, reason=reason, now=now
            )
            log.warning(
                "websub subscription denied by the hub",
                extra={"feed": subscription.feed_url, "reason": reason},
            )
            return Response(status_code=200, headers=NO_STORE)
        challenge = query.get("hub.challenge")
        if mode != "subscribe" or subscription.asked != "subscribe" or not challenge:
            return _not_found()
        if topic != subscription.topic:
            log.warning(
                "websub verification for a topic we did not ask for",
                extra={"feed": subscription.feed_url, "topic": (topic or "")[:200]},
            )
            return _not_found()
        lease = _lease(query.get("hub.lease_seconds"))
        if lease is None:
            return _not_found()
        await run_in_threadpool(
            websub.verified, self.web.engine, subscription, lease=lease, now=now
        )
        log.info(
            "websub subscription verified",
            extra={"feed": subscription.feed_url, "until": (now + lease).isoformat()},
        )
        return PlainTextResponse(challenge, headers=NO_STORE)

    async def content(self, request: Request) -> Response:
        subscription = await self._subscription(request)
        if subscription is None or subscription.state != "verified":
            return _not_found()
        settings = self.web.settings
        limit = settings.feeds.max_bytes
        body = await read_capped(request, limit)
        if body is None:
            log.warning(
                "websub content refused: over [feeds].max_bytes",
                extra={"feed": subscription.feed_url, "limit": limit},
            )
            return Response(status_code=413, headers=NO_STORE)
        if not signature_ok(subscription.secret.encode(), body, dict(request.headers)):
            log.warning(
                "websub content ignored: missing or wrong X-Hub-Signature",
                extra={"feed": subscription.feed_url},
            )
            return Response(status_code=202, headers=NO_STORE)
        source = _source(settings.sources, subscription.feed_url)
        if source is None:
            log.warning(
                "websub content ignored: the feed is no longer a source",
                extra={"feed": subscription.feed_url},
            )
            return Response(status_code=202, headers=NO_STORE)
        now = self.web.clock()
        try:
            feed = await run_in_threadpool(
                lambda: parse_feed(
                    body,
                    url=subscription.feed_url,
                    topic=source.topic,
                    now=now,
                    categories=source.categories,
                    known_topics=settings.topic_keys,
                    content_type=request.headers.get("content-type"),
                    base_url=subscription.topic,
                )
            )
        except FeedError as exc:
            error = f"content from the hub not read: {exc}"
            log.warning(error, extra={"feed": subscription.feed_url})
            await run_in_threadpool(websub.content_failed, self.web.engine, subscription, error)
            return Response(status_code=202, headers=NO_STORE)
        report = await run_in_threadpool(
            lambda: upsert_articles(
                self.web.engine,
                feed.articles,
                now=now,
                keep_topic=True,
                origin=feed_origin(subscription.feed_url, websub=True),
            )
        )
        await run_in_threadpool(websub.delivered, self.web.engine, subscription, now=now)
        log.info(
            "websub content stored",
            extra={
                "feed": subscription.feed_url,
                "added": report.added,
                "updated": report.updated,
                "unchanged": report.unchanged,
            },
        )
        return Response(status_code=202, headers=NO_STORE)


def _lease(value: str | None) -> timedelta | None:
    """The granted lease: a positive whole number of seconds (at most a year), else None."""
    if value is None or not value.isdigit() or len(value) > 10:
        return None
    seconds = int(value)
    return min(timedelta(seconds=seconds), MAX_LEASE) if seconds > 0 else None


def _source(sources: tuple[Source, ...], feed_url: str) -> Source | None:
    return next((s for s in sources if s.type == "feed" and s.url == feed_url), None)
