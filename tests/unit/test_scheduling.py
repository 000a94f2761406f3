"""Placement: feasibility, score and select as tables of named cases, a differential
check of the fast selection against a brute-force reference, and traffic selection."""

from __future__ import annotations

import doctest
import itertools
import random
from collections import defaultdict
from dataclasses import replace

import grpc
import pytest

import controller.scheduling
from controller.deployments import plan as plan_module
from controller.errors import Unavailable
from controller.nodes.health import Metrics, NodeState
from controller.scheduling import (
    FACTOR_NAMES,
    Capabilities,
    NodeView,
    Reliability,
    ReplicaRequest,
    ReplicaTarget,
    Resources,
    Snapshot,
    filter_nodes,
    pick_endpoint,
    place,
    rejection_reason,
)
from controller.scheduling import feasible as feasible_module
from controller.scheduling import history as history_module
from controller.scheduling import score as score_module
from controller.scheduling import select as select_module
from controller.scheduling import snapshot as snapshot_module
from controller.scheduling.history import NodeHistory
from controller.scheduling.score import (
    CONNECTIONS_WEIGHT,
    CPU_WEIGHT,
    LATENCY_WEIGHT,
    MEMORY_WEIGHT,
    RELIABILITY_WEIGHT,
    combine,
    connection_score,
    cpu_score,
    latency_score,
    memory_score,
    reliability_score,
    score_node,
)
from controller.scheduling.select import region_tiebreak, tie_order

S = NodeState
SMALL = ReplicaRequest(cpu_cores=0.5, memory_mb=512, disk_mb=1024)
NOTHING_RESERVED = Resources()
NO_HISTORY = Reliability()


def node(
    node_id: str,
    *,
    region: str = "eu-west",
    state: NodeState = S.READY,
    cpu: float = 2.0,
    memory_gb: float = 4.0,
    disk_gb: float = 20.0,
    types: tuple[str, ...] = ("compute",),
    cpu_pct: float = 20.0,
    mem_pct: float = 30.0,
    active: int = 0,
    max_concurrent: int = 100,
    rtt: float | None = 50.0,
    reserved: Resources = NOTHING_RESERVED,
    reliability: Reliability = NO_HISTORY,
    with_metrics: bool = True,
    user: str = "u1",
) -> NodeView:
    return NodeView(
        node_id=node_id,
        user_id=user,
        region=region,
        state=state,
        node_types=frozenset(types),
        capabilities=Capabilities(
            cpu_cores=cpu, memory_gb=memory_gb, disk_gb=disk_gb, max_concurrent_requests=max_concurrent
        ),
        metrics=Metrics(
            cpu_percent=cpu_pct,
            memory_percent=mem_pct,
            disk_percent=10.0,
            active_requests=active,
            error_rate=0.0,
            avg_response_time_ms=10.0,
        )
        if with_metrics
        else None,
        rtt_ms=rtt,
        reliability=reliability,
        reserved=reserved,
    )


def snap(*nodes: NodeView) -> Snapshot:
    return Snapshot(tuple(nodes))


# --------------------------------------------------------------------------- score


@pytest.mark.parametrize(
    ("percent", "expected"),
    [
        pytest.param(0.0, 1.0, id="idle-scores-1"),
        pytest.param(50.0, 0.5, id="half-used-scores-half"),
        pytest.param(80.0, 0.2, id="exactly-80-is-not-penalised"),
        pytest.param(80.1, 0.0995, id="just-above-80-is-halved"),
        pytest.param(90.0, 0.05, id="90-percent-halved"),
        pytest.param(100.0, 0.0, id="full-scores-0"),
        pytest.param(None, 0.5, id="unknown-is-neutral"),
        pytest.param(float("nan"), 0.5, id="nan-is-neutral"),
    ],
)
def test_cpu_and_memory_factor(percent: float | None, expected: float) -> None:
    assert cpu_score(percent) == pytest.approx(expected)
    assert memory_score(percent) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("rtt", "expected"),
    [
        pytest.param(None, 0.5, id="no-rtt-yet-is-neutral"),
        pytest.param(0.0, 1.0, id="zero-rtt-scores-1"),
        pytest.param(100.0, 0.8, id="100ms-scores-0.8"),
        pytest.param(250.0, 0.5, id="250ms-scores-half"),
        pytest.param(500.0, 0.0, id="500ms-scores-0"),
        pytest.param(2000.0, 0.0, id="beyond-500ms-floors-at-0"),
        pytest.param(-5.0, 1.0, id="negative-rtt-clamped"),
    ],
)
def test_latency_factor(rtt: float | None, expected: float) -> None:
    assert latency_score(rtt) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("active", "capacity", "expected"),
    [
        pytest.param(0, 100, 1.0, id="no-requests-scores-1"),
        pytest.param(25, 100, 0.75, id="quarter-busy"),
        pytest.param(100, 100, 0.0, id="at-capacity-scores-0"),
        pytest.param(150, 100, 0.0, id="over-capacity-clamped-to-0"),
        pytest.param(3, 0, 0.5, id="unknown-capacity-is-neutral"),
        pytest.param(None, 100, 0.5, id="no-metrics-is-neutral"),
    ],
)
def test_connection_factor(active: int | None, capacity: int, expected: float) -> None:
    assert connection_score(active, capacity) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("observed", "up", "failures", "expected"),
    [
        pytest.param(0, 0, 0, 1.0, id="no-history-is-fully-reliable"),
        pytest.param(86400, 86400, 0, 1.0, id="up-all-day"),
        pytest.param(100, 90, 0, 0.9, id="down-a-tenth"),
        pytest.param(100, 90, 1, 0.45, id="one-failure-halves"),
        pytest.param(0, 0, 3, 0.25, id="failures-count-without-uptime-history"),
        pytest.param(100, 120, 0, 1.0, id="more-than-observed-is-capped"),
    ],
)
def test_reliability_factor(observed: float, up: float, failures: int, expected: float) -> None:
    assert reliability_score(observed_seconds=observed, up_seconds=up, failures=failures) == pytest.approx(
        expected
    )
    view_score = node("n1", reliability=Reliability(observed, up, failures)).score.reliability
    assert view_score == pytest.approx(expected)


def test_weights_are_the_spec_weights_and_sum_to_one() -> None:
    assert (CPU_WEIGHT, MEMORY_WEIGHT, LATENCY_WEIGHT, CONNECTIONS_WEIGHT, RELIABILITY_WEIGHT) == (
        0.30,
        0.25,
        0.20,
        0.15,
        0.10,
    )
    assert combine(1, 1, 1, 1, 1) == pytest.approx(1.0)
    assert combine(1, 0, 0, 0, 0) == pytest.approx(0.30)
    assert combine(0, 0, 0, 0, 1) == pytest.approx(0.10)


def test_score_records_every_factor_and_the_weighted_total() -> None:
    view = node(
        "n1",
        cpu_pct=90.0,
        mem_pct=40.0,
        rtt=100.0,
        active=25,
        reliability=Reliability(observed_seconds=100, up_seconds=90, failures=1),
    )
    score = view.score
    assert score.factors() == pytest.approx(
        {"cpu": 0.05, "memory": 0.6, "latency": 0.8, "connections": 0.75, "reliability": 0.45}
    )
    assert tuple(score.factors()) == FACTOR_NAMES
    expected = 0.30 * 0.05 + 0.25 * 0.6 + 0.20 * 0.8 + 0.15 * 0.75 + 0.10 * 0.45
    assert score.total == pytest.approx(expected)


def test_node_without_metrics_scores_neutral_on_load_factors() -> None:
    score = node("n1", with_metrics=False, rtt=None).score
    assert (score.cpu, score.memory, score.latency, score.connections, score.reliability) == (
        0.5,
        0.5,
        0.5,
        0.5,
        1.0,
    )


def test_inlined_score_node_agrees_with_the_factor_helpers() -> None:
    rng = random.Random(4)
    for i in range(500):
        view = node(
            f"n{i}",
            cpu_pct=rng.choice([rng.uniform(0, 100), 80.0, 100.0]),
            mem_pct=rng.uniform(0, 100),
            active=rng.randrange(0, 200),
            max_concurrent=rng.choice([0, 50, 100]),
            rtt=rng.choice([None, rng.uniform(0, 800)]),
            with_metrics=rng.random() > 0.1,
            reliability=Reliability(
                observed_seconds=rng.choice([0, 100]),
                up_seconds=rng.randrange(0, 110),
                failures=rng.randrange(0, 3),
            ),
        )
        metrics = view.metrics
        cpu = cpu_score(metrics.cpu_percent if metrics else None)
        memory = memory_score(metrics.memory_percent if metrics else None)
        latency = latency_score(view.rtt_ms)
        connections = connection_score(
            metrics.active_requests if metrics else None, view.capabilities.max_concurrent_requests
        )
        history = view.reliability
        reliability = reliability_score(
            observed_seconds=history.observed_seconds,
            up_seconds=history.up_seconds,
            failures=history.failures,
        )
        assert score_node(view) == score_module.NodeScore(
            cpu,
            memory,
            latency,
            connections,
            reliability,
            combine(cpu, memory, latency, connections, reliability),
        )


# --------------------------------------------------------------------------- feasibility


@pytest.mark.parametrize(
    ("view", "request_", "expected"),
    [
        pytest.param(node("n"), SMALL, None, id="ready-node-with-room-is-feasible"),
        pytest.param(node("n", state=S.BUSY), SMALL, None, id="busy-node-is-feasible"),
        pytest.param(node("n", state=S.DRAINING), SMALL, "node is draining", id="draining-never"),
        pytest.param(node("n", state=S.SUSPECT), SMALL, "node is suspect", id="suspect-never"),
        pytest.param(node("n", state=S.FAILED), SMALL, "node is failed", id="failed-never"),
        pytest.param(node("n", state=S.DEGRADED), SMALL, "node is degraded", id="degraded-never"),
        pytest.param(node("n", state=S.INITIALIZING), SMALL, "node is initializing", id="initializing-never"),
        pytest.param(node("n", state=S.REMOVED), SMALL, "node is removed", id="removed-never"),
        pytest.param(
            node("n", types=("storage",)),
            SMALL,
            "node type mismatch: needs compute, node serves storage",
            id="wrong-node-type",
        ),
        pytest.param(
            node("n", types=("compute", "database")),
            replace(SMALL, node_type="database"),
            None,
            id="node-serving-several-types",
        ),
        pytest.param(
            node("n", cpu=1.0, reserved=Resources(cpu_cores=0.75)),
            SMALL,
            "insufficient CPU: needs 0.5 CPU, 0.25 free",
            id="reserved-cpu-leaves-too-little",
        ),
        pytest.param(
            node("n", memory_gb=1.0, reserved=Resources(memory_mb=768)),
            SMALL,
            "insufficient memory: needs 512 MB memory, 256 MB free",
            id="reserved-memory-leaves-too-little",
        ),
        pytest.param(
            node("n", disk_gb=1.0),
            replace(SMALL, disk_mb=2048),
            "insufficient disk: needs 2048 MB disk, 1024 MB free",
            id="disk-too-small",
        ),
        pytest.param(
            node("n", cpu=0.25, memory_gb=0.25),
            SMALL,
            "insufficient CPU and memory: needs 0.5 CPU, 0.25 free; needs 512 MB memory, 256 MB free",
            id="every-shortfall-is-named",
        ),
        pytest.param(
            node("n", cpu=1.0, reserved=Resources(cpu_cores=1.5)),
            SMALL,
            "insufficient CPU: needs 0.5 CPU, 0 free",
            id="over-committed-shows-zero-free",
        ),
        pytest.param(
            node("n", cpu=0.8, reserved=Resources(cpu_cores=0.1 + 0.2)),
            SMALL,
            None,
            id="exact-fit-despite-float-arithmetic",
        ),
    ],
)
def test_feasibility(view: NodeView, request_: ReplicaRequest, expected: str | None) -> None:
    assert rejection_reason(view, request_) == expected


def test_excluded_node_is_rejected_with_a_reason() -> None:
    assert rejection_reason(node("n"), SMALL, exclude={"n"}) == "excluded from this placement"


def test_filter_nodes_splits_feasible_and_rejected_in_snapshot_order() -> None:
    snapshot = snap(node("a"), node("b", state=S.DRAINING), node("c"), node("d", cpu=0.1))
    feasible, rejected = filter_nodes(snapshot, SMALL)
    assert [n.node_id for n in feasible] == ["a", "c"]
    assert rejected == {"b": "node is draining", "d": "insufficient CPU: needs 0.5 CPU, 0.1 free"}


def test_snapshot_refuses_another_users_node() -> None:
    with pytest.raises(ValueError, match="of user 'u2'"):
        snap(node("a"), node("b", user="u2"))
    with pytest.raises(ValueError, match="of user 'u1'"):
        Snapshot((node("a"),), user_id="u2")


def test_snapshot_refuses_a_node_twice() -> None:
    with pytest.raises(ValueError, match="'a' twice"):
        snap(node("a"), node("b"), node("a"))


# --------------------------------------------------------------------------- select


PLACEMENT_CASES = [
    pytest.param(
        [node("low", cpu_pct=70), node("high", cpu_pct=5), node("mid", cpu_pct=40)],
        SMALL,
        2,
        {},
        ["high", "mid"],
        id="highest-scores-first",
    ),
    pytest.param(
        [
            node("a1", region="a", cpu_pct=1),
            node("a2", region="a", cpu_pct=2),
            node("a3", region="a", cpu_pct=3),
            node("b1", region="b", cpu_pct=90, mem_pct=90),
        ],
        SMALL,
        2,
        {},
        ["a1", "b1"],
        id="spreads-to-a-worse-region-before-a-second-replica",
    ),
    pytest.param(
        [
            node("a1", region="a", cpu_pct=1),
            node("a2", region="a", cpu_pct=2),
            node("b1", region="b", cpu_pct=50),
            node("c1", region="c", cpu_pct=95),
        ],
        SMALL,
        4,
        {},
        ["a1", "b1", "c1", "a2"],
        id="every-region-once-before-any-twice",
    ),
    pytest.param(
        [node("a1", region="a", cpu_pct=1), node("a2", region="a", cpu_pct=2), node("b1", region="b")],
        SMALL,
        1,
        {"occupied_regions": {"a": 1}},
        ["b1"],
        id="occupied-region-goes-last",
    ),
    pytest.param(
        [
            node("best", cpu_pct=1, cpu=1.0, reserved=Resources(cpu_cores=0.75)),
            node("next", cpu_pct=10),
            node("third", cpu_pct=20),
        ],
        SMALL,
        2,
        {},
        ["next", "third"],
        id="reserved-resources-rule-out-the-best-node",
    ),
    pytest.param(
        [
            node("draining", state=S.DRAINING, cpu_pct=0),
            node("suspect", state=S.SUSPECT, cpu_pct=0),
            node("failed", state=S.FAILED, cpu_pct=0),
            node("ok", cpu_pct=90),
            node("busy", state=S.BUSY, cpu_pct=95),
        ],
        SMALL,
        2,
        {},
        ["ok", "busy"],
        id="draining-suspect-failed-never-chosen-even-when-idle",
    ),
    pytest.param(
        [node("db", types=("database",), cpu_pct=0), node("c1", cpu_pct=50), node("c2", cpu_pct=60)],
        SMALL,
        2,
        {},
        ["c1", "c2"],
        id="compute-request-skips-database-nodes",
    ),
    pytest.param(
        [node("db", types=("database",), cpu_pct=90), node("c1", cpu_pct=0)],
        replace(SMALL, node_type="database"),
        1,
        {},
        ["db"],
        id="database-request-takes-database-nodes-only",
    ),
    pytest.param(
        [node("best", cpu_pct=0), node("second", cpu_pct=10), node("third", cpu_pct=20)],
        SMALL,
        2,
        {"exclude": frozenset({"best"})},
        ["second", "third"],
        id="excluded-node-is-never-used",
    ),
    pytest.param(
        [node("best", cpu_pct=0), node("second", cpu_pct=10), node("third", cpu_pct=20)],
        SMALL,
        2,
        {"avoid": frozenset({"best"})},
        ["second", "third"],
        id="avoided-node-unused-while-others-suffice",
    ),
    pytest.param(
        [node("best", cpu_pct=0), node("second", cpu_pct=10), node("third", cpu_pct=20)],
        SMALL,
        3,
        {"avoid": frozenset({"best", "third"})},
        ["second", "best", "third"],
        id="avoided-nodes-are-the-last-resort",
    ),
]


@pytest.mark.parametrize(("nodes", "request_", "replicas", "kwargs", "expected"), PLACEMENT_CASES)
def test_place(
    nodes: list[NodeView],
    request_: ReplicaRequest,
    replicas: int,
    kwargs: dict[str, object],
    expected: list[str],
) -> None:
    placement = place(snap(*nodes), request_, replicas, "deployment-1", **kwargs)  # type: ignore[arg-type]
    assert placement.node_ids == expected
    assert len(set(placement.node_ids)) == replicas


def test_last_resort_choices_are_flagged() -> None:
    placement = place(
        snap(node("a", cpu_pct=0), node("b", cpu_pct=10)), SMALL, 2, "d", avoid=frozenset({"a"})
    )
    assert [(c.node_id, c.last_resort) for c in placement.selected] == [("b", False), ("a", True)]
    assert placement.explanations()[1].reason == "selected as a last resort"


def test_choice_carries_the_nodes_factors_and_region() -> None:
    view = node("n1", region="us-east", cpu_pct=90, rtt=100.0)
    choice = place(snap(view), SMALL, 1, "d").selected[0]
    assert (choice.node_id, choice.region, choice.total_score) == ("n1", "us-east", view.score.total)
    assert choice.factors == view.score.factors()


def test_replicas_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        place(snap(node("a")), SMALL, 0, "d")


# --------------------------------------------------------------------------- insufficient capacity


def test_insufficient_capacity_names_every_rejected_nodes_reason() -> None:
    snapshot = snap(
        node("ok"),
        node("drain", state=S.DRAINING),
        node("tiny", cpu=1.0, reserved=Resources(cpu_cores=0.75)),
        node("store", types=("storage",)),
        node("gone", state=S.FAILED),
    )
    with pytest.raises(Unavailable) as caught:
        place(snapshot, SMALL, 3, "d", exclude=frozenset({"gone"}))
    error = caught.value
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.reason == "INSUFFICIENT_CAPACITY"
    assert error.message.startswith("Insufficient capacity for 3 replicas: 1 of 5 nodes can take a replica")
    for expected in (
        "drain (node is draining)",
        "tiny (insufficient CPU: needs 0.5 CPU, 0.25 free)",
        "store (node type mismatch: needs compute, node serves storage)",
        "gone (excluded from this placement)",
    ):
        assert expected in error.message
    assert error.metadata == {
        "replicas_requested": "3",
        "nodes": "5",
        "feasible_nodes": "1",
        "rejected_nodes": "4",
        "rejected_excluded": "1",
        "rejected_node_type": "1",
        "rejected_resources": "1",
        "rejected_state": "1",
    }


def test_insufficient_capacity_message_is_truncated_for_many_nodes() -> None:
    nodes = [node(f"n{i:02d}", state=S.SUSPECT) for i in range(20)]
    nodes += [node(f"m{i:02d}", cpu=0.1) for i in range(5)]
    with pytest.raises(Unavailable) as caught:
        place(snap(*nodes), SMALL, 1, "d")
    message = caught.value.message
    assert message.startswith("Insufficient capacity for 1 replica: 0 of 25 nodes")
    assert message.count("(node is suspect)") == select_module.MAX_REASONS_IN_MESSAGE
    assert "and 15 more (10 not ready or busy, 5 insufficient resources)" in message
    assert caught.value.metadata["rejected_state"] == "20"


def test_no_nodes_at_all() -> None:
    with pytest.raises(Unavailable, match="there are no nodes") as caught:
        place(Snapshot(()), SMALL, 1, "d")
    assert caught.value.metadata["nodes"] == "0"


def test_fewer_feasible_than_replicas_with_avoided_nodes_counts_them_as_feasible() -> None:
    snapshot = snap(node("a"), node("b"), node("c", state=S.FAILED))
    placement = place(snapshot, SMALL, 2, "d", avoid=frozenset({"a", "b"}))
    assert sorted(placement.node_ids) == ["a", "b"]
    with pytest.raises(Unavailable, match="2 of 3 nodes"):
        place(snapshot, SMALL, 3, "d", avoid=frozenset({"a"}))


# --------------------------------------------------------------------------- seeded tie-break


def identical(count: int, region: str = "eu-west", prefix: str = "n") -> list[NodeView]:
    return [node(f"{prefix}{i:02d}", region=region) for i in range(count)]


def test_the_same_seed_replays_exactly_whatever_the_snapshot_order() -> None:
    nodes = identical(12)
    first = place(snap(*nodes), SMALL, 3, "deployment-42").node_ids
    again = place(snap(*nodes), SMALL, 3, "deployment-42").node_ids
    reordered = place(snap(*reversed(nodes)), SMALL, 3, "deployment-42").node_ids
    assert first == again == reordered


def test_different_seeds_break_ties_differently() -> None:
    nodes = snap(*identical(12))
    choices = {tuple(place(nodes, SMALL, 3, f"deployment-{i}").node_ids) for i in range(10)}
    assert len(choices) >= 5


def test_seeded_region_tiebreak_spreads_single_replicas_over_equal_regions() -> None:
    nodes = snap(*identical(3, "a", "a"), *identical(3, "b", "b"), *identical(3, "c", "c"))
    regions = [place(nodes, SMALL, 1, f"deployment-{i}").selected[0].region for i in range(30)]
    assert set(regions) == {"a", "b", "c"}
    assert regions == [place(nodes, SMALL, 1, f"deployment-{i}").selected[0].region for i in range(30)]


def test_tie_order_is_a_prefix_consistent_shuffle() -> None:
    rows = [node(f"n{i}").placement_row for i in range(20)]
    full = list(tie_order("seed", 0.5, "r", list(rows)))
    lazy = tie_order("seed", 0.5, "r", list(rows))
    assert list(itertools.islice(lazy, 5)) == full[:5]
    assert sorted(full) == sorted(rows)


# --------------------------------------------------------------------------- differential check


def reference_place(
    snapshot: Snapshot,
    request: ReplicaRequest,
    replicas: int,
    seed: str,
    exclude: frozenset[str],
    avoid: frozenset[str],
    occupied: dict[str, int],
) -> list[str] | None:
    """The decision rule of select.py written the slow, obvious way."""
    feasible, _ = filter_nodes(snapshot, request, exclude=exclude)
    by_region: dict[str, list[NodeView]] = defaultdict(list)
    for view in feasible:
        by_region[view.region].append(view)
    ordered: dict[str, list[NodeView]] = {}
    for region, views in by_region.items():
        views.sort(key=lambda v: (-v.score.total, v.node_id))
        out: list[NodeView] = []
        for score, group in itertools.groupby(views, key=lambda v: v.score.total):
            members = list(group)
            if len(members) > 1:
                rows = list(tie_order(seed, score, region, [m.placement_row for m in members]))
                out.extend(snapshot.node(row[1]) for row in rows)  # type: ignore[misc]
            else:
                out.extend(members)
        ordered[region] = out
    occupied = dict(occupied)
    picks: list[str] = []
    for pool in (
        {r: [v for v in vs if v.node_id not in avoid] for r, vs in ordered.items()},
        {r: [v for v in vs if v.node_id in avoid] for r, vs in ordered.items()},
    ):
        while len(picks) < replicas and any(pool.values()):
            region = min(
                (r for r in pool if pool[r]),
                key=lambda r: (
                    occupied.get(r, 0),
                    -pool[r][0].score.total,
                    region_tiebreak(seed, pool[r][0].score.total, r),
                    r,
                ),
            )
            picks.append(pool[region].pop(0).node_id)
            occupied[region] = occupied.get(region, 0) + 1
    return picks if len(picks) == replicas else None


def random_snapshot(rng: random.Random, size: int) -> Snapshot:
    views = []
    for i in range(size):
        views.append(
            node(
                f"n{i:03d}",
                region=rng.choice("abcde"),
                state=rng.choice([S.READY] * 6 + [S.BUSY, S.DRAINING, S.SUSPECT, S.FAILED]),
                types=rng.choice([("compute",)] * 4 + [("compute", "database"), ("storage",)]),
                cpu=rng.choice([0.5, 1.0, 2.0]),
                memory_gb=rng.choice([0.5, 1.0, 2.0]),
                reserved=Resources(cpu_cores=rng.choice([0.0, 0.5, 1.0]), memory_mb=rng.choice([0, 512])),
                # coarse values so that equal scores (ties) are common
                cpu_pct=rng.choice([10.0, 50.0, 85.0]),
                mem_pct=rng.choice([20.0, 90.0]),
                rtt=rng.choice([None, 100.0]),
            )
        )
    rng.shuffle(views)
    return Snapshot(tuple(views))


def test_fast_selection_matches_the_brute_force_reference() -> None:
    rng = random.Random(2024)
    checked = 0
    for trial in range(300):
        snapshot = random_snapshot(rng, rng.randrange(0, 60))
        ids = [v.node_id for v in snapshot.nodes]
        replicas = rng.randrange(1, 7)
        exclude = frozenset(rng.sample(ids, min(len(ids), rng.randrange(0, 4))))
        avoid = frozenset(rng.sample(ids, min(len(ids), rng.randrange(0, 6))))
        occupied = {r: rng.randrange(0, 3) for r in rng.sample("abcde", rng.randrange(0, 3))}
        request = rng.choice([SMALL, replace(SMALL, cpu_cores=1.0), replace(SMALL, node_type="database")])
        seed = f"deployment-{trial}"
        expected = reference_place(snapshot, request, replicas, seed, exclude, avoid, occupied)
        try:
            got = place(
                snapshot, request, replicas, seed, exclude=exclude, avoid=avoid, occupied_regions=occupied
            ).node_ids
        except Unavailable:
            got = None
        assert got == expected, f"trial {trial}"
        checked += got is not None
    assert checked > 100  # most trials did place something


# --------------------------------------------------------------------------- explanations


def test_explanations_give_factors_of_chosen_and_reasons_of_rejected() -> None:
    snapshot = snap(node("a", cpu_pct=0), node("b"), node("c", state=S.DRAINING), node("d", cpu=0.1))
    placement = place(snapshot, SMALL, 1, "d")
    explanations = placement.explanations()
    assert [(e.node_id, e.selected) for e in explanations] == [("a", True), ("c", False), ("d", False)]
    assert set(explanations[0].factor_scores) == set(FACTOR_NAMES)
    assert explanations[0].total_score == pytest.approx(snapshot.node("a").score.total)  # type: ignore[union-attr]
    assert explanations[1].reason == "node is draining"
    assert placement.rejected == {"c": "node is draining", "d": "insufficient CPU: needs 0.5 CPU, 0.1 free"}
    assert [e.node_id for e in placement.explanations(max_rejected=1)] == ["a", "c"]


def test_why_answers_for_every_node() -> None:
    snapshot = snap(node("a", cpu_pct=0), node("b", cpu_pct=50), node("c", state=S.SUSPECT), node("x"))
    placement = place(snapshot, SMALL, 1, "d", avoid=frozenset({"x"}))
    assert placement.why("a").startswith("selected (score")
    assert placement.why("b").startswith("feasible with score")
    assert placement.why("c") == "node is suspect"
    assert placement.why("x").startswith("feasible, but avoided")
    assert placement.why("nope") == "not one of your nodes"


# --------------------------------------------------------------------------- traffic


def target(node_id: str, *, healthy: bool = True, active: int = 0, score: float = 0.5) -> ReplicaTarget:
    return ReplicaTarget(
        node_id=node_id,
        endpoint=f"http://{node_id}:8080",
        healthy=healthy,
        active_requests=active,
        score=score,
    )


def test_pick_endpoint_never_returns_an_unhealthy_replica() -> None:
    replicas = [
        target("a", healthy=False),
        target("b", active=50),
        target("c", healthy=False),
        target("d", active=5),
    ]
    rng = random.Random(1)
    picked = {pick_endpoint(replicas, rng).node_id for _ in range(1000)}
    assert picked <= {"b", "d"}


def test_pick_endpoint_prefers_the_less_loaded_of_two() -> None:
    replicas = [target("busy", active=90), target("idle", active=1)]
    rng = random.Random(2)
    assert {pick_endpoint(replicas, rng).node_id for _ in range(50)} == {"idle"}


def test_pick_endpoint_spreads_load_over_equal_replicas() -> None:
    replicas = [target(f"r{i}", active=3) for i in range(4)]
    rng = random.Random(3)
    counts = defaultdict(int)
    for _ in range(400):
        counts[pick_endpoint(replicas, rng).node_id] += 1
    assert set(counts) == {"r0", "r1", "r2", "r3"}


def test_pick_endpoint_equal_load_goes_to_the_higher_score() -> None:
    replicas = [target("low", active=3, score=0.2), target("high", active=3, score=0.9)]
    assert {pick_endpoint(replicas, random.Random(i)).node_id for i in range(20)} == {"high"}


@pytest.mark.parametrize(
    "replicas",
    [pytest.param([], id="no-replicas"), pytest.param([target("a", healthy=False)], id="none-healthy")],
)
def test_pick_endpoint_without_healthy_replicas_is_unavailable(replicas: list[ReplicaTarget]) -> None:
    with pytest.raises(Unavailable) as caught:
        pick_endpoint(replicas, random.Random(0))
    assert caught.value.reason == "NO_HEALTHY_REPLICA"


def test_pick_endpoint_single_healthy_replica() -> None:
    assert pick_endpoint([target("a", healthy=False), target("b")], random.Random(0)).node_id == "b"


# --------------------------------------------------------------------------- package surface


def test_public_names_are_exactly_the_api() -> None:
    assert set(controller.scheduling.__all__) == {
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
    }
    for name in controller.scheduling.__all__:
        assert getattr(controller.scheduling, name) is not None


@pytest.mark.parametrize(
    "module",
    [score_module, feasible_module, snapshot_module, select_module, history_module, plan_module],
    ids=lambda m: m.__name__,
)
def test_docstring_examples_run(module: object) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)  # type: ignore[arg-type]
    assert result.failed == 0


# --------------------------------------------------------------------------- complete inputs (issue 11)


def _order(*views: NodeView) -> list[str]:
    return place(Snapshot(views), SMALL, len(views), seed="s").node_ids


@pytest.mark.parametrize(
    ("better", "worse", "factor", "gap"),
    [
        # Only the RTT differs: 50 ms vs 300 ms is 0.9 vs 0.4 latency, weight 0.20.
        pytest.param({"rtt": 50.0}, {"rtt": 300.0}, "latency", 0.20 * 0.5, id="rtt"),
        # Only reliability differs: up 90 % with one failure vs always up, weight 0.10.
        pytest.param(
            {"reliability": Reliability(86400, 86400, 0)},
            {"reliability": Reliability(86400, 77760, 1)},
            "reliability",
            0.10 * (1.0 - 0.45),
            id="reliability",
        ),
        # Only active connections differ: 10 vs 60 of 100, weight 0.15.
        pytest.param({"active": 10}, {"active": 60}, "connections", 0.15 * 0.5, id="connections"),
    ],
)
def test_nodes_differing_in_one_factor_are_ordered_by_its_weight(
    better: dict[str, object], worse: dict[str, object], factor: str, gap: float
) -> None:
    good = node("good", region="r", **better)  # type: ignore[arg-type]
    bad = node("bad", region="r", **worse)  # type: ignore[arg-type]
    assert good.score.total - bad.score.total == pytest.approx(gap)
    others = set(FACTOR_NAMES) - {factor}
    assert {k: good.score.factors()[k] for k in others} == {k: bad.score.factors()[k] for k in others}
    for views in ((good, bad), (bad, good)):
        assert _order(*views) == ["good", "bad"]
        assert place(Snapshot(views), SMALL, 1, seed="s").node_ids == ["good"]


def test_a_storage_only_node_never_gets_an_app_replica() -> None:
    storage = node("storage", types=("storage",), cpu_pct=0.0, mem_pct=0.0, rtt=1.0)
    compute = node("compute", types=("compute",), cpu_pct=70.0, mem_pct=70.0, rtt=400.0)
    placement = place(Snapshot((storage, compute)), SMALL, 1, seed="s")
    assert placement.node_ids == ["compute"]
    assert placement.why("storage") == "node type mismatch: needs compute, node serves storage"
    with pytest.raises(Unavailable):
        place(Snapshot((storage, compute)), SMALL, 2, seed="s")


@pytest.mark.parametrize(
    ("changes", "now", "expected"),
    [
        pytest.param([], 100.0, Reliability(0.0, 0.0, 0), id="never-seen-no-history"),
        pytest.param([(S.READY, 0.0)], 100.0, Reliability(100.0, 100.0, 0), id="ready-since-first-heartbeat"),
        pytest.param(
            [(S.INITIALIZING, 0.0), (S.READY, 40.0)], 100.0, Reliability(60.0, 60.0, 0), id="init-unobserved"
        ),
        pytest.param(
            [(S.READY, 0.0), (S.SUSPECT, 10.0), (S.FAILED, 20.0), (S.READY, 50.0)],
            100.0,
            Reliability(100.0, 60.0, 1),
            id="down-40s-one-failure",
        ),
        pytest.param(
            [(S.READY, 0.0), (S.BUSY, 10.0), (S.DEGRADED, 20.0), (S.DRAINING, 30.0)],
            100.0,
            Reliability(100.0, 100.0, 0),
            id="busy-degraded-draining-are-up",
        ),
        # Window of 100 s: the failure at 20 s and the down time before 150 s drop out.
        pytest.param(
            [(S.READY, 0.0), (S.FAILED, 20.0), (S.READY, 60.0)],
            250.0,
            Reliability(100.0, 100.0, 0),
            id="old-failures-leave-the-window",
        ),
        pytest.param(
            [(S.READY, 0.0), (S.FAILED, 20.0), (S.READY, 160.0)],
            200.0,
            Reliability(100.0, 40.0, 0),
            id="window-start-inside-a-down-span",
        ),
        pytest.param(
            [(S.READY, 0.0), (S.REMOVED, 10.0)], 100.0, Reliability(0.0, 0.0, 0), id="removed-forgotten"
        ),
    ],
)
def test_node_history_uptime_share_and_failures(
    changes: list[tuple[NodeState, float]], now: float, expected: Reliability
) -> None:
    history = NodeHistory(window_seconds=100.0)
    for state, at in changes:
        history.record("n1", state, at)
    assert history.reliability("n1", now) == expected


def test_node_history_is_bounded_by_the_window() -> None:
    history = NodeHistory(window_seconds=10.0)
    for i in range(1000):
        history.record("n1", S.FAILED if i % 2 else S.READY, float(i))
    assert len(history._spans["n1"]) <= 12
    assert len(history._failures["n1"]) <= 6


def test_plan_spreads_a_replacement_to_the_region_the_deployment_lacks() -> None:
    # The deployment runs in eu (n1) and us (n3); replica on n2 (eu) is being replaced.
    # The best remaining node (n4) is in eu, but ap holds no replica: the replacement goes to ap.
    views = (
        node("n1", region="eu", cpu_pct=50.0),
        node("n2", region="eu", cpu_pct=10.0),
        node("n3", region="us", cpu_pct=50.0),
        node("n4", region="eu", cpu_pct=0.0),
        node("n5", region="ap", cpu_pct=60.0),
    )
    regions = {v.node_id: v.region for v in views}
    chosen = plan_module.plan(
        Snapshot(views), regions, SMALL, 1, seed="d|0|3", hosting=["n1", "n3"], exclude={"n2"}
    )
    assert chosen.node_ids == ["n5"]
    # Without the deployment's other replicas counted, the best score (n4, eu) would win.
    assert place(Snapshot(views), SMALL, 1, seed="d|0|3", exclude=frozenset({"n2"})).node_ids == ["n4"]
