"""Checks of single values that need more than a type: URLs, the public base URL, a time
zone, a mailbox, feed category names, a digest's subject line."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from datetime import datetime
from email.utils import parseaddr
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from mailer.config.settings import Digest
from mailer.config.table import Table
from mailer.errors import RenderError
from mailer.sandbox import SAMPLE_LEADS, environment, render_subject
from mailer.text import is_inert_url, is_plain_address


def check_url(table: Table, key: str, value: str, *, https_only: bool = False) -> str:
    """An absolute http(s) URL (https only if asked), without its trailing slash."""
    parts = urlsplit(value)
    schemes = ("https",) if https_only else ("http", "https")
    if parts.scheme not in schemes or not parts.netloc:
        raise table.error(key, f"must be an absolute {' or '.join(schemes)} URL, got {value!r}")
    return value.rstrip("/")


LOOPBACK_HOSTS = frozenset({"localhost"})


def is_loopback(host: str) -> bool:
    """True for this machine's own names and addresses (localhost, 127.0.0.1, ::1)."""
    return _is_loopback(host)


def _is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_HOSTS or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_base_url(table: Table, key: str, value: str) -> str:
    """The public address of the web app: every link in every message starts with it.

    Plain http is refused unless the host is this machine (the demo, development): the links
    carry the subscriber's signed token, and RFC 8058 one-click unsubscribe needs an HTTPS URI.
    """
    url = check_url(table, key, value)
    # mailer.compose.messages splices it into headers and quoted-printable HTML unescaped (and
    # checks again there); ? and # pass is_inert_url, refused below with their own message.
    if not is_inert_url(url):
        raise table.error(
            key,
            "must be an ASCII URL (punycode host) of at most 800 characters without spaces "
            f"or any of & ' \" < >: it is spliced into headers and HTML, got {value!r}",
        )
    parts = urlsplit(url)
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:  # a port that is not a number 0-65535
        raise table.error(key, f"has an invalid port: {exc} (got {value!r})") from exc
    if not host or port == 0:
        raise table.error(key, f"must name a host (and a port 1-65535 if any), got {value!r}")
    if parts.username is not None or parts.password is not None:
        raise table.error(key, f"must not carry a user name or password, got {value!r}")
    if parts.query or parts.fragment or value.rstrip("/").endswith(("?", "#")):
        raise table.error(key, f"must not have a query or fragment (? or #), got {value!r}")
    if parts.scheme == "http" and not _is_loopback(host):
        raise table.error(
            key,
            f"must be https:// for a public host, got {value!r}: the links in every message "
            "carry the subscriber's token, and one-click unsubscribe (RFC 8058) needs HTTPS "
            "(plain http is accepted for localhost and 127.0.0.1 only)",
        )
    return url


def check_zone(table: Table, key: str, value: str) -> str:
    """An IANA time zone name."""
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise table.error(
            key, f"must be an IANA time zone such as America/New_York, got {value!r}"
        ) from exc
    return value


def check_mailbox(table: Table, key: str, value: str) -> str:
    """An ASCII address, optionally with a display name ('Name <user@example.org>')."""
    _name, addr = parseaddr(value)
    if not addr or "@" not in addr or not addr.isascii():
        raise table.error(key, f"must be an address like 'Name <user@example.org>', got {value!r}")
    return value


def check_addresses(table: Table, key: str, values: list[str]) -> list[str]:
    """Plain addresses (``editor@example.org``), each at most once, as staff mail is sent to."""
    seen: set[str] = set()
    for value in values:
        if not is_plain_address(value) or "." not in value.rpartition("@")[2]:
            raise table.error(
                key, f"must list plain addresses like editor@example.org, got {value!r}"
            )
        if value.lower() in seen:
            raise table.error(key, f"lists {value!r} twice")
        seen.add(value.lower())
    return values


def check_subject(t: Table, digest: Digest, sample_slot: datetime) -> None:
    """Compile the subject in the sandbox and render it for a sample slot, with one sample
    article and with three (``count`` and ``more`` both ways).

    A misspelt variable or a filter that fails would otherwise surface only when a scheduled
    firing builds the issue, long after the config was accepted.
    """
    env = environment()
    for leads in (SAMPLE_LEADS[:1], SAMPLE_LEADS):
        try:
            render_subject(env, digest, sample_slot, leads)
        except RenderError as exc:
            raise t.error(
                "subject",
                f"cannot be rendered: {exc.reason} "
                f"(tried with date {sample_slot:%Y-%m-%d %H:%M %Z} and"
                f" {'one sample article' if len(leads) == 1 else f'{len(leads)} sample articles'};"
                " a subject sees digest.name, digest.key, date, lead.title, lead.topic, count"
                " and more)",
            ) from exc


# The email templates shipped in the package (mailer/templates/email); read as plain files.
EMAIL_TEMPLATES = Path(str(resources.files("mailer") / "templates" / "email"))


def check_template(t: Table, name: str) -> None:
    """A digest's ``template`` names a pair email/<name>.html and .txt that exists, so a typo
    is refused at load, not when the first issue is composed."""
    missing = [
        f"email/{name}.{ext}"
        for ext in ("html", "txt")
        if not (EMAIL_TEMPLATES / f"{name}.{ext}").is_file()
    ]
    if missing:
        known = sorted(
            p.stem
            for p in EMAIL_TEMPLATES.glob("*.html")
            if not p.stem.startswith("_") and p.with_suffix(".txt").is_file()
        )
        raise t.error(
            "template",
            f"names {name!r}, but {' and '.join(missing)}"
            f" {'does' if len(missing) == 1 else 'do'} not exist in {EMAIL_TEMPLATES}"
            f" (there: {', '.join(known)})",
        )


def category_key(name: str) -> str:
    """A feed category as it is matched (mailer.content.feeds): case and runs of blanks ignored."""
    return " ".join(name.split()).casefold()


def check_categories(t: Table, categories: Mapping[str, str]) -> None:
    """Category names are matched by ``category_key``: each must be distinct, and not empty."""
    seen: dict[str, str] = {}
    for category in categories:
        folded = category_key(category)
        if not folded:
            raise t.error("categories", 'has an empty category name ("" = ...)')
        if folded in seen:
            raise t.error(
                "categories",
                f"names category {category!r} twice ({seen[folded]!r} is the same, "
                "as categories are matched ignoring case)",
            )
        seen[folded] = category
