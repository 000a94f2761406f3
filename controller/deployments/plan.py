"""One placement setup for every path that places replicas of a deployment.

Create, a replica's retry or recovery, scale-up and a rolling update's new replica
all ask the same question: "where do ``count`` more replicas of this deployment
go, given where its other replicas already run?" :func:`plan` answers it over a
scheduling :class:`~controller.scheduling.Snapshot` (or the fleet's live view) with the same three inputs
every time:

* ``exclude``: nodes that must not be chosen (the replica just failed there, or
  the node whose replica is being replaced);
* ``avoid``: the nodes already hosting a replica of the deployment — a last
  resort only, so replicas land on distinct nodes where possible;
* ``occupied_regions``: how many of those replicas each region holds, so a new
  replica goes to the region where the deployment is thinnest.

Pure: the caller builds the snapshot (``controller/deployments/snapshot.py``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping

from controller.scheduling import Placement, ReplicaRequest, place
from controller.scheduling.snapshot import NodeSet


def occupied_regions(hosting: Iterable[str], regions: Mapping[str, str]) -> dict[str, int]:
    """Replicas per region, for the nodes in ``hosting`` (one entry per replica).

    >>> occupied_regions(["n1", "n2", "n3"], {"n1": "eu", "n2": "eu", "n3": "us"})
    {'eu': 2, 'us': 1}
    """
    counts: dict[str, int] = {}
    for node_id in hosting:
        region = regions.get(node_id, "")
        counts[region] = counts.get(region, 0) + 1
    return counts


def plan(
    snapshot: NodeSet,
    regions: Mapping[str, str],
    request: ReplicaRequest,
    count: int,
    *,
    seed: str,
    hosting: Collection[str] = (),
    exclude: Collection[str] = (),
) -> Placement:
    """Place ``count`` replicas beside the deployment's replicas on ``hosting`` nodes.

    ``regions`` maps node ids to regions (the user's node rows); ``hosting`` lists
    the node of every other active replica of the deployment (a node twice if it
    holds two). Raises :class:`~controller.errors.Unavailable` when fewer than
    ``count`` nodes are feasible (see :func:`controller.scheduling.place`).
    """
    return place(
        snapshot,
        request,
        count,
        seed=seed,
        exclude=frozenset(exclude),
        avoid=frozenset(hosting),
        occupied_regions=occupied_regions(hosting, regions),
    )
