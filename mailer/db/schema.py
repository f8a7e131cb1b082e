"""The database schema, as SQLAlchemy Core tables.

Core rather than ORM classes: the hot paths (CSV import, recipient snapshots, delivery results)
are bulk statements, and the rest is small enough to read as SQL. Migrations in ``db/`` create
exactly these tables; a test compares the two.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UtcDateTime(sa.TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware.

    SQLite keeps no zone, so a naive value read back is UTC by construction; a naive value
    written is refused, because guessing its zone is how off-by-hours bugs are made.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

SUBSCRIBER_STATUSES = ("pending", "active", "unsubscribed", "bounced", "complained")
# review: made before its slot for staff to approve, hold or skip (mailer.issues.review);
# approved and held wait for the slot or for staff; skipped is final and sends nothing.
ISSUE_STATUSES = (
    "review",
    "approved",
    "held",
    "sending",
    "sent",
    "empty",
    "cancelled",
    "skipped",
)
# Made before its slot, articles fixed, not released yet: the digest's next issue.
WAITING_ISSUE_STATUSES = ("review", "approved", "held")
STAFF_MAIL_KINDS = ("review", "report", "alert")
STAFF_MAIL_STATUSES = ("pending", "sent", "failed")
# An article's priority: "alert" leads every issue that takes it (mailer.content.selection).
ARTICLE_PRIORITIES = ("bulk", "alert")
ISSUE_KINDS = ("digest", "correction")
# The digest key of correction issues: no [[digests]] key can be it (KEY_RE), so no digest
# schedule, lookback or archive list of a digest ever counts a correction as its issue.
CORRECTION_DIGEST = "_correction"
DELIVERY_STATUSES = (
    "queued",
    "sending",
    "sent",
    "deferred",
    "bounced",
    "failed",
    "cancelled",
    "unknown",
)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


subscribers = sa.Table(
    "subscribers",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("uid", sa.String(32), nullable=False, unique=True),
    sa.Column("email", sa.String(320), nullable=False, unique=True),
    sa.Column("name", sa.String(200), nullable=False, server_default=""),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    sa.Column("confirmed_at", UtcDateTime),
    sa.Column("unsubscribed_at", UtcDateTime),
    sa.Column("bounce_count", sa.Integer, nullable=False, server_default="0"),
    # Consent evidence (GDPR Art. 7(1)): how, when, from where, under which policy version.
    sa.Column("consent_source", sa.String(200), nullable=False, server_default=""),
    sa.Column("consent_at", UtcDateTime),
    sa.Column("consent_ip", sa.String(64)),
    sa.Column("consent_user_agent", sa.String(500)),
    sa.Column("consent_policy_version", sa.String(40)),
    sa.Column("confirm_ip", sa.String(64)),
    sa.Column("confirm_user_agent", sa.String(500)),
    sa.Column("confirmation_message_id", sa.String(200)),
    sa.Column("confirmation_sent_at", UtcDateTime),
    # When the welcome mail was accepted by the relay; NULL while it is owed (migration 0009).
    sa.Column("welcomed_at", UtcDateTime),
    sa.CheckConstraint(_in("status", SUBSCRIBER_STATUSES), name="status"),
    sqlite_autoincrement=True,
)

subscriber_topics = sa.Table(
    "subscriber_topics",
    metadata,
    sa.Column(
        "subscriber_id", Id, sa.ForeignKey("subscribers.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("topic", sa.String(40), primary_key=True),
)

# The digests (editions) a subscriber receives, each with its own pause (migration 0010): an
# issue goes only to those with a row for its digest that is not paused. ``digest`` is a
# [[digests]] key; a key the config no longer has selects no issue and is shown as such.
subscriber_digests = sa.Table(
    "subscriber_digests",
    metadata,
    sa.Column(
        "subscriber_id", Id, sa.ForeignKey("subscribers.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("digest", sa.String(40), primary_key=True),
    sa.Column("chosen_at", UtcDateTime, nullable=False),
    # Set from the preferences page: no issue of this digest while it lies in the future.
    sa.Column("paused_until", UtcDateTime),
)

articles = sa.Table(
    "articles",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("guid", sa.String(500), nullable=False, unique=True),
    sa.Column("topic", sa.String(40), nullable=False),
    sa.Column("title", sa.String(500), nullable=False),
    sa.Column("summary", sa.Text, nullable=False, server_default=""),
    sa.Column("why_it_matters", sa.Text, nullable=False, server_default=""),
    sa.Column("body", sa.Text, nullable=False, server_default=""),
    sa.Column("link", sa.String(1000)),
    sa.Column("published_at", UtcDateTime, nullable=False),
    sa.Column("expires_at", UtcDateTime),
    sa.Column("content_hash", sa.String(64), nullable=False),
    # Arrival in the store: never changed by an update (an updated article is not a new one).
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    # Duplicate content is one article (migration 0007): the same normalised text, or the same
    # canonical link under the same title, from another source or guid is not stored again.
    # Unique, so two ingests racing each other cannot both store it; NULL never conflicts.
    sa.Column("text_key", sa.String(64)),
    sa.Column("link_key", sa.String(64)),
    # `mailer articles remove`: when, by whom, and which unsent issues it was taken out of
    # (issue ids separated by ";"). A removed article is never taken by an issue again.
    sa.Column("removed_at", UtcDateTime),
    sa.Column("removed_by", sa.String(200)),
    sa.Column("removed_from", sa.Text),
    # "alert" (migration 0011): the site marked it urgent; it leads every issue that takes it.
    # A plain column, no index: read with the row, never searched by.
    sa.Column("priority", sa.String(8), nullable=False, server_default="bulk"),
    # Where it came from (migration 0015): "feed:<url>", "websub:<feed url>", "file:<folder>",
    # "push" or "cli" (mailer.content.store.Origin); NULL for articles stored before 0015.
    sa.Column("origin", sa.String(1100)),
    sa.CheckConstraint(_in("priority", ARTICLE_PRIORITIES), name="priority"),
    sa.Index("ix_articles_topic_published", "topic", "published_at"),
    sa.Index("ix_articles_text_key", "text_key", unique=True),
    sa.Index("ix_articles_link_key", "link_key", unique=True),
    sqlite_autoincrement=True,
)

issues = sa.Table(
    "issues",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("digest", sa.String(40), nullable=False),
    sa.Column("scheduled_for", UtcDateTime, nullable=False),
    # The publication dates the issue could take articles from, (window_start, window_end]:
    # the lookback before the moment the issue was made, and that moment. Which articles it
    # took is issue_articles: an issue takes what its digest has not taken yet (by arrival).
    sa.Column("window_start", UtcDateTime),
    sa.Column("window_end", UtcDateTime, nullable=False),
    sa.Column("subject", sa.String(500), nullable=False),
    sa.Column("topics", sa.String(500), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("completed_at", UtcDateTime),
    # When its report was queued for staff (mailer.issues.report): once per issue, by whichever
    # process sees it final first.
    sa.Column("reported_at", UtcDateTime),
    # The editor's note printed at the top of the issue, and who wrote it (migration 0009).
    sa.Column("note", sa.Text),
    sa.Column("note_by", sa.String(200)),
    # "digest", or "correction": the mail `articles retract --correction` sends to those who
    # received ``corrects_article`` (its text is the issue's note; migration 0012).
    sa.Column("kind", sa.String(16), nullable=False, server_default="digest"),
    sa.Column(
        "corrects_article",
        Id,
        sa.ForeignKey("articles.id", ondelete="SET NULL", name="fk_issues_corrects_article"),
    ),
    sa.UniqueConstraint("digest", "scheduled_for"),
    sa.CheckConstraint(_in("status", ISSUE_STATUSES), name="status"),
    sa.CheckConstraint(_in("kind", ISSUE_KINDS), name="kind"),
    # One correction per article: retracting it again finds this one.
    sa.Index("ix_issues_corrects_article", "corrects_article", unique=True),
    sqlite_autoincrement=True,
)

issue_articles = sa.Table(
    "issue_articles",
    metadata,
    sa.Column("issue_id", Id, sa.ForeignKey("issues.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("article_id", Id, sa.ForeignKey("articles.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("position", sa.Integer, nullable=False),
    # `mailer issues drop-article` during review: out of this issue, and taken by no later
    # issue of the digest (what `articles remove` is for every digest).
    sa.Column("dropped_at", UtcDateTime),
    sa.Column("dropped_by", sa.String(200)),
    # "Has this digest taken the article yet?" probes by article (migration 0007).
    sa.Index("ix_issue_articles_article", "article_id", "issue_id"),
)

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("issue_id", Id, sa.ForeignKey("issues.id", ondelete="CASCADE"), nullable=False),
    sa.Column(
        "subscriber_id", Id, sa.ForeignKey("subscribers.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", UtcDateTime, nullable=False),
    sa.Column("lease_owner", sa.String(64)),
    sa.Column("lease_expires_at", UtcDateTime),
    sa.Column("message_id", sa.String(200), nullable=False),
    sa.Column("last_reply", sa.String(500)),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    sa.Column("sent_at", UtcDateTime),
    # 1 for an alert digest: claimed ahead of bulk mail.
    sa.Column("priority", sa.SmallInteger, nullable=False, server_default="0"),
    sa.UniqueConstraint("issue_id", "subscriber_id"),
    sa.CheckConstraint(_in("status", DELIVERY_STATUSES), name="status"),
    sa.Index("ix_deliveries_subscriber", "subscriber_id"),
    sqlite_autoincrement=True,
)
# Claim order, waiting rows only (migration 0005): one issue's rows (`digest send`), and every
# issue's, alerts first (workers). A claim reads its batch off the index instead of sorting.
# Queries must say WAITING_ROW with these literals: neither database proves that a condition
# with bound parameters implies an index's WHERE.
WAITING_ROW = deliveries.c.status.in_(
    [sa.literal_column("'queued'"), sa.literal_column("'deferred'")]
)
# Rows in flight (status "sending"), found again when their worker's lease runs out; keyed
# like an issue's waiting rows (migration 0006), so a claim for one issue reads this small
# index and not the whole issue.
SENDING_ROW = deliveries.c.status == sa.literal_column("'sending'")
sa.Index(
    "ix_deliveries_sending",
    deliveries.c.issue_id,
    deliveries.c.next_attempt_at,
    deliveries.c.id,
    postgresql_where=SENDING_ROW,
    sqlite_where=SENDING_ROW,
)
sa.Index(
    "ix_deliveries_issue_waiting",
    deliveries.c.issue_id,
    deliveries.c.next_attempt_at,
    deliveries.c.id,
    postgresql_where=WAITING_ROW,
    sqlite_where=WAITING_ROW,
)
sa.Index(
    "ix_deliveries_waiting",
    deliveries.c.priority.desc(),
    deliveries.c.next_attempt_at,
    deliveries.c.id,
    postgresql_where=WAITING_ROW,
    sqlite_where=WAITING_ROW,
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("subscriber_id", Id, sa.ForeignKey("subscribers.id", ondelete="CASCADE")),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("at", UtcDateTime, nullable=False),
    sa.Column("detail", sa.JSON, nullable=False),
    sa.Index("ix_events_subscriber", "subscriber_id"),
    sqlite_autoincrement=True,
)

suppressions = sa.Table(
    "suppressions",
    metadata,
    # SHA-256 of the normalized address: enough to refuse it again, nothing to read back.
    sa.Column("email_hash", sa.String(64), primary_key=True),
    sa.Column("reason", sa.String(32), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
)

# One row per feed source, keyed by the URL the config names: the validators for conditional GET
# (so an unchanged feed costs one 304) and the fetch history (so a broken feed shows up in data).
feed_state = sa.Table(
    "feed_state",
    metadata,
    sa.Column("url", sa.String(1000), primary_key=True),
    sa.Column("etag", sa.String(500)),
    sa.Column("last_modified", sa.String(100)),
    sa.Column("last_status", sa.Integer),
    sa.Column("last_fetched_at", UtcDateTime),
    sa.Column("last_success_at", UtcDateTime),
    sa.Column("last_error", sa.Text),
    sa.Column("consecutive_failures", sa.Integer, nullable=False, server_default="0"),
)

# One WebSub subscription per feed source whose feed names a hub (mailer.content.feeds.websub):
# what the callback checks (topic, secret, what we asked for) and what the fetch round reads to
# poll the feed less often while the hub delivers (lease, last content).
WEBSUB_STATES = ("pending", "verified", "denied")
websub_subscriptions = sa.Table(
    "websub_subscriptions",
    metadata,
    sa.Column("feed_url", sa.String(1000), primary_key=True),
    # The random id the callback URL's signed token names; never the row's feed URL.
    sa.Column("callback_id", sa.String(22), nullable=False, unique=True),
    sa.Column("topic", sa.String(1000), nullable=False),
    sa.Column("hub", sa.String(1000), nullable=False),
    sa.Column("secret", sa.String(100), nullable=False),
    sa.Column("state", sa.String(8), nullable=False),
    # "subscribe" while a request of ours waits for the hub's verification; else NULL.
    sa.Column("asked", sa.String(12)),
    sa.Column("requested_at", UtcDateTime),
    sa.Column("verified_at", UtcDateTime),
    sa.Column("lease_expires_at", UtcDateTime),
    sa.Column("last_content_at", UtcDateTime),
    sa.Column("last_error", sa.Text),
    sa.CheckConstraint(_in("state", WEBSUB_STATES), name="state"),
)

# Mail to staff (review mails, reports, alerts), queued in the transaction that decided it and
# sent by whichever process runs the staff round (mailer.staff.outbox): a relay that is down
# delays it, and a crash loses none of it. Never a subscriber's mail: no ledger, no List-*.
staff_mail = sa.Table(
    "staff_mail",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(16), nullable=False),
    # What raised it (an alert's cause, "report:<issue>"): for the log and the reader.
    sa.Column("cause", sa.String(200), nullable=False),
    sa.Column("recipients", sa.Text, nullable=False),  # addresses separated by ";"
    sa.Column("subject", sa.String(500), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("html", sa.Text),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", UtcDateTime, nullable=False),
    sa.Column("last_error", sa.String(500)),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("sent_at", UtcDateTime),
    sa.CheckConstraint(_in("kind", STAFF_MAIL_KINDS), name="kind"),
    sa.CheckConstraint(_in("status", STAFF_MAIL_STATUSES), name="status"),
    sa.Index("ix_staff_mail_status_next_attempt_at", "status", "next_attempt_at"),
    sqlite_autoincrement=True,
)

# One row per alert cause: when it was last raised, so that each is mailed at most once an hour
# however many processes see it (mailer.staff.alerts claims the row in one statement).
staff_alerts = sa.Table(
    "staff_alerts",
    metadata,
    sa.Column("cause", sa.String(200), primary_key=True),
    sa.Column("last_raised_at", UtcDateTime, nullable=False),
    sa.Column("times", sa.Integer, nullable=False, server_default="1"),
    sa.Column("message", sa.Text, nullable=False),
)

# The staff console (mailer.console). An account is an address and a role; its password is an
# Argon2id hash, NULL until the account's one-time link was used. The link itself is never
# stored, only its SHA-256 (one link per account at a time; using it, or a new one, ends it).
STAFF_ROLES = ("editor", "admin")
staff_accounts = sa.Table(
    "staff_accounts",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("email", sa.String(320), nullable=False, unique=True),
    sa.Column("role", sa.String(8), nullable=False),
    sa.Column("password_hash", sa.String(200)),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("password_set_at", UtcDateTime),
    sa.Column("link_hash", sa.String(64), unique=True),
    sa.Column("link_expires_at", UtcDateTime),
    sa.CheckConstraint(_in("role", STAFF_ROLES), name="role"),
    sqlite_autoincrement=True,
)

# Server-side sessions: the cookie carries a random id (signed); the table keeps its SHA-256,
# so a copy of the table logs nobody in. A session ends when idle too long, at its absolute
# end, at logout, and with its account (removed, or its password set anew).
staff_sessions = sa.Table(
    "staff_sessions",
    metadata,
    sa.Column("id_hash", sa.String(64), primary_key=True),
    sa.Column(
        "account_id",
        Id,
        sa.ForeignKey("staff_accounts.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("csrf", sa.String(64), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("last_seen_at", UtcDateTime, nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=False),
    sa.Column("ip", sa.String(45)),
    sa.Index("ix_staff_sessions_account_id", "account_id"),
)

# Login attempts, in the database so that every instance of the app counts the same ones: per
# account (the address typed, normalized, whether or not such an account exists) and per
# client address. Rows older than the longest window are deleted as new ones come.
staff_login_attempts = sa.Table(
    "staff_login_attempts",
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("account", sa.String(320), nullable=False),
    sa.Column("address", sa.String(45), nullable=False),
    sa.Column("at", UtcDateTime, nullable=False),
    sa.Column("succeeded", sa.Boolean, nullable=False),
    sa.Index("ix_staff_login_attempts_account_at", "account", "at"),
    sa.Index("ix_staff_login_attempts_address_at", "address", "at"),
    sqlite_autoincrement=True,
)
