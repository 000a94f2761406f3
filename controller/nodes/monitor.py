"""The health monitor: the state machine of :mod:`controller.nodes.health` for many nodes.

The monitor holds one :class:`~controller.nodes.health.NodeHealth` per node (each
node belongs to one user), applies events to it, and reports what changed. It does
no I/O itself and reads no clock: the node streams call :meth:`HealthMonitor.heartbeat`
and friends with the time of the event, and the server runs
:meth:`HealthMonitor.run` with an injected clock and sleep, which calls
:meth:`HealthMonitor.sweep` every ``interval / 4``.

A sweep visits only the nodes whose **due time** has passed
(:func:`~controller.nodes.health.tick_due`: the next missed-heartbeat deadline, or the
end of a restart grace that alone holds off a failure), kept in a heap with one entry
per node. A heartbeat does not touch the heap: it only moves the node's due time later,
so the entry is checked when it comes up and pushed again with the real due time. A
sweep of 20,000 nodes heartbeating every 30 s thus visits the ~5,000 whose entries came
up in the last quarter interval (a heap pop and push each) instead of ticking all
20,000 (50-100 ms on this machine, in one go on the event loop), and ticks only the
silent ones. Results are exactly those of ticking every node (a tick before the due time
changes nothing), reported in the order the nodes were added.

What it reports, in the order things happened, through awaited callbacks:

* **State changes** (:class:`StateChange`) to every transition listener, once per
  change of state, never per heartbeat. The server writes the store and the cache
  there: *the store is written on state changes, never per heartbeat*; metrics
  between changes are written at a bounded rate, see :meth:`should_persist_metrics`.
* **Recovery**: ``recovery_hook(node_id, user_id)`` once per failure of a node.
  The hook is held for one *mass-failure window* (default one interval) after the
  node became failed, so that a mass failure is seen whole before anything is
  migrated; if the node heartbeats again within the window, the hook is not called.
* **Alerts**: ``on_alert(user_id, message)`` when recovery is frozen for a user.

Mass failure
------------

After each batch of events (one sweep, or one single event) in which nodes of
user *U* became failed, the last at time *t*, the monitor counts *U*'s nodes that
are failed and became failed within the window ``(t - window, t]``. If that
count is at least ``mass_failure_min_failed`` (default 2) **and** more than
``mass_failure_fraction`` (default half) of *U*'s monitored nodes, recovery is
**frozen** for *U*: no recovery hook is called for *U*'s nodes, an alert is
raised once, and *U* is listed in :attr:`HealthMonitor.frozen_users`. So many
nodes failing together most likely means the controller's own network is at
fault, and migrating everything would make it worse (Kubernetes stops evictions
in a mostly-unhealthy zone, and entirely in small clusters, for the same reason).

The minimum of two failed nodes means a user with a single node is never frozen
(one node failing is an ordinary failure), while a user whose two nodes both fail
within one window is: there would be no healthy node to migrate to anyway, and the
alert tells an operator.

The freeze lifts:

* **automatically**, when no more than ``mass_failure_fraction`` of *U*'s nodes
  are failed any more (nodes came back or were removed). Nodes still failed then
  are held one more window and, if still failed, recovered;
* **by an operator**, :meth:`HealthMonitor.unfreeze`: the hook is called at once
  for every node of *U* that failed and is still failed.

A node that fails while its user is frozen is held the same way: it is recovered
when the freeze lifts if it is still failed, and never if it came back.

Delivery
--------

Event methods (:meth:`~HealthMonitor.heartbeat`, :meth:`~HealthMonitor.observe`, …)
are synchronous and cheap: they update memory and queue notifications.
:meth:`~HealthMonitor.flush` delivers the queue in order, one notification at a
time; :meth:`~HealthMonitor.sweep` flushes at its end and :meth:`~HealthMonitor.run`
also flushes whenever something is queued. A callback that raises is logged and
does not stop delivery. Callbacks must not await :meth:`~HealthMonitor.flush`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from controller.errors import NotFound
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
    tick_due,
    transition,
)

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
"""Returns the current time in seconds (``time.monotonic`` in production)."""

Sleep = Callable[[float], Awaitable[None]]
"""Waits the given number of seconds (``asyncio.sleep`` in production)."""

RecoveryHook = Callable[[str, str], Awaitable[None]]
"""``recovery_hook(node_id, user_id)``: move the failed node's work elsewhere.
It should hand the work off and return promptly: delivery waits for it."""

AlertHook = Callable[[str, str], Awaitable[None]]
"""``on_alert(user_id, message)``: tell an operator."""


@dataclass(frozen=True, slots=True)
class StateChange:
    """One change of a node's state, as reported to transition listeners."""

    node_id: str
    user_id: str
    old: NodeState
    new: NodeState
    reason: str
    at: float
    health: NodeHealth
    """The node's full health after the change (metrics, last heartbeat) for the store write."""


TransitionListener = Callable[[StateChange], Awaitable[None]]
"""Called with every :class:`StateChange`, in order."""


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    """Settings of the health monitor."""

    health: HealthConfig = field(default_factory=HealthConfig)
    """The per-node state machine's thresholds and timing."""

    mass_failure_window_seconds: float | None = None
    """Failures of one user's nodes within this window count together, and each
    failed node's recovery is held this long; ``None`` means one heartbeat interval."""

    mass_failure_fraction: float = 0.5
    """Recovery freezes when *more than* this fraction of a user's nodes fail within the window."""

    mass_failure_min_failed: int = 2
    """…and at least this many of them: a user with a single node is never frozen."""

    sweep_period_seconds: float | None = None
    """How often :meth:`HealthMonitor.run` sweeps; ``None`` means a quarter interval."""

    def __post_init__(self) -> None:
        if not 0.0 < self.mass_failure_fraction < 1.0:
            raise ValueError("mass_failure_fraction must be in (0, 1)")
        if self.mass_failure_min_failed < 1:
            raise ValueError("mass_failure_min_failed must be >= 1")
        if self.mass_failure_window_seconds is not None and not self.mass_failure_window_seconds >= 0:
            raise ValueError("mass_failure_window_seconds must be >= 0")
        if self.sweep_period_seconds is not None and not self.sweep_period_seconds > 0:
            raise ValueError("sweep_period_seconds must be > 0")

    @property
    def window_seconds(self) -> float:
        """The mass-failure window with its default filled in."""
        if self.mass_failure_window_seconds is None:
            return self.health.interval_seconds
        return self.mass_failure_window_seconds

    @property
    def sweep_seconds(self) -> float:
        """The sweep period with its default filled in."""
        if self.sweep_period_seconds is None:
            return self.health.interval_seconds / 4
        return self.sweep_period_seconds


@dataclass(frozen=True, slots=True)
class _Recovery:
    node_id: str
    user_id: str


@dataclass(frozen=True, slots=True)
class _Alert:
    user_id: str
    message: str


_Notice = StateChange | _Recovery | _Alert

SWEEP_BATCH = 1000
"""Heap entries a sweep handles before letting other tasks run (a few ms on this machine)."""


@dataclass(slots=True)
class _Entry:
    user_id: str
    health: NodeHealth
    order: int
    """When the node was added (a counter): sweeps report in this order."""
    due: float = math.inf
    """The due time of the node's live entry in the sweep heap (no later than its real one)."""


class HealthMonitor:
    """Health of every monitored node, driven by events and periodic sweeps."""

    def __init__(
        self,
        config: MonitorConfig | None = None,
        *,
        on_transition: TransitionListener | None = None,
        recovery_hook: RecoveryHook | None = None,
        on_alert: AlertHook | None = None,
        after_changes: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config or MonitorConfig()
        self._after_changes = after_changes
        self._listeners: list[TransitionListener] = [on_transition] if on_transition else []
        self._recovery_hook = recovery_hook
        self._on_alert = on_alert
        self._nodes: dict[str, _Entry] = {}
        self._by_user: dict[str, set[str]] = {}
        self._awaiting_recovery: dict[str, float] = {}  # failed node -> earliest hook time
        self._frozen: dict[str, float] = {}  # user -> when recovery froze
        self._failed_count: dict[str, int] = {}  # user -> nodes failed now
        self._to_check: dict[str, float] = {}  # user -> time of a failure not yet weighed
        self._persisted_at: dict[str, float] = {}
        self._queue: deque[_Notice] = deque()
        # (due time, entry order, node id): the sweep heap. An entry is live while it
        # matches its node's _Entry (due and order); others are stale and skipped.
        self._deadlines: list[tuple[float, int, str]] = []
        self._order = itertools.count()
        self._flush_lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._stop = asyncio.Event()
        self._running = False

    # -- listeners and queries ---------------------------------------------------

    def add_listener(self, listener: TransitionListener) -> None:
        """Also call ``listener`` with every state change."""
        self._listeners.append(listener)

    @property
    def frozen_users(self) -> frozenset[str]:
        """Users whose recovery is frozen by a mass failure."""
        return frozenset(self._frozen)

    def get(self, node_id: str) -> NodeHealth | None:
        """The node's health, or ``None`` if it is not monitored."""
        entry = self._nodes.get(node_id)
        return entry.health if entry else None

    def user_of(self, node_id: str) -> str | None:
        """The user who owns the node, or ``None`` if it is not monitored."""
        entry = self._nodes.get(node_id)
        return entry.user_id if entry else None

    def nodes_of(self, user_id: str) -> dict[str, NodeHealth]:
        """The health of every monitored node of ``user_id``, by node id."""
        return {node_id: self._nodes[node_id].health for node_id in self._by_user.get(user_id, ())}

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._nodes))

    # -- adding nodes ------------------------------------------------------------

    def add(self, node_id: str, user_id: str, now: float) -> NodeHealth:
        """Start monitoring a newly registered node (initializing). Idempotent."""
        entry = self._nodes.get(node_id)
        if entry is not None:
            if entry.user_id != user_id:
                raise ValueError(f"node {node_id} is monitored for another user")
            return entry.health
        return self._track(node_id, user_id, NodeHealth.registered(node_id, now))

    def load(
        self,
        node_id: str,
        user_id: str,
        state: NodeState | str,
        last_heartbeat_at: float | None,
        now: float,
        *,
        draining: bool = False,
    ) -> NodeHealth | None:
        """Start monitoring a node loaded from the store at start-up.

        It keeps its stored state and gets a fresh grace period (see
        :meth:`NodeHealth.restored`). Removed nodes are not monitored: ``None``.
        A node loaded as failed is not recovered again: the deployments
        reconciler owns replicas on failed nodes at start-up.
        """
        health = NodeHealth.restored(
            node_id, NodeState(state), last_heartbeat_at, now, self.config.health, draining=draining
        )
        if health.state is NodeState.REMOVED:
            return None
        self._forget(node_id, now)
        return self._track(node_id, user_id, health)

    def _track(self, node_id: str, user_id: str, health: NodeHealth) -> NodeHealth:
        entry = _Entry(user_id, health, next(self._order))
        self._nodes[node_id] = entry
        self._schedule(node_id, entry)
        self._by_user.setdefault(user_id, set()).add(node_id)
        if health.state is NodeState.FAILED:
            self._count_failed(user_id, +1)
        return health

    def hand_over(self, node_id: str, at: float) -> bool:
        """Stop watching a node that another controller watches now (it holds the node's
        stream): no transition, nothing delivered; whether it was watched here."""
        if node_id not in self._nodes:
            return False
        self._forget(node_id, at)
        return True

    def _forget(self, node_id: str, at: float) -> None:
        entry = self._nodes.pop(node_id, None)
        self._awaiting_recovery.pop(node_id, None)
        self._persisted_at.pop(node_id, None)
        if entry is None:
            return
        if entry.health.state is NodeState.FAILED:
            self._count_failed(entry.user_id, -1)
        users = self._by_user.get(entry.user_id)
        if users is not None:
            users.discard(node_id)
            if not users:
                del self._by_user[entry.user_id]
        self._maybe_thaw(entry.user_id, at)

    # -- events ------------------------------------------------------------------

    def observe(self, node_id: str, event: Event) -> Transition:
        """Apply one event to one node; queue what it changes.

        Raises :class:`~controller.errors.NotFound` (reason ``NODE_NOT_MONITORED``)
        for a node that is not monitored (never added, or removed).
        """
        entry = self._nodes.get(node_id)
        if entry is None:
            raise NotFound(f"node {node_id} is not monitored", reason="NODE_NOT_MONITORED")
        result = transition(entry.health, event, self.config.health)
        entry.health = result.new
        if not isinstance(event, HeartbeatReceived):
            # A heartbeat only moves the due time later (the heap entry, checked when it
            # comes up, stays valid); other events are rare and checked here.
            self._schedule(node_id, entry)
        if result.changed:
            self._changed(node_id, entry.user_id, result, event.at)
            self._weigh_failures()
        return result

    def heartbeat(self, node_id: str, at: float, metrics: Metrics) -> Transition:
        """A heartbeat arrived on the node's stream."""
        return self.observe(node_id, HeartbeatReceived(at=at, metrics=metrics))

    def stream_connected(self, node_id: str, at: float) -> Transition:
        """The node's stream (re)connected."""
        return self.observe(node_id, StreamConnected(at=at))

    def stream_broken(self, node_id: str, at: float) -> Transition:
        """The node's stream broke: suspect at once."""
        return self.observe(node_id, StreamBroken(at=at))

    def drain(self, node_id: str, at: float) -> Transition:
        """No new placements on the node (sticky)."""
        return self.observe(node_id, DrainRequested(at=at))

    def remove(self, node_id: str, at: float) -> Transition:
        """The node was deregistered: report ``removed`` and stop monitoring it."""
        return self.observe(node_id, Removed(at=at))

    def controller_restarted(self, now: float) -> list[StateChange]:
        """Give every monitored node a fresh grace period before it can be failed."""
        return self._apply_all(lambda: ControllerRestarted(at=now))

    def tick(self, now: float) -> list[StateChange]:
        """Apply a :class:`Tick` to every node whose due time has passed (the same as to
        every node: a tick before it changes nothing) and release held recoveries that
        are due.

        Synchronous; :meth:`sweep` is this plus delivery.
        """
        changes: list[StateChange] = []
        while self._tick_some(now, changes, SWEEP_BATCH):
            pass
        self._weigh_failures()
        self._release_due(now)
        return changes

    async def sweep(self, now: float) -> list[StateChange]:
        """:meth:`tick`, letting other tasks run every :data:`SWEEP_BATCH` nodes, then
        deliver everything queued."""
        changes: list[StateChange] = []
        more = self._tick_some(now, changes, SWEEP_BATCH)
        while more:
            await asyncio.sleep(0)  # heartbeats in between are fine: see _tick_some
            more = self._tick_some(now, changes, SWEEP_BATCH)
        self._weigh_failures()
        self._release_due(now)
        await self.flush()
        return changes

    def _tick_some(self, now: float, changes: list[StateChange], limit: int) -> bool:
        """Tick (at ``now``) up to ``limit`` of the nodes whose heap entries have come up;
        whether more may be left. A node that heartbeated after ``now`` in between is due
        later, so it is only rescheduled."""
        config = self.config.health
        due: list[tuple[int, str, _Entry]] = []
        popped = 0
        while self._deadlines and self._deadlines[0][0] <= now and popped < limit:
            popped += 1
            at, order, node_id = heapq.heappop(self._deadlines)  # (_push may rebuild the list)
            entry = self._nodes.get(node_id)
            if entry is None or entry.order != order or entry.due != at:
                continue  # stale: the node was forgotten, reloaded or rescheduled
            entry.due = math.inf
            real = tick_due(entry.health, config)
            if real > now:  # it heartbeated since: check again when that comes up
                self._push(node_id, entry, real)
            else:
                due.append((order, node_id, entry))
        due.sort()
        event = Tick(at=now)
        for _, node_id, entry in due:
            if self._nodes.get(node_id) is not entry:
                continue  # forgotten by an earlier change in this pass
            result = transition(entry.health, event, config)
            entry.health = result.new
            if result.changed:
                changes.append(self._changed(node_id, entry.user_id, result, now))
            if self._nodes.get(node_id) is entry:
                self._schedule(node_id, entry)
        return popped == limit

    def _schedule(self, node_id: str, entry: _Entry) -> None:
        """Make sure the sweep heap has an entry for the node no later than its due time."""
        due = tick_due(entry.health, self.config.health)
        if due < entry.due:
            self._push(node_id, entry, due)

    def _push(self, node_id: str, entry: _Entry, due: float) -> None:
        if due == math.inf:
            return
        entry.due = due
        heapq.heappush(self._deadlines, (due, entry.order, node_id))
        if len(self._deadlines) > 4 * len(self._nodes) + 1024:  # many stale entries: rebuild
            self._deadlines = [(e.due, e.order, n) for n, e in self._nodes.items() if e.due != math.inf]
            heapq.heapify(self._deadlines)

    def _apply_all(self, make: Callable[[], Event]) -> list[StateChange]:
        changes: list[StateChange] = []
        event = make()
        for node_id, entry in list(self._nodes.items()):
            if self._nodes.get(node_id) is not entry:
                continue  # forgotten by an earlier change in this pass
            result = transition(entry.health, event, self.config.health)
            entry.health = result.new
            if result.changed:
                changes.append(self._changed(node_id, entry.user_id, result, event.at))
            if self._nodes.get(node_id) is entry:
                self._schedule(node_id, entry)
        self._weigh_failures()
        return changes

    def _changed(self, node_id: str, user_id: str, result: Transition, at: float) -> StateChange:
        new = result.new
        change = StateChange(
            node_id=node_id,
            user_id=user_id,
            old=result.previous_state,
            new=new.state,
            reason=new.reason,
            at=at,
            health=new,
        )
        self._enqueue(change)
        if new.state is NodeState.FAILED:
            self._count_failed(user_id, +1)
            self._awaiting_recovery[node_id] = at + self.config.window_seconds
            self._to_check[user_id] = at
        elif result.previous_state is NodeState.FAILED:
            self._count_failed(user_id, -1)
            self._awaiting_recovery.pop(node_id, None)
            self._maybe_thaw(user_id, at)
        if new.state is NodeState.REMOVED:
            self._forget(node_id, at)
        return change

    # -- recovery and mass failure -------------------------------------------------

    def _count_failed(self, user_id: str, delta: int) -> None:
        count = self._failed_count.get(user_id, 0) + delta
        if count:
            self._failed_count[user_id] = count
        else:
            self._failed_count.pop(user_id, None)

    def _weigh_failures(self) -> None:
        """Decide, once per batch of events (a sweep, or one event), whether the new
        failures of each user add up to a mass failure."""
        window = self.config.window_seconds
        while self._to_check:
            user_id, at = self._to_check.popitem()
            if user_id in self._frozen:
                continue
            node_ids = self._by_user.get(user_id, set())
            recent = 0
            for node_id in node_ids:
                health = self._nodes[node_id].health
                if health.state is NodeState.FAILED and at - health.last_transition_at < window:
                    recent += 1
            total = len(node_ids)
            if (
                recent < self.config.mass_failure_min_failed
                or recent <= self.config.mass_failure_fraction * total
            ):
                continue
            self._frozen[user_id] = at
            message = (
                f"mass failure: {recent} of {total} nodes failed within {window:g}s; recovery frozen "
                f"for this user (the fault is likely the controller's own network). It resumes when "
                f"the nodes come back, or on unfreeze."
            )
            logger.warning("user %s: %s", user_id, message)
            self._enqueue(_Alert(user_id, message))

    def _maybe_thaw(self, user_id: str, at: float) -> None:
        """Lift a freeze once no more than the fraction of the user's nodes are failed."""
        if user_id not in self._frozen:
            return
        total = len(self._by_user.get(user_id, ()))
        if total and self._failed_count.get(user_id, 0) > self.config.mass_failure_fraction * total:
            return
        del self._frozen[user_id]
        logger.info("user %s: nodes came back, recovery resumes", user_id)
        release = at + self.config.window_seconds
        for node_id in self._by_user.get(user_id, set()):
            if node_id in self._awaiting_recovery:
                self._awaiting_recovery[node_id] = max(self._awaiting_recovery[node_id], release)

    def unfreeze(self, user_id: str) -> bool:
        """An operator resumes recovery for ``user_id``: the hook is queued at once for
        every node of the user that is still failed and not yet recovered.
        Returns whether the user was frozen."""
        if self._frozen.pop(user_id, None) is None:
            return False
        logger.info("user %s: recovery unfrozen by an operator", user_id)
        for node_id in sorted(self._by_user.get(user_id, set())):
            if self._awaiting_recovery.pop(node_id, None) is not None:
                self._enqueue(_Recovery(node_id, user_id))
        return True

    def _release_due(self, now: float) -> None:
        for node_id, due in list(self._awaiting_recovery.items()):
            if due > now:
                continue
            user_id = self._nodes[node_id].user_id
            if user_id in self._frozen:
                continue
            del self._awaiting_recovery[node_id]
            self._enqueue(_Recovery(node_id, user_id))

    # -- metrics persistence bookkeeping -----------------------------------------

    def should_persist_metrics(self, node_id: str, now: float, min_interval_seconds: float = 60.0) -> bool:
        """Whether to write the node's metrics to the store now: true at most once per
        ``min_interval_seconds`` per node (and records the write when true)."""
        last = self._persisted_at.get(node_id)
        if last is not None and now - last < min_interval_seconds:
            return False
        self._persisted_at[node_id] = now
        return True

    def mark_persisted(self, node_id: str, now: float) -> None:
        """Record that the node's metrics were written (e.g. with a state change)."""
        self._persisted_at[node_id] = now

    # -- delivery ------------------------------------------------------------------

    def _enqueue(self, notice: _Notice) -> None:
        self._queue.append(notice)
        self._wakeup.set()

    @property
    def running(self) -> bool:
        """Whether :meth:`run` is active (it delivers whatever is queued, promptly)."""
        return self._running

    @property
    def pending(self) -> int:
        """Notifications queued and not yet delivered."""
        return len(self._queue)

    async def flush(self) -> None:
        """Deliver every queued notification, in order.

        After a run of state changes (before the next recovery or alert notice, and at
        the end) ``after_changes`` is awaited once: listeners can batch their writes
        (the fleet writes all of them in one store transaction) and still have them done
        before a recovery hook runs and before ``flush`` returns.
        """
        async with self._flush_lock:
            changed = False
            while self._queue:
                notice = self._queue.popleft()
                if changed and not isinstance(notice, StateChange):
                    await self._changes_done()
                    changed = False
                await self._deliver(notice)
                changed = changed or isinstance(notice, StateChange)
            if changed:
                await self._changes_done()

    async def _changes_done(self) -> None:
        if self._after_changes is None:
            return
        try:
            await self._after_changes()
        except Exception:
            logger.exception("health monitor: after_changes failed")

    async def _deliver(self, notice: _Notice) -> None:
        try:
            if isinstance(notice, StateChange):
                for listener in list(self._listeners):
                    try:
                        await listener(notice)
                    except Exception:
                        logger.exception("transition listener failed for node %s", notice.node_id)
            elif isinstance(notice, _Recovery):
                health = self.get(notice.node_id)
                if health is None or health.state is not NodeState.FAILED:
                    return  # came back (or removed) before the hook ran
                if self._recovery_hook is not None:
                    await self._recovery_hook(notice.node_id, notice.user_id)
            elif self._on_alert is not None:
                await self._on_alert(notice.user_id, notice.message)
        except Exception:
            logger.exception("health monitor callback failed: %r", notice)

    # -- the loop ------------------------------------------------------------------

    async def run(self, clock: Clock, sleep: Sleep) -> None:
        """Sweep every ``sweep_seconds`` and deliver notifications as they are queued,
        until :meth:`stop`. Clock and sleep are injected (tests advance a fake clock)."""
        if self._running:
            raise RuntimeError("the health monitor is already running")
        self._running = True
        delivery = asyncio.create_task(self._deliver_until_stopped())
        try:
            while not self._stop.is_set():
                await self.sweep(clock())
                await self._pause(sleep, self.config.sweep_seconds)
        finally:
            self._stop.set()
            self._wakeup.set()
            await delivery
            await self.flush()
            self._running = False

    def stop(self) -> None:
        """Ask :meth:`run` to return (after delivering what is queued). Final: a
        stopped monitor's :meth:`run` returns at once."""
        self._stop.set()
        self._wakeup.set()

    async def _deliver_until_stopped(self) -> None:
        while not self._stop.is_set():
            await self._wakeup.wait()
            self._wakeup.clear()
            await self.flush()

    async def _pause(self, sleep: Sleep, seconds: float) -> None:
        if self._stop.is_set():
            return
        sleeper = asyncio.ensure_future(sleep(seconds))
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, stopper):
                task.cancel()
            for task in (sleeper, stopper):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
