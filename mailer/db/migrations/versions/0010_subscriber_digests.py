"""digests the reader picks, each with its own pause

* subscriber_digests: which digests (editions) each subscriber receives, and the pause of
  each. Every existing subscriber gets every configured digest whose topics meet theirs, so
  nobody's mail changes; the digests come from the config, passed in by ``mailer init``
  (``mailer.db.engine.migrate``). Run without them on a database that has subscribers, the
  upgrade refuses: it would leave everyone without mail.
* subscribers.paused_until (the one pause for everything) is copied onto each of the
  subscriber's digest rows, then dropped: a pause is per digest from now on.

Revision ID: 0010
Revises: 0009
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import context, op

from mailer.db.schema import UtcDateTime
from mailer.errors import MailerError

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# Lightweight tables: the statements below must not follow the code's schema as it changes.
_subscribers = sa.table(
    "subscribers", sa.column("id", sa.Integer), sa.column("paused_until", UtcDateTime)
)
_topics = sa.table("subscriber_topics", sa.column("subscriber_id"), sa.column("topic"))
_digests = sa.table(
    "subscriber_digests",
    sa.column("subscriber_id"),
    sa.column("digest"),
    sa.column("chosen_at", UtcDateTime),
    sa.column("paused_until", UtcDateTime),
)


def upgrade() -> None:
    conn = op.get_bind()
    configured: list[tuple[str, tuple[str, ...]]] | None = context.config.attributes.get(
        "digests"
    )
    if configured is None and conn.execute(sa.select(_subscribers.c.id).limit(1)).first():
        raise MailerError(
            "migration 0010 gives each subscriber the digests whose topics they chose, and"
            " needs the config's [[digests]] for that: run `mailer init` with your config"
        )
    op.create_table(
        "subscriber_digests",
        sa.Column(
            "subscriber_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("digest", sa.String(length=40), nullable=False),
        sa.Column("chosen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("paused_until", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["subscriber_id"],
            ["subscribers.id"],
            name=op.f("fk_subscriber_digests_subscriber_id_subscribers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("subscriber_id", "digest", name=op.f("pk_subscriber_digests")),
    )
    now = datetime.now(UTC)
    for key, topics in configured or ():
        meets = sa.select(_topics.c.subscriber_id).where(_topics.c.topic.in_(sorted(topics)))
        conn.execute(
            _digests.insert().from_select(
                ["subscriber_id", "digest", "chosen_at", "paused_until"],
                sa.select(
                    _subscribers.c.id,
                    sa.literal(key, sa.String(40)),
                    sa.literal(now, UtcDateTime),
                    _subscribers.c.paused_until,
                ).where(_subscribers.c.id.in_(meets)),
            )
        )
    with op.batch_alter_table("subscribers", schema=None) as batch_op:
        batch_op.drop_column("paused_until")


def downgrade() -> None:
    op.add_column("subscribers", sa.Column("paused_until", sa.DateTime(timezone=True)))
    # One pause for everything again: only someone who paused every digest stays paused,
    # until the first of those pauses ends.
    op.execute(
        "UPDATE subscribers SET paused_until = (SELECT MIN(d.paused_until)"
        " FROM subscriber_digests d WHERE d.subscriber_id = subscribers.id)"
        " WHERE NOT EXISTS (SELECT 1 FROM subscriber_digests d"
        " WHERE d.subscriber_id = subscribers.id AND d.paused_until IS NULL)"
    )
    op.drop_table("subscriber_digests")
