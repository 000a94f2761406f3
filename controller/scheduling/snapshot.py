"""The read-only picture of one user's nodes that placement works on.

Placement never reads the store, the cache or a stream: the caller builds a
:class:`Snapshot` from what the fleet holds in memory (node state, capabilities,
last metrics, stream round-trip time, heartbeat and replica history, resources
reserved by replicas already placed) and hands it to
:func:`controller.scheduling.select.place`. A snapshot never changes, so
anything derived from it (scores, the placement index) is computed once and
reused by every placement over it.

Units: CPU in cores (``0.5``), memory and disk in MB where **1 MB = 1 MiB =
2^20 bytes** and 1 GB = 1024 MB, as container runtimes count them (Docker's
``512m`` is 512 MiB). Node capabilities arrive in GB (spec §3.2) and are
converted with :data:`MB_PER_GB`.

Example::

    >>> from controller.nodes.health import NodeState
    >>> node = NodeView(node_id="n1", user_id="u1", region="eu-west", state=NodeState.READY,
    ...                 capabilities=Capabilities(cpu_cores=2.0, memory_gb=1.0, disk_gb=10.0),
    ...                 reserved=Resources(cpu_cores=0.5, memory_mb=256, disk_mb=1024))
    >>> node.free_cpu_cores, node.free_memory_mb, node.free_disk_mb
    (1.5, 768.0, 9216.0)
    >>> Snapshot((node,)).node("n1") is node
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol, TypeVar, cast

from controller.nodes.health import Metrics, NodeState, is_schedulable, metrics_problem
from controller.nodes.validation import CAPABILITY_LIMITS, values_problem
from controller.scheduling.score import NodeScore, score_node

MB_PER_GB = 1024
"""Megabytes (MiB) per gigabyte (GiB): capabilities are in GB, requests in MB."""

DEFAULT_NODE_TYPE = "compute"
"""The node type a replica needs unless it says otherwise (spec §3.2 node types)."""

_T = TypeVar("_T")

PlacementRow = tuple[float, str, str, float, float, float]
"""``(-score, node_id, region, free CPU cores, free memory MB, free disk MB)``: one node
as placement's index reads it (see :attr:`NodeView.placement_row`)."""

SCHEDULABLE = frozenset(state for state in NodeState if is_schedulable(state))
"""States in which a node takes new replicas (ready, busy)."""

SENTINEL: PlacementRow = (math.nan, "", "", 0.0, 0.0, 0.0)
"""Ends every region's row list: equal to nothing, so a walk may look one row ahead."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a node offers in total (spec §3.2 ``capabilities``)."""

    cpu_cores: float
    """CPU cores of the node."""

    memory_gb: float
    """Memory of the node, in GB (GiB)."""

    disk_gb: float
    """Disk of the node, in GB (GiB)."""

    max_concurrent_requests: int = 0
    """How many requests the node serves at once; 0 means unknown, which makes the
    connection score neutral (see :mod:`controller.scheduling.score`)."""


NO_CAPABILITIES = Capabilities(cpu_cores=0.0, memory_gb=0.0, disk_gb=0.0)
"""What a node whose capabilities are invalid is taken to offer: nothing."""


def capabilities_problem(capabilities: Capabilities) -> str | None:
    """Why ``capabilities`` are invalid (see :data:`~controller.nodes.validation.CAPABILITY_LIMITS`),
    or ``None``.

    >>> capabilities_problem(Capabilities(cpu_cores=float("nan"), memory_gb=1, disk_gb=1))
    'cpu_cores is NaN'
    """
    return values_problem(
        {
            "cpu_cores": capabilities.cpu_cores,
            "memory_gb": capabilities.memory_gb,
            "disk_gb": capabilities.disk_gb,
            "max_concurrent_requests": capabilities.max_concurrent_requests,
        },
        CAPABILITY_LIMITS,
    )


@dataclass(frozen=True, slots=True)
class Resources:
    """An amount of CPU, memory and disk: what replicas reserve on a node."""

    cpu_cores: float = 0.0
    """CPU cores."""

    memory_mb: int = 0
    """Memory in MB (MiB)."""

    disk_mb: int = 0
    """Disk in MB (MiB)."""

    def __add__(self, other: Resources) -> Resources:
        return Resources(
            cpu_cores=self.cpu_cores + other.cpu_cores,
            memory_mb=self.memory_mb + other.memory_mb,
            disk_mb=self.disk_mb + other.disk_mb,
        )


@dataclass(frozen=True, slots=True)
class Reliability:
    """The history that the reliability factor is computed from (spec §4.2).

    Over one recent window (the last 24 h, or since the controller first saw the
    node, if that is later: see :mod:`controller.scheduling.history`):
    ``observed_seconds`` the node was known alive or dead, ``up_seconds`` of them
    alive (heartbeating: ready, busy, degraded or draining), and ``failures`` the
    times it became failed. No observation means no history: the factor is then 1.0.
    """

    observed_seconds: float = 0.0
    """Seconds of the window in which the node's liveness was known."""

    up_seconds: float = 0.0
    """Seconds of those in which it was alive."""

    failures: int = 0
    """Times the node became failed in the window."""

    @property
    def uptime_share(self) -> float:
        """``up / observed`` in ``[0, 1]``; 1.0 without observation."""
        if not self.observed_seconds > 0:
            return 1.0
        share = self.up_seconds / self.observed_seconds
        return 0.0 if share < 0.0 else 1.0 if share > 1.0 else share


@dataclass(frozen=True, kw_only=True)
class NodeView:
    """One node as placement sees it. Immutable; its score is computed once, on first use."""

    node_id: str
    """The node's id."""

    user_id: str
    """The owner; a snapshot holds one user's nodes only."""

    region: str
    """Where the node runs; replicas spread across regions."""

    state: NodeState
    """The health state; only ready and busy nodes take new replicas."""

    capabilities: Capabilities
    """What the node offers in total."""

    node_types: frozenset[str] = frozenset({DEFAULT_NODE_TYPE})
    """Node types it serves: ``compute``, ``database``, ``storage``."""

    metrics: Metrics | None = None
    """The metrics of its last valid heartbeat; ``None`` before the first."""

    rtt_ms: float | None = None
    """Round-trip time of heartbeat acknowledgements on its stream, in ms; ``None``
    until one has been measured."""

    reliability: Reliability = Reliability()
    """Heartbeat and replica history."""

    reserved: Resources = Resources()
    """Resources already reserved by replicas placed on the node."""

    def __post_init__(self) -> None:
        # The last guard: what a node reports is validated at the edge
        # (controller.nodes.validation), but a view never scores or places with a
        # number that is not finite and in range. Such metrics are dropped (neutral
        # factors) and such capabilities make the node offer nothing (infeasible).
        if self.metrics is not None and metrics_problem(self.metrics) is not None:
            object.__setattr__(self, "metrics", None)
        if capabilities_problem(self.capabilities) is not None:
            object.__setattr__(self, "capabilities", NO_CAPABILITIES)

    @property
    def free_cpu_cores(self) -> float:
        """CPU cores not yet reserved (may be negative if over-committed)."""
        return self.capabilities.cpu_cores - self.reserved.cpu_cores

    @property
    def free_memory_mb(self) -> float:
        """Memory in MB not yet reserved."""
        return self.capabilities.memory_gb * MB_PER_GB - self.reserved.memory_mb

    @property
    def free_disk_mb(self) -> float:
        """Disk in MB not yet reserved."""
        return self.capabilities.disk_gb * MB_PER_GB - self.reserved.disk_mb

    @cached_property
    def score(self) -> NodeScore:
        """The node's §4.2 score (see :mod:`controller.scheduling.score`), computed once."""
        return score_node(self)

    @cached_property
    def placement_row(self) -> PlacementRow:
        """The node as placement's index reads it, computed once per view (a snapshot
        rebuilt from the same views reuses it): see :data:`PlacementRow`."""
        return (
            -self.score.total,
            self.node_id,
            self.region,
            self.free_cpu_cores,
            self.free_memory_mb,
            self.free_disk_mb,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class ReplicaRequest:
    """What one replica needs from a node."""

    cpu_cores: float
    """CPU cores, e.g. 0.5."""

    memory_mb: int
    """Memory in MB (MiB)."""

    disk_mb: int
    """Disk in MB (MiB)."""

    node_type: str = DEFAULT_NODE_TYPE
    """The node type it must run on."""


@dataclass(frozen=True, eq=False)
class Snapshot:
    """An immutable set of one user's nodes.

    Construction checks the invariants placement relies on: node ids are unique,
    and every node belongs to one user (``user_id`` if given, else the first
    node's owner). A snapshot holding another user's node is a programming error
    and raises ``ValueError``: placement must never see it.
    """

    nodes: tuple[NodeView, ...]
    """The nodes, in any order (placement does not depend on it)."""

    user_id: str | None = None
    """The owner every node must have; ``None`` checks only that there is one owner."""

    _by_id: dict[str, NodeView] = field(init=False, repr=False, compare=False)
    _memo: dict[str, object] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        nodes = self.nodes if isinstance(self.nodes, tuple) else tuple(cast(Iterable[NodeView], self.nodes))
        object.__setattr__(self, "nodes", nodes)
        owner = self.user_id if self.user_id is not None else (nodes[0].user_id if nodes else None)
        strangers = [node for node in nodes if node.user_id != owner]
        if strangers:
            raise ValueError(
                f"snapshot of user {owner!r} holds node {strangers[0].node_id!r} of user {strangers[0].user_id!r}"
            )
        by_id = {node.node_id: node for node in nodes}
        if len(by_id) != len(nodes):
            seen: set[str] = set()
            for node in nodes:
                if node.node_id in seen:
                    raise ValueError(f"snapshot holds node {node.node_id!r} twice")
                seen.add(node.node_id)
        object.__setattr__(self, "_by_id", by_id)

    def __len__(self) -> int:
        return len(self.nodes)

    def node(self, node_id: str) -> NodeView | None:
        """The node with this id, or ``None``."""
        return self._by_id.get(node_id)

    def regions(self, node_type: str) -> dict[str, list[PlacementRow]]:
        """The schedulable nodes of ``node_type`` by region, best score first (see
        :func:`build_regions`), computed once per snapshot and node type."""
        return self.memo(f"regions:{node_type}", lambda s: build_regions(s.nodes, node_type))

    def room_for_all(self, request: ReplicaRequest) -> bool:
        """Whether every node in :meth:`regions` is known to have room for ``request``
        without looking; a snapshot keeps no index for it: False (the live view knows:
        :meth:`~controller.scheduling.live.LiveSnapshot.room_for_all`)."""
        return False

    def maybe_infeasible(self, request: ReplicaRequest, exclude: Collection[str]) -> list[NodeView] | None:
        """The nodes that can be infeasible for ``request``, when fewer than all of them can
        be told cheaply; a snapshot keeps no index for it: None, check every node (the live
        view narrows it: :meth:`~controller.scheduling.live.LiveSnapshot.maybe_infeasible`)."""
        return None

    def memo(self, key: str, build: Callable[[Snapshot], _T]) -> _T:
        """``build(self)``, computed once per snapshot and key (a snapshot never changes).

        Placement keeps its per-node-type index here, so many placements over one
        snapshot pay for the index once.
        """
        try:
            return cast(_T, self._memo[key])
        except KeyError:
            value = build(self)
            self._memo[key] = value
            return value


class NodeSet(Protocol):
    """What placement reads of one user's nodes: a :class:`Snapshot`, or the
    :class:`~controller.scheduling.live.LiveSnapshot` the fleet keeps current."""

    @property
    def nodes(self) -> tuple[NodeView, ...]:
        """Every node, in a stable order (rejected nodes are reported in it)."""
        ...

    def node(self, node_id: str) -> NodeView | None: ...

    def __len__(self) -> int: ...

    def regions(self, node_type: str) -> dict[str, list[PlacementRow]]:
        """See :meth:`Snapshot.regions`."""
        ...

    def maybe_infeasible(self, request: ReplicaRequest, exclude: Collection[str]) -> list[NodeView] | None:
        """See :meth:`Snapshot.maybe_infeasible`."""
        ...

    def room_for_all(self, request: ReplicaRequest) -> bool:
        """See :meth:`Snapshot.room_for_all`."""
        ...


def build_regions(nodes: Iterable[NodeView], node_type: str) -> dict[str, list[PlacementRow]]:
    """The schedulable nodes of ``node_type`` by region, each region's :attr:`NodeView.placement_row`
    tuples in ``(-score, node id)`` order (best first; a group of equal scores in node id
    order, as placement reads it), each list ended by :data:`SENTINEL`.
    """
    regions: dict[str, list[PlacementRow]] = {}
    for node in nodes:
        if node.state in SCHEDULABLE and node_type in node.node_types:
            row = node.placement_row
            rows = regions.get(row[2])
            if rows is None:
                regions[row[2]] = [row]
            else:
                rows.append(row)
    for rows in regions.values():
        rows.sort()
        rows.append(SENTINEL)
    return regions
