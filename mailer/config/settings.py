"""The settings: frozen, typed values read once from the config file (``mailer.config.load``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import time, timedelta
from email.headerregistry import Address
from email.utils import parseaddr
from pathlib import Path
from typing import Literal

from mailer.errors import ConfigError

Security = Literal["none", "starttls", "tls"]


@dataclass(frozen=True)
class SiteSettings:
    """``[site]``: the newsletter's name, addresses, links and legal lines every message carries."""

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
    # The masthead's logo in mail and on the pages: an HTTPS image, and its alt text (the
    # site's name unless set). None: the masthead shows the name alone.
    logo_url: str | None = None
    logo_alt: str = ""
    # The size the mail shows the logo at, in CSS pixels (width and height attributes: Outlook
    # sizes images by them). Without a height the image keeps its own proportions.
    logo_width: int = 200
    logo_height: int | None = None

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
    """``[database]``: where the store lives and how long a foreground send waits out an outage."""

    url: str
    # How long a foreground `digest send` waits for the database to come back before it gives
    # up; `run` and `worker` wait for as long as it takes.
    outage_wait_seconds: float = 60.0


@dataclass(frozen=True)
class WebSettings:
    """``[web]``: where the subscriber web app listens."""

    host: str
    port: int


@dataclass(frozen=True)
class StaffWebSettings:
    """``[staff_web]``: the staff console's sessions, and where it is served.

    Without ``host``/``port`` the console is served by the web app under ``/staff/``; with
    them it has a listener of its own (an internal interface, say) and the public app does not
    mount ``/staff`` at all. ``base_url`` is the console's address as staff open it (for the
    one-time links; default ``[site].base_url``).
    """

    idle_minutes: float = 30
    session_hours: float = 12
    host: str | None = None
    port: int | None = None
    base_url: str | None = None

    @property
    def separate(self) -> bool:
        """True when the console has its own listener."""
        return self.port is not None

    @property
    def idle(self) -> timedelta:
        return timedelta(minutes=self.idle_minutes)

    @property
    def lifetime(self) -> timedelta:
        return timedelta(hours=self.session_hours)


@dataclass(frozen=True)
class HooksSettings:
    """``[hooks]``: the site's CMS pushes articles to ``POST /hooks/articles``, each signed
    with HMAC-SHA256 under ``secret``. Without a ``[hooks]`` table (``configured`` False), or
    without its secret, the route answers 503."""

    configured: bool = False
    secret_env: str = "MAILER_HOOK_SECRET"
    secret: bytes | None = field(default=None, repr=False)
    max_body_bytes: int = 262_144  # one article's JSON; read up to this, never further


@dataclass(frozen=True)
class SmtpSettings:
    """``[smtp]``: the relay, its connections and pacing, leases, retries and sending processes."""

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
    # Where ``processes`` came from, as ``mailer doctor`` says it: the key, "auto" and the CPU
    # count it found, or ``--processes``.
    processes_from: str = "[smtp].processes"
    # Whether ``processes`` is "auto" (one per usable CPU) rather than a count someone chose.
    processes_auto: bool = False


@dataclass(frozen=True)
class SchedulerSettings:
    """``[scheduler]``: which missed slots a restart catches up, how late a slot may still fire,
    and how often an idle worker looks for due deliveries."""

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
    """``[dkim]``: the signing domain, selector and private key."""

    domain: str
    selector: str
    private_key_file: Path


@dataclass(frozen=True)
class Topic:
    """One ``[[topics]]`` entry: what readers choose on the sign-up form."""

    key: str
    name: str
    description: str


@dataclass(frozen=True)
class Source:
    """One ``[[sources]]`` entry: a directory of article files or a feed, and its topic."""

    type: Literal["feed", "directory"]
    topic: str
    url: str | None
    path: Path | None
    # Feed entry category -> topic (matched ignoring case); unmatched entries take ``topic``.
    categories: Mapping[str, str] = field(default_factory=dict, hash=False)
    # Feeds only: let fetches reach loopback, private and other non-public addresses (an
    # intranet feed, the tests' local server). Off, a feed cannot be used to probe them.
    allow_private: bool = False


@dataclass(frozen=True)
class FeedSettings:
    """``[feeds]``: how often feeds are fetched, how long and how large a fetch may be, and how
    many run at once."""

    interval_minutes: float  # 0: feeds are fetched only by `mailer articles fetch`
    timeout: float
    max_bytes: int
    concurrency: int
    # Subscribe to the WebSub hub a feed names; while it delivers, poll only this often.
    websub: bool = True
    websub_poll_minutes: float = 360


@dataclass(frozen=True)
class Digest:
    """One ``[[digests]]`` entry: its schedule, time zone, topics, subject and limits."""

    key: str
    name: str
    subject: str
    schedule: str  # a cron line; "" for a digest made on arrival (it has no slots)
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
    # Minutes before each slot at which its issue is made in status "review" and staff are
    # sent the review mail (0: no review, the issue is made at its slot).
    review_minutes: int = 0
    # What an issue nobody approved, held or skipped does at its slot.
    on_unreviewed: Literal["send", "hold"] = "send"
    # Offered to readers on the sign-up and preferences pages (False: staff-only edition).
    public: bool = True
    # One line shown beside the digest's name on those pages.
    description: str = ""
    # Ticked for a new sign-up, and given to an import row or `subscribers add` naming none.
    default: bool = True
    # "schedule": an issue at each cron slot; "arrival": an issue as soon as an article of
    # its topics is stored (mailer.issues.arrival), ``debounce_seconds`` after the first one.
    trigger: Literal["schedule", "arrival"] = "schedule"
    debounce_seconds: int = 20

    @property
    def on_arrival(self) -> bool:
        """Made when articles arrive, not at slots: no cron job, no slot is ever missed."""
        return self.trigger == "arrival"

    @property
    def lookback(self) -> timedelta:
        return timedelta(days=self.lookback_days)

    @property
    def review(self) -> timedelta:
        return timedelta(minutes=self.review_minutes)


@dataclass(frozen=True)
class StaffSettings:
    """``[staff]``: who gets review mails, reports and alerts, and when an alert is raised."""

    # Review mails and reports go here; `digest test` sends only here unless --force.
    emails: tuple[str, ...] = ()
    # Alerts go here (default: ``emails``).
    alert_emails: tuple[str, ...] = ()
    # An issue with deliveries due this long and none made is stalled.
    stall_minutes: float = 15.0
    # An issue that ends with more than this share failed or bounced raises an alert.
    failure_percent: float = 5.0
    # A feed that failed this many fetches in a row raises an alert.
    feed_failures: int = 3


@dataclass(frozen=True)
class WelcomeSettings:
    """``[welcome]``: the mail a reader gets once confirmed, and what it lists."""

    # False: no welcome mail is sent, and none is owed (the confirmed page says so).
    enabled: bool = True
    # The latest stories in the reader's topics the mail and the confirmed page show (0: none).
    articles: int = 3


@dataclass(frozen=True)
class Settings:
    """The whole configuration, checked and frozen when it loads."""

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
    staff: StaffSettings = StaffSettings()
    welcome: WelcomeSettings = WelcomeSettings()
    hooks: HooksSettings = HooksSettings()
    staff_web: StaffWebSettings = StaffWebSettings()

    def find_digest(self, key: str) -> Digest | None:
        """The configured digest ``key``, or None (an issue of a digest since removed)."""
        return next((d for d in self.digests if d.key == key), None)

    def digest(self, key: str) -> Digest:
        """The configured digest ``key``; a ConfigError naming the known ones if none."""
        found = self.find_digest(key)
        if found is not None:
            return found
        known = ", ".join(d.key for d in self.digests) or "none"
        raise ConfigError(f"no digest {key!r} in [[digests]] (known: {known})", path=self._where)

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
