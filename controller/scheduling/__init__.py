"""Placement: a pure pipeline over a read-only snapshot of one user's nodes.

::

    Snapshot ──► feasibility ──► score ──► select ──► Placement
                 (feasible.py)   (score.py) (select.py)  selected + reasons

No I/O: the deployments code builds a :class:`Snapshot` from the fleet, calls
:func:`place`, and stores :meth:`Placement.explanations` with the deployment.
See ``README.md`` in this directory for the pipeline, the score and the
decision rule::

    from controller.scheduling import ReplicaRequest, Snapshot, place

    placement = place(snapshot, ReplicaRequest(cpu_cores=0.5, memory_mb=512, disk_mb=1024),
                      replicas=3, seed=deployment_id)
    placement.node_ids           # ['n7', 'n2', 'n9'], one per region first
    placement.explanations()     # PlacementExplanation protos: factors and reasons

Traffic to a running deployment: :func:`pick_endpoint`.
"""

from controller.scheduling.feasible import (
    Rejection,
    RejectKind,
    check_node,
    filter_nodes,
    rejection_reason,
    rejections,
)
from controller.scheduling.history import NodeHistory
from controller.scheduling.score import FACTOR_NAMES, NodeScore, score_node
from controller.scheduling.select import (
    INSUFFICIENT_CAPACITY,
    NO_HEALTHY_REPLICA,
    Choice,
    Placement,
    ReplicaTarget,
    insufficient_capacity,
    pick_endpoint,
    place,
)
from controller.scheduling.snapshot import (
    MB_PER_GB,
    Capabilities,
    NodeView,
    Reliability,
    ReplicaRequest,
    Resources,
    Snapshot,
)

__all__ = [
    "FACTOR_NAMES",
    "INSUFFICIENT_CAPACITY",
    "MB_PER_GB",
    "NO_HEALTHY_REPLICA",
    "Capabilities",
    "Choice",
    "NodeHistory",
    "NodeScore",
    "NodeView",
    "Placement",
    "RejectKind",
    "Rejection",
    "Reliability",
    "ReplicaRequest",
    "ReplicaTarget",
    "Resources",
    "Snapshot",
    "check_node",
    "filter_nodes",
    "insufficient_capacity",
    "pick_endpoint",
    "place",
    "rejection_reason",
    "rejections",
    "score_node",
]
