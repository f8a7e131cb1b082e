"""Feed fetches never reach a non-public address unless the source allows it, on the first
request or after a redirect, and the check is made on the address actually connected to.

The feed server is the real one of tests/test_feeds.py on 127.0.0.1. To fetch from it through
a name the check counts as public (the redirect case), the client is built with a resolver
that maps ``feeds.example`` to the public address ``PUBLIC`` and a network backend that routes
connections for ``PUBLIC`` to 127.0.0.1, as a NAT in front of the server would: the address
check itself (``PublicOnlyBackend``) runs unchanged between the two.
"""

from __future__ import annotations

import ipaddress
import ssl
import threading
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailer.content.feeds.fetch import create_client, fetch_feed
from mailer.content.feeds.guard import IPAddress, PublicOnlyBackend, non_public, plug_in, resolve
from mailer.content.feeds.state import load_feed_states
from mailer.content.sources import fetch_sources
from mailer.errors import FeedError
from tests.factories import NOW, make_settings
from tests.test_feeds import FeedServer, Route, _Handler, feed, server  # noqa: F401  (the server fixture)

PUBLIC = ipaddress.ip_address("93.184.215.14")
LOOPBACK = ipaddress.ip_address("127.0.0.1")
HINT = "set allow_private = true on this source to allow it"


class Nat(httpcore.AsyncNetworkBackend):
    """httpcore's own backend, with connections for ``PUBLIC`` sent to 127.0.0.1; records the
    address it was asked to connect to."""

    def __init__(self) -> None:
        self.inner = httpcore.AnyIOBackend()
        self.connected: list[str] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.connected.append(host)
        target = "127.0.0.1" if host == str(PUBLIC) else host
        return await self.inner.connect_tcp(target, port, timeout, local_address, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class KeepAlive(_Handler):
    """The feed server's handler on HTTP/1.1: connections stay open for the next request."""

    protocol_version = "HTTP/1.1"


NAMES: dict[str, list[IPAddress]] = {
    "feeds.example": [PUBLIC],
    "rebind.example": [LOOPBACK],
    "mixed.example": [LOOPBACK, PUBLIC],
    "other.example": [PUBLIC],
}


async def names(host: str, port: int) -> list[IPAddress]:
    return NAMES[host] if host in NAMES else await resolve(host, port)


@pytest.fixture
def nat() -> Nat:
    return Nat()


@pytest.fixture
async def client(nat: Nat) -> AsyncIterator[httpx.AsyncClient]:
    async with create_client(
        connect_timeout=2, read_timeout=2, network=nat, resolver=names
    ) as feed_client:
        yield feed_client


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "a loopback address"),
        ("127.8.9.10", "a loopback address"),
        ("::1", "a loopback address"),
        ("::ffff:127.0.0.1", "a loopback address (as 127.0.0.1)"),
        ("::ffff:10.0.0.1", "a private address (as 10.0.0.1)"),
        ("169.254.169.254", "a link-local address"),
        ("fe80::1", "a link-local address"),
        ("10.1.2.3", "a private address"),
        ("172.16.0.1", "a private address"),
        ("192.168.1.1", "a private address"),
        ("fd12:3456::1", "a private address"),
        ("100.64.0.1", "a shared (CGNAT) address"),
        ("224.0.0.1", "a multicast address"),
        ("ff02::1", "a multicast address"),
        ("0.0.0.0", "an unspecified address"),
        ("::", "an unspecified address"),
        ("240.0.0.1", "a reserved address"),
        ("192.0.2.1", "a special-purpose (non-public) address"),
        ("2002:7f00:1::", "a loopback address (as 127.0.0.1)"),  # 6to4
        ("64:ff9b::a00:1", "a private address (as 10.0.0.1)"),  # NAT64
        ("93.184.215.14", None),
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
    ],
)
def test_addresses_are_classified(address: str, kind: str | None) -> None:
    assert non_public(ipaddress.ip_address(address)) == kind


@pytest.mark.parametrize(
    ("url", "refusal"),
    [
        ("http://[::1]:8080/feed", "::1 is a loopback address"),
        ("http://[::ffff:127.0.0.1]:8080/feed", "::ffff:127.0.0.1 is a loopback address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
        ("http://10.0.0.1/feed", "10.0.0.1 is a private address"),
        ("https://rebind.example/feed", "rebind.example resolves to 127.0.0.1, a loopback"),
    ],
)
async def test_a_non_public_address_is_refused_before_connecting(
    client: httpx.AsyncClient, nat: Nat, url: str, refusal: str
) -> None:
    with pytest.raises(FeedError, match="refused: ") as refused:
        await fetch_feed(client, url)
    assert refusal in str(refused.value)
    assert str(refused.value).endswith(HINT)
    assert nat.connected == []  # not even a TCP handshake


async def test_a_local_feed_is_refused_without_the_flag_and_fetched_with_it(
    engine: sa.Engine,
    server: FeedServer,  # noqa: F811
) -> None:
    server.serve_file("/feeds/base-alerts.rss", "base-alerts.rss")
    url = server.url("/feeds/base-alerts.rss")
    strict = {**feed(server, "/feeds/base-alerts.rss", "base-alerts"), "allow_private": False}
    (refused,) = await fetch_sources(engine, make_settings(sources=[strict]), now=NOW)
    assert refused.error == f"feed {url}: refused: 127.0.0.1 is a loopback address; {HINT}"
    assert server.seen == []
    # A failure like any other: it counts towards the backoff and the staff alert.
    assert load_feed_states(engine)[url].consecutive_failures == 1

    allowed = make_settings(sources=[feed(server, "/feeds/base-alerts.rss", "base-alerts")])
    (fetched,) = await fetch_sources(engine, allowed, now=NOW)
    assert (fetched.error, fetched.added) == (None, 4)
    assert load_feed_states(engine)[url].consecutive_failures == 0


async def test_a_redirect_from_a_public_name_to_loopback_is_refused(
    server: FeedServer,  # noqa: F811
    client: httpx.AsyncClient,
    nat: Nat,
) -> None:
    server.serve_file("/feed.rss", "base-alerts.rss")
    port = server.server_address[1]
    server.routes["/moved"] = Route(status=301, location=f"http://127.0.0.1:{port}/feed.rss")
    public_url = f"http://feeds.example:{port}/moved"

    with pytest.raises(FeedError) as refused:
        await fetch_feed(client, public_url)
    assert str(refused.value) == (
        f"feed {public_url}: refused: 127.0.0.1 is a loopback address; {HINT}"
    )
    assert [seen.path for seen in server.seen] == ["/moved"]  # the target was never asked
    assert nat.connected == [str(PUBLIC)]  # the checked address, not the name

    # The same hop, allowed: the redirect itself was fine, only its target was refused.
    fetched = await fetch_feed(client, public_url, allow_private=True)
    assert (fetched.status, fetched.redirects) == (200, 1)


async def test_only_the_public_addresses_of_a_name_are_tried(
    server: FeedServer,  # noqa: F811
    client: httpx.AsyncClient,
    nat: Nat,
) -> None:
    server.serve_file("/feed.rss", "base-alerts.rss")
    fetched = await fetch_feed(client, f"http://mixed.example:{server.server_address[1]}/feed.rss")
    assert fetched.status == 200
    assert nat.connected == [str(PUBLIC)]


async def test_a_connection_opened_for_an_allowed_fetch_is_not_reused_by_a_strict_one(
    server: FeedServer,  # noqa: F811
) -> None:
    server.serve_file("/feed.rss", "base-alerts.rss")
    server.RequestHandlerClass = KeepAlive  # else every answer closes its connection anyway
    async with create_client(connect_timeout=2, read_timeout=2) as plain:
        allowed = await fetch_feed(plain, server.url("/feed.rss"), allow_private=True)
        assert allowed.status == 200
        with pytest.raises(FeedError) as refused:
            await fetch_feed(plain, server.url("/feed.rss"))
    assert "refused: 127.0.0.1 is a loopback address" in str(refused.value)
    assert [seen.headers.get("connection") for seen in server.seen] == ["close"]


def test_the_check_is_plugged_into_httpx_where_it_expects() -> None:
    # What plug_in relies on: httpx's transport keeps an httpcore pool in ``_pool`` that hands
    # ``_network_backend`` to every connection it opens.
    transport = httpx.AsyncHTTPTransport()
    assert isinstance(transport._pool, httpcore.AsyncConnectionPool)
    assert isinstance(transport._pool._network_backend, httpcore.AsyncNetworkBackend)
    plug_in(transport, PublicOnlyBackend())
    assert isinstance(transport._pool._network_backend, PublicOnlyBackend)

    del transport._pool
    with pytest.raises(RuntimeError, match="feed address checks cannot be installed"):
        plug_in(transport, PublicOnlyBackend())


async def test_fetch_feed_refuses_a_client_without_the_check() -> None:
    async with httpx.AsyncClient() as unchecked:
        with pytest.raises(ValueError, match="needs a client from create_client"):
            await fetch_feed(unchecked, "https://news.example.org/feed.rss")


def self_signed(name: str, folder: Path) -> tuple[Path, Path]:
    """A certificate for ``name`` (no IP address in it) and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.now(UTC) - timedelta(hours=1))
        .not_valid_after(datetime.now(UTC) + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_tls_is_verified_against_the_name_not_the_checked_address(
    tmp_path: Path, nat: Nat
) -> None:
    """The check connects to an address, yet the certificate must still match the host name:
    a certificate for feeds.example (and no address) is accepted for https://feeds.example and
    refused for another name served from the same address."""
    cert_file, key_file = self_signed("feeds.example", tmp_path)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert_file, key_file)
    tls_server = FeedServer()
    tls_server.socket = served.wrap_socket(tls_server.socket, server_side=True)
    tls_server.serve_file("/feed.rss", "base-alerts.rss")
    thread = threading.Thread(target=tls_server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    port = tls_server.server_address[1]
    try:
        trusted = ssl.create_default_context(cafile=str(cert_file))
        async with create_client(
            connect_timeout=2, read_timeout=2, network=nat, resolver=names, verify=trusted
        ) as tls_client:
            fetched = await fetch_feed(tls_client, f"https://feeds.example:{port}/feed.rss")
            assert fetched.status == 200
            with pytest.raises(FeedError) as mismatch:
                await fetch_feed(tls_client, f"https://other.example:{port}/feed.rss")
        assert "Hostname mismatch" in str(mismatch.value)
        assert nat.connected == [str(PUBLIC), str(PUBLIC)]
    finally:
        tls_server.shutdown()
        tls_server.server_close()
        thread.join(timeout=5)
