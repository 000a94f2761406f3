"""Which controller holds what, for several controllers on one store: a node's stream, a
transaction, an upload's pending chunks; and where nodes reach each controller.

Revision ID: 0013
Revises: 0012
Create Date: 2027-03-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("controllers") as batch:
        batch.add_column(sa.Column("node_endpoint", sa.String(255), nullable=True))
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("stream_holder", sa.String(64), nullable=True))
    with op.batch_alter_table("database_transactions") as batch:
        batch.add_column(sa.Column("controller_id", sa.String(64), nullable=True))
    with op.batch_alter_table("storage_chunks") as batch:
        batch.add_column(sa.Column("uploader", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("storage_chunks") as batch:
        batch.drop_column("uploader")
    with op.batch_alter_table("database_transactions") as batch:
        batch.drop_column("controller_id")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("stream_holder")
    with op.batch_alter_table("controllers") as batch:
        batch.drop_column("node_endpoint")
