"""The per-heartbeat fast paths agree with the general code they short-cut."""

from __future__ import annotations

import math
from dataclasses import fields, replace

import pytest

from controller.nodes.health import (
    HealthConfig,
    HeartbeatReceived,
    Metrics,
    NodeHealth,
    NodeState,
    metrics_problem,
    transition,
)
from controller.nodes.validation import METRIC_LIMITS, values_problem

VALUES = [0, 1, 99, 100, 101, -1, 0.0, 50.5, 100.0, 100.000001, -0.0, -1e-9, 1e308, 2**70, math.nan, math.inf,
          -math.inf, True, False, 86_400_000.0, 86_400_001.0, 1_000_000, 1_000_001]  # fmt: skip


def _general(metrics: Metrics) -> str | None:
    return values_problem({f.name: getattr(metrics, f.name) for f in fields(metrics)}, METRIC_LIMITS)


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("name", [f.name for f in fields(Metrics)])
def test_metrics_problem_matches_the_general_check(name: str, value: object) -> None:
    metrics = replace(Metrics(10.0, 20.0, 30.0, 1, 0.5, 12.0, 60), **{name: value})
    assert metrics_problem(metrics) == _general(metrics)


def test_the_first_problem_in_field_order_is_reported() -> None:
    metrics = Metrics(math.nan, 101.0, -1.0, 0, 0.0, 0.0)
    assert metrics_problem(metrics) == _general(metrics) == "cpu_percent is NaN"


@pytest.mark.parametrize("draining", [False, True])
@pytest.mark.parametrize("cpu", [10.0, 95.0, math.nan])
def test_a_heartbeat_keeps_every_field_it_does_not_own(draining: bool, cpu: float) -> None:
    config = HealthConfig(interval_seconds=1.0)
    old_metrics = Metrics(1.0, 2.0, 3.0, 4, 0.0, 6.0, 7)
    health = NodeHealth(
        node_id="n1",
        state=NodeState.SUSPECT,
        monitored_since=5.0,
        last_transition_at=6.0,
        reason="silence",
        last_heartbeat_at=7.0,
        consecutive_missed=2,
        stream_connected=False,
        draining=draining,
        grace_until=99.0,
        last_metrics=old_metrics,
    )
    owned = {"state", "reason", "last_heartbeat_at", "consecutive_missed", "stream_connected", "grace_until",
             "last_metrics", "last_transition_at"}  # fmt: skip
    assert owned < {f.name for f in fields(NodeHealth)}
    metrics = Metrics(cpu, 20.0, 30.0, 1, 0.5, 12.0, 60)
    result = transition(health, HeartbeatReceived(at=10.0, metrics=metrics), config)
    for item in fields(NodeHealth):
        if item.name not in owned:
            assert getattr(result.new, item.name) == getattr(health, item.name), item.name
    assert result.changed
    assert result.new.last_transition_at == 10.0
    assert result.new.last_heartbeat_at == 10.0
    assert result.new.last_metrics is (old_metrics if math.isnan(cpu) else metrics)
    again = transition(result.new, HeartbeatReceived(at=11.0, metrics=metrics), config)
    assert not again.changed
    assert again.new.last_transition_at == 10.0
