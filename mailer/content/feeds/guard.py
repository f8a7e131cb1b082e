"""Feed fetches reach public addresses only: no loopback, private, link-local, CGNAT, multicast,
unspecified or reserved address, on the first request or after any redirect, unless the source
sets ``allow_private = true``.

A feed URL is typed by staff but what it points at is decided by whoever runs its DNS and its
server: a redirect to ``http://169.254.169.254/`` or a name that resolves to ``127.0.0.1``
would make the service fetch from inside its own network. Checking the URL before the request
is not enough (a redirect, or DNS answering differently the second time: rebinding), so the
check sits where the connection is made. ``PublicOnlyBackend`` is an httpcore network backend:
it resolves the host itself, refuses every non-public address, and connects to the very
address it checked. TLS still verifies the certificate against the host name, which httpcore
passes to ``start_tls`` separately from the address.

httpx has no parameter for a network backend; ``plug_in`` sets it on the transport's
connection pool (see there). Whether private addresses are allowed is decided per fetch
(``allowing_private``), not per client, so sources with and without the flag share one client.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any

import anyio
import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# host, port -> the addresses to try, in order.
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]

ALLOW_HINT = "set allow_private = true on this source to allow it"

_allow_private: ContextVar[bool] = ContextVar("feed_allow_private", default=False)

# RFC 1918, IPv6 unique local (ULA) and the deprecated site-local block.
_PRIVATE = tuple(
    ipaddress.ip_network(net)
    for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7", "fec0::/10")
)
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
# NAT64's well-known prefix: the IPv4 address is the last 32 bits (RFC 6052).
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class AddressRefused(httpcore.ConnectError):
    """A connection refused because the address is not public; httpx raises it as the cause
    of an ``httpx.ConnectError``, and ``fetch_feed`` turns it into a FeedError."""


def non_public(address: IPAddress) -> str | None:
    """What kind of non-public address this is ("a loopback address"), None when public.

    An IPv6 address that carries an IPv4 one (``::ffff:127.0.0.1``, 6to4, NAT64) is judged by
    the IPv4 address it reaches.
    """
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        kind = non_public(embedded)
        return f"{kind} (as {embedded})" if kind else None
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:  # ipaddress counts IPv4 multicast as global
        return "a multicast address"
    if address in _CGNAT:
        return "a shared (CGNAT) address"
    if any(address in net for net in _PRIVATE if net.version == address.version):
        return "a private address"
    if address.is_reserved:
        return "a reserved address"
    if not address.is_global:
        return "a special-purpose (non-public) address"
    return None


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


@contextlib.contextmanager
def allowing_private(allow: bool) -> Iterator[None]:
    """Within this block (this task), connections may or may not reach non-public addresses.

    httpcore opens a connection inside the task that sends the request, so the flag set here
    is the one ``PublicOnlyBackend`` reads. A connection opened while allowed must not be kept
    for another fetch: ``fetch_feed`` sends ``Connection: close`` with those requests.
    """
    token = _allow_private.set(allow)
    try:
        yield
    finally:
        _allow_private.reset(token)


async def resolve(host: str, port: int) -> list[IPAddress]:
    """The addresses of ``host`` (itself when it is an address), in the resolver's order."""
    with contextlib.suppress(ValueError):
        return [ipaddress.ip_address(host)]
    try:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise httpcore.ConnectError(f"cannot resolve {host}: {exc.strerror or exc}") from exc
    found: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    return found


class PublicOnlyBackend(httpcore.AsyncNetworkBackend):
    """Connects through ``inner`` (httpcore's anyio backend by default) to the addresses
    ``resolver`` gives for the host, refusing non-public ones unless the fetch allows them."""

    def __init__(
        self,
        inner: httpcore.AsyncNetworkBackend | None = None,
        resolver: Resolver = resolve,
    ) -> None:
        self._inner = inner or httpcore.AnyIOBackend()
        self._resolve = resolver

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            with anyio.fail_after(timeout):
                addresses = await self._resolve(host, port)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from exc
        if not addresses:
            raise httpcore.ConnectError(f"cannot resolve {host}: no address")
        if not _allow_private.get():
            public = [a for a in addresses if non_public(a) is None]
            if not public:
                raise AddressRefused(_refusal(host, addresses[0]))
            addresses = public
        failure: Exception | None = None
        for address in addresses:
            try:
                # The checked address itself, never the name: nothing resolves it again.
                return await self._inner.connect_tcp(
                    str(address), port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise AddressRefused(f"refused: the Unix socket {path} is not a feed address")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _refusal(host: str, address: IPAddress) -> str:
    what = non_public(address)
    try:
        literal = ipaddress.ip_address(host) == address
    except ValueError:
        literal = False
    if literal:
        return f"refused: {host} is {what}; {ALLOW_HINT}"
    return f"refused: {host} resolves to {address}, {what}; {ALLOW_HINT}"


def plug_in(transport: httpx.AsyncHTTPTransport, backend: httpcore.AsyncNetworkBackend) -> None:
    """Make every connection ``transport`` opens go through ``backend``.

    httpx builds its connection pool in ``AsyncHTTPTransport.__init__`` (``transport._pool``,
    an ``httpcore.AsyncConnectionPool``) and takes no backend argument; the pool hands its
    ``_network_backend`` to each connection it creates. Replacing that attribute before the
    first request keeps everything else httpx configured (TLS context, limits, HTTP/1.1).
    Both names are private: tests/test_feed_addresses.py pins them, and this raises rather
    than let feeds be fetched unguarded if an upgrade renames them.
    """
    pool = getattr(transport, "_pool", None)
    if not isinstance(pool, httpcore.AsyncConnectionPool) or not hasattr(pool, "_network_backend"):
        raise RuntimeError(
            "httpx.AsyncHTTPTransport no longer has an httpcore pool with _network_backend;"
            " feed address checks cannot be installed (check the httpx/httpcore versions)"
        )
    pool._network_backend = backend
