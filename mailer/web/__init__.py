"""The subscriber web app (Starlette): sign-up with double opt-in, confirmation, one-click
unsubscribe, preferences, privacy policy, archive. See ``mailer.web.app`` for the routes."""

from mailer.web.app import create_app
from mailer.web.ratelimit import Limits
from mailer.web.sender import ConfirmationSender, SmtpConfirmationSender
from mailer.web.store import UNCONFIRMED_TTL, purge_unconfirmed

__all__ = [
    "UNCONFIRMED_TTL",
    "ConfirmationSender",
    "Limits",
    "SmtpConfirmationSender",
    "create_app",
    "purge_unconfirmed",
]
