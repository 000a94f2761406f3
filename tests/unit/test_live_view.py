"""The live scheduler view (controller/scheduling/live.py): kept current node by node, it
decides exactly as a fresh Snapshot of the same views would."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
from google.protobuf import json_format

from controller.errors import Unavailable
from controller.nodes.health import NodeState
from controller.scheduling import Placement, ReplicaRequest, Resources, Snapshot, place
from controller.scheduling.feasible import iter_rejections, rejections
from controller.scheduling.live import LiveSnapshot
from tests.unit.test_scheduling import node

REGIONS = ("eu-west", "us-east", "ap-south")
STATES = (NodeState.READY, NodeState.READY, NodeState.BUSY, NodeState.SUSPECT, NodeState.DRAINING)
TYPES = (("compute",), ("compute", "database"), ("storage",))
REQUESTS = (
    ReplicaRequest(cpu_cores=0.5, memory_mb=512, disk_mb=1024),
    ReplicaRequest(cpu_cores=1.5, memory_mb=2048, disk_mb=1024),
    ReplicaRequest(cpu_cores=0.25, memory_mb=256, disk_mb=512, node_type="storage"),
)


def random_view(rng: random.Random, node_id: str) -> object:
    return node(
        node_id,
        region=rng.choice(REGIONS),
        state=rng.choice(STATES),
        types=rng.choice(TYPES),
        cpu=rng.choice((1.0, 2.0)),
        # few distinct values: ties between nodes are common
        cpu_pct=rng.choice((10.0, 50.0, 90.0)),
        mem_pct=rng.choice((20.0, 60.0)),
        rtt=rng.choice((None, 20.0, 200.0)),
        reserved=Resources(cpu_cores=rng.choice((0.0, 0.5, 1.0)), memory_mb=rng.choice((0, 1024))),
    )


def outcome(snapshot: object, request: ReplicaRequest, replicas: int, seed: str, **kw: object) -> object:
    try:
        placement = place(snapshot, request, replicas, seed, **kw)  # type: ignore[arg-type]
    except Unavailable as exc:
        return ("unavailable", exc.message)
    return (
        [(c.node_id, c.total_score, c.last_resort) for c in placement.selected],
        placement.explanations(max_rejected=5),
    )


def test_live_snapshot_decides_as_a_fresh_snapshot_of_its_views() -> None:
    rng = random.Random(11)
    ids = [f"n{i:02d}" for i in range(40)]
    live = LiveSnapshot("u1")
    for node_id in ids[:30]:
        live.put(random_view(rng, node_id))  # type: ignore[arg-type]
    for request in REQUESTS:  # build every type's order first, so the updates below maintain it
        live.regions(request.node_type)
    for step in range(300):
        action = rng.random()
        node_id = rng.choice(ids)
        if action < 0.1:
            live.remove(node_id)
        elif action < 0.6 or live.node(node_id) is None:
            live.put(random_view(rng, node_id))  # type: ignore[arg-type]
        else:  # a heartbeat: the same node with new metrics
            current = live.node(node_id)
            assert current is not None
            assert current.metrics is not None
            live.put(replace(current, metrics=replace(current.metrics, cpu_percent=rng.choice((5.0, 95.0)))))
        fresh = Snapshot(live.nodes, user_id="u1")
        assert [n.node_id for n in live.nodes] == sorted(n.node_id for n in live.nodes)
        for request in REQUESTS:
            replicas = rng.choice((1, 2, 3))
            seed = f"d{step}"
            exclude = frozenset(rng.sample(ids, rng.choice((0, 2))))  # none: the tie groups are whole
            avoid = frozenset(rng.sample(ids, 2))
            got = outcome(live, request, replicas, seed, exclude=exclude, avoid=avoid)
            want = outcome(fresh, request, replicas, seed, exclude=exclude, avoid=avoid)
            assert got == want, (step, request)


def test_live_snapshot_refuses_another_users_node() -> None:
    live = LiveSnapshot("u1")
    with pytest.raises(ValueError, match="of user 'u2'"):
        live.put(node("n1", user="u2"))


def test_a_node_that_stops_being_schedulable_leaves_the_order_and_comes_back() -> None:
    live = LiveSnapshot("u1", (node("a"), node("b", cpu_pct=90.0)))
    request = REQUESTS[0]
    assert place(live, request, 1, "s").node_ids == ["a"]
    live.put(node("a", state=NodeState.SUSPECT))
    assert place(live, request, 1, "s").node_ids == ["b"]
    live.put(node("a"))
    assert place(live, request, 1, "s").node_ids == ["a"]
    live.remove("b")
    live.remove("a")
    assert live.regions("compute") == {}
    with pytest.raises(Unavailable):
        place(live, request, 1, "s")


def placement_with_rejections() -> Placement:
    views = [node(f"n{i}", cpu=1.0 if i % 3 else 0.25, state=NodeState.SUSPECT if i == 4 else NodeState.READY)
             for i in range(10)]  # fmt: skip
    return place(Snapshot(tuple(views)), REQUESTS[0], 2, "seed", exclude=frozenset({"n1"}))


@pytest.mark.parametrize("limit", [None, 0, 2, 50])
def test_explanation_dicts_are_what_message_to_dict_gives(limit: int | None) -> None:
    placement = placement_with_rejections()
    want = [
        json_format.MessageToDict(e, preserving_proto_field_name=True)
        for e in placement.explanations(max_rejected=limit)
    ]
    assert placement_with_rejections().explanation_dicts(max_rejected=limit) == want
    assert placement.explanation_dicts(max_rejected=limit) == want  # after `rejected` was computed


def test_iter_rejections_agrees_with_rejections() -> None:
    placement = placement_with_rejections()
    for request in REQUESTS:
        exclude = frozenset({"n1", "n2"})
        assert dict(iter_rejections(placement.snapshot, request, exclude)) == rejections(
            placement.snapshot, request, exclude
        )


def test_a_live_snapshot_finds_the_same_rejections_without_walking_every_node() -> None:
    """Over a live snapshot, rejections come from the few nodes that can be infeasible (those
    outside the type's order, the excluded ones) whenever every node in the order has room;
    they are exactly what a walk over every node of a fresh snapshot finds."""
    rng = random.Random(5)
    ids = [f"n{i:02d}" for i in range(40)]
    live = LiveSnapshot("u1")
    for node_id in ids[:30]:
        live.put(random_view(rng, node_id))  # type: ignore[arg-type]
    small = ReplicaRequest(cpu_cores=0.01, memory_mb=1, disk_mb=1)
    narrowed = walked = 0
    for step in range(300):
        node_id = rng.choice(ids)
        if rng.random() < 0.1:
            live.remove(node_id)
        else:
            live.put(random_view(rng, node_id))  # type: ignore[arg-type]
        fresh = Snapshot(live.nodes, user_id="u1")
        for request in (*REQUESTS, small, replace(small, node_type="storage")):
            exclude = frozenset(rng.sample(ids, rng.choice((0, 2))))
            candidates = live.maybe_infeasible(request, exclude)
            if candidates is None:
                walked += 1
            else:
                narrowed += 1
                assert len(candidates) < len(live.nodes) or not live.regions(request.node_type)
            got = list(iter_rejections(live, request, exclude))
            assert got == list(iter_rejections(fresh, request, exclude)), (step, request)
    assert narrowed > 100  # both paths were taken
    assert walked > 100


def test_the_least_free_resources_follow_every_change() -> None:
    rng = random.Random(5)
    ids = [f"n{i:02d}" for i in range(30)]
    live = LiveSnapshot("u1")
    index = live._index("compute")
    for step in range(2000):  # enough changes for the heaps to be rebuilt several times
        node_id = rng.choice(ids)
        if rng.random() < 0.15:
            live.remove(node_id)
        else:
            live.put(random_view(rng, node_id))  # type: ignore[arg-type]
        rows = [row for rows in index.regions.values() for row in rows[:-1]]
        want = tuple(min((row[c] for row in rows), default=math.inf) for c in (3, 4, 5))
        assert index.least_free() == want, step
