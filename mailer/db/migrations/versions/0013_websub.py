"""websub_subscriptions: one WebSub subscription per feed source whose feed names a hub

The hub pushes new entries to ``/websub/{token}``; the row holds what the callback checks
(topic, secret, what we asked for) and what the fetch round reads to poll such a feed less
often while the hub delivers (lease, last content).

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "websub_subscriptions",
        sa.Column("feed_url", sa.String(length=1000), nullable=False),
        sa.Column("callback_id", sa.String(length=22), nullable=False),
        sa.Column("topic", sa.String(length=1000), nullable=False),
        sa.Column("hub", sa.String(length=1000), nullable=False),
        sa.Column("secret", sa.String(length=100), nullable=False),
        sa.Column("state", sa.String(length=8), nullable=False),
        sa.Column("asked", sa.String(length=12), nullable=True),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_content_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "state IN ('pending', 'verified', 'denied')", name=op.f("ck_websub_subscriptions_state")
        ),
        sa.PrimaryKeyConstraint("feed_url", name=op.f("pk_websub_subscriptions")),
        sa.UniqueConstraint("callback_id", name=op.f("uq_websub_subscriptions_callback_id")),
    )


def downgrade() -> None:
    op.drop_table("websub_subscriptions")
