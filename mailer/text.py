"""Text hygiene shared by every room: one line, control characters, the plain address.

Text from outside (feeds, article files, SMTP replies, bounce reports, staff templates) ends
up in headers, titles, log lines and JSON columns. Each of those wants the same few rules, and
they live here once.
"""

from __future__ import annotations

import re

# C0 and C1 controls (tab, LF and CR are whitespace and handled apart), the bidirectional
# overrides and isolates that make text display as something other than what it says
# (Trojan Source, CVE-2021-42574), and lone surrogates: what undecodable bytes become under
# "surrogateescape", which neither UTF-8 nor PostgreSQL's JSON accept.
_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")

# A dot-atom addr-spec in ASCII (RFC 5321 §4.1.2 Dot-string; RFC 5322 §3.4.1 dot-atom), with
# LDH domain labels. Such an address needs no quoting anywhere: on an SMTP command line, in a
# header, in a URL's path.
ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
DOT_ATOM = rf"[{ATEXT}]+(?:\.[{ATEXT}]+)*"
_PLAIN_ADDRESS = re.compile(rf"{DOT_ATOM}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")

# Characters a per-recipient URL may hold: none of them is special in HTML or in a header.
_INERT_URL = re.compile(r"https?://[A-Za-z0-9._~:/?#@!$()*+,;=%\[\]-]+")
MAX_INERT_URL = 800


def one_line(text: str, *, limit: int | None = None) -> str:
    """``text`` on one line: whitespace runs (CR, LF and tabs too) become one space, the
    characters of ``_UNSAFE`` are dropped, and the ends are stripped. With ``limit``, at most
    that many characters, the last one "…" when something was cut. Safe for a header, a
    title, a log line or a JSON column."""
    line = " ".join(_UNSAFE.sub("", " ".join(text.split())).split())
    if limit is not None and len(line) > limit:
        line = line[: max(limit - 1, 0)].rstrip() + "…"
    return line


def strip_controls(text: str) -> str:
    """``text`` with its line breaks kept as ``\\n`` (CRLF and CR become LF) and every other
    control character and lone surrogate dropped: for bodies and summaries."""
    return _CONTROLS.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


def is_plain_address(address: str) -> bool:
    """True if ``address`` is a dot-atom ``local@domain`` in ASCII (see ``_PLAIN_ADDRESS``).

    It says nothing of whether the address is valid (that is ``subscribers.addresses``): only
    that it can be written as it is, with no quoting or encoding."""
    return _PLAIN_ADDRESS.fullmatch(address) is not None


def is_inert_url(url: str) -> bool:
    """True if ``url`` is an http(s) URL of at most ``MAX_INERT_URL`` characters, none of them
    special in HTML or in a header (no space, & ' " < >): safe to splice into either unescaped."""
    return len(url) <= MAX_INERT_URL and _INERT_URL.fullmatch(url) is not None
