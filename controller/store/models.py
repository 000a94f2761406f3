"""SQLAlchemy 2 models of the store (spec §3 and §6), portable across PostgreSQL and SQLite.

Conventions:

* ids are UUID strings (``String(36)``), generated in Python so both backends agree;
* JSON columns are ``JSON`` (``JSONB`` on PostgreSQL);
* every timestamp is a :class:`UTCDateTime`: it refuses naive datetimes on the way in
  and always hands back timezone-aware UTC datetimes, also on SQLite (which keeps no
  offset);
* constraint and index names follow :data:`NAMING_CONVENTION`, so later migrations
  (batch mode on SQLite) can address them by name.

The Alembic migrations in ``migrations/versions`` create exactly this schema; a test
compares the two.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, validates
from sqlalchemy.types import TypeDecorator, TypeEngine

from controller.auth.validation import normalize_email

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time as an aware UTC datetime (the default of timestamp columns)."""
    return datetime.now(UTC)


def new_id() -> str:
    """A fresh random UUID as a string (the default of id columns)."""
    return str(uuid.uuid4())


def normalise_email(email: str) -> str:
    """The form in which emails are stored and looked up (the rule of
    :func:`controller.auth.validation.normalize_email`: NFKC and case folding before
    ``@``, IDNA A-labels after it)."""
    return normalize_email(email)


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that stores UTC and always returns aware UTC datetimes."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetimes cannot be stored: pass an aware (UTC) datetime")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            # SQLite keeps no offset: store the UTC wall time, so comparisons are correct.
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


JSONType: TypeEngine[Any] = JSON().with_variant(JSONB(), "postgresql")
"""Portable JSON: ``JSONB`` on PostgreSQL, ``JSON`` (text) elsewhere."""

ID = String(36)


class Base(DeclarativeBase):
    """Declarative base of every table of the store."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSONType,
        list[Any]: JSONType,
    }


class User(Base):
    """An account (spec §3.1). ``email`` is stored normalised (see :func:`normalise_email`)."""

    __tablename__ = "users"

    id: Mapped[str] = mapped_column(ID, primary_key=True, default=new_id)
    email: Mapped[str] = mapped_column(String(255), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_login: Mapped[datetime | None] = mapped_column(default=None)
    mfa_enabled: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())

    @validates("email")
    def _normalise_email(self, _key: str, value: str) -> str:
        return normalise_email(value)


class Node(Base):
    """A node registered by a user (spec §3.2). ``credentials`` only ever holds ciphertext."""

    __tablename__ = "nodes"
    __table_args__ = (
        UniqueConstraint("user_id", "provider", "id"),
        UniqueConstraint("user_id", "fingerprint"),
        Index(None, "status"),
        Index(None, "provider"),
        Index(None, "last_heartbeat"),
        Index(None, "user_id"),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id", ondelete="CASCADE"))
    provider: Mapped[str] = mapped_column(String(50))
    endpoint: Mapped[str] = mapped_column(String(500))
    region: Mapped[str | None] = mapped_column(String(100), default=None)
    status: Mapped[str] = mapped_column(String(50), default="initializing", server_default="initializing")
    capabilities: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics_current: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    credentials: Mapped[dict[str, Any]] = mapped_column(default=dict)
    fingerprint: Mapped[str | None] = mapped_column(String(128), default=None)
    cert_serial: Mapped[str | None] = mapped_column(String(128), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_heartbeat: Mapped[datetime | None] = mapped_column(default=None)
    last_metrics_update: Mapped[datetime | None] = mapped_column(default=None)
    stream_holder: Mapped[str | None] = mapped_column(String(64), default=None)
    """The controller (``controllers.id``) holding the node's stream, None when no stream is
    held: where its commands are relayed and who watches its health (migration 0013)."""


class Deployment(Base):
    """An application deployment (spec §3.3)."""

    __tablename__ = "deployments"
    __table_args__ = (
        UniqueConstraint("user_id", "name"),
        UniqueConstraint("user_id", "request_id"),
        Index(None, "status"),
        Index(None, "user_id"),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))
    app_type: Mapped[str] = mapped_column(String(50))
    status: Mapped[str] = mapped_column(String(50), default="pending", server_default="pending")
    manifest: Mapped[dict[str, Any]] = mapped_column()
    node_assignments: Mapped[list[Any]] = mapped_column(default=list)
    current_replicas: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    desired_replicas: Mapped[int] = mapped_column(Integer)
    endpoints: Mapped[list[Any]] = mapped_column(default=list)
    request_id: Mapped[str | None] = mapped_column(String(255), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    deployed_at: Mapped[datetime | None] = mapped_column(default=None)
    last_scaled_at: Mapped[datetime | None] = mapped_column(default=None)
    lease_owner: Mapped[str | None] = mapped_column(String(64), default=None)
    """The controller working on the deployment (a rollout, an update, a retry, a recovery),
    until ``lease_until`` (see ``controller/deployments/leases.py``); None: nobody."""
    lease_until: Mapped[datetime | None] = mapped_column(default=None)


class Alert(Base):
    """Something an operator of a user's fleet should know (see ``controller/deployments/alerts.py``).

    ``kind``: ``mass_failure`` (recovery frozen), ``rollout_failed``,
    ``update_reverted``. ``resolved_at`` is set when it stops applying (a freeze
    lifted by the user).
    """

    __tablename__ = "alerts"
    __table_args__ = (Index(None, "user_id", "created_at"),)

    id: Mapped[str] = mapped_column(ID, primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(50))
    message: Mapped[str] = mapped_column(Text)
    deployment_id: Mapped[str | None] = mapped_column(ID, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(default=None)


class DatabaseInstance(Base):
    """A user's database federated by the controller (spec §3.4)."""

    __tablename__ = "database_instances"
    __table_args__ = (
        UniqueConstraint("user_id", "name"),
        Index(None, "user_id"),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))
    provider: Mapped[str] = mapped_column(String(100))
    provider_specific_id: Mapped[str | None] = mapped_column(String(255), default=None)
    connection: Mapped[dict[str, Any]] = mapped_column()
    sharding: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    replication: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    schema_info: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_synced: Mapped[datetime | None] = mapped_column(default=None)


class DatabaseTransaction(Base):
    """A transaction on a federated database: the controller's durable decision log.

    ``state`` is ``active`` → (``preparing`` →) ``committed`` or ``aborted``; the
    ``committed`` row of a two-phase commit is the commit point. ``participants`` lists
    the shards touched, with the node each ran on (``[{"shard": 0, "node": "…"}]``),
    written before the shard is first sent a statement. ``resolved_at`` is set once
    every participant has applied the outcome; until then the recovery loop keeps
    sending it (see :mod:`controller.federation.transactions`).
    """

    __tablename__ = "database_transactions"
    __table_args__ = (
        Index(None, "user_id"),
        Index(None, "resolved_at"),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id", ondelete="CASCADE"))
    database_id: Mapped[str] = mapped_column(ID)
    distributed: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    state: Mapped[str] = mapped_column(String(20), default="active", server_default="active")
    participants: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    decided_at: Mapped[datetime | None] = mapped_column(default=None)
    resolved_at: Mapped[datetime | None] = mapped_column(default=None)
    controller_id: Mapped[str | None] = mapped_column(String(64), default=None)
    """The controller running the transaction (``controllers.id``; migration 0013): recovery
    leaves a live controller's transactions alone."""


class StorageFile(Base):
    """Metadata of a file stored across nodes (spec §3.5); its placement lives in JSON."""

    __tablename__ = "storage_files"
    __table_args__ = (
        UniqueConstraint("user_id", "path"),
        Index(None, "user_id"),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int] = mapped_column(BigInteger)
    mime_type: Mapped[str] = mapped_column(String(255), default="application/octet-stream")
    distribution: Mapped[list[Any]] = mapped_column(default=list)
    chunks: Mapped[list[Any]] = mapped_column(default=list)
    checksum: Mapped[str | None] = mapped_column(String(64), default=None)
    encryption: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    replicas: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    replication_status: Mapped[str] = mapped_column(
        String(50), default="replicating", server_default="replicating"
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    modified_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_accessed: Mapped[datetime | None] = mapped_column(default=None)
    version_id: Mapped[str | None] = mapped_column(ID, default=None)
    """The upload whose chunks the file holds now (``storage_chunks.version_id``); an
    upload to the same path replaces it in one transaction (migration 0005)."""


class StorageChunk(Base):
    """One chunk of one version of a stored file (see :mod:`controller.federation.storage`).

    ``state``: ``pending`` (its upload is running), ``live`` (its version is the file's
    current one), ``garbage`` (deleted, replaced or a broken upload; ``garbage_at`` says
    since when: its copies are removed from the nodes after the grace period).
    ``checksum`` is the SHA-256 of the ciphertext the nodes hold; ``size`` the plaintext.
    """

    __tablename__ = "storage_chunks"
    __table_args__ = (
        Index(None, "version_id"),
        Index(None, "state"),
        Index(None, "user_id"),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id", ondelete="CASCADE"))
    version_id: Mapped[str] = mapped_column(ID)
    index: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(BigInteger)
    stored_size: Mapped[int] = mapped_column(BigInteger)
    checksum: Mapped[str] = mapped_column(String(64))
    replicas: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(20), default="pending", server_default="pending")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    garbage_at: Mapped[datetime | None] = mapped_column(default=None)
    uploader: Mapped[str | None] = mapped_column(String(64), default=None)
    """The controller running the chunk's upload while it is ``pending`` (``controllers.id``;
    migration 0013): a broken upload is collected only once that controller is gone."""


class StorageChunkCopy(Base):
    """A copy of a chunk on a node: ``writing`` (sent, not yet verified) or ``ok``."""

    __tablename__ = "storage_chunk_copies"
    __table_args__ = (Index(None, "node_id"),)

    chunk_id: Mapped[str] = mapped_column(
        ID, ForeignKey("storage_chunks.id", ondelete="CASCADE"), primary_key=True
    )
    node_id: Mapped[str] = mapped_column(ID, primary_key=True)
    state: Mapped[str] = mapped_column(String(20), default="writing", server_default="writing")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RefreshTokenFamily(Base):
    """One login's chain of rotated refresh tokens; revoking it ends the whole chain."""

    __tablename__ = "refresh_token_families"
    __table_args__ = (Index(None, "user_id"),)

    id: Mapped[str] = mapped_column(ID, primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_reason: Mapped[str | None] = mapped_column(String(100), default=None)


class RefreshToken(Base):
    """One issued refresh token, by its JWT id; ``used_at`` is set once, when it is rotated."""

    __tablename__ = "refresh_tokens"
    __table_args__ = (Index(None, "family_id"), Index(None, "user_id"))

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    family_id: Mapped[str] = mapped_column(ID, ForeignKey("refresh_token_families.id", ondelete="CASCADE"))
    user_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id", ondelete="CASCADE"))
    issued_at: Mapped[datetime] = mapped_column()
    expires_at: Mapped[datetime] = mapped_column()
    used_at: Mapped[datetime | None] = mapped_column(default=None)
    replaced_by: Mapped[str | None] = mapped_column(String(64), default=None)


class AuthFailure(Base):
    """Failed login attempts counted per key (e.g. an account) in a fixed window."""

    __tablename__ = "auth_failures"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    window_started_at: Mapped[datetime] = mapped_column()
    locked_until: Mapped[datetime | None] = mapped_column(default=None)


class NodeEnrollmentToken(Base):
    """A one-or-few-use token with which a user's node registers; only its hash is stored."""

    __tablename__ = "node_enrollment_tokens"
    __table_args__ = (Index(None, "user_id"),)

    id: Mapped[str] = mapped_column(ID, primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id", ondelete="CASCADE"))
    token_hash: Mapped[str] = mapped_column(String(128), unique=True)
    expires_at: Mapped[datetime] = mapped_column()
    max_uses: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    uses: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


__all__ = [
    "NAMING_CONVENTION",
    "AuthFailure",
    "Base",
    "ControllerProcess",
    "DatabaseInstance",
    "Deployment",
    "JSONType",
    "Node",
    "NodeEnrollmentToken",
    "RefreshToken",
    "RefreshTokenFamily",
    "StorageChunk",
    "StorageChunkCopy",
    "StorageFile",
    "UTCDateTime",
    "User",
    "new_id",
    "normalise_email",
    "utcnow",
]


class DeploymentPackage(Base):
    """A built application package (spec §4.3), kept so a replica can be started again later.

    Keyed by the SHA-256 of its bytes, so deployments of identical packages share one row.
    """

    __tablename__ = "deployment_packages"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeploymentSource(Base):
    """A user's uploaded source, kept in the store when several controllers serve it
    (``A67_SCALE_OUT``): whichever controller a deployment by digest lands on writes it to
    its own disk from here. One controller alone keeps sources on its disk only."""

    __tablename__ = "deployment_sources"

    user_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class UserMfa(Base):
    """A user's TOTP authenticator (issue 16; spec §3.1 ``mfa_enabled``).

    ``secret_encrypted`` is a vault token (owner ``user:<id>``, purpose ``mfa-totp``).
    ``confirmed_at`` is set by the first valid code; until then MFA is not on.
    ``last_used_step`` is the RFC 6238 time step of the last accepted code: a code is
    accepted only for a later step (one conditional UPDATE), so each code works once.
    """

    __tablename__ = "user_mfa"

    user_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    secret_encrypted: Mapped[str] = mapped_column(Text)
    confirmed_at: Mapped[datetime | None] = mapped_column(default=None)
    last_used_step: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class MfaRecoveryCode(Base):
    """A one-time recovery code, stored as the SHA-256 of the (high-entropy) code."""

    __tablename__ = "mfa_recovery_codes"
    __table_args__ = (Index(None, "user_id"),)

    id: Mapped[str] = mapped_column(ID, primary_key=True, default=new_id)
    user_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id", ondelete="CASCADE"))
    code_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    used_at: Mapped[datetime | None] = mapped_column(default=None)


class MfaChallenge(Base):
    """The second step of a sign-in: proof that the password was right, single-use, short-lived."""

    __tablename__ = "mfa_challenges"
    __table_args__ = (Index(None, "user_id"),)

    id: Mapped[str] = mapped_column(ID, primary_key=True, default=new_id)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[str] = mapped_column(ID, ForeignKey("users.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    used_at: Mapped[datetime | None] = mapped_column(default=None)


class SecretAuditEvent(Base):
    """One decryption of a secret (never its value): append-only.

    ``user_id`` is the user whose secret it is (None for none); ``actor`` who or what
    asked (``user:<id>``, ``node:<id>``, ``controller``); ``secret_owner`` and
    ``secret_purpose`` name the secret as the vault binds it; ``reason`` says why.
    Migration 0007 adds triggers that refuse UPDATE and DELETE of its rows.
    """

    __tablename__ = "secret_audit_events"
    __table_args__ = (Index(None, "user_id", "seq"),)

    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    id: Mapped[str] = mapped_column(ID, unique=True, default=new_id)
    user_id: Mapped[str | None] = mapped_column(ID, default=None)
    actor: Mapped[str] = mapped_column(String(100))
    secret_owner: Mapped[str] = mapped_column(String(255))
    secret_purpose: Mapped[str] = mapped_column(String(255))
    key_id: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class NodeCredentialState(Base):
    """The life cycle of a node's provider OAuth token (issue 16; ``controller/credentials/``).

    The token itself (and its refresh token) stays vault-encrypted in ``nodes.credentials``;
    this row holds what is not secret. ``state``: ``active``, ``expired`` or ``revoked``.
    ``version`` grows with every change of the token (a node asks for it again when the
    controller announces a newer one). ``refresh_at`` is when the next refresh is due
    (None: not refreshable). ``lease_owner``/``lease_until`` are the refresh lease: one
    conditional UPDATE takes it, so at most one refresh per token is in flight, across
    controllers and restarts. ``last_error`` names a failure (an OAuth error code or an
    exception class), never a token.
    """

    __tablename__ = "node_credential_states"
    __table_args__ = (Index(None, "refresh_at"),)

    node_id: Mapped[str] = mapped_column(ID, ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[str] = mapped_column(ID)
    provider: Mapped[str] = mapped_column(String(50))
    state: Mapped[str] = mapped_column(String(20), default="active", server_default="active")
    version: Mapped[int] = mapped_column(BigInteger, default=1, server_default="1")
    obtained_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    refresh_at: Mapped[datetime | None] = mapped_column(default=None)
    lease_owner: Mapped[str | None] = mapped_column(String(64), default=None)
    lease_until: Mapped[datetime | None] = mapped_column(default=None)
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(String(255), default=None)
    refreshed_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ControllerProcess(Base):
    """A controller serving this store (``controller/registry.py``): which process, since when,
    last seen when, where nodes reach it. A second one refuses to start while the first is
    alive, unless both run with ``A67_SCALE_OUT`` (docs/operations.md)."""

    __tablename__ = "controllers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    instance: Mapped[str] = mapped_column(String(32))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    node_endpoint: Mapped[str | None] = mapped_column(String(255), default=None)
    """Its node port as nodes dial it (migration 0013): nodes are told every live
    controller's, and reconnect to another when theirs goes away."""


class ShardWrite(Base):
    """One write to a federated database's shard, in the order the shard's primary applied
    it: the log a stale replica is caught up from (``controller/federation/shards.py``).
    Kept in the store so that a controller restart, or another controller serving the
    next query, can still replay it. ``statements`` is one statement, or a committed
    transaction's statements in order (``transaction`` true); the newest
    ``WRITE_LOG_SIZE`` of each shard are kept."""

    __tablename__ = "shard_writes"

    database_id: Mapped[str] = mapped_column(ID, primary_key=True)
    shard_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    sequence: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    transaction: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    statements: Mapped[list[Any]] = mapped_column()
    written_at: Mapped[datetime] = mapped_column(default=utcnow)


class LoopLease(Base):
    """Who runs a fleet-wide loop (the reconciler, garbage collection, key rewrap, token
    refresh) among the controllers sharing this store, until when, and its fencing token
    (``controller/leases.py``). The token grows by one at every change of holder: work done
    under a lease is written only while the row still holds the writer's token."""

    __tablename__ = "loop_leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(64))
    token: Mapped[int] = mapped_column(BigInteger)
    acquired_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(default=utcnow)
