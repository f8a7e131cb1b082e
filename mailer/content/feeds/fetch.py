"""Fetch a feed: one bounded HTTP GET (connect/read timeouts and an overall deadline, a byte
limit enforced while streaming, at most ``MAX_REDIRECTS`` hops, ``If-None-Match`` /
``If-Modified-Since``) → ``FetchResult``. Only public addresses are reached unless the source
allows private ones (``mailer.content.feeds.guard``).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import ssl
import weakref
from dataclasses import dataclass

import httpcore
import httpx

from mailer.content.feeds.guard import (
    AddressRefused,
    PublicOnlyBackend,
    Resolver,
    allowing_private,
    plug_in,
    resolve,
)
from mailer.errors import FeedError, FeedTimeoutError, FeedTooLargeError

MAX_FEED_BYTES = 5 * 1024 * 1024
MAX_REDIRECTS = 5
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 10.0
# The read timeout is per network read, so a server dripping a byte every few seconds never
# trips it; the deadline bounds the whole fetch, all redirect hops included.
FETCH_DEADLINE = 60.0

ACCEPT = (
    "application/rss+xml, application/atom+xml, application/xml;q=0.9, text/xml;q=0.9, */*;q=0.1"
)


def user_agent(contact_url: str | None = None) -> str:
    """``mailer/<version> (digest newsletter feed reader; +<contact_url>)``.

    Naming the service and a site lets a feed's owner see who polls them and whom to ask.
    """
    try:
        version = importlib.metadata.version("mailer")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    contact = f"; +{contact_url}" if contact_url else ""
    return f"mailer/{version} (digest newsletter feed reader{contact})"


def create_client(
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
    read_timeout: float = READ_TIMEOUT,
    agent: str | None = None,
    max_connections: int = 10,
    network: httpcore.AsyncNetworkBackend | None = None,
    resolver: Resolver = resolve,
    verify: ssl.SSLContext | bool = True,
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` for feeds; use it with ``async with`` so it is closed.

    Redirects are not followed by the client: ``fetch_feed`` follows them itself so the hop
    limit holds whoever built the client. Proxy variables and ``.netrc`` are ignored
    (``trust_env=False``): configuration is read at the edge, not from the environment.
    Every connection goes through ``PublicOnlyBackend`` (over ``network``, httpcore's own
    backend by default, with host names looked up by ``resolver``): ``fetch_feed`` refuses
    any other client. ``verify``: the certificates trusted (the system's by default).
    """
    transport = httpx.AsyncHTTPTransport(
        verify=verify, limits=httpx.Limits(max_connections=max_connections), trust_env=False
    )
    plug_in(transport, PublicOnlyBackend(network, resolver))
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
        headers={"User-Agent": agent or user_agent(), "Accept": ACCEPT},
        follow_redirects=False,
        transport=transport,
        trust_env=False,
    )
    _guarded.add(client)
    return client


# Clients whose connections pass the address check: those create_client made.
_guarded: weakref.WeakSet[httpx.AsyncClient] = weakref.WeakSet()


@dataclass(frozen=True)
class FetchResult:
    """One fetch: 200 with ``content``, or 304 (``not_modified``) with ``content == b""``.

    ``etag`` and ``last_modified`` are the validators the response gave (None if it gave none).
    """

    url: str
    final_url: str
    status: int
    content: bytes
    content_type: str | None
    etag: str | None
    last_modified: str | None
    redirects: int

    @property
    def not_modified(self) -> bool:
        return self.status == 304


async def fetch_feed(
    client: httpx.AsyncClient,
    url: str,
    *,
    etag: str | None = None,
    last_modified: str | None = None,
    max_bytes: int = MAX_FEED_BYTES,
    max_redirects: int = MAX_REDIRECTS,
    deadline: float = FETCH_DEADLINE,
    allow_private: bool = False,
) -> FetchResult:
    """GET ``url`` conditionally; raise FeedError (with ``status``) for anything but 2xx or 304.

    Redirects are followed up to ``max_redirects`` hops; the body is read up to ``max_bytes``
    (decoded bytes, so a gzip bomb counts at its inflated size); the whole fetch must finish
    within ``deadline`` seconds. Timeouts raise FeedTimeoutError, an oversized body
    FeedTooLargeError. A hop to a non-public address raises FeedError ("refused: …") unless
    ``allow_private``; ``client`` must come from ``create_client``, which installs that check.
    """
    if client not in _guarded:
        raise ValueError("fetch_feed needs a client from create_client (it checks addresses)")
    headers: dict[str, str] = {}
    if allow_private:
        # A connection to a private address must not be pooled and reused by a fetch that
        # does not allow one: the check runs only when a connection is opened.
        headers["Connection"] = "close"
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    try:
        async with asyncio.timeout(deadline):
            with allowing_private(allow_private):
                return await _fetch(client, url, headers, max_bytes, max_redirects)
    except FeedError:
        raise
    except TimeoutError as exc:
        raise FeedTimeoutError(
            url, f"timed out: no complete response within the {deadline:g} s fetch deadline"
        ) from exc
    except httpx.TimeoutException as exc:
        raise FeedTimeoutError(url, f"timed out ({_timeout_kind(exc)})") from exc
    except httpx.TooManyRedirects as exc:  # only if a caller's client follows redirects itself
        raise FeedError(url, f"too many redirects: {exc}") from exc
    except httpx.ConnectError as exc:
        if isinstance(exc.__cause__, AddressRefused):
            raise FeedError(url, str(exc.__cause__)) from exc
        raise FeedError(url, f"ConnectError: {exc}".rstrip(": ")) from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise FeedError(url, f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc


async def _fetch(
    client: httpx.AsyncClient,
    url: str,
    headers: dict[str, str],
    max_bytes: int,
    max_redirects: int,
) -> FetchResult:
    request = client.build_request("GET", url, headers=headers)
    hops = [url]
    while True:
        response = await client.send(request, stream=True, follow_redirects=False)
        try:
            # httpx builds the next request (relative Location, 303, headers) when it is a redirect.
            following = response.next_request
            if following is not None:
                if len(hops) > max_redirects:
                    loop = " (a redirect loop)" if len(set(hops)) < len(hops) else ""
                    raise FeedError(
                        url,
                        f"more than {max_redirects} redirects{loop}: {' → '.join(hops)} → "
                        f"{following.url}",
                        status=response.status_code,
                    )
                request = following
                hops.append(str(following.url))
                continue
            if response.status_code == 304:
                content = b""
            elif response.is_success:
                content = await _read_limited(response, url, max_bytes)
            else:
                raise FeedError(
                    url,
                    f"HTTP {response.status_code} {response.reason_phrase}".rstrip(),
                    status=response.status_code,
                )
            return FetchResult(
                url=url,
                final_url=str(response.url),
                status=response.status_code,
                content=content,
                content_type=response.headers.get("Content-Type"),
                etag=response.headers.get("ETag"),
                last_modified=response.headers.get("Last-Modified"),
                redirects=len(hops) - 1,
            )
        finally:
            await response.aclose()


async def _read_limited(response: httpx.Response, url: str, limit: int) -> bytes:
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise FeedTooLargeError(url, limit=limit, size=int(declared))
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.aiter_bytes():
        total += len(chunk)
        if total > limit:
            raise FeedTooLargeError(url, limit=limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _timeout_kind(exc: httpx.TimeoutException) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return "connecting"
    if isinstance(exc, httpx.ReadTimeout):
        return "waiting for data"
    if isinstance(exc, httpx.PoolTimeout):
        return "waiting for a free connection"
    return "sending the request"
