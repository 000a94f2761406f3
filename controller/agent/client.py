"""The agent's connection to the controller: enroll once, then hold the node stream.

Life of an agent (:meth:`Agent.run`)::

    load node.json ─ found ──────────────────────────────┐  (resume: same node id)
        └─ missing → RegisterNode on --controller ───────┤  (enroll once, TLS bootstrap:
                     UNAVAILABLE… → backoff, retry        │   CSR in, certificate out)
                     UNAUTHENTICATED / INVALID_ARGUMENT / │
                     ALREADY_EXISTS → exit 2              │
                                                          ▼
    ┌──► Connect (mutual TLS to the node-facing port) ── hello ──► hello_ack
    │        heartbeat every interval ──►   ◄── heartbeat_ack (round-trip time)
    │        command results ──►            ◄── commands (run concurrently)
    └── stream error or end: backoff with full jitter (0.5 s … 300 s, for ever)
        SIGTERM / SIGINT (the ``stop`` event): half-close the stream, exit 0

The backoff starts again from 0.5 s after a connection that stayed healthy: it got
its ``hello_ack`` and a heartbeat ack and lasted min(interval, 5 s) (:func:`stayed_healthy`).

Commands run as tasks owned by the agent, not by one connection: a result that is
ready while the agent is disconnected is sent on the next connection. A command
whose ``command_id`` is still running is not started twice, and one that finished
recently gets its earlier result again.

Keepalive: :func:`keepalive_options` are the client's channel settings;
:func:`server_keepalive_options` are what the controller's node-facing server must
accept (same numbers, plus the minimum ping interval it tolerates).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import random
import socket
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import grpc
from automator67.v1 import common_pb2, node_pb2, node_pb2_grpc
from google.rpc import error_details_pb2, status_pb2

from controller.agent.backoff import DEFAULT_BASE_SECONDS, DEFAULT_CAP_SECONDS, Backoff
from controller.agent.handlers import CommandHandlers
from controller.agent.identity import DEFAULT_DATA_DIR, Enrollment, Identity, IdentityError
from controller.agent.metrics import MetricsState, collect_metrics, measure_capabilities
from controller.keepalive import client_options, server_options
from controller.limits import MessageTooLarge, check_control_message, node_channel_options

log = logging.getLogger("controller.agent")

T = TypeVar("T")

TARGET_NAME_OVERRIDE = "automator67-controller"
"""The name the controller's node-facing server certificate carries (SAN DNS); the agent
verifies the server against it whatever address it dials."""

DEFAULT_HEARTBEAT_INTERVAL_MS = 30_000
"""Used when the controller does not say (spec: 30 s)."""

EXIT_OK = 0
EXIT_FAILURE = 2
"""Enrollment refused, or the data directory is unusable: retrying would not help."""

RETRYABLE_ENROLLMENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
"""Enrollment errors that may pass (the controller or its store is down or overloaded);
every other code ends the agent with a message."""

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

_PRIORITY_HEARTBEAT = 0
_PRIORITY_RESULT = 1
_MAX_PENDING_ACKS = 64
_MAX_UNDELIVERED_RESULTS = 1000
_MAX_REMEMBERED_RESULTS = 256
_NODE_ID_METADATA_KEYS = ("node_id", "nodeId", "existing_node_id")
_MIN_REDACTED_LENGTH = 6  # shorter "tokens" would mangle every message; real ones are far longer


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
    """The provider OAuth token sent at enrollment (from A67_AGENT_OAUTH_TOKEN). Never logged."""
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


class EnrollmentRefused(Exception):
    """The controller refused to enroll this node for a reason retrying cannot fix."""


class _StopRequested(Exception):
    """The stop event was set while waiting."""


class _ProtocolError(Exception):
    """The controller broke the stream protocol (e.g. no hello_ack first)."""


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


def _status_details(exc: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo | None, list[str]]:
    """The ErrorInfo and BadRequest field violations ("field: description") of an error."""
    info: error_details_pb2.ErrorInfo | None = None
    violations: list[str] = []
    for key, value in exc.trailing_metadata() or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.extend(f"{v.field}: {v.description}" for v in bad.field_violations)
    return info, violations


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


def _status_name(status: common_pb2.NodeStatus.ValueType) -> str:
    """``NODE_STATUS_READY`` → ``ready`` (for logs)."""
    try:
        return common_pb2.NodeStatus.Name(status).removeprefix("NODE_STATUS_").lower()
    except ValueError:
        return str(status)


@dataclass
class _SessionEnd:
    """How one stream ended."""

    reason: str = "the controller closed the stream"
    acked: bool = False
    lasted_s: float = 0.0
    code: Any = None
    heartbeats_acked: int = 0
    """Heartbeats of this stream the controller acknowledged."""


STABLE_CONNECTION_SECONDS = 5.0
"""A stream that got its hello_ack and heartbeat acks for this long (or for one
heartbeat interval, if shorter) was healthy: the reconnect backoff starts again
from its base after it ends."""


def stayed_healthy(end: _SessionEnd, interval_s: float) -> bool:
    """Whether a stream that ended was healthy enough to reset the reconnect backoff.

    It was if the controller accepted it (hello_ack), acknowledged at least one
    heartbeat on it (the whole round trip worked), and it lasted
    ``min(interval, STABLE_CONNECTION_SECONDS)``. A controller restart then costs a
    reconnect within the base delay instead of whatever the backoff had grown to; a
    controller that accepts streams and drops them at once still backs off.

    >>> stayed_healthy(_SessionEnd(acked=True, lasted_s=11.0, heartbeats_acked=1), 30.0)
    True
    >>> stayed_healthy(_SessionEnd(acked=True, lasted_s=11.0, heartbeats_acked=0), 30.0)
    False
    >>> stayed_healthy(_SessionEnd(acked=True, lasted_s=0.3, heartbeats_acked=1), 30.0)
    False
    """
    return (
        end.acked and end.heartbeats_acked > 0 and end.lasted_s >= min(interval_s, STABLE_CONNECTION_SECONDS)
    )


# --------------------------------------------------------------------------- agent


class Agent:
    """The reference node agent: enrolls once, then holds the node stream for ever.

    ``handlers`` answer the controller's commands (default: none registered, so every
    command is answered "unsupported"); ``replicas`` reports the replica states sent in
    every hello and heartbeat; ``rng`` is the jitter source of the backoff.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        handlers: CommandHandlers | None = None,
        replicas: Callable[[], Iterable[node_pb2.ReplicaState]] | None = None,
        rng: random.Random | None = None,
        metrics_state: MetricsState | None = None,
    ) -> None:
        self.config = config
        self.handlers = handlers if handlers is not None else CommandHandlers()
        self.identity = Identity(config.data_dir)
        self.metrics = metrics_state or MetricsState(data_dir=self.identity.data_dir)
        self._replicas = replicas or (lambda: ())
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._node_id: str | None = None
        self._connected = False
        self._generation = 0
        self._interval_ms = DEFAULT_HEARTBEAT_INTERVAL_MS
        self._last_ack_rtt_ms: float | None = None
        self._heartbeats_sent = 0
        self._connections = 0
        self._sequence = 0
        self._node_status: common_pb2.NodeStatus.ValueType = common_pb2.NODE_STATUS_UNSPECIFIED
        self._sent_at: dict[int, float] = {}
        self._acks_on_stream = 0
        self._tiebreak = itertools.count()
        self._outbox: asyncio.PriorityQueue[tuple[int, int, node_pb2.ConnectRequest]] | None = None
        self._undelivered: deque[node_pb2.CommandResult] = deque(maxlen=_MAX_UNDELIVERED_RESULTS)
        self._running: dict[str, asyncio.Task[None]] = {}
        self._recent: OrderedDict[str, node_pb2.CommandResult] = OrderedDict()
        self._capabilities: common_pb2.NodeCapabilities | None = None
        self._enrollment: Enrollment | None = None
        self._bulk: grpc.aio.Channel | None = None
        self._storage: grpc.aio.Channel | None = None
        self._data: grpc.aio.Channel | None = None
        self.on_connected: list[Callable[[], None]] = []
        """Called, in order, after each accepted hello (storage reports its inventory then;
        shards roll back the transactions an earlier stream left open)."""

    # ----------------------------------------------------------------- observable state

    @property
    def node_id(self) -> str | None:
        """The node id, once enrolled or resumed."""
        return self._node_id

    @property
    def connected(self) -> bool:
        """True while a stream is up (from its hello_ack until it ends)."""
        return self._connected

    @property
    def generation(self) -> int:
        """The generation of the latest accepted connection (from its hello_ack; 0 before)."""
        return self._generation

    @property
    def heartbeat_interval_ms(self) -> int:
        """The heartbeat interval in force."""
        return self._interval_ms

    @property
    def last_ack_rtt_ms(self) -> float | None:
        """Round-trip time of the latest acknowledged heartbeat, in milliseconds."""
        return self._last_ack_rtt_ms

    @property
    def heartbeats_sent(self) -> int:
        """Heartbeats written to a stream since the agent started."""
        return self._heartbeats_sent

    @property
    def connections(self) -> int:
        """Streams that got a hello_ack since the agent started."""
        return self._connections

    @property
    def node_status(self) -> common_pb2.NodeStatus.ValueType:
        """The ``NodeStatus`` in the latest heartbeat_ack."""
        return self._node_status

    # ----------------------------------------------------------------- run

    async def run(self, stop: asyncio.Event) -> int:
        """Enroll if needed, then keep the stream up until ``stop`` is set.

        Returns 0 after a clean stop, :data:`EXIT_FAILURE` when enrollment is refused or
        the data directory is unusable.
        """
        try:
            self.identity.ensure_dir()
            enrollment = self.identity.load()
            if enrollment is None:
                enrollment = await self._enroll(stop)
            else:
                log.info(
                    "resuming as node %s (enrolled earlier); stream endpoint %s",
                    enrollment.node_id,
                    enrollment.controller_endpoint,
                )
        except _StopRequested:
            log.info("stopped before enrollment finished")
            return EXIT_OK
        except (EnrollmentRefused, IdentityError) as exc:
            log.error("%s", exc)
            return EXIT_FAILURE
        except OSError as exc:
            log.error("cannot use the agent data directory %s: %s", self.identity.data_dir, exc)
            return EXIT_FAILURE
        self._node_id = enrollment.node_id
        self._enrollment = enrollment
        self._interval_ms = enrollment.heartbeat_interval_ms or DEFAULT_HEARTBEAT_INTERVAL_MS
        try:
            await self._stay_connected(enrollment, stop)
        finally:
            await self._cancel_commands()
            if self._bulk is not None:
                await self._bulk.close()
                self._bulk = None
            if self._storage is not None:
                await self._storage.close()
                self._storage = None
            if self._data is not None:
                await self._data.close()
                self._data = None
        log.info("agent stopped (node %s)", enrollment.node_id)
        return EXIT_OK

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

    # ----------------------------------------------------------------- enrollment

    def _enrollment_channel(self) -> grpc.aio.Channel:
        cfg = self.config
        if cfg.controller_tls_ca is None:
            return grpc.aio.insecure_channel(cfg.controller)
        try:
            ca = cfg.controller_tls_ca.expanduser().read_bytes()
        except OSError as exc:
            raise EnrollmentRefused(
                f"cannot read --controller-tls-ca {cfg.controller_tls_ca}: {exc}"
            ) from exc
        return grpc.aio.secure_channel(cfg.controller, grpc.ssl_channel_credentials(root_certificates=ca))

    def _redact(self, text: str) -> str:
        """``text`` (an error from the controller) with any echo of the tokens removed."""
        for secret in (self.config.token, self.config.oauth_token):
            if len(secret) >= _MIN_REDACTED_LENGTH:
                text = text.replace(secret, "<redacted>")
        return text

    async def _enroll(self, stop: asyncio.Event) -> Enrollment:
        cfg = self.config
        if not cfg.controller:
            raise EnrollmentRefused(
                f"this installation ({self.identity.data_dir}) is not enrolled yet: "
                "start the agent with --controller HOST:PORT and A67_AGENT_TOKEN (or --token-file FILE)"
            )
        if not cfg.token:
            raise EnrollmentRefused(
                f"this installation ({self.identity.data_dir}) is not enrolled yet and no enrollment "
                "token was given: set A67_AGENT_TOKEN (or pass --token-file FILE)"
            )
        request = node_pb2.RegisterNodeRequest(
            enrollment_token=cfg.token,
            provider=cfg.provider,
            endpoint=cfg.endpoint,
            region=cfg.region,
            capabilities=self._capabilities_now(),
            csr_pem=self.identity.build_csr(),
            fingerprint=self.identity.fingerprint(),
        )
        if cfg.oauth_token:
            request.oauth_token = cfg.oauth_token
        backoff = self._backoff()
        log.info(
            "enrolling with controller %s as a %s node in region %s (fingerprint %s)",
            cfg.controller,
            common_pb2.Provider.Name(cfg.provider).removeprefix("PROVIDER_").lower(),
            cfg.region,
            request.fingerprint[:16],
        )
        async with self._enrollment_channel() as channel:
            stub = node_pb2_grpc.NodeServiceStub(channel)
            while True:
                try:
                    response: node_pb2.RegisterNodeResponse = await _unless_stopped(
                        stub.RegisterNode(request, timeout=cfg.enroll_timeout_s), stop
                    )
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in RETRYABLE_ENROLLMENT_CODES:
                        raise EnrollmentRefused(self._refusal_message(exc)) from None
                    delay = backoff.next_delay()
                    log.warning(
                        "enrollment with %s failed (%s); retrying in %.2fs (attempt %d)",
                        cfg.controller,
                        self._redact(_describe(exc)),
                        delay,
                        backoff.attempt,
                    )
                    if await _sleep_unless_stopped(stop, delay):
                        raise _StopRequested from None
        if not response.node_id or not response.controller_endpoint:
            raise EnrollmentRefused(
                "the controller's RegisterNode answer lacks node_id or controller_endpoint"
            )
        enrollment = Enrollment(
            node_id=response.node_id,
            controller_endpoint=resolve_stream_endpoint(response.controller_endpoint, cfg.controller),
            heartbeat_interval_ms=response.heartbeat_interval_ms or DEFAULT_HEARTBEAT_INTERVAL_MS,
            certificate_pem=response.certificate_pem.encode(),
            ca_certificate_pem=response.ca_certificate_pem.encode(),
        )
        self.identity.save(enrollment)
        log.info(
            "enrolled as node %s; stream endpoint %s; heartbeat every %d ms",
            enrollment.node_id,
            enrollment.controller_endpoint,
            enrollment.heartbeat_interval_ms,
        )
        return enrollment

    def _refusal_message(self, exc: grpc.aio.AioRpcError) -> str:
        code = exc.code()
        details = self._redact(exc.details() or "")
        info, violations = _status_details(exc)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return (
                f"the controller refused the enrollment token ({details or 'UNAUTHENTICATED'}): it is "
                "invalid, expired or used up; create a new one and start the agent with it"
            )
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            fields = f" [{'; '.join(violations)}]" if violations else ""
            return f"the controller rejected the registration as invalid: {details}{fields}"
        if code == grpc.StatusCode.ALREADY_EXISTS:
            node_id = None
            if info is not None:
                node_id = next(
                    (info.metadata[k] for k in _NODE_ID_METADATA_KEYS if info.metadata.get(k)), None
                )
            node_id = node_id or self.identity.recorded_node_id() or "<unknown>"
            return (
                f"this installation (key fingerprint {self.identity.fingerprint()[:16]}) is already "
                f"registered as node {node_id}, but its certificate is missing from "
                f"{self.identity.data_dir}; restore node.crt, ca.crt and node.json there, or "
                f"deregister node {node_id} and enroll again"
            )
        return f"enrollment failed: {code.name} {details}".rstrip()

    # ----------------------------------------------------------------- the stream

    async def _stay_connected(self, enrollment: Enrollment, stop: asyncio.Event) -> None:
        backoff = self._backoff()
        while not stop.is_set():
            try:
                end = await self._session(enrollment, stop)
            except _StopRequested:
                break
            except Exception as exc:  # a bug must not end the agent: log it, back off, retry
                log.exception("stream session failed unexpectedly")
                end = _SessionEnd(reason=_describe(exc))
            if stop.is_set():
                break
            if stayed_healthy(end, self._interval_ms / 1000):
                backoff.reset()
            delay = backoff.next_delay()
            if end.acked:
                log.warning(
                    "disconnected from %s after %.1fs: %s; reconnecting in %.2fs",
                    enrollment.controller_endpoint,
                    end.lasted_s,
                    end.reason,
                    delay,
                )
            else:
                log.warning(
                    "could not connect to %s: %s; retrying in %.2fs (attempt %d)",
                    enrollment.controller_endpoint,
                    end.reason,
                    delay,
                    backoff.attempt,
                )
            if end.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                log.error(
                    "the controller refused node %s's certificate: if the node was deregistered, "
                    "remove %s and enroll again with a new token",
                    enrollment.node_id,
                    self.identity.data_dir,
                )
            if await _sleep_unless_stopped(stop, delay):
                break

    def storage_channel(self, message_options: list[tuple[str, int]]) -> grpc.aio.Channel:
        """A channel of its own to the node port for chunk transfers (controller/agent/chunks.py),
        with its own message limits."""
        if self._enrollment is None:
            raise RuntimeError("the agent is not enrolled yet")
        if self._storage is None:
            self._storage = self._node_port_channel(
                self._enrollment, own_connection=True, limits=message_options
            )
        return self._storage

    def _node_port_channel(
        self,
        enrollment: Enrollment,
        *,
        own_connection: bool = False,
        limits: list[tuple[str, int]] | None = None,
    ) -> grpc.aio.Channel:
        """A mutual-TLS channel to the node port, with the shared message limits."""
        credentials = grpc.ssl_channel_credentials(
            root_certificates=enrollment.ca_certificate_pem,
            private_key=self.identity.private_key_pem(),
            certificate_chain=enrollment.certificate_pem,
        )
        options: list[tuple[str, Any]] = [
            ("grpc.ssl_target_name_override", TARGET_NAME_OVERRIDE),
            *keepalive_options(self._interval_ms),
            *(limits if limits is not None else node_channel_options()),
        ]
        if own_connection:  # bulk transfers get their own TCP connection: heartbeats never queue behind them
            options.append(("grpc.use_local_subchannel_pool", 1))
        return grpc.aio.secure_channel(enrollment.controller_endpoint, credentials, options=options)

    async def fetch_package(self, sha256: str, offset: int) -> AsyncIterator[node_pb2.FetchPackageResponse]:
        """Chunks of package ``sha256`` from ``offset`` (``NodeService.FetchPackage``, on a
        connection of its own beside the node stream)."""
        enrollment = self._enrollment
        if enrollment is None:
            raise RuntimeError("the agent is not enrolled yet")
        if self._bulk is None:
            self._bulk = self._node_port_channel(enrollment, own_connection=True)
        call = node_pb2_grpc.NodeServiceStub(self._bulk).FetchPackage(
            node_pb2.FetchPackageRequest(sha256=sha256, offset=offset)
        )
        try:
            async for chunk in call:
                yield chunk
        finally:
            call.cancel()

    async def fetch_statement(self, ref: node_pb2.StatementRef) -> str:
        """The text of a long shard statement (``NodeService.FetchStatement``, on the data
        connection), checked against its size and SHA-256."""
        enrollment = self._enrollment
        if enrollment is None:
            raise RuntimeError("the agent is not enrolled yet")
        if self._data is None:
            self._data = self._node_port_channel(enrollment, own_connection=True)
        call = node_pb2_grpc.NodeServiceStub(self._data).FetchStatement(
            node_pb2.FetchStatementRequest(id=ref.id)
        )
        pieces: list[bytes] = []
        size = 0
        async for piece in call:
            size += len(piece.data)
            if size > ref.size:
                call.cancel()
                break
            pieces.append(piece.data)
        data = b"".join(pieces)
        if size != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
            raise ValueError(f"the statement text {ref.id} arrived damaged ({size} of {ref.size} bytes)")
        return data.decode()

    def open_shard_push(self) -> Any:
        """A ``NodeService.PushShardResult`` call (the rows of a shard statement), on a
        connection of its own beside the node stream (controller/agent/shards.py)."""
        enrollment = self._enrollment
        if enrollment is None:
            raise RuntimeError("the agent is not enrolled yet")
        if self._data is None:
            self._data = self._node_port_channel(enrollment, own_connection=True)
        return node_pb2_grpc.NodeServiceStub(self._data).PushShardResult()

    async def _session(self, enrollment: Enrollment, stop: asyncio.Event) -> _SessionEnd:
        """One stream, from dialing to its end; raises _StopRequested when stopped."""
        end = _SessionEnd()
        log.debug("connecting to %s as node %s", enrollment.controller_endpoint, enrollment.node_id)
        async with self._node_port_channel(enrollment) as channel:
            call = node_pb2_grpc.NodeServiceStub(channel).Connect()
            try:
                await self._hold_stream(call, enrollment.controller_endpoint, stop, end)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError, _ProtocolError) as exc:
                end.reason = _describe(exc)
                if isinstance(exc, grpc.aio.AioRpcError):
                    end.code = exc.code()
            finally:
                if not call.done():
                    call.cancel()
        return end

    async def _hold_stream(self, call: Any, endpoint: str, stop: asyncio.Event, end: _SessionEnd) -> None:
        loop = asyncio.get_running_loop()
        hello = node_pb2.NodeHello(
            agent_version=AGENT_VERSION,
            capabilities=self._capabilities_now(),
            replicas=list(self._replicas()),
        )
        await _unless_stopped(call.write(node_pb2.ConnectRequest(hello=hello)), stop)
        first = await _unless_stopped(asyncio.wait_for(call.read(), self.config.hello_timeout_s), stop)
        if first is grpc.aio.EOF:
            raise _ProtocolError("the controller closed the stream before acknowledging the hello")
        if first.WhichOneof("message") != "hello_ack":
            raise _ProtocolError(f"the controller answered the hello with {first.WhichOneof('message')}")
        ack = first.hello_ack
        self._generation = ack.generation
        if ack.heartbeat_interval_ms > 0:
            self._interval_ms = ack.heartbeat_interval_ms
        connected_at = loop.time()
        end.acked = True
        self._connected = True
        self._connections += 1
        for hook in self.on_connected:
            try:
                hook()
            except Exception:  # one hook failing must not cost the connection
                log.warning("an on-connected hook failed", exc_info=True)
        outbox: asyncio.PriorityQueue[tuple[int, int, node_pb2.ConnectRequest]] = asyncio.PriorityQueue()
        self._outbox = outbox
        self._sent_at.clear()  # acks of an earlier stream never come: time this one afresh
        self._last_ack_rtt_ms = None
        self._acks_on_stream = 0
        log.info(
            "connected to %s as node %s (generation %d, heartbeat every %d ms)",
            endpoint,
            self._node_id,
            self._generation,
            self._interval_ms,
        )
        while self._undelivered:
            self._deliver(self._undelivered.popleft())
        reader = asyncio.create_task(self._read_loop(call), name="agent-read")
        heart = asyncio.create_task(self._heartbeat_loop(outbox), name="agent-heartbeat")
        writer = asyncio.create_task(self._write_loop(call, outbox), name="agent-write")
        stopper = asyncio.create_task(stop.wait(), name="agent-stop")
        tasks = (reader, heart, writer, stopper)
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                await self._close_stream(call, reader, heart, writer)
                raise _StopRequested
            # The reader's account of the end is the most telling (it sees the status).
            failure = next(
                (t.exception() for t in (reader, writer, heart) if t in done and t.exception() is not None),
                None,
            )
            if failure is not None:
                raise failure
            end.reason = "the controller closed the stream"
        finally:
            self._connected = False
            self._outbox = None
            end.lasted_s = loop.time() - connected_at
            end.heartbeats_acked = self._acks_on_stream
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            while not outbox.empty():
                _, _, request = outbox.get_nowait()
                if request.HasField("result"):
                    self._undelivered.append(request.result)

    async def _close_stream(
        self, call: Any, reader: asyncio.Task[None], heart: asyncio.Task[None], writer: asyncio.Task[None]
    ) -> None:
        """Half-close the stream and give the controller a moment to end it."""
        log.info("stopping: closing the stream to the controller")
        heart.cancel()
        writer.cancel()
        await asyncio.gather(heart, writer, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(call.done_writing(), self.config.close_timeout_s)
        await asyncio.wait({reader}, timeout=self.config.close_timeout_s)

    async def _read_loop(self, call: Any) -> None:
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                return
            kind = response.WhichOneof("message")
            if kind == "heartbeat_ack":
                self._on_heartbeat_ack(response.heartbeat_ack)
            elif kind == "command":
                self._start_command(response.command)
            else:
                log.debug("ignoring a %s on an established stream", kind)

    def _on_heartbeat_ack(self, ack: node_pb2.HeartbeatAck) -> None:
        sent = self._sent_at.pop(ack.sequence, None)
        if sent is not None:
            self._last_ack_rtt_ms = (time.monotonic() - sent) * 1000.0
            self._acks_on_stream += 1
        if ack.status and ack.status != self._node_status:
            log.info("the controller reports node %s as %s", self._node_id, _status_name(ack.status))
            self._node_status = ack.status

    async def _heartbeat_loop(
        self, outbox: asyncio.PriorityQueue[tuple[int, int, node_pb2.ConnectRequest]]
    ) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            self._queue_heartbeat(outbox)
            due += self._interval_ms / 1000.0
            now = loop.time()
            due = max(due, now)  # fell behind (a stalled loop): send the next one now, no burst
            await asyncio.sleep(due - now)

    def _queue_heartbeat(
        self, outbox: asyncio.PriorityQueue[tuple[int, int, node_pb2.ConnectRequest]]
    ) -> None:
        self._sequence += 1
        heartbeat = node_pb2.Heartbeat(
            sequence=self._sequence,
            metrics=collect_metrics(self.metrics),
            replicas=list(self._replicas()),
        )
        if self._last_ack_rtt_ms is not None:  # the controller scores nodes by it (latency)
            heartbeat.rtt_ms = self._last_ack_rtt_ms
        heartbeat.sent_at.FromNanoseconds(time.time_ns())
        self._sent_at[self._sequence] = time.monotonic()
        while len(self._sent_at) > _MAX_PENDING_ACKS:
            del self._sent_at[next(iter(self._sent_at))]
        outbox.put_nowait(
            (_PRIORITY_HEARTBEAT, next(self._tiebreak), node_pb2.ConnectRequest(heartbeat=heartbeat))
        )

    async def _write_loop(
        self, call: Any, outbox: asyncio.PriorityQueue[tuple[int, int, node_pb2.ConnectRequest]]
    ) -> None:
        while True:
            _, _, queued = await outbox.get()
            request = self._bounded(queued)
            if request is None:
                continue
            try:
                await call.write(request)
            except BaseException:
                if request.HasField("result"):
                    self._undelivered.appendleft(request.result)
                raise
            if request.HasField("heartbeat"):
                self._heartbeats_sent += 1

    @staticmethod
    def _bounded(request: node_pb2.ConnectRequest) -> node_pb2.ConnectRequest | None:
        """``request`` if it fits the node stream's bound; an oversized command result is
        replaced by a failed result saying so (gRPC would fail the whole stream), anything
        else oversized is dropped with an error in the log."""
        try:
            check_control_message(request, f"The {request.WhichOneof('message')} message")
            return request
        except MessageTooLarge as exc:
            log.error("not sent: %s", exc)
            if not request.HasField("result"):
                return None
            return node_pb2.ConnectRequest(
                result=node_pb2.CommandResult(
                    command_id=request.result.command_id,
                    ok=False,
                    error_message=f"The result of command {request.result.command_id} was not sent: {exc}",
                )
            )

    # ----------------------------------------------------------------- commands

    def _start_command(self, command: node_pb2.NodeCommand) -> None:
        command_id = command.command_id
        if command_id in self._running:
            log.info("command %s is already running; not starting it twice", command_id)
            return
        if command_id in self._recent:
            log.info("command %s already ran; sending its result again", command_id)
            self._deliver(self._recent[command_id])
            return
        key = command_id or f"<anonymous {next(self._tiebreak)}>"
        task = asyncio.create_task(self._run_command(command), name=f"agent-command-{key}")
        self._running[key] = task
        task.add_done_callback(lambda _: self._running.pop(key, None))

    async def _run_command(self, command: node_pb2.NodeCommand) -> None:
        result = await self.handlers.dispatch(command, self.metrics.counters)
        if command.command_id:
            self._recent[command.command_id] = result
            while len(self._recent) > _MAX_REMEMBERED_RESULTS:
                self._recent.popitem(last=False)
        self._deliver(result)

    def _deliver(self, result: node_pb2.CommandResult) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(
                (_PRIORITY_RESULT, next(self._tiebreak), node_pb2.ConnectRequest(result=result))
            )
        else:
            self._undelivered.append(result)

    async def _cancel_commands(self) -> None:
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
