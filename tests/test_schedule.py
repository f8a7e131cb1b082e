"""Slot logic with a fixed clock: day names, time zones, DST change days, missed slots."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from mailer.issues.schedule import latest_slot, missed_slots, slots_between, upcoming
from tests.factories import make_settings

DIGEST = make_settings().digests[0]  # "0 7 * * fri", America/New_York


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_day_names_mean_what_they_say() -> None:
    # 2026-11-27 is a Friday; 07:00 in New York (EST) is 12:00 UTC.
    assert upcoming([DIGEST], utc(2026, 11, 25)) == [(DIGEST, utc(2026, 11, 27, 12))]


def test_slots_follow_local_time_across_the_dst_change() -> None:
    daily = replace(DIGEST, schedule="0 7 * * mon-sun")
    # DST ends in New York on 2026-11-01 at 02:00: 07:00 local moves from 11:00 to 12:00 UTC.
    slots = slots_between(daily, utc(2026, 10, 31), utc(2026, 11, 2, 23))
    assert slots == [utc(2026, 10, 31, 11), utc(2026, 11, 1, 12), utc(2026, 11, 2, 12)]


def test_a_slot_in_the_skipped_hour_of_spring_forward_still_fires_once() -> None:
    nightly = replace(DIGEST, schedule="30 2 * * sun")
    # 2026-03-08 02:30 does not exist in New York; the trigger fires once that day anyway.
    slots = slots_between(nightly, utc(2026, 3, 7), utc(2026, 3, 9))
    assert len(slots) <= 1


def test_slots_between_excludes_start_and_includes_end() -> None:
    slot = utc(2026, 11, 27, 12)
    assert slots_between(DIGEST, slot, slot + timedelta(days=1)) == []
    assert slots_between(DIGEST, slot - timedelta(seconds=1), slot) == [slot]


def test_latest_slot_looks_back_only_within_the_window() -> None:
    now = utc(2026, 11, 28, 9)
    assert latest_slot(DIGEST, now, within=timedelta(days=2)) == utc(2026, 11, 27, 12)
    assert latest_slot(DIGEST, now, within=timedelta(hours=12)) is None


@pytest.mark.parametrize(
    ("catch_up", "expected"),
    [
        ("latest", [utc(2026, 11, 27, 12)]),
        ("all", [utc(2026, 11, 13, 12), utc(2026, 11, 20, 12), utc(2026, 11, 27, 12)]),
        ("none", []),
    ],
    ids=["latest", "all", "none"],
)
def test_missed_slots_after_downtime(catch_up: str, expected: list[datetime]) -> None:
    got = missed_slots(
        DIGEST,
        last_issue=utc(2026, 11, 6, 12),
        now=utc(2026, 11, 28),
        window=timedelta(days=30),
        catch_up=catch_up,
    )
    assert got == expected


def test_no_missed_slot_when_the_last_issue_is_current() -> None:
    got = missed_slots(
        DIGEST, last_issue=utc(2026, 11, 27, 12), now=utc(2026, 11, 28), window=timedelta(days=30)
    )
    assert got == []


def test_slots_across_the_fall_back_hour_are_each_listed_once() -> None:
    paris = replace(DIGEST, schedule="*/5 * * * mon-sun", timezone="Europe/Paris")
    # Paris falls back at 2026-10-25 01:00 UTC: 02:00-03:00 local happens twice.
    slots = slots_between(paris, utc(2026, 10, 24, 23, 30), utc(2026, 10, 25, 1, 30))
    assert len(slots) == len(set(slots)) == 24
    assert latest_slot(paris, utc(2026, 10, 25, 1, 27), within=timedelta(hours=1)) == utc(
        2026, 10, 25, 1, 25
    )
