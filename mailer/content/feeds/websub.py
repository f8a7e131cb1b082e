"""WebSub (W3C Recommendation): a feed that names a hub pushes its new entries to us.

``websub_subscriptions`` holds one row per feed source; this module is its only writer. The
fetch round calls ``maintain`` after each fetch: it subscribes when the feed names a hub (so
the first subscription follows the first fetch), renews before the lease ends, and says when
the feed is polled next (``poll_due``): rarely while the hub delivers, at the normal interval
when the hub has been silent or the lease lapsed. The web app's ``/websub/{token}`` route
(``mailer.web.websub``) answers the hub's verification and takes its content.

The subscription request goes out on the fetch round's guarded client, so the hub's address
is checked like a feed's (private addresses only when the source allows them).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
import sqlalchemy as sa

from mailer.content.feeds.guard import AddressRefused, allowing_private
from mailer.db.engine import reading
from mailer.db.schema import websub_subscriptions as table
from mailer.subscribers.tokens import Purpose, make_token, new_uid

log = logging.getLogger(__name__)

CALLBACK_PATH = "/websub/{token}"
# What we ask for; the hub grants what it will (hub.lease_seconds in its verification).
LEASE_ASKED = timedelta(days=10)
# Renewed when 80 % of the lease has passed, and at the latest one day before it ends.
RENEW_AT = 0.8
RENEW_BEFORE = timedelta(days=1)
# A request the hub has not verified in this long is sent again; a denied one, after a day.
RETRY_AFTER = timedelta(days=1)
REQUEST_TIMEOUT = 10.0
MAX_ERROR_TEXT = 2_000


@dataclass(frozen=True)
class Subscription:
    """One feed's subscription to its hub, as stored."""

    feed_url: str
    callback_id: str
    topic: str
    hub: str
    secret: str
    state: str  # pending, verified, denied
    asked: str | None  # "subscribe" while our request waits for verification
    requested_at: datetime | None
    verified_at: datetime | None
    lease_expires_at: datetime | None
    last_content_at: datetime | None
    last_error: str | None

    def live(self, now: datetime) -> bool:
        """Verified and within its lease: the hub is expected to deliver."""
        return (
            self.state == "verified"
            and self.lease_expires_at is not None
            and self.lease_expires_at > now
        )

    def renew_at(self) -> datetime | None:
        """When the lease is renewed: at 80 % of it, at the latest a day before it ends, but
        not before half of it (a short lease is not renewed on every fetch)."""
        if self.verified_at is None or self.lease_expires_at is None:
            return None
        lease = self.lease_expires_at - self.verified_at
        due = min(self.verified_at + lease * RENEW_AT, self.lease_expires_at - RENEW_BEFORE)
        return max(due, self.verified_at + lease / 2)


def callback_url(base_url: str, secret: bytes, callback_id: str) -> str:
    """The callback the hub calls: the site's ``/websub/<signed token>``."""
    token = make_token(secret, Purpose.WEBSUB, callback_id)
    return base_url.rstrip("/") + CALLBACK_PATH.format(token=token)


def load_subscriptions(engine: sa.Engine) -> dict[str, Subscription]:
    """Every subscription, by the feed source's URL."""
    with reading(engine) as conn:
        return {
            row.feed_url: Subscription(**row._mapping) for row in conn.execute(sa.select(table))
        }


def by_callback(engine: sa.Engine, callback_id: str) -> Subscription | None:
    """The subscription a callback URL names, or None."""
    with reading(engine) as conn:
        row = conn.execute(sa.select(table).where(table.c.callback_id == callback_id)).first()
    return Subscription(**row._mapping) if row is not None else None


def poll_due(
    subscription: Subscription | None,
    last_fetched_at: datetime | None,
    now: datetime,
    *,
    poll_every: timedelta,
) -> datetime | None:
    """When the fetch round polls a feed the hub delivers for next; None: at the normal
    interval (no live subscription, or the hub has been silent longer than ``poll_every``)."""
    if subscription is None or not subscription.live(now) or last_fetched_at is None:
        return None
    heard = max(t for t in (subscription.last_content_at, subscription.verified_at) if t)
    if now - heard > poll_every:
        return None
    # The renewal rides on a fetch: the feed is polled by then, so the lease never lapses.
    renew = subscription.renew_at()
    polled = last_fetched_at + poll_every
    return min(polled, renew) if renew is not None else polled


def needs_request(subscription: Subscription | None, hub: str, topic: str, now: datetime) -> bool:
    """True when a subscription request should go to ``hub`` for ``topic`` now."""
    if subscription is None or (subscription.hub, subscription.topic) != (hub, topic):
        return True
    asked = subscription.requested_at
    if subscription.state == "denied" or subscription.asked == "subscribe":
        return asked is None or now - asked >= RETRY_AFTER
    renew = subscription.renew_at()
    return renew is None or now >= renew


async def maintain(
    engine: sa.Engine,
    client: httpx.AsyncClient,
    feed_url: str,
    *,
    hub: str | None,
    topic: str | None,
    callback_base: str,
    site_secret: bytes,
    now: datetime,
    allow_private: bool,
) -> Subscription | None:
    """Subscribe to (or renew with) the hub the feed names, when due; the row as it stands.

    ``hub``/``topic`` None (a 304, nothing read): the stored ones are renewed. A failed
    request is recorded in ``last_error`` and logged; it never fails the fetch.
    """
    current = (await asyncio.to_thread(load_subscriptions, engine)).get(feed_url)
    if hub is None or topic is None:
        if current is None:
            return None
        hub, topic = current.hub, current.topic
    if not needs_request(current, hub, topic, now):
        return current
    fresh = current is None or (current.hub, current.topic) != (hub, topic)
    callback_id = current.callback_id if current is not None else new_uid()
    secret = secrets.token_urlsafe(32) if fresh or current is None else current.secret
    values: dict[str, Any] = {
        "hub": hub,
        "topic": topic,
        "secret": secret,
        "asked": "subscribe",
        "requested_at": now,
    }
    if fresh:
        values |= {
            "state": "pending",
            "verified_at": None,
            "lease_expires_at": None,
            "last_content_at": None,
            "last_error": None,
        }
    # Stored before the request: the hub may call back before its answer reaches us.
    await asyncio.to_thread(_save, engine, feed_url, callback_id, values)
    error = await _request(
        client,
        hub,
        {
            "hub.mode": "subscribe",
            "hub.topic": topic,
            "hub.callback": callback_url(callback_base, site_secret, callback_id),
            "hub.secret": secret,
            "hub.lease_seconds": str(int(LEASE_ASKED.total_seconds())),
        },
        allow_private=allow_private,
    )
    if error is not None:
        log.warning(
            "websub subscription request failed",
            extra={"feed": feed_url, "hub": hub, "error": error},
        )
        await asyncio.to_thread(_save, engine, feed_url, callback_id, {"last_error": error})
    else:
        log.info("websub subscription requested", extra={"feed": feed_url, "hub": hub})
    return (await asyncio.to_thread(load_subscriptions, engine)).get(feed_url)


async def _request(
    client: httpx.AsyncClient, hub: str, form: dict[str, str], *, allow_private: bool
) -> str | None:
    """POST the form to the hub; None when it accepted (2xx), else what went wrong."""
    headers = {"Connection": "close"} if allow_private else {}
    try:
        with allowing_private(allow_private):
            response = await client.post(hub, data=form, headers=headers, timeout=REQUEST_TIMEOUT)
    except httpx.ConnectError as exc:
        if isinstance(exc.__cause__, AddressRefused):
            return str(exc.__cause__)
        return f"ConnectError: {exc}".rstrip(": ")
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        return f"{type(exc).__name__}: {exc}".rstrip(": ")
    if response.is_success:
        return None
    text = response.text.strip().replace("\n", " ")[:200]
    return f"the hub answered HTTP {response.status_code}" + (f": {text}" if text else "")


def _save(engine: sa.Engine, feed_url: str, callback_id: str, values: dict[str, Any]) -> None:
    with engine.begin() as conn:
        if values.get("last_error"):
            values = values | {"last_error": str(values["last_error"])[:MAX_ERROR_TEXT]}
        done = conn.execute(
            sa.update(table).where(table.c.feed_url == feed_url).values(values)
        ).rowcount
        if not done:
            conn.execute(
                sa.insert(table).values(feed_url=feed_url, callback_id=callback_id, **values)
            )


def verified(
    engine: sa.Engine, subscription: Subscription, *, lease: timedelta, now: datetime
) -> None:
    """The hub verified our subscribe request and granted ``lease``."""
    _save(
        engine,
        subscription.feed_url,
        subscription.callback_id,
        {
            "state": "verified",
            "asked": None,
            "verified_at": now,
            "lease_expires_at": now + lease,
            "last_error": None,
        },
    )


def denied(engine: sa.Engine, subscription: Subscription, *, reason: str, now: datetime) -> None:
    """The hub refused the subscription (``hub.mode=denied``); retried after ``RETRY_AFTER``."""
    _save(
        engine,
        subscription.feed_url,
        subscription.callback_id,
        {
            "state": "denied",
            "asked": None,
            "requested_at": now,
            "lease_expires_at": None,
            "last_error": f"denied by the hub: {reason}" if reason else "denied by the hub",
        },
    )


def delivered(engine: sa.Engine, subscription: Subscription, *, now: datetime) -> None:
    """The hub delivered content: the feed is alive and polled rarely."""
    _save(engine, subscription.feed_url, subscription.callback_id, {"last_content_at": now})


def content_failed(engine: sa.Engine, subscription: Subscription, error: str) -> None:
    """Content arrived but could not be used: said where ``mailer articles sources`` shows."""
    _save(engine, subscription.feed_url, subscription.callback_id, {"last_error": error})
