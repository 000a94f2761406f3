"""The initial schema: users, nodes, deployments, databases, files and auth state.

Revision ID: 0001
Revises:
Create Date: 2025-11-28

Works on PostgreSQL and SQLite alike (portable types; JSONB on PostgreSQL).
Constraint names follow ``controller.store.models.NAMING_CONVENTION``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
ID = sa.String(36)


def _ts(name: str, *, nullable: bool = False) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _user_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["user_id"], ["users.id"], name=f"fk_{table}_user_id_users", ondelete="CASCADE"
    )


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", ID, nullable=False),
        sa.Column("email", sa.String(255), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        _ts("created_at"),
        _ts("last_login", nullable=True),
        sa.Column("mfa_enabled", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("email", name="uq_users_email"),
    )

    op.create_table(
        "nodes",
        sa.Column("id", ID, nullable=False),
        sa.Column("user_id", ID, nullable=False),
        sa.Column("provider", sa.String(50), nullable=False),
        sa.Column("endpoint", sa.String(500), nullable=False),
        sa.Column("region", sa.String(100), nullable=True),
        sa.Column("status", sa.String(50), server_default="initializing", nullable=False),
        sa.Column("capabilities", JSON, nullable=False),
        sa.Column("metrics_current", JSON, nullable=True),
        sa.Column("credentials", JSON, nullable=False),
        sa.Column("fingerprint", sa.String(128), nullable=True),
        sa.Column("cert_serial", sa.String(128), nullable=True),
        _ts("created_at"),
        _ts("last_heartbeat", nullable=True),
        _ts("last_metrics_update", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_nodes"),
        _user_fk("nodes"),
        sa.UniqueConstraint("user_id", "provider", "id", name="uq_nodes_user_id_provider_id"),
        sa.UniqueConstraint("user_id", "fingerprint", name="uq_nodes_user_id_fingerprint"),
    )
    op.create_index("ix_nodes_status", "nodes", ["status"])
    op.create_index("ix_nodes_provider", "nodes", ["provider"])
    op.create_index("ix_nodes_last_heartbeat", "nodes", ["last_heartbeat"])
    op.create_index("ix_nodes_user_id", "nodes", ["user_id"])

    op.create_table(
        "deployments",
        sa.Column("id", ID, nullable=False),
        sa.Column("user_id", ID, nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("app_type", sa.String(50), nullable=False),
        sa.Column("status", sa.String(50), server_default="pending", nullable=False),
        sa.Column("manifest", JSON, nullable=False),
        sa.Column("node_assignments", JSON, nullable=False),
        sa.Column("current_replicas", sa.Integer(), server_default="0", nullable=False),
        sa.Column("desired_replicas", sa.Integer(), nullable=False),
        sa.Column("endpoints", JSON, nullable=False),
        sa.Column("request_id", sa.String(255), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        _ts("deployed_at", nullable=True),
        _ts("last_scaled_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_deployments"),
        _user_fk("deployments"),
        sa.UniqueConstraint("user_id", "name", name="uq_deployments_user_id_name"),
        sa.UniqueConstraint("user_id", "request_id", name="uq_deployments_user_id_request_id"),
    )
    op.create_index("ix_deployments_status", "deployments", ["status"])
    op.create_index("ix_deployments_user_id", "deployments", ["user_id"])

    op.create_table(
        "database_instances",
        sa.Column("id", ID, nullable=False),
        sa.Column("user_id", ID, nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("provider", sa.String(100), nullable=False),
        sa.Column("provider_specific_id", sa.String(255), nullable=True),
        sa.Column("connection", JSON, nullable=False),
        sa.Column("sharding", JSON, nullable=True),
        sa.Column("replication", JSON, nullable=True),
        sa.Column("schema_info", JSON, nullable=True),
        _ts("created_at"),
        _ts("last_synced", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_database_instances"),
        _user_fk("database_instances"),
        sa.UniqueConstraint("user_id", "name", name="uq_database_instances_user_id_name"),
    )
    op.create_index("ix_database_instances_user_id", "database_instances", ["user_id"])

    op.create_table(
        "storage_files",
        sa.Column("id", ID, nullable=False),
        sa.Column("user_id", ID, nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("mime_type", sa.String(255), nullable=False),
        sa.Column("distribution", JSON, nullable=False),
        sa.Column("chunks", JSON, nullable=False),
        sa.Column("checksum", sa.String(64), nullable=True),
        sa.Column("encryption", JSON, nullable=True),
        sa.Column("replicas", sa.Integer(), server_default="1", nullable=False),
        sa.Column("replication_status", sa.String(50), server_default="replicating", nullable=False),
        _ts("created_at"),
        _ts("modified_at"),
        _ts("last_accessed", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_storage_files"),
        _user_fk("storage_files"),
        sa.UniqueConstraint("user_id", "path", name="uq_storage_files_user_id_path"),
    )
    op.create_index("ix_storage_files_user_id", "storage_files", ["user_id"])

    op.create_table(
        "refresh_token_families",
        sa.Column("id", ID, nullable=False),
        sa.Column("user_id", ID, nullable=False),
        _ts("created_at"),
        _ts("revoked_at", nullable=True),
        sa.Column("revoked_reason", sa.String(100), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_refresh_token_families"),
        _user_fk("refresh_token_families"),
    )
    op.create_index("ix_refresh_token_families_user_id", "refresh_token_families", ["user_id"])

    op.create_table(
        "refresh_tokens",
        sa.Column("jti", sa.String(64), nullable=False),
        sa.Column("family_id", ID, nullable=False),
        sa.Column("user_id", ID, nullable=False),
        _ts("issued_at"),
        _ts("expires_at"),
        _ts("used_at", nullable=True),
        sa.Column("replaced_by", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("jti", name="pk_refresh_tokens"),
        sa.ForeignKeyConstraint(
            ["family_id"],
            ["refresh_token_families.id"],
            name="fk_refresh_tokens_family_id_refresh_token_families",
            ondelete="CASCADE",
        ),
        _user_fk("refresh_tokens"),
    )
    op.create_index("ix_refresh_tokens_family_id", "refresh_tokens", ["family_id"])
    op.create_index("ix_refresh_tokens_user_id", "refresh_tokens", ["user_id"])

    op.create_table(
        "auth_failures",
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("failures", sa.Integer(), server_default="0", nullable=False),
        _ts("window_started_at"),
        _ts("locked_until", nullable=True),
        sa.PrimaryKeyConstraint("key", name="pk_auth_failures"),
    )

    op.create_table(
        "node_enrollment_tokens",
        sa.Column("id", ID, nullable=False),
        sa.Column("user_id", ID, nullable=False),
        sa.Column("token_hash", sa.String(128), nullable=False),
        _ts("expires_at"),
        sa.Column("max_uses", sa.Integer(), server_default="1", nullable=False),
        sa.Column("uses", sa.Integer(), server_default="0", nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_node_enrollment_tokens"),
        _user_fk("node_enrollment_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_node_enrollment_tokens_token_hash"),
    )
    op.create_index("ix_node_enrollment_tokens_user_id", "node_enrollment_tokens", ["user_id"])


def downgrade() -> None:
    op.drop_table("node_enrollment_tokens")
    op.drop_table("auth_failures")
    op.drop_table("refresh_tokens")
    op.drop_table("refresh_token_families")
    op.drop_table("storage_files")
    op.drop_table("database_instances")
    op.drop_table("deployments")
    op.drop_table("nodes")
    op.drop_table("users")
