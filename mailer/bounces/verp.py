"""VERP: the per-subscriber envelope sender, and the subscriber a bounce address names.

A bounce goes to the envelope sender. With VERP that is ``bounces+<uid>@domain``, so the address
a bounce is delivered to names the subscriber even when the report itself is vague.
"""

from __future__ import annotations

from email.utils import getaddresses

from mailer.errors import AddressError
from mailer.subscribers.addresses import MAX_LOCAL_PART
from mailer.subscribers.tokens import UID_RE


def verp_address(envelope_from: str, uid: str) -> str:
    """The per-subscriber envelope sender: ``bounces@d`` and uid ``U`` give ``bounces+U@d``.

    The uid is a tag after ``+``, the sub-address delimiter most MTAs deliver to the base
    mailbox (Postfix ``recipient_delimiter = +``). A local part already holding a ``+`` tag
    keeps it (``bounces+news@d`` gives ``bounces+news+U@d``).
    """
    local, at, domain = envelope_from.strip().rpartition("@")
    if not at or not local or not domain:
        raise AddressError(envelope_from, "an envelope sender must be a plain local@domain")
    if not UID_RE.match(uid):
        raise AddressError(envelope_from, f"{uid!r} is not a subscriber uid")
    tagged = f"{local}+{uid}"
    if len(tagged) > MAX_LOCAL_PART:
        raise AddressError(
            envelope_from,
            f"the local part with a VERP tag ({tagged!r}) passes {MAX_LOCAL_PART} characters "
            "(RFC 5321 §4.5.3.1.1): use a shorter local part such as 'bounces'",
        )
    return f"{tagged}@{domain}"


def uid_from_verp(address: str, *, envelope_from: str | None = None) -> str | None:
    """The uid tagged in a VERP address, or None if ``address`` is not one.

    With ``envelope_from``, the address must also have its local part and domain (compared
    without case), so a tagged address of someone else's is never read as ours.
    """
    _name, addr = _parse_one(address)
    local, at, domain = addr.rpartition("@")
    base, plus, tag = local.rpartition("+")
    if not at or not plus or not UID_RE.match(tag):
        return None
    if envelope_from is not None:
        own_local, _, own_domain = envelope_from.strip().rpartition("@")
        if base.lower() != own_local.lower() or domain.lower() != own_domain.lower():
            return None
    return tag


def _parse_one(value: str) -> tuple[str, str]:
    pairs = getaddresses([value])
    return pairs[0] if pairs else ("", "")
