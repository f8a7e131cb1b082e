"""issues.kind and issues.corrects_article: a correction is an issue of its own

``kind`` is "digest" (every existing issue) or "correction": the short mail ``mailer articles
retract --correction`` sends to the readers who received a retracted article. It goes through
the same snapshot, worker, report and archive as any issue, so nothing about it is lost.
``corrects_article`` names that article; its unique index makes a second retraction of the
same article find the first correction instead of sending another.

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("issues", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=16), server_default="digest", nullable=False)
        )
        batch_op.add_column(
            sa.Column(
                "corrects_article",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                nullable=True,
            )
        )
        batch_op.create_check_constraint("kind", "kind IN ('digest', 'correction')")
        batch_op.create_foreign_key(
            "fk_issues_corrects_article",
            "articles",
            ["corrects_article"],
            ["id"],
            ondelete="SET NULL",
        )
        batch_op.create_index("ix_issues_corrects_article", ["corrects_article"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("issues", schema=None) as batch_op:
        batch_op.drop_index("ix_issues_corrects_article")
        batch_op.drop_constraint("fk_issues_corrects_article", type_="foreignkey")
        batch_op.drop_constraint("kind", type_="check")
        batch_op.drop_column("corrects_article")
        batch_op.drop_column("kind")
