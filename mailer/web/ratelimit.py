"""In-memory rate limits for the sign-up form: per client IP and per address.

A sliding window of hit times per key. Memory is bounded: keys whose hits have all aged out
are dropped as the limiter is used, and past ``max_keys`` the least recently used key goes
first. In memory is enough for one web process; several processes each keep their own
counts, which multiplies the limit but never disables it, and the confirmation-mail cap
(counted in the database) still holds across all of them.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """The abuse limits of the sign-up path; the defaults suit a local news site."""

    per_ip: int = 10  # sign-up attempts from one address per window
    per_ip_window: float = 600.0  # seconds
    per_address: int = 3  # sign-up attempts for one email address per window
    per_address_window: float = 3600.0
    confirmations_per_day: int = 3  # confirmation mails to one address in 24 hours
    max_body_bytes: int = 16_384  # every request body; the forms are a few hundred bytes
    # Staff console logins (counted in the database, mailer.console.logins): failures allowed
    # per address typed and per client address within the window.
    staff_login_per_account: int = 5
    staff_login_per_address: int = 20
    staff_login_window: float = 900.0  # seconds


class RateLimiter:
    """At most ``limit`` hits per key within ``window`` seconds."""

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1 or window <= 0:
            raise ValueError(f"a rate limit needs limit >= 1 and window > 0, got {limit}/{window}")
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        self._hits: OrderedDict[str, deque[float]] = OrderedDict()

    def hit(self, key: str) -> bool:
        """Count one hit for ``key``; False if it is over the limit (the hit is not counted)."""
        now = self._clock()
        self._expire(now)
        hits = self._hits.get(key)
        if hits is None:
            hits = self._hits[key] = deque()
        else:
            self._hits.move_to_end(key)
        while hits and hits[0] <= now - self.window:
            hits.popleft()
        if len(hits) >= self.limit:
            return False
        hits.append(now)
        while len(self._hits) > self.max_keys:
            self._hits.popitem(last=False)
        return True

    def retry_after(self, key: str) -> int:
        """Whole seconds until ``key`` may hit again (0 if it may now)."""
        hits = self._hits.get(key)
        if not hits or len(hits) < self.limit:
            return 0
        return max(1, int(hits[0] + self.window - self._clock()) + 1)

    def _expire(self, now: float) -> None:
        # Drop a few stale keys from the least recently used end on every call: amortized
        # cleanup without a timer task.
        for _ in range(8):
            if not self._hits:
                return
            key, hits = next(iter(self._hits.items()))
            if hits and hits[-1] > now - self.window:
                return
            del self._hits[key]

    def __len__(self) -> int:
        return len(self._hits)
