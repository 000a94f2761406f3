"""Node health: the per-node state machine and the monitor that runs it for many nodes.

Pure logic, no I/O: the node streams and the server feed it events with the time
they happened, and write the store and cache from the changes it reports::

    from controller.nodes import HealthMonitor, MonitorConfig, Metrics

    monitor = HealthMonitor(MonitorConfig(), on_transition=write_store, recovery_hook=recover)
    monitor.add(node_id, user_id, now=clock())
    monitor.heartbeat(node_id, at=clock(), metrics=Metrics(...))
    await monitor.run(clock=time.monotonic, sleep=asyncio.sleep)

See :mod:`controller.nodes.health` for the states and exactly when a heartbeat
counts as missed, and :mod:`controller.nodes.monitor` for recovery and mass failure.
"""

from controller.nodes.health import (
    ControllerRestarted,
    DrainRequested,
    Event,
    HealthConfig,
    HeartbeatReceived,
    Metrics,
    NodeHealth,
    NodeState,
    Removed,
    StreamBroken,
    StreamConnected,
    Tick,
    Transition,
    condition,
    is_routable,
    is_schedulable,
    metrics_problem,
    missed_deadline,
    missed_intervals,
    silent_since,
    transition,
)
from controller.nodes.monitor import (
    AlertHook,
    Clock,
    HealthMonitor,
    MonitorConfig,
    RecoveryHook,
    Sleep,
    StateChange,
    TransitionListener,
)

__all__ = [
    "AlertHook",
    "Clock",
    "ControllerRestarted",
    "DrainRequested",
    "Event",
    "HealthConfig",
    "HealthMonitor",
    "HeartbeatReceived",
    "Metrics",
    "MonitorConfig",
    "NodeHealth",
    "NodeState",
    "RecoveryHook",
    "Removed",
    "Sleep",
    "StateChange",
    "StreamBroken",
    "StreamConnected",
    "Tick",
    "Transition",
    "TransitionListener",
    "condition",
    "is_routable",
    "is_schedulable",
    "metrics_problem",
    "missed_deadline",
    "missed_intervals",
    "silent_since",
    "transition",
]
