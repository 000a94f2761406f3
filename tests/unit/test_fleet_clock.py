"""The fleet's health runs on a monotonic clock: a step of the wall clock changes nothing.

Both clocks are injected; times that leave the process (the store's last heartbeat) are
converted to the wall clock at the moment they are written."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest
from automator67.v1 import common_pb2

from controller.cache.memory import MemoryCache
from controller.nodes import fleet as fleet_module
from controller.nodes.fleet import Fleet, monotonic_clock
from controller.nodes.health import HealthConfig, NodeState

WALL_T0 = 1_800_000_000.0
HOUR = 3600.0
OK = common_pb2.NodeMetrics(cpu_percent=10, memory_percent=20, disk_percent=30)


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RecordingNodes:
    """What the fleet writes to the store, without a store."""

    def __init__(self) -> None:
        self.states: list[tuple[str, str, datetime | None, Any]] = []
        self.heartbeats: list[tuple[str, datetime, Any]] = []

    async def record_states(
        self, rows: list[tuple[str, str, datetime | None, Any]], holder: str | None = None
    ) -> None:
        self.states.extend(rows)

    async def record_heartbeats(self, rows: list[tuple[str, datetime, Any]]) -> None:
        self.heartbeats.extend(rows)

    async def update_status(self, *args: object, **kwargs: object) -> None:
        return None

    async def list_active(self) -> list[Any]:
        return []


def _fleet(mono: FakeClock, wall: FakeClock, nodes: RecordingNodes) -> Fleet:
    return Fleet(
        nodes=nodes,  # type: ignore[arg-type]
        cache=MemoryCache(),
        health_config=HealthConfig.fast(1.0),
        clock=mono,
        wall_clock=wall,
    )


def _advance(mono: FakeClock, wall: FakeClock, seconds: float) -> None:
    mono.now += seconds
    wall.now += seconds


@pytest.mark.parametrize("step", [HOUR, -HOUR, 10 * 24 * HOUR, -10 * 24 * HOUR])
async def test_a_wall_clock_step_changes_no_node_state(step: float) -> None:
    mono, wall, nodes = FakeClock(500.0), FakeClock(WALL_T0), RecordingNodes()
    fleet = _fleet(mono, wall, nodes)
    fleet.track("n1", "u1")
    assert fleet.heartbeat("n1", OK) is NodeState.READY
    await fleet.monitor.flush()
    seen = []
    for i in range(40):  # 10 s of heartbeats every 0.5 s, sweeps every 0.25 s
        _advance(mono, wall, 0.25)
        if i == 10:
            wall.now += step  # NTP, an operator, a VM resume
        if i % 2:
            fleet.heartbeat("n1", OK)
        await fleet.monitor.sweep(fleet.clock())
        seen.append(fleet.state_of("n1"))
    assert set(seen) == {NodeState.READY}
    assert [e.message.split(":")[0] for e in fleet.events] == ["initializing -> ready"]
    fleet.monitor.stop()


async def test_silence_is_measured_on_the_health_clock_whatever_the_wall_clock_does() -> None:
    mono, wall, nodes = FakeClock(500.0), FakeClock(WALL_T0), RecordingNodes()
    fleet = _fleet(mono, wall, nodes)
    fleet.track("n1", "u1")
    fleet.heartbeat("n1", OK)
    await fleet.monitor.flush()
    heartbeat_wall = wall.now
    wall.now -= HOUR  # the wall clock goes back an hour: the node must still fail on time
    states = []
    for _ in range(16):  # 4 s of silence
        _advance(mono, wall, 0.25)
        await fleet.monitor.sweep(fleet.clock())
        states.append(fleet.state_of("n1"))
    assert states[3] is NodeState.READY  # 1.0 s
    assert states[4] is NodeState.SUSPECT  # 1.25 s: past 1.1 intervals
    assert states[11] is NodeState.SUSPECT  # 3.0 s
    assert states[12] is NodeState.FAILED  # 3.25 s: past 3.1 intervals
    # The store gets wall-clock times: the heartbeat's, as the wall clock reads now
    # (stepped back an hour), i.e. now less the health-clock time since the heartbeat.
    last_written = [row[2] for row in nodes.states if row[1] == "failed"]
    assert last_written == [datetime.fromtimestamp(heartbeat_wall - HOUR, UTC)]
    fleet.monitor.stop()


def test_wall_time_and_health_time_convert_both_ways() -> None:
    mono, wall = FakeClock(500.0), FakeClock(WALL_T0)
    fleet = _fleet(mono, wall, RecordingNodes())
    assert fleet.wall_time(490.0) == WALL_T0 - 10.0
    assert fleet.health_time(WALL_T0 - 10.0) == 490.0
    wall.now += HOUR
    assert fleet.wall_time(490.0) == WALL_T0 + HOUR - 10.0
    fleet.monitor.stop()


def test_the_default_health_clock_ignores_steps_of_the_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    wall, mono = FakeClock(WALL_T0), FakeClock(100.0)
    monkeypatch.setattr(fleet_module.time, "time", wall)
    monkeypatch.setattr(fleet_module.time, "monotonic", mono)
    clock = monotonic_clock()
    assert clock() == WALL_T0  # reads like the wall clock at start
    wall.now -= HOUR
    assert clock() == WALL_T0
    mono.now += 2.5
    wall.now += 7 * HOUR
    assert clock() == WALL_T0 + 2.5
    assert time.monotonic is mono  # (the patch is what the clock read)
