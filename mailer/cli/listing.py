"""How listings print: rich tables for staff, CSV and JSON for scripts (as ``digest upcoming``).

A rich table fits itself to the console, and a console that is not a terminal is 80 columns
wide: piped into ``grep`` or a file, an address would come out cut or folded over two lines.
So off a terminal a table is printed as wide as its widest values need.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from mailer.cli.context import out

FORMATS = ("table", "csv", "json")
# Wide enough for any value a listing holds; only the measured width is used.
_UNBOUNDED = 1_000_000

F = TypeVar("F", bound=Callable[..., Any])


def format_option(command: F) -> F:
    """``--format table|csv|json``, table by default; the command gets it as ``fmt``."""
    option = click.option(
        "--format",
        "fmt",
        type=click.Choice(FORMATS),
        default="table",
        show_default=True,
        help="table for reading; csv or json for scripts.",
    )
    return option(command)


def print_table(table: Table) -> None:
    """On a terminal, fitted to its width; elsewhere every value whole, one row per line."""
    if out.is_terminal:
        out.print(table)
        return
    options = out.options.update(width=_UNBOUNDED)
    width = Measurement.get(out, options, table).maximum
    whole = Console(file=out.file, width=max(width, 1), highlight=False, soft_wrap=True)
    whole.print(table)


def print_csv(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """A header of ``columns``, then one line per row."""
    writer = csv.DictWriter(sys.stdout, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)


def print_json(rows: Sequence[Mapping[str, Any]]) -> None:
    """An array with one object per row."""
    sys.stdout.write(json.dumps(list(rows), indent=2, ensure_ascii=False) + "\n")
