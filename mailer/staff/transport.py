"""Sending mail to staff now: test copies, review mails, reports and alerts.

The same relay and DKIM key as the subscribers' mail (an ``SmtpPool`` on ``[smtp]`` and the
``[dkim]`` signer), but none of the subscriber path: no ledger row, no count, and the plain
envelope sender, never a VERP address that bounce processing would trace to a subscriber.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from mailer.config.settings import Settings
from mailer.delivery.policy import SendResult
from mailer.delivery.pool import SmtpPool

# Connections a one-off send opens at most: a handful of staff addresses.
STAFF_CONNECTIONS = 2


@dataclass(frozen=True)
class Outgoing:
    """One message for one staff address: the complete RFC 5322 bytes, CRLF line endings."""

    recipient: str
    data: bytes


async def send_on(
    pool: SmtpPool,
    settings: Settings,
    messages: Sequence[Outgoing],
    *,
    sign: Callable[[bytes], bytes] | None,
) -> list[SendResult]:
    """Send each message on ``pool`` (signed when ``sign`` is given), results in order.

    Raises only what ``SmtpPool.send`` raises (``SmtpAuthError`` when the relay refuses the
    login, ``SmtpUsageError`` for an address no server could take); every answer of the
    server and every network failure is a result.
    """
    envelope = settings.envelope_from
    return list(
        await asyncio.gather(
            *(pool.send(envelope, m.recipient, sign(m.data) if sign else m.data) for m in messages)
        )
    )


async def send_now(
    settings: Settings,
    messages: Sequence[Outgoing],
    *,
    sign: Callable[[bytes], bytes] | None,
) -> list[SendResult]:
    """Open a small pool on ``[smtp]``, send ``messages`` and close it (the CLI's way; the
    service sends on the pool its worker already holds, with ``send_on``)."""
    if not messages:
        return []
    smtp = replace(settings.smtp, connections=min(STAFF_CONNECTIONS, len(messages)))
    async with SmtpPool(smtp) as pool:
        return await send_on(pool, settings, messages, sign=sign)
