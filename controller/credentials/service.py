"""The user side of node credentials: ``UpdateNodeCredentials``, ``RevokeNodeCredentials``,
the state shown on ``GetNode``, and the node side's ``FetchNodeCredentials`` (delegated to
:class:`~controller.credentials.delivery.CredentialDelivery`).

The servicer resolves *which* node (the caller's own, else ``NOT_FOUND``; or the node of
the calling certificate) and hands it here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from automator67.v1 import common_pb2, node_pb2

from controller.credentials.delivery import (
    PROVIDER_VALUES,
    STATE_ENUM,
    CredentialDelivery,
    effective_state,
)
from controller.credentials.providers import ProviderAdapter
from controller.credentials.refresher import Refresher
from controller.credentials.states import (
    OAUTH_TOKEN_PURPOSE,
    REFRESH_TOKEN_PURPOSE,
    REVOKED,
    CredentialStates,
    as_epoch,
)
from controller.errors import FailedPrecondition, FieldViolation, require_fields
from controller.store.models import Node, NodeCredentialState
from controller.timestamps import timestamp
from controller.vault import Vault, VaultError
from controller.vault.audit import audit_context

log = logging.getLogger("a67.credentials")

MAX_TOKEN_BYTES = 8 * 1024
TOKEN_KEYS = ("oauth_token", "refresh_token", "oauth_expires_at")


def describe(row: NodeCredentialState | None, node: Node, now: float) -> node_pb2.NodeCredentials:
    """What ``GetNode`` shows of a node's token: never the token."""
    provider = PROVIDER_VALUES.get(node.provider, common_pb2.PROVIDER_UNSPECIFIED)
    if row is None:
        has_token = bool((node.credentials or {}).get("oauth_token"))
        return node_pb2.NodeCredentials(
            state=node_pb2.NODE_CREDENTIALS_STATE_ACTIVE
            if has_token
            else node_pb2.NODE_CREDENTIALS_STATE_NONE,
            provider=provider,
        )
    expires_at = as_epoch(row.expires_at)
    state = effective_state(row.state, expires_at, now)
    return node_pb2.NodeCredentials(
        state=STATE_ENUM.get(state, node_pb2.NODE_CREDENTIALS_STATE_UNSPECIFIED),
        provider=provider,
        expires_at=timestamp(row.expires_at),
        refreshed_at=timestamp(row.refreshed_at),
        next_refresh_at=timestamp(row.refresh_at),
        version=row.version,
        last_error=row.last_error or "",
        failures=row.failures,
    )


class NodeCredentialsService:
    """Replace, revoke, describe and deliver a node's provider token."""

    def __init__(
        self,
        *,
        states: CredentialStates,
        vault: Vault,
        delivery: CredentialDelivery,
        refresher: Refresher | None = None,
        adapters: Mapping[str, ProviderAdapter] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._states = states
        self._vault = vault
        self.delivery = delivery
        self._refresher = refresher
        self._adapters = adapters if adapters is not None else (refresher.adapters if refresher else {})
        self._clock = clock

    def schedule(
        self, obtained_at: float, expires_at: float | None, provider: str, refreshable: bool
    ) -> float | None:
        """When a token stored now should be refreshed (registration uses it too)."""
        if self._refresher is not None:
            return self._refresher.schedule(obtained_at, expires_at, provider, refreshable)
        return None

    async def describe(self, node: Node) -> node_pb2.NodeCredentials:
        return describe(await self._states.get(node.id), node, self._clock())

    async def describe_many(self, nodes: Sequence[Node]) -> dict[str, node_pb2.NodeCredentials]:
        """:meth:`describe` for a page of nodes (``ListNodes``), with one read of the store."""
        rows = await self._states.get_many([node.id for node in nodes])
        now = self._clock()
        return {node.id: describe(rows.get(node.id), node, now) for node in nodes}

    async def update(
        self, node: Node, request: node_pb2.UpdateNodeCredentialsRequest
    ) -> node_pb2.UpdateNodeCredentialsResponse:
        now = self._clock()
        violations: list[FieldViolation] = []
        if not request.oauth_token:
            violations.append(FieldViolation("oauth_token", "is required"))
        elif len(request.oauth_token.encode()) > MAX_TOKEN_BYTES:
            violations.append(FieldViolation("oauth_token", f"must be at most {MAX_TOKEN_BYTES} bytes"))
        if len(request.oauth_refresh_token.encode()) > MAX_TOKEN_BYTES:
            violations.append(
                FieldViolation("oauth_refresh_token", f"must be at most {MAX_TOKEN_BYTES} bytes")
            )
        expires_at: float | None = None
        if request.HasField("oauth_expires_at"):
            try:
                expires_at = request.oauth_expires_at.ToDatetime(tzinfo=UTC).timestamp()
            except (ValueError, OverflowError, OSError):
                violations.append(FieldViolation("oauth_expires_at", "is not a valid time"))
            else:
                if expires_at <= now:
                    violations.append(FieldViolation("oauth_expires_at", "must be in the future"))
        require_fields(violations, "The node credentials are invalid")
        if node.status == "removed":
            raise FailedPrecondition(f"Node {node.id} was deregistered", reason="NODE_REMOVED")
        credentials = {k: v for k, v in (node.credentials or {}).items() if k not in TOKEN_KEYS}
        credentials["oauth_provider"] = node.provider
        credentials["oauth_token"] = self._vault.encrypt_str(
            request.oauth_token, owner=node.id, purpose=OAUTH_TOKEN_PURPOSE
        )
        if request.oauth_refresh_token:
            credentials["refresh_token"] = self._vault.encrypt_str(
                request.oauth_refresh_token, owner=node.id, purpose=REFRESH_TOKEN_PURPOSE
            )
        if expires_at is not None:
            credentials["oauth_expires_at"] = datetime.fromtimestamp(expires_at, UTC).isoformat()
        refresh_at = self.schedule(now, expires_at, node.provider, bool(request.oauth_refresh_token))
        version = await self._states.replace(
            node, credentials=credentials, now=now, expires_at=expires_at, refresh_at=refresh_at
        )
        log.info("node %s: provider token replaced by its user (version %d)", node.id, version)
        await self.delivery.changed(node.id, version)
        if self._refresher is not None:
            self._refresher.wake()
        return node_pb2.UpdateNodeCredentialsResponse(credentials=await self.describe(node))

    async def revoke(self, node: Node) -> node_pb2.RevokeNodeCredentialsResponse:
        now = self._clock()
        stored = node.credentials or {}
        adapter = self._adapters.get(node.provider)
        confirmed = False
        if adapter is not None and adapter.can_revoke:
            # RFC 7009: the refresh token first (which may end its access tokens too), then
            # the access token itself.
            for key, purpose, hint in (
                ("refresh_token", REFRESH_TOKEN_PURPOSE, "refresh_token"),
                ("oauth_token", OAUTH_TOKEN_PURPOSE, "access_token"),
            ):
                ciphertext = stored.get(key)
                if not isinstance(ciphertext, str) or not ciphertext:
                    continue
                try:
                    with audit_context(reason="RevokeNodeCredentials: revocation at the provider"):
                        token = self._vault.decrypt_str(ciphertext, owner=node.id, purpose=purpose)
                except VaultError:
                    continue
                confirmed = await adapter.revoke(token, hint) or confirmed
                del token
        credentials: dict[str, Any] = {k: v for k, v in stored.items() if k not in TOKEN_KEYS}
        version = await self._states.replace(
            node,
            credentials=credentials,
            now=now,
            expires_at=None,
            refresh_at=None,
            state=REVOKED,
            error=None,
        )
        log.info("node %s: provider token revoked by its user (at the provider: %s)", node.id, confirmed)
        await self.delivery.changed(node.id, version)
        return node_pb2.RevokeNodeCredentialsResponse(
            credentials=await self.describe(node), provider_revoked=confirmed
        )

    async def fetch(
        self,
        node: Node,
        request: node_pb2.FetchNodeCredentialsRequest,
        auth_context: Mapping[str, Sequence[bytes]] | None,
    ) -> node_pb2.FetchNodeCredentialsResponse:
        return await self.delivery.fetch(node, request, auth_context)


__all__ = ["NodeCredentialsService", "describe"]
