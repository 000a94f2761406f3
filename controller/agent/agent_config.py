"""The agent's configuration (:class:`AgentConfig`), keepalive settings, providers and
endpoints, and what every part of the :class:`~controller.agent.client.Agent` shares:
its state (:class:`_AgentState`) and waiting that a stop interrupts.

Keepalive: :func:`keepalive_options` are the client's channel settings;
:func:`server_keepalive_options` are what the controller's node-facing server must
accept (same numbers, plus the minimum ping interval it tolerates).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import socket
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import grpc
from automator67.v1 import common_pb2, node_pb2

from controller.agent.backoff import DEFAULT_BASE_SECONDS, DEFAULT_CAP_SECONDS, Backoff
from controller.agent.handlers import CommandHandlers
from controller.agent.identity import DEFAULT_DATA_DIR, Enrollment, Identity
from controller.agent.metrics import MetricsState, measure_capabilities
from controller.keepalive import client_options, server_options

T = TypeVar("T")

TARGET_NAME_OVERRIDE = "automator67-controller"
"""The name the controller's node-facing server certificate carries (SAN DNS); the agent
verifies the server against it whatever address it dials."""

DEFAULT_HEARTBEAT_INTERVAL_MS = 30_000
"""Used when the controller does not say (spec: 30 s)."""

EXIT_OK = 0
EXIT_FAILURE = 2
"""Enrollment refused, or the data directory is unusable: retrying would not help."""

PROVIDERS: Mapping[str, common_pb2.Provider.ValueType] = {
    "render": common_pb2.PROVIDER_RENDER,
    "railway": common_pb2.PROVIDER_RAILWAY,
    "flyio": common_pb2.PROVIDER_FLYIO,
    "vercel": common_pb2.PROVIDER_VERCEL,
    "netlify": common_pb2.PROVIDER_NETLIFY,
}
"""``--provider`` names and their ``Provider`` enum values (spec §3.2)."""

DEFAULT_PROVIDER = "render"
"""Reported when the provider is neither given nor detected."""

_PROVIDER_ENV_MARKERS: tuple[tuple[str, str], ...] = (
    ("RENDER", "render"),
    ("RAILWAY_ENVIRONMENT", "railway"),
    ("FLY_APP_NAME", "flyio"),
    ("VERCEL", "vercel"),
    ("NETLIFY", "netlify"),
)
"""Environment variables each platform sets in its containers."""


def _agent_version() -> str:
    try:
        return metadata.version("automator67-controller")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


AGENT_VERSION = _agent_version()


# --------------------------------------------------------------------------- keepalive


def keepalive_options(interval_ms: int) -> list[tuple[str, int]]:
    """The agent channel's keepalive settings (see :mod:`controller.keepalive`)."""
    return client_options(interval_ms)


def server_keepalive_options(interval_ms: int) -> list[tuple[str, int]]:
    """What the controller's node-facing server sets to agree (see :mod:`controller.keepalive`)."""
    return server_options(interval_ms)


# --------------------------------------------------------------------------- config


def provider_value(name: str) -> common_pb2.Provider.ValueType:
    """The ``Provider`` enum value of a ``--provider`` name (case-insensitive; ``fly.io`` = flyio)."""
    key = name.strip().lower().replace(".", "").replace("-", "").replace("_", "")
    if key == "fly":
        key = "flyio"
    if key not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; choose one of {', '.join(PROVIDERS)}")
    return PROVIDERS[key]


def detect_provider(environ: Mapping[str, str] | None = None) -> str | None:
    """The provider whose platform variables are set in ``environ`` (default: ``os.environ``)."""
    env = os.environ if environ is None else environ
    for variable, provider in _PROVIDER_ENV_MARKERS:
        if env.get(variable):
            return provider
    return None


def default_endpoint() -> str:
    """``http://<hostname>:8080``: where this node would serve its replicas."""
    return f"http://{socket.gethostname()}:8080"


def _split_host_port(address: str) -> tuple[str, str] | None:
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep or not rest.startswith(":"):
            return None
        return host, rest[1:]
    host, sep, port = address.rpartition(":")
    return (host, port) if sep else None


def resolve_stream_endpoint(controller_endpoint: str, enrolled_via: str) -> str:
    """The address to dial for the stream: ``controller_endpoint``, with a wildcard or empty
    host (``0.0.0.0``, ``[::]``, ``:50052``) replaced by the host the agent enrolled through."""
    if "/" in controller_endpoint:  # a gRPC target such as dns:///host:port: use as is
        return controller_endpoint
    parts = _split_host_port(controller_endpoint)
    if parts is None or parts[0] not in ("", "0.0.0.0", "::"):  # noqa: S104 - comparing, not binding
        return controller_endpoint
    via = _split_host_port(enrolled_via)
    if via is None or not via[0]:
        return controller_endpoint
    host = via[0]
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{parts[1]}"


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent is told at start-up (the ``a67 agent`` flags)."""

    controller: str = ""
    """host:port of the controller's user-facing gRPC port; used only to enroll."""
    token: str = field(default="", repr=False)
    """The enrollment token; used only to enroll. Never logged."""
    provider: common_pb2.Provider.ValueType = common_pb2.PROVIDER_RENDER
    """The ``Provider`` enum value this node runs on."""
    endpoint: str = field(default_factory=default_endpoint)
    """Where this node serves (reported at enrollment)."""
    region: str = "local"
    """The node's region (reported at enrollment)."""
    data_dir: Path = DEFAULT_DATA_DIR
    """Where the key, the certificates and node.json live."""
    bandwidth_mbps: float = 100.0
    """Declared network bandwidth (``NodeCapabilities.network_bandwidth_mbps``)."""
    max_concurrent_requests: int = 100
    """Declared concurrency (``NodeCapabilities.max_concurrent_requests``)."""
    node_types: tuple[str, ...] = ("compute",)
    """What this node serves: compute, database, storage."""
    controller_tls_ca: Path | None = None
    """PEM CA to verify the controller's user-facing port with; None = plaintext."""
    oauth_token: str = field(default="", repr=False)
    """The provider OAuth token sent at enrollment (from ``--oauth-token-stdin``, or
    A67_AGENT_OAUTH_TOKEN). Kept in memory only; never logged."""
    backoff_base_s: float = DEFAULT_BASE_SECONDS
    """Ceiling of the first retry delay."""
    backoff_cap_s: float = DEFAULT_CAP_SECONDS
    """Largest retry delay ceiling."""
    enroll_timeout_s: float = 30.0
    """Deadline of one RegisterNode call."""
    hello_timeout_s: float = 10.0
    """How long to wait for the hello_ack after sending the hello."""
    close_timeout_s: float = 2.0
    """On stop, how long to wait for the controller to end the half-closed stream."""


class _StopRequested(Exception):
    """The stop event was set while waiting."""


async def _unless_stopped(awaitable: Awaitable[T], stop: asyncio.Event) -> T:
    """Await ``awaitable`` unless ``stop`` is set first (then cancel it, raise _StopRequested)."""
    task: asyncio.Future[T] = asyncio.ensure_future(awaitable)
    stopper: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    racing: set[asyncio.Future[Any]] = {task, stopper}
    try:
        await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if task.cancelled() and stop.is_set():
        raise _StopRequested
    return task.result()


async def _sleep_unless_stopped(stop: asyncio.Event, delay: float) -> bool:
    """Sleep ``delay`` seconds; True if ``stop`` was set meanwhile (returns at once then)."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=max(0.0, delay))
    except TimeoutError:
        return False
    return True


def _describe(exc: BaseException) -> str:
    """One line about why a stream ended."""
    if isinstance(exc, grpc.aio.AioRpcError):
        details = exc.details() or ""
        return f"{exc.code().name} {details}".strip()
    if isinstance(exc, asyncio.InvalidStateError):
        return "the controller closed the stream"
    if isinstance(exc, TimeoutError):
        return "timed out waiting for the controller"
    return f"{type(exc).__name__}: {exc}"


class _AgentState:
    """The attributes of an :class:`~controller.agent.client.Agent` (set in its ``__init__``),
    for the parts it is made of, and what they all use."""

    config: AgentConfig
    handlers: CommandHandlers
    identity: Identity
    metrics: MetricsState
    on_connected: list[Callable[[], None]]
    _replicas: Callable[[], Iterable[node_pb2.ReplicaState]]
    _rng: random.Random
    _node_id: str | None
    _connected: bool
    _generation: int
    _interval_ms: int
    _last_ack_rtt_ms: float | None
    _heartbeats_sent: int
    _connections: int
    _sequence: int
    _node_status: common_pb2.NodeStatus.ValueType
    _sent_at: dict[int, float]
    _acks_on_stream: int
    _tiebreak: itertools.count[int]
    _outbox: asyncio.PriorityQueue[tuple[int, int, node_pb2.ConnectRequest]] | None
    _undelivered: deque[node_pb2.CommandResult]
    _running: dict[str, asyncio.Task[None]]
    _recent: OrderedDict[str, node_pb2.CommandResult]
    _capabilities: common_pb2.NodeCapabilities | None
    _enrollment: Enrollment | None
    _bulk: grpc.aio.Channel | None
    _storage: grpc.aio.Channel | None
    _data: grpc.aio.Channel | None
    _elsewhere: dict[tuple[str, str], grpc.aio.Channel]
    _endpoints: list[str]

    def _capabilities_now(self) -> common_pb2.NodeCapabilities:
        if self._capabilities is None:
            cfg = self.config
            self._capabilities = measure_capabilities(
                self.identity.data_dir,
                bandwidth_mbps=cfg.bandwidth_mbps,
                max_concurrent_requests=cfg.max_concurrent_requests,
                node_types=cfg.node_types,
            )
        return self._capabilities

    def _backoff(self) -> Backoff:
        return Backoff(base=self.config.backoff_base_s, cap=self.config.backoff_cap_s, rng=self._rng)
