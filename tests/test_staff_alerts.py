"""Alerts to staff: each cause raised once an hour, logged at ERROR, queued for alert_emails."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
import sqlalchemy as sa

from mailer.db.schema import staff_alerts, staff_mail
from mailer.staff.alerts import raise_alert
from tests.factories import NOW, make_settings


def _mails(engine: sa.Engine) -> list[sa.Row[tuple[str, str, str]]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(staff_mail.c.cause, staff_mail.c.recipients, staff_mail.c.subject).order_by(
                staff_mail.c.id
            )
        )
        return list(rows)


def test_an_alert_is_raised_once_an_hour_per_cause(
    engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(staff={"emails": ["editor@news.example.org"]})
    kwargs = {"subject": "feed failing", "text": "It failed."}
    with caplog.at_level(logging.ERROR, logger="mailer.staff.alerts"):
        assert raise_alert(engine, settings, cause="feed:a", now=NOW, **kwargs)
        assert not raise_alert(
            engine, settings, cause="feed:a", now=NOW + timedelta(minutes=59), **kwargs
        )
        assert raise_alert(engine, settings, cause="feed:b", now=NOW, **kwargs)
        assert raise_alert(
            engine, settings, cause="feed:a", now=NOW + timedelta(minutes=60), **kwargs
        )
    assert [r.getMessage() for r in caplog.records] == ["alert: feed failing"] * 3
    mails = _mails(engine)
    assert [m.cause for m in mails] == ["feed:a", "feed:b", "feed:a"]
    assert {m.recipients for m in mails} == {"editor@news.example.org"}
    assert mails[0].subject == "[Camp Lejeune & New River Updates] alert: feed failing"
    with engine.connect() as conn:
        times = conn.execute(
            sa.select(staff_alerts.c.times).where(staff_alerts.c.cause == "feed:a")
        ).scalar_one()
    assert times == 2


def test_alert_emails_default_to_staff_emails_and_none_configured_only_logs(
    engine: sa.Engine,
) -> None:
    both = make_settings(
        staff={"emails": ["editor@news.example.org"], "alert_emails": ["oncall@news.example.org"]}
    )
    assert both.staff.alert_emails == ("oncall@news.example.org",)
    nobody = make_settings()
    assert raise_alert(engine, nobody, cause="x", subject="s", text="t", now=NOW)
    assert _mails(engine) == []
