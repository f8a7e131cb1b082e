"""One TOML table read with types: every value checked as it is asked for, and every key
nobody asked for an error (a misspelt key silently ignored is a setting that silently does not
apply)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from mailer.errors import ConfigError

KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
MULTILINE_KEYS = frozenset({"postal_address", "description"})
# The default of a key that must be given.
REQUIRED = object()


class Table:
    """Typed, tracked access to one TOML table; ``finish`` rejects keys nobody asked for."""

    def __init__(self, data: Any, name: str, path: str | None, *, label: str = "") -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"must be a table, got {_kind(data)}", path=path, key=name)
        self.data: dict[str, Any] = data
        self.name = name
        self.path = path
        # Which entry of an array of tables this is, by what it names ("digest 'weekly'"):
        # a position alone ("digests[3]") makes staff count tables in the file.
        self.label = label
        self.used: set[str] = set()

    def error(self, key: str, message: str) -> ConfigError:
        """A ConfigError naming the file and ``table.key`` (``key`` alone at the top level),
        and the entry's label when it has one."""
        if self.label:
            message = f"({self.label}) {message}"
        return ConfigError(message, path=self.path, key=f"{self.name}.{key}" if self.name else key)

    def _get(self, key: str, default: Any) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is REQUIRED:
                raise self.error(key, "is required")
            return default
        return self.data[key]

    def value(self, key: str, default: Any) -> Any:
        """The value as TOML gave it, unchecked: for a key the caller checks itself."""
        return self._get(key, default)

    def text(self, key: str, default: Any = None, *, pattern: re.Pattern[str] | None = None) -> Any:
        """A one-line string (``MULTILINE_KEYS`` excepted), matching ``pattern`` if given."""
        value = self._get(key, default)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {_kind(value)}")
        if "\r" in value or ("\n" in value and key not in MULTILINE_KEYS):
            raise self.error(key, "must be one line (no CR or LF)")
        if pattern is not None and not pattern.match(value):
            raise self.error(key, f"must match {pattern.pattern}, got {value!r}")
        return value

    def integer(self, key: str, default: Any, *, low: int, high: int) -> int:
        """A whole number in ``low``–``high``."""
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be a whole number {low}–{high}, got {value!r}")
        if not low <= value <= high:
            raise self.error(key, f"must be {low}–{high}, got {value}")
        return value

    def number(self, key: str, default: Any, *, low: float, high: float) -> float:
        """A number in ``low``–``high``."""
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"must be a number {low}–{high}, got {value!r}")
        if not low <= value <= high:
            raise self.error(key, f"must be {low}–{high}, got {value}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        """A boolean."""
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def choice(self, key: str, default: Any, choices: tuple[str, ...]) -> Any:
        """One of ``choices``."""
        value = self.text(key, default)
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def text_list(self, key: str, default: Any) -> list[str]:
        """A list of strings."""
        value = self._get(key, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, f"must be a list of strings, got {value!r}")
        return list(value)

    def string_map(self, key: str) -> dict[str, str]:
        """A table of strings to strings (feed categories to topics)."""
        value = self._get(key, {})
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise self.error(key, f'must be a table of "category" = "topic", got {_kind(value)}')
        return dict(value)

    def tables(self, key: str) -> Iterator[Table]:
        """Each table of an array of tables (``[[key]]``)."""
        value = self._get(key, [])
        if not isinstance(value, list):
            raise self.error(key, f"must be an array of tables ([[{key}]]), got {_kind(value)}")
        for index, item in enumerate(value):
            yield Table(item, f"{key}[{index}]", self.path, label=_label(key, item))

    def table(self, key: str, *, required: bool = True) -> Table | None:
        """A sub-table, or None when it is absent and not required."""
        value = self._get(key, REQUIRED if required else None)
        if value is None:
            return None
        return Table(value, key, self.path)

    def finish(self) -> None:
        """Refuse the first key nobody asked for."""
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(
                unknown[0], f"is not a known key (known: {', '.join(sorted(self.used))})"
            )


# What names an entry of each array of tables, tried in order.
NAMING_KEYS = ("key", "url", "path")


def _label(array: str, item: Any) -> str:
    """``digest 'weekly'`` for an entry of ``[[digests]]`` with ``key = "weekly"``; "" when
    the entry names nothing (its errors then give its position alone)."""
    if not isinstance(item, dict):
        return ""
    for naming in NAMING_KEYS:
        value = item.get(naming)
        if isinstance(value, str) and value.strip():
            shown = value if len(value) <= 60 else value[:57] + "..."
            return f"{array.removesuffix('s')} {shown!r}"
    return ""


def _kind(value: Any) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )
