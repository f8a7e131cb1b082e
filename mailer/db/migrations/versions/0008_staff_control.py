"""staff control: issues reviewed before their slot, reports, alerts and mail to staff

* issues.status gains review, approved, held and skipped (mailer.issues.review);
  issues.reported_at marks an issue whose report was queued (set for the issues that ended
  before this revision, so an upgrade does not mail a report for each of them).
* issue_articles.dropped_at, dropped_by: `mailer issues drop-article`.
* staff_mail: the outbox of review mails, reports and alerts.
* staff_alerts: when each alert cause was last raised (at most once an hour).

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

OLD_ISSUE_STATUSES = "status IN ('sending', 'sent', 'empty', 'cancelled')"
NEW_ISSUE_STATUSES = (
    "status IN ('review', 'approved', 'held', 'sending', 'sent', 'empty', 'cancelled', 'skipped')"
)


def upgrade() -> None:
    with op.batch_alter_table("issues", schema=None) as batch_op:
        batch_op.drop_constraint("status", type_="check")
        batch_op.create_check_constraint("status", NEW_ISSUE_STATUSES)
        batch_op.add_column(sa.Column("reported_at", sa.DateTime(timezone=True)))
    # Issues that ended before reports existed are not reported now, all at once.
    op.execute(
        "UPDATE issues SET reported_at = completed_at"
        " WHERE status IN ('sent', 'empty', 'cancelled') AND completed_at IS NOT NULL"
    )
    op.add_column("issue_articles", sa.Column("dropped_at", sa.DateTime(timezone=True)))
    op.add_column("issue_articles", sa.Column("dropped_by", sa.String(200)))
    op.create_table(
        "staff_mail",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("cause", sa.String(length=200), nullable=False),
        sa.Column("recipients", sa.Text(), nullable=False),
        sa.Column("subject", sa.String(length=500), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("html", sa.Text(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.String(length=500), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("kind IN ('review', 'report', 'alert')", name=op.f("ck_staff_mail_kind")),
        sa.CheckConstraint(
            "status IN ('pending', 'sent', 'failed')", name=op.f("ck_staff_mail_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_staff_mail")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_staff_mail_status_next_attempt_at", "staff_mail", ["status", "next_attempt_at"]
    )
    op.create_table(
        "staff_alerts",
        sa.Column("cause", sa.String(length=200), nullable=False),
        sa.Column("last_raised_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("times", sa.Integer(), server_default="1", nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("cause", name=op.f("pk_staff_alerts")),
    )


def downgrade() -> None:
    op.drop_table("staff_alerts")
    op.drop_index("ix_staff_mail_status_next_attempt_at", table_name="staff_mail")
    op.drop_table("staff_mail")
    op.drop_column("issue_articles", "dropped_by")
    op.drop_column("issue_articles", "dropped_at")
    op.execute("UPDATE issues SET status = 'cancelled' WHERE status IN ('review', 'approved', 'held', 'skipped')")
    with op.batch_alter_table("issues", schema=None) as batch_op:
        batch_op.drop_column("reported_at")
        batch_op.drop_constraint("status", type_="check")
        batch_op.create_check_constraint("status", OLD_ISSUE_STATUSES)
