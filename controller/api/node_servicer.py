"""``automator67.v1.NodeService``: enrollment, registration, the node stream, node management."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeAlias

import grpc
from automator67.v1 import common_pb2, node_pb2, node_pb2_grpc

from controller.api import storage_servicer as storage_rpcs
from controller.api.context import current_principal
from controller.api.http import set_http_status
from controller.credentials.service import NodeCredentialsService
from controller.deployments.alerts import MASS_FAILURE, Alerts
from controller.deployments.logs import ReplicaLogSlots
from controller.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from controller.federation.results import ShardResults
from controller.federation.storage import StorageService
from controller.nodes.ca import CertificateAuthority
from controller.nodes.enrollment import EnrollmentTokens
from controller.nodes.fleet import STATUS_ENUM, Fleet
from controller.nodes.health import NodeState, UndrainRequested
from controller.nodes.registration import NodeRegistrar
from controller.nodes.repository import NodeRepository
from controller.nodes.sessions import NodeSession
from controller.nodes.validation import hello_violations
from controller.nodes.watch import SNAPSHOT_PAGE, NodeWatch
from controller.store.models import Node
from controller.timestamps import timestamp

log = logging.getLogger("a67.nodes")

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

# How long a new stream may take to send its hello.
HELLO_TIMEOUT_SECONDS = 10.0
# At most this many field violations are reported for one invalid hello.
MAX_HELLO_VIOLATIONS = 20
# How long a node's row check (not removed, the certificate's serial still its own) is
# trusted for its calls other than Connect: a node fetching a file's chunks makes one call
# per chunk. This controller forgets it at once when it deregisters the node; a removal or
# new certificate by another controller is seen within this bound.
NODE_CHECK_SECONDS = 5.0
# Node rows remembered for that, at most (the oldest is forgotten first).
NODE_CHECK_MAX = 32_768
# WatchNodes: a node's metrics updates at most this often (default, and the least allowed).
WATCH_METRICS_INTERVAL_MS = 5000
MIN_WATCH_METRICS_INTERVAL_MS = 1000

PROVIDER_NAMES = {
    value: name.removeprefix("PROVIDER_").lower() for name, value in common_pb2.Provider.items()
}
PROVIDER_VALUES = {name: value for value, name in PROVIDER_NAMES.items()}


class NodeServicer(node_pb2_grpc.NodeServiceServicer):
    def __init__(
        self,
        *,
        fleet: Fleet,
        nodes: NodeRepository,
        enrollment: EnrollmentTokens,
        registrar: NodeRegistrar,
        ca: CertificateAuthority,
        heartbeat_interval_ms: int,
        deployments_on: Callable[[str], Awaitable[int]] | None = None,
        serve_package: Callable[[str, str, int], AsyncIterator[tuple[int, bytes, int]]] | None = None,
        storage: StorageService | None = None,
        shard_results: ShardResults | None = None,
        alerts: Alerts | None = None,
        credentials: NodeCredentialsService | None = None,
        replica_logs: ReplicaLogSlots | None = None,
        watch: NodeWatch | None = None,
        controller_endpoints: Callable[[], tuple[int, Sequence[str]]] | None = None,
    ) -> None:
        self._fleet = fleet
        self._controller_endpoints = controller_endpoints
        """``(version, every live controller's node port)``: told to nodes in their hello's
        answer, and again in a heartbeat's answer when the version changed."""
        self._nodes = nodes
        self._enrollment = enrollment
        self._registrar = registrar
        self._ca = ca
        self._interval_ms = heartbeat_interval_ms
        self._deployments_on = deployments_on
        self._serve_package = serve_package
        self._storage = storage
        self._shard_results = shard_results
        self._replica_logs = replica_logs  # replicas' log lines (controller/deployments/logs.py)
        self._alerts = alerts
        self._credentials = credentials  # provider tokens (controller/credentials/)
        self._watch = watch or NodeWatch(fleet)  # WatchNodes (controller/nodes/watch.py)
        self.clock: Callable[[], float] = time.monotonic
        """Times the node row checks (:data:`NODE_CHECK_SECONDS`)."""
        # node id -> (certificate serial, when checked, the row): see _calling_node
        self._checked: dict[str, tuple[str, float, Node]] = {}

    # -- user RPCs ----------------------------------------------------------------------

    async def CreateEnrollmentToken(
        self, request: node_pb2.CreateEnrollmentTokenRequest, context: Context
    ) -> node_pb2.CreateEnrollmentTokenResponse:
        issued = await self._enrollment.create(
            current_principal().user_id, ttl_seconds=request.ttl_seconds, max_uses=request.max_uses
        )
        await set_http_status(context, 201)
        return node_pb2.CreateEnrollmentTokenResponse(
            token=issued.token, expires_at=timestamp(issued.expires_at), max_uses=issued.max_uses
        )

    async def ListNodes(
        self, request: node_pb2.ListNodesRequest, context: Context
    ) -> node_pb2.ListNodesResponse:
        nodes, next_token = await self._nodes.list_for_user(
            current_principal().user_id, request.page_size, request.page_token
        )
        return node_pb2.ListNodesResponse(nodes=await self._render(nodes), next_page_token=next_token)

    async def _render(self, nodes: Sequence[Node]) -> list[node_pb2.Node]:
        """The nodes as ListNodes and WatchNodes return them."""
        protos = [await self._to_proto(node) for node in nodes]
        if self._credentials is not None:  # the same summary as GetNode's: never the token
            summaries = await self._credentials.describe_many(nodes)
            for proto in protos:
                proto.credentials.CopyFrom(summaries[proto.id])
        return protos

    async def WatchNodes(
        self, request: node_pb2.WatchNodesRequest, context: Context
    ) -> AsyncIterator[node_pb2.WatchNodesResponse]:
        """The caller's nodes, then their changes (controller/nodes/watch.py)."""
        interval_ms = request.min_metrics_interval_ms or WATCH_METRICS_INTERVAL_MS
        if interval_ms < MIN_WATCH_METRICS_INTERVAL_MS:
            raise InvalidArgument(
                f"min_metrics_interval_ms must be at least {MIN_WATCH_METRICS_INTERVAL_MS}",
                field_violations=[
                    FieldViolation(
                        "min_metrics_interval_ms", f"must be 0 or at least {MIN_WATCH_METRICS_INTERVAL_MS}"
                    )
                ],
            )
        user_id = current_principal().user_id
        only = (await self._owned(request.node_id)).id if request.node_id else ""

        async def snapshot() -> AsyncIterator[Sequence[Node]]:
            if only:
                node = await self._nodes.get_for_user(user_id, only)
                if node is not None:
                    yield [node]
                return
            token = ""
            while True:
                page, token = await self._nodes.list_for_user(user_id, SNAPSHOT_PAGE, token)
                yield page
                if not token:
                    return

        async def load(node_id: str) -> Node | None:
            return await self._nodes.get_for_user(user_id, node_id)

        async for response in self._watch.watch(
            user_id,
            node_id=only,
            min_interval=interval_ms / 1000,
            snapshot=snapshot,
            load=load,
            render=self._render,
            render_live=self._to_proto,
        ):
            yield response

    async def GetNode(self, request: node_pb2.GetNodeRequest, context: Context) -> node_pb2.GetNodeResponse:
        node = await self._owned(request.node_id)
        proto = await self._to_proto(node)
        if self._credentials is not None:
            proto.credentials.CopyFrom(await self._credentials.describe(node))
        return node_pb2.GetNodeResponse(node=proto)

    # -- provider tokens (controller/credentials/service.py) --------------------------

    def _credentials_service(self) -> NodeCredentialsService:
        if self._credentials is None:
            raise FailedPrecondition(
                "This controller manages no node credentials", reason="CREDENTIALS_UNAVAILABLE"
            )
        return self._credentials

    async def UpdateNodeCredentials(
        self, request: node_pb2.UpdateNodeCredentialsRequest, context: Context
    ) -> node_pb2.UpdateNodeCredentialsResponse:
        return await self._credentials_service().update(await self._owned(request.node_id), request)

    async def RevokeNodeCredentials(
        self, request: node_pb2.RevokeNodeCredentialsRequest, context: Context
    ) -> node_pb2.RevokeNodeCredentialsResponse:
        return await self._credentials_service().revoke(await self._owned(request.node_id))

    async def FetchNodeCredentials(
        self, request: node_pb2.FetchNodeCredentialsRequest, context: Context
    ) -> node_pb2.FetchNodeCredentialsResponse:
        """The calling node's own provider token, HPKE-sealed to its certificate's key."""
        node = await self._calling_node(context, "FetchNodeCredentials")
        return await self._credentials_service().fetch(node, request, context.auth_context())

    async def DrainNode(
        self, request: node_pb2.DrainNodeRequest, context: Context
    ) -> node_pb2.DrainNodeResponse:
        node = await self._owned(request.node_id)
        if node.id in self._fleet.monitor:
            await self._fleet.drain(node.id)
        else:
            await self._nodes.update_status(node.id, str(NodeState.DRAINING), now=None)
        return node_pb2.DrainNodeResponse(node=await self._to_proto(await self._owned(node.id)))

    async def UndrainNode(
        self, request: node_pb2.UndrainNodeRequest, context: Context
    ) -> node_pb2.UndrainNodeResponse:
        node = await self._owned(request.node_id)
        if node.status == str(NodeState.REMOVED):
            raise FailedPrecondition(f"Node {node.id} was deregistered", reason="NODE_REMOVED")
        if node.id in self._fleet.monitor:
            self._fleet.monitor.observe(node.id, UndrainRequested(at=self._fleet.clock()))
            await self._fleet.monitor.flush()  # the state change is stored before the answer
        elif node.status == str(NodeState.DRAINING):
            await self._nodes.update_status(node.id, str(NodeState.INITIALIZING), now=None)
        log.info("node %s undrained", node.id)
        return node_pb2.UndrainNodeResponse(node=await self._to_proto(await self._owned(node.id)))

    async def ListAlerts(
        self, request: node_pb2.ListAlertsRequest, context: Context
    ) -> node_pb2.ListAlertsResponse:
        alerts = self._alerts_store()
        rows, next_token = await alerts.page(
            current_principal().user_id, request.page_size, request.page_token
        )
        return node_pb2.ListAlertsResponse(
            alerts=[alerts.to_proto(row) for row in rows], next_page_token=next_token
        )

    async def UnfreezeRecovery(
        self, request: node_pb2.UnfreezeRecoveryRequest, context: Context
    ) -> node_pb2.UnfreezeRecoveryResponse:
        user_id = current_principal().user_id
        monitor = self._fleet.monitor
        failed = sorted(
            node_id
            for node_id, health in monitor.nodes_of(user_id).items()
            if health.state is NodeState.FAILED
        )
        was_frozen = monitor.unfreeze(user_id)
        if was_frozen:
            log.info("user %s lifted the recovery freeze (%d failed nodes)", user_id, len(failed))
            await self._alerts_store().resolve(user_id, MASS_FAILURE)
            await monitor.flush()  # the recovery hook runs for every node still failed
        return node_pb2.UnfreezeRecoveryResponse(
            was_frozen=was_frozen, recovering_node_ids=failed if was_frozen else []
        )

    def _alerts_store(self) -> Alerts:
        if self._alerts is None:
            raise NotFound("This controller keeps no alerts", reason="ALERTS_UNAVAILABLE")
        return self._alerts

    async def DeregisterNode(
        self, request: node_pb2.DeregisterNodeRequest, context: Context
    ) -> node_pb2.DeregisterNodeResponse:
        node = await self._owned(request.node_id)
        await self._nodes.mark_removed(node.id, None)
        self._checked.pop(node.id, None)
        await self._fleet.remove(node.id)
        log.info("node %s deregistered", node.id)
        return node_pb2.DeregisterNodeResponse()

    # -- node RPCs ----------------------------------------------------------------------

    async def RegisterNode(
        self, request: node_pb2.RegisterNodeRequest, context: Context
    ) -> node_pb2.RegisterNodeResponse:
        response = await self._registrar.register(request)
        node = await self._nodes.get(response.node_id)
        if node is not None:
            self._fleet.track(node.id, node.user_id)
            self._watch.registered(node.id, node.user_id)
        await set_http_status(context, 201)
        return response

    async def _calling_node(self, context: Context, method: str, *, fresh: bool = False) -> Node:
        """The node whose client certificate made this call (mutual TLS on the node port).

        The certificate's verification is remembered by the CA (per certificate: a
        node's connection presents the same one on every call), and the node's row check
        for :data:`NODE_CHECK_SECONDS` (``fresh``: read the row whatever is remembered, as
        Connect does)."""
        identity = self._ca.node_id_from_auth_context(context.auth_context())
        if identity is None:
            raise Unauthenticated(
                f"{method} needs the node's client certificate: use the node port (mutual TLS)",
                reason="NODE_CERTIFICATE_REQUIRED",
            )
        node_id, serial = identity
        now = self.clock()
        checked = self._checked.get(node_id)
        if (
            not fresh
            and checked is not None
            and checked[0] == serial
            and now - checked[1] < NODE_CHECK_SECONDS
        ):
            return checked[2]
        node = await self._nodes.get(node_id)
        if node is None or node.status == str(NodeState.REMOVED) or node.cert_serial != serial:
            self._checked.pop(node_id, None)
            raise PermissionDenied(
                "This node certificate is no longer accepted", reason="NODE_CERTIFICATE_REVOKED"
            )
        self._checked.pop(node_id, None)  # re-inserted last: the oldest check is forgotten first
        if len(self._checked) >= NODE_CHECK_MAX:
            del self._checked[next(iter(self._checked))]
        self._checked[node_id] = (serial, now, node)
        return node

    async def FetchPackage(
        self, request: node_pb2.FetchPackageRequest, context: Context
    ) -> AsyncIterator[node_pb2.FetchPackageResponse]:
        """A package in chunks, to a node that runs (or is being given) one of its replicas."""
        node = await self._calling_node(context, "FetchPackage")
        if self._serve_package is None:
            raise PermissionDenied("This controller serves no packages", reason="PACKAGE_NOT_ASSIGNED")
        async for offset, data, total in self._serve_package(node.id, request.sha256, request.offset):
            yield node_pb2.FetchPackageResponse(offset=offset, data=data, total_size=total)

    def _storage_service(self) -> StorageService:
        if self._storage is None:
            raise PermissionDenied("This controller stores no files", reason="CHUNK_TRANSFER_UNKNOWN")
        return self._storage

    async def FetchChunk(  # type: ignore[override]
        self, request: node_pb2.FetchChunkRequest, context: Context
    ) -> AsyncIterator[bytes]:
        """Storage: the ciphertext of a chunk this node was told to store (serialized
        ``FetchChunkResponse`` messages: storage_rpcs.raw_storage_messages)."""
        node = await self._calling_node(context, "FetchChunk")
        async for message in storage_rpcs.fetch_chunk(self._storage_service(), node.id, request):
            yield message

    async def PushChunk(
        self, request_iterator: AsyncIterator[node_pb2.PushChunkRequest], context: Context
    ) -> node_pb2.PushChunkResponse:
        """Storage: the ciphertext of a chunk this node was told to send."""
        node = await self._calling_node(context, "PushChunk")
        return await storage_rpcs.push_chunk(self._storage_service(), node.id, request_iterator)

    async def ReportChunks(
        self, request_iterator: AsyncIterator[node_pb2.ReportChunksRequest], context: Context
    ) -> node_pb2.ReportChunksResponse:
        """Storage: the node's inventory of copies, or its scrubber's findings."""
        node = await self._calling_node(context, "ReportChunks")
        return await storage_rpcs.report_chunks(self._storage_service(), node.id, request_iterator)

    async def PushShardResult(
        self, request_iterator: AsyncIterator[node_pb2.PushShardResultRequest], context: Context
    ) -> node_pb2.PushShardResultResponse:
        """The rows of a shard statement this node was sent (controller/federation/results.py)."""
        node = await self._calling_node(context, "PushShardResult")
        if self._shard_results is None:
            raise NotFound("This controller runs no shard statements", reason="SHARD_RESULT_UNKNOWN")
        if not await self._shard_results.receive(node.id, request_iterator):
            await context.abort(grpc.StatusCode.CANCELLED, "The rows are no longer needed")
        return node_pb2.PushShardResultResponse()

    async def PushReplicaLogs(
        self, request_iterator: AsyncIterator[node_pb2.PushReplicaLogsRequest], context: Context
    ) -> node_pb2.PushReplicaLogsResponse:
        """The log lines of replicas this node was asked for (controller/deployments/logs.py)."""
        node = await self._calling_node(context, "PushReplicaLogs")
        if self._replica_logs is None:
            raise NotFound("This controller reads no logs", reason="REPLICA_LOGS_UNKNOWN")
        if not await self._replica_logs.receive(node.id, request_iterator):
            await context.abort(grpc.StatusCode.CANCELLED, "The lines are no longer needed")
        return node_pb2.PushReplicaLogsResponse()

    async def FetchStatement(
        self, request: node_pb2.FetchStatementRequest, context: Context
    ) -> AsyncIterator[node_pb2.FetchStatementResponse]:
        """The text of a long shard statement sent to this node (controller/nodes/statements.py)."""
        node = await self._calling_node(context, "FetchStatement")
        for piece in self._fleet.streams.statements.pieces(node.id, request.id):
            yield node_pb2.FetchStatementResponse(data=piece)

    async def Connect(
        self, request_iterator: AsyncIterator[node_pb2.ConnectRequest], context: Context
    ) -> AsyncIterator[node_pb2.ConnectResponse]:
        node = await self._calling_node(context, "Connect", fresh=True)
        try:
            first = await asyncio.wait_for(anext(aiter(request_iterator)), HELLO_TIMEOUT_SECONDS)
        except (TimeoutError, StopAsyncIteration) as exc:
            raise InvalidArgument("A node stream must start with a hello", reason="HELLO_EXPECTED") from exc
        if first.WhichOneof("message") != "hello":
            raise InvalidArgument("A node stream must start with a hello", reason="HELLO_EXPECTED")
        # Refused before the stream is accepted: an older stream of the node is not
        # replaced, and nothing the hello claims reaches the fleet or placement.
        violations = hello_violations(first.hello)[:MAX_HELLO_VIOLATIONS]
        if violations:
            summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
            log.warning("node %s: hello refused: %s", node.id, summary)
            raise InvalidArgument(
                f"The node's hello is invalid: {summary}", reason="INVALID_HELLO", field_violations=violations
            )

        self._fleet.track(node.id, node.user_id)
        session = self._fleet.streams.open(node.id, node.user_id)
        self._fleet.set_capabilities(node.id, first.hello.capabilities)
        self._fleet.stream_connected(node.id)
        self._fleet.replicas_reported(node.id, first.hello.replicas, complete=True)
        log.info("node %s connected (generation %d)", node.id, session.generation)
        hello_ack = node_pb2.HelloAck(generation=session.generation, heartbeat_interval_ms=self._interval_ms)
        if self._controller_endpoints is not None:
            session.endpoints_told, endpoints = self._controller_endpoints()
            hello_ack.controller_endpoints.extend(endpoints)
        yield node_pb2.ConnectResponse(hello_ack=hello_ack)
        # One reader task per stream: it acknowledges each heartbeat itself with
        # context.write (no queue, no second task woken per heartbeat); this loop writes
        # the commands queued by other tasks. The session's write lock keeps the two from
        # writing at once (gRPC allows one write in flight per call).
        reader = asyncio.create_task(self._read(session, request_iterator, context))
        try:
            while True:
                message = await session.outbound.get()
                if message is None:
                    break
                async with session.write_lock:
                    yield message  # resumed only once gRPC has sent it
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            reason = session.close_reason or "stream ended"
            if self._fleet.streams.release(session, reason) and reason != "controller draining":
                self._fleet.stream_broken(node.id)
            log.info("node %s stream closed (generation %d): %s", node.id, session.generation, reason)

    async def _read(
        self, session: NodeSession, requests: AsyncIterator[node_pb2.ConnectRequest], context: Context
    ) -> None:
        """Consume what the node sends until its stream ends or is replaced; ack heartbeats.

        Per heartbeat: memory only (:meth:`Fleet.heartbeat`), no task, no store, and the
        ack written directly (next request read once it is sent: back-pressure)."""
        fleet = self._fleet
        node_id = session.node_id
        endpoints = self._controller_endpoints
        try:
            async for request in requests:
                if not fleet.streams.is_current(session):
                    return  # a replaced stream: anything it still sends is stale
                kind = request.WhichOneof("message")
                if kind == "heartbeat":
                    heartbeat = request.heartbeat
                    if heartbeat.HasField("rtt_ms"):  # the node's own timing of the last ack
                        session.record_rtt(heartbeat.rtt_ms)
                    state = fleet.heartbeat(node_id, heartbeat.metrics)
                    if heartbeat.replicas:
                        fleet.replicas_reported(node_id, heartbeat.replicas, complete=False)
                    ack = node_pb2.ConnectResponse(
                        heartbeat_ack=node_pb2.HeartbeatAck(
                            sequence=heartbeat.sequence, status=STATUS_ENUM[state]
                        )
                    )
                    if endpoints is not None and endpoints()[0] != session.endpoints_told:
                        session.endpoints_told, listed = endpoints()  # the controllers changed
                        ack.heartbeat_ack.controller_endpoints.extend(listed)
                    if session.closed.is_set():
                        return
                    async with session.write_lock:
                        await context.write(ack)
                elif kind == "result":
                    session.resolve(request.result)
            session.close("node closed its stream")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the transport broke, or a bug: never take the server down
            log.warning("node %s stream failed", session.node_id, exc_info=True)
            session.close(f"stream error: {type(exc).__name__}")

    # -- helpers ------------------------------------------------------------------------

    async def _owned(self, node_id: str) -> Node:
        """The caller's node; another user's node looks exactly like a missing one."""
        node = await self._nodes.get_for_user(current_principal().user_id, node_id) if node_id else None
        if node is None:
            raise NotFound(f"Node {node_id!r} was not found", reason="NODE_NOT_FOUND")
        return node

    async def _to_proto(self, node: Node) -> node_pb2.Node:
        live = self._fleet.live.get(node.id)
        state = self._fleet.state_of(node.id)
        status = STATUS_ENUM.get(state) if state else None
        if status is None:
            status = STATUS_ENUM.get(NodeState(node.status), common_pb2.NODE_STATUS_UNSPECIFIED)
        capabilities = common_pb2.NodeCapabilities(**(node.capabilities or {}))
        metrics = live.metrics if live else common_pb2.NodeMetrics(**(node.metrics_current or {}))
        deployments = await self._deployments_on(node.id) if self._deployments_on else 0
        return node_pb2.Node(
            id=node.id,
            user_id=node.user_id,
            provider=PROVIDER_VALUES.get(node.provider, common_pb2.PROVIDER_UNSPECIFIED),
            endpoint=node.endpoint,
            region=node.region or "",
            status=status,
            capabilities=capabilities,
            metrics=metrics,
            deployments=deployments,
            created_at=timestamp(node.created_at),
            last_heartbeat=timestamp(node.last_heartbeat),
            last_metrics_update=timestamp(node.last_metrics_update),
        )
