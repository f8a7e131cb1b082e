"""WebSub: a feed that names a hub is subscribed to; the hub verifies and pushes content.

Real HTTP both ways: the local hub of tests/websub_hub.py (which also serves the feed) and the
web app served by uvicorn (tests/served.py), on both databases; clocks are fixed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from mailer.cli import cli
from mailer.config.settings import Settings
from mailer.content.feeds.parse import parse_feed
from mailer.content.feeds.websub import Subscription, load_subscriptions, poll_due
from mailer.content.sources import fetch_sources
from mailer.content.store import list_articles
from mailer.service import Service
from mailer.web.server import ServerThread
from tests.factories import BASE_CONFIG, NOW, SECRET, Clock, make_settings, write_config
from tests.served import at, serve
from tests.websub_hub import LEASE_GRANTED, HubServer, atom, declare_only, running_hub

LEASE = timedelta(seconds=LEASE_GRANTED)
MINUTE = timedelta(minutes=1)


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with running_hub() as server:
        yield server


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def site(
    db_url: str, engine: sa.Engine, hub: HubServer, clock: Clock
) -> Iterator[tuple[ServerThread, Settings]]:
    """The web app at its own address, with the hub's feed as its one source."""

    def settings_for(base_url: str) -> Settings:
        source = {
            "type": "feed",
            "url": hub.feed_url,
            "topic": "base-alerts",
            "allow_private": True,
        }
        return make_settings(db_url, **at(base_url), sources=[source])

    with serve(settings_for, engine, clock=clock) as (server, _, settings):
        yield server, settings


def fetch(engine: sa.Engine, settings: Settings, at: timedelta, *, round: bool = False) -> list:
    """One fetch of every source at ``NOW + at``: the scheduler's round or staff's command."""
    return asyncio.run(fetch_sources(engine, settings, now=NOW + at, honour_backoff=round))


def subscription(engine: sa.Engine, hub: HubServer) -> Subscription:
    return load_subscriptions(engine)[hub.feed_url]


def subscribed(engine: sa.Engine, settings: Settings, hub: HubServer) -> Subscription:
    """The first fetch: the feed's entry stored, the hub asked, its verification answered."""
    [result] = fetch(engine, settings, timedelta(0))
    assert (result.error, result.added) == (None, 1)
    assert hub.verified.wait(10), "the hub never verified"
    hub.verified.clear()
    return subscription(engine, hub)


def guids(engine: sa.Engine) -> set[str]:
    return {a.guid for a in list_articles(engine)}


def test_the_first_fetch_subscribes_and_signed_content_is_stored(
    engine: sa.Engine, site: tuple[ServerThread, Settings], hub: HubServer
) -> None:
    _, settings = site
    current = subscribed(engine, settings, hub)

    [asked] = hub.subscribes
    assert asked.form["hub.topic"] == hub.feed_url
    assert asked.form["hub.mode"] == "subscribe"
    assert asked.callback.startswith(settings.site.base_url + "/websub/")
    assert int(asked.form["hub.lease_seconds"]) > 0
    assert len(asked.secret) >= 32
    [check] = hub.verifications
    assert (check.status, check.body) == (200, check.challenge)
    assert current.state == "verified"
    assert current.verified_at == NOW
    assert current.lease_expires_at == NOW + LEASE

    body = atom(hub.base, "two", "three")
    assert hub.distribute(asked.callback, body, secret=asked.secret) in (200, 202)
    assert {"urn:test:one", "urn:test:two", "urn:test:three"} == guids(engine)
    assert subscription(engine, hub).last_content_at == NOW

    # The spec's own header, X-Hub-Signature, with any of its methods.
    for method in ("sha1", "sha512"):
        body = atom(hub.base, method)
        assert hub.distribute(asked.callback, body, secret=asked.secret, method=method) == 202
    assert {"urn:test:sha1", "urn:test:sha512"} <= guids(engine)

    # Over [feeds].max_bytes: refused before it is read.
    assert declare_only(asked.callback, settings.feeds.max_bytes + 1) == 413


def test_unsigned_or_wrongly_signed_content_stores_nothing(
    engine: sa.Engine,
    site: tuple[ServerThread, Settings],
    hub: HubServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, settings = site
    subscribed(engine, settings, hub)
    [asked] = hub.subscribes
    body = atom(hub.base, "forged")

    # The spec: content that fails the check is ignored, but the answer is still 2xx.
    assert hub.distribute(asked.callback, body, secret=None) == 202
    assert hub.distribute(asked.callback, body, secret="not-the-secret") == 202
    tampered = hub.distribute(asked.callback, body + b" ", secret=None)
    assert tampered == 202
    assert guids(engine) == {"urn:test:one"}
    assert subscription(engine, hub).last_content_at is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings.count("websub content ignored: missing or wrong X-Hub-Signature") == 3


def test_a_verification_we_did_not_ask_for_is_404(
    engine: sa.Engine, site: tuple[ServerThread, Settings], hub: HubServer
) -> None:
    server, settings = site
    subscribed(engine, settings, hub)
    [asked] = hub.subscribes

    # Verified already: a second verification (nothing pending) is not echoed.
    assert hub.verify(asked.callback, topic=hub.feed_url).status == 404
    # Another topic on our callback, a forged token, an unsubscribe we never asked for.
    assert hub.verify(asked.callback, topic=hub.base + "/other.atom").status == 404
    forged = asked.callback[:-4] + ("AAAA" if not asked.callback.endswith("AAAA") else "BBBB")
    assert hub.verify(forged, topic=hub.feed_url).status == 404
    unsubscribe = hub.verify(asked.callback, topic=hub.feed_url, mode="unsubscribe")
    assert unsubscribe.status == 404
    assert hub.verify(server.url + "/websub/nonsense", topic=hub.feed_url).status == 404
    # Content to a forged callback is 404 too, and stores nothing.
    assert hub.distribute(forged, atom(hub.base, "x"), secret=asked.secret) == 404
    assert guids(engine) == {"urn:test:one"}


def test_a_pending_subscription_is_verified_only_for_its_topic(
    engine: sa.Engine, site: tuple[ServerThread, Settings], hub: HubServer
) -> None:
    _, settings = site
    hub.auto_verify = False
    fetch(engine, settings, timedelta(0))
    [asked] = hub.subscribes
    assert subscription(engine, hub).state == "pending"

    assert hub.verify(asked.callback, topic=hub.base + "/other.atom").status == 404
    assert subscription(engine, hub).state == "pending"
    # Content before verification is not taken either.
    assert hub.distribute(asked.callback, atom(hub.base, "early"), secret=asked.secret) == 404

    check = hub.verify(asked.callback, topic=hub.feed_url)
    assert (check.status, check.body) == (200, check.challenge)
    assert subscription(engine, hub).state == "verified"
    assert guids(engine) == {"urn:test:one"}


def test_the_lease_is_renewed_before_it_ends(
    engine: sa.Engine, site: tuple[ServerThread, Settings], hub: HubServer, clock: Clock
) -> None:
    _, settings = site
    first = subscribed(engine, settings, hub)
    assert first.renew_at() == NOW + timedelta(days=8)  # 80 % of ten days

    # Before 80 % of the lease: no request.
    fetch(engine, settings, timedelta(days=7, hours=23))
    assert len(hub.subscribes) == 1

    clock.value = NOW + timedelta(days=8)
    fetch(engine, settings, timedelta(days=8))
    assert hub.verified.wait(10)
    assert len(hub.subscribes) == 2
    renewal = hub.subscribes[-1]
    assert renewal.callback == hub.subscribes[0].callback
    assert renewal.secret == hub.subscribes[0].secret
    renewed = subscription(engine, hub)
    assert renewed.state == "verified"
    assert renewed.lease_expires_at == NOW + timedelta(days=8) + LEASE
    assert renewed.asked is None


def test_the_feed_is_polled_rarely_while_the_hub_delivers_and_normally_when_it_is_silent(
    engine: sa.Engine, site: tuple[ServerThread, Settings], hub: HubServer, clock: Clock
) -> None:
    _, settings = site
    subscribed(engine, settings, hub)
    [asked] = hub.subscribes
    assert hub.feed_gets == 1

    # The scheduler's rounds within six hours of the last poll leave the feed to the hub.
    for minutes in (15, 120, 355):
        [result] = fetch(engine, settings, timedelta(minutes=minutes), round=True)
        assert result.hub_delivers_until == NOW + timedelta(hours=6)
    assert hub.feed_gets == 1

    # The hub delivers at five hours: at six the feed is polled once, then left again.
    clock.value = NOW + timedelta(hours=5)
    assert hub.distribute(asked.callback, atom(hub.base, "two"), secret=asked.secret) == 202
    [result] = fetch(engine, settings, timedelta(hours=6), round=True)
    assert result.hub_delivers_until is None and result.error is None
    assert hub.feed_gets == 2
    [result] = fetch(engine, settings, timedelta(hours=6, minutes=15), round=True)
    assert result.hub_delivers_until == NOW + timedelta(hours=12)

    # Silent since five hours: past eleven, every round polls the feed again.
    for minutes in (12 * 60, 12 * 60 + 15, 12 * 60 + 30):
        [result] = fetch(engine, settings, timedelta(minutes=minutes), round=True)
        assert result.hub_delivers_until is None and result.error is None
    assert hub.feed_gets == 5


def test_a_lapsed_lease_means_normal_polling_and_a_new_request(
    engine: sa.Engine, site: tuple[ServerThread, Settings], hub: HubServer, clock: Clock
) -> None:
    _, settings = site
    subscribed(engine, settings, hub)
    hub.auto_verify = False  # the hub has gone quiet: it takes requests and verifies none

    lapsed = LEASE + timedelta(minutes=1)
    clock.value = NOW + lapsed
    [result] = fetch(engine, settings, lapsed, round=True)
    assert result.hub_delivers_until is None and result.error is None
    assert hub.feed_gets == 2
    assert len(hub.subscribes) == 2
    assert subscription(engine, hub).asked == "subscribe"
    [result] = fetch(engine, settings, lapsed + timedelta(minutes=15), round=True)
    assert result.hub_delivers_until is None
    assert hub.feed_gets == 3
    # Asked a moment ago and not verified yet: not asked again every round.
    assert len(hub.subscribes) == 2


def test_sources_shows_the_hub_state(
    engine: sa.Engine,
    db_url: str,
    site: tuple[ServerThread, Settings],
    hub: HubServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, settings = site
    monkeypatch.setenv("MAILER_SECRET_KEY", SECRET)
    monkeypatch.setattr("mailer.cli.articles.now", lambda: NOW + timedelta(hours=1))
    source = {"type": "feed", "url": hub.feed_url, "topic": "base-alerts", "allow_private": True}
    config = write_config(tmp_path / "mailer.toml", db_url, sources=[source])

    def hub_lines() -> list[str]:
        shown = CliRunner().invoke(cli, ["--config", str(config), "articles", "sources"])
        assert shown.exit_code == 0, shown.output
        return [line for line in shown.output.splitlines() if "hub" in line.split(":")[0]]

    hub.auto_verify = False
    fetch(engine, settings, timedelta(0))
    assert hub_lines() == [
        f"  hub:          pending: waiting for the hub to verify ({hub.base}/hub)"
    ]
    [asked] = hub.subscribes
    assert hub.verify(asked.callback, topic=hub.feed_url).status == 200
    [line] = hub_lines()
    assert line == (
        f"  hub:          subscribed until 2026-11-30 07:00:00 EST ({hub.base}/hub, no content yet)"
    )


def held(lease: timedelta, *, content: timedelta | None = None) -> Subscription:
    """A subscription verified at NOW with ``lease``, content last heard ``content`` after."""
    return Subscription(
        feed_url="https://news.example.org/feed.atom",
        callback_id="A" * 22,
        topic="https://news.example.org/feed.atom",
        hub="https://hub.example.org/",
        secret="s" * 43,
        state="verified",
        asked=None,
        requested_at=NOW,
        verified_at=NOW,
        lease_expires_at=NOW + lease,
        last_content_at=NOW + content if content is not None else None,
        last_error=None,
    )


@pytest.mark.parametrize(
    ("lease", "renew"),
    [
        (timedelta(days=10), timedelta(days=8)),  # 80 %
        (timedelta(days=3), timedelta(days=2)),  # a day before the end comes first
        (timedelta(hours=2), timedelta(hours=1)),  # a short lease: at half, not at every fetch
    ],
)
def test_when_a_lease_is_renewed(lease: timedelta, renew: timedelta) -> None:
    assert held(lease).renew_at() == NOW + renew


def test_polling_waits_for_the_hub_but_not_past_the_renewal() -> None:
    six = timedelta(hours=6)
    assert poll_due(held(timedelta(days=10)), NOW, NOW + MINUTE, poll_every=six) == NOW + six
    short = held(timedelta(hours=2))
    assert poll_due(short, NOW, NOW + MINUTE, poll_every=six) == NOW + timedelta(hours=1)
    # Silent longer than six hours (content heard at one hour, now seven and a half): poll.
    heard = held(timedelta(days=10), content=timedelta(hours=1))
    later = NOW + timedelta(hours=7, minutes=30)
    assert poll_due(heard, NOW + timedelta(hours=7), later, poll_every=six) is None
    assert poll_due(None, NOW, NOW + MINUTE, poll_every=six) is None


def test_a_denial_from_the_hub_is_recorded(
    engine: sa.Engine, site: tuple[ServerThread, Settings], hub: HubServer
) -> None:
    _, settings = site
    hub.auto_verify = False
    fetch(engine, settings, timedelta(0))
    [asked] = hub.subscribes
    assert hub.verify(asked.callback, topic=hub.feed_url, mode="denied").status == 200
    denied = subscription(engine, hub)
    assert (denied.state, denied.asked) == ("denied", None)
    assert denied.last_error == "denied by the hub"
    # Denied: no challenge is echoed afterwards, and no new request until a day has passed.
    assert hub.verify(asked.callback, topic=hub.feed_url).status == 404
    fetch(engine, settings, timedelta(hours=23))
    assert len(hub.subscribes) == 1
    fetch(engine, settings, timedelta(days=1))
    assert len(hub.subscribes) == 2


def test_the_hub_and_self_links_are_read_from_rss_and_atom() -> None:
    rss = (
        b'<?xml version="1.0"?><rss version="2.0" xmlns:atom="http://www.w3.org/2005/Atom">'
        b"<channel><title>Alerts</title>"
        b'<atom:link rel="hub" href="https://hub.example.org/"/>'
        b'<atom:link rel="self" href="https://news.example.org/alerts.rss"/>'
        b"<item><guid>https://news.example.org/1</guid><title>Gate closed</title></item>"
        b"</channel></rss>"
    )
    parsed = parse_feed(
        rss, url="https://news.example.org/alerts.rss", topic="base-alerts", now=NOW
    )
    assert (parsed.hub, parsed.self_url) == (
        "https://hub.example.org/",
        "https://news.example.org/alerts.rss",
    )
    with_hub = parse_feed(atom("https://news.example.org"), url="x", topic="base-alerts", now=NOW)
    assert with_hub.hub == "https://news.example.org/hub"
    # A hub without a self link names no topic: nothing to subscribe to.
    no_self = rss.replace(b'rel="self"', b'rel="alternate"')
    parsed = parse_feed(
        no_self, url="https://news.example.org/alerts.rss", topic="base-alerts", now=NOW
    )
    assert (parsed.hub, parsed.self_url) == (None, None)


def test_content_from_the_hub_fires_an_arrival_digest(
    engine: sa.Engine, db_url: str, hub: HubServer, clock: Clock
) -> None:
    arrival = {
        "key": "alerts",
        "name": "Base alerts",
        "subject": "Base alert",
        "trigger": "arrival",
        "debounce_seconds": 0,
        "topics": ["base-alerts"],
        "max_articles": 5,
        "lookback_days": 2,
    }

    def settings_for(base_url: str) -> Settings:
        source = {"type": "feed", "url": hub.feed_url, "topic": "base-alerts"}
        digests = [*BASE_CONFIG["digests"], arrival]
        return make_settings(
            db_url, **at(base_url), sources=[{**source, "allow_private": True}], digests=digests
        )

    with serve(settings_for, engine, clock=clock) as (_, _, settings):
        service = Service(engine, settings, clock=clock)
        subscribed(engine, settings, hub)
        assert [i.articles for i in service.watch_arrivals().made] == [1]  # the fetched entry
        [asked] = hub.subscribes
        clock.value = NOW + timedelta(hours=1)
        body = atom(hub.base, "pushed")
        assert hub.distribute(asked.callback, body, secret=asked.secret) == 202
        [issue] = service.watch_arrivals().made
        assert issue.articles == 1
