"""HMAC signature headers of the form ``<method>=<hex>``, as the site's push hook
(``X-Mailer-Signature: sha256=…``) and WebSub hubs (``X-Hub-Signature-256``) send them."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from typing import Any

Digest = Callable[..., Any]  # a hashlib constructor, e.g. hashlib.sha256


def signed_by(secret: bytes, body: bytes, value: str | None, methods: Mapping[str, Digest]) -> bool:
    """True if ``value`` is ``<method>=<hex>`` with ``method`` one of ``methods`` (any case)
    and ``hex`` the HMAC of ``body`` under ``secret``; compared in constant time."""
    if value is None or not value.isascii():
        return False
    method, _, given = value.strip().partition("=")
    digest = methods.get(method.lower())
    if digest is None:
        return False
    expected = hmac.new(secret, body, digest).hexdigest()
    return hmac.compare_digest(expected.encode(), given.lower().encode())
