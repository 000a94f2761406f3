"""State changes reach the store batched: one transaction per run of changes, the latest
state per node, and always before a recovery hook runs and before the monitor's flush
returns. Real store (SQLite and PostgreSQL), injected clock."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from automator67.v1 import common_pb2

from controller.cache.memory import MemoryCache
from controller.nodes import HealthConfig, HealthMonitor, Metrics, MonitorConfig, NodeState, StateChange
from controller.nodes.fleet import Fleet
from controller.nodes.repository import NodeRepository
from controller.store import Store, UserRepository
from controller.store.models import User

T0 = 1_780_000_000.0
OK = common_pb2.NodeMetrics(cpu_percent=10, memory_percent=20, disk_percent=30)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class CountingNodes(NodeRepository):
    """The real repository, counting the batched writes."""

    batches: list[int]

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.batches = []

    async def record_states(self, rows: Any, holder: str | None = None) -> None:
        self.batches.append(len(rows))
        await super().record_states(rows, holder)


@pytest.fixture
async def alice(store: Store) -> User:
    return await UserRepository(store).create("alice@example.com", "hash")


async def _node(nodes: NodeRepository, user: User) -> str:
    node = await nodes.create(
        user_id=user.id, provider="render", endpoint="https://n.example.com", region="eu", capabilities={}
    )
    return node.id


async def test_a_flapping_node_costs_one_row_per_flush(store: Store, alice: User) -> None:
    clock = Clock()
    nodes = CountingNodes(store)
    fleet = Fleet(
        nodes=nodes, cache=MemoryCache(), health_config=HealthConfig.fast(1.0), clock=clock, wall_clock=clock
    )
    ids = [await _node(nodes, alice) for _ in range(3)]
    for node_id in ids:
        fleet.track(node_id, alice.id)
        fleet.heartbeat(node_id, OK)  # initializing -> ready (queued; the monitor is not running)
    for _ in range(5):  # late, on time, late, ...: suspect <-> ready
        clock.now += 1.2
        await fleet.monitor.sweep(clock())
        for node_id in ids:
            fleet.heartbeat(node_id, OK)
    await fleet.monitor.flush()
    await asyncio.gather(*fleet._tasks)
    # Every change was delivered, but the store got one row per node per flush.
    assert len([e for e in fleet.events if e.kind == "state"]) == 3 + 5 * 2 * 3
    assert all(size <= len(ids) for size in nodes.batches)
    for node_id in ids:
        row = await nodes.get(node_id)
        assert row is not None
        assert row.status == "ready"
        assert row.last_heartbeat is not None
        assert row.last_heartbeat.replace(tzinfo=UTC) == datetime.fromtimestamp(clock.now, UTC)
    fleet.monitor.stop()


async def test_changes_are_written_before_the_recovery_hook_runs(store: Store, alice: User) -> None:
    clock = Clock()
    nodes = NodeRepository(store)
    node_id = await _node(nodes, alice)
    seen: list[str] = []

    async def recover(node: str, user: str) -> None:
        row = await nodes.get(node)
        assert row is not None
        seen.append(row.status)

    monitor_config = MonitorConfig(health=HealthConfig.fast(1.0), mass_failure_window_seconds=1.0)
    written: list[StateChange] = []

    async def on_transition(change: StateChange) -> None:
        written.append(change)

    async def save() -> None:
        rows = [(c.node_id, str(c.new), None, None) for c in written]
        written.clear()
        await nodes.record_states(rows)

    monitor = HealthMonitor(
        monitor_config, on_transition=on_transition, recovery_hook=recover, after_changes=save
    )
    monitor.add(node_id, alice.id, clock())
    monitor.heartbeat(node_id, clock(), Metrics(10, 20, 30, 0, 0, 5))
    await monitor.flush()
    for _ in range(12):  # silence: suspect, failed, then (one window later) the hook
        clock.now += 0.5
        await monitor.sweep(clock())
    assert seen == [str(NodeState.FAILED)]


class CountingHeartbeats(NodeRepository):
    batches: list[int]

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.batches = []

    async def record_heartbeats(self, rows: Any) -> None:
        self.batches.append(len(rows))
        await super().record_heartbeats(rows)


async def test_heartbeats_start_no_task_and_metrics_are_written_in_batches(store: Store, alice: User) -> None:
    clock = Clock()
    nodes = CountingHeartbeats(store)
    fleet = Fleet(nodes=nodes, cache=MemoryCache(), health_config=HealthConfig.fast(30.0), clock=clock)
    ids = [await _node(nodes, alice) for _ in range(1100)]
    await fleet.start()
    try:
        for node_id in ids:
            fleet.track(node_id, alice.id)
            fleet.heartbeat(node_id, OK)
        assert not fleet._tasks  # no task per heartbeat: one writer and the monitor do the rest
    finally:
        await fleet.stop()  # delivers and writes what is pending
    assert sorted(nodes.batches, reverse=True) == [500, 500, 100]
    row = await nodes.get(ids[-1])
    assert row is not None
    assert row.metrics_current is not None
    assert row.metrics_current["cpu_percent"] == 10.0
    assert await fleet.cache.get(f"node:health:{ids[-1]}") is not None
