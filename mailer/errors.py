"""The project's exceptions: one root, subclasses that also inherit the builtin they mean.

Each carries the data a caller needs (the key, the row, the SMTP code), not only text.
"""

from __future__ import annotations


class MailerError(Exception):
    """Root of every error the project raises on purpose."""


class ConfigError(MailerError, ValueError):
    """The configuration file is missing, unreadable or invalid.

    ``path`` is the file and ``key`` the dotted key (``smtp.port``) when one is at fault.
    """

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None) -> None:
        self.path = path
        self.key = key
        prefix = f"{path}: " if path else ""
        where = (
            f"[{key.rsplit('.', 1)[0]}].{key.rsplit('.', 1)[1]} "
            if key and "." in key
            else (f"{key} " if key else "")
        )
        super().__init__(f"{prefix}{where}{message}")


class AddressError(MailerError, ValueError):
    """An email address is not valid; ``address`` is what was given."""

    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(f"invalid email address {address!r}: {reason}")


class SubscriberError(MailerError, LookupError):
    """A subscriber operation cannot be done (unknown address, suppressed address)."""

    def __init__(self, message: str, *, email: str | None = None) -> None:
        self.email = email
        super().__init__(message)


class SuppressedError(SubscriberError):
    """The address is on the suppression list (erased, bounced or complained)."""

    def __init__(self, email: str, reason: str) -> None:
        self.reason = reason
        super().__init__(f"{email} is suppressed ({reason}) and cannot be added", email=email)


class ArticleError(MailerError, ValueError):
    """An article file cannot be parsed; ``path`` and ``line`` locate the fault."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        self.path = path
        self.line = line
        where = path or "<article>"
        if line is not None:
            where += f":{line}"
        super().__init__(f"{where}: {message}")


class UnknownArticleError(MailerError, LookupError):
    """No article has this id; ``article_id`` is the id asked for."""

    def __init__(self, article_id: int) -> None:
        self.article_id = article_id
        super().__init__(f"no article {article_id}: `mailer articles list` shows their ids")


class TokenError(MailerError, ValueError):
    """A signed link token is malformed, forged, or for another purpose."""


class TemplateError(MailerError, ValueError):
    """A template cannot be loaded or rendered (syntax, undefined name, unsafe access)."""


class DigestError(MailerError, LookupError):
    """A digest, issue or delivery cannot be found or acted on."""


class DeliveryError(MailerError):
    """Sending failed in a way that is not a per-recipient SMTP answer."""


class DatabaseUnavailable(MailerError, ConnectionError):
    """The database cannot be reached: refused, reset, or shutting down.

    ``url`` is the database's URL without its password, ``reason`` the driver's words (one
    line). ``waited`` is how many seconds it was waited out before giving up (None: not
    waited). ``since`` is when the outage was first seen (a ``time.monotonic()`` reading).
    """

    def __init__(
        self,
        url: str,
        reason: str,
        *,
        since: float | None = None,
        waited: float | None = None,
        hint: str | None = None,
    ) -> None:
        self.url = url
        self.reason = reason
        self.since = since
        self.waited = waited
        message = f"the database at {url} is unreachable: {reason}"
        if waited is not None:
            message = f"the database at {url} was unreachable for {waited:.0f} s: {reason}"
        if hint is not None:
            message += f" ({hint})"
        super().__init__(message)
