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

The agent is made of parts, one module each: :mod:`~controller.agent.agent_config`
(configuration, keepalive, providers, endpoints), :mod:`~controller.agent.agent_enroll`
(enrollment), :mod:`~controller.agent.agent_session` (one stream: hello, heartbeats,
the outbox), :mod:`~controller.agent.agent_commands` (commands and their results) and
:mod:`~controller.agent.agent_node_port` (the node-port channels beside the stream:
packages, statements, shard results, storage); this module ties them into
:class:`Agent` and holds the stream up, reconnecting with backoff.

Keepalive: :func:`keepalive_options` are the client's channel settings;
:func:`server_keepalive_options` are what the controller's node-facing server must
accept (same numbers, plus the minimum ping interval it tolerates).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

import grpc
from automator67.v1 import common_pb2, node_pb2

from controller.agent.agent_commands import _MAX_UNDELIVERED_RESULTS
from controller.agent.agent_config import (
    AGENT_VERSION,
    DEFAULT_HEARTBEAT_INTERVAL_MS,
    DEFAULT_PROVIDER,
    EXIT_FAILURE,
    EXIT_OK,
    PROVIDERS,
    TARGET_NAME_OVERRIDE,
    AgentConfig,
    _describe,
    _sleep_unless_stopped,
    _StopRequested,
    default_endpoint,
    detect_provider,
    keepalive_options,
    provider_value,
    resolve_stream_endpoint,
    server_keepalive_options,
)
from controller.agent.agent_enroll import RETRYABLE_ENROLLMENT_CODES, EnrollmentRefused, _Enrollment
from controller.agent.agent_session import STABLE_CONNECTION_SECONDS, _Session, _SessionEnd, stayed_healthy
from controller.agent.handlers import CommandHandlers
from controller.agent.identity import Enrollment, Identity, IdentityError
from controller.agent.metrics import MetricsState

__all__ = [
    "AGENT_VERSION",
    "DEFAULT_HEARTBEAT_INTERVAL_MS",
    "DEFAULT_PROVIDER",
    "EXIT_FAILURE",
    "EXIT_OK",
    "PROVIDERS",
    "RETRYABLE_ENROLLMENT_CODES",
    "STABLE_CONNECTION_SECONDS",
    "TARGET_NAME_OVERRIDE",
    "Agent",
    "AgentConfig",
    "EnrollmentRefused",
    "default_endpoint",
    "detect_provider",
    "keepalive_options",
    "provider_value",
    "resolve_stream_endpoint",
    "server_keepalive_options",
    "stayed_healthy",
]

log = logging.getLogger("controller.agent")


# --------------------------------------------------------------------------- agent


class Agent(_Session, _Enrollment):
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
        self._elsewhere: dict[tuple[str, str], grpc.aio.Channel] = {}
        """Channels to other controllers' node ports (relayed commands' ``reply_to``)."""
        self._endpoints: list[str] = []
        """Every controller's node port as the last hello's answer listed them (the current
        one first): a connection that fails moves to the next (several controllers)."""
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
            for channel in self._elsewhere.values():
                await channel.close()
            self._elsewhere.clear()
        log.info("agent stopped (node %s)", enrollment.node_id)
        return EXIT_OK

    # ----------------------------------------------------------------- the stream

    async def _next_controller(self, enrollment: Enrollment) -> Enrollment:
        """The controller could not be reached: dial the next one the last hello's answer
        listed (several controllers sharing a store). The node-port channels of the old one
        are closed; those of the new one open on first use."""
        endpoints = self._endpoints
        current = enrollment.controller_endpoint
        following = (
            endpoints[(endpoints.index(current) + 1) % len(endpoints)]
            if current in endpoints
            else endpoints[0]
        )
        log.warning("controller %s cannot be reached: trying controller %s", current, following)
        enrollment = dataclasses.replace(enrollment, controller_endpoint=following)
        self._enrollment = enrollment
        for name in ("_bulk", "_data", "_storage"):
            channel = getattr(self, name)
            setattr(self, name, None)
            if channel is not None:
                await channel.close()
        return enrollment

    async def _stay_connected(self, enrollment: Enrollment, stop: asyncio.Event) -> None:
        backoff = self._backoff()
        tried: set[str] = set()
        """The controllers that could not be reached since the last accepted stream."""
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
            failed = enrollment
            if end.acked:
                tried.clear()
            elif len(self._endpoints) > 1:
                # another controller shares the store: dial it, at the base delay the first
                # time in this outage (the grown backoff is for controllers tried already)
                tried.add(failed.controller_endpoint)
                enrollment = await self._next_controller(enrollment)
                if enrollment.controller_endpoint not in tried:
                    delay = min(delay, self._backoff().next_delay())
            if end.acked:
                log.warning(
                    "disconnected from %s after %.1fs: %s; reconnecting in %.2fs",
                    failed.controller_endpoint,
                    end.lasted_s,
                    end.reason,
                    delay,
                )
            else:
                log.warning(
                    "could not connect to %s: %s; retrying in %.2fs (attempt %d)",
                    failed.controller_endpoint,
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
