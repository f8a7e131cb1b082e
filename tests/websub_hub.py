"""A WebSub hub and publisher on 127.0.0.1 and an ephemeral port, for the tests.

It serves one Atom feed (``/feed.atom``) that names the hub (``/hub``) and itself. A subscribe
request (form POST to ``/hub``) is answered 202 and then verified the way a hub does it: a
GET to the callback with a challenge, from another thread, whose answer is kept in
``verifications``. ``distribute`` POSTs content to the callback, signed as asked.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import secrets
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ATOM_TYPE = "application/atom+xml"
LEASE_GRANTED = 864_000  # what the hub grants: ten days


def atom(base: str, *entries: str, hub: bool = True) -> bytes:
    """An Atom feed at ``base/feed.atom`` with one entry per guid in ``entries``."""
    links = (
        f'<link rel="hub" href="{base}/hub"/><link rel="self" href="{base}/feed.atom"/>'
        if hub
        else ""
    )
    items = "".join(
        f"<entry><id>urn:test:{guid}</id><title>Gate {guid} closed</title>"
        f'<link href="https://news.example.org/{guid}"/>'
        f"<updated>2026-11-20T10:00:00Z</updated>"
        f"<summary>The {guid} gate is closed for repairs until Monday.</summary></entry>"
        for guid in entries
    )
    return (
        f'<?xml version="1.0" encoding="utf-8"?><feed xmlns="http://www.w3.org/2005/Atom">'
        f"<id>{base}/feed.atom</id><title>Base alerts</title>"
        f"<updated>2026-11-20T10:00:00Z</updated>{links}{items}</feed>"
    ).encode()


@dataclass
class Verification:
    """One verification GET the hub made and what the subscriber answered."""

    mode: str
    topic: str
    challenge: str
    status: int
    body: str


@dataclass
class Subscribe:
    """One subscription request the hub received (its form fields)."""

    form: dict[str, str]

    @property
    def callback(self) -> str:
        return self.form["hub.callback"]

    @property
    def secret(self) -> str:
        return self.form["hub.secret"]


@dataclass
class HubServer(ThreadingHTTPServer):
    subscribes: list[Subscribe] = field(default_factory=list)
    verifications: list[Verification] = field(default_factory=list)
    feed_gets: int = 0
    verified: threading.Event = field(default_factory=threading.Event)
    entries: tuple[str, ...] = ("one",)
    # False: subscribe requests are accepted and left unverified (the test verifies by hand).
    auto_verify: bool = True
    threads: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def feed_url(self) -> str:
        return self.base + "/feed.atom"

    def verify(self, callback: str, *, topic: str, mode: str = "subscribe") -> Verification:
        """The hub's verification GET to ``callback``; its answer."""
        challenge = secrets.token_urlsafe(16)
        query = urllib.parse.urlencode(
            {
                "hub.mode": mode,
                "hub.topic": topic,
                "hub.challenge": challenge,
                "hub.lease_seconds": str(LEASE_GRANTED),
            }
        )
        status, body = _call(urllib.request.Request(f"{callback}?{query}"))
        answer = Verification(mode, topic, challenge, status, body.decode(errors="replace"))
        self.verifications.append(answer)
        return answer

    def distribute(
        self, callback: str, body: bytes, *, secret: str | None, method: str = "sha256"
    ) -> int:
        """POST ``body`` to ``callback`` as content distribution, signed under ``secret``
        (None: unsigned) with ``method`` (sha256: ``X-Hub-Signature-256``, others the spec's
        ``X-Hub-Signature``); the answer's status."""
        headers = {"Content-Type": ATOM_TYPE}
        if secret is not None:
            digest = hmac.new(secret.encode(), body, getattr(hashlib, method)).hexdigest()
            name = "X-Hub-Signature-256" if method == "sha256" else "X-Hub-Signature"
            headers[name] = f"{method}={digest}"
        return _call(urllib.request.Request(callback, data=body, headers=headers))[0]


def declare_only(callback: str, length: int) -> int:
    """A content POST that declares ``length`` bytes and sends none: the answer's status (the
    subscriber must refuse by the declared length, before reading)."""
    url = urllib.parse.urlsplit(callback)
    connection = http.client.HTTPConnection(url.netloc, timeout=10)
    try:
        connection.putrequest("POST", url.path)
        connection.putheader("Content-Type", ATOM_TYPE)
        connection.putheader("Content-Length", str(length))
        connection.endheaders()
        return connection.getresponse().status
    finally:
        connection.close()


def _call(request: urllib.request.Request) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class _Handler(BaseHTTPRequestHandler):
    server: HubServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path != "/feed.atom":
            self.send_error(404)
            return
        self.server.feed_gets += 1
        body = atom(self.server.base, *self.server.entries)
        self.send_response(200)
        self.send_header("Content-Type", ATOM_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
        if self.path != "/hub" or form.get("hub.mode") != "subscribe":
            self.send_error(400)
            return
        request = Subscribe(form)
        self.server.subscribes.append(request)
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()
        if self.server.auto_verify:
            # The hub verifies after it has answered, as the spec has it (asynchronously).
            thread = threading.Thread(target=self._verify, args=(request,), name="hub-verify")
            self.server.threads.append(thread)
            thread.start()

    def _verify(self, request: Subscribe) -> None:
        self.server.verify(request.callback, topic=request.form["hub.topic"])
        self.server.verified.set()


@contextmanager
def running_hub() -> Iterator[HubServer]:
    hub = HubServer()
    thread = threading.Thread(
        target=hub.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server"
    )
    thread.start()
    try:
        yield hub
    finally:
        hub.shutdown()
        hub.server_close()
        thread.join(timeout=5)
        for verifying in hub.threads:
            verifying.join(timeout=10)
