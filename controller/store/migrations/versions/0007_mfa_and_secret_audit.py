"""MFA (TOTP authenticators, recovery codes, sign-in challenges) and the secret audit log.

The audit log is append-only: triggers refuse UPDATE and DELETE of its rows on both
SQLite and PostgreSQL.

Revision ID: 0007
Revises: 0006
Create Date: 2027-01-10
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(36)
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "user_mfa",
        sa.Column("user_id", ID, nullable=False),
        sa.Column("secret_encrypted", sa.Text(), nullable=False),
        sa.Column("confirmed_at", TS, nullable=True),
        sa.Column("last_used_step", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("user_id", name="pk_user_mfa"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_user_mfa_user_id_users", ondelete="CASCADE"
        ),
    )
    op.create_table(
        "mfa_recovery_codes",
        sa.Column("id", ID, nullable=False),
        sa.Column("user_id", ID, nullable=False),
        sa.Column("code_hash", sa.String(64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("used_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_mfa_recovery_codes"),
        sa.UniqueConstraint("code_hash", name="uq_mfa_recovery_codes_code_hash"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_mfa_recovery_codes_user_id_users", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_mfa_recovery_codes_user_id", "mfa_recovery_codes", ["user_id"])
    op.create_table(
        "mfa_challenges",
        sa.Column("id", ID, nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("user_id", ID, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.Column("used_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_mfa_challenges"),
        sa.UniqueConstraint("token_hash", name="uq_mfa_challenges_token_hash"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_mfa_challenges_user_id_users", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_mfa_challenges_user_id", "mfa_challenges", ["user_id"])
    op.create_table(
        "secret_audit_events",
        sa.Column(
            "seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("id", ID, nullable=False),
        sa.Column("user_id", ID, nullable=True),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("secret_owner", sa.String(255), nullable=False),
        sa.Column("secret_purpose", sa.String(255), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("reason", sa.String(255), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_secret_audit_events"),
        sa.UniqueConstraint("id", name="uq_secret_audit_events_id"),
    )
    op.create_index("ix_secret_audit_events_user_id_seq", "secret_audit_events", ["user_id", "seq"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION a67_secret_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION 'secret_audit_events is append-only'; END $$"
        )
        op.execute(
            "CREATE TRIGGER secret_audit_events_append_only BEFORE UPDATE OR DELETE ON secret_audit_events "
            "FOR EACH ROW EXECUTE FUNCTION a67_secret_audit_append_only()"
        )
    else:
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER secret_audit_events_no_{verb.lower()} BEFORE {verb} ON secret_audit_events "
                "BEGIN SELECT RAISE(ABORT, 'secret_audit_events is append-only'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS secret_audit_events_append_only ON secret_audit_events")
        op.execute("DROP FUNCTION IF EXISTS a67_secret_audit_append_only()")
    op.drop_index("ix_secret_audit_events_user_id_seq", table_name="secret_audit_events")
    op.drop_table("secret_audit_events")
    op.drop_index("ix_mfa_challenges_user_id", table_name="mfa_challenges")
    op.drop_table("mfa_challenges")
    op.drop_index("ix_mfa_recovery_codes_user_id", table_name="mfa_recovery_codes")
    op.drop_table("mfa_recovery_codes")
    op.drop_table("user_mfa")
