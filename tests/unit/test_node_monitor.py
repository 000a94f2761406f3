"""The health monitor: reporting changes, recovery once per failure, mass-failure freeze,
restart grace, bounded metrics persistence, and the run loop on an injected clock."""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from dataclasses import dataclass, field

import pytest

from controller.errors import NotFound
from controller.nodes import (
    HealthConfig,
    HealthMonitor,
    Metrics,
    MonitorConfig,
    NodeState,
    StateChange,
)

S = NodeState
INTERVAL = 1.0  # suspect at 1.1 s of silence, failed at 3.1 s, grace 3 s, window 1 s
CONFIG = MonitorConfig(health=HealthConfig.fast(INTERVAL))
OK = Metrics(
    cpu_percent=10,
    memory_percent=20,
    disk_percent=30,
    active_requests=1,
    error_rate=0,
    avg_response_time_ms=5,
)
HOT = Metrics(
    cpu_percent=95,
    memory_percent=20,
    disk_percent=30,
    active_requests=1,
    error_rate=0,
    avg_response_time_ms=5,
)


@dataclass
class Recorder:
    """Collects everything the monitor reports."""

    changes: list[StateChange] = field(default_factory=list)
    recovered: list[tuple[str, str]] = field(default_factory=list)
    alerts: list[tuple[str, str]] = field(default_factory=list)

    async def on_transition(self, change: StateChange) -> None:
        self.changes.append(change)

    async def recover(self, node_id: str, user_id: str) -> None:
        self.recovered.append((node_id, user_id))

    async def alert(self, user_id: str, message: str) -> None:
        self.alerts.append((user_id, message))

    def path(self, node_id: str) -> list[str]:
        changes = [c for c in self.changes if c.node_id == node_id]
        return [changes[0].old.value, *(c.new.value for c in changes)] if changes else []


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


def make_monitor(rec: Recorder, config: MonitorConfig = CONFIG) -> HealthMonitor:
    return HealthMonitor(
        config, on_transition=rec.on_transition, recovery_hook=rec.recover, on_alert=rec.alert
    )


def state_of(monitor: HealthMonitor, node_id: str) -> NodeState:
    health = monitor.get(node_id)
    assert health is not None
    return health.state


def reason_of(monitor: HealthMonitor, node_id: str) -> str:
    health = monitor.get(node_id)
    assert health is not None
    return health.reason


async def sweep_until(monitor: HealthMonitor, start: float, end: float, step: float = INTERVAL / 4) -> float:
    """Sweep every ``step`` from ``start`` to ``end`` inclusive; returns the last time."""
    now = start
    while now <= end + 1e-9:
        await monitor.sweep(now)
        now += step
    return now - step


# -- reporting -------------------------------------------------------------------------


async def test_state_changes_are_reported_once_not_per_heartbeat(rec: Recorder) -> None:
    monitor = make_monitor(rec)
    monitor.add("n1", "u1", now=0.0)
    for i in range(10):
        monitor.heartbeat("n1", at=0.5 * i, metrics=OK)
    monitor.heartbeat("n1", at=5.0, metrics=HOT)
    await monitor.flush()
    assert rec.path("n1") == ["initializing", "ready", "busy"]
    busy = rec.changes[-1]
    assert (busy.user_id, busy.at, busy.health.last_metrics) == ("u1", 5.0, HOT)
    assert "cpu 95%" in busy.reason


async def test_sweep_reports_suspect_then_failed(rec: Recorder) -> None:
    monitor = make_monitor(rec)
    monitor.add("n1", "u1", now=0.0)
    monitor.heartbeat("n1", at=0.0, metrics=OK)
    changes = await monitor.sweep(1.25)
    assert [(c.old, c.new) for c in changes] == [(S.READY, S.SUSPECT)]
    await sweep_until(monitor, 1.5, 3.25)
    assert rec.path("n1") == ["initializing", "ready", "suspect", "failed"]
    assert rec.changes[-1].at == 3.25


async def test_stream_break_reports_suspect_at_once(rec: Recorder) -> None:
    monitor = make_monitor(rec)
    monitor.add("n1", "u1", now=0.0)
    monitor.heartbeat("n1", at=0.0, metrics=OK)
    monitor.stream_broken("n1", at=0.1)
    await monitor.flush()
    assert rec.changes[-1].new is S.SUSPECT
    assert rec.changes[-1].reason == "stream broken"


async def test_unknown_node_is_not_found(rec: Recorder) -> None:
    monitor = make_monitor(rec)
    with pytest.raises(NotFound) as raised:
        monitor.heartbeat("ghost", at=0.0, metrics=OK)
    assert raised.value.reason == "NODE_NOT_MONITORED"


async def test_removed_node_is_reported_and_forgotten(rec: Recorder) -> None:
    monitor = make_monitor(rec)
    monitor.add("n1", "u1", now=0.0)
    monitor.remove("n1", at=1.0)
    await monitor.flush()
    assert rec.path("n1") == ["initializing", "removed"]
    assert "n1" not in monitor
    assert monitor.nodes_of("u1") == {}
    with pytest.raises(NotFound):
        monitor.heartbeat("n1", at=2.0, metrics=OK)


async def test_add_is_idempotent_but_not_across_users(rec: Recorder) -> None:
    monitor = make_monitor(rec)
    first = monitor.add("n1", "u1", now=0.0)
    assert monitor.add("n1", "u1", now=5.0) is first
    with pytest.raises(ValueError, match="another user"):
        monitor.add("n1", "u2", now=5.0)
    assert monitor.user_of("n1") == "u1"
    assert len(monitor) == 1
    assert list(monitor) == ["n1"]


async def test_listener_error_is_logged_and_delivery_continues(
    rec: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(change: StateChange) -> None:
        raise RuntimeError("store down")

    monitor = HealthMonitor(CONFIG, on_transition=broken, recovery_hook=rec.recover)
    monitor.add_listener(rec.on_transition)
    monitor.add("n1", "u1", now=0.0)
    with caplog.at_level(logging.ERROR, logger="controller.nodes.monitor"):
        await sweep_until(monitor, 0.0, 4.5)
    assert rec.path("n1") == ["initializing", "suspect", "failed"]
    assert rec.recovered == [("n1", "u1")]
    assert "transition listener failed" in caplog.text


# -- recovery ----------------------------------------------------------------------------


async def test_recovery_hook_called_exactly_once_per_failure(rec: Recorder) -> None:
    monitor = make_monitor(rec)
    monitor.add("n1", "u1", now=0.0)
    monitor.add("n2", "u1", now=0.0)
    monitor.heartbeat("n1", at=0.0, metrics=OK)

    def keep_n2_alive(start: float, end: float) -> None:
        t = start
        while t <= end:
            monitor.heartbeat("n2", at=t, metrics=OK)
            t += 0.5

    keep_n2_alive(0.0, 3.0)
    await sweep_until(monitor, 0.25, 3.0)
    assert rec.recovered == []
    keep_n2_alive(3.0, 10.0)
    await sweep_until(monitor, 3.25, 10.0)  # failed at 3.25; hook one window later, once
    assert rec.recovered == [("n1", "u1")]

    monitor.heartbeat("n1", at=10.1, metrics=OK)  # comes back...
    keep_n2_alive(10.0, 20.0)
    await sweep_until(monitor, 10.25, 20.0)  # ...and fails again: a second failure
    assert rec.recovered == [("n1", "u1"), ("n1", "u1")]
    assert rec.path("n1").count("failed") == 2


async def test_recovery_is_held_one_window_and_skipped_if_the_node_returns(rec: Recorder) -> None:
    monitor = make_monitor(rec)
    monitor.add("n1", "u1", now=0.0)
    monitor.heartbeat("n1", at=0.0, metrics=OK)
    await sweep_until(monitor, 0.25, 4.0)  # failed at 3.25, due at 4.25
    assert state_of(monitor, "n1") is S.FAILED
    monitor.heartbeat("n1", at=4.1, metrics=OK)
    await sweep_until(monitor, 4.25, 6.0)
    assert rec.recovered == []


async def test_a_node_back_before_delivery_is_not_recovered(rec: Recorder) -> None:
    monitor = make_monitor(rec)
    monitor.add("n1", "u1", now=0.0)
    await sweep_until(monitor, 0.0, 4.0)  # failed at 3.25, recovery due at 4.25
    monitor.tick(4.25)  # queues the hook without delivering it
    monitor.heartbeat("n1", at=4.3, metrics=OK)
    await monitor.flush()
    assert rec.recovered == []
    assert rec.path("n1")[-2:] == ["failed", "ready"]


async def test_a_single_node_user_is_recovered_not_frozen(rec: Recorder) -> None:
    monitor = make_monitor(rec)
    monitor.add("solo", "u1", now=0.0)
    await sweep_until(monitor, 0.0, 5.0)
    assert rec.recovered == [("solo", "u1")]
    assert rec.alerts == []
    assert monitor.frozen_users == frozenset()


# -- mass failure --------------------------------------------------------------------------


async def _mass_failure(monitor: HealthMonitor) -> None:
    """User A: a1..a3 stop heartbeating at 0.0, 0.3 and 0.6 (failures spread over one
    interval, as heartbeat phases are); a4 keeps heartbeating. User B: b1 stops, b2 lives."""
    for node_id, user in [("a1", "A"), ("a2", "A"), ("a3", "A"), ("a4", "A"), ("b1", "B"), ("b2", "B")]:
        monitor.add(node_id, user, now=0.0)
    for node_id, at in [("a1", 0.0), ("a2", 0.3), ("a3", 0.6), ("b1", 0.0)]:
        monitor.heartbeat(node_id, at=at, metrics=OK)
    now = 0.0
    while now <= 6.0:
        monitor.heartbeat("a4", at=now, metrics=OK)
        monitor.heartbeat("b2", at=now, metrics=OK)
        await monitor.sweep(now)
        now += 0.25


async def test_mass_failure_freezes_recovery_and_alerts_other_users_unaffected(rec: Recorder) -> None:
    monitor = make_monitor(rec)
    await _mass_failure(monitor)
    states = {node_id: health.state for node_id, health in monitor.nodes_of("A").items()}
    assert states == {"a1": S.FAILED, "a2": S.FAILED, "a3": S.FAILED, "a4": S.READY}
    assert monitor.frozen_users == frozenset({"A"})
    assert len(rec.alerts) == 1
    user, message = rec.alerts[0]
    assert user == "A"
    assert "3 of 4 nodes failed" in message
    assert rec.recovered == [("b1", "B")]  # B: one of two nodes, an ordinary failure


async def test_failures_spread_over_more_than_a_window_are_not_a_mass_failure(rec: Recorder) -> None:
    monitor = make_monitor(rec)
    for i in range(4):
        monitor.add(f"n{i}", "u1", now=0.0)
    for node_id, last in [("n0", 0.0), ("n1", 1.5), ("n2", 3.0)]:
        monitor.heartbeat(node_id, at=last, metrics=OK)
    now = 0.0
    while now <= 9.0:
        monitor.heartbeat("n3", at=now, metrics=OK)
        await monitor.sweep(now)
        now += 0.25
    assert sorted(rec.recovered) == [("n0", "u1"), ("n1", "u1"), ("n2", "u1")]
    assert rec.alerts == []


async def test_two_of_two_nodes_failing_together_freezes(rec: Recorder) -> None:
    monitor = make_monitor(rec)
    monitor.add("x", "u1", now=0.0)
    monitor.add("y", "u1", now=0.0)
    await sweep_until(monitor, 0.0, 6.0)
    assert monitor.frozen_users == {"u1"}
    assert rec.recovered == []


async def test_operator_unfreeze_recovers_nodes_still_failed(rec: Recorder) -> None:
    monitor = make_monitor(rec)
    await _mass_failure(monitor)
    assert monitor.unfreeze("A") is True
    assert monitor.unfreeze("A") is False  # not frozen any more
    assert monitor.unfreeze("B") is False  # never frozen
    await monitor.flush()
    assert sorted(rec.recovered) == [("a1", "A"), ("a2", "A"), ("a3", "A"), ("b1", "B")]
    await monitor.sweep(10.0)
    assert len(rec.recovered) == 4  # once per failure, not again


async def test_unfreeze_skips_nodes_that_came_back_during_the_freeze(rec: Recorder) -> None:
    monitor = make_monitor(rec)
    for i in range(5):
        monitor.add(f"d{i}", "u1", now=0.0)
    now = 0.0
    while now <= 5.0:
        monitor.heartbeat("d4", at=now, metrics=OK)
        await monitor.sweep(now)
        now += 0.25
    assert monitor.frozen_users == {"u1"}  # 4 of 5 failed in the same sweep
    monitor.heartbeat("d0", at=5.1, metrics=OK)
    await monitor.flush()
    assert monitor.frozen_users == {"u1"}  # 3 of 5 still failed: still more than half
    monitor.unfreeze("u1")
    await monitor.flush()
    assert sorted(rec.recovered) == [("d1", "u1"), ("d2", "u1"), ("d3", "u1")]


async def test_freeze_lifts_when_the_nodes_come_back(rec: Recorder) -> None:
    monitor = make_monitor(rec)
    await _mass_failure(monitor)
    for node_id in ("a1", "a2"):
        monitor.heartbeat(node_id, at=6.1, metrics=OK)
    await monitor.flush()
    assert monitor.frozen_users == frozenset()  # 1 of 4 failed: no longer a mass failure
    # a3 is still failed: held one more window from the thaw, then recovered
    for now in (6.5, 7.0):
        monitor.heartbeat("a1", at=now, metrics=OK)
        monitor.heartbeat("a2", at=now, metrics=OK)
        monitor.heartbeat("a4", at=now, metrics=OK)
        await monitor.sweep(now)
    assert ("a3", "A") not in rec.recovered
    for node_id in ("a1", "a2", "a4"):
        monitor.heartbeat(node_id, at=7.1, metrics=OK)
    await monitor.sweep(7.1)
    assert ("a3", "A") in rec.recovered
    assert ("a1", "A") not in rec.recovered


async def test_a_node_failing_during_a_freeze_is_held_until_it_lifts(rec: Recorder) -> None:
    monitor = make_monitor(rec)
    await _mass_failure(monitor)
    # a4 now dies too while A is frozen: no hook for it either
    for now in (6.25, 8.0, 10.0):
        await monitor.sweep(now)
    assert state_of(monitor, "a4") is S.FAILED
    assert [r for r in rec.recovered if r[1] == "A"] == []
    monitor.unfreeze("A")
    await monitor.flush()
    assert sorted(r[0] for r in rec.recovered if r[1] == "A") == ["a1", "a2", "a3", "a4"]


# -- restart grace ---------------------------------------------------------------------------


async def test_loaded_nodes_keep_their_state_and_get_a_grace_period(rec: Recorder) -> None:
    monitor = make_monitor(rec)
    # stored heartbeats are stale (persisted at a bounded rate, controller was down)
    assert monitor.load("n1", "u1", S.READY, last_heartbeat_at=10.0, now=100.0) is not None
    monitor.load("n2", "u1", "busy", last_heartbeat_at=None, now=100.0)
    monitor.load("n3", "u1", "draining", last_heartbeat_at=90.0, now=100.0)
    assert monitor.load("gone", "u1", "removed", last_heartbeat_at=1.0, now=100.0) is None
    assert "gone" not in monitor
    await monitor.sweep(100.0)
    assert rec.changes == []  # no mass flip to suspect at start-up
    monitor.heartbeat("n1", at=100.5, metrics=OK)
    await sweep_until(monitor, 100.25, 103.0)
    assert state_of(monitor, "n2") is S.SUSPECT
    await sweep_until(monitor, 103.25, 104.0)
    assert {n: h.state for n, h in monitor.nodes_of("u1").items()} == {
        "n1": S.FAILED,  # 3.1 s after its heartbeat at 100.5
        "n2": S.FAILED,
        "n3": S.FAILED,
    }


async def test_controller_restart_delays_failure_for_every_node(rec: Recorder) -> None:
    monitor = make_monitor(rec)
    monitor.add("n1", "u1", now=0.0)
    monitor.heartbeat("n1", at=0.0, metrics=OK)
    monitor.controller_restarted(now=2.0)  # grace until 5.0
    await sweep_until(monitor, 2.0, 4.75)
    assert state_of(monitor, "n1") is S.SUSPECT
    assert "held off by restart grace" in reason_of(monitor, "n1")
    await monitor.sweep(5.0)
    assert state_of(monitor, "n1") is S.FAILED


# -- bounded persistence -------------------------------------------------------------------------


def test_should_persist_metrics_at_most_once_per_interval() -> None:
    monitor = HealthMonitor(CONFIG)
    decisions = [monitor.should_persist_metrics("n1", t, min_interval_seconds=60.0) for t in range(0, 181, 1)]
    assert [t for t, yes in enumerate(decisions) if yes] == [0, 60, 120, 180]
    assert monitor.should_persist_metrics("n2", 5.0) is True  # per node
    monitor.mark_persisted("n2", 30.0)
    assert monitor.should_persist_metrics("n2", 80.0) is False
    assert monitor.should_persist_metrics("n2", 90.0) is True


# -- the run loop ----------------------------------------------------------------------------------


class FakeTime:
    """An injected clock whose sleep advances time instantly."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


async def test_run_sweeps_on_the_injected_clock_until_stopped(rec: Recorder) -> None:
    fake = FakeTime()
    monitor: HealthMonitor

    async def recover_then_stop(node_id: str, user_id: str) -> None:
        await rec.recover(node_id, user_id)
        monitor.stop()

    monitor = HealthMonitor(CONFIG, on_transition=rec.on_transition, recovery_hook=recover_then_stop)
    monitor.add("n1", "u1", now=0.0)
    await asyncio.wait_for(monitor.run(fake.clock, fake.sleep), timeout=5)
    assert rec.recovered == [("n1", "u1")]
    assert rec.path("n1") == ["initializing", "suspect", "failed"]
    assert set(fake.sleeps) == {INTERVAL / 4}
    assert fake.now == pytest.approx(4.25)  # failed at 3.25, recovered one window later


async def test_run_delivers_heartbeat_changes_without_waiting_for_a_sweep(rec: Recorder) -> None:
    never = asyncio.Event()

    async def long_sleep(seconds: float) -> None:
        await never.wait()

    monitor = make_monitor(rec)
    monitor.add("n1", "u1", now=0.0)
    task = asyncio.create_task(monitor.run(lambda: 0.0, long_sleep))
    await asyncio.sleep(0)
    monitor.heartbeat("n1", at=0.1, metrics=OK)
    for _ in range(5):
        await asyncio.sleep(0)
    assert rec.path("n1") == ["initializing", "ready"]
    monitor.stop()  # interrupts the long sleep
    await asyncio.wait_for(task, timeout=5)
    assert monitor.pending == 0


async def test_run_twice_at_once_is_refused(rec: Recorder) -> None:
    never = asyncio.Event()

    async def long_sleep(seconds: float) -> None:
        await never.wait()

    monitor = make_monitor(rec)
    task = asyncio.create_task(monitor.run(lambda: 0.0, long_sleep))
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="already running"):
        await monitor.run(lambda: 0.0, long_sleep)
    monitor.stop()
    await asyncio.wait_for(task, timeout=5)


async def test_cancelling_run_cleans_up(rec: Recorder) -> None:
    never = asyncio.Event()

    async def long_sleep(seconds: float) -> None:
        await never.wait()

    monitor = make_monitor(rec)
    monitor.add("n1", "u1", now=0.0)
    task = asyncio.create_task(monitor.run(lambda: 0.0, long_sleep))
    await asyncio.sleep(0)
    monitor.heartbeat("n1", at=0.1, metrics=OK)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert rec.path("n1") == ["initializing", "ready"]  # queued changes still delivered
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


def test_monitor_config_defaults_and_validation() -> None:
    config = MonitorConfig()
    assert config.window_seconds == 30.0
    assert config.sweep_seconds == 7.5
    assert (config.mass_failure_fraction, config.mass_failure_min_failed) == (0.5, 2)
    with pytest.raises(ValueError, match="mass_failure_fraction"):
        MonitorConfig(mass_failure_fraction=1.0)
    with pytest.raises(ValueError, match="mass_failure_min_failed"):
        MonitorConfig(mass_failure_min_failed=0)


# -- randomized: many nodes and users, checked against a model of recovery --------------------


USERS = {"A": ["a0", "a1", "a2", "a3"], "B": ["b0", "b1", "b2"], "C": ["c0"]}
OWNER = {node: user for user, nodes in USERS.items() for node in nodes}


async def _random_recovery_run(seed: int) -> collections.Counter[str]:
    """One randomized run; returns how often the interesting things happened."""
    window = CONFIG.window_seconds
    users, owner = USERS, OWNER
    seen: collections.Counter[str] = collections.Counter()
    rng = random.Random(seed)
    now = 0.0
    hooks: list[tuple[str, int]] = []
    episode: dict[str, int] = dict.fromkeys(owner, 0)
    due: dict[str, float] = {}  # node -> when its current failure must be recovered

    monitor: HealthMonitor

    async def recover(node_id: str, user_id: str) -> None:
        assert user_id == owner[node_id]
        assert state_of(monitor, node_id) is S.FAILED
        assert user_id not in monitor.frozen_users
        assert (node_id, episode[node_id]) not in hooks, "two hooks for one failure"
        hooks.append((node_id, episode[node_id]))
        due.pop(node_id, None)
        seen["hooks"] += 1

    async def on_change(change: StateChange) -> None:
        if change.new is S.FAILED:
            episode[change.node_id] += 1
            due[change.node_id] = change.at + window
            seen["failures"] += 1
        elif change.old is S.FAILED:
            due.pop(change.node_id, None)

    async def on_alert(user_id: str, message: str) -> None:
        seen["freezes"] += 1

    monitor = HealthMonitor(CONFIG, on_transition=on_change, recovery_hook=recover, on_alert=on_alert)
    alive = dict.fromkeys(owner, True)
    next_beat = {node: rng.uniform(0, INTERVAL) for node in owner}
    for node in owner:
        monitor.add(node, owner[node], now=0.0)
    frozen_before: frozenset[str] = frozenset()
    for _ in range(300):
        now += INTERVAL / 4
        roll = rng.random()
        if roll < 0.02:  # a partition: all of one user's nodes at once
            for node in users[rng.choice("AB")]:
                alive[node] = False
        elif roll < 0.08:
            node = rng.choice(list(owner))
            alive[node] = not alive[node]
        for node, beat_at in next_beat.items():
            if alive[node] and beat_at <= now:
                monitor.heartbeat(node, at=now, metrics=OK)
                next_beat[node] = now + rng.uniform(0.7, 1.05) * INTERVAL
        await monitor.flush()
        if rng.random() < 0.02 and monitor.frozen_users:
            user = rng.choice(sorted(monitor.frozen_users))
            monitor.unfreeze(user)
            await monitor.flush()
            assert all(owner[node] != user for node in due), "unfreeze recovers at once"
            seen["unfreezes"] += 1
        thawed = frozen_before - monitor.frozen_users
        for node in due:
            if owner[node] in thawed:
                due[node] = max(due[node], now + window)  # a thaw holds one more window
                seen["held after thaw"] += 1
        await monitor.sweep(now)
        for node, when in due.items():
            if owner[node] not in monitor.frozen_users:
                assert when > now, f"seed={seed}: {node} due at {when} not recovered by {now}"
        frozen_before = monitor.frozen_users
        for user in monitor.frozen_users:
            assert any(state_of(monitor, node) is S.FAILED for node in users[user])
    assert len(hooks) == len(set(hooks))
    return seen


async def test_randomized_recovery_is_once_per_failure_and_respects_freezes() -> None:
    """Nodes of three users die and come back at random, sometimes all of a user's
    nodes at once; an operator sometimes unfreezes. After every step: each failure gets
    at most one hook, never while its user is frozen, and never before its hold ends;
    once due and not frozen, it has had its hook."""
    seen: collections.Counter[str] = collections.Counter()
    for seed in range(40):
        seen += await _random_recovery_run(seed)
    # the run really exercised what it checks
    for what in ("failures", "hooks", "freezes", "unfreezes", "held after thaw"):
        assert seen[what] > 0, (what, seen)
