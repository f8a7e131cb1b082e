"""How a library's message becomes a sentence on a console page or in a notice."""

from __future__ import annotations


def sentence(message: object) -> str:
    """``message`` (an exception or its text) as a sentence: its first letter a capital, the
    rest as the library wrote it (an address or a key keeps its case), and a full stop at the
    end unless it ends with one already (or a ``?`` or ``!``)."""
    text = str(message).strip()
    if not text:
        return ""
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."
