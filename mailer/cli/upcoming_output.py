"""How ``mailer digest upcoming`` prints: rich tables for staff, CSV and JSON for scripts.

Times are in the site's time zone: readable in tables, ISO 8601 with the offset in CSV/JSON.
"""

from __future__ import annotations

import csv
import json
import sys
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from rich.table import Table

from mailer.cli.context import out
from mailer.issues.schedule import local_time
from mailer.issues.upcoming import Upcoming

LATER = "later slots show no articles yet: each takes what arrives before it"


def _iso(moment: datetime, zone: str) -> str:
    return moment.astimezone(ZoneInfo(zone)).isoformat()


def print_tables(found: list[Upcoming], zone: str) -> None:
    """Per digest: its slots, the next slot's articles and its recipients by topic set."""
    for u in found:
        out.print(f"{u.key}: {u.name}", markup=False)
        slots = Table("slot", "goes out")
        for slot in u.slots:
            held = f"{local_time(slot.goes_out, zone)} (quiet hours)" if slot.held else "at slot"
            slots.add_row(local_time(slot.at, zone), held)
        out.print(slots)
        if not u.slots:
            continue
        first = local_time(u.slots[0].at, zone)
        if u.articles:
            taken = Table("id", "title", "topic", "published", "arrived", title=f"next: {first}")
            for a in u.articles:
                taken.add_row(
                    str(a.id),
                    a.title,
                    a.topic,
                    local_time(a.published, zone),
                    local_time(a.arrived, zone),
                )
            out.print(taken)
        else:
            out.print(f"next: {first}: no articles yet (an issue made now would be empty)")
        if u.left_over:
            out.print(f"{u.left_over} more wait for the issue after it (max_articles)")
        if u.recipients:
            people = Table("topics", "recipients", title=f"{u.total_recipients} recipients")
            for topics, n in u.recipients:
                people.add_row(", ".join(topics), str(n))
            out.print(people)
        if len(u.slots) > 1:
            out.print(LATER)


def _rows(found: list[Upcoming], zone: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for u in found:
        base = {"digest": u.key, "name": u.name}
        for i, slot in enumerate(u.slots):
            at = {"slot": _iso(slot.at, zone), "goes_out": _iso(slot.goes_out, zone)}
            rows.append(base | at | {"row": "slot"})
            if i:
                continue
            for a in u.articles:
                rows.append(
                    base
                    | at
                    | {
                        "row": "article",
                        "id": a.id,
                        "title": a.title,
                        "topic": a.topic,
                        "published": _iso(a.published, zone),
                        "arrived": _iso(a.arrived, zone),
                    }
                )
            for topics, n in u.recipients:
                rows.append(
                    base | at | {"row": "recipients", "topics": ";".join(topics), "recipients": n}
                )
    return rows


def print_csv(found: list[Upcoming], zone: str) -> None:
    """One row per slot; the next slot's articles and recipient counts as rows beside it."""
    fields = ["digest", "name", "row", "slot", "goes_out", "id", "title", "topic",
              "published", "arrived", "topics", "recipients"]  # fmt: skip
    writer = csv.DictWriter(sys.stdout, fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(_rows(found, zone))


def print_json(found: list[Upcoming], zone: str) -> None:
    """A list with one object per digest; articles and recipients are the next slot's."""
    data = [
        {
            "digest": u.key,
            "name": u.name,
            "slots": [
                {"slot": _iso(s.at, zone), "goes_out": _iso(s.goes_out, zone), "quiet": s.held}
                for s in u.slots
            ],
            "articles": [
                {
                    "id": a.id,
                    "title": a.title,
                    "topic": a.topic,
                    "published": _iso(a.published, zone),
                    "arrived": _iso(a.arrived, zone),
                }
                for a in u.articles
            ],
            "left_over": u.left_over,
            "recipients": [{"topics": list(t), "count": n} for t, n in u.recipients],
            "note": LATER,
        }
        for u in found
    ]
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
