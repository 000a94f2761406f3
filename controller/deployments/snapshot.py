"""Build a scheduling :class:`~controller.scheduling.Snapshot` from the fleet and the store.

Per node: the state the health monitor holds (the store's status if the monitor
does not know the node; a node with no open stream counts as suspect, since it
cannot receive a replica), the capabilities and node types the node announced in
its hello (the registered ones until then, or where the hello left them out), the
metrics of its last heartbeat, the smoothed round-trip time of its stream
(:meth:`NodeSession.record_rtt`), its reliability over the last 24 h
(:class:`~controller.scheduling.history.NodeHistory`, fed by the health
monitor's state changes), and the resources reserved by the replicas already
placed on it (every active assignment of the user's deployments).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping

from sqlalchemy import select

from controller.nodes.fleet import Fleet
from controller.nodes.health import Metrics, NodeState
from controller.nodes.registration import DEFAULT_NODE_TYPES
from controller.scheduling import Capabilities, NodeView, Reliability, Resources, Snapshot
from controller.scheduling.history import NodeHistory
from controller.store.db import Store
from controller.store.models import Node

STATUS_REMOVED = str(NodeState.REMOVED)


def node_types_of(node: Node, fleet: Fleet) -> frozenset[str]:
    """The node types the node serves: from its latest hello, else from its registration,
    else the default (``compute``)."""
    announced = fleet.announced.get(node.id)
    if announced is not None and announced.node_types:
        return frozenset(announced.node_types)
    registered = (node.capabilities or {}).get("node_types") or ()
    if registered:
        return frozenset(str(t) for t in registered)
    return frozenset(DEFAULT_NODE_TYPES)


def node_view(node: Node, fleet: Fleet, reserved: Resources, history: NodeHistory | None = None) -> NodeView:
    """One node as placement sees it."""
    state = fleet.state_of(node.id)
    if state is None:
        try:
            state = NodeState(node.status)
        except ValueError:
            state = NodeState.SUSPECT
    session = fleet.streams.get(node.id)
    if session is None and state in (NodeState.READY, NodeState.BUSY):
        # A node without a stream cannot receive the replica: placement sees it as suspect.
        state = NodeState.SUSPECT
    live = fleet.live.get(node.id)
    announced = fleet.announced.get(node.id)
    if announced is None and live is not None:
        announced = live.capabilities
    if announced is not None and announced.cpu_cores > 0:
        capabilities = Capabilities(
            cpu_cores=announced.cpu_cores,
            memory_gb=announced.memory_gb,
            disk_gb=announced.disk_gb,
            max_concurrent_requests=announced.max_concurrent_requests,
        )
    else:
        registered = node.capabilities or {}
        capabilities = Capabilities(
            cpu_cores=float(registered.get("cpu_cores", 0.0)),
            memory_gb=float(registered.get("memory_gb", 0.0)),
            disk_gb=float(registered.get("disk_gb", 0.0)),
            max_concurrent_requests=int(registered.get("max_concurrent_requests", 0)),
        )
    metrics = None
    if live is not None:
        m = live.metrics
        metrics = Metrics(
            cpu_percent=m.cpu_percent,
            memory_percent=m.memory_percent,
            disk_percent=m.disk_percent,
            active_requests=m.active_requests,
            error_rate=m.error_rate,
            avg_response_time_ms=m.avg_response_time_ms,
        )
    return NodeView(
        node_id=node.id,
        user_id=node.user_id,
        region=node.region or "",
        state=state,
        capabilities=capabilities,
        node_types=node_types_of(node, fleet),
        metrics=metrics,
        rtt_ms=session.last_rtt_ms if session is not None else None,
        reliability=history.reliability(node.id, fleet.clock()) if history is not None else Reliability(),
        reserved=reserved,
    )


def build_snapshot(
    user_id: str,
    nodes: Iterable[Node],
    fleet: Fleet,
    reserved: Mapping[str, Resources],
    history: NodeHistory | None = None,
) -> Snapshot:
    """The snapshot of ``user_id``'s nodes (removed ones left out)."""
    views = tuple(
        node_view(node, fleet, reserved.get(node.id, Resources()), history)
        for node in nodes
        if node.user_id == user_id and node.status != STATUS_REMOVED
    )
    return Snapshot(views, user_id=user_id)


async def user_nodes(store: Store, user_id: str) -> list[Node]:
    """The user's nodes that are not removed."""
    async with store.session() as session:
        result = await session.execute(
            select(Node).where(Node.user_id == user_id, Node.status != STATUS_REMOVED).order_by(Node.id)
        )
        return list(result.scalars())


# How long a user's node rows are reused between placements. Rows change rarely
# (registration, deregistration); everything that changes often — state, metrics,
# capabilities announced in the hello, the stream — comes from the fleet's memory, and
# a node removed meanwhile is seen as removed there.
NODE_ROWS_TTL_SECONDS = 2.0


class NodeRows:
    """The users' node rows for placement, read once per :data:`NODE_ROWS_TTL_SECONDS`.

    A burst of CreateDeployment calls shares one store read (one load in flight per
    user) instead of reading every node row once per call. The rows are read again
    at once when the number of the user's nodes the fleet monitors changes (a node
    registered); a node removed meanwhile is seen as removed through the fleet.
    """

    def __init__(self, store: Store, fleet: Fleet, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._fleet = fleet
        self._clock = clock
        self._rows: dict[str, tuple[float, int, list[Node]]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, user_id: str) -> list[Node]:
        """The user's nodes that are not removed (possibly up to the TTL old)."""
        fresh = self._fresh(user_id)
        if fresh is not None:
            return fresh
        async with self._locks.setdefault(user_id, asyncio.Lock()):
            fresh = self._fresh(user_id)
            if fresh is not None:
                return fresh
            monitored = len(self._fleet.monitor.nodes_of(user_id))
            rows = await user_nodes(self._store, user_id)
            self._rows[user_id] = (self._clock(), monitored, rows)
            return rows

    def _fresh(self, user_id: str) -> list[Node] | None:
        cached = self._rows.get(user_id)
        if cached is None:
            return None
        read_at, monitored, rows = cached
        if self._clock() - read_at >= NODE_ROWS_TTL_SECONDS:
            return None
        if monitored != len(self._fleet.monitor.nodes_of(user_id)):
            return None
        return rows
