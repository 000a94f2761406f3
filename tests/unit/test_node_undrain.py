"""UndrainRequested in the health state machine: a pure table of cases (issue 11)."""

from __future__ import annotations

import pytest

from controller.nodes.health import (
    DrainRequested,
    HealthConfig,
    HeartbeatReceived,
    Metrics,
    NodeHealth,
    NodeState,
    StreamBroken,
    Tick,
    UndrainRequested,
    transition,
)

CONFIG = HealthConfig.fast(1.0)
OK = Metrics(
    cpu_percent=20,
    memory_percent=30,
    disk_percent=10,
    active_requests=1,
    error_rate=0,
    avg_response_time_ms=5,
)
HOT = Metrics(
    cpu_percent=95,
    memory_percent=30,
    disk_percent=10,
    active_requests=1,
    error_rate=0,
    avg_response_time_ms=5,
)


def _run(*events: object) -> NodeHealth:
    node = NodeHealth.registered("n1", at=0.0)
    for event in events:
        node = transition(node, event, CONFIG).new  # type: ignore[arg-type]
    return node


@pytest.mark.parametrize(
    ("events", "state", "draining"),
    [
        pytest.param(
            [HeartbeatReceived(0.1, OK), DrainRequested(0.2), UndrainRequested(0.3)],
            NodeState.READY,
            False,
            id="drained-ready-node-is-ready-again",
        ),
        pytest.param(
            [HeartbeatReceived(0.1, HOT), DrainRequested(0.2), UndrainRequested(0.3)],
            NodeState.BUSY,
            False,
            id="its-last-heartbeat-decides",
        ),
        pytest.param(
            [DrainRequested(0.2), UndrainRequested(0.3)], NodeState.INITIALIZING, False, id="never-heartbeat"
        ),
        pytest.param(
            [HeartbeatReceived(0.1, OK), DrainRequested(0.2), StreamBroken(0.3), UndrainRequested(0.4)],
            NodeState.SUSPECT,
            False,
            id="a-suspect-node-stays-suspect",
        ),
        pytest.param(
            [
                HeartbeatReceived(0.1, OK),
                DrainRequested(0.2),
                StreamBroken(0.3),
                UndrainRequested(0.4),
                HeartbeatReceived(0.5, OK),
            ],
            NodeState.READY,
            False,
            id="and-comes-back-ready-not-draining",
        ),
        pytest.param(
            [
                HeartbeatReceived(0.1, OK),
                DrainRequested(0.2),
                UndrainRequested(0.3),
                HeartbeatReceived(0.9, OK),
            ],
            NodeState.READY,
            False,
            id="heartbeats-keep-it-undrained",
        ),
        pytest.param(
            [HeartbeatReceived(0.1, OK), UndrainRequested(0.3)],
            NodeState.READY,
            False,
            id="not-draining-no-change",
        ),
        pytest.param(
            [HeartbeatReceived(0.1, OK), DrainRequested(0.2), UndrainRequested(0.3), Tick(1.5)],
            NodeState.SUSPECT,
            False,
            id="still-monitored-for-silence",
        ),
    ],
)
def test_undrain(events: list[object], state: NodeState, draining: bool) -> None:
    node = _run(*events)
    assert (node.state, node.draining) == (state, draining)


def test_undrain_of_a_node_not_draining_changes_nothing() -> None:
    node = _run(HeartbeatReceived(0.1, OK))
    result = transition(node, UndrainRequested(0.3), CONFIG)
    assert result.new is node
    assert not result.changed


def test_undrain_reports_a_state_change_with_its_reason() -> None:
    node = _run(HeartbeatReceived(0.1, OK), DrainRequested(0.2))
    result = transition(node, UndrainRequested(0.3), CONFIG)
    assert result.changed
    assert result.previous_state is NodeState.DRAINING
    assert result.new.reason == "drain lifted (healthy heartbeat)"
    assert result.new.last_transition_at == 0.3
