"""Sorting timestamps into periods in SQL, the same on SQLite and PostgreSQL.

Neither database's date arithmetic is the other's, so a period is found by comparing: a
nested CASE that halves the list of boundaries at each step (a binary search), five or so
comparisons a row for thirty boundaries. A query groups its rows by that number and counts;
the caller adds the counts up per period.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from itertools import pairwise

import sqlalchemy as sa

from mailer.db.schema import UtcDateTime


def _at(moment: datetime) -> sa.BindParameter[datetime]:
    # Bound with the column type: compared with an expression that has none of its own (a
    # CASE, a COALESCE), a bare datetime would be bound as text with its zone on SQLite.
    return sa.literal(moment, UtcDateTime())


def below(
    value: sa.ColumnElement[datetime], bounds: Sequence[datetime], *, or_at: bool = False
) -> sa.ColumnElement[int]:
    """How many of ``bounds`` (ascending) lie before ``value`` (or at it, with ``or_at``),
    from 0 to ``len(bounds)``; a NULL ``value`` counts as after them all."""
    if any(a > b for a, b in pairwise(bounds)):
        raise ValueError("bounds must be ascending")

    def search(lo: int, hi: int) -> sa.ColumnElement[int]:
        # The answer is in [lo, hi].
        if lo == hi:
            return sa.literal(lo, sa.Integer())
        mid = (lo + hi) // 2
        # With or_at, a value at bounds[mid] has it behind: only a value before it stops here.
        before = value < _at(bounds[mid]) if or_at else value <= _at(bounds[mid])
        return sa.case((before, search(lo, mid)), else_=search(mid + 1, hi))

    return search(0, len(bounds))
