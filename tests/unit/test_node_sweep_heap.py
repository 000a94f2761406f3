"""The sweep visits only nodes whose due time passed, with exactly the results of ticking
every node: checked against a reference that ticks them all, over random event sequences."""

from __future__ import annotations

import random

import pytest

from controller.nodes.health import (
    ControllerRestarted,
    DrainRequested,
    HealthConfig,
    HeartbeatReceived,
    Metrics,
    NodeHealth,
    NodeState,
    StreamBroken,
    StreamConnected,
    Tick,
    UndrainRequested,
    tick_due,
    transition,
)
from controller.nodes.monitor import SWEEP_BATCH, HealthMonitor, MonitorConfig

CONFIG = HealthConfig.fast(1.0)
OK = Metrics(10, 20, 30, 0, 0, 5)
HOT = Metrics(95, 20, 30, 0, 0, 5)


@pytest.mark.parametrize("seed", range(12))
async def test_sweeping_due_nodes_matches_ticking_every_node(seed: int) -> None:
    rng = random.Random(seed)
    monitor = HealthMonitor(MonitorConfig(health=CONFIG))
    reference: dict[str, NodeHealth] = {}
    ids = [f"n{i}" for i in range(40)]
    now = 0.0
    for node_id in ids:
        monitor.add(node_id, f"u{rng.randrange(3)}", now)
        reference[node_id] = NodeHealth.registered(node_id, now)
    for step in range(400):
        now += rng.choice([0.01, 0.1, 0.25, 0.3, 0.9])
        node_id = rng.choice(ids)
        kind = rng.random()
        event: object
        if kind < 0.6:
            event = HeartbeatReceived(at=now, metrics=HOT if rng.random() < 0.1 else OK)
        elif kind < 0.7:
            event = StreamBroken(at=now)
        elif kind < 0.78:
            event = StreamConnected(at=now)
        elif kind < 0.84:
            event = DrainRequested(at=now)
        elif kind < 0.9:
            event = UndrainRequested(at=now)
        else:
            event = None
        if event is not None:
            monitor.observe(node_id, event)  # type: ignore[arg-type]
            reference[node_id] = transition(reference[node_id], event, CONFIG).new  # type: ignore[arg-type]
        if step % 97 == 0:  # a controller restart: every node gets a grace period
            monitor.controller_restarted(now)
            for key in ids:
                reference[key] = transition(reference[key], ControllerRestarted(at=now), CONFIG).new
        if rng.random() < 0.4:
            changes = await monitor.sweep(now)
            expected = []
            for key in ids:
                result = transition(reference[key], Tick(at=now), CONFIG)
                reference[key] = result.new
                if result.changed:
                    expected.append((key, result.new.state))
            assert [(c.node_id, c.new) for c in changes] == expected
        for key in ids:
            assert monitor.get(key) == reference[key], (step, key)
    monitor.stop()


def test_a_tick_changes_nothing_before_the_due_time() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        at = rng.uniform(0, 10)
        health = NodeHealth.registered("n1", at=0.0)
        for event in (
            HeartbeatReceived(at=rng.uniform(0, 2), metrics=OK),
            ControllerRestarted(at=rng.uniform(0, 3)),
            StreamBroken(at=rng.uniform(0, 4)),
            Tick(at=rng.uniform(0, 6)),
        ):
            if rng.random() < 0.6:
                health = transition(health, event, CONFIG).new
        due = tick_due(health, CONFIG)
        unchanged = transition(health, Tick(at=at), CONFIG).new is health
        assert unchanged == (at < due), (health, at, due)


async def test_a_large_sweep_lets_other_tasks_run_and_ticks_only_silent_nodes() -> None:
    config = HealthConfig(30.0)
    monitor = HealthMonitor(MonitorConfig(health=config))
    count = 3 * SWEEP_BATCH
    for i in range(count):
        monitor.add(f"n{i}", "u", 0.0)
        monitor.heartbeat(f"n{i}", 1.0, OK)
    await monitor.flush()
    for i in range(1, count):  # every node but n0 heartbeats on time
        monitor.heartbeat(f"n{i}", 31.0, OK)
    changes = await monitor.sweep(34.5)  # 1.1 intervals after 1.0 is 34.0
    assert [(c.node_id, c.new) for c in changes] == [("n0", NodeState.SUSPECT)]
    assert monitor.tick(34.6) == []  # the others' entries were pushed to their new due time
    assert all(due > 34.6 for due, _, _ in monitor._deadlines)
    monitor.stop()
