"""staff console: staff_accounts, staff_sessions, staff_login_attempts

Accounts (an address, a role, an Argon2id password hash and the hash of a one-time link to set
it), server-side sessions (the SHA-256 of each session id) and the login attempts every
instance of the app counts against its limits.

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "staff_accounts",
        sa.Column("id", Id, nullable=False, autoincrement=True),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("role", sa.String(length=8), nullable=False),
        sa.Column("password_hash", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("password_set_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("link_hash", sa.String(length=64), nullable=True),
        sa.Column("link_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("role IN ('editor', 'admin')", name=op.f("ck_staff_accounts_role")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_staff_accounts")),
        sa.UniqueConstraint("email", name=op.f("uq_staff_accounts_email")),
        sa.UniqueConstraint("link_hash", name=op.f("uq_staff_accounts_link_hash")),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "staff_sessions",
        sa.Column("id_hash", sa.String(length=64), nullable=False),
        sa.Column("account_id", Id, nullable=False),
        sa.Column("csrf", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ip", sa.String(length=45), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["staff_accounts.id"],
            name=op.f("fk_staff_sessions_account_id_staff_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id_hash", name=op.f("pk_staff_sessions")),
    )
    op.create_index("ix_staff_sessions_account_id", "staff_sessions", ["account_id"])
    op.create_table(
        "staff_login_attempts",
        sa.Column("id", Id, nullable=False, autoincrement=True),
        sa.Column("account", sa.String(length=320), nullable=False),
        sa.Column("address", sa.String(length=45), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("succeeded", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_staff_login_attempts")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_staff_login_attempts_account_at", "staff_login_attempts", ["account", "at"]
    )
    op.create_index(
        "ix_staff_login_attempts_address_at", "staff_login_attempts", ["address", "at"]
    )


def downgrade() -> None:
    op.drop_table("staff_login_attempts")
    op.drop_table("staff_sessions")
    op.drop_table("staff_accounts")
