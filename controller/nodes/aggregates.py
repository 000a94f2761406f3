"""System metrics: aggregates over one user's nodes, from what the fleet holds in memory.

Only valid numbers reach this: the fleet keeps a node's last *valid* heartbeat
(:attr:`controller.nodes.fleet.Fleet.live`) and capabilities from a validated
hello (:mod:`controller.nodes.validation`), so every aggregate is finite.

* **reporting** nodes: alive (routable: ready, busy, degraded or draining), with
  metrics, and whose *latest* heartbeat was valid (a node now sending invalid
  heartbeats is left out, not counted with stale numbers);
* ``healthy_nodes``: reporting nodes that are not degraded;
* averages (CPU, memory, error rate, latency) and totals (cores, memory) are over
  the reporting nodes.
"""

from __future__ import annotations

from automator67.v1 import metrics_pb2

from controller.nodes.fleet import Fleet
from controller.nodes.health import NodeState, is_routable
from controller.timestamps import timestamp


def system_metrics(fleet: Fleet, user_id: str, now: float) -> metrics_pb2.SystemMetrics:
    """Aggregates over ``user_id``'s monitored nodes at ``now``."""
    healths = fleet.monitor.nodes_of(user_id)
    reporting = [
        (health.state, fleet.live[node_id])
        for node_id, health in healths.items()
        if is_routable(health.state) and node_id in fleet.live and node_id not in fleet.heartbeat_problems
    ]
    result = metrics_pb2.SystemMetrics(
        time=timestamp(now),
        total_nodes=len(healths),
        healthy_nodes=sum(1 for state, _ in reporting if state is not NodeState.DEGRADED),
    )
    if reporting:
        count = len(reporting)
        result.cpu_percent = sum(live.metrics.cpu_percent for _, live in reporting) / count
        result.memory_percent = sum(live.metrics.memory_percent for _, live in reporting) / count
        result.error_rate = sum(live.metrics.error_rate for _, live in reporting) / count
        result.avg_response_time_ms = sum(live.metrics.avg_response_time_ms for _, live in reporting) / count
        result.total_cpu_cores = sum(
            live.capabilities.cpu_cores for _, live in reporting if live.capabilities
        )
        result.total_memory_gb = sum(
            live.capabilities.memory_gb for _, live in reporting if live.capabilities
        )
    return result


__all__ = ["system_metrics"]
