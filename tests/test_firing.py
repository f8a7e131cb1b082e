"""A scheduled firing that fails is logged with its digest and slot and retried, never dropped."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from mailer.compose.rendering import Renderer
from mailer.config.settings import Digest
from mailer.db.schema import issues
from mailer.errors import RenderError
from mailer.sandbox import Lead
from mailer.service import Parts, Service
from tests.factories import NOW, make_settings, make_subscriber

# NOW is a Friday 07:00 in New York: the weekly digest's slot.
SLOT_SHOWN = "Fri 20 Nov 2026 07:00 EST"


class BrokenSubject:
    """The issue's subject renderer, broken for its first ``failures`` calls (as a template
    that reads a value not there yet), then the real one; ``on_call`` runs at every call."""

    def __init__(self, failures: int, on_call: object = None) -> None:
        self.failures = failures
        self.calls = 0
        self.on_call = on_call

    def __call__(self, digest: Digest, date: datetime, articles: Sequence[Lead] = ()) -> str:
        self.calls += 1
        if callable(self.on_call):
            self.on_call()
        if self.calls <= self.failures:
            raise RenderError("'edition' is undefined", template=f"[[digests]] {digest.key!r}")
        return Renderer().render_subject(digest, date, articles)


def made_slots(engine: sa.Engine) -> list[datetime]:
    with engine.connect() as conn:
        return list(conn.scalars(sa.select(issues.c.scheduled_for)))


async def fire_and_settle(service: Service, digest: Digest) -> None:
    """What the scheduler's job does, then every retry it started, to its end."""
    await service.fire_scheduled(digest)
    await asyncio.gather(*list(service.firings))


def errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "mailer.service"]


async def test_a_failed_firing_is_logged_with_digest_and_slot_and_made_on_retry(
    engine: sa.Engine, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(db_url)
    make_subscriber(engine)
    broken = BrokenSubject(failures=2)
    service = Service(
        engine,
        settings,
        parts=Parts(web=False),
        clock=lambda: NOW + timedelta(seconds=1),
        render_subject=broken,
        retry_seconds=0.01,
    )
    with caplog.at_level(logging.INFO, logger="mailer.service"):
        await fire_and_settle(service, settings.digests[0])
    assert made_slots(engine) == [NOW]
    failed = errors(caplog)
    assert [r.attempt for r in failed] == [1, 2]  # type: ignore[attr-defined]
    for record in failed:
        assert record.digest == "weekly"  # type: ignore[attr-defined]
        assert record.slot == SLOT_SHOWN  # type: ignore[attr-defined]
        assert "'edition' is undefined" in record.getMessage()
    assert any(r.getMessage() == "issue made on retry" for r in caplog.records)
    assert broken.calls == 3


async def test_a_firing_still_failing_when_the_grace_has_passed_is_given_up_loudly(
    engine: sa.Engine, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(db_url, scheduler={"misfire_grace_seconds": 600})
    moment = [NOW + timedelta(seconds=1)]

    def later() -> None:  # each attempt takes the clock further, past the slot's grace
        moment[0] += timedelta(minutes=4)

    service = Service(
        engine,
        settings,
        clock=lambda: moment[0],
        render_subject=BrokenSubject(failures=99, on_call=later),
        retry_seconds=0.01,
    )
    with caplog.at_level(logging.INFO, logger="mailer.service"):
        await fire_and_settle(service, settings.digests[0])
    assert made_slots(engine) == []
    # Retried while the grace lasted (each attempt takes four minutes of the ten), then given up.
    *failed, last = errors(caplog)
    assert [r.attempt for r in failed] == [1, 2, 3]  # type: ignore[attr-defined]
    assert last.attempts == 3  # type: ignore[attr-defined]
    assert "given up, the slot's misfire grace has passed" in last.getMessage()
    assert (last.digest, last.slot) == ("weekly", SLOT_SHOWN)  # type: ignore[attr-defined]


async def test_a_retry_waiting_when_the_service_stops_says_the_slot_was_not_made(
    engine: sa.Engine, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(db_url)
    service = Service(
        engine,
        settings,
        clock=lambda: NOW + timedelta(seconds=1),
        render_subject=BrokenSubject(failures=99),
        retry_seconds=600,
    )
    await service.fire_scheduled(settings.digests[0])
    assert len(service.firings) == 1
    service.stop.set()
    await asyncio.gather(*list(service.firings))
    assert "the service stopped before it could be retried" in errors(caplog)[-1].getMessage()


def test_the_scheduler_job_is_the_retrying_firing() -> None:
    service = Service(sa.create_engine("sqlite://"), make_settings())
    job = service.scheduler().get_job("digest:weekly")
    assert job is not None and job.func == service.fire_scheduled
