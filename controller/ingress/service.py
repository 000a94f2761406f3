"""The ingress control plane inside the controller: deployments in, xDS out, traffic back.

:class:`IngressService` owns a gRPC server of its own (``xds_listen_address``, default
``127.0.0.1:50053``; no interceptor, no user authentication: it must stay on loopback or
a private network, see docs/ingress.md) hosting

* the aggregated discovery service (:mod:`controller.ingress.xds`), and
* the access-log service (:mod:`controller.ingress.traffic`).

Inputs: the deployments service calls :meth:`IngressService.deployment_changed` every
time it stores a deployment (and with ``None`` when one is deleted); node state, stream
RTT and metrics come from the fleet's memory. A loop rebuilds the routes whenever a
deployment changed, and otherwise every :data:`TICK_SECONDS` (node states change without
telling anyone); only a real difference is published, so Envoy sees a new version only
when something it routes on changed.

What is routable: an assignment ``running`` with an endpoint, on a node whose state
is routable (ready, busy, degraded, draining; :func:`controller.nodes.health.is_routable`).
A node that loses its stream is suspect at once, so a node killed outright drops out of
the endpoints within a tick of the stream breaking — long before it is declared failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from controller.ingress import traffic as traffic_module
from controller.ingress import xds as xds_module
from controller.ingress.snapshot import (
    AppRoute,
    Endpoint,
    IngressOptions,
    SnapshotBuilder,
    app_urls,
    split_endpoint,
    user_handle,
    weight_of_score,
)
from controller.ingress.traffic import Replica, TrafficStats
from controller.ingress.xds import XdsServer
from controller.nodes.health import is_routable
from controller.scheduling.score import combine, connection_score, cpu_score, latency_score, memory_score

if TYPE_CHECKING:
    from automator67.v1 import deployment_pb2

    from controller.nodes.fleet import Fleet
    from controller.store.models import Deployment
    from controller.store.repositories import UserRepository

log = logging.getLogger("a67.ingress")

TICK_SECONDS = 0.1
"""How often node states are looked at when no deployment changed."""
REBUILD_PAUSE_FACTOR = 4.0
"""After a rebuild of the routes, the loop pauses this many times as long as the rebuild took:
rebuilds take at most 1/(1 + this) of the event loop's time while deployments keep changing."""
MAX_REBUILD_PAUSE_SECONDS = 1.0
"""The longest such pause: a change is routed at most about this much later than now."""
WEIGHT_HYSTERESIS = 10
"""A node's endpoint weight changes only when its score moved by more than this (of 100)."""
WEIGHT_SECONDS = 1.0
"""How often the endpoint weights of the nodes hosting routed replicas are worked out again
(their routable state is looked at on every pass)."""
ROUTED_STATUSES = frozenset({"pending", "deploying", "running", "failing", "failed", "scaling"})
"""Deployments that have routes (every one but a deleted, ``stopped`` one). Without a
routable replica a route answers 503 from Envoy."""


@dataclass(frozen=True, slots=True)
class _Row:
    name: str
    user_id: str
    status: str
    assignments: tuple[tuple[int, str, str, str], ...]
    """(replica index, node id, status, endpoint)."""


class IngressService:
    """Routes for every deployment, served to ingress Envoys over xDS; their traffic, aggregated."""

    def __init__(
        self,
        *,
        fleet: Fleet,
        users: UserRepository,
        listen_address: str,
        options: IngressOptions,
        public_url: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fleet = fleet
        self._users = users
        self.listen_address = listen_address
        self.options = options
        self.public_url = public_url
        self.xds = XdsServer(options, clock=clock)
        self.traffic = TrafficStats(clock=clock)
        self._clock = clock
        self._rows: dict[str, _Row] = {}
        self._changed: set[str] = set()
        """Deployments whose row changed (or went) since the routes were last built."""
        self._on_node: dict[str, set[str]] = {}
        """Node id -> the routed deployments with an assignment on it."""
        self._node_seen: dict[str, tuple[bool, int]] = {}
        """Node id -> (routable, endpoint weight) as the routes were last built."""
        self._weighed_at = -float("inf")
        self._sorted: tuple[AppRoute, ...] = ()
        self._handles: dict[str, str] = {}
        self._weights: dict[str, int] = {}
        self._routes: tuple[AppRoute, ...] | None = None
        self._route_of: dict[str, AppRoute] = {}
        """The last route built per deployment: reused while it is equal, so unchanged
        deployments compare (and are looked up by the snapshot builder) by identity."""
        self._builder = SnapshotBuilder(options)
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None

    # -- inputs ----------------------------------------------------------------------------------

    def deployment_changed(self, deployment_id: str, row: Deployment | None) -> None:
        """The deployments service stored ``row`` (None: deleted). Cheap; the loop does the work."""
        before = self._rows.get(deployment_id)
        if row is None or row.status not in ROUTED_STATUSES:
            if self._rows.pop(deployment_id, None) is not None:
                self.traffic.forget_deployment(deployment_id)
            after = None
        else:
            after = self._rows[deployment_id] = _Row(
                name=row.name,
                user_id=row.user_id,
                status=row.status,
                assignments=tuple(
                    (
                        int(a["replica_index"]),
                        str(a["node_id"]),
                        str(a["status"]),
                        str(a.get("endpoint") or ""),
                    )
                    for a in row.node_assignments
                ),
            )
        was_on = {a[1] for a in before.assignments} if before is not None else set()
        now_on = {a[1] for a in after.assignments} if after is not None else set()
        for node_id in was_on - now_on:
            hosted = self._on_node.get(node_id)
            if hosted is not None:
                hosted.discard(deployment_id)
                if not hosted:  # no route points at the node any more: forget it
                    del self._on_node[node_id]
                    self._node_seen.pop(node_id, None)
                    self._weights.pop(node_id, None)
        for node_id in now_on - was_on:
            self._on_node.setdefault(node_id, set()).add(deployment_id)
        self._changed.add(deployment_id)
        self._dirty.set()

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> int:
        """Bind the xDS port, publish the first snapshot and keep it current; the bound port."""
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ]
        )
        xds_module.add_to_server(server, self.xds)
        traffic_module.add_to_server(server, self.traffic)
        self.port = server.add_insecure_port(self.listen_address)
        await server.start()
        self._server = server
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="ingress-routes")
        log.info("xDS and access logs on %s", self.address)
        return self.port

    @property
    def address(self) -> str:
        host = self.listen_address.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._server is not None:
            await self._server.stop(0.5)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), TICK_SECONDS)
            started = loop.time()
            try:
                await self.refresh()
            except Exception:  # never let one bad row stop routing updates
                log.exception("could not rebuild the ingress routes")
                await asyncio.sleep(TICK_SECONDS)
            # a rebuild costs in proportion to the deployments routed: while they keep changing
            # (a burst of creates), pause in proportion too, so routing keeps a bounded share of
            # the event loop instead of rebuilding back to back
            pause = min(MAX_REBUILD_PAUSE_SECONDS, (loop.time() - started) * REBUILD_PAUSE_FACTOR)
            await asyncio.sleep(pause)

    # -- building --------------------------------------------------------------------------------

    async def handle(self, user_id: str) -> str:
        handle = self._handles.get(user_id)
        if handle is None:
            user = await self._users.get(user_id)
            handle = user_handle(user.email if user is not None else "", user_id)
            self._handles[user_id] = handle
        return handle

    def _node_weight(self, node_id: str) -> int:
        live = self._fleet.live.get(node_id)
        session = self._fleet.streams.get(node_id)
        rtt = session.last_rtt_ms if session is not None else None
        if live is None:
            score = combine(0.5, 0.5, latency_score(rtt), 0.5, 1.0)
        else:
            m = live.metrics
            capacity = live.capabilities.max_concurrent_requests if live.capabilities is not None else 0
            score = combine(
                cpu_score(m.cpu_percent),
                memory_score(m.memory_percent),
                latency_score(rtt),
                connection_score(m.active_requests, capacity),
                1.0,
            )
        weight = weight_of_score(score)
        previous = self._weights.get(node_id)
        if previous is not None and abs(previous - weight) <= WEIGHT_HYSTERESIS:
            return previous
        self._weights[node_id] = weight
        return weight

    def _routable(self, node_id: str) -> bool:
        state = self._fleet.state_of(node_id)
        return state is None or is_routable(state)

    async def current_routes(self) -> tuple[AppRoute, ...]:
        """Every routed deployment's route, by deployment id.

        A pass costs in proportion to what changed, not to what is routed: the routes of
        deployments whose row changed, and of those on a node whose routable state or
        endpoint weight changed, are built again; every other route is the same object as
        before (and so is the tuple, when nothing changed). Weights are worked out every
        :data:`WEIGHT_SECONDS`; routable states on every pass."""
        self._dirty.clear()
        changed, self._changed = self._changed, set()
        now = self._clock()
        reweigh = now - self._weighed_at >= WEIGHT_SECONDS
        if reweigh:
            self._weighed_at = now
        seen = self._node_seen
        for node_id, hosted in self._on_node.items():
            last = seen.get(node_id)
            weight = self._node_weight(node_id) if reweigh or last is None else last[1]
            key = (self._routable(node_id), weight)
            if key != last:
                seen[node_id] = key
                changed.update(hosted)
        if not changed:
            return self._sorted
        replicas: dict[str, Replica] = {}
        current = self._route_of
        moved = False
        try:
            for deployment_id in changed:
                row = self._rows.get(deployment_id)
                if row is None:
                    moved = current.pop(deployment_id, None) is not None or moved
                    continue
                endpoints: list[Endpoint] = []
                for index, node_id, status, endpoint in row.assignments:
                    routable, weight = seen.get(node_id, (False, 0))
                    if status != "running" or not endpoint or not routable:
                        continue
                    address = split_endpoint(endpoint)
                    if address is None:
                        continue
                    endpoints.append(Endpoint(address[0], address[1], weight, node_id, index))
                    replicas[f"{address[0]}:{address[1]}"] = Replica(deployment_id, index, node_id)
                handle = self._handles.get(row.user_id)
                if handle is None:  # the store is asked once per user, not once per deployment
                    handle = await self.handle(row.user_id)
                route = AppRoute(deployment_id, row.name, handle, tuple(endpoints))
                before = current.get(deployment_id)
                if before is None or before != route:
                    current[deployment_id] = route
                    moved = True
        except BaseException:  # e.g. the store, asked for a user's handle: built again next pass
            self._changed.update(changed)
            raise
        finally:
            if moved:
                self._sorted = tuple(current[key] for key in sorted(current))
        if replicas:
            self.traffic.set_replicas(replicas)
        return self._sorted

    async def refresh(self) -> bool:
        """Rebuild the routes; publish them if they changed. True if a new version went out.

        Only the deployments whose routes changed are rebuilt (:class:`SnapshotBuilder`).
        """
        routes = await self.current_routes()
        if routes is self._routes or routes == self._routes:
            return False
        self._routes = routes
        published = self.xds.publish(self._builder.build(routes))
        if published:
            log.debug("published version %d (%d deployments)", self.xds.version, len(routes))
        return published

    # -- outputs ---------------------------------------------------------------------------------

    async def describe(self, deployment: deployment_pb2.Deployment) -> None:
        """Fill in the deployment's URLs and traffic figures (GetDeployment, ListDeployments)."""
        from automator67.v1 import deployment_pb2

        handle = await self.handle(deployment.user_id)
        route = AppRoute(deployment.id, deployment.name, handle)
        deployment.urls[:] = app_urls(route, self.options, self.public_url)
        summary = self.traffic.deployment(deployment.id)
        deployment.traffic.CopyFrom(
            deployment_pb2.DeploymentTraffic(
                requests_per_second=summary.requests_per_second,
                error_rate=summary.error_rate_percent,
                latency_p50_ms=summary.p50_ms,
                latency_p99_ms=summary.p99_ms,
                requests=summary.requests,
                window_seconds=traffic_module.WINDOW_SECONDS,
            )
        )

    def node_traffic(self, node_id: str) -> tuple[float, float] | None:
        """The node's app-traffic error rate (%) and average response time (ms), if it served enough."""
        return self.traffic.node_health(node_id)


def _deployment_id(route: AppRoute) -> str:
    return route.deployment_id


def describe_clients(service: IngressService) -> list[dict[str, Any]]:
    """The connected ingresses (for logs and tests)."""
    return [
        {
            "node_id": c.node_id,
            "listen_address": c.listen_address,
            "acked": dict(c.acked),
            "nacks": [n.message for n in c.nacks],
        }
        for c in service.xds.clients.values()
    ]
