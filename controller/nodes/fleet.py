"""The live fleet: node streams, the health monitor, live metrics, and their persistence.

This is the edge between the pure health logic (:mod:`controller.nodes.health`,
:mod:`controller.nodes.monitor`) and the outside world:

* a heartbeat updates **memory** (the monitor and the live metrics) at once;
  an invalid one (see :mod:`controller.nodes.validation`) only the monitor (the
  node becomes degraded): its numbers never reach aggregates, placement, the
  history, the cache or the store;
  the **cache** key ``node:health:{node_id}`` (TTL 60 s) at most every
  ``CACHE_REFRESH_SECONDS`` per node and on every state change; the **store**
  on state changes and, for metrics, at most every ``STORE_METRICS_SECONDS``
  per node — never once per heartbeat;
* hourly history: one sample per node per ``HISTORY_SAMPLE_SECONDS`` appended to
  ``node:metrics:history:{node_id}:{hour}`` (TTL 7 days);
* a node that becomes failed triggers the recovery hook (the deployments work
  fills it in; until then it records the event), except during a mass failure,
  when the monitor freezes recovery and raises an alert.

Clocks: health runs on a **monotonic** clock (:attr:`Fleet.clock`), so a step of the
wall clock (NTP, an operator, a VM resume) neither fails a fleet of nodes nor hides a
dead one. Its readings are shifted once, at start, to read like epoch seconds, so that
code comparing them (the deployments' node history, the metrics' push timing) keeps
working; wherever a time leaves the process (the store's ``last_heartbeat``, the cache's
``last_update``, the metrics history) it is converted with :meth:`Fleet.wall_time`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from automator67.v1 import common_pb2, node_pb2

from controller.cache.base import Cache
from controller.nodes.collector import FreezingCollector
from controller.nodes.health import HealthConfig, Metrics, NodeState, metrics_problem
from controller.nodes.monitor import HealthMonitor, MonitorConfig, StateChange
from controller.nodes.repository import NodeRepository
from controller.nodes.sessions import StreamRegistry
from controller.nodes.validation import valid_replicas

log = logging.getLogger("a67.nodes")

# How often a node's cache entry is refreshed between state changes.
CACHE_REFRESH_SECONDS = 15.0
# TTL of node:health:{id} (spec §7: 1 minute).
CACHE_HEALTH_TTL_SECONDS = 60.0
# How often a node's metrics are written to the store between state changes.
STORE_METRICS_SECONDS = 60.0
# The writer lets other tasks run after this many cache writes.
WRITER_YIELD_EVERY = 100
# Nodes whose metrics are written in one store transaction, at most.
STORE_BATCH_ROWS = 500
# One history sample per node per this many seconds.
HISTORY_SAMPLE_SECONDS = 60.0
# TTL of node:metrics:history:{id}:{hour} (spec §7: 7 days).
HISTORY_TTL_SECONDS = 7 * 24 * 3600.0
# The mass-failure window, in heartbeat intervals. Nodes cut off together fail up to one
# interval apart (their last heartbeats are spread over one interval) plus one sweep
# (a quarter interval), so a one-interval window could miss part of a real partition.
# Recovery of a failed node is held for the same window.
MASS_FAILURE_WINDOW_INTERVALS = 1.5
# Recent fleet events kept in memory (state changes, failures, alerts).
EVENT_LOG_SIZE = 1000

STATUS_ENUM = {
    NodeState.INITIALIZING: common_pb2.NODE_STATUS_INITIALIZING,
    NodeState.READY: common_pb2.NODE_STATUS_READY,
    NodeState.BUSY: common_pb2.NODE_STATUS_BUSY,
    NodeState.DEGRADED: common_pb2.NODE_STATUS_DEGRADED,
    NodeState.SUSPECT: common_pb2.NODE_STATUS_SUSPECT,
    NodeState.FAILED: common_pb2.NODE_STATUS_FAILED,
    NodeState.DRAINING: common_pb2.NODE_STATUS_DRAINING,
    NodeState.REMOVED: common_pb2.NODE_STATUS_REMOVED,
}


def monotonic_clock() -> Callable[[], float]:
    """``time.monotonic`` shifted to read like ``time.time`` at the moment this is called.

    Monotonic: a step of the wall clock afterwards changes nothing it reads. Its readings
    stay close to the wall clock (both are slewed alike by NTP) but are not wall times:
    convert them with :meth:`Fleet.wall_time` before they leave the process."""
    offset = time.time() - time.monotonic()
    monotonic = time.monotonic

    def clock() -> float:
        return offset + monotonic()

    return clock


RecoveryHandler = Callable[[str, str], Awaitable[None]]
ReplicaReportHandler = Callable[[str, Sequence[node_pb2.ReplicaState], bool], Awaitable[None]]
"""``(node_id, replicas, complete)``: the replicas a node reported; ``complete`` for a hello
(the full list after a (re)connect), False for a heartbeat."""


@dataclass
class LiveMetrics:
    """The latest *valid* heartbeat of a node, in memory."""

    metrics: common_pb2.NodeMetrics
    received_at: float
    """When it arrived, on the health clock (:attr:`Fleet.clock`)."""
    capabilities: common_pb2.NodeCapabilities | None = None


@dataclass(frozen=True)
class FleetEvent:
    """Something that happened to the fleet, for operators and tests."""

    at: float
    """On the health clock (:attr:`Fleet.clock`)."""
    kind: str  # "state", "recovery", "alert"
    node_id: str
    user_id: str
    message: str


@dataclass
class Fleet:
    """Everything the controller knows live about nodes."""

    nodes: NodeRepository
    cache: Cache
    health_config: HealthConfig
    clock: Callable[[], float] = field(default_factory=monotonic_clock)
    """The health clock (seconds): monotonic. Every time the monitor, :attr:`live` and
    :class:`StateChange` carry is on it."""
    wall_clock: Callable[[], float] = time.time
    """The wall clock, read only to convert health-clock times for the store, the cache
    and the history (:meth:`wall_time`)."""
    recovery_handler: RecoveryHandler | None = None
    alert_handler: Callable[[str, str], Awaitable[None]] | None = None
    """``(user_id, message)``: stores an alert (controller/deployments/alerts.py)."""
    replica_report_handler: ReplicaReportHandler | None = None
    app_traffic: Callable[[str], tuple[float, float] | None] | None = None
    """The node's app traffic through the ingresses: ``(error rate %, average response
    time ms)``, or None without enough of it (:meth:`IngressService.node_traffic`)."""
    streams: StreamRegistry = field(default_factory=StreamRegistry)
    live: dict[str, LiveMetrics] = field(default_factory=dict)
    announced: dict[str, common_pb2.NodeCapabilities] = field(default_factory=dict)
    """What each node announced in its latest hello (validated before it gets here)."""
    heartbeat_problems: dict[str, str] = field(default_factory=dict)
    """Why a node's latest heartbeat was invalid, for nodes whose latest one was."""
    events: deque[FleetEvent] = field(default_factory=lambda: deque(maxlen=EVENT_LOG_SIZE))
    holder_id: str | None = None
    """This controller's id: the store records which controller watches each node
    (``nodes.stream_holder``: the last to hold its stream; :mod:`controller.nodes.watchers`),
    where other controllers sharing the store relay their commands
    (:mod:`controller.nodes.relay`). None: not recorded (tests of the fleet alone)."""
    peers: Callable[[], Awaitable[set[str]]] | None = None
    """The controllers serving the store now (ids, this one's included): nodes another of
    them watches are not watched here. None: this controller is alone."""
    live_peers: frozenset[str] = frozenset()
    """The other controllers serving the store, as of the last pass of the node watchers
    (:mod:`controller.nodes.watchers`): a node one of them watches is connected there."""
    view_listeners: list[Callable[[str], None]] = field(default_factory=list)
    """Called with a node id when what placement sees of it may have changed (a heartbeat,
    a hello, its stream, its removal): the deployments' live scheduler view."""

    def __post_init__(self) -> None:
        self.monitor_config = MonitorConfig(
            health=self.health_config,
            mass_failure_window_seconds=MASS_FAILURE_WINDOW_INTERVALS * self.health_config.interval_seconds,
        )
        self.monitor = HealthMonitor(
            self.monitor_config,
            on_transition=self._on_transition,
            recovery_hook=self._on_failure,
            on_alert=self._on_alert,
            after_changes=self._save_changes,
        )
        # State changes not yet written to the store: the latest one per node. Written
        # together, in one transaction, once the monitor has delivered a run of changes.
        self._unsaved: dict[str, StateChange] = {}
        self._cache_refreshed: dict[str, float] = {}
        self._history_sampled: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        # Metrics due for the store (at most once a minute per node): written by one
        # writer task, STORE_BATCH_ROWS nodes per transaction, never a task per node.
        self._metrics_unsaved: dict[str, tuple[float, common_pb2.NodeMetrics]] = {}
        self._cache_unsaved: set[str] = set()
        self._holders_unsaved: set[str] = set()
        """Nodes whose streams opened here since the last write of watchers."""
        self._holders_writing = asyncio.Lock()
        """Held while watchers are written: a state write waits for one in flight."""
        self._stopped = False
        self._history_unsaved: dict[str, tuple[float, common_pb2.NodeMetrics]] = {}
        self._metrics_due = asyncio.Event()
        self._metrics_writer: asyncio.Task[None] | None = None
        self._collector: FreezingCollector | None = None
        self._collecting: asyncio.Task[None] | None = None

    def wall_time(self, at: float) -> float:
        """The wall-clock time (epoch seconds) of ``at``, a time on the health clock: now on
        the wall clock, less the time elapsed on the health clock since ``at``."""
        return self.wall_clock() - (self.clock() - at)

    def health_time(self, wall: float) -> float:
        """The inverse of :meth:`wall_time`: the health-clock time of a wall-clock time."""
        return self.clock() - (self.wall_clock() - wall)

    async def start(self) -> None:
        """Load every known node with a fresh grace period and start sweeping."""
        others = (await self.peers()) - {self.holder_id} if self.peers is not None else set()
        now = self.clock()
        for node in await self.nodes.list_active():
            if node.stream_holder in others:
                continue  # watched by another controller (it holds the node's stream)
            self.adopt(node.id, node.user_id, node.status, node.last_heartbeat, now)
        log.info("monitoring %d nodes (each with a fresh grace period)", len(self.monitor))
        # Streams and fleet state are millions of long-lived objects at 20,000 nodes: full
        # collections scan only what came since the last one (controller/nodes/collector.py).
        if self._collector is None:
            self._collector = FreezingCollector.install()
            self._collecting = asyncio.create_task(FreezingCollector.run())
        self._runner = asyncio.create_task(self.monitor.run(self.clock, asyncio.sleep))
        self._metrics_writer = asyncio.create_task(self._write_metrics_forever())

    async def stop(self) -> None:
        self._stopped = True  # draining: no stream is recorded as watched here from now on
        if self._collector is not None:
            self._collector = None
            if self._collecting is not None:
                self._collecting.cancel()
                await asyncio.gather(self._collecting, return_exceptions=True)
                self._collecting = None
            FreezingCollector.uninstall()
        self.streams.close_all("controller draining")
        self.monitor.stop()
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        if self._metrics_writer is not None:
            self._metrics_writer.cancel()
            await asyncio.gather(self._metrics_writer, return_exceptions=True)
            self._metrics_writer = None
        await self._write_pending()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _background(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- events from streams and RPCs -------------------------------------------------

    def track(self, node_id: str, user_id: str) -> None:
        """Start monitoring a newly registered node."""
        if node_id not in self.monitor:
            self.monitor.add(node_id, user_id, self.clock())

    def heartbeat(self, node_id: str, metrics: common_pb2.NodeMetrics) -> NodeState:
        """Apply a heartbeat; returns the node's state after it.

        An invalid heartbeat (a number NaN, infinite, negative or out of range, see
        :mod:`controller.nodes.validation`) still proves the node alive but makes it
        degraded, and its numbers go nowhere: not into :attr:`live` (so neither
        into aggregates nor placement), the history, the cache or the store. The
        node's last valid metrics stay; :attr:`heartbeat_problems` says why.
        """
        now = self.clock()
        reported = Metrics(
            cpu_percent=metrics.cpu_percent,
            memory_percent=metrics.memory_percent,
            disk_percent=metrics.disk_percent,
            active_requests=metrics.active_requests,
            error_rate=metrics.error_rate,
            avg_response_time_ms=metrics.avg_response_time_ms,
            uptime_seconds=metrics.uptime_seconds,
        )
        problem = metrics_problem(reported)
        if problem is None:
            reported = self._app_figures(node_id, metrics, reported)
            self.heartbeat_problems.pop(node_id, None)
            self.live[node_id] = LiveMetrics(
                metrics=metrics,
                received_at=now,
                capabilities=self.announced.get(node_id),
            )
        else:
            if node_id not in self.heartbeat_problems:  # log once per run of invalid heartbeats
                log.warning(
                    "node %s sent an invalid heartbeat (%s): its metrics are ignored", node_id, problem
                )
            self.heartbeat_problems[node_id] = problem
        result = self.monitor.heartbeat(node_id, now, reported)
        self._view_changed(node_id)
        if self.monitor.pending and (self._runner is None or self._runner.done()):
            # A running monitor delivers its queue itself: no task per heartbeat.
            self._background(self.monitor.flush())
        if now - self._cache_refreshed.get(node_id, 0.0) >= CACHE_REFRESH_SECONDS:
            self._cache_refreshed[node_id] = now
            self._cache_unsaved.add(node_id)
            self._wake_writer()
        if problem is not None:
            return result.new.state
        if now - self._history_sampled.get(node_id, 0.0) >= HISTORY_SAMPLE_SECONDS:
            self._history_sampled[node_id] = now
            self._history_unsaved[node_id] = (now, metrics)
            self._wake_writer()
        if self.monitor.should_persist_metrics(node_id, now, STORE_METRICS_SECONDS):
            self.monitor.mark_persisted(node_id, now)
            self._metrics_unsaved[node_id] = (now, metrics)
            self._wake_writer()
        return result.new.state

    def _app_figures(self, node_id: str, metrics: common_pb2.NodeMetrics, reported: Metrics) -> Metrics:
        """A node's error rate and response time measure its apps' traffic (the ingress
        access logs), not what the agent counts (its commands: a user's bad SQL or broken
        deploy is not the node's fault). Without app traffic: no errors, and the response
        time of the node's own probe (the stream's heartbeat round trip)."""
        figures = self.app_traffic(node_id) if self.app_traffic is not None else None
        if figures is None:
            session = self.streams.get(node_id)
            rtt = session.last_rtt_ms if session is not None else None
            figures = (0.0, float(rtt) if rtt is not None else 0.0)
        metrics.error_rate, metrics.avg_response_time_ms = figures
        return dataclasses.replace(reported, error_rate=figures[0], avg_response_time_ms=figures[1])

    def replicas_reported(
        self, node_id: str, replicas: Sequence[node_pb2.ReplicaState], *, complete: bool
    ) -> None:
        """Hand the replicas a node reported to the deployments code (in the background).

        Entries whose numbers are invalid are dropped (a hello with any is refused
        before it gets here)."""
        checked = valid_replicas(replicas)
        if len(checked) != len(replicas):
            log.warning(
                "node %s reported %d invalid replica entries: ignored", node_id, len(replicas) - len(checked)
            )
        if self.replica_report_handler is not None and (complete or checked):
            self._background(self.replica_report_handler(node_id, checked, complete))

    def set_capabilities(self, node_id: str, capabilities: common_pb2.NodeCapabilities) -> None:
        """Record what a node announced in its hello (used from its next heartbeat on)."""
        self.announced[node_id] = capabilities
        live = self.live.get(node_id)
        if live is not None:
            live.capabilities = capabilities
        self._view_changed(node_id)

    def adopt(
        self, node_id: str, user_id: str, status: str, last_heartbeat: datetime | None, now: float
    ) -> None:
        """Watch a node loaded from the store, with a fresh grace period (at start, or when
        its controller is gone: :mod:`controller.nodes.watchers`)."""
        state = NodeState(status) if status in NodeState.__members__.values() else NodeState.SUSPECT
        self.monitor.load(
            node_id,
            user_id,
            state,
            self.health_time(last_heartbeat.timestamp()) if last_heartbeat else None,
            now,
            draining=state == NodeState.DRAINING,
        )
        self._view_changed(node_id)

    def watched_elsewhere(self, holder: str | None, peers: Collection[str] | None = None) -> bool:
        """Whether a node whose watcher (``nodes.stream_holder``) is ``holder`` is watched by
        another live controller — of ``peers``, else of :attr:`live_peers` (as of the last
        pass of the node watchers): its stream is there, its state and metrics are in the store."""
        live = self.live_peers if peers is None else peers
        return holder is not None and holder != self.holder_id and holder in live

    def hand_over(self, node_id: str) -> bool:
        """Stop watching a node another controller watches now; whether it was watched here."""
        if not self.monitor.hand_over(node_id, self.clock()):
            return False
        self._view_changed(node_id)
        return True

    def stream_connected(self, node_id: str) -> None:
        self.monitor.stream_connected(node_id, self.clock())
        self._view_changed(node_id)
        if self.holder_id is not None and not self._stopped:  # this controller watches it now
            self._holders_unsaved.add(node_id)
            self._wake_writer()

    def stream_broken(self, node_id: str) -> None:
        if node_id in self.monitor:
            self.monitor.stream_broken(node_id, self.clock())
            self._background(self.monitor.flush())
        self._view_changed(node_id)

    async def drain(self, node_id: str) -> None:
        self.monitor.drain(node_id, self.clock())
        await self.monitor.flush()

    async def remove(self, node_id: str) -> None:
        self.streams.disconnect(node_id, "node deregistered")
        if node_id in self.monitor:
            self.monitor.remove(node_id, self.clock())
            await self.monitor.flush()
        self.live.pop(node_id, None)
        self.announced.pop(node_id, None)
        self.heartbeat_problems.pop(node_id, None)
        self._view_changed(node_id)
        await self.cache.delete(f"node:health:{node_id}")

    def _view_changed(self, node_id: str) -> None:
        for listener in self.view_listeners:
            listener(node_id)

    def recovery_due(self, node_id: str) -> bool:
        """Whether a failed node's replicas may be re-placed now, outside the recovery hook.

        The same rule the monitor applies before calling the hook: the node has been
        failed for a whole mass-failure window and its user's recovery is not frozen.
        For safety nets such as the deployments reconciler, which must not undo a
        mass-failure freeze.
        """
        health = self.monitor.get(node_id)
        if health is None or health.state != NodeState.FAILED:
            return False
        if self.monitor.user_of(node_id) in self.monitor.frozen_users:
            return False
        return self.clock() - health.last_transition_at >= self.monitor_config.window_seconds

    def state_of(self, node_id: str) -> NodeState | None:
        health = self.monitor.get(node_id)
        return health.state if health else None

    # -- callbacks from the monitor -----------------------------------------------------

    async def _on_transition(self, change: StateChange) -> None:
        self.events.append(
            FleetEvent(
                change.at,
                "state",
                change.node_id,
                change.user_id,
                f"{change.old} -> {change.new}: {change.reason}",
            )
        )
        log.info("node %s: %s -> %s (%s)", change.node_id, change.old, change.new, change.reason)
        if change.new == NodeState.REMOVED:
            self._unsaved.pop(change.node_id, None)
            await self.nodes.update_status(
                change.node_id, str(change.new), now=datetime.fromtimestamp(self.wall_time(change.at), UTC)
            )
            await self._write_cache(change.node_id)
            return
        # Batched (see _save_changes): a node flapping between ready and suspect under a
        # burst of late heartbeats costs one row in one transaction, not two per change.
        self._unsaved[change.node_id] = change

    async def _save_changes(self) -> None:
        """Write the pending state changes: one store transaction, then the cache entries."""
        if not self._unsaved:
            return
        await self._write_holders()  # a node that moved here: its state is this controller's to write
        batch, self._unsaved = self._unsaved, {}
        rows = []
        for node_id, change in batch.items():
            last = change.health.last_heartbeat_at
            live = self.live.get(node_id)
            rows.append(
                (
                    node_id,
                    str(change.new),
                    datetime.fromtimestamp(self.wall_time(last), UTC) if last is not None else None,
                    _metrics_dict(live.metrics) if live is not None and last is not None else None,
                )
            )
        try:
            await self.nodes.record_states(rows, holder=self.holder_id)
        except Exception:
            log.warning("could not write %d node state changes", len(rows), exc_info=True)
        for node_id in batch:
            await self._write_cache(node_id)

    async def _on_failure(self, node_id: str, user_id: str) -> None:
        if await self._moved_elsewhere(node_id):
            return
        self.events.append(
            FleetEvent(self.clock(), "recovery", node_id, user_id, "node failed: recovery triggered")
        )
        log.warning("node %s failed: recovery triggered", node_id)
        if self.recovery_handler is not None:
            await self.recovery_handler(node_id, user_id)

    async def _moved_elsewhere(self, node_id: str) -> bool:
        """With other controllers: whether another live one watches the node now (its stream
        moved there before this controller noticed). It is handed over, not recovered."""
        if self.peers is None or self.holder_id is None:
            return False
        try:
            holder = await self.nodes.stream_holder(node_id)
            elsewhere = self.watched_elsewhere(
                holder, await self.peers()
            )  # read now, not as of the last pass
        except Exception:  # the store is away: recover (replicas are fenced by generation)
            log.warning("could not read who watches node %s", node_id, exc_info=True)
            return False
        if elsewhere:
            log.info("node %s is watched by controller %s now: not recovered here", node_id, holder)
            self.hand_over(node_id)
        return elsewhere

    async def _on_alert(self, user_id: str, message: str) -> None:
        self.events.append(FleetEvent(self.clock(), "alert", "", user_id, message))
        log.error("ALERT for user %s: %s", user_id, message)
        if self.alert_handler is not None:
            await self.alert_handler(user_id, message)

    # -- cache and store writes -----------------------------------------------------------

    async def _write_cache(self, node_id: str) -> None:
        health = self.monitor.get(node_id)
        if health is None:
            return
        live = self.live.get(node_id)
        value = {
            "status": str(health.state),
            "metrics": _metrics_dict(live.metrics) if live else None,
            "last_update": self.wall_time(live.received_at) if live else None,
        }
        await self.cache.set(f"node:health:{node_id}", json.dumps(value).encode(), CACHE_HEALTH_TTL_SECONDS)

    async def _append_history(self, node_id: str, at: float, metrics: common_pb2.NodeMetrics) -> None:
        now = self.wall_time(at)
        hour = int(now // 3600)
        key = f"node:metrics:history:{node_id}:{hour}"
        raw = await self.cache.get(key)
        samples = json.loads(raw) if raw else []
        samples.append({"t": now, **_metrics_dict(metrics)})
        await self.cache.set(key, json.dumps(samples).encode(), HISTORY_TTL_SECONDS)

    async def history(self, node_id: str, hours: int) -> list[dict[str, Any]]:
        """Samples of the last ``hours`` hours, oldest first."""
        current = int(self.wall_clock() // 3600)
        samples: list[dict[str, Any]] = []
        for hour in range(current - hours + 1, current + 1):
            raw = await self.cache.get(f"node:metrics:history:{node_id}:{hour}")
            if raw:
                samples.extend(json.loads(raw))
        return samples

    def _wake_writer(self) -> None:
        if self._metrics_writer is not None:
            self._metrics_due.set()
        elif not self._metrics_due.is_set():  # not started (tests driving the fleet by hand)
            self._metrics_due.set()
            self._background(self._write_pending())

    async def _write_metrics_forever(self) -> None:
        while True:
            await self._metrics_due.wait()
            await self._write_pending()

    async def _write_pending(self) -> None:
        """Everything heartbeats left for the cache and the store, by one task: the cache
        entries and history samples due, then the metrics due (in batches)."""
        self._metrics_due.clear()
        await self._write_holders()
        written = 0
        while self._cache_unsaved:
            await self._write_cache(self._cache_unsaved.pop())
            written += 1
            if written % WRITER_YIELD_EVERY == 0:
                await asyncio.sleep(0)  # the in-process cache never suspends: let streams run
        while self._history_unsaved:
            node_id, (at, metrics) = self._history_unsaved.popitem()
            try:
                await self._append_history(node_id, at, metrics)
            except Exception:
                log.warning("could not append to the history of node %s", node_id, exc_info=True)
            written += 1
            if written % WRITER_YIELD_EVERY == 0:
                await asyncio.sleep(0)
        await self._write_metrics()

    async def _write_holders(self) -> None:
        """Record that this controller watches the nodes whose streams opened here (one
        transaction); before any of their state changes is written (see :meth:`_save_changes`)."""
        if self.holder_id is None:
            return
        async with self._holders_writing:
            if not self._holders_unsaved:
                return
            batch, self._holders_unsaved = sorted(self._holders_unsaved), set()
            try:
                await self.nodes.record_stream_holders(self.holder_id, batch)
            except Exception:  # the store is away: written again with the next change
                log.warning("could not record the streams of %d nodes", len(batch), exc_info=True)
                self._holders_unsaved.update(batch)

    async def _write_metrics(self) -> None:
        """Write the metrics due, STORE_BATCH_ROWS nodes per transaction (a store outage
        loses them: the next minute's write brings the node up to date)."""
        while self._metrics_unsaved:
            batch = list(itertools.islice(self._metrics_unsaved.items(), STORE_BATCH_ROWS))
            for node_id, _ in batch:
                del self._metrics_unsaved[node_id]
            rows = [
                (node_id, datetime.fromtimestamp(self.wall_time(at), UTC), _metrics_dict(metrics))
                for node_id, (at, metrics) in batch
            ]
            try:
                await self.nodes.record_heartbeats(rows)
            except Exception:  # the store being briefly down must not break a stream
                log.warning("could not persist the metrics of %d nodes", len(rows), exc_info=True)


def _metrics_dict(metrics: common_pb2.NodeMetrics) -> dict[str, Any]:
    return {
        "cpu_percent": metrics.cpu_percent,
        "memory_percent": metrics.memory_percent,
        "disk_percent": metrics.disk_percent,
        "active_requests": metrics.active_requests,
        "error_rate": metrics.error_rate,
        "avg_response_time_ms": metrics.avg_response_time_ms,
        "uptime_seconds": metrics.uptime_seconds,
    }
