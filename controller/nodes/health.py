"""The health state machine of one node: a pure function over plain data.

Nothing here reads a clock, sleeps, or does I/O. Every event carries the time it
happened (``at``, seconds as a float, from whatever clock the caller injects), and
:func:`transition` maps ``(NodeHealth, event, HealthConfig)`` to the next
``NodeHealth``. The node streams and the sweeper (``controller.nodes.monitor``)
feed it events; the store and the cache are written by whoever watches the
transitions, on state *changes* only.

Timing: when a heartbeat counts as missed
-----------------------------------------

A node is expected to heartbeat every ``I = interval_seconds``. Silence is
measured from :func:`silent_since`: the node's last heartbeat, or, while none has
been seen since monitoring began (registration, or loading from the store at
start-up), the time monitoring began. The *k*-th expected heartbeat counts as
**missed** at::

    missed_deadline(k) = silent_since + (k + late_tolerance_fraction) * I

i.e. heartbeat *k* may be up to ``late_tolerance_fraction * I`` late (network and
scheduling jitter) before it counts as missed. At a time ``now``,
``missed_intervals`` is the largest *k* with ``missed_deadline(k) <= now`` (0 if
none), and ``consecutive_missed`` records it at the latest event.

With the defaults (``I`` = 30 s, tolerance 0.1, suspect after 1, failed after 3):

* **suspect** at ``silent_since + 1.1 I`` (33 s), or at once when the stream breaks;
* **failed**  at ``silent_since + 3.1 I`` (93 s), but never before ``grace_until``.

The sweeper ticks every ``I / 4``, so detection from the last heartbeat to
``failed`` takes between ``3.1 I`` and ``3.35 I`` (3.1 to 3.35 s at a 1 s interval).

States
------

A node's state combines three things that are tracked separately:

* **liveness**: alive, suspect or failed, from the timing above and the stream;
* **condition**: what its latest heartbeat said, ``degraded > busy > ready``
  (degraded wins: error rate above ``degraded_error_rate_percent`` or an invalid
  heartbeat; then busy: CPU or memory above its threshold; else ready). Thresholds
  are strict: exactly 90 % CPU is still ready;
* the administrative **drain** flag: set by ``DrainRequested``, cleared only by
  ``UndrainRequested`` (the user's ``UndrainNode``).

The state shown is, in order of precedence: ``removed`` (terminal: every event
after it is ignored) > ``failed`` > ``suspect`` > ``draining`` > the condition
(``initializing`` before the first heartbeat). So a draining node that dies
becomes suspect, then failed, and returns to ``draining`` (not ``ready``) when it
heartbeats again; a draining node that heartbeats stays draining whatever its
metrics say.

Rules, all of which first bring the clock-driven part up to date at ``at``:

* Only a heartbeat makes a node healthier. Ticks, stream events, drain requests
  and restarts can only keep or worsen liveness; a reconnected stream is no proof
  of health, the first heartbeat on it is.
* A heartbeat (valid or not) proves liveness: missed count 0, stream connected,
  grace cleared, and the state set from its condition (or ``draining``). An
  invalid heartbeat (any value NaN or infinite, negative, a percentage above
  100, or beyond its sane bound: see :func:`metrics_problem`) makes the node
  ``degraded`` and leaves ``last_metrics`` at the last valid report. A heartbeat older than the last one is stale and ignored.
* ``ControllerRestarted`` gives a fresh grace period: the node may become
  suspect, but not failed before ``at + restart_grace_seconds``.

Example::

    >>> config = HealthConfig.fast(1.0)
    >>> node = NodeHealth.registered("n1", at=0.0)
    >>> ok = Metrics(cpu_percent=20, memory_percent=30, disk_percent=10,
    ...              active_requests=3, error_rate=0.0, avg_response_time_ms=12)
    >>> node = transition(node, HeartbeatReceived(at=0.5, metrics=ok), config).new
    >>> node.state
    <NodeState.READY: 'ready'>
    >>> transition(node, Tick(at=1.55), config).new.state  # 1.05 s late: within tolerance
    <NodeState.READY: 'ready'>
    >>> transition(node, Tick(at=1.6), config).new.state   # 1 interval + 10 % missed
    <NodeState.SUSPECT: 'suspect'>
    >>> transition(node, Tick(at=3.6), config).new.consecutive_missed
    3
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from enum import IntEnum, StrEnum
from typing import TypeAlias

from controller.nodes.validation import METRIC_LIMITS, number_problem


class NodeState(StrEnum):
    """The state of a node as the controller sees it (spec §3.2 plus suspect and draining)."""

    INITIALIZING = "initializing"
    READY = "ready"
    BUSY = "busy"
    DEGRADED = "degraded"
    SUSPECT = "suspect"
    FAILED = "failed"
    DRAINING = "draining"
    REMOVED = "removed"


_SCHEDULABLE = frozenset({NodeState.READY, NodeState.BUSY})
_ROUTABLE = frozenset({NodeState.READY, NodeState.BUSY, NodeState.DEGRADED, NodeState.DRAINING})


def is_schedulable(state: NodeState) -> bool:
    """Whether new replicas may be placed on a node in ``state``: ready or busy (spec §4.2)."""
    return state in _SCHEDULABLE


def is_routable(state: NodeState) -> bool:
    """Whether traffic may go to replicas already on a node in ``state``.

    Ready, busy, degraded (still serving; the load balancer weighs it down) and
    draining (no new placements, but its replicas serve until moved). Not
    initializing (nothing confirmed yet), suspect, failed or removed.
    """
    return state in _ROUTABLE


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """Thresholds and timing of the health state machine (spec §4.4)."""

    interval_seconds: float = 30.0
    """How often nodes heartbeat; the unit in which missed heartbeats are counted."""

    suspect_after_missed: int = 1
    """Missed intervals after which a node is suspect."""

    failed_after_missed: int = 3
    """Missed intervals after which a node is failed (outside a grace period)."""

    late_tolerance_fraction: float = 0.1
    """How late, as a fraction of the interval, a heartbeat may be before it counts
    as missed: heartbeat *k* is missed at ``silent_since + (k + this) * interval``."""

    busy_cpu_percent: float = 90.0
    """CPU use strictly above this makes a node busy."""

    busy_memory_percent: float = 90.0
    """Memory use strictly above this makes a node busy."""

    degraded_error_rate_percent: float = 5.0
    """An error rate strictly above this makes a node degraded (degraded wins over busy)."""

    restart_grace_seconds: float | None = None
    """After a controller restart (or when a node is loaded from the store), how long
    a node may not be declared failed; ``None`` means three intervals."""

    def __post_init__(self) -> None:
        if not (self.interval_seconds > 0 and math.isfinite(self.interval_seconds)):
            raise ValueError(f"interval_seconds must be positive, got {self.interval_seconds!r}")
        if not 1 <= self.suspect_after_missed <= self.failed_after_missed:
            raise ValueError("need 1 <= suspect_after_missed <= failed_after_missed")
        if not 0.0 <= self.late_tolerance_fraction < 1.0:
            raise ValueError("late_tolerance_fraction must be in [0, 1)")
        for name in ("busy_cpu_percent", "busy_memory_percent", "degraded_error_rate_percent"):
            value = getattr(self, name)
            if not 0.0 <= value <= 100.0:
                raise ValueError(f"{name} must be a percentage in [0, 100], got {value!r}")
        if self.restart_grace_seconds is not None and not self.restart_grace_seconds >= 0:
            raise ValueError("restart_grace_seconds must be >= 0")

    @classmethod
    def fast(cls, interval: float = 0.1) -> HealthConfig:
        """The default thresholds at a short interval, for tests and benchmarks."""
        return cls(interval_seconds=interval)

    @property
    def grace_seconds(self) -> float:
        """The restart grace period in seconds, with the default filled in."""
        if self.restart_grace_seconds is None:
            return 3 * self.interval_seconds
        return self.restart_grace_seconds

    @property
    def suspect_after_seconds(self) -> float:
        """Silence after which a node is suspect: ``(suspect_after_missed + tolerance) * interval``."""
        return (self.suspect_after_missed + self.late_tolerance_fraction) * self.interval_seconds

    @property
    def failed_after_seconds(self) -> float:
        """Silence after which a node is failed: ``(failed_after_missed + tolerance) * interval``."""
        return (self.failed_after_missed + self.late_tolerance_fraction) * self.interval_seconds


@dataclass(frozen=True, slots=True)
class Metrics:
    """What one heartbeat reports (spec §3.6). Percentages are 0 to 100."""

    cpu_percent: float
    memory_percent: float
    disk_percent: float
    active_requests: int
    error_rate: float
    """Percentage of requests that failed."""
    avg_response_time_ms: float
    uptime_seconds: int = 0
    """Seconds since the node's agent started."""


# (field, limit) of every metric with a limit, in field order: the first problem is reported.
_METRIC_CHECKS = tuple(
    (item.name, METRIC_LIMITS[item.name]) for item in fields(Metrics) if item.name in METRIC_LIMITS
)


def metrics_problem(metrics: Metrics) -> str | None:
    """Why a heartbeat's metrics are invalid, or ``None`` when they are valid.

    Invalid means any value that is not a number, NaN or infinite, negative, a
    percentage above 100, or above its sane bound
    (:data:`controller.nodes.validation.METRIC_LIMITS`).

    >>> metrics_problem(Metrics(float("nan"), 1, 1, 0, 0, 1))
    'cpu_percent is NaN'
    >>> metrics_problem(Metrics(1, 101, 1, 0, 0, 1))
    'memory_percent is above 100 (101)'
    >>> metrics_problem(Metrics(1, 1, 1, 0, 0, 1e308))
    'avg_response_time_ms is above 86400000 (1e+308)'
    """
    # Once per heartbeat (twice: the fleet, then the state machine), so the common case,
    # a plain number within its range, is decided inline; anything else gets the full check.
    for name, limit in _METRIC_CHECKS:
        value = getattr(metrics, name)
        kind = type(value)
        if (kind is float or kind is int) and limit.low <= value <= limit.high and not limit.positive:
            continue  # NaN fails both comparisons, infinities the bounds
        problem = number_problem(value, limit)
        if problem is not None:
            return f"{name} {problem}"
    return None


def condition(metrics: Metrics, config: HealthConfig) -> tuple[NodeState, str]:
    """The state valid metrics call for, with the reason: degraded > busy > ready."""
    if metrics.error_rate > config.degraded_error_rate_percent:
        return NodeState.DEGRADED, (
            f"error rate {metrics.error_rate:g}% above {config.degraded_error_rate_percent:g}%"
        )
    if metrics.cpu_percent > config.busy_cpu_percent:
        return NodeState.BUSY, f"cpu {metrics.cpu_percent:g}% above {config.busy_cpu_percent:g}%"
    if metrics.memory_percent > config.busy_memory_percent:
        return NodeState.BUSY, f"memory {metrics.memory_percent:g}% above {config.busy_memory_percent:g}%"
    return NodeState.READY, "healthy heartbeat"


@dataclass(frozen=True, slots=True)
class NodeHealth:
    """Everything the state machine knows about one node. Immutable: events make new ones."""

    node_id: str
    state: NodeState
    monitored_since: float
    """When the controller began watching the node (registration, or load at start-up);
    silence is measured from here until a heartbeat arrives after it."""
    last_transition_at: float
    """When ``state`` last changed."""
    reason: str
    """Why the node entered its state (for heartbeat-driven states: what the latest
    heartbeat said)."""
    last_heartbeat_at: float | None = None
    """When the last heartbeat arrived; ``None`` before the first."""
    consecutive_missed: int = 0
    """Whole intervals missed since :func:`silent_since`, as of the latest event."""
    stream_connected: bool = False
    """Whether the node's stream is up, as far as events tell."""
    draining: bool = False
    """The administrative drain flag: once set, heartbeats keep the node draining."""
    grace_until: float | None = None
    """The node cannot be declared failed before this time (restart grace)."""
    last_metrics: Metrics | None = None
    """The metrics of the last *valid* heartbeat."""

    @classmethod
    def registered(cls, node_id: str, at: float) -> NodeHealth:
        """A node that has just registered: initializing, watched from ``at``."""
        return cls(
            node_id=node_id,
            state=NodeState.INITIALIZING,
            monitored_since=at,
            last_transition_at=at,
            reason="registered, waiting for the first heartbeat",
        )

    @classmethod
    def restored(
        cls,
        node_id: str,
        state: NodeState,
        last_heartbeat_at: float | None,
        now: float,
        config: HealthConfig,
        *,
        draining: bool = False,
    ) -> NodeHealth:
        """A node loaded from the store at start-up.

        It keeps its stored state, silence is counted from ``now`` (the stored
        heartbeat time is persisted at a bounded rate, so it is stale by design),
        and it gets a fresh grace period: it cannot be failed before
        ``now + grace_seconds``. ``last_heartbeat_at`` is kept for display.
        """
        state = NodeState(state)
        draining = draining or state is NodeState.DRAINING
        return cls(
            node_id=node_id,
            state=state,
            monitored_since=now,
            last_transition_at=now,
            reason="restored from the store at controller start",
            last_heartbeat_at=last_heartbeat_at,
            draining=draining,
            grace_until=now + config.grace_seconds,
        )


@dataclass(frozen=True, slots=True)
class HeartbeatReceived:
    """The node reported its metrics (a heartbeat on its stream)."""

    at: float
    metrics: Metrics


@dataclass(frozen=True, slots=True)
class StreamConnected:
    """The node's stream (re)connected. Not proof of health: a heartbeat is."""

    at: float


@dataclass(frozen=True, slots=True)
class StreamBroken:
    """The node's stream ended or failed: the node is suspect at once."""

    at: float


@dataclass(frozen=True, slots=True)
class Tick:
    """The sweeper's periodic check: brings the clock-driven part up to date."""

    at: float


@dataclass(frozen=True, slots=True)
class DrainRequested:
    """An operator asked for no new placements on the node (sticky)."""

    at: float


@dataclass(frozen=True, slots=True)
class UndrainRequested:
    """An operator lifted the drain: the node takes placements again.

    A draining node's state becomes what its last valid heartbeat called for
    (``initializing`` if it never sent one); a suspect or failed node stays so
    (only a heartbeat makes a node healthier) and returns to its condition, not
    to ``draining``, when it heartbeats again.
    """

    at: float


@dataclass(frozen=True, slots=True)
class Removed:
    """The node was deregistered: terminal."""

    at: float


@dataclass(frozen=True, slots=True)
class ControllerRestarted:
    """The controller (re)started: the node gets a fresh grace period before failure."""

    at: float


Event: TypeAlias = (
    HeartbeatReceived
    | StreamConnected
    | StreamBroken
    | Tick
    | DrainRequested
    | UndrainRequested
    | Removed
    | ControllerRestarted
)


@dataclass(frozen=True, slots=True)
class Transition:
    """The result of one event: the new health, and whether the *state* changed."""

    new: NodeHealth
    changed: bool
    previous_state: NodeState


class _Liveness(IntEnum):
    ALIVE = 0
    SUSPECT = 1
    FAILED = 2


def silent_since(health: NodeHealth) -> float:
    """The time from which silence is measured: the last heartbeat, or when
    monitoring began if no heartbeat has been seen since then."""
    last = health.last_heartbeat_at
    if last is None or last < health.monitored_since:
        return health.monitored_since
    return last


def missed_deadline(health: NodeHealth, k: int, config: HealthConfig) -> float:
    """When the *k*-th expected heartbeat counts as missed:
    ``silent_since + (k + late_tolerance_fraction) * interval``."""
    return silent_since(health) + (k + config.late_tolerance_fraction) * config.interval_seconds


def missed_intervals(health: NodeHealth, now: float, config: HealthConfig) -> int:
    """How many whole heartbeat intervals the node has missed at ``now``: the
    largest *k* with ``missed_deadline(k) <= now``, or 0.

    >>> config = HealthConfig.fast(1.0)
    >>> node = NodeHealth.registered("n1", at=10.0)
    >>> [missed_intervals(node, t, config) for t in (10.0, 11.09, 11.1, 13.1, 100.0)]
    [0, 0, 1, 3, 89]
    """
    if now < missed_deadline(health, 1, config):
        return 0
    interval = config.interval_seconds
    missed = max(1, int((now - silent_since(health)) / interval - config.late_tolerance_fraction))
    # The division is approximate; settle on exactly the deadline comparison.
    while missed > 1 and missed_deadline(health, missed, config) > now:
        missed -= 1
    while missed_deadline(health, missed + 1, config) <= now:
        missed += 1
    return missed


def _liveness_of(state: NodeState) -> _Liveness:
    if state is NodeState.FAILED:
        return _Liveness.FAILED
    if state is NodeState.SUSPECT:
        return _Liveness.SUSPECT
    return _Liveness.ALIVE


def _in_grace(health: NodeHealth, at: float) -> bool:
    return health.grace_until is not None and at < health.grace_until


def _silence_reason(health: NodeHealth, missed: int, at: float, config: HealthConfig) -> str:
    since = "last heartbeat" if health.last_heartbeat_at is not None else "monitoring began"
    return (
        f"missed {missed} heartbeat interval(s) of {config.interval_seconds:g}s "
        f"({at - silent_since(health):.3g}s since {since})"
    )


def _unchanged(health: NodeHealth) -> Transition:
    return Transition(new=health, changed=False, previous_state=health.state)


def _finish(old: NodeHealth, new: NodeHealth, at: float) -> Transition:
    if new == old:
        return _unchanged(old)
    changed = new.state != old.state
    if changed:
        new = replace(new, last_transition_at=at)
    return Transition(new=new, changed=changed, previous_state=old.state)


def _heartbeat(health: NodeHealth, event: HeartbeatReceived, config: HealthConfig) -> Transition:
    if health.last_heartbeat_at is not None and event.at < health.last_heartbeat_at:
        return _unchanged(health)  # stale: an older heartbeat arriving late
    problem = metrics_problem(event.metrics)
    if problem is not None:
        state, reason = NodeState.DEGRADED, f"invalid heartbeat: {problem}"
        metrics = health.last_metrics
    else:
        state, reason = condition(event.metrics, config)
        metrics = event.metrics
    if health.draining:
        state, reason = NodeState.DRAINING, f"drain requested (heartbeat: {reason})"
    changed = state is not health.state
    # Built directly (not dataclasses.replace, which looks up every field): once per heartbeat.
    new = NodeHealth(
        node_id=health.node_id,
        state=state,
        monitored_since=health.monitored_since,
        last_transition_at=event.at if changed else health.last_transition_at,
        reason=reason,
        last_heartbeat_at=event.at,
        consecutive_missed=0,
        stream_connected=True,
        draining=health.draining,
        grace_until=None,
        last_metrics=metrics,
    )
    if not changed:  # the common case: no equality check of the whole record
        return Transition(new=new, changed=False, previous_state=state)
    return Transition(new=new, changed=True, previous_state=health.state)


def tick_due(health: NodeHealth, config: HealthConfig) -> float:
    """The earliest time at which a :class:`Tick` would change ``health`` at all: the next
    missed-heartbeat deadline or, for a node held from failure only by the restart grace,
    the end of the grace period (``inf`` for a removed node). A Tick before it returns the
    record unchanged, so the sweeper need only visit nodes whose due time has passed.

    Events only ever move it later, except a :class:`ControllerRestarted`, which may set
    a grace period (see :meth:`controller.nodes.monitor.HealthMonitor.observe`).

    >>> config = HealthConfig.fast(1.0)
    >>> tick_due(NodeHealth.registered("n1", at=10.0), config)
    11.1
    """
    if health.state is NodeState.REMOVED:
        return math.inf
    deadline = missed_deadline(health, health.consecutive_missed + 1, config)
    if health.state is NodeState.FAILED:
        return deadline
    if health.consecutive_missed >= config.failed_after_missed and health.grace_until is not None:
        return min(deadline, health.grace_until)  # failure waits only for the grace to end
    return deadline


def _tick_changes_nothing(health: NodeHealth, at: float, config: HealthConfig) -> bool:
    """Whether a Tick at ``at`` would leave ``health`` exactly as it is: no further
    interval missed, and no failure waiting only for the grace period to end."""
    return at < tick_due(health, config)


def _undrain(health: NodeHealth, at: float, config: HealthConfig) -> Transition:
    if not health.draining:
        return _unchanged(health)
    state, reason = health.state, health.reason
    if health.state is NodeState.DRAINING:
        if health.last_heartbeat_at is None:
            state, reason = NodeState.INITIALIZING, "drain lifted; waiting for the first heartbeat"
        elif health.last_metrics is None:
            state, reason = NodeState.DEGRADED, "drain lifted; no valid heartbeat yet"
        else:
            state, reason = condition(health.last_metrics, config)
            reason = f"drain lifted ({reason})"
    return _finish(health, replace(health, draining=False, state=state, reason=reason), at)


def transition(health: NodeHealth, event: Event, config: HealthConfig) -> Transition:
    """Apply one event to one node's health. Pure: no clock, no I/O.

    ``changed`` is true exactly when the state changed; the other fields (missed
    count, stream flag, grace, metrics) may change without it. When nothing
    changes at all, ``new`` is ``health`` itself.
    """
    if health.state is NodeState.REMOVED:
        return _unchanged(health)
    at = event.at
    if isinstance(event, Removed):
        new = replace(health, state=NodeState.REMOVED, reason="deregistered", stream_connected=False)
        return _finish(health, new, at)
    if isinstance(event, HeartbeatReceived):
        return _heartbeat(health, event, config)
    if isinstance(event, Tick) and _tick_changes_nothing(health, at, config):
        return _unchanged(health)  # the sweeper's common case, kept cheap
    if isinstance(event, UndrainRequested):
        return _undrain(health, at, config)

    stream_connected = health.stream_connected
    draining = health.draining
    grace_until = health.grace_until
    floor = _Liveness.ALIVE
    floor_reason = ""
    if isinstance(event, StreamConnected):
        stream_connected = True
    elif isinstance(event, StreamBroken):
        stream_connected = False
        floor, floor_reason = _Liveness.SUSPECT, "stream broken"
    elif isinstance(event, DrainRequested):
        draining = True
    elif isinstance(event, ControllerRestarted):
        grace_until = at + config.grace_seconds
    base = replace(health, stream_connected=stream_connected, draining=draining, grace_until=grace_until)

    missed = missed_intervals(base, at, config)
    if missed >= config.failed_after_missed and not _in_grace(base, at):
        timed = _Liveness.FAILED
    elif missed >= config.suspect_after_missed:
        timed = _Liveness.SUSPECT
    else:
        timed = _Liveness.ALIVE

    current = _liveness_of(health.state)
    liveness = max(current, timed, floor)
    state, reason = health.state, health.reason
    if liveness is _Liveness.FAILED:
        state = NodeState.FAILED
        if current is not _Liveness.FAILED:
            reason = "failed: " + _silence_reason(base, missed, at, config)
    elif liveness is _Liveness.SUSPECT:
        state = NodeState.SUSPECT
        held = missed >= config.failed_after_missed  # suspect only because of the grace period
        if current is not _Liveness.SUSPECT:
            reason = (
                floor_reason if floor_reason and floor >= timed else _silence_reason(base, missed, at, config)
            )
        elif held and health.consecutive_missed < config.failed_after_missed:
            reason = _silence_reason(base, missed, at, config)  # say why it is not failed yet
        if held and reason != health.reason:
            reason += f"; failure held off by restart grace until {base.grace_until:g}"
    elif draining and health.state is not NodeState.DRAINING:
        state, reason = NodeState.DRAINING, "drain requested"

    new = replace(
        base,
        state=state,
        reason=reason,
        consecutive_missed=max(health.consecutive_missed, missed),
    )
    return _finish(health, new, at)
