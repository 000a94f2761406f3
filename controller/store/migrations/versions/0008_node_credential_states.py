"""Provider-token life cycle: one row per node token (state, version, refresh lease).

Existing nodes that registered with a provider token get a row (``active``, version 1,
their stored expiry); tokens stay where they are, vault-encrypted in ``nodes.credentials``.

Revision ID: 0008
Revises: 0007
Create Date: 2027-01-20
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(36)
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    table = op.create_table(
        "node_credential_states",
        sa.Column("node_id", ID, nullable=False),
        sa.Column("user_id", ID, nullable=False),
        sa.Column("provider", sa.String(50), nullable=False),
        sa.Column("state", sa.String(20), server_default="active", nullable=False),
        sa.Column("version", sa.BigInteger(), server_default="1", nullable=False),
        sa.Column("obtained_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=True),
        sa.Column("refresh_at", TS, nullable=True),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_until", TS, nullable=True),
        sa.Column("failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_error", sa.String(255), nullable=True),
        sa.Column("refreshed_at", TS, nullable=True),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("node_id", name="pk_node_credential_states"),
        sa.ForeignKeyConstraint(
            ["node_id"], ["nodes.id"], name="fk_node_credential_states_node_id_nodes", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_node_credential_states_refresh_at", "node_credential_states", ["refresh_at"])

    bind = op.get_bind()
    nodes = sa.table(
        "nodes",
        sa.column("id", ID),
        sa.column("user_id", ID),
        sa.column("provider", sa.String(50)),
        sa.column("status", sa.String(50)),
        sa.column("credentials", sa.JSON()),
        sa.column("created_at", TS),
    )
    sqlite = bind.dialect.name == "sqlite"
    rows = []
    for node_id, user_id, provider, status, credentials, created_at in bind.execute(
        sa.select(
            nodes.c.id,
            nodes.c.user_id,
            nodes.c.provider,
            nodes.c.status,
            nodes.c.credentials,
            nodes.c.created_at,
        )
    ):
        if status == "removed" or not isinstance(credentials, dict) or not credentials.get("oauth_token"):
            continue
        expires_at = None
        raw = credentials.get("oauth_expires_at")
        if isinstance(raw, str):
            try:
                expires_at = datetime.fromisoformat(raw).astimezone(UTC)
            except ValueError:
                expires_at = None
        obtained_at = created_at if created_at is not None else datetime.now(UTC)
        if sqlite:  # SQLite keeps UTC wall times (models.UTCDateTime)
            expires_at = expires_at.replace(tzinfo=None) if expires_at else None
            obtained_at = obtained_at.replace(tzinfo=None)
        rows.append(
            {
                "node_id": node_id,
                "user_id": user_id,
                "provider": provider,
                "state": "active",
                "version": 1,
                "obtained_at": obtained_at,
                "expires_at": expires_at,
                # Due at once when refreshable: the refresher computes the real time.
                "refresh_at": obtained_at if credentials.get("refresh_token") else None,
                "failures": 0,
                "updated_at": obtained_at,
            }
        )
    if rows:
        op.bulk_insert(table, rows)


def downgrade() -> None:
    op.drop_index("ix_node_credential_states_refresh_at", table_name="node_credential_states")
    op.drop_table("node_credential_states")
