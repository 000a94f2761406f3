"""``NodeService.FetchNodeCredentials``: a node's current provider token, sealed to it.

Over the node port (mutual TLS) only. The calling node is the one its client
certificate names (checked by the servicer, :meth:`NodeServicer._calling_node`); asking
for another node's credentials is ``PERMISSION_DENIED``. The token is decrypted from
the vault (audited as ``node:<id>``), put in a small JSON document and sealed with HPKE
to the public key of **the certificate that made this call**
(:mod:`~controller.credentials.sealing`), so the plaintext leaves the controller only
inside a blob that the agent alone can open, and lives in the controller's memory only
for the call.

The cache entry ``oauth:token:{node_id}`` (spec §7) holds the vault ciphertext with the
token's version, state and expiry — ciphertext only — with a TTL until the expiry. A
miss, or an entry older than the ``min_version`` the node was told of, reads the store:
with the cache (Redis) down, delivery works from the store alone.

:meth:`CredentialDelivery.changed` runs when a token changes (refresh, replacement,
revocation): it drops the cache entry and, if the node's stream is on this controller,
sends it ``CredentialsChanged`` so it fetches again.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from automator67.v1 import common_pb2, node_pb2

from controller.cache.base import Cache
from controller.credentials.sealing import SUITE_NAME, SealingError, certificate_public_key, seal
from controller.credentials.states import (
    ACTIVE,
    EXPIRED,
    OAUTH_TOKEN_PURPOSE,
    REVOKED,
    CredentialStates,
    as_epoch,
)
from controller.errors import FailedPrecondition, PermissionDenied, Unauthenticated, Unavailable
from controller.nodes.sessions import StreamRegistry
from controller.store.models import Node
from controller.timestamps import timestamp
from controller.vault import Vault
from controller.vault.audit import audit_context

log = logging.getLogger("a67.credentials")

CACHE_KEY = "oauth:token:{node_id}"
NO_EXPIRY_CACHE_SECONDS = 3600.0
"""TTL of the cache entry of a token whose expiry is not known."""

STATE_ENUM = {
    ACTIVE: node_pb2.NODE_CREDENTIALS_STATE_ACTIVE,
    EXPIRED: node_pb2.NODE_CREDENTIALS_STATE_EXPIRED,
    REVOKED: node_pb2.NODE_CREDENTIALS_STATE_REVOKED,
}
PROVIDER_VALUES = {
    name.removeprefix("PROVIDER_").lower(): value for name, value in common_pb2.Provider.items()
}


def cache_key(node_id: str) -> str:
    return CACHE_KEY.format(node_id=node_id)


def effective_state(state: str, expires_at: float | None, now: float) -> str:
    """An active token past its expiry shows as expired."""
    if state == ACTIVE and expires_at is not None and expires_at <= now:
        return EXPIRED
    return state


def peer_certificate(auth_context: Mapping[str, Sequence[bytes]] | None) -> bytes:
    """The PEM client certificate of a mutual-TLS call (gRPC's auth context)."""
    certs = (auth_context or {}).get("x509_pem_cert") or []
    if not certs:
        raise Unauthenticated(
            "FetchNodeCredentials needs the node's client certificate: use the node port (mutual TLS)",
            reason="NODE_CERTIFICATE_REQUIRED",
        )
    return bytes(certs[0])


class CredentialDelivery:
    """Seals a node's token to it; keeps the ciphertext-only cache entry."""

    def __init__(
        self,
        *,
        states: CredentialStates,
        vault: Vault,
        cache: Cache,
        streams: StreamRegistry | None = None,
        load_node: Callable[[str], Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._states = states
        self._vault = vault
        self._cache = cache
        self._streams = streams
        self._load_node = load_node
        self._clock = clock

    async def fetch(
        self,
        node: Node,
        request: node_pb2.FetchNodeCredentialsRequest,
        auth_context: Mapping[str, Sequence[bytes]] | None,
    ) -> node_pb2.FetchNodeCredentialsResponse:
        if request.node_id and request.node_id != node.id:
            raise PermissionDenied(
                "A node may fetch only its own credentials", reason="NODE_CREDENTIALS_NOT_OWN"
            )
        public_key = certificate_public_key(peer_certificate(auth_context))
        entry = await self._cached(node.id)
        if entry is None or int(entry["version"]) < request.min_version:
            entry = await self._from_store(node)
        now = self._clock()
        state = effective_state(str(entry["state"]), entry["expires_at"], now)
        if state == REVOKED or not entry["ct"]:
            raise FailedPrecondition(
                f"Node {node.id} has no usable provider token ({state or 'none'}): its user must set one "
                "with UpdateNodeCredentials",
                reason="NODE_CREDENTIALS_UNAVAILABLE",
            )
        version = int(entry["version"])
        with audit_context(actor=f"node:{node.id}", reason="FetchNodeCredentials: sealed delivery"):
            token = self._vault.decrypt_str(str(entry["ct"]), owner=node.id, purpose=OAUTH_TOKEN_PURPOSE)
        document = json.dumps(
            {
                "access_token": token,
                "expires_at": entry["expires_iso"],
                "provider": entry["provider"],
                "version": version,
            }
        ).encode()
        del token
        try:
            sealed = seal(document, public_key, node.id, version)
        except SealingError as exc:  # pragma: no cover - the CA signs P-256 keys only
            raise FailedPrecondition(str(exc), reason="NODE_KEY_UNSUITABLE") from None
        finally:
            del document
        expires = entry["expires_at"]
        return node_pb2.FetchNodeCredentialsResponse(
            sealed=sealed,
            suite=SUITE_NAME,
            version=version,
            expires_at=timestamp(expires),
            provider=PROVIDER_VALUES.get(str(entry["provider"]), common_pb2.PROVIDER_UNSPECIFIED),
            state=STATE_ENUM.get(state, node_pb2.NODE_CREDENTIALS_STATE_UNSPECIFIED),
        )

    async def _cached(self, node_id: str) -> dict[str, Any] | None:
        raw = await self._cache.get(cache_key(node_id))
        if raw is None:
            return None
        try:
            entry = json.loads(raw)
        except ValueError:
            return None
        if (
            not isinstance(entry, dict)
            or not {"version", "ct", "state", "expires_at", "provider"} <= entry.keys()
        ):
            return None
        entry.setdefault("expires_iso", None)
        return entry

    async def _from_store(self, node: Node) -> dict[str, Any]:
        fresh = node
        if self._load_node is not None:  # the servicer's row may be a few seconds old
            loaded = await self._load_node(node.id)
            if loaded is not None:
                fresh = loaded
        row = await self._states.get(node.id)
        credentials = fresh.credentials or {}
        ciphertext = credentials.get("oauth_token") or ""
        expires_at = as_epoch(row.expires_at) if row is not None else None
        entry: dict[str, Any] = {
            "version": row.version if row is not None else 0,
            "ct": ciphertext if isinstance(ciphertext, str) else "",
            "state": row.state if row is not None else (ACTIVE if ciphertext else ""),
            "expires_at": expires_at,
            "expires_iso": credentials.get("oauth_expires_at"),
            "provider": credentials.get("oauth_provider") or fresh.provider,
        }
        ttl = NO_EXPIRY_CACHE_SECONDS if expires_at is None else expires_at - self._clock()
        if entry["ct"] and ttl > 0:
            await self._cache.set(cache_key(node.id), json.dumps(entry).encode(), ttl_seconds=ttl)
        return entry

    async def changed(self, node_id: str, version: int) -> None:
        """The node's token changed: drop the cache entry, tell the node if connected here."""
        await self._cache.delete(cache_key(node_id))
        session = self._streams.get(node_id) if self._streams is not None else None
        if session is None:
            return
        command = node_pb2.NodeCommand(
            command_id=str(uuid.uuid4()),
            credentials_changed=node_pb2.CredentialsChanged(version=version),
        )
        try:
            session.send(node_pb2.ConnectResponse(command=command))
        except Unavailable:
            log.info("node %s: could not announce its new credentials (stream gone)", node_id)


__all__ = ["CACHE_KEY", "CredentialDelivery", "cache_key", "effective_state", "peer_certificate"]
