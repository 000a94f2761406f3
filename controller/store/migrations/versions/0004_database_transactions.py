"""Database transactions: the controller's decision log for (two-phase) commits.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-08
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
ID = sa.String(36)


def upgrade() -> None:
    op.create_table(
        "database_transactions",
        sa.Column("id", ID, nullable=False),
        sa.Column("user_id", ID, nullable=False),
        sa.Column("database_id", ID, nullable=False),
        sa.Column("distributed", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("state", sa.String(20), server_default="active", nullable=False),
        sa.Column("participants", JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_database_transactions"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_database_transactions_user_id_users", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_database_transactions_user_id", "database_transactions", ["user_id"])
    op.create_index("ix_database_transactions_resolved_at", "database_transactions", ["resolved_at"])


def downgrade() -> None:
    op.drop_index("ix_database_transactions_resolved_at", table_name="database_transactions")
    op.drop_index("ix_database_transactions_user_id", table_name="database_transactions")
    op.drop_table("database_transactions")
