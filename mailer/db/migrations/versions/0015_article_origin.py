"""articles.origin: where each article came from, for the staff console

"feed:<url>", "websub:<feed url>", "file:<folder>", "push" or "cli", written when the article
is first stored; NULL for the articles stored before this revision (their origin was never
recorded). A plain column, read with the row.

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("articles", schema=None) as batch_op:
        batch_op.add_column(sa.Column("origin", sa.String(length=1100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("articles", schema=None) as batch_op:
        batch_op.drop_column("origin")
