"""Node history for the reliability factor: uptime share and failures over 24 hours.

The health monitor reports every change of a node's state
(:class:`controller.nodes.monitor.StateChange`); :class:`NodeHistory` keeps, per
node, the spans between those changes and when the node became failed, and
answers :meth:`NodeHistory.reliability` for a window ending at ``now``:

* **alive** (up): ``ready``, ``busy``, ``degraded``, ``draining`` — the node
  heartbeats;
* **down**: ``suspect``, ``failed`` — it does not;
* **not observed**: ``initializing`` (never heard from yet) and the time before
  the controller first saw a change of the node. A node never seen changing has
  no history (reliability 1.0); one that has been ready since its first
  heartbeat is alive for all of its observed time.

Pure: times are passed in (the fleet's clock, the same one :class:`StateChange`
carries), nothing here reads a clock or does I/O. Memory is bounded: spans and
failures older than the window are dropped as new ones arrive.

>>> from controller.nodes.health import NodeState
>>> history = NodeHistory(window_seconds=100.0)
>>> history.record("n1", NodeState.READY, at=0.0)
>>> history.record("n1", NodeState.SUSPECT, at=60.0)
>>> history.record("n1", NodeState.FAILED, at=70.0)
>>> history.record("n1", NodeState.READY, at=80.0)
>>> history.reliability("n1", now=100.0)
Reliability(observed_seconds=100.0, up_seconds=80.0, failures=1)
>>> history.reliability("unknown", now=100.0)
Reliability(observed_seconds=0.0, up_seconds=0.0, failures=0)
"""

from __future__ import annotations

from collections import deque

from controller.nodes.health import NodeState
from controller.scheduling.snapshot import Reliability

HISTORY_WINDOW_SECONDS = 24 * 3600.0
"""The window of the reliability factor (spec §4.2 "historical reliability"): 24 hours."""

UP_STATES = frozenset({NodeState.READY, NodeState.BUSY, NodeState.DEGRADED, NodeState.DRAINING})
"""States in which a node heartbeats: it counts as alive."""

DOWN_STATES = frozenset({NodeState.SUSPECT, NodeState.FAILED})
"""States in which a node is silent: it counts as down."""

_UNOBSERVED = None


class NodeHistory:
    """Per-node liveness spans and failure times, for :class:`Reliability`."""

    def __init__(self, window_seconds: float = HISTORY_WINDOW_SECONDS) -> None:
        if not window_seconds > 0:
            raise ValueError(f"window_seconds must be positive, got {window_seconds!r}")
        self.window_seconds = window_seconds
        # node -> spans (start, up?) in time order; None = not observed from start on
        self._spans: dict[str, deque[tuple[float, bool | None]]] = {}
        self._failures: dict[str, deque[float]] = {}

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._spans

    def record(self, node_id: str, state: NodeState, at: float) -> None:
        """The node entered ``state`` at ``at`` (a removed node is forgotten)."""
        if state is NodeState.REMOVED:
            self.forget(node_id)
            return
        up: bool | None = True if state in UP_STATES else False if state in DOWN_STATES else _UNOBSERVED
        spans = self._spans.setdefault(node_id, deque())
        if spans and at < spans[-1][0]:
            at = spans[-1][0]  # never out of order: a late report counts from the last change
        if spans and spans[-1][1] is up:
            pass  # the same liveness (ready -> busy): one span
        else:
            spans.append((at, up))
        if state is NodeState.FAILED:
            self._failures.setdefault(node_id, deque()).append(at)
        self._prune(node_id, at)

    def forget(self, node_id: str) -> None:
        """Drop everything about the node (it was removed)."""
        self._spans.pop(node_id, None)
        self._failures.pop(node_id, None)

    def _prune(self, node_id: str, now: float) -> None:
        start = now - self.window_seconds
        spans = self._spans.get(node_id)
        if spans is not None:
            # Keep the last span that starts before the window: it covers the window's start.
            while len(spans) > 1 and spans[1][0] <= start:
                spans.popleft()
        failures = self._failures.get(node_id)
        if failures is not None:
            while failures and failures[0] <= start:
                failures.popleft()

    def reliability(self, node_id: str, now: float) -> Reliability:
        """Observed and alive seconds, and failures, in ``(now - window, now]``."""
        spans = self._spans.get(node_id)
        if not spans:
            return Reliability()
        start = now - self.window_seconds
        observed = up = 0.0
        items = list(spans)
        for i, (since, alive) in enumerate(items):
            until = items[i + 1][0] if i + 1 < len(items) else now
            lo, hi = max(since, start), min(until, now)
            if hi <= lo or alive is None:
                continue
            observed += hi - lo
            if alive:
                up += hi - lo
        failures = sum(1 for at in self._failures.get(node_id, ()) if start < at <= now)
        return Reliability(observed_seconds=observed, up_seconds=up, failures=failures)
