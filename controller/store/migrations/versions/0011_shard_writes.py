"""The write log of federated databases' shards, in the store (``controller/federation/shards.py``).

Revision ID: 0011
Revises: 0010
Create Date: 2027-03-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "shard_writes",
        sa.Column("database_id", sa.String(36), nullable=False),
        sa.Column("shard_index", sa.Integer(), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("transaction", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("statements", JSON, nullable=False),
        sa.Column("written_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("database_id", "shard_index", "sequence", name="pk_shard_writes"),
    )


def downgrade() -> None:
    op.drop_table("shard_writes")
