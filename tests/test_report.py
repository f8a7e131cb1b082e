"""An issue's report: counts after a real send with scripted 4xx and 5xx replies, the report
mail queued once per final issue, the failure alert, and what happened in the 72 hours after."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from mailer.bounces.apply import apply_reports
from mailer.bounces.reports import BounceKind, Report
from mailer.cli import cli, main
from mailer.config.settings import Settings
from mailer.content.article import ParsedArticle
from mailer.content.store import upsert_articles
from mailer.db.engine import create_engine
from mailer.db.schema import deliveries, issues, staff_alerts, staff_mail
from mailer.delivery.pool import SmtpPool
from mailer.delivery.worker import Deliverer
from mailer.errors import UnknownIssueError
from mailer.issues.progress import cancel
from mailer.issues.report import Outcomes, Reason, Suppressions, TopicSet, build_report
from mailer.issues.report_text import render_report, report_json
from mailer.staff.reports import queue_reports
from mailer.subscribers import lifecycle, store
from tests.factories import (
    NOW,
    SECRET,
    Clock,
    make_article,
    make_issue,
    make_settings,
    make_subscriber,
    ready_to_send,
    server_settings,
    write_config,
)
from tests.smtp_server import FaultServer, smtp_server  # noqa: F401

pytestmark = pytest.mark.slow

STAFF = "editor@news.example.org"
DONE = NOW + timedelta(hours=1)  # the retry round, which ends the issue
GREYLISTED = "451 4.7.1 greylisted, come back soon"


def staff_settings(db_url: str, server: FaultServer, failure_percent: float) -> Settings:
    return server_settings(
        db_url,
        server,
        smtp={"connections": 2, "timeout": 2, "retry_max_age_hours": 1},
        staff={"emails": [STAFF], "failure_percent": failure_percent},
    )


def add_article(engine: sa.Engine, topic: str, title: str) -> None:
    item = ParsedArticle(
        guid=f"urn:test:{title}",
        topic=topic,
        title=title,
        summary="Summary.",
        why_it_matters="Why.",
        body="Body.",
        link="https://news.example.org/a",
        published_at=NOW - timedelta(hours=2),
    )
    upsert_articles(engine, [item], now=NOW)


async def drain(engine: sa.Engine, settings: Settings, at: Clock, issue_id: int) -> dict[str, int]:
    async with SmtpPool(settings.smtp) as pool:
        totals = await Deliverer(engine, settings, pool, clock=at).drain(issue_id=issue_id)
    return totals.counts


@dataclass
class Sent:
    issue_id: int
    settings: Settings


async def send_with_faults(
    engine: sa.Engine, db_url: str, server: FaultServer, *, failure_percent: float = 50
) -> Sent:
    """Six recipients in two topic sets (a seventh chose only a topic without articles: not
    one): one refused for good (550), one greylisted once (sent on the retry), one greylisted
    then refused for too long (failed). Sent at NOW, retried at DONE."""
    settings = staff_settings(db_url, server, failure_percent)
    add_article(engine, "base-alerts", "Gate closed")
    add_article(engine, "local-events", "Market on the Riverwalk")
    for name in ("all", "ok", "later", "full"):
        make_subscriber(engine, email=f"{name}@example.org")
    for name in ("events", "gone"):
        make_subscriber(engine, email=f"{name}@example.org", topics=["local-events"])
    make_subscriber(engine, email="military@example.org", topics=["military-news"])
    server.script("gone@example.org", ["550 5.1.1 no such user"])
    server.script("later@example.org", [GREYLISTED])
    server.script("full@example.org", [GREYLISTED, "452 4.2.2 mailbox full"])
    issue = make_issue(engine, settings)
    await drain(engine, settings, Clock(NOW), issue.issue_id)
    return Sent(issue.issue_id, settings)


async def test_a_report_while_sending_counts_so_far_and_then_the_whole_issue(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    sent = await send_with_faults(engine, db_url, smtp_server)
    settings, issue_id = sent.settings, sent.issue_id

    so_far = build_report(engine, settings, issue_id, now=NOW + timedelta(minutes=5))
    assert (so_far.status, so_far.final) == ("sending", False)
    assert so_far.outcomes == Outcomes(sent=3, deferred=2, bounced=1)
    assert so_far.reasons["deferred"] == (Reason(GREYLISTED, 2),)
    assert so_far.reasons["bounced"] == (Reason("550 5.1.1 no such user", 1),)
    assert so_far.elapsed_seconds == 0 and so_far.rate is None
    assert so_far.aftermath is not None and not so_far.aftermath.complete

    await drain(engine, settings, Clock(DONE), issue_id)
    report = build_report(engine, settings, issue_id, now=DONE)
    assert (report.status, report.final, report.completed_at) == ("sent", True, DONE)
    assert report.outcomes == Outcomes(sent=4, bounced=1, failed=1)
    assert report.outcomes.total == 6 and report.retried == 1
    assert report.topic_sets == (
        TopicSet(("base-alerts", "local-events"), ("Base alerts", "Local events"), 4, 3),
        TopicSet(("local-events",), ("Local events",), 2, 1),
    )
    assert report.reasons["failed"] == (Reason("452 4.2.2 mailbox full", 1),)
    assert report.reasons["bounced"] == (Reason("550 5.1.1 no such user", 1),)
    assert "deferred" not in report.reasons
    # First message at NOW, the issue done at DONE: four sent in an hour.
    assert report.first_sent_at == NOW and report.last_sent_at == DONE
    assert report.elapsed_seconds == 3600
    assert report.rate == pytest.approx(4 / 3600)
    # The 5.1.1 made its subscriber bounced: a suppression this issue caused.
    assert report.suppressions == Suppressions(bounced=1, complained=0)

    subject, text, html = render_report(report, settings)
    assert subject == (
        "[Report] Weekly digest, Fri 20 Nov 2026 07:00 EST: 4 sent, 1 bounced, 1 failed"
    )
    assert "Base alerts, Local events" in text and "452 4.2.2 mailbox full" in text
    assert "1 h 0 min from Fri 20 Nov 2026 07:00 EST to Fri 20 Nov 2026 08:00 EST" in text
    assert '<td style="font-family:monospace">550 5.1.1 no such user</td>' in html
    as_json = report_json(report)
    assert as_json["outcomes"]["failed"] == 1 and as_json["slot"] == NOW.isoformat()


async def test_queue_reports_queues_one_mail_per_final_issue_and_no_alert_under_the_limit(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    sent = await send_with_faults(engine, db_url, smtp_server, failure_percent=50)
    settings, issue_id = sent.settings, sent.issue_id
    assert queue_reports(engine, settings, now=NOW) == []  # still sending
    await drain(engine, settings, Clock(DONE), issue_id)

    assert queue_reports(engine, settings, now=DONE) == [issue_id]
    assert queue_reports(engine, settings, now=DONE + timedelta(minutes=1)) == []
    with engine.connect() as conn:
        mails = conn.execute(sa.select(staff_mail)).all()
        reported_at = conn.scalar(sa.select(issues.c.reported_at).where(issues.c.id == issue_id))
    assert [(m.kind, m.cause, m.recipients) for m in mails] == [
        ("report", f"report:{issue_id}", STAFF)
    ]
    assert mails[0].subject.startswith("[Report] Weekly digest, Fri 20 Nov 2026 07:00 EST")
    assert "still waiting" in mails[0].text and "<table" in mails[0].html
    assert reported_at == DONE
    # 2 of 6 (33.3 %) failed or bounced: under 50 %, no alert.
    with engine.connect() as conn:
        assert conn.execute(sa.select(staff_alerts)).all() == []


async def test_an_issue_over_failure_percent_raises_the_alert_once(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    sent = await send_with_faults(engine, db_url, smtp_server, failure_percent=20)
    settings, issue_id = sent.settings, sent.issue_id
    await drain(engine, settings, Clock(DONE), issue_id)
    assert queue_reports(engine, settings, now=DONE) == [issue_id]
    assert queue_reports(engine, settings, now=DONE) == []
    with engine.connect() as conn:
        mails = conn.execute(sa.select(staff_mail).order_by(staff_mail.c.id)).all()
        alerts = conn.execute(sa.select(staff_alerts)).all()
    assert [(m.kind, m.cause) for m in mails] == [
        ("report", f"report:{issue_id}"),
        ("alert", f"failures:issue:{issue_id}"),
    ]
    assert [a.cause for a in alerts] == [f"failures:issue:{issue_id}"]
    alert = mails[1]
    assert "33.3 % failed or bounced (over 20 %)" in alert.subject
    assert "1 failed and 1 bounced of 6 deliveries" in alert.text
    assert "452 4.2.2 mailbox full" in alert.text and "550 5.1.1 no such user" in alert.text


def test_empty_issues_get_no_report(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    settings = staff_settings(db_url, smtp_server, 5)
    make_subscriber(engine)
    issue = make_issue(engine, settings)  # no article: empty
    assert build_report(engine, settings, issue.issue_id, now=NOW).status == "empty"
    assert queue_reports(engine, settings, now=NOW) == []
    with engine.connect() as conn:
        assert conn.execute(sa.select(staff_mail)).all() == []


def test_an_unknown_issue_is_a_one_line_error(engine: sa.Engine, db_url: str) -> None:
    settings = make_settings(db_url)
    with pytest.raises(UnknownIssueError) as caught:
        build_report(engine, settings, 999, now=NOW)
    assert caught.value.issue_id == 999
    assert str(caught.value) == "no issue 999: `mailer issues list` shows their ids"


def _message_id(engine: sa.Engine, issue_id: int, email: str) -> str:
    sid = store.get(engine, email).id
    with engine.connect() as conn:
        found: str = conn.execute(
            sa.select(deliveries.c.message_id).where(
                deliveries.c.issue_id == issue_id, deliveries.c.subscriber_id == sid
            )
        ).scalar_one()
    return found


async def test_unsubscribes_and_complaints_within_72_hours_are_attributed(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    sent = await send_with_faults(engine, db_url, smtp_server)
    settings, issue_id = sent.settings, sent.issue_id
    await drain(engine, settings, Clock(DONE), issue_id)
    # "all" and "ok" were sent the issue at NOW; "later" at DONE.
    lifecycle.unsubscribe(
        engine, store.get(engine, "all@example.org").uid, now=NOW + timedelta(hours=10), via="x"
    )
    lifecycle.unsubscribe(
        engine, store.get(engine, "ok@example.org").uid, now=NOW + timedelta(hours=73), via="x"
    )
    # Staff removing someone is not a reader leaving.
    store.set_status(engine, "events@example.org", "unsubscribed", now=DONE, source="cli")
    complaint = Report(
        report_id="<arf.1@fbl.example.com>",
        kind="arf",
        outcome=BounceKind.COMPLAINT,
        date=NOW + timedelta(hours=30),
        addresses=("later@example.org",),
        message_id=_message_id(engine, issue_id, "later@example.org"),
    )
    apply_reports(engine, [complaint], now=NOW + timedelta(hours=30))
    # A complaint naming no message: the last issue its reader was sent, as an unsubscribe.
    anonymous = Report(
        report_id="<arf.2@fbl.example.com>",
        kind="arf",
        outcome=BounceKind.COMPLAINT,
        date=NOW + timedelta(hours=5),
        addresses=("events@example.org",),
    )
    apply_reports(engine, [anonymous], now=NOW + timedelta(hours=5))

    at_26 = build_report(engine, settings, issue_id, now=NOW + timedelta(hours=26))
    assert at_26.aftermath is not None
    assert (at_26.aftermath.unsubscribes, at_26.aftermath.complaints) == (1, 1)
    assert at_26.aftermath.hours == 26 and not at_26.aftermath.complete
    _s, text, _h = render_report(at_26, settings)
    assert (
        "so far, 26 hours after: 1 unsubscribe, 1 complaint;"
        " complete Mon 23 Nov 2026 08:00 EST" in text
    )

    final = build_report(engine, settings, issue_id, now=DONE + timedelta(hours=80))
    assert final.aftermath is not None and final.aftermath.complete
    assert (final.aftermath.unsubscribes, final.aftermath.complaints) == (1, 2)
    assert final.suppressions == Suppressions(bounced=1, complained=2)
    _s, text, _h = render_report(final, settings)
    assert "in the 72 hours after: 1 unsubscribe, 2 complaints" in text


async def test_an_unsubscribe_counts_for_the_last_issue_the_reader_was_sent(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    settings = staff_settings(db_url, smtp_server, 5)
    add_article(engine, "base-alerts", "Gate closed")
    reader = make_subscriber(engine, email="reader@example.org")
    first = make_issue(engine, settings)
    await drain(engine, settings, Clock(NOW), first.issue_id)
    add_article(engine, "local-events", "Market on the Riverwalk")
    second = make_issue(engine, settings, at=NOW + timedelta(hours=24))
    await drain(engine, settings, Clock(NOW + timedelta(hours=24)), second.issue_id)
    lifecycle.unsubscribe(engine, reader.uid, now=NOW + timedelta(hours=30), via="one-click")
    later = NOW + timedelta(days=5)

    def unsubscribes(issue_id: int) -> int:
        after = build_report(engine, settings, issue_id, now=later).aftermath
        assert after is not None
        return after.unsubscribes

    assert (unsubscribes(first.issue_id), unsubscribes(second.issue_id)) == (0, 1)


async def test_the_cli_prints_the_report_and_exits_1_for_an_unknown_issue(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sent = await send_with_faults(engine, db_url, smtp_server)
    await drain(engine, sent.settings, Clock(DONE), sent.issue_id)
    monkeypatch.setenv("MAILER_SECRET_KEY", SECRET)
    monkeypatch.setattr("mailer.cli.report.now", lambda: DONE + timedelta(hours=2))
    config = write_config(
        tmp_path / "mailer.toml",
        db_url,
        smtp={"host": "127.0.0.1", "port": smtp_server.port},
        staff={"emails": [STAFF]},
    )
    args = ["--config", str(config), "issues", "report"]
    result = CliRunner().invoke(cli, [*args, str(sent.issue_id)], catch_exceptions=False)
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0] == "Report: Weekly digest, Fri 20 Nov 2026 07:00 EST"
    assert "  sent           4  (1 after a retry)" in lines
    assert "  total          6" in lines
    assert any(line.startswith("Next") and "so far, 3 hours after" in line for line in lines)

    as_json = CliRunner().invoke(
        cli, [*args, str(sent.issue_id), "--format", "json"], catch_exceptions=False
    )
    assert as_json.exit_code == 0 and '"sent": 4' in as_json.output

    with pytest.raises(SystemExit) as exit_info:
        main([*args, "4242"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == (
        "error: no issue 4242: `mailer issues list` shows their ids\n"
    )


def test_digest_send_queues_the_report_of_the_issue_it_finished(
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAILER_SECRET_KEY", SECRET)
    config = ready_to_send(
        db_url,
        tmp_path / "mailer.toml",
        smtp_server,
        ["ann@example.org", "gone@example.org"],
        staff={"emails": [STAFF]},
    )
    smtp_server.script("gone@example.org", ["550 5.1.1 no such user"])
    result = CliRunner().invoke(
        cli, ["--config", str(config), "digest", "send", "weekly"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    engine = create_engine(db_url)
    with engine.connect() as conn:
        mails = conn.execute(sa.select(staff_mail)).all()
        reported = conn.execute(sa.select(issues.c.id, issues.c.reported_at)).all()
    engine.dispose()
    assert len(reported) == 1 and reported[0].reported_at is not None
    issue_id = reported[0].id
    # One of two bounced: over the default [staff].failure_percent (5), so an alert too.
    assert [(m.kind, m.cause, m.recipients) for m in mails] == [
        ("report", f"report:{issue_id}", STAFF),
        ("alert", f"failures:issue:{issue_id}", STAFF),
    ]
    assert mails[0].subject.endswith(": 1 sent, 1 bounced, 0 failed")


async def test_a_cancelled_issue_is_reported_as_cancelled(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    sent = await send_with_faults(engine, db_url, smtp_server, failure_percent=50)
    assert cancel(engine, sent.issue_id, now=DONE) == 2  # the two deferred
    assert queue_reports(engine, sent.settings, now=DONE) == [sent.issue_id]
    report = build_report(engine, sent.settings, sent.issue_id, now=DONE)
    assert report.final and report.outcomes == Outcomes(sent=3, bounced=1, cancelled=2)
    with engine.connect() as conn:
        subject = conn.execute(sa.select(staff_mail.c.subject)).scalar_one()
    assert subject == (
        "[Report] Weekly digest, Fri 20 Nov 2026 07:00 EST: cancelled, 3 sent, 1 bounced, 0 failed"
    )


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0.034, "0.03 s"),
        (2.5, "2.5 s"),
        (12.0, "12 s"),
        (250.0, "4 min 10 s"),
        (11_100, "3 h 5 min"),
    ],
)
def test_durations_read_as_staff_read_them_down_to_a_fast_small_issue(
    seconds: float, shown: str
) -> None:
    from mailer.issues.report_text import _duration

    assert _duration(seconds) == shown


def test_one_report_that_cannot_be_made_holds_back_no_other_and_is_alerted(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mailer.staff.reports as reports

    settings = staff_settings(db_url, smtp_server, 5)
    make_subscriber(engine)
    upsert_articles(engine, [make_article()], now=NOW)
    first = make_issue(engine, settings).issue_id
    upsert_articles(engine, [make_article()], now=NOW + timedelta(days=1))
    later = NOW + timedelta(days=7)
    second = make_issue(engine, settings, at=later).issue_id
    for issue_id in (first, second):
        cancel(engine, issue_id, now=NOW)
    real = reports.build_report

    def broken_first(engine: sa.Engine, settings: Settings, issue_id: int, **kw: object) -> object:
        if issue_id == first:
            raise RuntimeError("the template is broken")
        return real(engine, settings, issue_id, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(reports, "build_report", broken_first)
    assert queue_reports(engine, settings, now=NOW) == [second]
    assert queue_reports(engine, settings, now=NOW) == []  # tried again, alerted once
    with engine.connect() as conn:
        causes = conn.scalars(sa.select(staff_mail.c.cause).order_by(staff_mail.c.id)).all()
    assert causes == [f"report-failed:issue:{first}", f"report:{second}"]
