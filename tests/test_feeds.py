"""Feeds and sources, against a real HTTP server on 127.0.0.1 serving the files in data/feeds.

The server is ``http.server`` in a thread: conditional requests (304), redirects, errors, slow
and huge responses all come from the server side; nothing on the client is patched.
"""

from __future__ import annotations

import dataclasses
import html
import socket
import sys
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from mailer.config.settings import Settings, Source
from mailer.content.feeds.fetch import MAX_FEED_BYTES, create_client, fetch_feed
from mailer.content.feeds.html import html_to_text, sanitize_html
from mailer.content.feeds.parse import parse_feed
from mailer.content.feeds.state import load_feed_states
from mailer.content.sources import SourceResult, fetch_sources, fetch_sources_sync
from mailer.db.schema import articles
from mailer.errors import ConfigError, FeedError, FeedTimeoutError, FeedTooLargeError
from tests.factories import NOW, TOPICS, make_settings

DATA = Path(__file__).parent / "data" / "feeds"
RSS = "application/rss+xml; charset=utf-8"
ATOM = "application/atom+xml; charset=utf-8"
LAST_MODIFIED = "Fri, 20 Nov 2026 02:05:00 GMT"
TEXT_FIELDS = ("title", "summary", "why_it_matters", "body", "link")


# ---------------------------------------------------------------------------------------------
# The server


@dataclass
class Route:
    """What the server answers on one path."""

    body: bytes = b""
    status: int = 200
    content_type: str = RSS
    etag: str | None = None
    last_modified: str | None = None
    location: str | None = None
    delay: float = 0.0  # seconds before the status line
    drip: float = 0.0  # seconds between body bytes
    content_length: bool = True  # False: the body ends when the connection closes


@dataclass(frozen=True)
class Seen:
    path: str
    headers: dict[str, str]  # names lower-cased


class FeedServer(ThreadingHTTPServer):
    """Serves ``routes``; records every request in ``seen``."""

    daemon_threads = False  # server_close() joins the request threads: none outlives its test

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, Route] = {}
        self.seen: list[Seen] = []
        self.release = threading.Event()  # set at teardown: slow answers stop waiting

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def serve_file(self, path: str, name: str, **route: Any) -> Route:
        content_type = ATOM if name.endswith(".atom") else RSS
        self.routes[path] = Route(
            body=(DATA / name).read_bytes(), content_type=content_type, **route
        )
        return self.routes[path]

    def requests(self, path: str) -> list[Seen]:
        return [seen for seen in self.seen if seen.path == path]

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (timeout, size limit) leaves a closed socket: expected here.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: FeedServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # pytest shows what failed; an access log per request is noise

    def do_GET(self) -> None:
        server = self.server
        server.seen.append(Seen(self.path, {k.lower(): v for k, v in self.headers.items()}))
        route = server.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        if route.delay and server.release.wait(route.delay):
            return
        if route.location is not None:
            self.send_response(route.status)
            self.send_header("Location", route.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self._not_modified(route):
            self.send_response(304)
            if route.etag:
                self.send_header("ETag", route.etag)
            self.end_headers()
            return
        self.send_response(route.status)
        self.send_header("Content-Type", route.content_type)
        if route.etag:
            self.send_header("ETag", route.etag)
        if route.last_modified:
            self.send_header("Last-Modified", route.last_modified)
        if route.content_length:
            self.send_header("Content-Length", str(len(route.body)))
        self.end_headers()
        if not route.drip:
            self.wfile.write(route.body)
            return
        for index in range(len(route.body)):
            self.wfile.write(route.body[index : index + 1])
            self.wfile.flush()
            if server.release.wait(route.drip):
                return

    def _not_modified(self, route: Route) -> bool:
        # RFC 9110 §13.2.2: If-None-Match is evaluated first; If-Modified-Since only without it.
        etag = self.headers.get("If-None-Match")
        if etag is not None:
            return route.etag is not None and etag == route.etag
        since = self.headers.get("If-Modified-Since")
        return since is not None and since == route.last_modified


@pytest.fixture
def server() -> Iterator[FeedServer]:
    feed_server = FeedServer()
    thread = threading.Thread(
        target=feed_server.serve_forever, kwargs={"poll_interval": 0.05}, name="feed-server"
    )
    thread.start()
    try:
        yield feed_server
    finally:
        feed_server.release.set()
        feed_server.shutdown()
        feed_server.server_close()
        thread.join(timeout=5)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with create_client(connect_timeout=2, read_timeout=2) as feed_client:
        yield feed_client


def serve_newsroom(server: FeedServer) -> None:
    """The three feeds of the site: validators by ETag, by date, and by both."""
    server.serve_file(
        "/feeds/base-alerts.rss", "base-alerts.rss", etag='"ba-1"', last_modified=LAST_MODIFIED
    )
    server.serve_file("/feeds/local-events.atom", "local-events.atom", etag='W/"le-1"')
    server.serve_file("/feeds/military-news.rss", "military-news.rss", last_modified=LAST_MODIFIED)


def feed(server: FeedServer, path: str, topic: str) -> dict[str, Any]:
    """A feed source on the local server: 127.0.0.1, so it must allow private addresses."""
    return {"type": "feed", "url": server.url(path), "topic": topic, "allow_private": True}


NEWSROOM = (
    ("/feeds/base-alerts.rss", "base-alerts"),
    ("/feeds/local-events.atom", "local-events"),
    ("/feeds/military-news.rss", "military-news"),
)


def newsroom_settings(server: FeedServer, *extra: dict[str, Any]) -> Settings:
    sources = [feed(server, path, topic) for path, topic in NEWSROOM]
    return make_settings(sources=[*sources, *extra])


def stored(engine: sa.Engine) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        return {row.guid: dict(row._mapping) for row in conn.execute(sa.select(articles))}


def counts(result: SourceResult) -> tuple[int, int, int]:
    return result.added, result.updated, result.unchanged


def parse(name: str, **overrides: Any) -> Any:
    options: dict[str, Any] = {
        "url": f"https://feeds.example.org/{name}",
        "topic": "military-news",
        "now": NOW,
        "content_type": ATOM if name.endswith(".atom") else RSS,
        "known_topics": TOPICS,
    }
    return parse_feed((DATA / name).read_bytes(), **(options | overrides))


def rss(*items: str) -> bytes:
    body = "".join(f"<item>{item}</item>" for item in items)
    return (
        '<?xml version="1.0" encoding="UTF-8"?><rss version="2.0"><channel><title>Test</title>'
        f"<link>https://news.example.org/</link>{body}</channel></rss>"
    ).encode()


# ---------------------------------------------------------------------------------------------
# Parsing (pure)


def test_rss_items_become_articles_with_scoped_guids_utc_dates_and_the_source_topic() -> None:
    parsed = parse("base-alerts.rss", topic="base-alerts")
    by_title = {a.title: a for a in parsed.articles}
    assert parsed.title == "Camp Lejeune & New River Updates — Base Alerts"
    assert parsed.skipped == ()
    assert parsed.warning is None
    gate = by_title["Piney Green Gate closed Nov. 21–23 for resurfacing"]
    # A guid that is not a URI is only unique within its feed: it is scoped by the feed URL.
    assert gate.guid == "https://feeds.example.org/base-alerts.rss#cl-alert-2026-1119-piney-green"
    assert gate.topic == "base-alerts"
    assert (
        gate.link == "https://news.example.org/2026/11/19/piney-green-gate-closed-for-resurfacing/"
    )
    assert gate.published_at == datetime(2026, 11, 19, 19, 30, tzinfo=UTC)
    assert gate.date_given
    assert gate.summary.split("\n\n") == [
        "The Piney Green Gate will be closed to all traffic from 6 p.m. Friday, Nov. 21, until "
        "5 a.m. Monday, Nov. 23, while contractors resurface the inbound and outbound lanes.",
        "Drivers should use the Main Gate on Holcomb Boulevard or the Wilson Gate. Expect heavier "
        "traffic at both during the Saturday morning shift change.",
    ]
    assert gate.why_it_matters == gate.body == ""
    noise = by_title["Live-fire training at G-10 impact area: expect noise through Saturday"]
    assert noise.guid == "https://news.example.org/2026/11/18/g-10-live-fire-noise-advisory/"
    # No guid: the link identifies it. No date: published now, and the store keeps the first.
    bus = by_title["Liberty bus schedule changes for Thanksgiving weekend"]
    assert bus.guid == "https://news.example.org/base-alerts/liberty-bus-thanksgiving/"
    assert (bus.published_at, bus.date_given) == (NOW, False)


def test_atom_entries_resolve_relative_links_and_keep_summary_and_content_apart() -> None:
    parsed = parse("local-events.atom", topic="local-events")
    parade, market, toys = parsed.articles
    assert parade.title == "Jacksonville Christmas Parade steps off Dec. 5 on Western & Lejeune"
    assert parade.link == "https://news.example.org/2026/11/19/jacksonville-christmas-parade/"
    assert parade.guid == "tag:news.example.org,2026:events/jacksonville-christmas-parade"
    assert parade.published_at == datetime(2026, 11, 19, 15, tzinfo=UTC)  # published, not updated
    assert parade.summary.startswith("The annual parade starts at 10 a.m.")
    assert parade.body.split("\n\n")[0] == (
        "The annual Jacksonville Christmas Parade starts at 10 a.m. Saturday, Dec. 5, "
        "at Western Boulevard and Lejeune Boulevard."
    )
    assert len(parade.body.split("\n\n")) == 3
    # XHTML content and no summary: the summary is the lead of the content.
    assert market.summary.startswith("The market on Onslow Pines Road opens Wednesday")
    assert toys.published_at == datetime(2026, 11, 17, 12, tzinfo=UTC)  # only <updated>
    assert {a.topic for a in parsed.articles} == {"local-events"}


def test_category_map_picks_the_topic_ignoring_case_else_the_source_topic() -> None:
    parsed = parse(
        "military-news.rss",
        categories={"Base Alerts": "base-alerts", "COMMUNITY": "local-events"},
    )
    assert [(a.guid.rsplit("#", 1)[1], a.topic) for a in parsed.articles] == [
        ("1873", "military-news"),  # II MEF, Training: not mapped
        ("1872", "base-alerts"),  # "base alerts"
        ("1869", "local-events"),  # "Community"
        ("1866", "military-news"),  # Aviation
    ]


def test_category_map_naming_an_unknown_topic_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'Weather' maps to unknown topic 'weather'") as caught:
        parse("military-news.rss", categories={"Weather": "weather"})
    assert caught.value.key == "sources.categories"


def test_script_handlers_and_javascript_urls_in_feed_html_are_gone_but_the_text_stays() -> None:
    story = parse("military-news.rss").articles[0]
    for name in TEXT_FIELDS:
        value = (getattr(story, name) or "").lower()
        for bad in ("<", "script", "onerror", "onclick", "javascript:", "alert(", "display:"):
            assert bad not in value, (name, bad)
    assert "your browser does not support" not in story.body.lower()  # iframe fallback dropped
    assert "resupply by MV-22 Ospreys from MCAS New River." in story.body
    assert "Read the division's statement" in story.body


@pytest.mark.parametrize(
    ("fragment", "expected_html", "expected_text"),
    [
        ("<p>Gate <b>open</b></p>", "<p>Gate <b>open</b></p>", "Gate open"),
        ('<img src="x.jpg" onerror="alert(1)">', '<img src="x.jpg">', ""),
        (
            '<a href="javascript:alert(1)" onclick="x()">map</a>',
            '<a rel="noopener noreferrer nofollow">map</a>',
            "map",
        ),
        ("<script>alert(1)</script>Hi", "Hi", "Hi"),
        ("<style>p{color:red}</style><p>Hi</p>", "<p>Hi</p>", "Hi"),
        ('<iframe src="https://v.example">No video</iframe>ok', "ok", "ok"),
        ("<svg onload=alert(1)><text>x</text></svg>ok", "ok", "ok"),
        ("<p>One</p><p>Two<br>lines</p>", "<p>One</p><p>Two<br>lines</p>", "One\n\nTwo lines"),
        ("Fish &amp; chips&nbsp;&lt;3", "Fish &amp; chips&nbsp;&lt;3", "Fish & chips <3"),
    ],
    ids=[
        "emphasis",
        "onerror",
        "javascript-url",
        "script",
        "style",
        "iframe",
        "svg",
        "paragraphs",
        "entities",
    ],
)
def test_sanitize_keeps_a_safe_subset_and_text_keeps_the_words(
    fragment: str, expected_html: str, expected_text: str
) -> None:
    assert sanitize_html(fragment) == expected_html
    assert html_to_text(sanitize_html(fragment)) == expected_text


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))


HOSTILE = st.lists(
    st.sampled_from(
        [
            "<script>alert(1)</script>",
            "<script>",
            "</script>",
            "<img src=x onerror=alert(1)>",
            "<a href='javascript:alert(1)'>",
            '<a href="JaVaScRiPt:alert(1)">',
            "</a>",
            "<svg onload=alert(1)>",
            "<iframe src=//evil>",
            "<style>",
            "<p>",
            "</p>",
            "<b>",
            "text",
            "<",
            ">",
            '"',
            "'",
            "=",
            "&lt;",
            "&#106;avascript:",
            "<!--",
            "-->",
            "<math><mi xlink:href='javascript:1'>",
            "<div style='x:expression(1)'>",
        ]
    ),
    max_size=20,
).map("".join)


@given(HOSTILE)
def test_sanitized_html_never_has_script_handlers_or_script_urls(fragment: str) -> None:
    tags = _Tags()
    tags.feed(sanitize_html(fragment))
    tags.close()
    for tag, attrs in tags.tags:
        assert tag not in ("script", "style", "iframe", "svg", "math"), fragment
        for name, value in attrs:
            assert not name.startswith("on") and name != "style", fragment
            assert not (value or "").strip().lower().startswith("javascript:"), fragment


@given(st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=200))
def test_escaped_text_comes_back_as_the_same_words(text: str) -> None:
    assert html_to_text(sanitize_html(html.escape(text))) == " ".join(text.split())


def test_a_long_description_gives_its_lead_as_summary_and_all_of_it_as_body() -> None:
    paragraphs = [f"Paragraph {n} " + "about the Main Gate traffic plan. " * 12 for n in range(6)]
    description = html.escape("".join(f"<p>{p}</p>" for p in paragraphs))
    parsed = parse_feed(
        rss(
            f"<title>Traffic</title><link>https://news.example.org/t</link>"
            f"<description>{description}</description>"
        ),
        url="https://feeds.example.org/all",
        topic="base-alerts",
        now=NOW,
    )
    (article,) = parsed.articles
    assert article.body.split("\n\n") == [p.strip() for p in paragraphs]
    assert article.summary == "\n\n".join(p.strip() for p in paragraphs[:2])
    assert len(article.summary) <= 1_000


def test_entries_without_identity_are_skipped_and_named_and_untitled_ones_borrow_words() -> None:
    parsed = parse_feed(
        rss(
            "<title>No link, no guid</title><description>Nothing to identify it.</description>",
            "<link>https://news.example.org/short</link><description>Water main repaired on "
            "Holcomb Boulevard; both lanes are open again.</description>",
            '<title>Bad link</title><link>javascript:alert(1)</link><guid isPermaLink="false">'
            "77</guid>",
            "<title>" + "Long " * 40 + "</title><guid>" + "g" * 600 + "</guid>",
        ),
        url="https://feeds.example.org/all",
        topic="base-alerts",
        now=NOW,
    )
    assert parsed.skipped == ("entry 1: no id and no http(s) link to identify it",)
    untitled, bad_link, long_guid = parsed.articles
    assert untitled.title.startswith("Water main repaired on Holcomb Boulevard")
    assert bad_link.link is None
    assert bad_link.guid == "https://feeds.example.org/all#77"
    assert long_guid.guid.startswith("urn:sha256:")
    assert len(long_guid.guid) <= 500


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ((DATA / "malformed.rss").read_bytes(), "not a well-formed feed: <unknown>:8:6"),
        (b"<html><body><h1>502 Bad Gateway</h1></body></html>", "not an RSS or Atom feed"),
        (b"", "not an RSS or Atom feed"),
        # feedparser opens a str or bytes naming a file; the bytes fetched must never be a path.
        (str(DATA / "base-alerts.rss").encode(), "not a well-formed feed"),
    ],
    ids=["malformed", "html-page", "empty", "a-file-name"],
)
def test_what_is_not_a_feed_is_a_feed_error(content: bytes, reason: str) -> None:
    with pytest.raises(FeedError, match=reason) as caught:
        parse_feed(content, url="https://feeds.example.org/x", topic="base-alerts", now=NOW)
    assert caught.value.url == "https://feeds.example.org/x"


def test_a_recoverable_xml_error_keeps_the_entries_and_says_so() -> None:
    parsed = parse_feed(
        rss("<title>Fish &nbsp; chips</title><link>https://news.example.org/fish</link>"),
        url="https://feeds.example.org/x",
        topic="local-events",
        now=NOW,
        content_type=RSS,
    )
    assert [a.title for a in parsed.articles] == ["Fish chips"]
    assert parsed.warning is not None and "undefined entity" in parsed.warning


# ---------------------------------------------------------------------------------------------
# HTTP


async def test_redirects_are_followed_up_to_five_hops(
    server: FeedServer, client: httpx.AsyncClient
) -> None:
    server.serve_file("/feeds/base-alerts.rss", "base-alerts.rss")
    server.routes["/hop/1"] = Route(status=301, location="/feeds/base-alerts.rss")
    for n in range(2, 7):
        server.routes[f"/hop/{n}"] = Route(status=302, location=server.url(f"/hop/{n - 1}"))
    result = await fetch_feed(client, server.url("/hop/5"), allow_private=True)
    assert (result.status, result.redirects) == (200, 5)
    assert result.final_url == server.url("/feeds/base-alerts.rss")
    assert result.content == (DATA / "base-alerts.rss").read_bytes()

    with pytest.raises(
        FeedError, match=r"more than 5 redirects: .*/hop/6 → .*/hop/1 → .*/base-alerts.rss$"
    ) as caught:
        await fetch_feed(client, server.url("/hop/6"), allow_private=True)
    assert caught.value.status == 301  # /hop/1's answer, the hop not taken
    assert len(server.requests("/feeds/base-alerts.rss")) == 1  # the sixth hop was not taken


async def test_a_redirect_loop_is_a_feed_error(
    server: FeedServer, client: httpx.AsyncClient
) -> None:
    server.routes["/loop/a"] = Route(status=302, location="/loop/b")
    server.routes["/loop/b"] = Route(status=307, location="/loop/a")
    with pytest.raises(FeedError, match="more than 5 redirects \\(a redirect loop\\)"):
        await fetch_feed(client, server.url("/loop/a"), allow_private=True)
    assert len(server.seen) == 6


def huge_feed(size: int) -> bytes:
    item = (
        "<item><title>Training advisory {n}</title><link>https://news.example.org/a/{n}</link>"
        "<description>Expect noise near the G-10 impact area.</description></item>"
    )
    items = []
    total = 0
    n = 0
    while total < size:
        items.append(item.format(n=n))
        total += len(items[-1])
        n += 1
    return rss(*(i.removeprefix("<item>").removesuffix("</item>") for i in items))


async def test_a_huge_feed_is_cut_off_at_the_size_limit_while_streaming(
    server: FeedServer, client: httpx.AsyncClient
) -> None:
    # No Content-Length: only counting the stream can stop it.
    server.routes["/huge"] = Route(body=huge_feed(MAX_FEED_BYTES + 500_000), content_length=False)
    with pytest.raises(FeedTooLargeError) as caught:
        await fetch_feed(client, server.url("/huge"), allow_private=True)
    assert (caught.value.limit, caught.value.size) == (MAX_FEED_BYTES, None)
    assert "the response is over the feed size limit of 5,242,880 bytes" in str(caught.value)


async def test_a_declared_length_over_the_limit_is_refused_before_reading(
    server: FeedServer, client: httpx.AsyncClient
) -> None:
    server.routes["/big"] = Route(body=huge_feed(20_000))
    with pytest.raises(
        FeedTooLargeError, match="bytes, over the feed size limit of 10,000 bytes"
    ) as caught:
        await fetch_feed(client, server.url("/big"), max_bytes=10_000, allow_private=True)
    assert caught.value.size == len(server.routes["/big"].body)


async def test_a_feed_dripping_bytes_hits_the_whole_fetch_deadline(
    server: FeedServer, client: httpx.AsyncClient
) -> None:
    # Each byte arrives well within the read timeout; only the deadline bounds the fetch.
    server.routes["/drip"] = Route(body=rss("<title>x</title>"), drip=0.05)
    with pytest.raises(FeedTimeoutError, match=r"0\.3 s fetch deadline") as caught:
        await fetch_feed(client, server.url("/drip"), deadline=0.3, allow_private=True)
    assert isinstance(caught.value, TimeoutError)


async def test_an_unreachable_server_is_a_feed_error(client: httpx.AsyncClient) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FeedError, match="ConnectError") as caught:
        await fetch_feed(client, f"http://127.0.0.1:{port}/feed", allow_private=True)
    assert caught.value.status is None


# ---------------------------------------------------------------------------------------------
# Sources, on both databases


def write_articles(folder: Path) -> None:
    folder.mkdir()
    (folder / "gate-hours.md").write_text(
        '+++\ntitle = "Wilson Gate hours extended"\npublished = 2026-11-19T08:00:00-05:00\n'
        'link = "https://news.example.org/2026/11/19/wilson-gate-hours"\n'
        'summary = "The Wilson Gate stays open until 10 p.m. on weekdays."\n+++\n\nFrom Monday.\n'
    )
    (folder / "concert.txt").write_text(
        "Holiday concert at the Onslow Civic Center\n\nSummary\n\nThe 2nd Marine Division "
        "Band plays Dec. 10 at 7 p.m.\n\nWhy this matters\n\nFree and family-friendly.\n\n"
        "Tickets at the door.\n"
    )
    (folder / "broken.md").write_text('+++\ntitle = "No end to this front matter"\n')
    (folder / "map.jpg").write_bytes(b"\xff\xd8\xff")  # not an article file: not read
    (folder / ".draft.md").write_text("+++\n")  # hidden: not read


async def test_fetch_sources_stores_feeds_and_a_directory_and_reports_each(
    engine: sa.Engine, server: FeedServer, tmp_path: Path
) -> None:
    serve_newsroom(server)
    write_articles(tmp_path / "articles")
    settings = newsroom_settings(
        server,
        {"type": "directory", "path": str(tmp_path / "articles"), "topic": "local-events"},
        {"type": "directory", "path": str(tmp_path / "missing"), "topic": "local-events"},
    )
    results = await fetch_sources(engine, settings, now=NOW)  # its own client, closed on return

    assert [counts(r) for r in results] == [(4, 0, 0), (3, 0, 0), (4, 0, 0), (2, 0, 0), (0, 0, 0)]
    assert [r.status for r in results] == [200, 200, 200, None, None]
    assert [r.error for r in results[:4]] == [None] * 4
    assert f"{tmp_path / 'missing'}: cannot read the folder" in (results[4].error or "")
    (problem,) = results[3].skipped
    assert "broken.md" in problem
    rows = stored(engine)
    assert len(rows) == 13
    assert {row["topic"] for row in rows.values()} == set(TOPICS)
    concert = next(r for r in rows.values() if r["title"].startswith("Holiday concert"))
    assert concert["topic"] == "local-events"  # the directory's topic for a file naming none
    agent = server.requests("/feeds/base-alerts.rss")[0].headers["user-agent"]
    assert agent.startswith("mailer/") and "+https://news.example.org" in agent
    states = load_feed_states(engine)
    assert states[server.url("/feeds/base-alerts.rss")].etag == '"ba-1"'
    assert states[server.url("/feeds/local-events.atom")].etag == 'W/"le-1"'
    assert states[server.url("/feeds/military-news.rss")].last_modified == LAST_MODIFIED


async def test_an_unchanged_feed_costs_one_304_and_changes_nothing(
    engine: sa.Engine, server: FeedServer, client: httpx.AsyncClient
) -> None:
    serve_newsroom(server)
    settings = newsroom_settings(server)
    await fetch_sources(engine, settings, now=NOW, client=client)
    before = stored(engine)
    server.seen.clear()

    later = NOW + timedelta(minutes=15)
    results = await fetch_sources(engine, settings, now=later, client=client)

    assert [(r.not_modified, r.status, counts(r)) for r in results] == [(True, 304, (0, 0, 0))] * 3
    assert len(server.seen) == 3  # one request per feed, nothing else
    assert server.requests("/feeds/base-alerts.rss")[0].headers["if-none-match"] == '"ba-1"'
    assert (
        server.requests("/feeds/base-alerts.rss")[0].headers["if-modified-since"] == LAST_MODIFIED
    )
    assert server.requests("/feeds/local-events.atom")[0].headers["if-none-match"] == 'W/"le-1"'
    military = server.requests("/feeds/military-news.rss")[0].headers
    assert military["if-modified-since"] == LAST_MODIFIED
    assert "if-none-match" not in military
    assert stored(engine) == before
    state = load_feed_states(engine)[server.url("/feeds/base-alerts.rss")]
    assert (state.last_status, state.etag, state.last_fetched_at) == (304, '"ba-1"', later)


async def test_an_updated_entry_updates_its_article(
    engine: sa.Engine, server: FeedServer, client: httpx.AsyncClient
) -> None:
    route = server.serve_file("/feeds/base-alerts.rss", "base-alerts.rss", etag='"ba-1"')
    settings = make_settings(sources=[feed(server, "/feeds/base-alerts.rss", "base-alerts")])
    await fetch_sources(engine, settings, now=NOW)
    old_title = "Piney Green Gate closed Nov. 21–23 for resurfacing"
    new_title = "Piney Green Gate closure extended through Nov. 24"
    route.body = route.body.replace(old_title.encode(), new_title.encode())
    route.etag = '"ba-2"'

    later = NOW + timedelta(hours=1)
    (result,) = await fetch_sources(engine, settings, now=later, client=client)

    assert (counts(result), result.not_modified) == ((0, 1, 3), False)
    assert server.requests("/feeds/base-alerts.rss")[1].headers["if-none-match"] == '"ba-1"'
    row = stored(engine)[server.url("/feeds/base-alerts.rss") + "#cl-alert-2026-1119-piney-green"]
    assert (row["title"], row["updated_at"], row["created_at"]) == (new_title, later, NOW)
    assert load_feed_states(engine)[server.url("/feeds/base-alerts.rss")].etag == '"ba-2"'


async def test_broken_feeds_are_recorded_and_never_stop_the_others(
    engine: sa.Engine, server: FeedServer
) -> None:
    server.serve_file("/feeds/base-alerts.rss", "base-alerts.rss")
    server.serve_file("/feeds/weather.rss", "malformed.rss")
    server.serve_file("/feeds/slow.rss", "military-news.rss", delay=5)
    unavailable = server.serve_file("/feeds/events.atom", "local-events.atom", status=503)
    settings = make_settings(
        sources=[
            feed(server, "/feeds/weather.rss", "base-alerts"),
            feed(server, "/feeds/slow.rss", "military-news"),
            feed(server, "/feeds/events.atom", "local-events"),
            feed(server, "/feeds/base-alerts.rss", "base-alerts"),
        ]
    )
    async with create_client(read_timeout=0.2) as impatient:
        results = await fetch_sources(engine, settings, now=NOW, client=impatient)
        again = await fetch_sources(
            engine, settings, now=NOW + timedelta(minutes=15), client=impatient
        )
        failing = load_feed_states(engine)
        unavailable.status = 200
        recovered = await fetch_sources(
            engine, settings, now=NOW + timedelta(minutes=30), client=impatient
        )

    weather, slow, events, alerts = results
    assert "not a well-formed feed" in (weather.error or "")
    assert "timed out (waiting for data)" in (slow.error or "")
    assert (events.status, events.error) == (
        503,
        f"feed {server.url('/feeds/events.atom')}: HTTP 503 Service Unavailable",
    )
    assert (alerts.error, counts(alerts)) == (None, (4, 0, 0))
    assert [r.ok for r in again] == [False, False, False, True]
    assert [failing[r.source.url or ""].consecutive_failures for r in again] == [2, 2, 2, 0]
    assert failing[server.url("/feeds/events.atom")].last_status == 503
    assert failing[server.url("/feeds/slow.rss")].last_error == again[1].error

    assert counts(recovered[2]) == (3, 0, 0)
    state = load_feed_states(engine)[server.url("/feeds/events.atom")]
    assert (state.consecutive_failures, state.last_error, state.last_status) == (0, None, 200)


async def test_feed_html_never_reaches_the_stored_articles(
    engine: sa.Engine, server: FeedServer, client: httpx.AsyncClient
) -> None:
    server.serve_file("/feeds/military-news.rss", "military-news.rss")
    settings = make_settings(sources=[feed(server, "/feeds/military-news.rss", "military-news")])
    await fetch_sources(engine, settings, now=NOW, client=client)
    rows = stored(engine)
    assert len(rows) == 4
    for row in rows.values():
        for name in TEXT_FIELDS:
            value = (row[name] or "").lower()
            for bad in ("<", "script", "onerror", "onclick", "javascript:", "alert(", "iframe"):
                assert bad not in value, (row["guid"], name, bad)


@dataclass(frozen=True)
class MappedSource(Source):
    """A source with the ``categories`` map the config will carry (see the feeds note)."""

    categories: Mapping[str, str] = field(default_factory=dict)


async def test_a_sources_category_map_decides_stored_topics(
    engine: sa.Engine, server: FeedServer, client: httpx.AsyncClient
) -> None:
    server.serve_file("/feeds/all.rss", "military-news.rss")
    source = MappedSource(
        type="feed",
        topic="military-news",
        url=server.url("/feeds/all.rss"),
        path=None,
        categories={"Base Alerts": "base-alerts", "Community": "local-events"},
        allow_private=True,
    )
    settings = dataclasses.replace(make_settings(), sources=(source,))
    await fetch_sources(engine, settings, now=NOW, client=client)
    topics = {guid.rsplit("#", 1)[1]: row["topic"] for guid, row in stored(engine).items()}
    assert topics == {
        "1873": "military-news",
        "1872": "base-alerts",
        "1869": "local-events",
        "1866": "military-news",
    }

    bad = dataclasses.replace(source, categories={"Weather": "weather"})
    with pytest.raises(ConfigError, match="unknown topic 'weather'"):
        await fetch_sources(engine, dataclasses.replace(settings, sources=(bad,)), now=NOW)
    assert len(server.seen) == 1  # refused before any request


async def test_a_story_in_two_feeds_keeps_the_topic_it_was_first_stored_with(
    engine: sa.Engine, server: FeedServer, client: httpx.AsyncClient
) -> None:
    server.serve_file("/feeds/base-alerts.rss", "base-alerts.rss")
    server.serve_file("/feeds/all.rss", "base-alerts.rss")
    first = feed(server, "/feeds/base-alerts.rss", "base-alerts")
    await fetch_sources(engine, make_settings(sources=[first]), now=NOW, client=client)
    both = make_settings(sources=[first, feed(server, "/feeds/all.rss", "military-news")])
    _, all_news = await fetch_sources(engine, both, now=NOW, client=client)

    # The two items identified by URL are the same stories: they stay base alerts, unchanged.
    # The two feed-scoped guids differ from the first feed's, but their content and link are
    # the same: duplicates of the stored articles, not new ones.
    assert counts(all_news) == (0, 0, 2)
    rows = stored(engine)
    assert len(rows) == 4
    ids = {row["guid"]: row["id"] for row in rows.values()}
    first_feed = first["url"] + "#"
    assert sorted(
        (d.guid.removeprefix(all_news.name + "#"), d.of) for d in all_news.duplicates
    ) == [(g.removeprefix(first_feed), ids[g]) for g in sorted(ids) if g.startswith(first_feed)]
    g10 = rows["https://news.example.org/2026/11/18/g-10-live-fire-noise-advisory/"]
    assert (g10["topic"], g10["updated_at"]) == ("base-alerts", NOW)


def test_the_sync_wrapper_runs_every_source(engine: sa.Engine, server: FeedServer) -> None:
    serve_newsroom(server)
    results = fetch_sources_sync(engine, newsroom_settings(server), now=NOW)
    assert [counts(r) for r in results] == [(4, 0, 0), (3, 0, 0), (4, 0, 0)]
