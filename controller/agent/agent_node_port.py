"""The agent's channels to the controller's node port beside the node stream (mutual TLS):
package downloads (:meth:`_NodePort.fetch_package`), long statements' text
(:meth:`_NodePort.fetch_statement`), shard result pushes
(:meth:`_NodePort.open_shard_push`) and chunk transfers
(:meth:`_NodePort.storage_channel`), each bulk transfer on a TCP connection of its
own so that heartbeats never queue behind it.

A command relayed from another controller (several controllers sharing a store:
controller/nodes/relay.py) names that controller's node port in ``reply_to``: the
calls the command makes (its rows, its log lines, its chunks, its statement's text, its
package) go there, to the controller that asked, instead of to the one holding the
stream. The command's task carries it in :data:`REPLY_TO` (tasks it starts inherit it).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any

import grpc
from automator67.v1 import node_pb2, node_pb2_grpc

from controller.agent.agent_config import TARGET_NAME_OVERRIDE, _AgentState, keepalive_options
from controller.agent.identity import Enrollment
from controller.limits import node_channel_options

REPLY_TO: ContextVar[str] = ContextVar("a67_reply_to", default="")
"""The node port of the controller that asked for the command being run ("" for the one
holding the stream): set per command by the agent (controller/agent/agent_commands.py)."""


class _NodePort(_AgentState):
    """Channels to the node port."""

    def _port(self, kind: str, limits: list[tuple[str, int]] | None = None) -> grpc.aio.Channel:
        """The channel of ``kind`` (``bulk``, ``data``, ``storage``) to the node port of the
        controller the running command answers to (:data:`REPLY_TO`), opened once."""
        enrollment = self._enrollment
        if enrollment is None:
            raise RuntimeError("the agent is not enrolled yet")
        address = REPLY_TO.get()
        if address and address != enrollment.controller_endpoint:
            channel = self._elsewhere.get((kind, address))
            if channel is None:
                channel = self._node_port_channel(
                    enrollment, own_connection=True, limits=limits, address=address
                )
                self._elsewhere[(kind, address)] = channel
            return channel
        current: grpc.aio.Channel | None = getattr(self, f"_{kind}")
        if current is None:
            current = self._node_port_channel(enrollment, own_connection=True, limits=limits)
            setattr(self, f"_{kind}", current)
        return current

    def storage_channel(self, message_options: list[tuple[str, int]]) -> grpc.aio.Channel:
        """A channel of its own to the node port for chunk transfers (controller/agent/chunks.py),
        with its own message limits."""
        return self._port("storage", message_options)

    def _node_port_channel(
        self,
        enrollment: Enrollment,
        *,
        own_connection: bool = False,
        limits: list[tuple[str, int]] | None = None,
        address: str = "",
    ) -> grpc.aio.Channel:
        """A mutual-TLS channel to the node port (``address``: another controller's), with
        the shared message limits."""
        credentials = grpc.ssl_channel_credentials(
            root_certificates=enrollment.ca_certificate_pem,
            private_key=self.identity.private_key_pem(),
            certificate_chain=enrollment.certificate_pem,
        )
        options: list[tuple[str, Any]] = [
            ("grpc.ssl_target_name_override", TARGET_NAME_OVERRIDE),
            *keepalive_options(self._interval_ms),
            *(limits if limits is not None else node_channel_options()),
        ]
        if own_connection:  # bulk transfers get their own TCP connection: heartbeats never queue behind them
            options.append(("grpc.use_local_subchannel_pool", 1))
        return grpc.aio.secure_channel(
            address or enrollment.controller_endpoint, credentials, options=options
        )

    async def fetch_package(self, sha256: str, offset: int) -> AsyncIterator[node_pb2.FetchPackageResponse]:
        """Chunks of package ``sha256`` from ``offset`` (``NodeService.FetchPackage``, on a
        connection of its own beside the node stream)."""
        call = node_pb2_grpc.NodeServiceStub(self._port("bulk")).FetchPackage(
            node_pb2.FetchPackageRequest(sha256=sha256, offset=offset)
        )
        try:
            async for chunk in call:
                yield chunk
        finally:
            call.cancel()

    async def fetch_statement(self, ref: node_pb2.StatementRef) -> str:
        """The text of a long shard statement (``NodeService.FetchStatement``, on the data
        connection), checked against its size and SHA-256."""
        call = node_pb2_grpc.NodeServiceStub(self._port("data")).FetchStatement(
            node_pb2.FetchStatementRequest(id=ref.id)
        )
        pieces: list[bytes] = []
        size = 0
        async for piece in call:
            size += len(piece.data)
            if size > ref.size:
                call.cancel()
                break
            pieces.append(piece.data)
        data = b"".join(pieces)
        if size != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
            raise ValueError(f"the statement text {ref.id} arrived damaged ({size} of {ref.size} bytes)")
        return data.decode()

    async def fetch_node_credentials(
        self, request: node_pb2.FetchNodeCredentialsRequest
    ) -> node_pb2.FetchNodeCredentialsResponse:
        """The node's provider token, HPKE-sealed to its key (``NodeService.FetchNodeCredentials``,
        on the data connection; opened by :mod:`controller.agent.credentials`)."""
        response: node_pb2.FetchNodeCredentialsResponse = await node_pb2_grpc.NodeServiceStub(
            self._port("data")
        ).FetchNodeCredentials(request, timeout=30)
        return response

    def open_shard_push(self) -> Any:
        """A ``NodeService.PushShardResult`` call (the rows of a shard statement), on a
        connection of its own beside the node stream (controller/agent/shards.py)."""
        return node_pb2_grpc.NodeServiceStub(self._port("data")).PushShardResult()

    def open_log_push(self) -> Any:
        """A ``NodeService.PushReplicaLogs`` call (replicas' log lines, controller/agent/replica_logs.py),
        on the data connection beside the node stream."""
        return node_pb2_grpc.NodeServiceStub(self._port("data")).PushReplicaLogs()
