"""Users' uploaded sources in the store, for several controllers (``A67_SCALE_OUT``): a
source uploaded to one controller can be deployed by digest through another.

Revision ID: 0014
Revises: 0013
Create Date: 2027-03-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "deployment_sources",
        sa.Column("user_id", sa.String(36), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "sha256", name="pk_deployment_sources"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_deployment_sources_user_id_users", ondelete="CASCADE"
        ),
    )


def downgrade() -> None:
    op.drop_table("deployment_sources")
