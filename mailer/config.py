"""Configuration: one TOML file, read and validated once into frozen typed settings.

Every error names the file, the key and what was expected. Unknown keys are errors: a misspelt
key silently ignored is a setting that silently does not apply.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, time, timedelta
from email.headerregistry import Address
from email.utils import parseaddr
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from mailer.errors import ConfigError, RenderError
from mailer.issues.cron import CronError, first_fire, parse_cron
from mailer.sandbox import environment, render_subject

DEFAULT_CONFIG_NAME = "mailer.toml"
KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")

Security = Literal["none", "starttls", "tls"]
MULTILINE_KEYS = frozenset({"postal_address", "description"})


@dataclass(frozen=True)
class SiteSettings:
    name: str
    tagline: str
    base_url: str
    from_address: str
    reply_to: str | None
    privacy_policy_url: str
    privacy_policy_file: Path | None
    privacy_policy_version: str
    postal_address: str
    publisher: str
    disclaimer: str
    timezone: str
    secret_key_env: str
    secret_key: bytes | None = field(repr=False)
    list_id: str
    unsubscribe_mailto: str | None
    feedback_id: str | None

    @property
    def domain(self) -> str:
        """The site's domain: the right-hand side of Message-IDs and tokens."""
        return Address(addr_spec=parseaddr(self.from_address)[1]).domain

    def require_secret(self) -> bytes:
        """The site secret, or a ConfigError naming the environment variable to set."""
        if not self.secret_key:
            raise ConfigError(
                f"the site secret is not set: export {self.secret_key_env} "
                "(named by [site].secret_key_env) or set [site].secret_key_file; make one with"
                ' python3 -c "import secrets; print(secrets.token_urlsafe(32))"'
            )
        return self.secret_key


@dataclass(frozen=True)
class DatabaseSettings:
    url: str
    # How long a foreground `digest send` waits for the database to come back before it gives
    # up; `run` and `worker` wait for as long as it takes.
    outage_wait_seconds: float = 60.0


@dataclass(frozen=True)
class WebSettings:
    host: str
    port: int


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    security: Security
    username: str | None
    password_env: str | None
    password: str | None = field(repr=False)
    connections: int
    rate_per_second: float
    timeout: float
    envelope_from: str | None
    verp: bool
    retry_base_seconds: float
    retry_max_age_hours: float
    batch_size: int
    lease_seconds: float
    in_doubt: Literal["resend", "hold"]
    # Processes sending at once (mailer.delivery.processes), each with `connections` connections.
    processes: int = 1


@dataclass(frozen=True)
class SchedulerSettings:
    catch_up: Literal["latest", "all", "none"]
    catch_up_hours: float
    misfire_grace_seconds: int
    poll_seconds: float


@dataclass(frozen=True)
class BounceSettings:
    """When soft bounces make a subscriber bounced (``mailer bounces process``)."""

    soft_limit: int = 3
    soft_window_days: int = 30


@dataclass(frozen=True)
class DkimSettings:
    domain: str
    selector: str
    private_key_file: Path


@dataclass(frozen=True)
class Topic:
    key: str
    name: str
    description: str


@dataclass(frozen=True)
class Source:
    type: Literal["feed", "directory"]
    topic: str
    url: str | None
    path: Path | None
    # Feed entry category -> topic (matched ignoring case); unmatched entries take ``topic``.
    categories: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class FeedSettings:
    interval_minutes: float  # 0: feeds are fetched only by `mailer articles fetch`
    timeout: float
    max_bytes: int
    concurrency: int


@dataclass(frozen=True)
class Digest:
    key: str
    name: str
    subject: str
    schedule: str
    timezone: str
    topics: tuple[str, ...]
    max_articles: int
    template: str
    # "alert": its deliveries go ahead of queued bulk mail and ignore quiet hours.
    priority: Literal["bulk", "alert"] = "bulk"
    # Local (start, end) during which bulk deliveries wait, e.g. 21:00-06:00.
    quiet_hours: tuple[time, time] | None = None
    # Send an article a subscriber already received again when it was updated since.
    include_updates: bool = False
    # An issue takes the articles its digest has not taken yet, published at most this many
    # days before it is made: a first issue takes only these, never the whole store.
    lookback_days: float = 7.0

    @property
    def lookback(self) -> timedelta:
        return timedelta(days=self.lookback_days)


@dataclass(frozen=True)
class Settings:
    path: Path | None
    site: SiteSettings
    database: DatabaseSettings
    web: WebSettings
    smtp: SmtpSettings
    scheduler: SchedulerSettings
    feeds: FeedSettings
    dkim: DkimSettings | None
    topics: tuple[Topic, ...]
    sources: tuple[Source, ...]
    digests: tuple[Digest, ...]
    bounces: BounceSettings = BounceSettings()

    def digest(self, key: str) -> Digest:
        for digest in self.digests:
            if digest.key == key:
                return digest
        known = ", ".join(d.key for d in self.digests) or "none"
        raise ConfigError(f"no digest {key!r} in [[digests]] (known: {known})", path=self._where)

    def topic(self, key: str) -> Topic:
        for topic in self.topics:
            if topic.key == key:
                return topic
        raise ConfigError(f"no topic {key!r} in [[topics]]", path=self._where)

    @property
    def topic_keys(self) -> tuple[str, ...]:
        return tuple(t.key for t in self.topics)

    @property
    def envelope_from(self) -> str:
        """The envelope sender (Return-Path): ``[smtp].envelope_from``, else the address of
        ``[site].from_address``. With ``[smtp].verp`` each message tags it with its
        subscriber's uid (``mailer.bounces.verp.verp_address``)."""
        return self.smtp.envelope_from or parseaddr(self.site.from_address)[1]

    @property
    def _where(self) -> str | None:
        return str(self.path) if self.path else None


class _Table:
    """Typed, tracked access to one TOML table; ``finish`` rejects keys nobody asked for."""

    def __init__(self, data: Any, name: str, path: str | None) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"must be a table, got {_kind(data)}", path=path, key=name)
        self.data: dict[str, Any] = data
        self.name = name
        self.path = path
        self.used: set[str] = set()

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, path=self.path, key=f"{self.name}.{key}")

    def _get(self, key: str, default: Any) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is _REQUIRED:
                raise self.error(key, "is required")
            return default
        return self.data[key]

    def text(self, key: str, default: Any = None, *, pattern: re.Pattern[str] | None = None) -> Any:
        value = self._get(key, default)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {_kind(value)}")
        if "\r" in value or ("\n" in value and key not in MULTILINE_KEYS):
            raise self.error(key, "must be one line (no CR or LF)")
        if pattern is not None and not pattern.match(value):
            raise self.error(key, f"must match {pattern.pattern}, got {value!r}")
        return value

    def integer(self, key: str, default: Any, *, low: int, high: int) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be a whole number {low}–{high}, got {value!r}")
        if not low <= value <= high:
            raise self.error(key, f"must be {low}–{high}, got {value}")
        return value

    def number(self, key: str, default: Any, *, low: float, high: float) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"must be a number {low}–{high}, got {value!r}")
        if not low <= value <= high:
            raise self.error(key, f"must be {low}–{high}, got {value}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def choice(self, key: str, default: Any, choices: tuple[str, ...]) -> Any:
        value = self.text(key, default)
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def text_list(self, key: str, default: Any) -> list[str]:
        value = self._get(key, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, f"must be a list of strings, got {value!r}")
        return list(value)

    def string_map(self, key: str) -> dict[str, str]:
        value = self._get(key, {})
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise self.error(key, f'must be a table of "category" = "topic", got {_kind(value)}')
        return dict(value)

    def tables(self, key: str) -> Iterator[_Table]:
        value = self._get(key, [])
        if not isinstance(value, list):
            raise self.error(key, f"must be an array of tables ([[{key}]]), got {_kind(value)}")
        for index, item in enumerate(value):
            yield _Table(item, f"{key}[{index}]", self.path)

    def table(self, key: str, *, required: bool = True) -> _Table | None:
        value = self._get(key, _REQUIRED if required else None)
        if value is None:
            return None
        return _Table(value, key, self.path)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(
                unknown[0], f"is not a known key (known: {', '.join(sorted(self.used))})"
            )


_REQUIRED = object()


def _kind(value: Any) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _check_url(table: _Table, key: str, value: str, *, https_only: bool = False) -> str:
    parts = urlsplit(value)
    schemes = ("https",) if https_only else ("http", "https")
    if parts.scheme not in schemes or not parts.netloc:
        raise table.error(key, f"must be an absolute {' or '.join(schemes)} URL, got {value!r}")
    return value.rstrip("/")


LOOPBACK_HOSTS = frozenset({"localhost"})
# What mailer.compose.messages splices into headers and quoted-printable HTML unescaped (it checks
# again there); ? and # are allowed by it, refused here with their own message.
_INERT_URL_RE = re.compile(r"https?://[A-Za-z0-9._~:/?#@!$()*+,;=%\[\]-]+")


def _is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_HOSTS or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_base_url(table: _Table, key: str, value: str) -> str:
    """The public address of the web app: every link in every message starts with it.

    Plain http is refused unless the host is this machine (the demo, development): the links
    carry the subscriber's signed token, and RFC 8058 one-click unsubscribe needs an HTTPS URI.
    """
    url = _check_url(table, key, value)
    if not _INERT_URL_RE.fullmatch(url) or len(url) > 800:
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


def _check_zone(table: _Table, key: str, value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise table.error(
            key, f"must be an IANA time zone such as America/New_York, got {value!r}"
        ) from exc
    return value


def _check_mailbox(table: _Table, key: str, value: str) -> str:
    _name, addr = parseaddr(value)
    if not addr or "@" not in addr or not addr.isascii():
        raise table.error(key, f"must be an address like 'Name <user@example.org>', got {value!r}")
    return value


def _resolve_path(base: Path | None, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() or base is None else base / path


def _site(t: _Table, base: Path | None, env: dict[str, str]) -> SiteSettings:
    name = t.text("name", _REQUIRED)
    base_url = _check_base_url(t, "base_url", t.text("base_url", _REQUIRED))
    from_address = _check_mailbox(t, "from", t.text("from", _REQUIRED))
    reply_to = t.text("reply_to")
    if reply_to is not None:
        _check_mailbox(t, "reply_to", reply_to)
    privacy_url = _check_url(
        t, "privacy_policy_url", t.text("privacy_policy_url", f"{base_url}/privacy")
    )
    privacy_file = t.text("privacy_policy_file")
    postal = t.text("postal_address", _REQUIRED)
    if not postal.strip():
        raise t.error("postal_address", "must be a valid physical postal address (CAN-SPAM)")
    secret_env = t.text(
        "secret_key_env", "MAILER_SECRET_KEY", pattern=re.compile(r"^[A-Z_][A-Z0-9_]*$")
    )
    secret_file = t.text("secret_key_file")
    secret: bytes | None = None
    if env.get(secret_env):
        secret = env[secret_env].encode()
    elif secret_file is not None:
        secret_path = _resolve_path(base, secret_file)
        try:
            secret = secret_path.read_bytes().strip()
        except OSError as exc:
            raise t.error(
                "secret_key_file", f"cannot be read: {exc.strerror} ({secret_path})"
            ) from exc
    if secret is not None and len(secret) < 16:
        raise t.error("secret_key_env", "the site secret must be at least 16 characters long")
    domain = Address(addr_spec=parseaddr(from_address)[1]).domain
    list_id = t.text("list_id", f"updates.{domain}", pattern=re.compile(r"^[A-Za-z0-9.-]{1,200}$"))
    mailto = t.text("unsubscribe_mailto")
    if mailto is not None and ("@" not in mailto or not mailto.isascii() or " " in mailto):
        raise t.error("unsubscribe_mailto", f"must be a plain address, got {mailto!r}")
    feedback_id = t.text(
        "feedback_id", pattern=re.compile(r"^[A-Za-z0-9._-]+(:[A-Za-z0-9._-]+){1,3}$")
    )
    site = SiteSettings(
        name=name,
        tagline=t.text("tagline", ""),
        base_url=base_url,
        from_address=from_address,
        reply_to=reply_to,
        privacy_policy_url=privacy_url,
        privacy_policy_file=_resolve_path(base, privacy_file) if privacy_file else None,
        privacy_policy_version=t.text("privacy_policy_version", "1"),
        postal_address=postal.strip(),
        publisher=t.text("publisher", name),
        disclaimer=t.text("disclaimer", ""),
        timezone=_check_zone(t, "timezone", t.text("timezone", "UTC")),
        secret_key_env=secret_env,
        secret_key=secret,
        list_id=list_id,
        unsubscribe_mailto=mailto,
        feedback_id=feedback_id,
    )
    t.finish()
    return site


def _smtp(t: _Table | None, env: dict[str, str]) -> SmtpSettings:
    t = t or _Table({}, "smtp", None)
    security = t.choice("security", "none", ("none", "starttls", "tls"))
    username = t.text("username")
    password_env = t.text("password_env", pattern=re.compile(r"^[A-Z_][A-Z0-9_]*$"))
    if username and not password_env:
        raise t.error("password_env", "is required when [smtp].username is set")
    password = env.get(password_env) if password_env else None
    envelope_from = t.text("envelope_from")
    if envelope_from is not None and ("@" not in envelope_from or not envelope_from.isascii()):
        raise t.error("envelope_from", f"must be a plain address, got {envelope_from!r}")
    smtp = SmtpSettings(
        host=t.text("host", "127.0.0.1"),
        port=t.integer("port", 25, low=1, high=65535),
        security=security,
        username=username,
        password_env=password_env,
        password=password,
        connections=t.integer("connections", 8, low=1, high=256),
        rate_per_second=t.number("rate_per_second", 0, low=0, high=1_000_000),
        timeout=t.number("timeout", 30, low=0.1, high=600),
        envelope_from=envelope_from,
        verp=t.flag("verp", False),
        retry_base_seconds=t.number("retry_base_seconds", 60, low=0, high=86_400),
        retry_max_age_hours=t.number("retry_max_age_hours", 72, low=0, high=24 * 30),
        batch_size=t.integer("batch_size", 500, low=1, high=100_000),
        # Fractions of a second are allowed so that tests need not wait seconds for a lease; in
        # service, a lease must outlast a slow commit or two (it is renewed every third of it).
        lease_seconds=t.number("lease_seconds", 15, low=0.2, high=86_400),
        in_doubt=t.choice("in_doubt", "resend", ("resend", "hold")),
        processes=t.integer("processes", 1, low=1, high=64),
    )
    t.finish()
    return smtp


def _scheduler(t: _Table | None) -> SchedulerSettings:
    t = t or _Table({}, "scheduler", None)
    scheduler = SchedulerSettings(
        catch_up=t.choice("catch_up", "latest", ("latest", "all", "none")),
        catch_up_hours=t.number("catch_up_hours", 24, low=0, high=24 * 366),
        misfire_grace_seconds=t.integer("misfire_grace_seconds", 3600, low=1, high=7 * 86_400),
        poll_seconds=t.number("poll_seconds", 5, low=0.05, high=3600),
    )
    t.finish()
    return scheduler


def _feeds(t: _Table | None) -> FeedSettings:
    t = t or _Table({}, "feeds", None)
    feeds = FeedSettings(
        interval_minutes=t.number("interval_minutes", 15, low=0, high=24 * 60),
        timeout=t.number("timeout", 10, low=0.5, high=300),
        max_bytes=t.integer("max_bytes", 5 * 1024 * 1024, low=1024, high=100 * 1024 * 1024),
        concurrency=t.integer("concurrency", 4, low=1, high=64),
    )
    t.finish()
    return feeds


def _bounces(t: _Table | None) -> BounceSettings:
    t = t or _Table({}, "bounces", None)
    defaults = BounceSettings()
    bounces = BounceSettings(
        soft_limit=t.integer("soft_limit", defaults.soft_limit, low=1, high=1000),
        soft_window_days=t.integer("soft_window_days", defaults.soft_window_days, low=1, high=3660),
    )
    t.finish()
    return bounces


def _dkim(t: _Table | None, base: Path | None) -> DkimSettings | None:
    if t is None:
        return None
    dkim = DkimSettings(
        domain=t.text("domain", _REQUIRED, pattern=re.compile(r"^[A-Za-z0-9.-]+$")),
        selector=t.text("selector", _REQUIRED, pattern=re.compile(r"^[A-Za-z0-9._-]+$")),
        private_key_file=_resolve_path(base, t.text("private_key_file", _REQUIRED)),
    )
    t.finish()
    return dkim


def _digest(t: _Table, topics: set[str], site_zone: str) -> Digest:
    key = t.text("key", _REQUIRED, pattern=KEY_RE)
    schedule = t.text("schedule", _REQUIRED)
    zone = _check_zone(t, "timezone", t.text("timezone", site_zone))
    try:
        sample_slot = first_fire(parse_cron(schedule, zone), schedule)
    except CronError as exc:
        raise t.error("schedule", str(exc)) from exc
    digest_topics = t.text_list("topics", _REQUIRED)
    for topic in digest_topics:
        if topic not in topics:
            raise t.error(
                "topics", f"names unknown topic {topic!r} (known: {', '.join(sorted(topics))})"
            )
    if not digest_topics:
        raise t.error("topics", "must name at least one topic")
    digest = Digest(
        key=key,
        name=t.text("name", _REQUIRED),
        subject=t.text("subject", "{{ digest.name }} — {{ date.strftime('%-d %B %Y') }}"),
        schedule=schedule,
        timezone=zone,
        topics=tuple(digest_topics),
        max_articles=t.integer("max_articles", 20, low=1, high=500),
        template=t.text("template", "digest", pattern=KEY_RE),
        priority=t.choice("priority", "bulk", ("bulk", "alert")),
        quiet_hours=_quiet_hours(t),
        include_updates=t.flag("include_updates", False),
        lookback_days=t.number("lookback_days", 7, low=0.01, high=3650),
    )
    t.finish()
    _check_subject(t, digest, sample_slot.astimezone(ZoneInfo(zone)))
    return digest


def _check_subject(t: _Table, digest: Digest, sample_slot: datetime) -> None:
    """Compile the subject in the sandbox and render it once for a sample slot.

    A misspelt variable or a filter that fails would otherwise surface only when a scheduled
    firing builds the issue, long after the config was accepted.
    """
    try:
        render_subject(environment(), digest, sample_slot)
    except RenderError as exc:
        raise t.error(
            "subject",
            f"cannot be rendered: {exc.reason} "
            f"(tried with digest {digest.key!r} and date {sample_slot:%Y-%m-%d %H:%M %Z};"
            " a subject sees digest.name, digest.key and date)",
        ) from exc


QUIET_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


def _quiet_hours(t: _Table) -> tuple[time, time] | None:
    value = t.text("quiet_hours")
    if value is None:
        return None
    match = QUIET_RE.match(value.replace(" ", ""))
    if match is None or match.group(1, 2) == match.group(3, 4):
        raise t.error("quiet_hours", f'must be "HH:MM-HH:MM" (24-hour, local time), got {value!r}')
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    return time(h1, m1), time(h2, m2)


def category_key(name: str) -> str:
    """A feed category as it is matched (mailer.content.feeds): case and runs of blanks ignored."""
    return " ".join(name.split()).casefold()


def _check_categories(t: _Table, categories: Mapping[str, str]) -> None:
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


def check_processes(db_url: str, processes: int, *, path: str | None = None) -> None:
    """More than one sending process needs a database they can all open."""
    if processes > 1 and db_url in ("sqlite://", "sqlite:///:memory:"):
        raise ConfigError(
            f"must be 1 with an in-memory SQLite database ({db_url}: private to one process),"
            f" got {processes}",
            path=path,
            key="smtp.processes",
        )


def with_processes(settings: Settings, processes: int) -> Settings:
    """``settings`` with ``[smtp].processes`` set (``--processes``), checked as at load."""
    if processes == settings.smtp.processes:
        return settings
    check_processes(settings.database.url, processes)
    return replace(settings, smtp=replace(settings.smtp, processes=processes))


def parse_settings(
    data: dict[str, Any], *, path: Path | None = None, env: dict[str, str] | None = None
) -> Settings:
    """Validate a parsed TOML document into Settings. ``env`` defaults to ``os.environ``."""
    env = dict(os.environ) if env is None else env
    where = str(path) if path else None
    base = path.parent if path else None
    root = _Table(data, "", where)
    site_table = root.table("site")
    assert site_table is not None
    site_table.name = "site"
    site = _site(site_table, base, env)

    db_table = root.table("database", required=False) or _Table({}, "database", where)
    db_table.name = "database"
    db_url = db_table.text("url", "sqlite:///mailer.db")
    if not db_url.startswith(("sqlite", "postgresql")):
        raise db_table.error("url", f"must be a sqlite:/// or postgresql:// URL, got {db_url!r}")
    if (
        db_url.startswith("sqlite:///")
        and base is not None
        and not db_url.startswith("sqlite:////")
    ):
        relative = db_url.removeprefix("sqlite:///")
        if relative and relative != ":memory:":
            db_url = "sqlite:///" + str(base / relative)
    outage_wait = db_table.number("outage_wait_seconds", 60, low=0, high=86_400)
    db_table.finish()

    web_table = root.table("web", required=False) or _Table({}, "web", where)
    web_table.name = "web"
    web = WebSettings(
        host=web_table.text("host", "127.0.0.1"),
        port=web_table.integer("port", 8000, low=1, high=65535),
    )
    web_table.finish()

    smtp_table = root.table("smtp", required=False)
    smtp = _smtp(smtp_table, env)
    check_processes(db_url, smtp.processes, path=where)

    scheduler = _scheduler(root.table("scheduler", required=False))
    feeds = _feeds(root.table("feeds", required=False))
    dkim = _dkim(root.table("dkim", required=False), base)
    bounces = _bounces(root.table("bounces", required=False))

    topics: list[Topic] = []
    for t in root.tables("topics"):
        topic = Topic(
            key=t.text("key", _REQUIRED, pattern=KEY_RE),
            name=t.text("name", _REQUIRED),
            description=t.text("description", ""),
        )
        if any(existing.key == topic.key for existing in topics):
            raise t.error("key", f"duplicates topic {topic.key!r}")
        t.finish()
        topics.append(topic)
    if not topics:
        raise ConfigError("at least one [[topics]] table is required", path=where)
    topic_keys = {t.key for t in topics}

    sources: list[Source] = []
    for t in root.tables("sources"):
        kind = t.choice("type", _REQUIRED, ("feed", "directory"))
        topic = t.text("topic", _REQUIRED)
        if topic not in topic_keys:
            raise t.error("topic", f"names unknown topic {topic!r}")
        url = t.text("url")
        src_path = t.text("path")
        if kind == "feed":
            if url is None:
                raise t.error("url", "is required for a feed source")
            _check_url(t, "url", url)
        if kind == "directory" and src_path is None:
            raise t.error("path", "is required for a directory source")
        categories = t.string_map("categories")
        if categories and kind != "feed":
            raise t.error("categories", "applies to feed sources only")
        _check_categories(t, categories)
        for category, mapped in categories.items():
            if mapped not in topic_keys:
                raise t.error(
                    "categories",
                    f"maps {category!r} to unknown topic {mapped!r} "
                    f"(known: {', '.join(sorted(topic_keys))})",
                )
        t.finish()
        sources.append(
            Source(
                type=kind,
                topic=topic,
                url=url,
                path=_resolve_path(base, src_path) if src_path else None,
                categories=categories,
            )
        )

    digests: list[Digest] = []
    for t in root.tables("digests"):
        digest = _digest(t, topic_keys, site.timezone)
        if any(existing.key == digest.key for existing in digests):
            raise t.error("key", f"duplicates digest {digest.key!r}")
        digests.append(digest)
    root.finish()
    return Settings(
        path=path,
        site=site,
        database=DatabaseSettings(url=db_url, outage_wait_seconds=outage_wait),
        web=web,
        smtp=smtp,
        scheduler=scheduler,
        feeds=feeds,
        dkim=dkim,
        topics=tuple(topics),
        sources=tuple(sources),
        digests=tuple(digests),
        bounces=bounces,
    )


def load_settings(path: str | os.PathLike[str], *, env: dict[str, str] | None = None) -> Settings:
    """Read and validate a config file; every failure is a ConfigError naming the file."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(
            "config file not found (pass --config FILE or set MAILER_CONFIG)", path=str(file)
        ) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", path=str(file)) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"is not UTF-8 text (byte {exc.start})", path=str(file)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"is not valid TOML: {exc}", path=str(file)) from exc
    return parse_settings(data, path=file.resolve(), env=env)
