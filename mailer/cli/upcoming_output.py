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
from mailer.cli.listing import print_table
from mailer.issues.schedule import local_time
from mailer.issues.upcoming import MadeIssue, Slot, Upcoming, UpcomingArticle

# The slot column of an arrival digest (CSV, JSON "trigger").
ARRIVAL = "on arrival"
LATER = "later slots show no articles yet: each takes what arrives before it"


def _iso(moment: datetime, zone: str) -> str:
    return moment.astimezone(ZoneInfo(zone)).isoformat()


def print_tables(found: list[Upcoming], zone: str) -> None:
    """Per digest: its slots, the issues made for review, what the next issue would take and
    its recipients by topic set."""
    for u in found:
        out.print(f"{u.key}: {u.name}", markup=False)
        if u.on_arrival:
            _print_arrival(u, zone)
            continue
        reviewed = any(slot.review_opens for slot in u.slots)
        slots = Table("slot", "goes out", *(("review opens", "issue") if reviewed else ()))
        for slot in u.slots:
            held = f"{local_time(slot.goes_out, zone)} (quiet hours)" if slot.held else "at slot"
            extra: tuple[str, ...] = ()
            if reviewed:
                opens = local_time(slot.review_opens, zone) if slot.review_opens else "-"
                made = f"{slot.issue.id} {slot.issue.status}" if slot.issue else "-"
                extra = (opens, made)
            slots.add_row(local_time(slot.at, zone), held, *extra)
        print_table(slots)
        for slot in u.slots:
            if slot.issue is not None:
                _print_made(slot.issue, zone)
        for waiting in u.waiting:
            out.print(
                f"issue {waiting.id} for {local_time(waiting.slot, zone)} is held past its slot:"
                f" it waits for `mailer issues approve {waiting.id}`",
                markup=False,
            )
        takes = u.takes_at
        if takes is None:
            continue
        first = local_time(takes.at, zone)
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
            print_table(taken)
        else:
            out.print(f"next: {first}: no articles yet (an issue made now would be empty)")
        if u.left_over:
            out.print(f"{u.left_over} more wait for the issue after it (max_articles)")
        if takes.review_opens is not None:
            out.print(review_note(takes, zone), markup=False)
        if u.recipients:
            people = Table("topics", "recipients", title=f"{u.total_recipients} recipients")
            for topics, n in u.recipients:
                people.add_row(", ".join(topics), str(n))
            print_table(people)
        if len(u.slots) > 1:
            out.print(LATER)


def arrival_line(u: Upcoming) -> str:
    """How an arrival digest is made, in place of its slots."""
    return (
        f"on arrival: an issue {u.debounce_seconds} s after the first new article of its"
        ' topics arrives (trigger = "arrival")'
    )


def _print_arrival(u: Upcoming, zone: str) -> None:
    """An arrival digest: how it is made, and what its next issue would take now."""
    out.print(arrival_line(u), markup=False)
    if not u.articles:
        out.print("next: on arrival: nothing waiting")
        return
    taken = Table("id", "title", "topic", "published", "arrived", title="next: on arrival")
    for a in u.articles:
        taken.add_row(
            str(a.id), a.title, a.topic, local_time(a.published, zone), local_time(a.arrived, zone)
        )
    print_table(taken)
    if u.left_over:
        out.print(f"{u.left_over} more wait for the issue after it (max_articles)")
    if u.recipients:
        people = Table("topics", "recipients", title=f"{u.total_recipients} recipients")
        for topics, n in u.recipients:
            people.add_row(", ".join(topics), str(n))
        print_table(people)


def review_note(slot: Slot, zone: str) -> str:
    """What review does to a slot whose issue is not made yet."""
    assert slot.review_opens is not None
    return (
        f"review: its issue is made {local_time(slot.review_opens, zone)} and mailed to staff;"
        " articles arriving after that go in the next issue"
    )


def _print_made(issue: MadeIssue, zone: str) -> None:
    """An issue made for its slot already: its state, fixed articles and readers now."""
    acted = ""
    if issue.acted and issue.acted_at is not None:
        acted = f", {issue.acted} {local_time(issue.acted_at, zone)}"
    title = f"issue {issue.id} for {local_time(issue.slot, zone)}: {issue.status}{acted}"
    if not issue.articles:
        out.print(f"{title}: no articles", markup=False)
        return
    held = Table("id", "title", "topic", "published", "arrived", title=title)
    for a in issue.articles:
        held.add_row(
            str(a.id), a.title, a.topic, local_time(a.published, zone), local_time(a.arrived, zone)
        )
    print_table(held)
    if issue.recipients:
        people = Table(
            "topics", "recipients", title=f"would go to {issue.total_recipients} recipients now"
        )
        for topics, n in issue.recipients:
            people.add_row(", ".join(topics), str(n))
        print_table(people)


def _article(a: UpcomingArticle, zone: str) -> dict[str, Any]:
    return {
        "id": a.id,
        "title": a.title,
        "topic": a.topic,
        "published": _iso(a.published, zone),
        "arrived": _iso(a.arrived, zone),
    }


def _when(moment: datetime | None, zone: str) -> str:
    return _iso(moment, zone) if moment is not None else ""


def _rows(found: list[Upcoming], zone: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for u in found:
        base = {"digest": u.key, "name": u.name}
        if u.on_arrival:
            on: dict[str, Any] = base | {"slot": ARRIVAL}
            rows.append(on | {"row": "slot"})
            rows += [on | {"row": "article"} | _article(a, zone) for a in u.articles]
            rows += [
                on | {"row": "recipients", "topics": ";".join(t), "recipients": n}
                for t, n in u.recipients
            ]
            continue
        takes = u.takes_at
        for slot in u.slots:
            at: dict[str, Any] = {
                "slot": _iso(slot.at, zone),
                "goes_out": _iso(slot.goes_out, zone),
                "review_opens": _when(slot.review_opens, zone),
            }
            made = slot.issue
            if made is not None:
                at |= {"issue": made.id, "status": made.status, "acted": made.acted}
            rows.append(base | at | {"row": "slot"})
            if made is not None:
                picked, counts = made.articles, made.recipients
            elif slot is takes:
                picked, counts = u.articles, u.recipients
            else:
                continue
            rows += [base | at | {"row": "article"} | _article(a, zone) for a in picked]
            for topics, n in counts:
                rows.append(
                    base | at | {"row": "recipients", "topics": ";".join(topics), "recipients": n}
                )
    return rows


def print_csv(found: list[Upcoming], zone: str) -> None:
    """One row per slot; the articles and recipient counts of the next issue (made, or as it
    would be made now) as rows beside their slot."""
    fields = ["digest", "name", "row", "slot", "goes_out", "review_opens", "issue", "status",
              "acted", "id", "title", "topic", "published", "arrived", "topics",
              "recipients"]  # fmt: skip
    writer = csv.DictWriter(sys.stdout, fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(_rows(found, zone))


def _made_json(made: MadeIssue, zone: str) -> dict[str, Any]:
    return {
        "id": made.id,
        "status": made.status,
        "acted": made.acted,
        "acted_at": _when(made.acted_at, zone) or None,
        "articles": [_article(a, zone) for a in made.articles],
        "recipients": [{"topics": list(t), "count": n} for t, n in made.recipients],
    }


def print_json(found: list[Upcoming], zone: str) -> None:
    """A list with one object per digest; ``articles`` and ``recipients`` are what the first
    slot without an issue (``takes_at``) would take now; a slot made for review already
    carries its ``issue``."""
    data = [
        {
            "digest": u.key,
            "name": u.name,
            "trigger": ARRIVAL if u.on_arrival else "schedule",
            "debounce_seconds": u.debounce_seconds if u.on_arrival else None,
            "slots": [
                {
                    "slot": _iso(s.at, zone),
                    "goes_out": _iso(s.goes_out, zone),
                    "quiet": s.held,
                    "review_opens": _when(s.review_opens, zone) or None,
                    "issue": _made_json(s.issue, zone) if s.issue else None,
                }
                for s in u.slots
            ],
            "takes_at": _when(u.takes_at.at if u.takes_at else None, zone) or None,
            "articles": [_article(a, zone) for a in u.articles],
            "left_over": u.left_over,
            "recipients": [{"topics": list(t), "count": n} for t, n in u.recipients],
            "waiting": [_made_json(w, zone) | {"slot": _iso(w.slot, zone)} for w in u.waiting],
            "note": LATER,
        }
        for u in found
    ]
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
