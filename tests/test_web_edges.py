"""The web app's hostile-input edges over a real uvicorn server and raw sockets.

A client that goes away mid-body, and a body uvicorn cannot parse, are one line in the log at
most (INFO for the disconnect, uvicorn's WARNING for the malformed request), never a
traceback, and change nothing.
"""

from __future__ import annotations

import logging
import socket
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from starlette.exceptions import StarletteDeprecationWarning

from mailer.db.engine import create_engine, migrate
from mailer.db.schema import subscribers as subscriber_table
from mailer.subscribers.tokens import Purpose, make_token
from mailer.web import SmtpConfirmationSender, create_app
from mailer.web.server import ServerThread
from tests.factories import SECRET, make_settings, make_subscriber
from tests.pg_cluster import free_port
from tests.smtp_server import FaultServer, smtp_server  # noqa: F401

with warnings.catch_warnings():
    # Starlette 1.x prefers httpx2 for its TestClient and warns when it falls back to httpx.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

FORM = "application/x-www-form-urlencoded"


@dataclass
class Served:
    server: ServerThread
    engine: sa.Engine
    caplog: pytest.LogCaptureFixture

    def raw(self, request: bytes, *, read: bool) -> bytes:
        """Send ``request`` as is; read the answer (``read``) or hang up at once."""
        with socket.create_connection((self.server.host, self.server.port), timeout=10) as s:
            s.sendall(request)
            if not read:
                return b""
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)

    def wait_for_log(self, text: str) -> logging.LogRecord:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for record in self.caplog.records:
                if text in record.getMessage():
                    return record
            time.sleep(0.02)
        raise AssertionError(f"no log line with {text!r}:\n{self.caplog.text}")

    def assert_no_traceback(self) -> None:
        assert "Traceback" not in self.caplog.text, self.caplog.text
        assert not [r for r in self.caplog.records if r.exc_info], self.caplog.text
        assert not [r for r in self.caplog.records if r.levelno >= logging.ERROR]

    def statuses(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.scalars(sa.select(subscriber_table.c.status)))


@pytest.fixture
def served(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> Iterator[Served]:
    settings = make_settings(db_url, smtp__port=smtp_server.port)
    sender = SmtpConfirmationSender(settings, local_hostname="client.test")
    caplog.set_level(logging.INFO)
    with ServerThread(create_app(settings, engine, sender)) as server:
        yield Served(server, engine, caplog)


def post(path: str, body: bytes, *, length: int | None = None) -> bytes:
    """A POST whose Content-Length may promise more than the body it carries."""
    declared = len(body) if length is None else length
    head = f"POST {path} HTTP/1.1\r\nHost: news.example.org\r\nContent-Type: {FORM}\r\n"
    return (head + f"Content-Length: {declared}\r\n\r\n").encode() + body


def test_a_client_gone_mid_body_on_subscribe_is_one_info_line_and_changes_nothing(
    served: Served,
) -> None:
    body = b"email=reader%40example.org&topic=base-alerts&consent=yes"
    served.raw(post("/subscribe", body, length=len(body) + 100), read=False)
    record = served.wait_for_log("client disconnected before sending the whole request")
    assert record.levelno == logging.INFO
    assert getattr(record, "route", None) == "/subscribe"
    served.assert_no_traceback()
    assert served.statuses() == []


def test_a_client_gone_mid_body_on_unsubscribe_changes_nothing(served: Served) -> None:
    subscriber = make_subscriber(served.engine)
    token = make_token(SECRET.encode(), Purpose.UNSUBSCRIBE, subscriber.uid)
    body = b"List-Unsubscribe=One-Click"
    served.raw(post(f"/unsubscribe/{token}", body, length=len(body) + 50), read=False)
    record = served.wait_for_log("client disconnected before sending the whole request")
    assert record.levelno == logging.INFO
    # The route, never the path: the path holds the subscriber's token.
    assert getattr(record, "route", None) == "/unsubscribe/{token}"
    assert token not in served.caplog.text
    served.assert_no_traceback()
    assert served.statuses() == ["active"]


def test_a_malformed_chunked_body_is_a_400_and_one_warning_without_traceback(
    served: Served,
) -> None:
    request = (
        b"POST /subscribe HTTP/1.1\r\nHost: news.example.org\r\n"
        + f"Content-Type: {FORM}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + b"zz\r\nemail=reader%40example.org\r\n0\r\n\r\n"
    )
    answer = served.raw(request, read=True)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    served.wait_for_log("client disconnected before sending the whole request")
    warnings = [r for r in served.caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == ["Invalid HTTP request received."]
    served.assert_no_traceback()
    assert served.statuses() == []


@pytest.mark.parametrize(
    "head",
    [
        b"POST /subscribe HTTP/1.1\r\n",  # no Content-Type: answered without reading the body
        b"GET / HTTP/1.1\r\n",
        b"POST /archive HTTP/1.1\r\n",
    ],
)
def test_a_malformed_chunked_body_to_a_route_that_does_not_read_it_leaves_no_traceback(
    served: Served, head: bytes
) -> None:
    request = (
        head + b"Host: news.example.org\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nemail=reader%40example.org\r\n0\r\n\r\n"
    )
    answer = served.raw(request, read=True)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    served.wait_for_log("response dropped: the request was malformed and already refused")
    served.assert_no_traceback()
    assert served.statuses() == []


def test_a_5000_digit_archive_number_is_404_over_the_wire(served: Served) -> None:
    request = b"GET /archive/" + b"9" * 5000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = served.raw(request, read=True)
    assert answer.startswith(b"HTTP/1.1 404 "), answer[:200]
    served.assert_no_traceback()


def test_a_database_outage_is_a_503_page_and_one_log_line(
    smtp_server: FaultServer,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/mailer"  # nothing listens
    settings = make_settings(url, smtp__port=smtp_server.port)
    engine = create_engine(url)
    app = create_app(settings, engine, SmtpConfirmationSender(settings))
    with TestClient(app) as client:  # raises what the app does not handle
        page = client.get("/archive")
        health = client.get("/healthz")
    engine.dispose()
    assert page.status_code == 503 and page.headers["retry-after"] == "30"
    assert "Temporarily unavailable" in page.text and "content-security-policy" in page.headers
    # The reader is told what to do, not only that something is wrong.
    assert "Please try again in a minute or two; if you were sending a form" in page.text
    assert health.status_code == 503 and health.json()["database"] == "unavailable"
    assert "Traceback" not in caplog.text
    assert "is unreachable; web pages answer 503 until it is back" in caplog.text


def test_a_database_outage_is_logged_once_for_all_requests_and_its_end_once(
    tmp_path: Path,
    smtp_server: FaultServer,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    folder = tmp_path / "gone"  # SQLite cannot open a file in a folder that is not there
    url = f"sqlite:///{folder / 'mailer.db'}"
    settings = make_settings(url, smtp__port=smtp_server.port)
    engine = create_engine(url)
    app = create_app(settings, engine, SmtpConfirmationSender(settings))
    caplog.set_level(logging.INFO)
    with TestClient(app) as client:
        answers = [client.get("/archive").status_code for _ in range(3)]
        folder.mkdir()
        migrate(engine)
        back = [client.get("/archive").status_code]
        engine.dispose()  # the pool opens a new connection, as after a recycle: no second end
        back.append(client.get("/archive").status_code)
    engine.dispose()
    assert answers == [503, 503, 503] and back == [200, 200]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        f"the database at {url} is unreachable; web pages answer 503 until it is back"
    ]
    ends = [r for r in caplog.records if "is reachable again after" in r.getMessage()]
    assert len(ends) == 1 and ends[0].levelno == logging.WARNING
