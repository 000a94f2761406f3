"""Every number a node reports, checked at the edge: finite and within a sane range.

A node is not trusted with the controller's aggregates, placement scores, store
or cache: what it claims in its hello (capabilities, the replicas it runs) and in
each heartbeat (metrics, replicas) is checked here before anything else sees it.
Pure: no I/O, no clock. One table of limits (:data:`METRIC_LIMITS`,
:data:`CAPABILITY_LIMITS`, :data:`REPLICA_LIMITS`) serves every caller:

* ``RegisterNode`` and the stream's hello: :func:`capability_violations` and
  :func:`hello_violations` give ``BadRequest`` field violations (an invalid hello
  ends the ``Connect`` call with ``INVALID_ARGUMENT`` before the stream is accepted);
* heartbeats: :func:`controller.nodes.health.metrics_problem` applies
  :data:`METRIC_LIMITS`; an invalid heartbeat makes the node ``degraded`` and its
  numbers are dropped (see :mod:`controller.nodes.fleet`);
* placement: :class:`controller.scheduling.snapshot.NodeView` re-checks what it is
  given as a last guard.

A value is valid when it is a number (not a bool), not NaN, not infinite, and
within its limit, bounds included.

Example::

    >>> number_problem(float("nan"), PERCENT)
    'is NaN'
    >>> number_problem(101.0, PERCENT)
    'is above 100 (101)'
    >>> number_problem(-50, PERCENT)
    'is negative (-50)'
    >>> number_problem(0.0, Limit(0, 4096, positive=True))
    'is not above 0 (0)'
    >>> number_problem(100.0, PERCENT) is None
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from automator67.v1 import common_pb2, node_pb2

from controller.errors import FieldViolation

NODE_TYPES = ("compute", "database", "storage")
"""The node types a node may serve (spec §3.2)."""

MAX_NODE_TYPES = 16
"""How many node type entries a node may list (repeats included)."""


@dataclass(frozen=True, slots=True)
class Limit:
    """The valid range of one number: ``low <= value <= high`` (``low < value`` if ``positive``)."""

    low: float
    high: float
    positive: bool = False
    """Whether ``low`` itself is excluded (``cpu_cores`` must be above 0)."""

    def describe(self) -> str:
        """The range in words, for field violations."""
        low = f"above {_show(self.low)}" if self.positive else f"from {_show(self.low)}"
        return f"must be a finite number {low} to {_show(self.high)}"


PERCENT = Limit(0.0, 100.0)
"""A percentage: 0 to 100."""

METRIC_LIMITS: Mapping[str, Limit] = {
    "cpu_percent": PERCENT,
    "memory_percent": PERCENT,
    "disk_percent": PERCENT,
    "active_requests": Limit(0, 1_000_000),
    "error_rate": PERCENT,
    "avg_response_time_ms": Limit(0.0, 86_400_000.0),  # one day
    "uptime_seconds": Limit(0, 100 * 366 * 86_400),  # a century
}
"""Limits of a heartbeat's metrics (``NodeMetrics``, spec §3.6)."""

CAPABILITY_LIMITS: Mapping[str, Limit] = {
    "cpu_cores": Limit(0.0, 4096.0),
    "memory_gb": Limit(0.0, 65_536.0),  # 64 TiB
    "disk_gb": Limit(0.0, 1_048_576.0),  # 1 PiB
    "network_bandwidth_mbps": Limit(0.0, 1_000_000.0),  # 1 Tbit/s
    "max_concurrent_requests": Limit(0, 1_000_000),
}
"""Limits of what a node offers (``NodeCapabilities``). At registration ``cpu_cores`` and
``memory_gb`` must also be above 0 (:data:`REGISTRATION_POSITIVE`); in a hello,
``cpu_cores`` 0 means "nothing announced" and the registered capabilities stay in use."""

REGISTRATION_POSITIVE = frozenset({"cpu_cores", "memory_gb"})
"""Capabilities that must be above 0 when a node registers."""

REPLICA_LIMITS: Mapping[str, Limit] = {
    "replica_index": Limit(0, 100_000),
    "generation": Limit(0, 2**53),
}
"""Limits of the numbers of a ``ReplicaState`` a node reports."""


def _show(value: float) -> str:
    """A number for messages: exact (``100.00000000000001``), whole numbers without ``.0``."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


def number_problem(value: object, limit: Limit) -> str | None:
    """What is wrong with ``value`` under ``limit``, or ``None`` when it is valid."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "is not a number"
    if isinstance(value, float):
        if math.isnan(value):
            return "is NaN"
        if math.isinf(value):
            return "is infinite"
    if value < 0 <= limit.low:
        return f"is negative ({_show(value)})"
    if value < limit.low:
        return f"is below {_show(limit.low)} ({_show(value)})"
    if limit.positive and value <= limit.low:
        return f"is not above {_show(limit.low)} ({_show(value)})"
    if value > limit.high:
        return f"is above {_show(limit.high)} ({_show(value)})"
    return None


def values_problem(values: Mapping[str, object], limits: Mapping[str, Limit]) -> str | None:
    """The first problem among ``values`` (``"<name> <problem>"``), or ``None``.

    Names without a limit are not checked.

    >>> values_problem({"cpu_percent": 5.0, "error_rate": 120.0}, METRIC_LIMITS)
    'error_rate is above 100 (120)'
    """
    for name, value in values.items():
        limit = limits.get(name)
        if limit is None:
            continue
        problem = number_problem(value, limit)
        if problem is not None:
            return f"{name} {problem}"
    return None


def _violations(
    message: object, limits: Mapping[str, Limit], prefix: str, positive: Iterable[str] = ()
) -> list[FieldViolation]:
    must_be_positive = frozenset(positive)
    violations = []
    for name, limit in limits.items():
        if name in must_be_positive:
            limit = Limit(limit.low, limit.high, positive=True)
        problem = number_problem(getattr(message, name), limit)
        if problem is not None:
            violations.append(FieldViolation(f"{prefix}{name}", f"{problem}: {limit.describe()}"))
    return violations


def capability_violations(
    capabilities: common_pb2.NodeCapabilities, prefix: str = "capabilities.", *, registration: bool = False
) -> list[FieldViolation]:
    """Field violations of what a node offers (empty when valid).

    With ``registration``, ``cpu_cores`` and ``memory_gb`` must also be above 0.
    Node types must be known ones, at most :data:`MAX_NODE_TYPES` entries.
    """
    positive = REGISTRATION_POSITIVE if registration else ()
    violations = _violations(capabilities, CAPABILITY_LIMITS, prefix, positive)
    types = list(capabilities.node_types)
    if len(types) > MAX_NODE_TYPES:
        violations.append(
            FieldViolation(f"{prefix}node_types", f"must list at most {MAX_NODE_TYPES} node types")
        )
    else:
        unknown = sorted({t for t in types if t not in NODE_TYPES})
        if unknown:
            violations.append(
                FieldViolation(
                    f"{prefix}node_types",
                    f"unknown node types {', '.join(repr(t[:40]) for t in unknown[:5])}; "
                    f"use {', '.join(NODE_TYPES)}",
                )
            )
    return violations


def replica_violations(replica: node_pb2.ReplicaState, prefix: str) -> list[FieldViolation]:
    """Field violations of one replica a node reports (empty when valid)."""
    return _violations(replica, REPLICA_LIMITS, prefix)


def valid_replicas(replicas: Iterable[node_pb2.ReplicaState]) -> list[node_pb2.ReplicaState]:
    """The replicas whose numbers are valid (a heartbeat's others are dropped)."""
    return [replica for replica in replicas if not replica_violations(replica, "")]


def hello_violations(hello: node_pb2.NodeHello) -> list[FieldViolation]:
    """Field violations of a stream's hello (empty when valid).

    Capabilities are optional (absent: the registered ones stay in use); when
    present every number must be valid. Every reported replica must be valid.
    """
    violations: list[FieldViolation] = []
    if hello.HasField("capabilities"):
        violations += capability_violations(hello.capabilities, "hello.capabilities.")
    for index, replica in enumerate(hello.replicas):
        violations += replica_violations(replica, f"hello.replicas[{index}].")
    return violations


__all__ = [
    "CAPABILITY_LIMITS",
    "MAX_NODE_TYPES",
    "METRIC_LIMITS",
    "NODE_TYPES",
    "PERCENT",
    "REGISTRATION_POSITIVE",
    "REPLICA_LIMITS",
    "Limit",
    "capability_violations",
    "hello_violations",
    "number_problem",
    "replica_violations",
    "valid_replicas",
    "values_problem",
]
