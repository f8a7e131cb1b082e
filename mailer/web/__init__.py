"""The subscriber web app (Starlette): sign-up with double opt-in, confirmation, one-click
unsubscribe, preferences, privacy policy, archive. See ``mailer.web.app`` for the routes."""

from mailer.web.app import create_app
from mailer.web.ratelimit import Limits
from mailer.web.sender import ConfirmationSender, SmtpConfirmationSender

__all__ = [
    "ConfirmationSender",
    "Limits",
    "SmtpConfirmationSender",
    "create_app",
]
