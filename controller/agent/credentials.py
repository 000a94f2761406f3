"""The node's provider token on the agent: fetched sealed, opened and kept in memory only.

The controller seals the token with HPKE to the public key of the node's own client
certificate (``NodeService.FetchNodeCredentials``, node port, mutual TLS; see
``controller/credentials/sealing.py``). :class:`AgentCredentials` fetches it, opens it
with the agent's private key (``node.key``) and keeps the result in this object's
memory: it is never written to disk, put in the environment or a command line, or
logged (its ``repr`` hides it).

It fetches again when the controller announces a newer version (the
``credentials_changed`` command: :meth:`AgentCredentials.on_credentials_changed` is its
handler), when the agent starts (:meth:`refresh` once connected), and when the token
it holds is about to expire (:meth:`token`, ``margin_seconds`` before the expiry).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

import grpc
from automator67.v1 import node_pb2, node_pb2_grpc
from cryptography.hazmat.primitives.asymmetric import ec

from controller.credentials.sealing import SUITE_NAME, SealingError, open_sealed

log = logging.getLogger("a67.agent.credentials")

Fetch = Callable[[node_pb2.FetchNodeCredentialsRequest], Awaitable[node_pb2.FetchNodeCredentialsResponse]]


class CredentialsError(Exception):
    """The credentials could not be fetched or opened (the message never holds a token)."""


@dataclass(frozen=True)
class ProviderToken:
    """The node's provider token as opened; ``repr`` never shows it."""

    access_token: str = field(repr=False)
    provider: str
    version: int
    expires_at: float | None
    """Epoch seconds; None if the controller does not know."""


def channel_fetch(channel: grpc.aio.Channel) -> Fetch:
    """``FetchNodeCredentials`` on a mutual-TLS channel to the node port."""
    stub = node_pb2_grpc.NodeServiceStub(channel)

    async def fetch(request: node_pb2.FetchNodeCredentialsRequest) -> node_pb2.FetchNodeCredentialsResponse:
        response: node_pb2.FetchNodeCredentialsResponse = await stub.FetchNodeCredentials(request, timeout=30)
        return response

    return fetch


class AgentCredentials:
    """Fetches, opens and holds the node's provider token (see the module documentation)."""

    def __init__(
        self,
        *,
        node_id: str,
        private_key: ec.EllipticCurvePrivateKey,
        fetch: Fetch,
        clock: Callable[[], float] = time.time,
        margin_seconds: float = 60.0,
    ) -> None:
        self._node_id = node_id
        self._key = private_key
        self._fetch = fetch
        self._clock = clock
        self._margin = margin_seconds
        self._current: ProviderToken | None = None
        self._wanted = 0
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        held = f"version {self._current.version}" if self._current else "nothing"
        return f"AgentCredentials(node {self._node_id}, holding {held})"

    @property
    def current(self) -> ProviderToken | None:
        """The token held now (no fetch)."""
        return self._current

    def forget(self) -> None:
        """Drop the held token (the node was deregistered, or the token revoked)."""
        self._current = None

    async def token(self) -> ProviderToken:
        """A usable token: the one held, or a fresh fetch if none is held, a newer version
        was announced, or it expires within the margin."""
        current = self._current
        if (
            current is not None
            and current.version >= self._wanted
            and (current.expires_at is None or current.expires_at - self._margin > self._clock())
        ):
            return current
        return await self.refresh()

    async def refresh(self, min_version: int = 0) -> ProviderToken:
        """Fetch and open the current token (at least ``min_version``)."""
        async with self._lock:
            wanted = max(min_version, self._wanted)
            current = self._current
            if current is not None and wanted and current.version >= wanted and min_version:
                return current  # a concurrent refresh already got it
            try:
                response = await self._fetch(
                    node_pb2.FetchNodeCredentialsRequest(node_id=self._node_id, min_version=wanted)
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    self._current = None  # revoked or none: hold nothing stale
                raise CredentialsError(f"FetchNodeCredentials failed: {exc.code().name}") from None
            self._current = self._open(response)
            self._wanted = max(self._wanted, self._current.version)
            log.info("holding the provider token version %d", self._current.version)
            return self._current

    def _open(self, response: node_pb2.FetchNodeCredentialsResponse) -> ProviderToken:
        if response.suite != SUITE_NAME:
            raise CredentialsError(f"unsupported sealing suite {response.suite!r}")
        try:
            document = json.loads(open_sealed(response.sealed, self._key, self._node_id, response.version))
        except (SealingError, ValueError) as exc:
            raise CredentialsError("the sealed credentials do not open with this node's key") from exc
        token = document.get("access_token") if isinstance(document, dict) else None
        if not isinstance(token, str) or int(document.get("version", -1)) != response.version:
            raise CredentialsError("the sealed credentials are malformed")
        expires_at: float | None = None
        if isinstance(document.get("expires_at"), str):
            try:
                expires_at = datetime.fromisoformat(document["expires_at"]).timestamp()
            except ValueError:
                expires_at = None
        return ProviderToken(
            access_token=token,
            provider=str(document.get("provider", "")),
            version=int(response.version),
            expires_at=expires_at,
        )

    async def on_credentials_changed(self, command: node_pb2.NodeCommand) -> node_pb2.CommandResult:
        """The ``credentials_changed`` command: fetch the announced version."""
        version = command.credentials_changed.version
        self._wanted = max(self._wanted, version)
        try:
            await self.refresh(version)
        except CredentialsError as exc:
            return node_pb2.CommandResult(command_id=command.command_id, ok=False, error_message=str(exc))
        return node_pb2.CommandResult(command_id=command.command_id, ok=True)


__all__ = ["AgentCredentials", "CredentialsError", "ProviderToken", "channel_fetch"]
