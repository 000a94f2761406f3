"""Score: how good a feasible node is for a new replica (spec §4.2), factor by factor.

Every factor is in ``[0, 1]``, higher is better; the total is their weighted sum::

    cpu_score         = (100 - cpu_percent) / 100          * 0.5 if cpu_percent > 80
    memory_score      = (100 - memory_percent) / 100       * 0.5 if memory_percent > 80
    latency_score     = max(0, 1 - latency_ms / 500)
    connection_score  = 1 - active_requests / max_concurrent_requests     (clamped to 0..1)
    reliability       = uptime share of the last 24 h * 1 / (1 + failures in the last 24 h)

    total = 0.30 cpu + 0.25 memory + 0.20 latency + 0.15 connections + 0.10 reliability

What each input really is, from data the controller has:

* **cpu_percent, memory_percent, active_requests**: the node's last valid
  heartbeat. A node without one (it cannot be ready yet, but a caller may build
  such a view) gets the neutral :data:`NEUTRAL_SCORE` for cpu, memory and
  connections.
* **latency_ms**: the round-trip time of heartbeat acknowledgements on the
  node's stream: the node times each heartbeat to its ack on its own monotonic
  clock and reports it in its next heartbeat (``Heartbeat.rtt_ms``); the
  controller smooths it (:meth:`controller.nodes.sessions.NodeSession.record_rtt`).
  Before the first measurement, the latency factor is the neutral
  :data:`NEUTRAL_SCORE`: a new node is neither rewarded nor punished for being
  unmeasured.
* **max_concurrent_requests**: the node's declared capability; 0 (unknown) gives
  the neutral :data:`NEUTRAL_SCORE`.
* **reliability**: the node's uptime share over the last 24 h (time alive over
  time observed, from the health monitor's state changes:
  :mod:`controller.scheduling.history`), times ``1 / (1 + failures)``, the times
  it became failed in the same window. No history counts as a share of 1.0, so a
  new node starts fully reliable and loses it only by being down.

Totals and factors are rounded to :data:`SCORE_DECIMALS` decimals, so equal
inputs give equal scores and placement's seeded tie-break decides between them.

>>> from controller.nodes.health import Metrics
>>> cpu_score(50.0), cpu_score(90.0)
(0.5, 0.05)
>>> latency_score(None), latency_score(100.0), latency_score(900.0)
(0.5, 0.8, 0.0)
>>> connection_score(25, 100), connection_score(3, 0)
(0.75, 0.5)
>>> reliability_score(observed_seconds=100, up_seconds=90, failures=1)
0.45
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from controller.scheduling.snapshot import NodeView

CPU_WEIGHT = 0.30
"""Weight of the CPU factor (spec §4.2): idle CPU matters most for a new replica."""

MEMORY_WEIGHT = 0.25
"""Weight of the memory factor (spec §4.2)."""

LATENCY_WEIGHT = 0.20
"""Weight of the latency factor (spec §4.2)."""

CONNECTIONS_WEIGHT = 0.15
"""Weight of the connection factor (spec §4.2)."""

RELIABILITY_WEIGHT = 0.10
"""Weight of the historical reliability factor (spec §4.2). The five weights sum to 1."""

HIGH_LOAD_PERCENT = 80.0
"""CPU or memory use strictly above this halves that factor (spec §4.2 "at capacity")."""

HIGH_LOAD_PENALTY = 0.5
"""The multiplier applied to the CPU or memory factor of a node above :data:`HIGH_LOAD_PERCENT`."""

LATENCY_CEILING_MS = 500.0
"""Latency at and beyond which the latency factor is 0 (spec §4.2: ``1 - latency/500``)."""

NEUTRAL_SCORE = 0.5
"""The factor used when its input is unknown (no RTT measured yet, no metrics, unknown
request capacity): halfway, so the unknown neither wins nor loses by itself."""

SCORE_DECIMALS = 6
"""Scores are rounded to this many decimals; totals equal after rounding are ties."""

FACTOR_NAMES = ("cpu", "memory", "latency", "connections", "reliability")
"""The factor names, as they appear in ``PlacementExplanation.factor_scores``."""


@dataclass(frozen=True, slots=True)
class NodeScore:
    """The five factors of one node and their weighted total, each in ``[0, 1]``."""

    cpu: float
    memory: float
    latency: float
    connections: float
    reliability: float
    total: float

    def factors(self) -> dict[str, float]:
        """The factors by name (see :data:`FACTOR_NAMES`), plus nothing else."""
        return {
            "cpu": self.cpu,
            "memory": self.memory,
            "latency": self.latency,
            "connections": self.connections,
            "reliability": self.reliability,
        }


def _clamp01(value: float) -> float:
    if value != value:  # NaN
        return NEUTRAL_SCORE
    return 0.0 if value < 0.0 else 1.0 if value > 1.0 else value


def _load_score(percent: float | None) -> float:
    if percent is None or math.isnan(percent):
        return NEUTRAL_SCORE
    score = _clamp01((100.0 - percent) / 100.0)
    if percent > HIGH_LOAD_PERCENT:
        score *= HIGH_LOAD_PENALTY
    return score


def cpu_score(cpu_percent: float | None) -> float:
    """``(100 - cpu%) / 100``, halved above 80 %; neutral when unknown."""
    return round(_load_score(cpu_percent), SCORE_DECIMALS)


def memory_score(memory_percent: float | None) -> float:
    """``(100 - memory%) / 100``, halved above 80 %; neutral when unknown."""
    return round(_load_score(memory_percent), SCORE_DECIMALS)


def latency_score(latency_ms: float | None) -> float:
    """``max(0, 1 - latency / 500)`` for the stream RTT in ms; neutral when not measured yet."""
    if latency_ms is None or math.isnan(latency_ms):
        return NEUTRAL_SCORE
    return round(_clamp01(1.0 - max(0.0, latency_ms) / LATENCY_CEILING_MS), SCORE_DECIMALS)


def connection_score(active_requests: int | None, max_concurrent_requests: int) -> float:
    """``1 - active / max_concurrent`` clamped to ``[0, 1]``; neutral when either is unknown."""
    if active_requests is None or max_concurrent_requests <= 0:
        return NEUTRAL_SCORE
    return round(_clamp01(1.0 - active_requests / max_concurrent_requests), SCORE_DECIMALS)


def reliability_score(*, observed_seconds: float, up_seconds: float, failures: int) -> float:
    """Uptime share (1.0 with no history) times ``1 / (1 + failures)``."""
    share = 1.0 if not observed_seconds > 0 else _clamp01(up_seconds / observed_seconds)
    return round(share / (1 + max(0, failures)), SCORE_DECIMALS)


def combine(cpu: float, memory: float, latency: float, connections: float, reliability: float) -> float:
    """The weighted total of the five factors, rounded to :data:`SCORE_DECIMALS`."""
    return round(
        CPU_WEIGHT * cpu
        + MEMORY_WEIGHT * memory
        + LATENCY_WEIGHT * latency
        + CONNECTIONS_WEIGHT * connections
        + RELIABILITY_WEIGHT * reliability,
        SCORE_DECIMALS,
    )


def score_node(node: NodeView) -> NodeScore:
    """The §4.2 score of ``node`` with every factor recorded.

    Use ``node.score`` instead: it calls this once and keeps the result. This is
    the helpers above inlined (it runs once per node view, so for every
    heartbeat of every node); ``tests/unit/test_scheduling.py`` checks the two agree.
    """
    metrics = node.metrics
    if metrics is None:
        cpu = memory = connections = NEUTRAL_SCORE
    else:
        cpu = cpu_score(metrics.cpu_percent)
        memory = memory_score(metrics.memory_percent)
        connections = connection_score(metrics.active_requests, node.capabilities.max_concurrent_requests)
    rtt = node.rtt_ms
    if rtt is None or rtt != rtt:
        latency = NEUTRAL_SCORE
    else:
        latency = round(_clamp01(1.0 - max(0.0, rtt) / LATENCY_CEILING_MS), SCORE_DECIMALS)
    history = node.reliability
    reliability = round(history.uptime_share / (1 + max(0, history.failures)), SCORE_DECIMALS)
    return NodeScore(
        cpu=cpu,
        memory=memory,
        latency=latency,
        connections=connections,
        reliability=reliability,
        total=combine(cpu, memory, latency, connections, reliability),
    )
