"""``automator67.v1.MetricsService``: fleet aggregates for polling and live pushes."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc
from automator67.v1 import common_pb2, metrics_pb2, metrics_pb2_grpc

from controller.api.context import current_principal
from controller.errors import FieldViolation, InvalidArgument, NotFound
from controller.nodes.aggregates import system_metrics
from controller.nodes.fleet import Fleet
from controller.nodes.repository import NodeRepository
from controller.timestamps import timestamp

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

# Live pushes: no faster than this, and at least this often even without changes.
MIN_PUSH_INTERVAL_MS = 200
DEFAULT_PUSH_INTERVAL_MS = 1000
KEEPALIVE_PUSH_SECONDS = 15.0
# Aggregates are cached per user for this long (spec §7: system:metrics:latest, 1 minute).
SYSTEM_METRICS_TTL_SECONDS = 60.0


class MetricsServicer(metrics_pb2_grpc.MetricsServiceServicer):
    def __init__(self, fleet: Fleet, nodes: NodeRepository, draining: asyncio.Event) -> None:
        self._fleet = fleet
        self._nodes = nodes
        self._draining = draining

    async def GetSystemMetrics(
        self, request: metrics_pb2.GetSystemMetricsRequest, context: Context
    ) -> metrics_pb2.GetSystemMetricsResponse:
        user_id = current_principal().user_id
        metrics = system_metrics(self._fleet, user_id, self._fleet.clock())
        await self._fleet.cache.set(
            f"system:metrics:latest:{user_id}",
            json.dumps(
                {
                    "cpu": metrics.cpu_percent,
                    "memory": metrics.memory_percent,
                    "error_rate": metrics.error_rate,
                    "latency": metrics.avg_response_time_ms,
                }
            ).encode(),
            SYSTEM_METRICS_TTL_SECONDS,
        )
        return metrics_pb2.GetSystemMetricsResponse(metrics=metrics)

    async def WatchSystemMetrics(
        self, request: metrics_pb2.WatchSystemMetricsRequest, context: Context
    ) -> AsyncIterator[metrics_pb2.WatchSystemMetricsResponse]:
        if request.min_interval_ms and request.min_interval_ms < MIN_PUSH_INTERVAL_MS:
            raise InvalidArgument(
                f"min_interval_ms must be at least {MIN_PUSH_INTERVAL_MS}",
                field_violations=[
                    FieldViolation("min_interval_ms", f"must be 0 or at least {MIN_PUSH_INTERVAL_MS}")
                ],
            )
        interval = (request.min_interval_ms or DEFAULT_PUSH_INTERVAL_MS) / 1000
        user_id = current_principal().user_id
        last: metrics_pb2.SystemMetrics | None = None
        last_sent = 0.0
        while not self._draining.is_set():
            now = self._fleet.clock()
            current = system_metrics(self._fleet, user_id, now)
            comparable = metrics_pb2.SystemMetrics()
            comparable.CopyFrom(current)
            comparable.ClearField("time")
            if last is None or comparable != last or now - last_sent >= KEEPALIVE_PUSH_SECONDS:
                last, last_sent = comparable, now
                yield metrics_pb2.WatchSystemMetricsResponse(metrics=current)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._draining.wait(), interval)

    async def GetNodeMetrics(
        self, request: metrics_pb2.GetNodeMetricsRequest, context: Context
    ) -> metrics_pb2.GetNodeMetricsResponse:
        if not 0 <= request.hours <= 168:
            raise InvalidArgument(
                "hours must be between 1 and 168",
                field_violations=[FieldViolation("hours", "must be between 1 and 168 (0 means 24)")],
            )
        node = (
            await self._nodes.get_for_user(current_principal().user_id, request.node_id)
            if request.node_id
            else None
        )
        if node is None:
            raise NotFound(f"Node {request.node_id!r} was not found", reason="NODE_NOT_FOUND")
        live = self._fleet.live.get(node.id)
        current = live.metrics if live else common_pb2.NodeMetrics(**(node.metrics_current or {}))
        history = []
        for sample in await self._fleet.history(node.id, request.hours or 24):
            stamp = timestamp(sample.pop("t"))
            history.append(
                metrics_pb2.NodeMetricsSample(time=stamp, metrics=common_pb2.NodeMetrics(**sample))
            )
        return metrics_pb2.GetNodeMetricsResponse(current=current, history=history)
