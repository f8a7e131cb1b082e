"""The console's dashboard and issue pages: what staff see and do to an issue, each action
recorded with who did it; the live progress; the variant frames (TestClient, a real aiosmtpd
for test copies, SQLite and PostgreSQL)."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from mailer.compose.rendering import Renderer
from mailer.config.settings import Settings
from mailer.content.store import upsert_articles
from mailer.db.schema import deliveries, events, issue_articles, issues
from mailer.issues import review
from mailer.issues.create import create_issue
from mailer.staff.alerts import raise_alert
from mailer.web import SmtpConfirmationSender, create_app
from tests.console import StaffClient, mark, staff_client, status_of
from tests.factories import (
    BASE_CONFIG,
    NOW,
    Clock,
    make_article,
    make_subscriber,
    server_settings,
)
from tests.smtp_server import FaultServer, smtp_server  # noqa: F401

# NOW is Friday 20 November 2026 12:00 UTC: a slot of the weekly digest. The console looks
# at it an hour and a half before, while its review window is open.
SLOT = NOW
OPENS = SLOT - timedelta(minutes=60)
LOOKING = SLOT - timedelta(minutes=50)
EDITOR = "editor@news.example.org"
WEEKLY = BASE_CONFIG["digests"][0] | {"review_minutes": 60, "on_unreviewed": "hold"}
DAILY = BASE_CONFIG["digests"][0] | {
    "key": "daily",
    "name": "Daily digest",
    "schedule": "0 6 * * *",
}


def console_settings(db_url: str, server: FaultServer) -> Settings:
    return server_settings(
        db_url, server, digests=[WEEKLY, DAILY], staff={"emails": ["desk@news.example.org"]}
    )


class Setup:
    def __init__(self, engine: sa.Engine, settings: Settings, clock: Clock) -> None:
        self.engine = engine
        self.settings = settings
        self.clock = clock
        app = create_app(
            settings,
            engine,
            SmtpConfirmationSender(settings, local_hostname="client.test"),
            clock=clock,
        )
        self.app = app
        self.staff: StaffClient = staff_client(app, engine, now=clock(), email=EDITOR)


@pytest.fixture
def setup(engine: sa.Engine, db_url: str, smtp_server: FaultServer) -> Setup:  # noqa: F811
    settings = console_settings(db_url, smtp_server)
    return Setup(engine, settings, Clock(LOOKING))


def stock(engine: sa.Engine, *titles: str) -> None:
    upsert_articles(
        engine,
        [make_article(title=t, published_at=SLOT - timedelta(days=1)) for t in titles],
        now=OPENS - timedelta(hours=2),
    )


def in_review(s: Setup, *titles: str) -> int:
    """Readers, articles, and the weekly issue made for review at OPENS."""
    for _ in range(3):
        make_subscriber(s.engine)
    stock(s.engine, *(titles or ("Gate 4 closed", "Fair on Saturday")))
    renderer = Renderer()
    made = review.open_due_reviews(
        s.engine, s.settings, now=OPENS, render_subject=renderer.render_subject, renderer=renderer
    )
    assert len(made) == 1
    return made[0]


def sending(s: Setup, readers: int = 4) -> int:
    """An issue of the daily digest sending now to ``readers`` subscribers."""
    for _ in range(readers):
        make_subscriber(s.engine)
    stock(s.engine, "Road works on Holcomb Blvd")
    made = create_issue(
        s.engine,
        s.settings,
        s.settings.digest("daily"),
        scheduled_for=s.clock() - timedelta(minutes=5),
        now=s.clock() - timedelta(minutes=5),
        render_subject=Renderer().render_subject,
        reviewed=False,
    )
    return made.issue_id


def events_of(engine: sa.Engine, kind: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [
            dict(row.detail)
            for row in conn.execute(
                sa.select(events.c.detail).where(events.c.kind == kind).order_by(events.c.id)
            )
        ]


def text_of(html: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


# ---------------------------------------------------------------- the dashboard


def test_dashboard_shows_the_next_issue_of_each_digest_and_one_in_review(setup: Setup) -> None:
    issue_id = in_review(setup)
    page = setup.staff.get("/staff/")
    assert page.status_code == 200
    text = text_of(page.text)
    assert "Weekly digest" in text and "Daily digest" in text
    # The weekly slot is 50 minutes away, in review; nobody decided, so it would be held.
    assert "Goes out in 50 min" in text
    assert f"Issue {issue_id}" in text and "in review" in text
    assert "Nobody has decided yet: it is held if nobody approves it" in text
    # The daily one's next slot is tomorrow 06:00 New York (11:00 UTC): 23 h 50 min away.
    assert "Goes out in 23 h 50 min" in text
    assert "No issue is sending." in text
    assert "{% block charts %}" not in page.text
    assert 'src="/staff/static/console.js"' in page.text
    assert "<script>" not in page.text and " style=" not in page.text


def test_dashboard_lists_sends_last_issues_with_bars_and_open_alerts(setup: Setup) -> None:
    issue_id = sending(setup)
    mark(setup.engine, issue_id, "sent", 2, setup.clock() - timedelta(seconds=10))
    mark(setup.engine, issue_id, "deferred", 1, setup.clock())
    raise_alert(
        setup.engine,
        setup.settings,
        cause="stall:issue:1",
        subject="deliveries stalled",
        text="…",
        now=setup.clock() - timedelta(hours=2),
    )
    raise_alert(
        setup.engine,
        setup.settings,
        cause="feed:old",
        subject="an old alert",
        text="…",
        now=setup.clock() - timedelta(days=3),
    )
    page = setup.staff.get("/staff/")
    text = text_of(page.text)
    card = page.text.split(f'data-issue="{issue_id}"', 1)[1].split("</article>", 1)[0]
    assert re.search(r'data-field="sent">2<', card)
    assert re.search(r'data-field="deferred">1<', card)
    assert re.search(r'data-field="left">2<', card)  # one queued, one deferred
    # Bars are SVG rects with width attributes: 2 of 4 sent is half the bar.
    assert re.search(r'class="seg seg-sent" data-seg="sent" x="0\.0" y="0" width="50\.0"', card)
    assert "deliveries stalled" in text
    assert "an old alert" not in text  # raised three days ago: not open
    assert "2 sent" in text


def test_progress_json_counts_match_the_deliveries(setup: Setup) -> None:
    issue_id = sending(setup, readers=5)
    now = setup.clock()
    mark(setup.engine, issue_id, "sent", 3, now - timedelta(seconds=30))
    mark(setup.engine, issue_id, "failed", 1, now)
    answer = setup.staff.get("/staff/progress.json")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.json()["as_of_text"] == "Fri 20 Nov 2026, 06:10 EST"
    (send,) = answer.json()["sending"]
    assert send["id"] == issue_id
    assert send["total"] == 5
    assert send["counts"] == {
        "sent": 3,
        "deferred": 0,
        "bounced": 0,
        "failed": 1,
        "cancelled": 0,
        "waiting": 1,
    }
    assert send["left"] == 1
    assert send["rate"] == pytest.approx(3 / 30)  # three sent in the last 30 s of sending
    assert send["seconds_left"] == 10
    assert [s["width"] for s in send["segments"]] == [60.0, 0.0, 0.0, 20.0, 0.0, 20.0]


def test_progress_json_refuses_without_a_session(setup: Setup) -> None:
    issue_id = in_review(setup)
    anonymous = TestClient(setup.app, base_url="https://testserver")
    assert anonymous.get("/staff/progress.json").status_code == 401
    for path in ("/staff/", "/staff/issues", f"/staff/issues/{issue_id}/variants/1"):
        assert anonymous.get(path, follow_redirects=False).status_code == 303
    assert anonymous.post(f"/staff/issues/{issue_id}/approve").status_code == 401
    assert status_of(setup.engine, issue_id) == "review"


def test_the_script_is_served_by_the_console(setup: Setup) -> None:
    answer = setup.staff.get("/staff/static/console.js")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/javascript")
    assert "progress" in answer.text


# ---------------------------------------------------------------- the issue page and its actions


def test_issue_page_shows_state_articles_variants_and_actions(setup: Setup) -> None:
    issue_id = in_review(setup, "Gate 4 closed")
    page = setup.staff.get(f"/staff/issues/{issue_id}")
    assert page.status_code == 200
    text = text_of(page.text)
    assert "Gate 4 closed" in text and "Weekly digest" in text
    assert "it is held at its slot until approved" in text
    assert (
        f'<iframe sandbox src="/staff/issues/{issue_id}/variants/1?topics=base-alerts"' in page.text
    )
    for action in ("approve", "hold", "skip", "drop", "note", "test-send"):
        assert f'action="/staff/issues/{issue_id}/{action}"' in page.text
    assert "/retry" not in page.text  # nothing deferred


def test_variant_frame_has_its_own_sandbox_csp(setup: Setup) -> None:
    issue_id = in_review(setup, "Gate 4 closed")
    frame = setup.staff.get(f"/staff/issues/{issue_id}/variants/1")
    assert frame.status_code == 200
    csp = frame.headers["content-security-policy"]
    assert csp.startswith("sandbox; default-src 'none'; style-src 'unsafe-inline'")
    assert "img-src https: data:" in csp and "frame-ancestors 'self'" in csp
    assert "script-src" not in csp
    assert frame.headers["x-frame-options"] == "SAMEORIGIN"
    assert "Gate 4 closed" in frame.text
    # The console's own pages are still never framed.
    assert setup.staff.get(f"/staff/issues/{issue_id}").headers["x-frame-options"] == "DENY"
    assert setup.staff.get(f"/staff/issues/{issue_id}/variants/9").status_code == 404


@pytest.mark.parametrize(
    ("action", "status", "kind"),
    [
        ("approve", "approved", "issue.approved"),
        ("hold", "held", "issue.held"),
        ("skip", "skipped", "issue.skipped"),
    ],
    ids=["approve", "hold", "skip"],
)
def test_decisions_change_state_and_record_the_staff_member(
    setup: Setup, action: str, status: str, kind: str
) -> None:
    issue_id = in_review(setup)
    answer = setup.staff.post(f"/staff/issues/{issue_id}/{action}")
    assert answer.status_code == 303
    assert answer.headers["location"].startswith(f"/staff/issues/{issue_id}?notice=")
    assert status_of(setup.engine, issue_id) == status
    assert events_of(setup.engine, kind)[-1] == {"issue": issue_id, "by": EDITOR}
    shown = setup.staff.get(answer.headers["location"])
    assert f"Issue {issue_id} {status} by {EDITOR}" in shown.text
    assert f"{status} by {EDITOR}" in text_of(shown.text)  # the history


def test_dropping_an_article_records_who(setup: Setup) -> None:
    issue_id = in_review(setup, "Gate 4 closed", "Fair on Saturday")
    with setup.engine.connect() as conn:
        article_id = conn.scalar(
            sa.select(issue_articles.c.article_id)
            .where(issue_articles.c.issue_id == issue_id)
            .order_by(issue_articles.c.position)
        )
    answer = setup.staff.post(f"/staff/issues/{issue_id}/drop", {"article": str(article_id)})
    assert answer.status_code == 303
    with setup.engine.connect() as conn:
        by = conn.scalar(
            sa.select(issue_articles.c.dropped_by).where(
                issue_articles.c.issue_id == issue_id, issue_articles.c.article_id == article_id
            )
        )
    assert by == EDITOR
    assert events_of(setup.engine, "issue.article_dropped")[-1]["by"] == EDITOR
    again = setup.staff.post(f"/staff/issues/{issue_id}/drop", {"article": str(article_id)})
    assert again.status_code == 409
    assert "was dropped from issue" in again.text and f"already, by {EDITOR}" in again.text


def test_the_note_is_set_and_cleared_by_the_staff_member(setup: Setup) -> None:
    issue_id = in_review(setup)
    answer = setup.staff.post(f"/staff/issues/{issue_id}/note", {"note": "Happy holidays."})
    assert answer.status_code == 303
    with setup.engine.connect() as conn:
        row = conn.execute(sa.select(issues.c.note, issues.c.note_by)).one()
    assert tuple(row) == ("Happy holidays.", EDITOR)
    assert events_of(setup.engine, "issue.note_set")[-1] == {"issue": issue_id, "by": EDITOR}
    assert "Happy holidays." in setup.staff.get(f"/staff/issues/{issue_id}").text
    setup.staff.post(f"/staff/issues/{issue_id}/note", {"clear": "1"})
    with setup.engine.connect() as conn:
        assert conn.scalar(sa.select(issues.c.note)) is None
    assert events_of(setup.engine, "issue.note_cleared")[-1]["by"] == EDITOR


def test_retry_makes_the_deferred_due_and_records_who(setup: Setup) -> None:
    issue_id = sending(setup, readers=3)
    later = setup.clock() + timedelta(hours=1)
    with setup.engine.begin() as conn:
        conn.execute(
            deliveries.update()
            .where(deliveries.c.issue_id == issue_id)
            .values(status="deferred", next_attempt_at=later)
        )
    page = setup.staff.get(f"/staff/issues/{issue_id}")
    assert f'action="/staff/issues/{issue_id}/retry"' in page.text
    answer = setup.staff.post(f"/staff/issues/{issue_id}/retry")
    assert answer.status_code == 303
    with setup.engine.connect() as conn:
        due = conn.scalars(
            sa.select(deliveries.c.next_attempt_at).where(deliveries.c.issue_id == issue_id)
        ).all()
    assert set(due) == {setup.clock()}
    assert events_of(setup.engine, "staff.retry")[-1] == {
        "issue": issue_id,
        "deliveries": 3,
        "by": EDITOR,
    }
    assert "3 deliveries of issue" in setup.staff.get(answer.headers["location"]).text


def test_a_refused_action_shows_the_librarys_message(setup: Setup) -> None:
    issue_id = sending(setup)
    answer = setup.staff.post(f"/staff/issues/{issue_id}/approve")
    assert answer.status_code == 409
    assert "Not done: Issue " in answer.text
    assert "is sending: only an issue in review or held can be approved" in answer.text
    assert status_of(setup.engine, issue_id) == "sending"
    note = setup.staff.post(f"/staff/issues/{issue_id}/note", {"note": "Too late"})
    assert note.status_code == 409 and "can be given a note" in note.text
    empty = in_review_second(setup)
    blank = setup.staff.post(f"/staff/issues/{empty}/note", {"note": "   "})
    assert blank.status_code == 409 and "the note is empty" in blank.text.lower()


def in_review_second(s: Setup) -> int:
    stock(s.engine, "Gate 4 closed")
    renderer = Renderer()
    made = review.open_due_reviews(
        s.engine, s.settings, now=OPENS, render_subject=renderer.render_subject, renderer=renderer
    )
    return made[0]


def test_an_action_without_csrf_changes_nothing(setup: Setup) -> None:
    issue_id = in_review(setup)
    answer = setup.staff.client.post(
        f"/staff/issues/{issue_id}/approve", data={}, follow_redirects=False
    )
    assert answer.status_code == 403
    assert status_of(setup.engine, issue_id) == "review"


def test_unknown_issues_are_404_pages(setup: Setup) -> None:
    assert setup.staff.get("/staff/issues/999").status_code == 404
    assert setup.staff.get("/staff/issues/" + "9" * 5000).status_code == 404
    assert setup.staff.post("/staff/issues/999/approve").status_code == 404


def test_test_send_goes_to_the_staff_member(setup: Setup, smtp_server: FaultServer) -> None:  # noqa: F811
    issue_id = in_review(setup, "Gate 4 closed")
    answer = setup.staff.post(f"/staff/issues/{issue_id}/test-send")
    assert answer.status_code == 303
    shown = text_of(setup.staff.get(answer.headers["location"]).text)
    assert f"A test copy of issue {issue_id} went to {EDITOR}" in shown
    (message,) = smtp_server.received
    assert message.recipients == (EDITOR,)
    assert b"Gate 4 closed" in message.data
    recorded = events_of(setup.engine, "staff.test_send")[-1]
    assert recorded["by"] == EDITOR and recorded["to"] == EDITOR and recorded["sent"] is True


def test_issue_list_is_paged(setup: Setup) -> None:
    in_review(setup)
    page = setup.staff.get("/staff/issues")
    assert page.status_code == 200
    assert "in review" in page.text and "Page 1" in page.text
    # Past the end: the last page; not a number: the first, as on every console listing.
    for asked in ("2", "x"):
        again = setup.staff.get(f"/staff/issues?page={asked}")
        assert again.status_code == 200 and "Page 1" in again.text and "in review" in again.text


def test_a_sent_issue_shows_its_report(setup: Setup) -> None:
    issue_id = sending(setup, readers=2)
    mark(setup.engine, issue_id, "sent", 2, setup.clock())
    with setup.engine.begin() as conn:
        conn.execute(issues.update().values(status="sent", completed_at=setup.clock()))
    page = setup.staff.get(f"/staff/issues/{issue_id}")
    text = text_of(page.text)
    assert "Report" in text and "sent (final)" in text
    assert "no longer reviewed" in text


def test_a_test_send_the_relay_cannot_take_says_so(setup: Setup) -> None:
    import socket

    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    settings = console_settings_on_port(setup, port)
    app = create_app(
        settings,
        setup.engine,
        SmtpConfirmationSender(settings, local_hostname="client.test"),
        clock=setup.clock,
    )
    staff = staff_client(app, setup.engine, now=setup.clock(), email="desk@news.example.org")
    issue_id = in_review(setup, "Gate 4 closed")
    answer = staff.post(f"/staff/issues/{issue_id}/test-send")
    assert answer.status_code == 409
    assert "Not done:" in answer.text and "desk@news.example.org" in answer.text


def console_settings_on_port(s: Setup, port: int) -> Settings:
    from dataclasses import replace

    return replace(s.settings, smtp=replace(s.settings.smtp, port=port))
