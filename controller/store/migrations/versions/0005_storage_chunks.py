"""Storage federation: chunks of file versions and their copies on nodes.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-10
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(36)


def upgrade() -> None:
    with op.batch_alter_table("storage_files") as batch:
        batch.add_column(sa.Column("version_id", ID, nullable=True))
    op.create_table(
        "storage_chunks",
        sa.Column("id", ID, nullable=False),
        sa.Column("user_id", ID, nullable=False),
        sa.Column("version_id", ID, nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("stored_size", sa.BigInteger(), nullable=False),
        sa.Column("checksum", sa.String(64), nullable=False),
        sa.Column("replicas", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(20), server_default="pending", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("garbage_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_storage_chunks"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_storage_chunks_user_id_users", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_storage_chunks_version_id", "storage_chunks", ["version_id"])
    op.create_index("ix_storage_chunks_state", "storage_chunks", ["state"])
    op.create_index("ix_storage_chunks_user_id", "storage_chunks", ["user_id"])
    op.create_table(
        "storage_chunk_copies",
        sa.Column("chunk_id", ID, nullable=False),
        sa.Column("node_id", ID, nullable=False),
        sa.Column("state", sa.String(20), server_default="writing", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("chunk_id", "node_id", name="pk_storage_chunk_copies"),
        sa.ForeignKeyConstraint(
            ["chunk_id"],
            ["storage_chunks.id"],
            name="fk_storage_chunk_copies_chunk_id_storage_chunks",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_storage_chunk_copies_node_id", "storage_chunk_copies", ["node_id"])


def downgrade() -> None:
    op.drop_index("ix_storage_chunk_copies_node_id", table_name="storage_chunk_copies")
    op.drop_table("storage_chunk_copies")
    op.drop_index("ix_storage_chunks_user_id", table_name="storage_chunks")
    op.drop_index("ix_storage_chunks_state", table_name="storage_chunks")
    op.drop_index("ix_storage_chunks_version_id", table_name="storage_chunks")
    op.drop_table("storage_chunks")
    with op.batch_alter_table("storage_files") as batch:
        batch.drop_column("version_id")
