"""What a node may claim: every number finite and within its limit (controller.nodes.validation),
and the last guard in placement's view of a node (controller.scheduling.snapshot)."""

from __future__ import annotations

import doctest
import math

import pytest
from automator67.v1 import common_pb2, node_pb2

from controller.nodes import validation
from controller.nodes.health import Metrics, NodeState, metrics_problem
from controller.nodes.validation import (
    CAPABILITY_LIMITS,
    METRIC_LIMITS,
    PERCENT,
    Limit,
    capability_violations,
    hello_violations,
    number_problem,
    valid_replicas,
)
from controller.scheduling.snapshot import Capabilities, NodeView, capabilities_problem

NAN = float("nan")
INF = math.inf
HUGE = 1e308


@pytest.mark.parametrize(
    ("value", "limit", "problem"),
    [
        (NAN, PERCENT, "is NaN"),
        (-NAN, PERCENT, "is NaN"),
        (INF, PERCENT, "is infinite"),
        (-INF, PERCENT, "is infinite"),
        (-50.0, PERCENT, "is negative (-50)"),
        (-1e-300, PERCENT, "is negative (-1e-300)"),
        (HUGE, PERCENT, "is above 100 (1e+308)"),
        (math.nextafter(100.0, INF), PERCENT, "is above 100 (100.00000000000001)"),
        (100.0, PERCENT, None),
        (0.0, PERCENT, None),
        (-0.0, PERCENT, None),
        (5e-324, PERCENT, None),
        (-1, Limit(0, 10), "is negative (-1)"),
        (11, Limit(0, 10), "is above 10 (11)"),
        (10, Limit(0, 10), None),
        (0, Limit(0, 10, positive=True), "is not above 0 (0)"),
        (0.5, Limit(1, 10), "is below 1 (0.5)"),
        (True, Limit(0, 10), "is not a number"),
        ("5", Limit(0, 10), "is not a number"),
        (None, Limit(0, 10), "is not a number"),
    ],
)
def test_number_problem(value: object, limit: Limit, problem: str | None) -> None:
    assert number_problem(value, limit) == problem


def test_every_limit_is_finite_and_ordered() -> None:
    for limit in [*METRIC_LIMITS.values(), *CAPABILITY_LIMITS.values(), *validation.REPLICA_LIMITS.values()]:
        assert math.isfinite(limit.low)
        assert math.isfinite(limit.high)
        assert 0 <= limit.low < limit.high


def _metrics(**overrides: float) -> Metrics:
    values: dict[str, float] = {
        "cpu_percent": 20.0,
        "memory_percent": 30.0,
        "disk_percent": 40.0,
        "active_requests": 3,
        "error_rate": 0.0,
        "avg_response_time_ms": 12.0,
        "uptime_seconds": 60,
    }
    values.update(overrides)
    return Metrics(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({}, None),
        ({"cpu_percent": NAN}, "cpu_percent is NaN"),
        ({"memory_percent": HUGE}, "memory_percent is above 100 (1e+308)"),
        ({"disk_percent": -50.0}, "disk_percent is negative (-50)"),
        ({"error_rate": INF}, "error_rate is infinite"),
        ({"error_rate": 100.0}, None),
        ({"active_requests": -1}, "active_requests is negative (-1)"),
        ({"active_requests": 1_000_000}, None),
        ({"active_requests": 1_000_001}, "active_requests is above 1000000 (1000001)"),
        ({"avg_response_time_ms": HUGE}, "avg_response_time_ms is above 86400000 (1e+308)"),
        ({"avg_response_time_ms": 86_400_000.0}, None),
        ({"avg_response_time_ms": -INF}, "avg_response_time_ms is infinite"),
        ({"uptime_seconds": -1}, "uptime_seconds is negative (-1)"),
        ({"uptime_seconds": 2**62}, "uptime_seconds is above"),
    ],
)
def test_heartbeat_metrics(overrides: dict[str, float], problem: str | None) -> None:
    found = metrics_problem(_metrics(**overrides))
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert found.startswith(problem)


def _caps(**overrides: object) -> common_pb2.NodeCapabilities:
    values: dict[str, object] = {"cpu_cores": 2.0, "memory_gb": 4.0, "disk_gb": 20.0}
    values.update(overrides)
    return common_pb2.NodeCapabilities(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("caps", "registration", "fields"),
    [
        (_caps(), False, set()),
        (_caps(), True, set()),
        (common_pb2.NodeCapabilities(), False, set()),  # nothing announced
        (common_pb2.NodeCapabilities(), True, {"cpu_cores", "memory_gb"}),
        (_caps(cpu_cores=NAN), False, {"cpu_cores"}),
        (_caps(cpu_cores=INF, memory_gb=-INF), False, {"cpu_cores", "memory_gb"}),
        (_caps(cpu_cores=-2.0), False, {"cpu_cores"}),
        (_caps(cpu_cores=4096.0), False, set()),
        (_caps(cpu_cores=4097.0), False, {"cpu_cores"}),
        (_caps(memory_gb=HUGE), False, {"memory_gb"}),
        (_caps(memory_gb=65_536.0), False, set()),
        (_caps(disk_gb=-50.0), False, {"disk_gb"}),
        (_caps(disk_gb=0.0), True, set()),
        (_caps(disk_gb=HUGE), False, {"disk_gb"}),
        (_caps(network_bandwidth_mbps=NAN), False, {"network_bandwidth_mbps"}),
        (_caps(network_bandwidth_mbps=1e7), False, {"network_bandwidth_mbps"}),
        (_caps(max_concurrent_requests=-1), False, {"max_concurrent_requests"}),
        (_caps(max_concurrent_requests=2_000_000_000), False, {"max_concurrent_requests"}),
        (_caps(max_concurrent_requests=1_000_000), False, set()),
        (_caps(node_types=["compute", "gpu"]), False, {"node_types"}),
        (_caps(node_types=["compute"] * 17), False, {"node_types"}),
        (_caps(node_types=["compute", "database", "storage"]), False, set()),
    ],
)
def test_capabilities(caps: common_pb2.NodeCapabilities, registration: bool, fields: set[str]) -> None:
    violations = capability_violations(caps, registration=registration)
    assert {v.field for v in violations} == {f"capabilities.{name}" for name in fields}
    for violation in violations:
        assert violation.description  # says what is wrong and what is allowed
        if not violation.field.endswith("node_types"):
            assert "must be a finite number" in violation.description


def test_hello_violations_name_every_bad_field() -> None:
    hello = node_pb2.NodeHello(
        agent_version="x",
        capabilities=_caps(cpu_cores=NAN, memory_gb=INF, disk_gb=-50, max_concurrent_requests=-1),
        replicas=[
            node_pb2.ReplicaState(deployment_id="d", replica_index=0, generation=1),
            node_pb2.ReplicaState(deployment_id="d", replica_index=-1, generation=-5),
        ],
    )
    violations = {v.field: v.description for v in hello_violations(hello)}
    assert set(violations) == {
        "hello.capabilities.cpu_cores",
        "hello.capabilities.memory_gb",
        "hello.capabilities.disk_gb",
        "hello.capabilities.max_concurrent_requests",
        "hello.replicas[1].replica_index",
        "hello.replicas[1].generation",
    }
    assert violations["hello.capabilities.cpu_cores"].startswith("is NaN")
    assert violations["hello.capabilities.disk_gb"].startswith("is negative (-50)")


def test_a_hello_without_capabilities_is_valid() -> None:
    assert hello_violations(node_pb2.NodeHello(agent_version="bench")) == []


def test_invalid_replica_entries_are_dropped() -> None:
    good = node_pb2.ReplicaState(deployment_id="d", replica_index=2, generation=7)
    bad = node_pb2.ReplicaState(deployment_id="d", replica_index=-3, generation=7)
    huge = node_pb2.ReplicaState(deployment_id="d", replica_index=0, generation=2**60)
    assert valid_replicas([good, bad, huge]) == [good]


def _view(capabilities: Capabilities, metrics: Metrics | None) -> NodeView:
    return NodeView(
        node_id="n1",
        user_id="u1",
        region="r",
        state=NodeState.READY,
        capabilities=capabilities,
        metrics=metrics,
    )


@pytest.mark.parametrize(
    "capabilities",
    [
        Capabilities(cpu_cores=NAN, memory_gb=4, disk_gb=20),
        Capabilities(cpu_cores=2, memory_gb=INF, disk_gb=20),
        Capabilities(cpu_cores=2, memory_gb=4, disk_gb=-50),
        Capabilities(cpu_cores=2, memory_gb=HUGE, disk_gb=20),
        Capabilities(cpu_cores=2, memory_gb=4, disk_gb=20, max_concurrent_requests=-1),
    ],
)
def test_a_view_with_invalid_capabilities_offers_nothing(capabilities: Capabilities) -> None:
    assert capabilities_problem(capabilities) is not None
    view = _view(capabilities, _metrics())
    assert (view.free_cpu_cores, view.free_memory_mb, view.free_disk_mb) == (0, 0, 0)
    assert math.isfinite(view.score.total)


def test_a_view_drops_invalid_metrics_and_keeps_valid_ones() -> None:
    caps = Capabilities(cpu_cores=2, memory_gb=4, disk_gb=20, max_concurrent_requests=10)
    assert _view(caps, _metrics(cpu_percent=NAN, memory_percent=HUGE)).metrics is None
    valid = _metrics()
    kept = _view(caps, valid)
    assert kept.metrics == valid
    assert kept.capabilities == caps
    assert math.isfinite(kept.score.total)


def test_doctests() -> None:
    assert doctest.testmod(validation).failed == 0
