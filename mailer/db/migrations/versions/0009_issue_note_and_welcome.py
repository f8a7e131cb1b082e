"""an editor's note per issue, and the welcome mail

* issues.note: a short note from the editor printed at the top of the issue (`mailer issues
  note ID TEXT` before it goes, or the `note` file beside the config when the issue is made);
  issues.note_by: who wrote it.
* subscribers.welcomed_at: when the welcome mail sent on confirmation was accepted by the relay
  (NULL while it is owed). Set to confirmed_at for everyone confirmed before this revision, so
  an upgrade does not welcome the whole list.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("issues", sa.Column("note", sa.Text))
    op.add_column("issues", sa.Column("note_by", sa.String(200)))
    op.add_column("subscribers", sa.Column("welcomed_at", sa.DateTime(timezone=True)))
    op.execute("UPDATE subscribers SET welcomed_at = confirmed_at WHERE confirmed_at IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table("subscribers", schema=None) as batch_op:
        batch_op.drop_column("welcomed_at")
    with op.batch_alter_table("issues", schema=None) as batch_op:
        batch_op.drop_column("note_by")
        batch_op.drop_column("note")
