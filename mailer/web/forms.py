"""Form input: every field the web app accepts, validated into typed values or clear messages.

Pure functions of the submitted fields (a ``starlette.datastructures.FormData`` or any mapping
with ``getlist``), so that every bad input is a table row in the tests. A message names the
field and says what to do; the field name is also the id of its input, which the error
summary links to.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from mailer.errors import AddressError, MailerError
from mailer.subscribers.addresses import normalize_address

MAX_FIELD = 500  # characters in any one text field we accept
MAX_EMAIL = 254  # characters in an address (RFC 5321 path limit; the form's maxlength)
HONEYPOT = "website"  # a field people never see; bots that fill every input fill it
SOURCE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,39}$")
# A pause of 1, 2 or 4 weeks, 30 or 90 days, or (UNTIL_RESUMED) until the reader resumes it.
PAUSE_DAYS = (7, 14, 28, 30, 90)
UNTIL_RESUMED = "resume"
PAUSE_CHOICE = "Choose a pause of 1, 2 or 4 weeks, 30 or 90 days, or until you resume."
PREFERENCE_ACTIONS = ("topics", "digests", "pause", "resume", "drop-topic", "leave")
# Sent by a form that offers digests (the sign-up page, the embed). A form made before there
# were digests to choose sends no digest field: the sign-up gets the default digests.
DIGESTS_SHOWN = "digests_shown"
# The preferences page's "pause everything" / "resume everything".
EVERY_DIGEST = "all"


class Fields(Protocol):
    """What a submitted form offers: every value of a name, in order."""

    def getlist(self, key: str) -> Sequence[object]: ...


@dataclass(frozen=True)
class FieldError:
    """One problem with the input: ``field`` is the input's name and id."""

    field: str
    message: str


class Invalid(MailerError, ValueError):
    """The form cannot be accepted; ``errors`` says why, field by field."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("; ".join(e.message for e in errors))


@dataclass(frozen=True)
class Signup:
    """A valid sign-up form: the address, the chosen topics and which form it came from."""

    email: str  # normalized
    topics: tuple[str, ...]  # in the configured order
    source: str  # the form's own name for itself: "signup", "embed", …
    # The digests chosen, in config order; None: the form offered none (the defaults apply).
    digests: tuple[str, ...] | None = None


@dataclass(frozen=True)
class PreferenceChange:
    """A valid preferences form: what to do (``action``), with the topics or digests kept, or
    the digests paused or resumed (empty: every one) and the days of a pause (0: until
    resumed)."""

    action: str
    topics: tuple[str, ...] = ()
    days: int = 0
    digests: tuple[str, ...] = ()


def _texts(form: Fields, name: str) -> list[str]:
    # Uploaded files are not text; a value that is not a str is treated as absent.
    return [v for v in form.getlist(name) if isinstance(v, str)]


def _single(form: Fields, name: str, errors: list[FieldError], label: str) -> str:
    values = _texts(form, name)
    if len(values) > 1:
        errors.append(FieldError(name, f"Send one {label}, not {len(values)}."))
        return ""
    value = values[0] if values else ""
    if len(value) > MAX_FIELD:
        errors.append(FieldError(name, f"The {label} is too long."))
        return ""
    return value


def _choice(
    form: Fields,
    field: str,
    offered: Sequence[str],
    errors: list[FieldError],
    *,
    error_field: str,
    what: str,
    empty: str,
) -> tuple[str, ...]:
    """The values of the checkboxes ``field`` the reader ticked, in ``offered``'s order; an
    error on ``error_field`` for a value not offered (``what`` names the list) or none."""
    chosen = _texts(form, field)
    unknown = [value for value in chosen if value not in offered]
    if unknown:
        shown = unknown[0][:40]
        errors.append(
            FieldError(error_field, f"“{shown}” is not one of our {what}: choose from the list.")
        )
        return ()
    if not chosen:
        errors.append(FieldError(error_field, empty))
        return ()
    return tuple(key for key in offered if key in chosen)


def _topics(
    form: Fields, known: Sequence[tuple[str, str]], errors: list[FieldError], *, empty: str
) -> tuple[str, ...]:
    keys = [k for k, _name in known]
    return _choice(form, "topic", keys, errors, error_field="topics", what="topics", empty=empty)


def _digests(
    form: Fields, offered: Sequence[str], errors: list[FieldError], *, empty: str
) -> tuple[str, ...]:
    return _choice(
        form, "digest", offered, errors, error_field="digests", what="emails", empty=empty
    )


def parse_signup(
    form: Fields, known: Sequence[tuple[str, str]], offered: Sequence[str] = ()
) -> Signup:
    """The sign-up form: email, topics, digests, the consent box, the honeypot and the source.

    ``known`` is the configured topics as (key, name), ``offered`` the public digests' keys:
    when there are any and the form showed them, at least one must be chosen. Raises
    ``Invalid`` listing every problem.
    """
    errors: list[FieldError] = []
    raw_email = _single(form, "email", errors, "email address")
    email = ""
    if not errors:
        if not raw_email.strip():
            errors.append(FieldError("email", "Enter your email address."))
        else:
            try:
                email = normalize_address(raw_email)
            except AddressError:
                errors.append(
                    FieldError("email", "Enter a valid email address, like name@example.com.")
                )
    topics = _topics(form, known, errors, empty="Choose at least one topic.")
    digests: tuple[str, ...] | None = None
    if offered and (_texts(form, DIGESTS_SHOWN) or _texts(form, "digest")):
        digests = _digests(form, offered, errors, empty="Choose at least one email to receive.")
    consent = _texts(form, "consent")
    if consent != ["yes"]:
        errors.append(
            FieldError(
                "consent",
                "Tick the box to agree to receive the newsletter by email.",
            )
        )
    if any(v.strip() for v in _texts(form, HONEYPOT)):
        errors.append(
            FieldError(HONEYPOT, "Leave the field marked “Leave this field empty” empty.")
        )
    source_values = _texts(form, "source")
    source = source_values[0] if len(source_values) == 1 else "form"
    if not SOURCE_RE.match(source):
        source = "form"
    if errors:
        raise Invalid(errors)
    return Signup(email=email, topics=topics, source=source, digests=digests)


def parse_preferences(
    form: Fields, known: Sequence[tuple[str, str]], offered: Sequence[str] = ()
) -> PreferenceChange:
    """One change on the preferences page: which button, and that button's fields.

    ``offered`` is the digests the reader may choose, pause or resume (the public ones and
    those they already receive).
    """
    errors: list[FieldError] = []
    action = _single(form, "action", errors, "action")
    if errors:
        raise Invalid(errors)
    if action not in PREFERENCE_ACTIONS:
        raise Invalid([FieldError("action", "Choose one of the buttons on the page.")])
    if action == "topics":
        topics = _topics(
            form,
            known,
            errors,
            empty="Choose at least one topic, or unsubscribe from everything below.",
        )
        if errors:
            raise Invalid(errors)
        return PreferenceChange(action, topics=topics)
    if action == "drop-topic":
        value = _single(form, "topic", errors, "topic")
        if errors or value not in {k for k, _n in known}:
            raise Invalid([FieldError("topics", "Choose a topic from the list.")])
        return PreferenceChange(action, topics=(value,))
    if action == "digests":
        digests = _digests(
            form,
            offered,
            errors,
            empty="Choose at least one email, or unsubscribe from everything below.",
        )
        if errors:
            raise Invalid(errors)
        return PreferenceChange(action, digests=digests)
    if action in ("pause", "resume"):
        which = _which_digest(form, offered)
        if action == "resume":
            return PreferenceChange(action, digests=which)
        value = _single(form, "days", errors, "pause length")
        allowed = {str(d): d for d in PAUSE_DAYS} | {UNTIL_RESUMED: 0}
        if errors or value not in allowed:
            raise Invalid([FieldError("days", PAUSE_CHOICE)])
        return PreferenceChange(action, days=allowed[value], digests=which)
    return PreferenceChange(action)


def _which_digest(form: Fields, offered: Sequence[str]) -> tuple[str, ...]:
    """The digest a pause or resume button is for; empty for every one (no field, or "all")."""
    values = _texts(form, "digest")
    if not values or values == [EVERY_DIGEST]:
        return ()
    if len(values) > 1 or values[0] not in offered:
        raise Invalid([FieldError("digests", "Choose an email from the list.")])
    return (values[0],)


def parse_delete(form: Fields) -> None:
    """The "delete my data" confirmation: the box must be ticked."""
    if _texts(form, "confirm") != ["yes"]:
        raise Invalid(
            [FieldError("confirm", "Tick the box to confirm that we should delete your data.")]
        )


def consent_source(source: str, referer: str | None) -> str:
    """The consent record's "source": the form's name, plus the page it sat on if known.

    The referring page keeps only scheme, host and path: a query string can hold another
    site's tokens, and it is not evidence of anything.
    """
    text = f"web:{source}"
    if referer:
        try:
            parts = urlsplit(referer.strip())
        except ValueError:
            parts = None
        if parts is not None and parts.scheme in ("http", "https") and parts.netloc:
            page = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
            page = "".join(ch for ch in page if ch.isprintable() and not ch.isspace())
            text += f" {page}"
    return text[:200]
