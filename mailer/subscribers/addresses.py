"""Email addresses: validation, normalization and the suppression hash."""

from __future__ import annotations

import hashlib

from email_validator import EmailNotValidError, validate_email

from mailer.errors import AddressError

MAX_ADDRESS_LENGTH = 254
MAX_LOCAL_PART = 64  # RFC 5321 §4.5.3.1.1, as email-validator enforces it


def normalize_address(raw: str, *, check_deliverability: bool = False) -> str:
    """The canonical form of an address, or AddressError saying why it is not one.

    The domain is IDNA-encoded and the whole address lower-cased: RFC 5321 lets a server treat
    the local part as case-sensitive, but no mailbox provider does, and a list must not hold
    ``Ann@`` and ``ann@`` as two people. Internationalized local parts are refused, because
    every hop would need SMTPUTF8. No DNS lookups unless asked for.
    """
    candidate = raw.strip()
    if not candidate:
        raise AddressError(raw, "empty")
    if any(ch in candidate for ch in "\r\n\x00"):
        raise AddressError(raw, "contains a line break or NUL")
    try:
        result = validate_email(
            candidate,
            check_deliverability=check_deliverability,
            allow_smtputf8=False,
        )
    except EmailNotValidError as exc:
        raise AddressError(raw, str(exc)) from exc
    address = f"{result.ascii_local_part}@{result.ascii_domain.lower()}"
    if len(address) > MAX_ADDRESS_LENGTH:
        raise AddressError(raw, f"longer than {MAX_ADDRESS_LENGTH} characters")
    return address.lower()


def address_hash(normalized: str) -> str:
    """SHA-256 hex of a normalized address: the only trace an erased subscriber leaves."""
    return hashlib.sha256(normalized.lower().encode()).hexdigest()
