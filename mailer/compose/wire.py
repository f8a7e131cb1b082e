"""Message bytes known to be CRLF-only, so that the SMTP client need not check them again.

SMTP's DATA needs every line to end in CRLF (RFC 5321 §2.3.8): the client checks a message
for bare CR or LF before it sends it (a translate and a count over the whole message, about
40 µs for a 30 KB digest, a tenth of what sending it costs). The digest composer checks its
serialized template once and fills in only values that hold no line break; what it returns
is a ``CrlfOnly``, which the client sends without that check.

DATA also doubles a dot that begins a line (RFC 5321 §4.5.2): finding the line starts in a
30 KB message costs about 16 µs. A ``SmtpReady`` message is CRLF-only and has no line that
begins with a dot (the composer checks its template once and each per-recipient line as it
fills it in), so it goes out as it is.

A DKIM signature hashes the body in its relaxed canonical form (RFC 6376 §3.4.4): finding the
runs of spaces in a 30 KB digest and rewriting it costs about 100 µs a message, a sixth of
signing it. The composer's template is the same for every recipient: its parts are
canonicalized once per issue, and a message carries in ``relaxed_body`` how to put its own
canonical body together from them and its per-recipient lines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_NOT_LINE_BREAKS = bytes(b for b in range(256) if b not in b"\r\n")


class CrlfOnly(bytes):
    """Bytes whose every CR and LF is part of a CRLF pair (checked by whoever made them)."""

    # Set by whoever made the message, if it can: returns the message's body in DKIM's relaxed
    # canonical form, as parts to hash one after the other. None: the signer canonicalizes
    # the body itself. A message made from this one (a signed copy) does not inherit it.
    relaxed_body: Callable[[], Sequence[bytes]] | None = None


class SmtpReady(CrlfOnly):
    """CRLF-only bytes with no line that begins with a dot: DATA needs no dot-stuffing."""


def has_leading_dot(data: bytes) -> bool:
    """Whether a line of ``data`` (taken to begin at a line start) begins with a dot."""
    return data.startswith(b".") or b"\n." in data


def is_crlf_only(data: bytes) -> bool:
    """Whether every CR and LF in ``data`` is part of a CRLF pair."""
    # The line-break bytes alone read CRLF CRLF ..., and there are as many adjacent pairs as
    # that (one translate and one count: 3x faster than counting CR, LF and CRLF).
    breaks = data.translate(None, _NOT_LINE_BREAKS)
    pairs = len(breaks) // 2
    return breaks == b"\r\n" * pairs and data.count(b"\r\n") == pairs


def relax_lines(data: bytes) -> bytes:
    """Rules (a) and (b) of the relaxed body canonicalization (RFC 6376 §3.4.4) over ``data``:
    every run of spaces and tabs becomes one space, and a space before a line break goes.

    Without tabs both rules are plain replacements (halving runs of spaces until none is
    left), about ten times faster than the regular expressions of dkimpy. Over whole lines it
    is the rules themselves; the last line of ``data``, if it has no CRLF of its own, keeps
    a space at its end (the caller knows whether a line break follows).
    """
    if b"\t" in data:
        data = data.replace(b"\t", b" ")
    while b"  " in data:
        data = data.replace(b"  ", b" ")
    return data.replace(b" \r\n", b"\r\n")
