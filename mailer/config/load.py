"""The config file read and validated once into ``Settings``; ``--processes`` checked as at load.

Every error names the file, the key and what was expected. Unknown keys are errors: a misspelt
key silently ignored is a setting that silently does not apply.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from mailer.config.checks import check_categories, check_url
from mailer.config.sections import (
    read_bounces,
    read_digest,
    read_dkim,
    read_feeds,
    read_hooks,
    read_scheduler,
    read_site,
    read_smtp,
    read_staff,
    read_staff_web,
    read_welcome,
    resolve_path,
)
from mailer.config.settings import (
    DatabaseSettings,
    Digest,
    Settings,
    Source,
    Topic,
    WebSettings,
)
from mailer.config.table import KEY_RE, REQUIRED, Table
from mailer.errors import ConfigError

DEFAULT_CONFIG_NAME = "mailer.toml"
# The scheme, with a driver if named (postgresql+psycopg://): another is refused here, not by
# the database library when the first command opens the engine.
DB_URL_RE = re.compile(r"^(sqlite|postgresql)(\+[a-z0-9_]+)?://")


IN_MEMORY_SQLITE = ("sqlite://", "sqlite:///:memory:")


def check_processes(db_url: str, processes: int, *, path: str | None = None) -> None:
    """More than one sending process needs a database they can all open."""
    if processes > 1 and db_url in IN_MEMORY_SQLITE:
        raise ConfigError(
            f"must be 1 with an in-memory SQLite database ({db_url}: private to one process),"
            f" got {processes}",
            path=path,
            key="smtp.processes",
        )


def with_processes(settings: Settings, processes: int | None) -> Settings:
    """``settings`` with ``--processes`` in place of ``[smtp].processes`` when given, checked as
    at load."""
    if processes is None or processes == settings.smtp.processes:
        return settings
    check_processes(
        settings.database.url, processes, path=str(settings.path) if settings.path else None
    )
    smtp = replace(
        settings.smtp,
        processes=processes,
        processes_from=f"--processes {processes}",
        processes_auto=False,
    )
    return replace(settings, smtp=smtp)


def parse_settings(
    data: dict[str, Any], *, path: Path | None = None, env: dict[str, str] | None = None
) -> Settings:
    """Validate a parsed TOML document into Settings. ``env`` defaults to ``os.environ``."""
    env = dict(os.environ) if env is None else env
    where = str(path) if path else None
    base = path.parent if path else None
    root = Table(data, "", where)
    site_table = root.table("site")
    assert site_table is not None
    site = read_site(site_table, base, env)

    db_table = root.table("database", required=False) or Table({}, "database", where)
    db_url = db_table.text("url", "sqlite:///mailer.db")
    if not DB_URL_RE.match(db_url):
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

    web_table = root.table("web", required=False) or Table({}, "web", where)
    web = WebSettings(
        host=web_table.text("host", "127.0.0.1"),
        port=web_table.integer("port", 8000, low=1, high=65535),
    )
    web_table.finish()

    smtp_table = root.table("smtp", required=False)
    smtp = read_smtp(smtp_table, env)
    if smtp.processes_auto and db_url in IN_MEMORY_SQLITE:
        # "auto" asks for what fits; one process is all an in-memory database allows.
        smtp = replace(
            smtp,
            processes=1,
            processes_from='[smtp].processes = "auto": 1, an in-memory SQLite database is'
            " private to one process",
        )
    check_processes(db_url, smtp.processes, path=where)

    scheduler = read_scheduler(root.table("scheduler", required=False))
    feeds = read_feeds(root.table("feeds", required=False))
    hooks = read_hooks(root.table("hooks", required=False), base, env)
    dkim = read_dkim(root.table("dkim", required=False), base)
    bounces = read_bounces(root.table("bounces", required=False))
    staff = read_staff(root.table("staff", required=False))
    welcome = read_welcome(root.table("welcome", required=False))
    staff_web = read_staff_web(root.table("staff_web", required=False), web.host, web.port)

    topics: list[Topic] = []
    for t in root.tables("topics"):
        topic = Topic(
            key=t.text("key", REQUIRED, pattern=KEY_RE),
            name=t.text("name", REQUIRED),
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
        kind = t.choice("type", REQUIRED, ("feed", "directory"))
        topic = t.text("topic", REQUIRED)
        if topic not in topic_keys:
            raise t.error("topic", f"names unknown topic {topic!r}")
        url = t.text("url")
        src_path = t.text("path")
        if kind == "feed":
            if url is None:
                raise t.error("url", "is required for a feed source")
            check_url(t, "url", url)
        if kind == "directory" and src_path is None:
            raise t.error("path", "is required for a directory source")
        categories = t.string_map("categories")
        if categories and kind != "feed":
            raise t.error("categories", "applies to feed sources only")
        check_categories(t, categories)
        allow_private = t.flag("allow_private", False)
        if allow_private and kind != "feed":
            raise t.error("allow_private", "applies to feed sources only")
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
                path=resolve_path(base, src_path) if src_path else None,
                categories=categories,
                allow_private=allow_private,
            )
        )

    digests: list[Digest] = []
    for t in root.tables("digests"):
        digest = read_digest(t, topic_keys, site.timezone)
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
        staff=staff,
        welcome=welcome,
        hooks=hooks,
        staff_web=staff_web,
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
