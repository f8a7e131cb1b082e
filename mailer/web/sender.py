"""How the web app hands a mail to one reader (the confirmation, the welcome) to SMTP: an
injected object, real in tests too."""

from __future__ import annotations

import dataclasses
import logging
import ssl
from collections.abc import Callable
from typing import Protocol

from mailer.bounces.verp import verp_address
from mailer.config.settings import Settings
from mailer.delivery.policy import SendResult
from mailer.delivery.pool import SmtpPool
from mailer.models import Recipient

log = logging.getLogger(__name__)


class ConfirmationSender(Protocol):
    """Sends one ready-made message to one recipient and says what the server answered."""

    async def send(self, recipient: Recipient, message: bytes) -> SendResult: ...


class SmtpConfirmationSender:
    """Sends each confirmation over its own one-connection ``SmtpPool`` to ``[smtp]``.

    Confirmations are rare (a few per sign-up at most), so a short-lived connection per mail
    is simpler than keeping one open across requests and event loops; the pool still brings
    TLS verification, AUTH and the reply classification of the digest path.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        local_hostname: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        sign: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self._settings = settings
        self._smtp = dataclasses.replace(settings.smtp, connections=1, rate_per_second=0)
        self._local_hostname = local_hostname
        self._tls_context = tls_context
        self._sign = sign

    async def send(self, recipient: Recipient, message: bytes) -> SendResult:
        async with SmtpPool(
            self._smtp, local_hostname=self._local_hostname, tls_context=self._tls_context
        ) as pool:
            if self._sign is not None:
                message = self._sign(message)  # DKIM: the signed bytes are the sent bytes
            sender = self._settings.envelope_from
            if self._settings.smtp.verp:
                sender = verp_address(sender, recipient.uid)
            result = await pool.send(sender, recipient.email, message)
        log.info(
            "mail to a reader handed to SMTP",
            extra={
                "uid": recipient.uid,
                "message_id": recipient.message_id,
                "outcome": result.outcome.value,
                "code": result.code,
            },
        )
        return result
