"""The ``node_credential_states`` rows, the refresh lease, and the schedule arithmetic.

Every write that changes a token happens in **one transaction** with the change of its
ciphertext in ``nodes.credentials``, and every write that ends a refresh is conditional
on the lease (``lease_owner``) and on the ``version`` the refresh started from. So:

* at most one refresh per token is in flight: :meth:`CredentialStates.acquire` takes
  the lease in one conditional ``UPDATE`` (free, or held past ``lease_until``); a
  controller that dies mid-refresh blocks the token only until its lease runs out;
* a refresh never overwrites a token the user replaced meanwhile (the version moved on),
  nor the work of a controller that took over an expired lease (the owner changed).

Times in and out are epoch seconds (the refresher's injected clock); the store keeps
aware UTC datetimes.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, or_, select, update

from controller.store.db import Store
from controller.store.models import Node, NodeCredentialState

ACTIVE = "active"
EXPIRED = "expired"
REVOKED = "revoked"

OAUTH_TOKEN_PURPOSE = "node-oauth-token"  # noqa: S105 - a vault purpose label
REFRESH_TOKEN_PURPOSE = "node-oauth-refresh-token"  # noqa: S105 - a vault purpose label

MAX_BACKOFF_SECONDS = 300.0


def as_datetime(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


def as_epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def refresh_time(
    obtained_at: float, expires_at: float, share: float, jitter: float, rng: random.Random
) -> float:
    """When to refresh a token obtained at ``obtained_at`` that expires at ``expires_at``:
    ``share`` of its lifetime, plus or minus up to ``jitter`` of it (uniform)."""
    lifetime = max(0.0, expires_at - obtained_at)
    fraction = share + rng.uniform(-jitter, jitter)
    return obtained_at + lifetime * min(max(fraction, 0.0), 1.0)


def retry_time(now: float, failures: int, base: float, expires_at: float | None, rng: random.Random) -> float:
    """When to retry after ``failures`` temporary failures in a row: ``base`` doubled per
    failure (at most :data:`MAX_BACKOFF_SECONDS`), ±20 % jitter; before the token's expiry
    while there is time (half the time left, at least 1 s)."""
    delay = min(base * 2.0 ** max(failures - 1, 0), MAX_BACKOFF_SECONDS) * rng.uniform(0.8, 1.2)
    if expires_at is not None and expires_at > now and now + delay >= expires_at:
        delay = max(1.0, (expires_at - now) / 2)
    return now + delay


@dataclass(frozen=True)
class Leased:
    """A token whose refresh lease this controller holds, with its ciphertexts."""

    node_id: str
    user_id: str
    provider: str
    state: str
    version: int
    failures: int
    expires_at: float | None
    credentials: dict[str, Any]


class CredentialStates:
    """Reads and writes of the token life cycle (see the module documentation)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def get(self, node_id: str) -> NodeCredentialState | None:
        async with self._store.session() as session:
            return await session.get(NodeCredentialState, node_id)

    async def get_many(self, node_ids: list[str]) -> dict[str, NodeCredentialState]:
        """The rows of these nodes (one query; a node without a row is left out)."""
        if not node_ids:
            return {}
        async with self._store.session() as session:
            rows = await session.scalars(
                select(NodeCredentialState).where(NodeCredentialState.node_id.in_(node_ids))
            )
            return {row.node_id: row for row in rows}

    async def due(self, now: float, limit: int) -> list[str]:
        """Tokens of registered nodes whose refresh is due and whose lease is free, earliest first."""
        moment = as_datetime(now)
        statement = (
            select(NodeCredentialState.node_id)
            .join(Node, Node.id == NodeCredentialState.node_id)
            .where(
                Node.status != "removed",  # a deregistered node's token is left alone
                NodeCredentialState.state.in_((ACTIVE, EXPIRED)),
                NodeCredentialState.refresh_at.is_not(None),
                NodeCredentialState.refresh_at <= moment,
                or_(NodeCredentialState.lease_until.is_(None), NodeCredentialState.lease_until <= moment),
            )
            .order_by(NodeCredentialState.refresh_at)
            .limit(limit)
        )
        async with self._store.session() as session:
            return list((await session.scalars(statement)).all())

    async def next_due(self) -> float | None:
        """The earliest scheduled refresh (leased ones included), or None."""
        statement = select(func.min(NodeCredentialState.refresh_at)).where(
            NodeCredentialState.state.in_((ACTIVE, EXPIRED)), NodeCredentialState.refresh_at.is_not(None)
        )
        async with self._store.session() as session:
            value = await session.scalar(statement)
        if value is None:
            return None
        if value.tzinfo is None:  # func.min bypasses the column type on SQLite
            value = value.replace(tzinfo=UTC)
        return value.timestamp()

    async def unscheduled(self, providers: list[str]) -> list[tuple[str, int, float, float]]:
        """Active tokens of these providers with a known expiry and a refresh token but no
        refresh scheduled (stored before their provider was configured): (node id, version,
        obtained at, expires at)."""
        if not providers:
            return []
        statement = (
            select(
                NodeCredentialState.node_id,
                NodeCredentialState.version,
                NodeCredentialState.obtained_at,
                NodeCredentialState.expires_at,
                Node.credentials,
            )
            .join(Node, Node.id == NodeCredentialState.node_id)
            .where(
                NodeCredentialState.state == ACTIVE,
                NodeCredentialState.refresh_at.is_(None),
                NodeCredentialState.expires_at.is_not(None),
                NodeCredentialState.provider.in_(providers),
            )
        )
        async with self._store.session() as session:
            rows = (await session.execute(statement)).all()
        return [
            (row.node_id, int(row.version), row.obtained_at.timestamp(), row.expires_at.timestamp())
            for row in rows
            if isinstance(row.credentials, dict) and row.credentials.get("refresh_token")
        ]

    async def schedule(self, node_id: str, version: int, refresh_at: float) -> bool:
        """Set the refresh time of a token still unscheduled at ``version``."""
        async with self._store.session() as session:
            done = await session.execute(
                update(NodeCredentialState)
                .where(
                    NodeCredentialState.node_id == node_id,
                    NodeCredentialState.version == version,
                    NodeCredentialState.refresh_at.is_(None),
                    NodeCredentialState.state == ACTIVE,
                )
                .values(refresh_at=as_datetime(refresh_at), last_error=None)
                .execution_options(synchronize_session=False)
            )
        return int(getattr(done, "rowcount", 0) or 0) == 1

    async def acquire(self, node_id: str, owner: str, now: float, lease_seconds: float) -> Leased | None:
        """Take the refresh lease of a due token (one conditional UPDATE); None if not ours."""
        moment = as_datetime(now)
        async with self._store.session() as session:
            taken = await session.execute(
                update(NodeCredentialState)
                .where(
                    NodeCredentialState.node_id == node_id,
                    NodeCredentialState.state.in_((ACTIVE, EXPIRED)),
                    NodeCredentialState.refresh_at.is_not(None),
                    NodeCredentialState.refresh_at <= moment,
                    or_(NodeCredentialState.lease_until.is_(None), NodeCredentialState.lease_until <= moment),
                )
                .values(lease_owner=owner, lease_until=as_datetime(now + lease_seconds))
                .execution_options(synchronize_session=False)
            )
            if int(getattr(taken, "rowcount", 0) or 0) != 1:
                return None
            row = (
                await session.execute(
                    select(
                        NodeCredentialState.user_id,
                        NodeCredentialState.provider,
                        NodeCredentialState.state,
                        NodeCredentialState.version,
                        NodeCredentialState.failures,
                        NodeCredentialState.expires_at,
                        Node.credentials,
                    )
                    .join(Node, Node.id == NodeCredentialState.node_id)
                    .where(NodeCredentialState.node_id == node_id)
                )
            ).one()
        return Leased(
            node_id=node_id,
            user_id=row.user_id,
            provider=row.provider,
            state=row.state,
            version=int(row.version),
            failures=int(row.failures),
            expires_at=as_epoch(row.expires_at),
            credentials=dict(row.credentials or {}),
        )

    async def complete(
        self,
        leased: Leased,
        owner: str,
        *,
        credentials: Mapping[str, Any],
        now: float,
        expires_at: float | None,
        refresh_at: float | None,
    ) -> int | None:
        """Store a refreshed token (ciphertexts in ``credentials``) and release the lease;
        the new version, or None if the lease or the version moved on (nothing written)."""
        moment = as_datetime(now)
        async with self._store.session() as session:
            done = await session.execute(
                update(NodeCredentialState)
                .where(
                    NodeCredentialState.node_id == leased.node_id,
                    NodeCredentialState.lease_owner == owner,
                    NodeCredentialState.version == leased.version,
                )
                .values(
                    state=ACTIVE,
                    version=NodeCredentialState.version + 1,
                    obtained_at=moment,
                    expires_at=as_datetime(expires_at),
                    refresh_at=as_datetime(refresh_at),
                    lease_owner=None,
                    lease_until=None,
                    failures=0,
                    last_error=None,
                    refreshed_at=moment,
                    updated_at=moment,
                )
                .execution_options(synchronize_session=False)
            )
            if int(getattr(done, "rowcount", 0) or 0) != 1:
                return None
            await session.execute(
                update(Node)
                .where(Node.id == leased.node_id)
                .values(credentials=dict(credentials))
                .execution_options(synchronize_session=False)
            )
        return leased.version + 1

    async def fail(
        self,
        leased: Leased,
        owner: str,
        *,
        now: float,
        state: str,
        refresh_at: float | None,
        failures: int,
        error: str,
    ) -> bool:
        """Record a failed refresh and release the lease; False if the lease moved on."""
        async with self._store.session() as session:
            done = await session.execute(
                update(NodeCredentialState)
                .where(
                    NodeCredentialState.node_id == leased.node_id,
                    NodeCredentialState.lease_owner == owner,
                    NodeCredentialState.version == leased.version,
                )
                .values(
                    state=state,
                    refresh_at=as_datetime(refresh_at),
                    lease_owner=None,
                    lease_until=None,
                    failures=failures,
                    last_error=error[:255],
                    updated_at=as_datetime(now),
                )
                .execution_options(synchronize_session=False)
            )
        return int(getattr(done, "rowcount", 0) or 0) == 1

    async def replace(
        self,
        node: Node,
        *,
        credentials: Mapping[str, Any],
        now: float,
        expires_at: float | None,
        refresh_at: float | None,
        state: str = ACTIVE,
        error: str | None = None,
    ) -> int:
        """Set a node's token (``UpdateNodeCredentials``, registration, revocation): its
        ciphertexts and a fresh state (lease cleared); the new version."""
        moment = as_datetime(now)
        async with self._store.session() as session:
            row = await session.get(NodeCredentialState, node.id, with_for_update=True)
            if row is None:
                row = NodeCredentialState(
                    node_id=node.id, user_id=node.user_id, provider=node.provider, version=1
                )
                session.add(row)
            else:
                row.version = row.version + 1
            row.state = state
            row.obtained_at = moment  # type: ignore[assignment]
            row.expires_at = as_datetime(expires_at)
            row.refresh_at = as_datetime(refresh_at)
            row.lease_owner = None
            row.lease_until = None
            row.failures = 0
            row.last_error = error
            row.updated_at = moment  # type: ignore[assignment]
            await session.execute(
                update(Node)
                .where(Node.id == node.id)
                .values(credentials=dict(credentials))
                .execution_options(synchronize_session=False)
            )
            version = row.version
        return int(version)


def initial_state(
    node_id: str,
    user_id: str,
    provider: str,
    *,
    now: float,
    expires_at: float | None,
    refresh_at: float | None,
) -> NodeCredentialState:
    """The state row of a token stored at registration (added in its transaction)."""
    moment = datetime.fromtimestamp(now, UTC)
    return NodeCredentialState(
        node_id=node_id,
        user_id=user_id,
        provider=provider,
        state=ACTIVE,
        version=1,
        obtained_at=moment,
        expires_at=None if expires_at is None else datetime.fromtimestamp(expires_at, UTC),
        refresh_at=None if refresh_at is None else datetime.fromtimestamp(refresh_at, UTC),
        failures=0,
        updated_at=moment,
    )


__all__ = [
    "ACTIVE",
    "EXPIRED",
    "OAUTH_TOKEN_PURPOSE",
    "REFRESH_TOKEN_PURPOSE",
    "REVOKED",
    "CredentialStates",
    "Leased",
    "as_datetime",
    "as_epoch",
    "initial_state",
    "refresh_time",
    "retry_time",
]
