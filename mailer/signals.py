"""Stop signals for an asyncio delivery loop: SIGTERM and SIGINT set an event."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set ``stop``: lanes finish their message, the rest is released.

    Afterwards the handlers found before are put back (asyncio would leave the defaults, and
    a second SIGTERM during the last clean-up would kill the process).
    """
    loop = asyncio.get_running_loop()
    installed: list[tuple[signal.Signals, Any]] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append((sig, previous))
        except (NotImplementedError, RuntimeError):  # not the main thread: the caller stops us
            pass
    try:
        yield
    finally:
        for sig, previous in installed:
            loop.remove_signal_handler(sig)
            if previous is not None:
                signal.signal(sig, previous)


async def stopped_within(stop: asyncio.Event | None, seconds: float) -> bool:
    """Sleep ``seconds``, or less: True at once if ``stop`` is (or becomes) set."""
    if stop is None:
        await asyncio.sleep(seconds)
        return False
    if stop.is_set():
        return True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=max(seconds, 0))
    return stop.is_set()
