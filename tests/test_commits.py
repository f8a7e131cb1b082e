"""The committer's collections: how many handoffs one group commit writes, and when."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from mailer.delivery.commits import Committer, Handoff, WriteCall

LONG = 60.0  # a linger no test may wait out: asyncio.wait_for below fails first


class Writes:
    """A ``WriteCall`` that records each collection and starts every start it is given."""

    def __init__(self) -> None:
        self.collections: list[list[int | None]] = []

    async def __call__(self, batch: list[Handoff]) -> tuple[dict[str, int], set[int]]:
        self.collections.append([h.start for h in batch])
        return {"sent": sum(h.result is not None for h in batch)}, {
            h.start for h in batch if h.start is not None
        }


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop take turns until ``condition()`` holds (the committer needs no time, only
    turns: nothing here waits on a clock)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


@contextlib.asynccontextmanager
async def running(
    write: WriteCall, *, lanes: int, fill: float = 1.0, linger: float = LONG
) -> AsyncIterator[Committer]:
    """A committer of ``lanes`` lanes writing with ``write``, running; closed and drained on
    the way out."""
    committer = Committer(write, lambda counts: None, lanes=lanes, fill=fill, linger=linger)
    runner = asyncio.create_task(committer.run())
    yield committer
    committer.close()
    await asyncio.wait_for(runner, 5)


async def turns(count: int = 10) -> None:
    """Let the loop take ``count`` turns: what could be written by now has been."""
    for _ in range(count):
        await asyncio.sleep(0)


async def test_a_collection_waits_for_every_running_lane() -> None:
    writes = Writes()
    async with running(writes, lanes=3) as committer:
        first = asyncio.create_task(committer.handoff(None, 1))
        second = asyncio.create_task(committer.handoff(None, 2))
        await until(lambda: len(committer.pending) == 2)
        await turns()
        assert writes.collections == []  # two of three lanes: nothing written yet
        assert await asyncio.wait_for(committer.handoff(None, 3), 5) is True
        assert await first is True and await second is True
    assert writes.collections == [[1, 2, 3]]


async def test_a_collection_short_of_its_fill_is_written_after_the_linger() -> None:
    writes = Writes()
    async with running(writes, lanes=4, linger=0.01) as committer:
        loop = asyncio.get_running_loop()
        began = loop.time()
        assert await asyncio.wait_for(committer.handoff(None, 7), 5) is True
        assert loop.time() - began >= 0.01
    assert writes.collections == [[7]]


async def test_a_lane_that_ends_is_waited_for_once_and_then_no_more() -> None:
    writes = Writes()
    async with running(writes, lanes=3) as committer:
        first = asyncio.create_task(committer.handoff(None, 1))
        ending = asyncio.create_task(committer.handoff(None, None, last=True))
        await until(lambda: len(committer.pending) == 2)
        await turns()
        assert writes.collections == []  # the third lane has not handed off yet
        assert await asyncio.wait_for(committer.handoff(None, 3), 5) is True
        assert await first is True and await ending is False
        # Two lanes run on: a collection of their two handoffs is written without the third.
        both = asyncio.gather(committer.handoff(None, 4), committer.handoff(None, 5))
        assert list(await asyncio.wait_for(both, 5)) == [True, True]
    assert writes.collections == [[1, None, 3], [4, 5]]


async def test_handoffs_that_arrive_during_a_write_go_in_the_next_collection() -> None:
    gate = asyncio.Event()
    writes = Writes()
    writing: list[int | None] = []

    async def slow(batch: list[Handoff]) -> tuple[dict[str, int], set[int]]:
        writing.extend(h.start for h in batch)
        await gate.wait()
        return await writes(batch)

    async with running(slow, lanes=2, fill=0.5) as committer:
        first = asyncio.create_task(committer.handoff(None, 1))  # one of two lanes: its fill
        await until(lambda: writing == [1])  # taken, its write waiting at the gate
        later = [asyncio.create_task(committer.handoff(None, i)) for i in (2, 3)]
        await until(lambda: len(committer.pending) == 2)
        gate.set()
        assert await first is True and all(await asyncio.gather(*later))
    assert writes.collections == [[1], [2, 3]]


async def test_a_failed_write_fails_every_handoff_of_its_collection() -> None:
    async def failing(batch: list[Handoff]) -> tuple[dict[str, int], set[int]]:
        raise ConnectionError("database went away")

    committer = Committer(failing, lambda counts: None, lanes=2, fill=1.0, linger=LONG)
    runner = asyncio.create_task(committer.run())
    handoffs = [asyncio.create_task(committer.handoff(None, i)) for i in (1, 2)]
    for handoff in handoffs:
        with pytest.raises(ConnectionError, match="database went away"):
            await asyncio.wait_for(handoff, 5)
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(runner, 5)


async def test_closing_writes_what_is_pending_at_once() -> None:
    writes = Writes()
    async with running(writes, lanes=3) as committer:
        waiting = asyncio.create_task(committer.handoff(None, 9))
        await until(lambda: len(committer.pending) == 1)
    # Closed on the way out, with one of three lanes handed off and the linger far away.
    assert await asyncio.wait_for(waiting, 5) is True
    assert writes.collections == [[9]]
