"""deliveries: partial indexes in claim order, so a claim reads its batch off an index

ix_deliveries_due (status, next_attempt_at) goes: with it, a database without statistics
(SQLite before ANALYZE) read waiting rows through it and sorted them; rows in flight, the only
other thing it served, get a partial index of their own.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

WAITING = sa.text("status IN ('queued', 'deferred')")
SENDING = sa.text("status = 'sending'")


def upgrade() -> None:
    op.drop_index("ix_deliveries_due", table_name="deliveries")
    # Rows in flight, found again when their worker's lease has run out. Keyed on id, which no
    # update changes: a claim's lease update then touches no index (PostgreSQL: a HOT update).
    op.create_index(
        "ix_deliveries_sending",
        "deliveries",
        ["id"],
        postgresql_where=SENDING,
        sqlite_where=SENDING,
    )
    # `digest send` claims one issue's waiting rows in (next_attempt_at, id) order.
    op.create_index(
        "ix_deliveries_issue_waiting",
        "deliveries",
        ["issue_id", "next_attempt_at", "id"],
        postgresql_where=WAITING,
        sqlite_where=WAITING,
    )
    # Workers claim every issue's waiting rows, alerts (priority 1) first.
    op.create_index(
        "ix_deliveries_waiting",
        "deliveries",
        [sa.text("priority DESC"), "next_attempt_at", "id"],
        postgresql_where=WAITING,
        sqlite_where=WAITING,
    )


def downgrade() -> None:
    op.drop_index("ix_deliveries_waiting", table_name="deliveries")
    op.drop_index("ix_deliveries_issue_waiting", table_name="deliveries")
    op.drop_index("ix_deliveries_sending", table_name="deliveries")
    op.create_index("ix_deliveries_due", "deliveries", ["status", "next_attempt_at"])
