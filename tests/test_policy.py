"""The delivery policy on its own: reply classification, throttles, retry delays, verdicts."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailer.config.load import parse_settings
from mailer.config.settings import SmtpSettings
from mailer.delivery.policy import (
    LAST_REPLY_LIMIT,
    REPLY_LIMIT,
    RETRY_MAX_SECONDS,
    Outcome,
    SendResult,
    Stage,
    Verdict,
    classify,
    is_throttle,
    retry_delay,
    settle,
)
from tests.factories import NOW, config_dict


def smtp(**overrides: object) -> SmtpSettings:
    return replace(parse_settings(config_dict(), env={}).smtp, **overrides)  # type: ignore[arg-type]


CLASSIFY_CASES = [
    pytest.param(550, Stage.RCPT, Outcome.BOUNCED, 550, id="rcpt-5xx-bounces"),
    pytest.param(554, Stage.DATA, Outcome.BOUNCED, 554, id="data-5xx-bounces"),
    pytest.param(451, Stage.RCPT, Outcome.DEFERRED, 451, id="rcpt-4xx-defers"),
    pytest.param(452, Stage.DATA, Outcome.DEFERRED, 452, id="data-4xx-defers"),
    pytest.param(553, Stage.MAIL, Outcome.DEFERRED, 553, id="mail-5xx-defers"),
    pytest.param(554, Stage.CONNECT, Outcome.DEFERRED, 554, id="greeting-5xx-defers"),
    pytest.param(-1, Stage.DATA, Outcome.DEFERRED, None, id="unreadable-reply-has-no-code"),
]


@pytest.mark.parametrize(("code", "stage", "outcome", "known"), CLASSIFY_CASES)
def test_only_a_5xx_to_rcpt_or_data_bounces(
    code: int, stage: Stage, outcome: Outcome, known: int | None
) -> None:
    assert classify(code, "5.1.1 words", stage) == SendResult(outcome, known, "5.1.1 words", stage)


@given(st.integers(-1000, 1000), st.text(), st.sampled_from(Stage))
def test_a_classified_reply_is_one_bounded_line_and_bounces_only_for_the_recipient(
    code: int, message: str, stage: Stage
) -> None:
    result = classify(code, message, stage)
    assert len(result.reply) <= REPLY_LIMIT
    assert "\n" not in result.reply and "\r" not in result.reply
    assert result.code is None or 100 <= result.code <= 599
    if result.outcome is Outcome.BOUNCED:
        assert stage in (Stage.RCPT, Stage.DATA) and code >= 500


THROTTLE_CASES = [
    pytest.param(SendResult(Outcome.DEFERRED, 421, "4.7.0 closing"), True, id="421"),
    pytest.param(
        SendResult(Outcome.DEFERRED, 451, "4.7.0 Rate limited, try again later"),
        True,
        id="451-rate",
    ),
    pytest.param(SendResult(Outcome.DEFERRED, 452, "4.2.2 Mailbox full"), False, id="mailbox"),
    pytest.param(SendResult(Outcome.DEFERRED, None, "connect: timed out"), False, id="no-code"),
    pytest.param(SendResult(Outcome.BOUNCED, 550, "too many recipients"), False, id="bounce"),
]


@pytest.mark.parametrize(("result", "throttle"), THROTTLE_CASES)
def test_a_throttle_is_the_relay_pushing_back(result: SendResult, throttle: bool) -> None:
    assert is_throttle(result) is throttle


@given(st.integers(1, 60), st.integers(0, 2**32))
def test_retry_delays_double_within_their_jitter_and_stop_growing(attempts: int, seed: int) -> None:
    settings = smtp(retry_base_seconds=60.0)
    delay = retry_delay(settings, attempts, random.Random(seed)).total_seconds()
    base = min(60.0 * 2 ** (attempts - 1), RETRY_MAX_SECONDS)
    assert 0.75 * base <= delay <= 1.25 * base


def verdict(result: SendResult | None, *, error: str | None = None, age: float = 0.0) -> Verdict:
    return settle(
        result,
        error=error,
        attempts=1,
        created_at=NOW - timedelta(hours=age),
        now=NOW,
        settings=smtp(retry_base_seconds=60.0, retry_max_age_hours=48.0),
        rng=random.Random(1),
    )


def test_each_outcome_becomes_its_status() -> None:
    sent = verdict(SendResult(Outcome.SENT, 250, "2.0.0 queued"))
    assert sent == ("sent", "250 2.0.0 queued", NOW)
    bounced = verdict(SendResult(Outcome.BOUNCED, 550, "5.1.1 unknown", Stage.RCPT))
    assert bounced == ("bounced", "550 5.1.1 unknown", NOW)
    assert verdict(None) == ("cancelled", "nothing new in the subscriber's topics", NOW)
    assert verdict(None, error="x" * 900) == ("failed", "x" * LAST_REPLY_LIMIT, NOW)


def test_a_deferral_waits_until_the_give_up_age_then_fails() -> None:
    lost = SendResult(Outcome.DEFERRED, None, "connect: connection lost", Stage.CONNECT)
    status, reply, due = verdict(lost, age=1.0)
    assert (status, reply) == ("deferred", "connect: connection lost")
    assert timedelta(seconds=45) <= due - NOW <= timedelta(seconds=75)
    assert verdict(lost, age=48.0) == ("failed", "connect: connection lost", NOW)
