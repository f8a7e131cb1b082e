"""The review window: an issue made before its slot, staff acting on it, and its release at
the slot under both ``on_unreviewed`` policies (fixed clock, real aiosmtpd, SQLite and
PostgreSQL)."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from mailer.cli import cli, main
from mailer.compose.rendering import Renderer
from mailer.config.settings import Settings
from mailer.content.store import upsert_articles
from mailer.db.schema import deliveries, events, issue_articles, issues, staff_alerts, staff_mail
from mailer.delivery.pool import SmtpPool
from mailer.delivery.worker import Deliverer
from mailer.errors import DigestError, IssueStateError
from mailer.issues import review, review_actions, schedule
from mailer.issues.create import create_issue
from mailer.issues.progress import kept_articles, load_content
from mailer.issues.upcoming import upcoming
from mailer.models import Article
from mailer.service import Service
from mailer.subscribers.lifecycle import unsubscribe
from tests.factories import (
    BASE_CONFIG,
    NOW,
    SECRET,
    Clock,
    make_article,
    make_settings,
    make_subscriber,
    server_settings,
    write_config,
)
from tests.smtp_server import FaultServer, smtp_server  # noqa: F401

# NOW is Friday 20 November 2026 12:00 UTC, 07:00 in New York: a slot of the weekly digest.
SLOT = NOW
OPENS = SLOT - timedelta(minutes=60)
NEXT_SLOT = SLOT + timedelta(days=7)
EDITOR = "editor@news.example.org"
WEEKLY = BASE_CONFIG["digests"][0]


def reviewed(on_unreviewed: str = "send", **more: Any) -> dict[str, Any]:
    return WEEKLY | {"review_minutes": 60, "on_unreviewed": on_unreviewed} | more


def settings_for(db_url: str, server: FaultServer | None = None, **digest: Any) -> Settings:
    sections: dict[str, Any] = {"digests": [reviewed(**digest)], "staff": {"emails": [EDITOR]}}
    if server is None:
        return make_settings(db_url, **sections)
    return server_settings(db_url, server, **sections)


def stock(engine: sa.Engine, *titles: str, arrived: datetime = OPENS - timedelta(hours=2)) -> None:
    """Articles published a day before the slot, arrived before the window opens."""
    upsert_articles(
        engine,
        [make_article(title=t, published_at=SLOT - timedelta(days=1)) for t in titles],
        now=arrived,
    )


def open_window(engine: sa.Engine, settings: Settings, at: datetime = OPENS) -> int:
    renderer = Renderer()
    made = review.open_due_reviews(
        engine, settings, now=at, render_subject=renderer.render_subject, renderer=renderer
    )
    assert len(made) == 1
    return made[0]


def status(engine: sa.Engine, issue_id: int) -> str:
    with engine.connect() as conn:
        return str(conn.scalar(sa.select(issues.c.status).where(issues.c.id == issue_id)))


def titles_in(engine: sa.Engine, settings: Settings, issue_id: int) -> list[str]:
    with engine.connect() as conn:
        return sorted(a.title for a in load_content(conn, issue_id, settings).articles)


def delivery_count(engine: sa.Engine, issue_id: int) -> int:
    with engine.connect() as conn:
        return int(
            conn.scalar(
                sa.select(sa.func.count())
                .select_from(deliveries)
                .where(deliveries.c.issue_id == issue_id)
            )
        )


def staff_mails(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(staff_mail).order_by(staff_mail.c.id)).all())


def next_issue(engine: sa.Engine, settings: Settings) -> int:
    """The issue after: next week's, made at its slot as if it had no review."""
    made = create_issue(
        engine,
        settings,
        settings.digests[0],
        scheduled_for=NEXT_SLOT,
        now=NEXT_SLOT,
        render_subject=Renderer().render_subject,
        reviewed=False,
    )
    return made.issue_id


async def drain(engine: sa.Engine, settings: Settings, at: datetime) -> dict[str, int]:
    async with SmtpPool(settings.smtp) as pool:
        totals = await Deliverer(engine, settings, pool, clock=lambda: at).drain()
    return totals.counts


def received(server: FaultServer) -> list[str]:
    return sorted(r.recipients[0] for r in server.received)


def text_of(data: bytes) -> str:
    message: Message = message_from_bytes(data)
    for part in message.walk():
        if part.get_content_type() == "text/plain":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return payload.decode()
    raise AssertionError("no text part")


# ---------------------------------------------------------------- opening the window


def test_the_window_makes_the_issue_in_review_without_deliveries_and_mails_staff(
    engine: sa.Engine, db_url: str
) -> None:
    settings = settings_for(db_url)
    stock(engine, "Gate 3 closed", "Road work on Holcomb")
    make_subscriber(engine, topics=["base-alerts"])
    make_subscriber(engine, topics=["base-alerts", "local-events"])
    make_subscriber(engine, topics=["base-alerts", "local-events"])
    make_subscriber(engine, topics=["local-events"])  # no article in their topics

    renderer = Renderer()
    before = review.open_due_reviews(
        engine,
        settings,
        now=OPENS - timedelta(minutes=1),
        render_subject=renderer.render_subject,
        renderer=renderer,
    )
    assert before == []  # the window is not open yet
    issue_id = open_window(engine, settings)

    assert status(engine, issue_id) == "review"
    assert delivery_count(engine, issue_id) == 0
    assert titles_in(engine, settings, issue_id) == ["Gate 3 closed", "Road work on Holcomb"]
    (mail,) = staff_mails(engine)
    assert (mail.kind, mail.cause, mail.recipients) == ("review", f"review:{issue_id}", EDITOR)
    assert mail.subject == (
        "[Review] Weekly digest for Fri 20 Nov 2026 07:00 EST: 2 articles, 3 readers"
    )
    text = mail.text
    assert "If nobody acts, it goes out at Fri 20 Nov 2026 07:00 EST" in text
    # The variants: both articles are Base alerts, so all three readers get the same digest,
    # whatever else they chose.
    assert re.search(r"\n\s+3  Base alerts\n\nArticles", text), text
    with engine.connect() as conn:
        ids = conn.scalars(
            sa.select(issue_articles.c.article_id).where(issue_articles.c.issue_id == issue_id)
        ).all()
    for article_id in ids:
        assert re.search(rf"\b{article_id}  \[Base alerts\] ", text), text
    for command in (
        f"mailer issues approve {issue_id}",
        f"mailer issues hold {issue_id}",
        f"mailer issues skip {issue_id}",
        f"mailer issues drop-article {issue_id} ARTICLE_ID",
        "mailer digest test weekly --to ADDRESS",
    ):
        assert command in text
        assert command in mail.html
    # Then the digest as the most common variant's reader sees it, in both parts.
    assert "as a reader of Base alerts will see it" in text
    shown = text.split("will see it:", 1)[1]
    assert "Gate 3 closed" in shown and "Road work on Holcomb" in shown
    assert mail.html.count("<html") == 1 and "Gate 3 closed" in mail.html
    assert mail.html.index("in review") < mail.html.index("Gate 3 closed")

    # Every later round finds the issue made and its mail queued: nothing again.
    again = review.open_due_reviews(
        engine, settings, now=OPENS + timedelta(minutes=5),
        render_subject=renderer.render_subject, renderer=renderer,
    )  # fmt: skip
    assert again == []
    assert len(staff_mails(engine)) == 1


def test_an_issue_made_without_its_mail_gets_it_at_the_next_round(
    engine: sa.Engine, db_url: str
) -> None:
    """A crash between making the issue and queueing its mail loses no mail."""
    settings = settings_for(db_url, on_unreviewed="hold")
    stock(engine, "Gate 3 closed")
    make_subscriber(engine)
    made = create_issue(
        engine, settings, settings.digests[0], scheduled_for=SLOT, now=OPENS,
        render_subject=Renderer().render_subject,
    )  # fmt: skip
    assert made.status == "review" and not staff_mails(engine)
    assert made.recipients == 1  # counted, not snapshotted
    renderer = Renderer()
    assert review.queue_review_mails(engine, settings, now=OPENS, renderer=renderer) == [
        made.issue_id
    ]
    (mail,) = staff_mails(engine)
    assert "If nobody acts, it is held at its slot" in mail.text
    assert review.queue_review_mails(engine, settings, now=OPENS, renderer=renderer) == []


def test_a_window_with_no_article_makes_an_empty_issue_and_no_mail(
    engine: sa.Engine, db_url: str
) -> None:
    settings = settings_for(db_url)
    make_subscriber(engine)
    issue_id = open_window(engine, settings)
    assert status(engine, issue_id) == "empty"
    assert staff_mails(engine) == []


# ---------------------------------------------------------------- the slot


async def test_approved_goes_out_at_the_slot_to_who_is_subscribed_then(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    settings = settings_for(db_url, smtp_server, on_unreviewed="hold")
    stock(engine, "Gate 3 closed")
    make_subscriber(engine, email="stays@example.org")
    leaves = make_subscriber(engine, email="leaves@example.org")
    issue_id = open_window(engine, settings)

    outcome = review_actions.approve(
        engine, settings, issue_id, by="ana", now=OPENS + timedelta(minutes=5)
    )
    assert (outcome.status, outcome.recipients, outcome.released) == ("approved", 2, False)
    assert outcome.goes_out == SLOT
    unsubscribe(engine, leaves.uid, now=OPENS + timedelta(minutes=10), via="link")
    make_subscriber(engine, email="joins@example.org", now=OPENS + timedelta(minutes=20))
    assert review.release_due(engine, settings, now=SLOT - timedelta(seconds=1)) == []
    assert status(engine, issue_id) == "approved"

    (released,) = review.release_due(engine, settings, now=SLOT)
    assert (released.status, released.recipients) == ("sending", 2)
    assert await drain(engine, settings, SLOT) == {"sent": 2}
    assert received(smtp_server) == ["joins@example.org", "stays@example.org"]
    assert status(engine, issue_id) == "sent"
    with engine.connect() as conn:
        acted = conn.execute(
            sa.select(events.c.kind, events.c.detail, events.c.at)
            .where(events.c.subscriber_id.is_(None))
            .order_by(events.c.id)
        ).all()
    assert [(e.kind, e.detail["by"], e.at) for e in acted] == [
        ("issue.approved", "ana", OPENS + timedelta(minutes=5)),
        ("issue.released", "schedule", SLOT),
    ]


async def test_unreviewed_under_send_goes_out_at_the_slot(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    settings = settings_for(db_url, smtp_server, on_unreviewed="send")
    stock(engine, "Gate 3 closed")
    make_subscriber(engine, email="reader@example.org")
    open_window(engine, settings)

    (released,) = review.release_due(engine, settings, now=SLOT + timedelta(seconds=3))
    assert (released.status, released.released) == ("sending", True)
    assert review.release_due(engine, settings, now=SLOT + timedelta(minutes=1)) == []
    assert await drain(engine, settings, SLOT + timedelta(seconds=3)) == {"sent": 1}
    assert received(smtp_server) == ["reader@example.org"]
    assert "Gate 3 closed" in text_of(smtp_server.received[0].data)
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(staff_alerts)) == 0


def test_a_digest_gone_from_the_config_is_held_and_the_alert_says_what_can_be_done(
    engine: sa.Engine, db_url: str
) -> None:
    settings = settings_for(db_url)
    stock(engine, "Gate 3 closed")
    make_subscriber(engine)
    issue_id = open_window(engine, settings)
    other = WEEKLY | {"key": "daily", "name": "Daily digest"}
    without = make_settings(db_url, digests=[other], staff={"emails": [EDITOR]})

    (held,) = review.release_due(engine, without, now=SLOT)
    assert (held.status, held.released) == ("held", False)
    assert delivery_count(engine, issue_id) == 0
    (alert,) = [m for m in staff_mails(engine) if m.kind == "alert"]
    assert "its digest weekly is no longer in the config" in alert.text
    # Approving it cannot work while the digest is gone: the alert does not send staff there.
    with pytest.raises(DigestError, match="no longer in the config"):
        review_actions.approve(engine, without, issue_id, by="ana", now=SLOT)
    assert "put the digest weekly back in the config and run `mailer issues approve" in alert.text
    assert f"mailer issues skip {issue_id}" in alert.text


async def test_unreviewed_under_hold_is_held_with_an_alert_then_approved_goes_out(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    settings = settings_for(db_url, smtp_server, on_unreviewed="hold")
    stock(engine, "Gate 3 closed")
    make_subscriber(engine, email="reader@example.org")
    issue_id = open_window(engine, settings)

    (held,) = review.release_due(engine, settings, now=SLOT)
    assert held.status == "held" and not held.released
    assert status(engine, issue_id) == "held" and delivery_count(engine, issue_id) == 0
    alert = [m for m in staff_mails(engine) if m.kind == "alert"]
    assert len(alert) == 1 and alert[0].cause == f"held:issue:{issue_id}"
    assert f"mailer issues approve {issue_id}" in alert[0].text
    assert "is held" in alert[0].subject
    # Held stays held, round after round.
    assert review.release_due(engine, settings, now=SLOT + timedelta(hours=2)) == []
    assert status(engine, issue_id) == "held"

    late = SLOT + timedelta(hours=3)
    outcome = review_actions.approve(engine, settings, issue_id, by="ana", now=late)
    assert (outcome.status, outcome.released, outcome.recipients) == ("sending", True, 1)
    assert await drain(engine, settings, late) == {"sent": 1}
    assert received(smtp_server) == ["reader@example.org"]


def test_held_by_staff_stays_held_at_the_slot_and_skip_is_final(
    engine: sa.Engine, db_url: str
) -> None:
    settings = settings_for(db_url, on_unreviewed="send")
    stock(engine, "Gate 3 closed")
    make_subscriber(engine)
    issue_id = open_window(engine, settings)
    assert review_actions.hold(engine, settings, issue_id, by="bo", now=OPENS).status == "held"
    assert review.release_due(engine, settings, now=SLOT) == []
    assert status(engine, issue_id) == "held" and delivery_count(engine, issue_id) == 0
    assert review_actions.skip(engine, settings, issue_id, by="bo", now=SLOT).status == "skipped"
    for act in (review_actions.approve, review_actions.hold, review_actions.skip):
        with pytest.raises(IssueStateError, match=f"issue {issue_id} is skipped: only an issue"):
            act(engine, settings, issue_id, by="bo", now=SLOT)
    with pytest.raises(IssueStateError, match="skipped: only an issue in review, approved or held"):
        review_actions.drop_article(engine, issue_id, 1, by="bo", now=SLOT)


def test_a_skipped_issue_gives_its_articles_to_the_next(engine: sa.Engine, db_url: str) -> None:
    settings = settings_for(db_url)
    stock(engine, "Gate 3 closed", "Road work on Holcomb")
    make_subscriber(engine)
    issue_id = open_window(engine, settings)
    outcome = review_actions.skip(
        engine, settings, issue_id, by="ana", now=OPENS + timedelta(minutes=1)
    )
    assert outcome.articles == 2
    assert review.release_due(engine, settings, now=SLOT) == []
    assert titles_in(engine, settings, next_issue(engine, settings)) == [
        "Gate 3 closed",
        "Road work on Holcomb",
    ]


def test_articles_arriving_in_the_window_go_to_the_next_issue(
    engine: sa.Engine, db_url: str
) -> None:
    settings = settings_for(db_url)
    stock(engine, "Gate 3 closed")
    make_subscriber(engine)
    issue_id = open_window(engine, settings)
    upsert_articles(
        engine,
        [make_article(title="Late news", published_at=OPENS - timedelta(minutes=30))],
        now=OPENS + timedelta(minutes=20),
    )
    review.release_due(engine, settings, now=SLOT)
    assert titles_in(engine, settings, issue_id) == ["Gate 3 closed"]
    assert titles_in(engine, settings, next_issue(engine, settings)) == ["Late news"]


async def test_a_dropped_article_goes_out_in_no_issue(
    engine: sa.Engine,
    db_url: str,
    smtp_server: FaultServer,  # noqa: F811
) -> None:
    settings = settings_for(db_url, smtp_server)
    stock(engine, "Gate 3 closed", "Wrong story")
    make_subscriber(engine, email="reader@example.org")
    issue_id = open_window(engine, settings)
    with engine.connect() as conn:
        wrong = conn.scalar(
            sa.select(issue_articles.c.article_id)
            .join(issues, issues.c.id == issue_articles.c.issue_id)
            .where(issue_articles.c.issue_id == issue_id)
            .order_by(issue_articles.c.article_id.desc())
        )
    assert wrong is not None
    dropped = review_actions.drop_article(engine, issue_id, wrong, by="ana", now=OPENS)
    assert (dropped.title, dropped.left) == ("Wrong story", 1)
    with pytest.raises(IssueStateError, match=f"article {wrong} was dropped from issue"):
        review_actions.drop_article(engine, issue_id, wrong, by="ana", now=OPENS)
    assert titles_in(engine, settings, issue_id) == ["Gate 3 closed"]

    review.release_due(engine, settings, now=SLOT)
    assert await drain(engine, settings, SLOT) == {"sent": 1}
    body = text_of(smtp_server.received[0].data)
    assert "Gate 3 closed" in body and "Wrong story" not in body
    assert titles_in(engine, settings, next_issue(engine, settings)) == []


def test_dropping_every_article_leaves_an_empty_issue(engine: sa.Engine, db_url: str) -> None:
    settings = settings_for(db_url)
    stock(engine, "Only story")
    make_subscriber(engine)
    issue_id = open_window(engine, settings)
    (only,) = kept(engine, issue_id)
    review_actions.drop_article(engine, issue_id, only.id, by="ana", now=OPENS)
    (released,) = review.release_due(engine, settings, now=SLOT)
    assert (released.status, released.recipients) == ("empty", 0)


def kept(engine: sa.Engine, issue_id: int) -> tuple[Article, ...]:
    with engine.connect() as conn:
        return kept_articles(conn, issue_id)


def test_unknown_issue_and_article_not_in_it_are_one_line_errors(
    engine: sa.Engine, db_url: str
) -> None:
    settings = settings_for(db_url)
    stock(engine, "Gate 3 closed")
    make_subscriber(engine)
    issue_id = open_window(engine, settings)
    with pytest.raises(DigestError, match=r"^no issue 999: `mailer issues list` shows their ids$"):
        review_actions.approve(engine, settings, 999, by="ana", now=OPENS)
    with pytest.raises(DigestError, match=f"^article 999 is not in issue {issue_id} "):
        review_actions.drop_article(engine, issue_id, 999, by="ana", now=OPENS)
    review.release_due(engine, settings, now=SLOT)
    with pytest.raises(
        IssueStateError,
        match=f"^issue {issue_id} is sending: only an issue in review or approved can be held$",
    ):
        review_actions.hold(engine, settings, issue_id, by="ana", now=SLOT)


# ---------------------------------------------------------------- the service at the slot


def test_the_cron_firing_releases_the_issue_made_for_review(engine: sa.Engine, db_url: str) -> None:
    settings = settings_for(db_url, on_unreviewed="send")
    stock(engine, "Gate 3 closed")
    make_subscriber(engine)
    issue_id = open_window(engine, settings)
    service = Service(engine, settings, clock=Clock(SLOT + timedelta(seconds=1)))
    made = service.fire(settings.digests[0], SLOT)
    assert made is not None and made.issue_id == issue_id and not made.created
    assert status(engine, issue_id) == "sending" and delivery_count(engine, issue_id) == 1
    assert service.work.is_set()


@pytest.mark.parametrize(("policy", "expected"), [("send", "sending"), ("hold", "held")])
def test_a_missed_window_applies_on_unreviewed_at_once(
    engine: sa.Engine, db_url: str, policy: str, expected: str
) -> None:
    settings = settings_for(db_url, on_unreviewed=policy)
    stock(engine, "Gate 3 closed")
    make_subscriber(engine)
    service = Service(engine, settings, clock=Clock(SLOT + timedelta(minutes=2)))
    made = service.fire(settings.digests[0], SLOT)
    assert made is not None and made.created and made.status == expected
    assert delivery_count(engine, made.issue_id) == (1 if policy == "send" else 0)
    alerts = [m.cause for m in staff_mails(engine) if m.kind == "alert"]
    assert alerts == ([f"held:issue:{made.issue_id}"] if policy == "hold" else [])


def test_catch_up_sees_a_missed_slot_behind_an_issue_made_for_review(
    engine: sa.Engine, db_url: str
) -> None:
    settings = make_settings(
        db_url,
        digests=[reviewed("send", schedule="0 7 * * *")],
        scheduler={"catch_up_hours": 48},
    )
    stock(engine, "Gate 3 closed")
    make_subscriber(engine)
    open_window(engine, settings)  # today's slot, in review
    # Yesterday's slot passed while nothing ran: caught up, though a later issue exists.
    service = Service(engine, settings, clock=Clock(OPENS + timedelta(minutes=5)))
    (missed,) = service.catch_up()
    with engine.connect() as conn:
        slot = conn.scalar(sa.select(issues.c.scheduled_for).where(issues.c.id == missed.issue_id))
    assert slot == SLOT - timedelta(days=1) and missed.status == "empty"


def test_the_round_steps_open_and_release(engine: sa.Engine, db_url: str) -> None:
    settings = settings_for(db_url)
    stock(engine, "Gate 3 closed")
    make_subscriber(engine)
    woken: list[bool] = []
    renderer = Renderer()
    steps = review.round_steps(
        engine, settings, renderer=renderer, render_subject=renderer.render_subject,
        on_release=lambda: woken.append(True),
    )  # fmt: skip
    for step in steps:
        step(OPENS + timedelta(minutes=1))
    with engine.connect() as conn:
        (issue_id,) = conn.scalars(sa.select(issues.c.id)).all()
    assert status(engine, issue_id) == "review" and not woken
    for step in steps:
        step(SLOT)
    assert status(engine, issue_id) == "sending" and woken == [True]


# ---------------------------------------------------------------- the command line


@pytest.fixture
def config(
    tmp_path: Path,
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
    smtp_server: FaultServer,  # noqa: F811
) -> Path:
    monkeypatch.setenv("MAILER_SECRET_KEY", SECRET)
    return write_config(
        tmp_path / "mailer.toml",
        db_url,
        digests=[reviewed("send")],
        staff={"emails": [EDITOR]},
        smtp={"host": "127.0.0.1", "port": smtp_server.port, "timeout": 5},
    )


def run(config: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--config", str(config), *args], catch_exceptions=False)


def fails(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config), *args])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def made_for_review(engine: sa.Engine, settings: Settings) -> tuple[int, datetime]:
    """An issue in review for the digest's next slot by the real clock (CLI commands use it)."""
    real_now = datetime.now(UTC).replace(microsecond=0)
    ((_digest, slot),) = schedule.upcoming(settings.digests, real_now)
    upsert_articles(
        engine,
        [make_article(title="Gate 3 closed", published_at=real_now - timedelta(hours=2))],
        now=real_now - timedelta(hours=1),
    )
    make_subscriber(engine, email="reader@example.org")
    made = create_issue(
        engine, settings, settings.digests[0], scheduled_for=slot, now=real_now,
        render_subject=Renderer().render_subject,
    )  # fmt: skip
    assert made.status == "review"
    return made.issue_id, slot


def test_cli_acts_on_an_issue_in_review_with_one_line_each(
    config: Path, engine: sa.Engine, db_url: str
) -> None:
    settings = settings_for(db_url)
    issue_id, _slot = made_for_review(engine, settings)
    article_id = kept(engine, issue_id)[0].id

    result = run(config, "issues", "approve", str(issue_id), "--by", "ana")
    assert result.exit_code == 0
    assert re.fullmatch(
        rf"issue {issue_id} approved by ana: goes out \w{{3}} \d+ \w{{3}} \d{{4}} \d\d:\d\d"
        r" E[SD]T to about 1 reader\n",
        result.output,
    ), result.output
    shown = run(config, "issues", "show", str(issue_id)).output
    assert f"issue {issue_id} approved" in shown
    assert "would go to 1 reader now" in shown
    assert "approved by ana" in shown
    assert f"{article_id}  [base-alerts] Gate 3 closed" in shown
    listed = run(config, "issues", "list").output
    assert "approved" in listed and "(ana)" in listed  # the table wraps at 80 columns

    result = run(config, "issues", "hold", str(issue_id), "--by", "bo")
    assert result.output.startswith(f"issue {issue_id} held by bo: it does not go out at ")
    result = run(config, "issues", "drop-article", str(issue_id), str(article_id), "--by", "bo")
    assert result.output == (
        f"article {article_id} (Gate 3 closed) dropped from issue {issue_id} by bo: no article"
        " left: it will be empty; no later issue of weekly takes it\n"
    )
    result = run(config, "issues", "skip", str(issue_id))
    assert result.exit_code == 0 and f"issue {issue_id} skipped by " in result.output


def test_cli_bad_input_is_one_line_and_exit_1(
    config: Path, engine: sa.Engine, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_for(db_url)
    issue_id, _slot = made_for_review(engine, settings)
    assert (
        fails(config, capsys, "issues", "approve", "999")
        == "error: no issue 999: `mailer issues list` shows their ids"
    )
    assert fails(config, capsys, "issues", "drop-article", str(issue_id), "999").startswith(
        f"error: article 999 is not in issue {issue_id}"
    )
    # digest send does not make a second issue beside the one in review.
    refused = fails(config, capsys, "digest", "send", "weekly")
    assert refused.startswith(f"error: weekly has issue {issue_id} review for ")
    assert f"`mailer issues approve {issue_id}`" in refused
    assert run(config, "issues", "skip", str(issue_id)).exit_code == 0
    assert fails(config, capsys, "issues", "approve", str(issue_id)) == (
        f"error: issue {issue_id} is skipped: only an issue in review or held can be approved"
    )


# ---------------------------------------------------------------- digest upcoming


def test_upcoming_says_when_review_opens_and_shows_the_issue_made(
    engine: sa.Engine, db_url: str
) -> None:
    settings = settings_for(db_url, on_unreviewed="hold")
    stock(engine, "Gate 3 closed")
    make_subscriber(engine, topics=["base-alerts"])
    (before,) = upcoming(engine, settings, now=OPENS - timedelta(hours=1), count=2)
    assert [s.review_opens for s in before.slots] == [OPENS, NEXT_SLOT - timedelta(hours=1)]
    assert before.takes_at == before.slots[0] and before.slots[0].issue is None
    assert [a.title for a in before.articles] == ["Gate 3 closed"]

    issue_id = open_window(engine, settings)
    upsert_articles(
        engine,
        [make_article(title="Late news", published_at=OPENS)],
        now=OPENS + timedelta(minutes=10),
    )
    review_actions.approve(engine, settings, issue_id, by="ana", now=OPENS + timedelta(minutes=15))
    (during,) = upcoming(engine, settings, now=OPENS + timedelta(minutes=20), count=2)
    made = during.slots[0].issue
    assert made is not None
    assert (made.id, made.status, made.acted) == (issue_id, "approved", "approved by ana")
    assert made.acted_at == OPENS + timedelta(minutes=15)
    assert [a.title for a in made.articles] == ["Gate 3 closed"]
    assert made.total_recipients == 1
    # What arrived in the window is what the next slot would take.
    assert during.takes_at == during.slots[1]
    assert [a.title for a in during.articles] == ["Late news"]

    review_actions.hold(engine, settings, issue_id, by="bo", now=OPENS + timedelta(minutes=25))
    review.release_due(engine, settings, now=SLOT)
    (after,) = upcoming(engine, settings, now=SLOT + timedelta(hours=1), count=1)
    assert [w.id for w in after.waiting] == [issue_id]
    assert after.waiting[0].acted == "held by bo"


def test_cli_upcoming_shows_the_issue_in_review_and_the_window(
    config: Path, engine: sa.Engine, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_for(db_url)
    issue_id, slot = made_for_review(engine, settings)
    main(["--config", str(config), "digest", "upcoming", "--count", "2"])
    output = capsys.readouterr().out
    assert f"issue {issue_id} for {schedule.local_time(slot, settings.site.timezone)}: review" in (
        output
    )
    assert "Gate 3 closed" in output
    assert "articles arriving after that go in the next issue" in output
    main(["--config", str(config), "digest", "upcoming", "--format", "json"])
    (weekly,) = json.loads(capsys.readouterr().out)
    assert weekly["slots"][0]["issue"]["id"] == issue_id
    assert weekly["slots"][0]["issue"]["status"] == "review"
    assert weekly["takes_at"] == weekly["slots"][1]["slot"]
    main(["--config", str(config), "digest", "upcoming", "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["title"] for r in rows if r["issue"] == str(issue_id) and r["row"] == "article"] == [
        "Gate 3 closed"
    ]
