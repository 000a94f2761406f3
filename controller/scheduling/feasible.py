"""Feasibility: which nodes can take a replica at all, and why every other one cannot.

The filters run in this order and the first that fails is the node's reason
(all resource shortfalls are reported together):

1. **excluded**: the caller ruled the node out for this placement (e.g. the
   replica just failed there);
2. **state**: only ``ready`` and ``busy`` nodes take new replicas (spec §4.2);
   draining, suspect, failed, degraded, initializing and removed nodes never do;
3. **node type**: the node must serve the replica's type (``compute`` …);
4. **resources**: free CPU, memory and disk (capabilities minus what placed
   replicas reserve) must cover the request.

Ownership is not a filter: a :class:`~controller.scheduling.snapshot.Snapshot`
holds one user's nodes and refuses to be built otherwise.

>>> from controller.nodes.health import NodeState
>>> from controller.scheduling.snapshot import Capabilities, NodeView, ReplicaRequest, Resources
>>> node = NodeView(node_id="n1", user_id="u", region="r", state=NodeState.READY,
...                 capabilities=Capabilities(cpu_cores=1, memory_gb=1, disk_gb=1),
...                 reserved=Resources(cpu_cores=0.75))
>>> rejection_reason(node, ReplicaRequest(cpu_cores=0.5, memory_mb=256, disk_mb=100))
'insufficient CPU: needs 0.5 CPU, 0.25 free'
>>> rejection_reason(node, ReplicaRequest(cpu_cores=0.25, memory_mb=256, disk_mb=100)) is None
True
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass
from enum import StrEnum

from controller.nodes.health import is_schedulable
from controller.scheduling.snapshot import MB_PER_GB, SCHEDULABLE, NodeSet, NodeView, ReplicaRequest

RESOURCE_EPSILON = 1e-9
"""Slack when comparing free and requested resources, so that float arithmetic
(e.g. 0.1 + 0.2 reserved on a 0.3-core node) never rejects an exact fit."""


class RejectKind(StrEnum):
    """Which filter rejected a node (used for counts in error metadata)."""

    EXCLUDED = "excluded"
    STATE = "state"
    NODE_TYPE = "node_type"
    RESOURCES = "resources"


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why one node cannot take the replica."""

    kind: RejectKind
    reason: str


def format_amount(value: float) -> str:
    """A resource amount for humans: whole numbers without decimals, else up to 3.

    >>> format_amount(0.25), format_amount(512.0), format_amount(1 / 3)
    ('0.25', '512', '0.333')
    """
    rounded = round(value, 3)
    if rounded == int(rounded):
        return str(int(rounded))
    return f"{rounded:.3f}".rstrip("0").rstrip(".")


def check_node(node: NodeView, request: ReplicaRequest, exclude: Collection[str] = ()) -> Rejection | None:
    """The :class:`Rejection` of ``node`` for ``request``, or ``None`` if the node is feasible."""
    if node.node_id in exclude:
        return Rejection(RejectKind.EXCLUDED, "excluded from this placement")
    if not is_schedulable(node.state):
        return Rejection(RejectKind.STATE, f"node is {node.state.value}")
    if request.node_type not in node.node_types:
        served = ", ".join(sorted(node.node_types)) or "no type"
        return Rejection(
            RejectKind.NODE_TYPE, f"node type mismatch: needs {request.node_type}, node serves {served}"
        )
    capabilities = node.capabilities
    reserved = node.reserved
    short: list[str] = []
    details: list[str] = []
    free_cpu = capabilities.cpu_cores - reserved.cpu_cores
    if free_cpu + RESOURCE_EPSILON < request.cpu_cores:
        short.append("CPU")
        details.append(
            f"needs {format_amount(request.cpu_cores)} CPU, {format_amount(max(0.0, free_cpu))} free"
        )
    free_memory = capabilities.memory_gb * MB_PER_GB - reserved.memory_mb
    if free_memory + RESOURCE_EPSILON < request.memory_mb:
        short.append("memory")
        details.append(
            f"needs {format_amount(request.memory_mb)} MB memory, {format_amount(max(0.0, free_memory))} MB free"
        )
    free_disk = capabilities.disk_gb * MB_PER_GB - reserved.disk_mb
    if free_disk + RESOURCE_EPSILON < request.disk_mb:
        short.append("disk")
        details.append(
            f"needs {format_amount(request.disk_mb)} MB disk, {format_amount(max(0.0, free_disk))} MB free"
        )
    if short:
        return Rejection(RejectKind.RESOURCES, f"insufficient {' and '.join(short)}: {'; '.join(details)}")
    return None


def rejection_reason(node: NodeView, request: ReplicaRequest, exclude: Collection[str] = ()) -> str | None:
    """Why ``node`` cannot take the replica, or ``None`` if it can."""
    rejection = check_node(node, request, exclude)
    return rejection.reason if rejection else None


def iter_rejections(
    snapshot: NodeSet, request: ReplicaRequest, exclude: Collection[str] = ()
) -> Iterator[tuple[str, Rejection]]:
    """The infeasible nodes with their :class:`Rejection`, in snapshot order, lazily: a feasible
    node costs a few comparisons on its placement row (no :func:`check_node`), so taking the
    first few rejections of a large, mostly feasible snapshot is cheap."""
    need_cpu = request.cpu_cores - RESOURCE_EPSILON
    need_memory = request.memory_mb - RESOURCE_EPSILON
    need_disk = request.disk_mb - RESOURCE_EPSILON
    node_type = request.node_type
    candidates = snapshot.maybe_infeasible(request, exclude)  # a live snapshot knows the few
    for node in snapshot.nodes if candidates is None else candidates:
        if node.state in SCHEDULABLE and node_type in node.node_types and node.node_id not in exclude:
            row = node.placement_row
            if row[3] >= need_cpu and row[4] >= need_memory and row[5] >= need_disk:
                continue
        rejection = check_node(node, request, exclude)
        if rejection is not None:
            yield node.node_id, rejection


def rejections(
    snapshot: NodeSet, request: ReplicaRequest, exclude: Collection[str] = ()
) -> dict[str, Rejection]:
    """Every infeasible node of the snapshot with its :class:`Rejection`, in snapshot order."""
    result: dict[str, Rejection] = {}
    for node in snapshot.nodes:
        rejection = check_node(node, request, exclude)
        if rejection is not None:
            result[node.node_id] = rejection
    return result


def filter_nodes(
    snapshot: NodeSet, request: ReplicaRequest, *, exclude: Collection[str] = ()
) -> tuple[list[NodeView], dict[str, str]]:
    """The feasibility stage: ``(feasible nodes, {rejected node id: reason})``, in snapshot order."""
    feasible: list[NodeView] = []
    rejected: dict[str, str] = {}
    for node in snapshot.nodes:
        rejection = check_node(node, request, exclude)
        if rejection is None:
            feasible.append(node)
        else:
            rejected[node.node_id] = rejection.reason
    return feasible, rejected
