"""App traffic as the ingresses see it: Envoy's gRPC access-log service, aggregated.

Every ingress streams two logs to the controller (``envoy.service.accesslog.v3``,
``StreamAccessLogs``), batched by Envoy every ``access_log_flush_seconds``:

* ``a67_requests`` (the connection manager's access log): one entry per request, as
  the client saw it — status, total time. These make the **per-deployment** figures:
  requests/s, error rate (5xx share), latency p50/p99.
* ``a67_attempts`` (the router's upstream log): one entry per attempt on a replica,
  retries included — the replica's address, its status, the time from the first byte
  sent to it to the last byte received. These make the **per-replica** and
  **per-node** figures: a replica that answers 500 counts against its node even when
  a retry on another replica saved the request.

Why the access-log service and not load reports (LRS): LRS sends per-endpoint
*counters* (requests issued/succeeded/errored) once per reporting interval; it has no
latency distribution (no p50/p99), and its "error" is Envoy's own notion. Access logs
carry each request's status and timings, so percentiles and exact 5xx shares come out
of the same data, and upstream logs attribute retried attempts to the replica that
failed. The cost is one small record per request, which Envoy batches; at very high
rates the logs could be sampled (``AccessLogCommon.sample_rate``) without changing
this code's shares and percentiles.

:class:`TrafficStats` keeps a bounded, time-windowed sample per replica, node and
deployment (at most :data:`MAX_SAMPLES` each, :data:`WINDOW_SECONDS` long), and is
fed by :class:`AccessLogServer`.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from controller.ingress.envoy_types import accesslog_pb2, als_pb2, als_pb2_grpc
from controller.ingress.snapshot import ACCESS_LOG_NAME, UPSTREAM_LOG_NAME

log = logging.getLogger("a67.ingress.traffic")

WINDOW_SECONDS = 60.0
"""Error rates and latencies cover the requests of the last minute (like the agent's own)."""
RATE_WINDOW_SECONDS = 10.0
"""Requests per second are over the last ten seconds."""
MAX_SAMPLES = 20_000
"""At most this many requests are kept per replica, node and deployment."""
MIN_SAMPLES_FOR_ERROR_RATE = 5
"""A node's error rate from app traffic needs at least this many attempts in the window;
with fewer, no app-traffic figure is given (a node with one request that failed is not
"100 % errors")."""


@dataclass(frozen=True, slots=True)
class Replica:
    """Who answers at an upstream address."""

    deployment_id: str
    replica_index: int
    node_id: str


@dataclass(frozen=True, slots=True)
class Summary:
    """Figures of one replica, node or deployment over the window."""

    requests: int
    errors: int
    requests_per_second: float
    error_rate_percent: float
    avg_ms: float
    p50_ms: float
    p99_ms: float


class _Series:
    __slots__ = ("samples",)

    def __init__(self) -> None:
        self.samples: deque[tuple[float, bool, float]] = deque(maxlen=MAX_SAMPLES)

    def add(self, at: float, error: bool, latency_ms: float) -> None:
        self.samples.append((at, error, latency_ms))

    def summary(self, now: float) -> Summary:
        cutoff = now - WINDOW_SECONDS
        while self.samples and self.samples[0][0] < cutoff:
            self.samples.popleft()
        if not self.samples:
            return Summary(0, 0, 0.0, 0.0, 0.0, 0.0, 0.0)
        latencies = sorted(s[2] for s in self.samples)
        errors = sum(1 for s in self.samples if s[1])
        recent = sum(1 for s in self.samples if s[0] >= now - RATE_WINDOW_SECONDS)
        count = len(latencies)
        return Summary(
            requests=count,
            errors=errors,
            requests_per_second=recent / RATE_WINDOW_SECONDS,
            error_rate_percent=100.0 * errors / count,
            avg_ms=sum(latencies) / count,
            p50_ms=percentile(latencies, 50),
            p99_ms=percentile(latencies, 99),
        )


def percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50), percentile([1.0, 2.0, 3.0, 4.0], 99)
    (2.0, 4.0)
    """
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _ms(duration: Any) -> float:
    return float(duration.seconds) * 1000.0 + float(duration.nanos) / 1e6


def _address(entry: accesslog_pb2.HTTPAccessLogEntry) -> str:
    socket = entry.common_properties.upstream_remote_address.socket_address
    if not socket.address:
        return ""
    return f"{socket.address}:{socket.port_value}"


class TrafficStats:
    """Windowed request figures per replica, node and deployment."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.replicas: dict[str, Replica] = {}
        """Upstream ``host:port`` → the replica there (set by the ingress service)."""
        self._by_replica: dict[tuple[str, int], _Series] = {}
        self._by_node: dict[str, _Series] = {}
        self._by_deployment: dict[str, _Series] = {}
        self.entries = 0
        self.unattributed = 0

    def set_replicas(self, replicas: dict[str, Replica]) -> None:
        """Where each replica answers now. Addresses no longer listed keep their last owner
        (late log entries of a replica that just stopped still count for it)."""
        self.replicas.update(replicas)

    def record_request(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> None:
        """One downstream request (``a67_requests``)."""
        self.entries += 1
        cluster = entry.common_properties.upstream_cluster
        if not cluster or entry.common_properties.route_name == "not_found":
            return
        code = entry.response.response_code.value
        latency = _ms(entry.common_properties.time_to_last_downstream_tx_byte)
        self._by_deployment.setdefault(cluster, _Series()).add(
            self._clock(), code >= 500 or code == 0, latency
        )

    def record_attempt(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> None:
        """One upstream attempt (``a67_attempts``)."""
        self.entries += 1
        replica = self.replicas.get(_address(entry))
        if replica is None:
            self.unattributed += 1
            return
        props = entry.common_properties
        code = entry.response.response_code.value
        start = _ms(props.time_to_first_upstream_tx_byte)
        end = _ms(props.time_to_last_upstream_rx_byte)
        latency = end - start if end >= start and end > 0 else _ms(props.duration)
        error = code >= 500 or code == 0  # 0: no response (reset, connect failure)
        now = self._clock()
        self._by_replica.setdefault((replica.deployment_id, replica.replica_index), _Series()).add(
            now, error, latency
        )
        self._by_node.setdefault(replica.node_id, _Series()).add(now, error, latency)

    def deployment(self, deployment_id: str) -> Summary:
        series = self._by_deployment.get(deployment_id)
        return series.summary(self._clock()) if series else Summary(0, 0, 0.0, 0.0, 0.0, 0.0, 0.0)

    def replica(self, deployment_id: str, replica_index: int) -> Summary:
        series = self._by_replica.get((deployment_id, replica_index))
        return series.summary(self._clock()) if series else Summary(0, 0, 0.0, 0.0, 0.0, 0.0, 0.0)

    def node(self, node_id: str) -> Summary:
        series = self._by_node.get(node_id)
        return series.summary(self._clock()) if series else Summary(0, 0, 0.0, 0.0, 0.0, 0.0, 0.0)

    def node_health(self, node_id: str) -> tuple[float, float] | None:
        """``(error rate %, average response time ms)`` of the node's app traffic, or None
        when it served fewer than :data:`MIN_SAMPLES_FOR_ERROR_RATE` attempts in the window."""
        summary = self.node(node_id)
        if summary.requests < MIN_SAMPLES_FOR_ERROR_RATE:
            return None
        return summary.error_rate_percent, summary.avg_ms

    def forget_deployment(self, deployment_id: str) -> None:
        self._by_deployment.pop(deployment_id, None)
        for key in [k for k in self._by_replica if k[0] == deployment_id]:
            del self._by_replica[key]


class AccessLogServer(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """``envoy.service.accesslog.v3.AccessLogService``: feeds :class:`TrafficStats`."""

    def __init__(self, stats: TrafficStats) -> None:
        self._stats = stats

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: Any
    ) -> als_pb2.StreamAccessLogsResponse:
        log_name = ""
        async for message in request_iterator:
            if message.HasField("identifier"):
                log_name = message.identifier.log_name
            entries: Iterable[accesslog_pb2.HTTPAccessLogEntry] = message.http_logs.log_entry
            if log_name == UPSTREAM_LOG_NAME:
                for entry in entries:
                    self._stats.record_attempt(entry)
            elif log_name == ACCESS_LOG_NAME:
                for entry in entries:
                    self._stats.record_request(entry)
        return als_pb2.StreamAccessLogsResponse()


def add_to_server(server: grpc.aio.Server, stats: TrafficStats) -> None:
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(AccessLogServer(stats), server)
