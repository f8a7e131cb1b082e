"""How the console shows an issue's numbers and times: outcome bars, countdowns, rates, time left,
and why a digest has no slot to count down to.

A bar is drawn as an inline SVG whose segments are ``<rect>`` with ``x`` and ``width``
attributes (the console's CSP allows no style attribute), in a 0–100 view box; the script
that updates a send in progress sets the same attributes from ``/staff/progress.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mailer.config.settings import Digest
from mailer.issues.progress import SendProgress

# The segments of a bar, in order, and the statuses each counts.
SEGMENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("sent", ("sent",)),
    ("deferred", ("deferred",)),
    ("bounced", ("bounced",)),
    ("failed", ("failed",)),
    ("cancelled", ("cancelled",)),
    ("waiting", ("queued", "sending", "unknown")),
)


@dataclass(frozen=True)
class Segment:
    """One part of a bar: its name, how many, and where it lies in the 0–100 view box."""

    name: str
    count: int
    x: float
    width: float


def segments(counts: dict[str, int]) -> list[Segment]:
    """The bar of ``counts`` (deliveries by status): every segment, empty ones 0 wide."""
    grouped = [(name, sum(counts.get(s, 0) for s in statuses)) for name, statuses in SEGMENTS]
    total = sum(n for _, n in grouped)
    found, x = [], 0.0
    for name, n in grouped:
        width = round(100 * n / total, 3) if total else 0.0
        found.append(Segment(name, n, round(x, 3), width))
        x += width
    return found


def countdown(until: datetime, now: datetime) -> str:
    """``in 2 h 14 min``, ``in 3 d 4 h``, ``in under a minute``; ``2 h 5 min ago`` once past."""
    seconds = (until - now).total_seconds()
    past = seconds < 0
    text = duration(abs(seconds))
    if text == "":
        return "now" if past else "in under a minute"
    return f"{text} ago" if past else f"in {text}"


def duration(seconds: float) -> str:
    """Whole minutes as ``2 h 14 min`` (``3 d 4 h`` past a day); "" under a minute."""
    minutes = int(seconds // 60)
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{minutes} min" if minutes else ""


def time_left(seconds: float | None) -> str:
    """The time a send still needs, as staff read it."""
    if seconds is None:
        return "not known yet"
    if seconds < 60:
        return "under a minute"
    return "about " + duration(seconds)


def rate_text(rate: float) -> str:
    return f"{rate:,.1f}/s" if rate < 100 else f"{rate:,.0f}/s"


def progress_json(found: list[SendProgress], now: datetime, as_of: str) -> dict[str, Any]:
    """What ``/staff/progress.json`` answers: each issue sending now, its counts, rate,
    time left and bar; ``as_of`` is ``now`` as the page shows times (the site's zone)."""
    return {
        "as_of": now.isoformat(),
        "as_of_text": as_of,
        "sending": [
            {
                "id": p.summary.id,
                "digest": p.summary.digest,
                "subject": p.summary.subject,
                "total": p.summary.total,
                "counts": {s.name: s.count for s in segments(p.summary.counts)},
                "left": p.left,
                "rate": round(p.rate, 3),
                "rate_text": rate_text(p.rate),
                "seconds_left": None if p.seconds_left is None else round(p.seconds_left),
                "left_text": time_left(p.seconds_left),
                "segments": [
                    {"name": s.name, "x": s.x, "width": s.width} for s in segments(p.summary.counts)
                ],
            }
            for p in found
        ],
    }


def no_slot(digest: Digest | None) -> str:
    """Why a digest has no coming slot: made on arrival, or a schedule that has ended."""
    if digest is not None and digest.on_arrival:
        if digest.debounce_seconds <= 0:
            return "Sent when its articles arrive (as soon as the first one is stored)."
        return f"Sent when its articles arrive (within {digest.debounce_seconds} s of the first)."
    return "No coming slot: its schedule has ended."
