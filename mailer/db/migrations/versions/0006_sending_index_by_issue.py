"""deliveries: rows in flight indexed by issue, so `digest send` finds an issue's in-doubt rows

ix_deliveries_sending was keyed on id alone. A claim for one issue asks for its rows in flight
(status 'sending', lease run out) with `issue_id = ?`; SQLite, without statistics, took that
equality as the selective part and walked every row of the issue in the (issue_id,
subscriber_id) unique index on every claim: 7 ms per claim at 50,000 recipients, more than
the rest of the claim. Keyed on (issue_id, next_attempt_at, id) like the waiting rows' index,
the partial index serves the equality and the claim order, and holds only the few rows in
flight. No claim's lease update changes these columns, so it still touches no index.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

SENDING = sa.text("status = 'sending'")


def upgrade() -> None:
    op.drop_index("ix_deliveries_sending", table_name="deliveries")
    op.create_index(
        "ix_deliveries_sending",
        "deliveries",
        ["issue_id", "next_attempt_at", "id"],
        postgresql_where=SENDING,
        sqlite_where=SENDING,
    )


def downgrade() -> None:
    op.drop_index("ix_deliveries_sending", table_name="deliveries")
    op.create_index(
        "ix_deliveries_sending",
        "deliveries",
        ["id"],
        postgresql_where=SENDING,
        sqlite_where=SENDING,
    )
