"""Signed link tokens: a subscriber's identity in every link, without a login.

A token is ``<uid>.<mac>``: the subscriber's random public id and an HMAC-SHA256 of
(purpose, uid) under the site secret, truncated to 128 bits. It is opaque (the uid is random,
not the address or the row id), bound to one purpose (an unsubscribe token cannot confirm), and
never expires: RFC 8058 and CAN-SPAM require the unsubscribe link to keep working.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from enum import StrEnum

from mailer.errors import TokenError

UID_LEN = 22  # base64url characters of a 16-byte uid
UID_RE = re.compile(rf"^[A-Za-z0-9_-]{{{UID_LEN}}}$")
MAC_LEN = 22  # base64url characters of a 16-byte MAC
TOKEN_LEN = UID_LEN + 1 + MAC_LEN  # <uid>.<mac>


class Purpose(StrEnum):
    """What a signed link may do: the purpose is signed into the token, so one cannot stand in
    for another."""

    CONFIRM = "confirm"
    UNSUBSCRIBE = "unsubscribe"
    PREFERENCES = "preferences"
    # The inert links of a test copy sent to staff: they open a page and change nothing.
    TEST = "test"
    # A WebSub callback URL: the uid is the subscription's random callback id, not a reader.
    WEBSUB = "websub"


def new_uid() -> str:
    """A fresh random public id for a subscriber (128 bits, URL-safe)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")


def _mac(secret: bytes, purpose: Purpose, uid: str) -> str:
    digest = hmac.new(secret, f"{purpose.value}:{uid}".encode(), hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def make_token(secret: bytes, purpose: Purpose, uid: str) -> str:
    """The link token for ``uid`` and ``purpose``."""
    if not UID_RE.match(uid):
        raise TokenError(f"not a subscriber uid: {uid!r}")
    return f"{uid}.{_mac(secret, purpose, uid)}"


def read_token(secret: bytes, purpose: Purpose, token: str) -> str:
    """The uid a token stands for; TokenError if it is malformed, forged or for another purpose."""
    if len(token) != TOKEN_LEN:  # before anything reads it: a path segment may be megabytes
        raise TokenError("malformed link token")
    uid, dot, mac = token.partition(".")
    if not dot or not UID_RE.match(uid) or len(mac) != MAC_LEN:
        raise TokenError("malformed link token")
    if not hmac.compare_digest(mac, _mac(secret, purpose, uid)):
        raise TokenError("link token signature does not match")
    return uid


# A test token is prefixed, so that it never has the shape of an unsubscribe token where
# a returned message is searched for one (``mailer.bounces.reports``): a bounce or complaint
# about a test copy sent to staff must not be pinned on the reader it was a copy for.
TEST_PREFIX = "test-"


def make_test_token(secret: bytes, uid: str) -> str:
    """The token of a test copy's inert links, for the reader ``uid`` it is a copy for."""
    return TEST_PREFIX + make_token(secret, Purpose.TEST, uid)


def read_test_token(secret: bytes, token: str) -> str:
    """The uid a test token stands for; TokenError if it is malformed or forged."""
    if not token.startswith(TEST_PREFIX):
        raise TokenError("malformed link token")
    return read_token(secret, Purpose.TEST, token[len(TEST_PREFIX) :])
