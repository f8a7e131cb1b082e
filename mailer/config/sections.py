"""Each table of the config file read into its settings: ``[site]``, ``[smtp]``,
``[scheduler]``, ``[feeds]``, ``[hooks]``, ``[bounces]``, ``[staff]``, ``[staff_web]``,
``[welcome]``, ``[dkim]`` and one ``[[digests]]`` entry."""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, time
from email.headerregistry import Address
from email.utils import parseaddr
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from mailer.config.checks import (
    check_addresses,
    check_base_url,
    check_mailbox,
    check_subject,
    check_template,
    check_url,
    check_zone,
    is_loopback,
)
from mailer.config.cron import CronError, first_fire, gap_minutes, parse_cron, shortest_gap
from mailer.config.settings import (
    BounceSettings,
    Digest,
    DkimSettings,
    FeedSettings,
    HooksSettings,
    SchedulerSettings,
    SiteSettings,
    SmtpSettings,
    StaffSettings,
    StaffWebSettings,
    WelcomeSettings,
)
from mailer.config.table import KEY_RE, REQUIRED, Table

# An environment variable's name, as [site].secret_key_env and [hooks].secret_env give it.
ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


def resolve_path(base: Path | None, value: str) -> Path:
    """A path from the config, relative to the config file's folder unless absolute."""
    path = Path(value).expanduser()
    return path if path.is_absolute() or base is None else base / path


# A secret shorter than this is refused: it signs links (the site) or authenticates pushes.
MIN_SECRET = 16


def read_secret(
    t: Table,
    base: Path | None,
    env: dict[str, str],
    env_key: tuple[str, str],
    file_key: str,
    what: str,
) -> bytes | None:
    """A secret from the environment variable ``env_key`` names (the key, its value), else
    from the file at ``file_key``; None when neither is set. Errors name the key at fault."""
    key, variable = env_key
    name = t.text(file_key)  # read either way: a key set beside the variable is still known
    if env.get(variable):
        secret, source = env[variable].encode(), key
    else:
        if name is None:
            return None
        path = resolve_path(base, name)
        try:
            secret, source = path.read_bytes().strip(), file_key
        except OSError as exc:
            raise t.error(file_key, f"cannot be read: {exc.strerror} ({path})") from exc
    if len(secret) < MIN_SECRET:
        raise t.error(source, f"the {what} secret must be at least {MIN_SECRET} characters long")
    return secret


def read_site(t: Table, base: Path | None, env: dict[str, str]) -> SiteSettings:
    """``[site]``; the site secret read from the environment or its file."""
    name = t.text("name", REQUIRED)
    base_url = check_base_url(t, "base_url", t.text("base_url", REQUIRED))
    from_address = check_mailbox(t, "from", t.text("from", REQUIRED))
    reply_to = t.text("reply_to")
    if reply_to is not None:
        check_mailbox(t, "reply_to", reply_to)
    privacy_url = check_url(
        t, "privacy_policy_url", t.text("privacy_policy_url", f"{base_url}/privacy")
    )
    privacy_file = t.text("privacy_policy_file")
    postal = t.text("postal_address", REQUIRED)
    if not postal.strip():
        raise t.error("postal_address", "must be a valid physical postal address (CAN-SPAM)")
    secret_env = t.text("secret_key_env", "MAILER_SECRET_KEY", pattern=ENV_NAME)
    secret = read_secret(t, base, env, ("secret_key_env", secret_env), "secret_key_file", "site")
    domain = Address(addr_spec=parseaddr(from_address)[1]).domain
    list_id = t.text("list_id", f"updates.{domain}", pattern=re.compile(r"^[A-Za-z0-9.-]{1,200}$"))
    mailto = t.text("unsubscribe_mailto")
    if mailto is not None and ("@" not in mailto or not mailto.isascii() or " " in mailto):
        raise t.error("unsubscribe_mailto", f"must be a plain address, got {mailto!r}")
    feedback_id = t.text(
        "feedback_id", pattern=re.compile(r"^[A-Za-z0-9._-]+(:[A-Za-z0-9._-]+){1,3}$")
    )
    logo_url = t.text("logo_url")
    if logo_url is not None:
        # Mail clients block plain-http images, and a page served over HTTPS would warn.
        logo_url = check_url(t, "logo_url", logo_url, https_only=True)
    site = SiteSettings(
        name=name,
        tagline=t.text("tagline", ""),
        base_url=base_url,
        from_address=from_address,
        reply_to=reply_to,
        privacy_policy_url=privacy_url,
        privacy_policy_file=resolve_path(base, privacy_file) if privacy_file else None,
        privacy_policy_version=t.text("privacy_policy_version", "1"),
        postal_address=postal.strip(),
        publisher=t.text("publisher", name),
        disclaimer=t.text("disclaimer", ""),
        timezone=check_zone(t, "timezone", t.text("timezone", "UTC")),
        secret_key_env=secret_env,
        secret_key=secret,
        list_id=list_id,
        unsubscribe_mailto=mailto,
        feedback_id=feedback_id,
        logo_url=logo_url,
        logo_alt=t.text("logo_alt", name),
        logo_width=t.integer("logo_width", 200, low=16, high=536),
        logo_height=t.integer("logo_height", 0, low=0, high=400) or None,
    )
    t.finish()
    return site


# [smtp].processes: "auto" (the default) or a count in this range.
MAX_PROCESSES = 64
# [smtp].connections per sending process when the file does not say (bench/README.md,
# "Default connections": the measurement that chose it).
DEFAULT_CONNECTIONS = 32
AUTO_FROM = '[smtp].processes = "auto"'


def usable_cpus() -> tuple[int, int | None]:
    """The CPUs this process may run on (its affinity mask: ``taskset``, a container's cpuset),
    and the machine's count when it differs; ``os.cpu_count`` where there is no mask."""
    machine = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux (macOS has no affinity call)
        return max(1, machine or 1), None
    return max(1, usable), (machine if machine and machine != usable else None)


def read_processes(t: Table) -> tuple[int, str]:
    """``[smtp].processes``: a count 1–64, or "auto" (the default): one sending process per
    CPU this process may use. Returns the count and where it came from (``mailer doctor``)."""
    value = t.value("processes", "auto")
    if value == "auto":
        usable, machine = usable_cpus()
        count = min(usable, MAX_PROCESSES)
        of = f" of the machine's {machine}" if machine is not None else ""
        plural = "s" if usable != 1 else ""
        return count, f"{AUTO_FROM}: {usable} CPU{plural}{of} this process may use"
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PROCESSES:
        raise t.error(
            "processes", f'must be a whole number 1–{MAX_PROCESSES} or "auto", got {value!r}'
        )
    return value, f"[smtp].processes = {value}"


def read_smtp(t: Table | None, env: dict[str, str]) -> SmtpSettings:
    """``[smtp]`` (defaults when absent); the password read from the environment."""
    t = t or Table({}, "smtp", None)
    security = t.choice("security", "none", ("none", "starttls", "tls"))
    username = t.text("username")
    password_env = t.text("password_env", pattern=re.compile(r"^[A-Z_][A-Z0-9_]*$"))
    if username and not password_env:
        raise t.error("password_env", "is required when [smtp].username is set")
    password = env.get(password_env) if password_env else None
    envelope_from = t.text("envelope_from")
    if envelope_from is not None and ("@" not in envelope_from or not envelope_from.isascii()):
        raise t.error("envelope_from", f"must be a plain address, got {envelope_from!r}")
    processes, processes_from = read_processes(t)
    processes_auto = processes_from.startswith(AUTO_FROM)
    smtp = SmtpSettings(
        host=t.text("host", "127.0.0.1"),
        port=t.integer("port", 25, low=1, high=65535),
        security=security,
        username=username,
        password_env=password_env,
        password=password,
        connections=t.integer("connections", DEFAULT_CONNECTIONS, low=1, high=256),
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
        processes=processes,
        processes_from=processes_from,
        processes_auto=processes_auto,
    )
    t.finish()
    return smtp


def read_scheduler(t: Table | None) -> SchedulerSettings:
    """``[scheduler]`` (defaults when absent)."""
    t = t or Table({}, "scheduler", None)
    scheduler = SchedulerSettings(
        catch_up=t.choice("catch_up", "latest", ("latest", "all", "none")),
        catch_up_hours=t.number("catch_up_hours", 24, low=0, high=24 * 366),
        misfire_grace_seconds=t.integer("misfire_grace_seconds", 3600, low=1, high=7 * 86_400),
        poll_seconds=t.number("poll_seconds", 5, low=0.05, high=3600),
    )
    t.finish()
    return scheduler


def read_feeds(t: Table | None) -> FeedSettings:
    """``[feeds]`` (defaults when absent)."""
    t = t or Table({}, "feeds", None)
    feeds = FeedSettings(
        interval_minutes=t.number("interval_minutes", 15, low=0, high=24 * 60),
        timeout=t.number("timeout", 10, low=0.5, high=300),
        max_bytes=t.integer("max_bytes", 5 * 1024 * 1024, low=1024, high=100 * 1024 * 1024),
        concurrency=t.integer("concurrency", 4, low=1, high=64),
        websub=t.flag("websub", True),
        websub_poll_minutes=t.number("websub_poll_minutes", 360, low=1, high=7 * 24 * 60),
    )
    t.finish()
    return feeds


def read_hooks(t: Table | None, base: Path | None, env: dict[str, str]) -> HooksSettings:
    """``[hooks]``; its secret read from the environment or its file, like the site secret."""
    if t is None:
        return HooksSettings()
    defaults = HooksSettings()
    secret_env = t.text("secret_env", defaults.secret_env, pattern=ENV_NAME)
    secret = read_secret(t, base, env, ("secret_env", secret_env), "secret_file", "hook")
    hooks = HooksSettings(
        configured=True,
        secret_env=secret_env,
        secret=secret,
        max_body_bytes=t.integer(
            "max_body_bytes", defaults.max_body_bytes, low=1024, high=16 * 1024 * 1024
        ),
    )
    t.finish()
    return hooks


def read_bounces(t: Table | None) -> BounceSettings:
    """``[bounces]`` (defaults when absent)."""
    t = t or Table({}, "bounces", None)
    defaults = BounceSettings()
    bounces = BounceSettings(
        soft_limit=t.integer("soft_limit", defaults.soft_limit, low=1, high=1000),
        soft_window_days=t.integer("soft_window_days", defaults.soft_window_days, low=1, high=3660),
    )
    t.finish()
    return bounces


def read_staff(t: Table | None) -> StaffSettings:
    """``[staff]`` (defaults when absent: nobody is mailed, alerts are only logged)."""
    t = t or Table({}, "staff", None)
    emails = tuple(check_addresses(t, "emails", t.text_list("emails", [])))
    alert_emails = t.text_list("alert_emails", None) if "alert_emails" in t.data else None
    staff = StaffSettings(
        emails=emails,
        alert_emails=(
            emails
            if alert_emails is None
            else tuple(check_addresses(t, "alert_emails", alert_emails))
        ),
        stall_minutes=t.number("stall_minutes", 15, low=1, high=7 * 24 * 60),
        failure_percent=t.number("failure_percent", 5, low=0, high=100),
        feed_failures=t.integer("feed_failures", 3, low=1, high=10_000),
    )
    t.finish()
    return staff


def read_staff_web(t: Table | None, web_host: str, web_port: int) -> StaffWebSettings:
    """``[staff_web]`` (defaults when absent: the console under ``/staff/`` of the web app,
    sessions idle for 30 minutes or 12 hours old end)."""
    t = t or Table({}, "staff_web", None)
    defaults = StaffWebSettings()
    idle = t.number("idle_minutes", defaults.idle_minutes, low=1, high=24 * 60)
    hours = t.number("session_hours", defaults.session_hours, low=0.25, high=30 * 24)
    if idle > hours * 60:
        raise t.error(
            "idle_minutes", f"is longer than session_hours ({hours:g} h): lower it or raise that"
        )
    t.used.add("port")  # optional, and named among the known keys when a key is unknown
    port = t.integer("port", None, low=1, high=65535) if "port" in t.data else None
    host = t.text("host")
    if host is not None and port is None:
        raise t.error("host", "needs [staff_web].port too (the console's own listener)")
    host = host or (web_host if port is not None else None)
    if port is not None and port == web_port and host == web_host:
        raise t.error("port", f"is the web app's own ({web_host}:{web_port}): choose another")
    base_url = t.text("base_url")
    if base_url is not None:
        base_url = check_url(t, "base_url", base_url)
        parts = urlsplit(base_url)
        if parts.scheme == "http" and not is_loopback(parts.hostname or ""):
            raise t.error(
                "base_url",
                f"must be https:// for a host other than this machine, got {base_url!r}: the"
                " console's session cookie is Secure, so browsers send it over HTTPS only."
                " Put a TLS proxy (nginx, Caddy) in front of the console's listener and give"
                " its https:// address here (plain http is accepted for localhost and"
                " 127.0.0.1 only)",
            )
    elif port is not None:
        raise t.error(
            "base_url",
            "is needed with [staff_web].port: the console's address as staff open it (the"
            " https:// address of the TLS proxy in front of its listener, e.g."
            " https://staff.example.org), which the one-time links start with",
        )
    staff_web = StaffWebSettings(
        idle_minutes=idle, session_hours=hours, host=host, port=port, base_url=base_url
    )
    t.finish()
    return staff_web


def read_welcome(t: Table | None) -> WelcomeSettings:
    """``[welcome]`` (defaults when absent: a welcome mail listing the 3 latest stories)."""
    t = t or Table({}, "welcome", None)
    defaults = WelcomeSettings()
    welcome = WelcomeSettings(
        enabled=t.flag("enabled", defaults.enabled),
        articles=t.integer("articles", defaults.articles, low=0, high=10),
    )
    t.finish()
    return welcome


def read_dkim(t: Table | None, base: Path | None) -> DkimSettings | None:
    """``[dkim]``, or None when messages are not signed."""
    if t is None:
        return None
    dkim = DkimSettings(
        domain=t.text("domain", REQUIRED, pattern=re.compile(r"^[A-Za-z0-9.-]+$")),
        selector=t.text("selector", REQUIRED, pattern=re.compile(r"^[A-Za-z0-9._-]+$")),
        private_key_file=resolve_path(base, t.text("private_key_file", REQUIRED)),
    )
    t.finish()
    return dkim


def read_digest(t: Table, topics: set[str], site_zone: str) -> Digest:
    """One ``[[digests]]`` entry: its schedule parsed and its subject rendered once."""
    key = t.text("key", REQUIRED, pattern=KEY_RE)
    trigger = t.choice("trigger", "schedule", ("schedule", "arrival"))
    arrival = trigger == "arrival"
    zone = check_zone(t, "timezone", t.text("timezone", site_zone))
    if arrival:
        schedule, sample_slot = _no_schedule(t)
    else:
        schedule = t.text("schedule", REQUIRED)
        try:
            sample_slot = first_fire(parse_cron(schedule, zone), schedule)
        except CronError as exc:
            raise t.error("schedule", str(exc)) from exc
    digest_topics = t.text_list("topics", REQUIRED)
    for topic in digest_topics:
        if topic not in topics:
            raise t.error(
                "topics", f"names unknown topic {topic!r} (known: {', '.join(sorted(topics))})"
            )
    if not digest_topics:
        raise t.error("topics", "must name at least one topic")
    repeated = sorted({topic for topic in digest_topics if digest_topics.count(topic) > 1})
    if repeated:
        raise t.error("topics", f"names {', '.join(map(repr, repeated))} more than once")
    # An arrival digest is an alert digest: what is worth sending the moment it arrives is
    # worth going ahead of bulk mail and through quiet hours.
    priority = t.choice("priority", "alert" if arrival else "bulk", ("bulk", "alert"))
    if arrival and priority != "alert":
        raise t.error(
            "priority", 'must be "alert" with trigger = "arrival" (or leave it out: implied)'
        )
    digest = Digest(
        key=key,
        name=t.text("name", REQUIRED),
        subject=t.text("subject", "{{ digest.name }} — {{ date.strftime('%-d %B %Y') }}"),
        schedule=schedule,
        timezone=zone,
        topics=tuple(digest_topics),
        max_articles=t.integer("max_articles", 20, low=1, high=500),
        # An alert digest looks like an alert (email/alert.*) unless it names its templates.
        template=t.text("template", "alert" if priority == "alert" else "digest", pattern=KEY_RE),
        priority=priority,
        quiet_hours=_quiet_hours(t),
        include_updates=t.flag("include_updates", False),
        lookback_days=t.number("lookback_days", 7, low=0.01, high=3650),
        review_minutes=t.integer("review_minutes", 0, low=0, high=7 * 24 * 60),
        on_unreviewed=t.choice("on_unreviewed", "send", ("send", "hold")),
        **_edition(t, key),
        trigger=trigger,
        debounce_seconds=_debounce(t, arrival),
    )
    t.finish()
    _check_review(t, digest)
    check_subject(t, digest, sample_slot.astimezone(ZoneInfo(zone)))
    check_template(t, digest.template)
    return digest


# When a schedule-less arrival digest checks its subject renders: any instant will do.
ARRIVAL_SAMPLE = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _no_schedule(t: Table) -> tuple[str, datetime]:
    """An arrival digest has no slots: a ``schedule`` beside ``trigger = "arrival"`` is
    refused rather than ignored, so that nobody expects it to fire at those times too."""
    if t.text("schedule") is not None:
        raise t.error(
            "schedule",
            'does not apply with trigger = "arrival" (its issue is made when an article'
            ' arrives): remove it, or use trigger = "schedule"',
        )
    return "", ARRIVAL_SAMPLE


def _debounce(t: Table, arrival: bool) -> int:
    """``debounce_seconds``: 0–600, and only on an arrival digest."""
    if not arrival and "debounce_seconds" in t.data:
        raise t.error("debounce_seconds", 'applies only with trigger = "arrival"')
    return t.integer("debounce_seconds", 20, low=0, high=600)


def _edition(t: Table, key: str) -> dict[str, Any]:
    """How readers see the digest: offered or not, its one-line description, ticked or not.

    A digest ticked for new sign-ups but not offered would sign people up to mail they were
    never shown, so ``default = true`` with ``public = false`` is refused.
    """
    public = t.flag("public", True)
    description = t.text("description", "")
    if description != description.strip() or any(not ch.isprintable() for ch in description):
        raise t.error("description", "must be one line of text")
    if len(description) > MAX_DESCRIPTION:
        raise t.error("description", f"must be at most {MAX_DESCRIPTION} characters")
    default = t.flag("default", public)
    if default and not public:
        raise t.error(
            "default",
            "cannot be true when public = false: nobody may be signed up"
            " to a digest they are not shown",
        )
    return {"public": public, "description": description, "default": default}


# A description sits beside a checkbox, on a phone too.
MAX_DESCRIPTION = 200
# Fire times sampled for the shortest gap between two slots: a month of a daily schedule.
REVIEW_GAP_SAMPLES = 40


def _check_review(t: Table, digest: Digest) -> None:
    """A review window fits between two slots, and only a bulk digest has one."""
    if digest.review_minutes == 0:
        return
    if digest.priority == "alert":
        raise t.error(
            "review_minutes",
            "applies to bulk digests only: an alert goes out as soon as it is made",
        )
    trigger = parse_cron(digest.schedule, digest.timezone)
    gap = shortest_gap(trigger, REVIEW_GAP_SAMPLES)
    if gap is not None and digest.review >= gap:
        raise t.error(
            "review_minutes",
            f"must be shorter than the time between two slots ({gap_minutes(gap)} minutes"
            f" for {digest.schedule!r}), got {digest.review_minutes}",
        )


QUIET_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


def _quiet_hours(t: Table) -> tuple[time, time] | None:
    value = t.text("quiet_hours")
    if value is None:
        return None
    match = QUIET_RE.match(value.replace(" ", ""))
    if match is None or match.group(1, 2) == match.group(3, 4):
        raise t.error("quiet_hours", f'must be "HH:MM-HH:MM" (24-hour, local time), got {value!r}')
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    return time(h1, m1), time(h2, m2)
