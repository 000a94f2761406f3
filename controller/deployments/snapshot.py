"""The scheduler's view of the fleet: one :class:`NodeView` per node, kept current.

:class:`LiveFleetView` keeps, per user, a :class:`~controller.scheduling.live.LiveSnapshot`
whose node views are rebuilt one at a time when the node changes (see the class); placement
reads it without rebuilding anything. :func:`build_snapshot` builds an immutable
:class:`~controller.scheduling.Snapshot` the same way, for callers that want one.

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
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from sqlalchemy import select

from controller.nodes.fleet import Fleet
from controller.nodes.health import Metrics, NodeState
from controller.nodes.registration import DEFAULT_NODE_TYPES
from controller.scheduling import Capabilities, NodeView, Reliability, Resources, Snapshot
from controller.scheduling.history import NodeHistory
from controller.scheduling.live import LiveSnapshot
from controller.store.db import Store
from controller.store.models import Node

STATUS_REMOVED = str(NodeState.REMOVED)

log = logging.getLogger("a67.deployments")


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


def stored_metrics(stored: Mapping[str, Any]) -> Metrics | None:
    """A node's metrics as its watcher stored them (``nodes.metrics_current``); None if unusable.

    >>> stored_metrics({"cpu_percent": 10, "memory_percent": 20.5, "disk_percent": 30}).memory_percent
    20.5
    >>> stored_metrics({"cpu_percent": "x"}) is None
    True
    """
    try:
        return Metrics(
            cpu_percent=float(stored.get("cpu_percent", 0.0)),
            memory_percent=float(stored.get("memory_percent", 0.0)),
            disk_percent=float(stored.get("disk_percent", 0.0)),
            active_requests=int(stored.get("active_requests", 0)),
            error_rate=float(stored.get("error_rate", 0.0)),
            avg_response_time_ms=float(stored.get("avg_response_time_ms", 0.0)),
        )
    except (TypeError, ValueError):
        return None


def node_view(node: Node, fleet: Fleet, reserved: Resources, history: NodeHistory | None = None) -> NodeView:
    """One node as placement sees it."""
    state = fleet.state_of(node.id)
    if state is None:
        try:
            state = NodeState(node.status)
        except ValueError:
            state = NodeState.SUSPECT
    session = fleet.streams.get(node.id)
    elsewhere = session is None and fleet.watched_elsewhere(node.stream_holder)
    if session is None and not elsewhere and state in (NodeState.READY, NodeState.BUSY):
        # A node without a stream cannot receive the replica: placement sees it as suspect.
        # (One whose stream another live controller holds is commanded through it.)
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
    elif elsewhere and node.metrics_current:
        metrics = stored_metrics(node.metrics_current)  # written by its watcher (at most a minute old)
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


# How long a user's node rows are trusted by the live view before they are read again. Rows
# change rarely (registration, deregistration) and the fleet reports those nodes
# (LiveFleetView.node_changed: an unknown node makes its user's rows be read again at
# once), so this is only a safety net; everything that changes often — state, metrics,
# capabilities announced in the hello, the stream, RTT, reserved resources — reaches the
# views through the fleet's and the deployments' hooks.
NODE_ROWS_TTL_SECONDS = 60.0


def _holding(reservations: Mapping[tuple[str, int], Resources], skip: tuple[str, int] | None) -> Resources:
    total = Resources()
    for key, amount in reservations.items():
        if key != skip:
            total = total + amount
    return total


class LiveFleetView:
    """One scheduler view per node, kept current: the fleet's live view for placement.

    Per user a :class:`~controller.scheduling.live.LiveSnapshot`. A node's view is built
    again (:func:`node_view`, its score computed once there) only when something it
    shows changed, once however often it changed, just before the next placement reads
    it: the fleet calls :meth:`node_changed` on a heartbeat, a hello, a stream
    connected or broken and a removal; the deployments harness calls it on a
    state change (after recording it in the history) and :meth:`reserve` /
    :meth:`release` when an assignment starts or stops holding resources on a node.
    Placement reads the current views (:meth:`snapshot`): nothing is rebuilt per
    placement. The store is read only for a user's node rows: on the first placement,
    when the fleet reports a node the view does not know (registered meanwhile), and
    every :data:`NODE_ROWS_TTL_SECONDS`.
    """

    def __init__(
        self,
        store: Store,
        fleet: Fleet,
        history: NodeHistory | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._fleet = fleet
        self._history = history
        self._clock = clock
        self._users: dict[str, LiveSnapshot] = {}
        self._rows: dict[str, Node] = {}
        self._loaded_at: dict[str, float] = {}
        self._stale: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._dirty: dict[str, set[str]] = {}
        """Per user: nodes whose view must be built again before the next placement."""
        self._holders: dict[str, dict[tuple[str, int], Resources]] = {}
        """Per node: what each active replica placed on it reserves, by (deployment, index)."""

    # -- changes ------------------------------------------------------------------------------

    def node_changed(self, node_id: str) -> None:
        """Something placement sees of ``node_id`` may have changed: its view is built again
        before the next placement for its user reads it (a heartbeat costs a set insertion;
        a node that heartbeats ten times between two placements is rebuilt once)."""
        row = self._rows.get(node_id)
        if row is not None:
            self._dirty.setdefault(row.user_id, set()).add(node_id)
            return
        user_id = self._fleet.monitor.user_of(node_id)
        if user_id is not None and user_id in self._users:
            self._stale.add(user_id)  # a node registered since the rows were read

    def reserve(self, node_id: str, key: tuple[str, int], amount: Resources) -> None:
        """Replica ``key`` (deployment, index) holds ``amount`` on ``node_id`` from now on."""
        holders = self._holders.setdefault(node_id, {})
        if holders.get(key) == amount:
            return
        holders[key] = amount
        self.node_changed(node_id)

    def release(self, node_id: str, key: tuple[str, int]) -> None:
        """Replica ``key`` no longer holds anything on ``node_id``."""
        holders = self._holders.get(node_id)
        if holders is None or holders.pop(key, None) is None:
            return
        if not holders:
            del self._holders[node_id]
        self.node_changed(node_id)

    def reserved(self, node_id: str, skip: tuple[str, int] | None = None) -> Resources:
        """What the replicas on ``node_id`` reserve (without replica ``skip``)."""
        return _holding(self._holders.get(node_id, {}), skip)

    def _view(self, row: Node, skip: tuple[str, int] | None = None) -> NodeView:
        return node_view(row, self._fleet, self.reserved(row.id, skip), self._history)

    def _refresh(self, row: Node) -> None:
        live = self._users.get(row.user_id)
        if live is None:
            return
        view = self._view(row)
        if view.state is NodeState.REMOVED:
            live.remove(row.id)
            self._rows.pop(row.id, None)
        else:
            live.put(view)

    # -- placement ----------------------------------------------------------------------------

    async def snapshot(self, user_id: str) -> LiveSnapshot:
        """The user's live view (its node rows read first if they are not known or stale)."""
        live = self._users.get(user_id)
        if live is not None and self._fresh(user_id):
            self._apply_changes(user_id)
            return live
        async with self._locks.setdefault(user_id, asyncio.Lock()):
            live = self._users.get(user_id)
            if live is not None and self._fresh(user_id):
                return live
            self._stale.discard(user_id)
            rows = await user_nodes(self._store, user_id)
            self._loaded_at[user_id] = self._clock()
            live = self._users.setdefault(user_id, LiveSnapshot(user_id))
            known = {row.id for row in rows}
            for node in list(live.nodes):
                if node.node_id not in known:
                    live.remove(node.node_id)
                    self._rows.pop(node.node_id, None)
            self._dirty.pop(user_id, None)
            for row in rows:
                self._rows[row.id] = row
                self._refresh(row)
            return live

    def _apply_changes(self, user_id: str) -> None:
        """Build again the views of the user's nodes that changed since the last placement."""
        changed = self._dirty.pop(user_id, None)
        if not changed:
            return
        for node_id in changed:
            row = self._rows.get(node_id)
            if row is None:
                continue
            try:
                self._refresh(row)
            except Exception:
                log.exception("could not update the scheduler view of node %s", node_id)
                self._stale.add(user_id)

    def _fresh(self, user_id: str) -> bool:
        if user_id in self._stale:
            return False
        return self._clock() - self._loaded_at.get(user_id, -math.inf) < NODE_ROWS_TTL_SECONDS

    @contextlib.contextmanager
    def without(
        self, live: LiveSnapshot, skip: tuple[str, int] | None, node_id: str | None
    ) -> Iterator[None]:
        """Within the block, ``node_id``'s view leaves out replica ``skip``'s reservation (the
        replica being moved); its current view is put back afterwards. Use it without an
        ``await`` inside: the live view is shared."""
        row = self._rows.get(node_id) if node_id is not None and skip is not None else None
        if row is None or node_id not in live:
            yield
            return
        current = live.node(row.id)
        live.put(self._view(row, skip))
        try:
            yield
        finally:
            if current is not None and row.id in live:
                live.put(self._view(row))
