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
        self.reason = message  # without the place
        where = path or "<article>"
        if line is not None:
            where += f":{line}"
        super().__init__(f"{where}: {message}")


class UnknownArticleError(MailerError, LookupError):
    """No article has this id; ``article_id`` is the id asked for."""

    def __init__(self, article_id: int) -> None:
        self.article_id = article_id
        super().__init__(f"no article {article_id}: `mailer articles list` shows their ids")


class FeedError(MailerError):
    """A feed cannot be fetched or is not a feed; ``url`` is the feed, ``status`` the HTTP status
    when the server answered, ``reason`` the cause without the URL."""

    def __init__(self, url: str, reason: str, *, status: int | None = None) -> None:
        self.url = url
        self.reason = reason
        self.status = status
        super().__init__(f"feed {url}: {reason}")


class FeedTimeoutError(FeedError, TimeoutError):
    """The server did not answer in time (connect, read, or the whole-fetch deadline)."""


class FeedTooLargeError(FeedError, ValueError):
    """The response is over the byte limit; ``limit`` is that limit, ``size`` the declared
    ``Content-Length`` when the server gave one (None when the stream ran over)."""

    def __init__(self, url: str, *, limit: int, size: int | None = None) -> None:
        self.limit = limit
        self.size = size
        what = f"is {size:,} bytes," if size is not None else "is"
        super().__init__(url, f"the response {what} over the feed size limit of {limit:,} bytes")


class TokenError(MailerError, ValueError):
    """A signed link token is malformed, forged, or for another purpose."""


class TemplateError(MailerError, ValueError):
    """A template cannot be loaded or rendered (syntax, undefined name, unsafe access)."""


class RenderError(TemplateError):
    """A template failed to load or render; ``template`` and ``line`` locate the fault,
    ``reason`` is what went wrong without them."""

    def __init__(self, message: str, *, template: str, line: int | None = None) -> None:
        self.template = template
        self.line = line
        self.reason = message
        where = template if line is None else f"{template}, line {line}"
        super().__init__(f"{where}: {message}")


class DigestError(MailerError, LookupError):
    """A digest, issue or delivery cannot be found or acted on."""


class IssueStateError(DigestError):
    """An issue is not in a state that allows what staff asked (approve a sent issue, drop an
    article from one that is sending); the message names the state and what would."""


class UnknownIssueError(DigestError):
    """No issue has this id; ``issue_id`` is the id asked for."""

    def __init__(self, issue_id: int) -> None:
        self.issue_id = issue_id
        super().__init__(f"no issue {issue_id}: `mailer issues list` shows their ids")


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


class StaffAccountError(MailerError, LookupError):
    """A staff account operation cannot be done; ``email`` is the account, ``reason`` a short
    code (``unknown``, ``exists``, ``last_admin``, ``self``, ``role``)."""

    def __init__(self, message: str, *, email: str | None = None, reason: str = "") -> None:
        self.email = email
        self.reason = reason
        super().__init__(message)


class PasswordRejected(MailerError, ValueError):
    """A new staff password is refused; ``reason`` is why (``short``, ``long``, ``weak``,
    ``local_part``), ``warning`` and ``suggestions`` are the strength estimator's own words."""

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        warning: str = "",
        suggestions: tuple[str, ...] = (),
    ) -> None:
        self.reason = reason
        self.warning = warning
        self.suggestions = suggestions
        super().__init__(message)


class StaffLinkError(MailerError, ValueError):
    """A one-time staff link cannot be used; ``reason`` is ``unknown`` (never issued, already
    used or replaced) or ``expired``."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        text = {
            "expired": "this link has expired: ask an admin for a new one (mailer staff reset)",
        }.get(reason, "this link is not valid or was already used: ask an admin for a new one")
        super().__init__(text)
