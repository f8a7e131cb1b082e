"""Test sends and the reader's preview: ``digest test`` sends staff the message a reader would
get from the next issue, the same except the subject prefix, To, Date, Message-ID and inert
links; its links change nobody; nothing is recorded (real aiosmtpd, SQLite and PostgreSQL, a
fixed clock)."""

from __future__ import annotations

import re
import warnings
from dataclasses import replace
from datetime import timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dkim
import pytest
import sqlalchemy as sa
from starlette.exceptions import StarletteDeprecationWarning

from mailer.bounces.reports import parse_report
from mailer.cli import main
from mailer.compose.dkim import generate_keypair
from mailer.compose.messages import DigestComposer, reference_message
from mailer.compose.rendering import Renderer
from mailer.config.settings import Settings
from mailer.content.store import upsert_articles
from mailer.db.schema import deliveries, events, issue_articles, issues, subscribers
from mailer.issues.nextissue import next_issue
from mailer.issues.staff import preview_next
from mailer.models import Recipient
from mailer.staff.testsend import prepare, reader_copy
from mailer.subscribers import lifecycle, store
from mailer.subscribers.links import links_for
from mailer.subscribers.tokens import Purpose, make_test_token, make_token
from mailer.web import SmtpConfirmationSender, create_app
from tests.compliance import assert_compliant
from tests.factories import (
    NOW,
    SECRET,
    make_article,
    make_issue,
    make_settings,
    make_subscriber,
    write_config,
)
from tests.smtp_server import FaultServer

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

pytest_plugins = ["tests.smtp_server"]

STAFF = "editor@news.example.org"
DESK = "desk@news.example.org"
RENDERER = Renderer()
# Headers a test copy sets anew; every other one is the reader's, value for value.
OWN = {"subject", "to", "date", "message-id", "list-unsubscribe"}


def parse(data: bytes) -> EmailMessage:
    msg = message_from_bytes(data, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def headers(msg: EmailMessage) -> list[tuple[str, str]]:
    """The top-level headers in order, the multipart boundary (random per build) left out."""
    return [
        (name, re.sub(r'boundary="[^"]+"', "boundary=*", str(value))) for name, value in msg.items()
    ]


def part(msg: EmailMessage, subtype: str) -> str:
    body = msg.get_body(preferencelist=(subtype,))
    assert body is not None
    content: str = body.get_content()
    return content


def readers(engine: sa.Engine) -> dict[str, store.Subscriber]:
    """Two articles of the last hour (base alerts, local events) and four subscribers: two of
    the variant "both topics", one of base alerts only, one of a topic with no article."""
    upsert_articles(
        engine,
        [
            make_article(title="Gate 3 closed", published_at=NOW - timedelta(hours=1)),
            make_article(
                title="Fair on Saturday",
                topic="local-events",
                published_at=NOW - timedelta(hours=2),
            ),
        ],
        now=NOW,
    )
    both = ("base-alerts", "local-events")
    return {
        "ann": make_subscriber(engine, email="ann@example.org", topics=(*both, "military-news")),
        "bob": make_subscriber(engine, email="bob@example.org", topics=both),
        "cat": make_subscriber(engine, email="cat@example.org", topics=("base-alerts",)),
        "dan": make_subscriber(engine, email="dan@example.org", topics=("military-news",)),
    }


def staff_settings(db_url: str, **sections: Any) -> Settings:
    return make_settings(db_url, staff={"emails": [STAFF, DESK]}, **sections)


def recorded(engine: sa.Engine) -> tuple[Any, ...]:
    """Everything a send could have recorded: issues, deliveries, events, subscribers."""
    with engine.connect() as conn:
        return tuple(
            [tuple(r) for r in conn.execute(sa.select(table))]
            for table in (issues, deliveries, events, subscribers)
        )


# --- the copy itself -------------------------------------------------------------------------


def test_a_test_copy_is_the_readers_message_except_subject_to_date_message_id_and_links(
    engine: sa.Engine, db_url: str
) -> None:
    settings = staff_settings(db_url)
    people = readers(engine)
    digest = settings.digests[0]
    prepared = prepare(engine, settings, digest, now=NOW, renderer=RENDERER)
    ann = people["ann"]
    assert prepared.reader.email == ann.email  # the first reader of the commonest variant
    assert prepared.reader.shown == ("base-alerts", "local-events")
    content = prepared.issue.content
    recipient = Recipient(ann.email, ann.name, ann.uid, f"<weekly.x.1.{ann.uid}@news.example.org>")
    real_bytes = DigestComposer(settings, content, renderer=RENDERER).message(
        recipient, ann.topics, NOW
    )
    assert real_bytes is not None
    # The splice is the slow way's equal (tests/test_messages.py); checked here for this issue.
    reference = reference_message(settings, content, recipient, ann.topics, NOW, renderer=RENDERER)
    assert reference is not None and headers(parse(reference)) == headers(parse(real_bytes))
    sent_at = NOW + timedelta(minutes=3)
    copy_bytes = reader_copy(settings, prepared, to=STAFF, now=sent_at, renderer=RENDERER)
    # Every format rule the real message keeps, its inert links checked as the real ones are
    # (one HTTPS URL and the mailto in List-Unsubscribe, both in both parts), under /test.
    under_test = replace(settings.site, base_url=settings.site.base_url + "/test")
    copy = assert_compliant(copy_bytes, replace(settings, site=under_test))
    real = parse(real_bytes)

    # The same headers in the same order, each the reader's except the copy's own.
    assert [name.lower() for name, _ in headers(copy)] == [
        name.lower() for name, _ in headers(real)
    ]
    for (name, value), (_, real_value) in zip(headers(copy), headers(real), strict=True):
        if name.lower() not in OWN:
            assert value == real_value, name
    assert copy["Subject"] == "[TEST] " + real["Subject"]
    assert copy["To"] == STAFF
    assert copy["Date"].datetime == sent_at
    assert re.fullmatch(r"<staff\.test\.[0-9a-f]{24}@news\.example\.org>", copy["Message-ID"])
    assert copy["Message-ID"] != real["Message-ID"]
    assert copy["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"

    # Every personal link is the inert one, and nothing else differs.
    live = links_for(settings.site, ann.uid)
    token = make_test_token(SECRET.encode(), ann.uid)
    inert = {
        live.unsubscribe: f"https://news.example.org/test/unsubscribe/{token}",
        live.preferences: f"https://news.example.org/test/preferences/{token}",
        live.unsubscribe.rsplit("/", 1)[1]: token,  # the mailto subject's token
    }

    def made_inert(text: str) -> str:
        for old, new in inert.items():
            text = text.replace(old, new)
        return text

    assert copy["List-Unsubscribe"] == made_inert(real["List-Unsubscribe"])
    for subtype in ("plain", "html"):
        copied, original = part(copy, subtype), part(real, subtype)
        assert live.unsubscribe in original and live.preferences in original
        assert copied == made_inert(original)
        assert live.unsubscribe.rsplit("/", 1)[1] not in copied
        assert live.preferences.rsplit("/", 1)[1] not in copied
    assert [p.get_content_type() for p in copy.walk()] == [
        p.get_content_type() for p in real.walk()
    ]
    assert [p["Content-Transfer-Encoding"] for p in copy.walk()] == [
        p["Content-Transfer-Encoding"] for p in real.walk()
    ]


def test_the_next_issue_has_the_subject_of_its_slot_not_of_now(
    engine: sa.Engine, db_url: str
) -> None:
    settings = staff_settings(db_url)
    readers(engine)
    digest = settings.digests[0]
    # NOW is Friday 20 November 07:00 in New York, the weekly slot itself: the next is the 27th.
    with engine.connect() as conn:
        upcoming = next_issue(conn, digest, now=NOW, render_subject=RENDERER.render_subject)
    assert upcoming.slot == NOW + timedelta(days=7)
    assert upcoming.content.subject.endswith("week of 27 November")
    assert not upcoming.made
    preview = preview_next(engine, settings, digest, now=NOW, renderer=RENDERER)
    assert preview.subject == upcoming.content.subject and preview.articles == 2


def test_a_slot_whose_issue_is_made_already_is_not_the_next_issue(
    engine: sa.Engine, db_url: str
) -> None:
    settings = staff_settings(db_url)
    readers(engine)
    digest = settings.digests[0]
    week = timedelta(days=7)
    # The 27th's issue was made early (empty, or sent by `digest send` ahead of its slot):
    # what readers get next is the 4 December issue.
    make_issue(engine, settings, at=NOW + week, made=NOW)
    with engine.connect() as conn:
        upcoming = next_issue(conn, digest, now=NOW, render_subject=RENDERER.render_subject)
    assert upcoming.slot == NOW + 2 * week
    assert upcoming.content.subject.endswith("week of 4 December")


def test_an_issue_waiting_in_review_is_shown_as_made_without_its_dropped_articles(
    engine: sa.Engine, db_url: str
) -> None:
    settings = staff_settings(db_url)
    readers(engine)
    digest = settings.digests[0]
    slot = NOW + timedelta(days=7)
    made = make_issue(engine, settings, at=slot, made=NOW)
    with engine.begin() as conn:
        conn.execute(issues.update().where(issues.c.id == made.issue_id).values(status="review"))
        first = conn.execute(
            sa.select(issue_articles.c.article_id).where(
                issue_articles.c.issue_id == made.issue_id, issue_articles.c.position == 0
            )
        ).scalar_one()
        conn.execute(
            issue_articles.update()
            .where(issue_articles.c.article_id == first)
            .values(dropped_at=NOW, dropped_by=STAFF)
        )
    # What arrives after the issue was made is not in it.
    upsert_articles(engine, [make_article(title="Late news")], now=NOW + timedelta(minutes=5))
    with engine.connect() as conn:
        upcoming = next_issue(
            conn, digest, now=NOW + timedelta(minutes=10), render_subject=RENDERER.render_subject
        )
    assert (upcoming.issue_id, upcoming.status, upcoming.slot) == (made.issue_id, "review", slot)
    with engine.connect() as conn:
        kept = conn.scalars(
            sa.select(issue_articles.c.article_id)
            .where(issue_articles.c.issue_id == made.issue_id, issue_articles.c.article_id != first)
            .order_by(issue_articles.c.position)
        ).all()
    assert [a.id for a in upcoming.content.articles] == list(kept) and len(kept) == 1
    assert "Late news" not in [a.title for a in upcoming.content.articles]
    with engine.connect() as conn:
        subject = conn.scalar(sa.select(issues.c.subject).where(issues.c.id == made.issue_id))
    assert upcoming.content.subject == subject


def test_a_bounce_or_complaint_about_a_test_copy_names_no_reader(
    engine: sa.Engine, db_url: str
) -> None:
    settings = staff_settings(db_url)
    readers(engine)
    prepared = prepare(engine, settings, settings.digests[0], now=NOW, renderer=RENDERER)
    copy = reader_copy(settings, prepared, to=STAFF, now=NOW, renderer=RENDERER)
    head = copy.split(b"\r\n\r\n", 1)[0]
    report = (
        b"From: MAILER-DAEMON@mx.example.com\r\nTo: bounces@news.example.org\r\n"
        b"Message-ID: <r.1@mx.example.com>\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n'
        b"\r\n--b\r\nContent-Type: text/plain\r\n\r\nFailed.\r\n"
        b"--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx\r\n\r\n"
        b"Final-Recipient: rfc822; " + STAFF.encode() + b"\r\nAction: failed\r\n"
        b"Status: 5.1.1\r\n\r\n--b\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        + head
        + b"\r\n\r\n--b--\r\n"
    )
    parsed = parse_report(report)
    assert parsed is not None and parsed.message_id is not None
    assert parsed.unsubscribe_uid is None and parsed.verp_uids == ()


# --- the inert links on the web --------------------------------------------------------------


ONE_CLICK = [
    pytest.param(
        {
            "content": b"List-Unsubscribe=One-Click",
            "headers": {"Content-Type": "application/x-www-form-urlencoded"},
        },
        id="urlencoded",
    ),
    pytest.param({"files": {"List-Unsubscribe": (None, "One-Click")}}, id="multipart"),
    pytest.param({"data": {"action": "leave"}}, id="preferences-form"),
]


@pytest.fixture
def client(engine: sa.Engine, db_url: str, smtp_server: FaultServer) -> TestClient:
    settings = staff_settings(db_url, smtp__port=smtp_server.port)
    sender = SmtpConfirmationSender(settings, local_hostname="client.test")
    return TestClient(create_app(settings, engine, sender, clock=lambda: NOW))


def inert_paths(engine: sa.Engine, db_url: str) -> tuple[str, str]:
    settings = staff_settings(db_url)
    prepared = prepare(engine, settings, settings.digests[0], now=NOW, renderer=RENDERER)
    msg = parse(reader_copy(settings, prepared, to=STAFF, now=NOW, renderer=RENDERER))
    unsubscribe = re.search(r"<(https://[^>]+)>", msg["List-Unsubscribe"])
    preferences = re.search(r"https://\S+/test/preferences/\S+", part(msg, "plain"))
    assert unsubscribe and preferences
    return urlsplit(unsubscribe.group(1)).path, urlsplit(preferences.group(0)).path


@pytest.mark.parametrize("body", ONE_CLICK)
def test_a_post_to_a_test_copys_links_answers_200_and_changes_nobody(
    engine: sa.Engine, db_url: str, client: TestClient, body: dict[str, Any]
) -> None:
    readers(engine)
    paths = inert_paths(engine, db_url)
    assert paths[0].startswith("/test/unsubscribe/")
    before = recorded(engine)
    for path in paths:
        response = client.post(path, follow_redirects=False, **body)
        assert response.status_code == 200
        assert "location" not in response.headers and "set-cookie" not in response.headers
        assert "This is a test copy" in response.text
        assert "nothing was changed" in response.text
    assert recorded(engine) == before
    assert store.get(engine, "ann@example.org").status == "active"


def test_a_get_of_a_test_copys_links_shows_the_test_page(
    engine: sa.Engine, db_url: str, client: TestClient
) -> None:
    readers(engine)
    unsubscribe, preferences = inert_paths(engine, db_url)
    page = client.get(unsubscribe)
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    text = " ".join(re.sub(r"<[^>]+>", " ", page.text).split())
    assert "This is a test copy" in text
    assert "In a real copy, this link would open the reader's unsubscribe page" in text
    assert "<form" not in page.text and "ann@example.org" not in page.text
    assert "would open the reader's preferences" in client.get(preferences).text


def test_forged_or_foreign_tokens_on_the_test_pages_get_the_usual_400(
    engine: sa.Engine, client: TestClient
) -> None:
    ann = readers(engine)["ann"]
    real = make_token(SECRET.encode(), Purpose.UNSUBSCRIBE, ann.uid)
    test = make_test_token(SECRET.encode(), ann.uid)
    forged = make_test_token(b"another-secret-0123456789abcdef", ann.uid)
    for path in (
        f"/test/unsubscribe/{real}",
        f"/test/unsubscribe/{forged}",
        f"/test/preferences/{test[:-1]}",
        "/test/unsubscribe/not-a-token",
    ):
        for response in (
            client.get(path),
            client.post(path, content=b"List-Unsubscribe=One-Click"),
        ):
            assert response.status_code == 400, path
            assert "This link is not valid" in response.text
    # A test token is no unsubscribe token either.
    assert client.post(f"/unsubscribe/{test}").status_code == 400
    assert store.get(engine, "ann@example.org").status == "active"


# --- the command -----------------------------------------------------------------------------


@pytest.fixture
def cli_config(
    tmp_path: Path, db_url: str, smtp_server: FaultServer, monkeypatch: pytest.MonkeyPatch
) -> Path:
    monkeypatch.setenv("MAILER_SECRET_KEY", SECRET)
    monkeypatch.setattr("mailer.cli.staffsend.now", lambda: NOW)
    key = tmp_path / "dkim.pem"
    (tmp_path / "dkim.txt").write_text(generate_keypair(key), encoding="utf-8")
    return write_config(
        tmp_path / "mailer.toml",
        db_url,
        smtp={"host": "127.0.0.1", "port": smtp_server.port, "timeout": 5},
        staff={"emails": [STAFF, DESK]},
        dkim={"domain": "news.example.org", "selector": "s1", "private_key_file": str(key)},
    )


def run(config: Path, *args: str) -> int:
    try:
        main(["--config", str(config), *args])
    except SystemExit as exit_info:
        return int(exit_info.code or 0)
    return 0


def test_digest_test_sends_signed_copies_to_staff_and_records_only_who_sent_them(
    cli_config: Path,
    engine: sa.Engine,
    smtp_server: FaultServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    people = readers(engine)
    issues_, deliveries_, events_, subscribers_ = recorded(engine)
    code = run(
        cli_config,
        "digest",
        "test",
        "weekly",
        "--to",
        "Editor@News.Example.org",
        "--to",
        DESK,
        "--by",
        "Dana Editor",
    )
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        'test copy of "Weekly digest" (issue of Fri 27 Nov 2026 07:00 EST) as ann@example.org'
        f" (topics: Base alerts, Local events) sent to {address}: [TEST] Camp Lejeune & New"
        " River Updates — week of 27 November"
        for address in ("Editor@News.Example.org", DESK)
    ]
    # No issue, no delivery, nobody changed: one audit event per copy, as the console's.
    after = recorded(engine)
    assert (after[0], after[1], after[3]) == (issues_, deliveries_, subscribers_)
    assert after[2][: len(events_)] == events_
    added = [(row[1], row[2], row[4]) for row in after[2][len(events_) :]]
    assert added == [
        (
            None,
            "staff.test_send",
            {
                "issue": None,
                "digest": "weekly",
                "to": address,
                "reader": people["ann"].id,
                "sent": True,
                "by": "Dana Editor",
            },
        )
        for address in ("Editor@News.Example.org", DESK)
    ]
    received = smtp_server.received
    assert sorted(r.recipients[0].lower() for r in received) == [DESK, STAFF]
    record = (cli_config.parent / "dkim.txt").read_text(encoding="utf-8")
    name = b"s1._domainkey.news.example.org."
    for item in received:
        assert item.envelope_from == "digest@news.example.org"  # plain, never VERP
        msg = parse(item.data)
        assert msg["Subject"].startswith("[TEST] ")
        assert "/test/unsubscribe/" in msg["List-Unsubscribe"]
        assert dkim.verify(
            item.data,
            dnsfunc=lambda q, timeout=5: record.encode() if q == name else None,
            minkey=1024,
        )


def test_an_address_not_in_staff_is_refused_and_nothing_is_sent(
    cli_config: Path,
    engine: sa.Engine,
    smtp_server: FaultServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    readers(engine)
    code = run(cli_config, "digest", "test", "weekly", "--to", STAFF, "--to", "ann@example.org")
    assert code == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.strip().splitlines()
    assert "ann@example.org is not in [staff].emails" in line and "--force" in line
    assert smtp_server.received == []


def test_force_sends_to_an_address_not_in_staff(
    cli_config: Path,
    engine: sa.Engine,
    smtp_server: FaultServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    readers(engine)
    code = run(cli_config, "digest", "test", "weekly", "--to", "outside@example.com", "--force")
    assert code == 0
    assert "sent to outside@example.com" in capsys.readouterr().out
    assert [r.recipients for r in smtp_server.received] == [("outside@example.com",)]


def test_as_picks_the_reader_and_their_variant(
    cli_config: Path,
    engine: sa.Engine,
    smtp_server: FaultServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    readers(engine)
    code = run(cli_config, "digest", "test", "weekly", "--to", STAFF, "--as", "CAT@example.org")
    assert code == 0
    assert "as cat@example.org (topics: Base alerts) sent to" in capsys.readouterr().out
    text = part(parse(smtp_server.received[0].data), "plain")
    assert "Gate 3 closed" in text and "Fair on Saturday" not in text


def test_a_refusal_by_the_relay_is_named_and_exits_1(
    cli_config: Path,
    engine: sa.Engine,
    smtp_server: FaultServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    readers(engine)
    smtp_server.script(DESK, ["550 5.1.1 no such user"])
    code = run(cli_config, "digest", "test", "weekly", "--to", STAFF, "--to", DESK)
    assert code == 1
    captured = capsys.readouterr()
    sent, refused = captured.out.strip().splitlines()
    assert sent.endswith("week of 27 November") and f"sent to {STAFF}" in sent
    assert f"refused for {DESK}: 550 5.1.1 no such user" in refused
    assert "1 of 2 test copies refused" in captured.err


def _unsubscribed(engine: sa.Engine) -> None:
    lifecycle.unsubscribe(engine, store.get(engine, "bob@example.org").uid, now=NOW, via="page")


def _paused(engine: sa.Engine) -> None:
    uid = store.get(engine, "bob@example.org").uid
    lifecycle.pause(engine, uid, None, NOW + timedelta(days=30), now=NOW)


@pytest.mark.parametrize(
    "args, setup, message",
    [
        (("nope",), None, "no digest 'nope'"),
        (("weekly", "--as", "who@example.org"), None, "no subscriber who@example.org"),
        (("weekly", "--as", "bob@example.org"), _unsubscribed, "is unsubscribed, not active"),
        (("weekly", "--as", "bob@example.org"), _paused, "has paused weekly until"),
        (("weekly", "--as", "dan@example.org"), None, "chose none of the topics"),
    ],
    ids=["unknown digest", "unknown reader", "inactive", "paused", "no topic of the issue"],
)
def test_bad_input_is_one_line_exit_1_and_nothing_sent(
    cli_config: Path,
    engine: sa.Engine,
    smtp_server: FaultServer,
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    setup: Any,
    message: str,
) -> None:
    readers(engine)
    if setup is not None:
        setup(engine)
    code = run(cli_config, "digest", "test", *args, "--to", STAFF)
    assert code == 1
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert message in line and captured.out == ""
    assert smtp_server.received == []


def test_no_reader_at_all_is_one_line_and_exit_1(
    cli_config: Path,
    engine: sa.Engine,
    smtp_server: FaultServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    upsert_articles(engine, [make_article(published_at=NOW - timedelta(hours=1))], now=NOW)
    make_subscriber(engine, email="dan@example.org", topics=("military-news",))
    code = run(cli_config, "digest", "test", "weekly", "--to", STAFF)
    assert code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "no active subscriber would receive the next issue of weekly" in line
    assert smtp_server.received == []


# --- the preview ---------------------------------------------------------------------------


def test_preview_prints_the_readers_email_and_names_the_reader(
    cli_config: Path, engine: sa.Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    readers(engine)
    assert run(cli_config, "digest", "preview", "weekly") == 0
    output = capsys.readouterr().out
    first, sender, to, subject, blank, *text = output.splitlines()
    assert first.startswith('the next issue of "Weekly digest" (issue of Fri 27 Nov 2026')
    assert "as ann@example.org (topics: Base alerts, Local events)" in first
    assert "links are inert" in first
    assert sender.startswith("From: Camp Lejeune") and to == "To: ann@example.org"
    assert subject == "Subject: Camp Lejeune & New River Updates — week of 27 November"
    assert blank == ""
    body = "\n".join(text)
    assert "Gate 3 closed" in body and "/test/unsubscribe/" in body
    assert "https://news.example.org/unsubscribe/" not in body


def test_preview_out_writes_the_eml_html_and_text(
    cli_config: Path, engine: sa.Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    readers(engine)
    out_dir = tmp_path / "preview"
    assert (
        run(
            cli_config,
            "digest",
            "preview",
            "weekly",
            "--as",
            "cat@example.org",
            "--out",
            str(out_dir),
        )
        == 0
    )
    line = capsys.readouterr().out.strip()
    assert "as cat@example.org (topics: Base alerts)" in line and "links are inert" in line
    msg = parse((out_dir / "weekly.eml").read_bytes())
    assert msg["To"] == "cat@example.org"
    assert msg["Subject"] == "Camp Lejeune & New River Updates — week of 27 November"
    for suffix, subtype in (("txt", "plain"), ("html", "html")):
        written = (out_dir / f"weekly.{suffix}").read_bytes().decode("utf-8")
        assert written == part(msg, subtype).replace("\r\n", "\n")
    assert "Fair on Saturday" not in part(msg, "plain")


def test_preview_without_readers_shows_the_web_copy(
    cli_config: Path, engine: sa.Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    upsert_articles(engine, [make_article(title="Gate 3 closed")], now=NOW)
    assert run(cli_config, "digest", "preview", "weekly") == 0
    output = capsys.readouterr().out
    assert output.startswith("no active subscriber would receive the next issue of weekly")
    assert "showing the web copy" in output and "Gate 3 closed" in output


def test_preview_as_a_reader_who_would_get_nothing_is_exit_1(
    cli_config: Path, engine: sa.Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    readers(engine)
    assert run(cli_config, "digest", "preview", "weekly", "--as", "dan@example.org") == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "dan@example.org chose none of the topics" in line
