"""Pacing: the configured rate across tasks and processes, and the pause on a throttling relay."""

from __future__ import annotations

import asyncio
import multiprocessing
import time

from mailer.delivery.pacing import Backpressure, Pacer
from mailer.delivery.policy import Outcome, SendResult


async def test_a_pacer_spaces_callers_evenly() -> None:
    pacer = Pacer(200)
    loop = asyncio.get_running_loop()
    stamps: list[float] = []

    async def one() -> None:
        await pacer.acquire()
        stamps.append(loop.time())

    await asyncio.gather(*(one() for _ in range(21)))
    # 20 intervals of 5 ms: never sooner; later only by the event loop's own delays.
    assert 0.099 <= stamps[-1] - stamps[0] <= 0.2


async def test_zero_rate_is_unlimited() -> None:
    pacer = Pacer(0)
    started = time.monotonic()
    for _ in range(1000):
        await pacer.acquire()
    assert time.monotonic() - started < 0.5


async def test_pacers_on_a_shared_schedule_pace_together() -> None:
    schedule = multiprocessing.get_context("spawn").Value("d", 0.0)
    pacers = [Pacer(100, schedule), Pacer(100, schedule)]  # as if in two processes

    async def take(pacer: Pacer) -> None:
        for _ in range(20):
            await pacer.acquire()

    started = time.monotonic()
    await asyncio.gather(*(take(pacer) for pacer in pacers))
    # 40 slots at 100 per second between them: 0.39 s, not the 0.19 s of two own schedules.
    assert time.monotonic() - started >= 0.37


def test_backpressure_doubles_on_throttle_and_resets_on_success() -> None:
    pressure = Backpressure(clock=lambda: 0.0)
    throttle = SendResult(Outcome.DEFERRED, 421, "4.7.0 Too many connections, slow down")
    mailbox_full = SendResult(Outcome.DEFERRED, 452, "4.2.2 Mailbox full")
    pressure.observe(mailbox_full)
    assert pressure.until == 0.0  # one mailbox's trouble does not slow everyone
    pressure.observe(throttle)
    pressure.observe(throttle)
    assert (pressure.delay, pressure.until) == (2.0, 2.0)
    pressure.observe(SendResult(Outcome.SENT, 250, "ok"))
    assert pressure.delay == 0.0
