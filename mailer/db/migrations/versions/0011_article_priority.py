"""articles.priority: an article the site marks as an alert leads every issue that takes it

"bulk" (every existing article) or "alert". A plain column without an index: it orders the
few articles one issue takes, and whoever reads it reads it with the row.

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("articles", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("priority", sa.String(length=8), server_default="bulk", nullable=False)
        )
        batch_op.create_check_constraint("priority", "priority IN ('bulk', 'alert')")


def downgrade() -> None:
    with op.batch_alter_table("articles", schema=None) as batch_op:
        batch_op.drop_constraint("priority", type_="check")
        batch_op.drop_column("priority")
