"""Select: choose N distinct nodes for N replicas, spread over regions, and explain why.

:func:`place` is the whole pipeline (feasibility → score → select) over one
:class:`~controller.scheduling.snapshot.Snapshot`. The decision rule, exactly:

1. **Order.** Within each region, feasible nodes (see
   :mod:`controller.scheduling.feasible`) are ordered by score
   (:mod:`controller.scheduling.score`), highest first. Feasible nodes of one
   region with equal scores (to 6 decimals) are shuffled: taken in node id
   order, then Fisher-Yates with ``random.Random(f"{seed}|{score!r}|{region}")``.
   The seed is the deployment id, so the same snapshot, request and seed give
   the same decision every time (replay), and different deployments break ties
   differently (spread).
2. **Spread.** Replicas are picked one at a time. Each goes to the next node of
   the region that holds the fewest replicas so far; between such regions, the
   one whose next node scores higher; at equal scores, the region with the
   lower ``random.Random(f"{seed}|{score!r}|{region}|region").random()``. So no
   region gets a second replica while a feasible region has none, nor a third
   while one has only one, and so on. ``occupied_regions`` seeds the counts
   with the replicas the deployment already runs, so a replacement or a
   scale-up goes where the deployment is thin.
3. **Exclude and avoid.** ``exclude`` nodes are infeasible for this placement
   (rejected with a reason, e.g. the replica just failed there). ``avoid``
   nodes are a last resort: they are used, with the same spreading rule, only
   when the other feasible nodes are too few (e.g. nodes that already host a
   replica of this deployment).
4. **Capacity.** Fewer than N feasible nodes raise
   :class:`~controller.errors.Unavailable` (reason ``INSUFFICIENT_CAPACITY``,
   HTTP 503 through the gateway) naming each rejected node's reason.

Cost. Scores are computed once per :class:`NodeView` and kept on it. The
per-snapshot work (group the schedulable nodes of a type by region, each sorted
by ``(-score, node_id)``) is done on first use and kept on the snapshot
(:meth:`Snapshot.regions`); the fleet's live view
(:class:`~controller.scheduling.live.LiveSnapshot`) keeps that order current as
nodes change instead, so placing on it never rebuilds anything. A placement then walks each region's order only until
it holds N candidates (no later node of that region can be picked), so a
region that cannot take the replica costs one pass over that region, never
more. Ties are shuffled lazily (a partial Fisher-Yates yields the prefix of the
full shuffle and draws only what it yields), so a large group of identical
nodes costs one pass and a few draws. The reasons of rejected nodes are
computed only when asked for (:attr:`Placement.rejected`,
:meth:`Placement.explanations`) or when placement fails.

Traffic for a running deployment uses :func:`pick_endpoint`: the power of two
random choices on active requests among healthy replicas only.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import islice

from automator67.v1 import deployment_pb2

from controller.errors import Unavailable
from controller.scheduling.feasible import (
    RESOURCE_EPSILON,
    RejectKind,
    format_amount,
    iter_rejections,
    rejection_reason,
    rejections,
)
from controller.scheduling.snapshot import NodeSet, PlacementRow, ReplicaRequest

MAX_REASONS_IN_MESSAGE = 10
"""How many rejected nodes an "Insufficient capacity" message names one by one;
the rest are summarised as counts per kind of rejection."""

INSUFFICIENT_CAPACITY = "INSUFFICIENT_CAPACITY"
"""``ErrorInfo.reason`` when fewer feasible nodes than replicas exist."""

NO_HEALTHY_REPLICA = "NO_HEALTHY_REPLICA"
"""``ErrorInfo.reason`` when a deployment has no healthy replica to route to."""

_KIND_LABELS = {
    RejectKind.EXCLUDED: "excluded",
    RejectKind.STATE: "not ready or busy",
    RejectKind.NODE_TYPE: "wrong node type",
    RejectKind.RESOURCES: "insufficient resources",
}


@dataclass(frozen=True, slots=True)
class Choice:
    """One selected node with its score, factor by factor."""

    node_id: str
    region: str
    total_score: float
    factors: dict[str, float]
    """The five factors of :mod:`controller.scheduling.score` by name."""
    last_resort: bool = False
    """Chosen from the ``avoid`` set because the other feasible nodes were too few."""


def tie_order(seed: str, score: float, region: str, group: list[PlacementRow]) -> Iterator[PlacementRow]:
    """The rows of one region's group of equal scores, given in node id order, shuffled.

    A forward Fisher-Yates shuffle with ``random.Random(f"{seed}|{score!r}|{region}")``
    that yields as it goes: the first k rows cost k draws whatever the size of
    the group, and every prefix is the prefix of the full shuffle, so stopping
    early never changes what was yielded. ``group`` is shuffled in place.
    """
    rng = random.Random(f"{seed}|{score!r}|{region}")  # noqa: S311 - a replayable tie-break, not a secret
    size = len(group)
    for i in range(size):
        j = rng.randrange(i, size)
        group[i], group[j] = group[j], group[i]
        yield group[i]


def region_tiebreak(seed: str, score: float, region: str) -> float:
    """Orders regions whose next nodes have equal scores (lower goes first)."""
    return random.Random(f"{seed}|{score!r}|{region}|region").random()  # noqa: S311 - as above


def _walk_region(
    rows: list[PlacementRow],
    region: str,
    request: ReplicaRequest,
    quota: int,
    seed: str,
    exclude: Collection[str],
    avoid: Collection[str],
    roomy: bool = False,
) -> tuple[list[PlacementRow], list[PlacementRow]]:
    """The first ``quota`` feasible rows of one region in placement order, and up to
    ``quota`` avoided ones met on the way: (preferred, last resort).

    ``rows`` are in ``(-score, node id)`` order (a group of equal scores is in node id
    order). ``roomy``: every row has room for ``request`` (the live view knows its least
    free resources), so a group of equal scores is filtered by ``exclude`` alone — in a
    fleet of alike nodes one group can be every node."""
    need_cpu = request.cpu_cores - RESOURCE_EPSILON
    need_memory = request.memory_mb - RESOURCE_EPSILON
    need_disk = request.disk_mb - RESOURCE_EPSILON
    preferred: list[PlacementRow] = []
    spare: list[PlacementRow] = []
    skip_to = 0
    candidates: Iterable[PlacementRow]
    for k in range(len(rows) - 1):  # the last row is the sentinel
        if k < skip_to:
            continue
        row = rows[k]
        if row[3] < need_cpu or row[4] < need_memory or row[5] < need_disk or row[1] in exclude:
            continue
        score = row[0]
        if rows[k + 1][0] != score:
            candidates = (row,)
        else:
            end = k + 2
            while rows[end][0] == score:
                end += 1
            skip_to = end
            if roomy:
                group = [tied for tied in rows[k:end] if tied[1] not in exclude] if exclude else rows[k:end]
            else:
                group = [
                    tied
                    for tied in rows[k:end]
                    if tied[3] >= need_cpu
                    and tied[4] >= need_memory
                    and tied[5] >= need_disk
                    and tied[1] not in exclude
                ]
            candidates = tie_order(seed, -score, region, group) if len(group) > 1 else group
        for candidate in candidates:
            if candidate[1] in avoid:
                if len(spare) < quota:
                    spare.append(candidate)
                continue
            preferred.append(candidate)
            if len(preferred) == quota:
                return preferred, spare
    return preferred, spare


def _spread(
    queues: dict[str, list[PlacementRow]], count: int, occupied: dict[str, int], seed: str
) -> list[PlacementRow]:
    """Pick up to ``count`` rows: each from the least occupied region, then the better
    next node, then the region tie-break."""
    heads = dict.fromkeys(queues, 0)
    tiebreaks: dict[tuple[float, str], tuple[float, str]] = {}

    def tiebreak(score: float, region: str) -> tuple[float, str]:
        key = (score, region)
        if key not in tiebreaks:
            tiebreaks[key] = (region_tiebreak(seed, -score, region), region)
        return tiebreaks[key]

    picks: list[PlacementRow] = []
    while len(picks) < count:
        best: tuple[int, float] | None = None
        best_region = ""
        for region, queue in queues.items():
            head = heads[region]
            if head == len(queue):
                continue
            key = (occupied.get(region, 0), queue[head][0])
            if (
                best is None
                or key < best
                or (key == best and tiebreak(key[1], region) < tiebreak(key[1], best_region))
            ):
                best, best_region = key, region
        if best is None:
            break
        picks.append(queues[best_region][heads[best_region]])
        heads[best_region] += 1
        occupied[best_region] = occupied.get(best_region, 0) + 1
    return picks


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def insufficient_capacity(
    snapshot: NodeSet, request: ReplicaRequest, replicas: int, exclude: Collection[str] = ()
) -> Unavailable:
    """The ``Unavailable`` error for a placement that cannot find ``replicas`` nodes.

    The message names up to :data:`MAX_REASONS_IN_MESSAGE` rejected nodes with
    their reasons and counts the rest by kind; the metadata carries the counts.
    """
    found = rejections(snapshot, request, exclude)
    total = len(snapshot)
    feasible = total - len(found)
    need = (
        f"{format_amount(request.cpu_cores)} CPU, {request.memory_mb} MB memory and "
        f"{request.disk_mb} MB disk on a {request.node_type} node"
    )
    kinds: dict[RejectKind, int] = {}
    for rejection in found.values():
        kinds[rejection.kind] = kinds.get(rejection.kind, 0) + 1
    if total == 0:
        detail = "there are no nodes"
    else:
        named = [f"{node_id} ({r.reason})" for node_id, r in islice(found.items(), MAX_REASONS_IN_MESSAGE)]
        detail = f"{feasible} of {_plural(total, 'node')} can take a replica needing {need}"
        if named:
            detail += "; rejected: " + "; ".join(named)
        rest = len(found) - len(named)
        if rest:
            rest_kinds: dict[RejectKind, int] = {}
            for rejection in list(found.values())[len(named) :]:
                rest_kinds[rejection.kind] = rest_kinds.get(rejection.kind, 0) + 1
            by_count = sorted(rest_kinds.items(), key=lambda item: (-item[1], item[0]))
            counts = ", ".join(f"{n} {_KIND_LABELS[kind]}" for kind, n in by_count)
            detail += f"; and {rest} more ({counts})"
    metadata = {
        "replicas_requested": str(replicas),
        "nodes": str(total),
        "feasible_nodes": str(feasible),
        "rejected_nodes": str(len(found)),
    }
    metadata.update({f"rejected_{kind.value}": str(n) for kind, n in sorted(kinds.items())})
    return Unavailable(
        f"Insufficient capacity for {_plural(replicas, 'replica')}: {detail}. "
        "Add nodes, free capacity on the ones you have, or try again later.",
        reason=INSUFFICIENT_CAPACITY,
        metadata=metadata,
    )


@dataclass(frozen=True, eq=False)
class Placement:
    """The outcome of :func:`place`: the chosen nodes, and why every other node was not."""

    selected: list[Choice]
    """The chosen nodes, in the order they were picked (replica 0 first)."""

    snapshot: NodeSet = field(repr=False)
    request: ReplicaRequest
    exclude: frozenset[str] = frozenset()
    avoid: frozenset[str] = frozenset()

    @property
    def node_ids(self) -> list[str]:
        """The ids of the chosen nodes, in order."""
        return [choice.node_id for choice in self.selected]

    @cached_property
    def rejected(self) -> dict[str, str]:
        """Every infeasible node with its filter reason (computed on first use)."""
        return {
            node_id: r.reason for node_id, r in rejections(self.snapshot, self.request, self.exclude).items()
        }

    def why(self, node_id: str) -> str:
        """Why ``node_id`` was or was not chosen: the answer to "why not node X?"."""
        for choice in self.selected:
            if choice.node_id == node_id:
                note = " as a last resort" if choice.last_resort else ""
                return f"selected{note} (score {choice.total_score}, region {choice.region})"
        node = self.snapshot.node(node_id)
        if node is None:
            return "not one of your nodes"
        reason = rejection_reason(node, self.request, self.exclude)
        if reason is not None:
            return reason
        if node_id in self.avoid:
            return "feasible, but avoided (a last resort) and enough other nodes were feasible"
        lowest = min(choice.total_score for choice in self.selected)
        return (
            f"feasible with score {node.score.total}, but ranked below the selected nodes "
            f"(lowest selected {lowest}) or its region {node.region!r} already had its share"
        )

    def explanations(self, *, max_rejected: int | None = None) -> list[deployment_pb2.PlacementExplanation]:
        """The decision as protos: every selected node with its factors, then rejected nodes
        with their reasons (at most ``max_rejected`` of them, if given)."""
        result = [
            deployment_pb2.PlacementExplanation(
                node_id=choice.node_id,
                selected=True,
                reason="selected as a last resort" if choice.last_resort else "selected",
                total_score=choice.total_score,
                factor_scores=choice.factors,
            )
            for choice in self.selected
        ]
        result.extend(
            deployment_pb2.PlacementExplanation(node_id=node_id, selected=False, reason=reason)
            for node_id, reason in self._rejected(max_rejected)
        )
        return result

    def _rejected(self, limit: int | None) -> list[tuple[str, str]]:
        if limit is None or "rejected" in self.__dict__:  # all of them, or already computed
            items = list(self.rejected.items())
            return items if limit is None else items[: max(0, limit)]
        found = islice(iter_rejections(self.snapshot, self.request, self.exclude), max(0, limit))
        return [(node_id, r.reason) for node_id, r in found]

    def explanation_dicts(self, *, max_rejected: int | None = None) -> list[dict[str, object]]:
        """:meth:`explanations` as ``json_format.MessageToDict(e, preserving_proto_field_name=True)``
        gives them (fields at their default value left out), built directly: what the
        deployments store, without a protobuf round trip per node."""
        result: list[dict[str, object]] = []
        for choice in self.selected:
            entry: dict[str, object] = {
                "node_id": choice.node_id,
                "selected": True,
                "reason": "selected as a last resort" if choice.last_resort else "selected",
            }
            if choice.total_score:
                entry["total_score"] = choice.total_score
            if choice.factors:
                entry["factor_scores"] = dict(choice.factors)
            result.append(entry)
        for node_id, reason in self._rejected(max_rejected):
            entry = {"node_id": node_id}
            if reason:
                entry["reason"] = reason
            result.append(entry)
        return result


def place(
    snapshot: NodeSet,
    request: ReplicaRequest,
    replicas: int,
    seed: str,
    *,
    exclude: frozenset[str] = frozenset(),
    avoid: frozenset[str] = frozenset(),
    occupied_regions: Mapping[str, int] | None = None,
) -> Placement:
    """Choose ``replicas`` distinct nodes of ``snapshot`` for ``request`` (see the module doc).

    ``seed`` is the deployment id: it breaks score ties, so the decision replays
    exactly. ``exclude`` nodes are never used, ``avoid`` nodes only as a last
    resort; ``occupied_regions`` counts replicas the deployment already has per
    region. Raises ``Unavailable`` (``INSUFFICIENT_CAPACITY``) if fewer than
    ``replicas`` nodes are feasible.
    """
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    preferred: dict[str, list[PlacementRow]] = {}
    spare: dict[str, list[PlacementRow]] = {}
    roomy = snapshot.room_for_all(request)
    for region, rows in snapshot.regions(request.node_type).items():
        chosen, avoided = _walk_region(rows, region, request, replicas, seed, exclude, avoid, roomy)
        if chosen:
            preferred[region] = chosen
        if avoided:
            spare[region] = avoided
    occupied = dict(occupied_regions or {})
    picks = [(row, False) for row in _spread(preferred, replicas, occupied, seed)]
    if len(picks) < replicas and spare:
        picks += [(row, True) for row in _spread(spare, replicas - len(picks), occupied, seed)]
    if len(picks) < replicas:
        raise insufficient_capacity(snapshot, request, replicas, exclude)
    selected = []
    for row, last_resort in picks:
        node = snapshot.node(row[1])
        assert node is not None
        score = node.score
        selected.append(
            Choice(
                node_id=node.node_id,
                region=node.region,
                total_score=score.total,
                factors=score.factors(),
                last_resort=last_resort,
            )
        )
    return Placement(selected=selected, snapshot=snapshot, request=request, exclude=exclude, avoid=avoid)


@dataclass(frozen=True, slots=True)
class ReplicaTarget:
    """One replica of a running deployment, as traffic selection sees it."""

    node_id: str
    endpoint: str
    healthy: bool
    """Only healthy replicas get traffic."""
    active_requests: int
    """Requests in flight on the replica's node (from its last heartbeat)."""
    score: float = 0.0
    """The node's placement score; breaks ties between equally loaded replicas."""
    replica_index: int = 0


def pick_endpoint(replicas: Sequence[ReplicaTarget], rng: random.Random) -> ReplicaTarget:
    """The replica to send the next request to: power of two choices among healthy replicas.

    Two distinct healthy replicas are drawn at random and the one with fewer
    active requests wins (then the higher score, then the first drawn). This
    spreads load almost as well as always picking the least loaded replica,
    without every caller piling onto the same one between metric updates.
    Unhealthy replicas never get traffic; none healthy raises ``Unavailable``
    (``NO_HEALTHY_REPLICA``).
    """
    healthy = [replica for replica in replicas if replica.healthy]
    if not healthy:
        raise Unavailable(
            f"No healthy replica to route to ({_plural(len(replicas), 'replica')}, none healthy)",
            reason=NO_HEALTHY_REPLICA,
            metadata={"replicas": str(len(replicas))},
        )
    if len(healthy) == 1:
        return healthy[0]
    first, second = rng.sample(healthy, 2)
    if (second.active_requests, -second.score) < (first.active_requests, -first.score):
        return second
    return first
