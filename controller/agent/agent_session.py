"""One node stream (``NodeService.Connect``), from dialing to its end: the hello and its
ack, heartbeats every interval (their round-trip time measured by the acks), commands
in and results out through a priority outbox (heartbeats first), and how the stream
ended (:class:`_SessionEnd`, :func:`stayed_healthy`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import grpc
from automator67.v1 import common_pb2, node_pb2, node_pb2_grpc

from controller.agent.agent_commands import _PRIORITY_HEARTBEAT, _Commands
from controller.agent.agent_config import AGENT_VERSION, _describe, _StopRequested, _unless_stopped
from controller.agent.agent_node_port import _NodePort
from controller.agent.identity import Enrollment
from controller.agent.metrics import collect_metrics
from controller.limits import MessageTooLarge, check_control_message

log = logging.getLogger("controller.agent")

_MAX_PENDING_ACKS = 64


class _ProtocolError(Exception):
    """The controller broke the stream protocol (e.g. no hello_ack first)."""


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


class _Session(_Commands, _NodePort):
    """Holding one node stream."""

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
        if ack.controller_endpoints:  # several controllers: where to go if this one goes away
            self._set_endpoints([endpoint, *ack.controller_endpoints])
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
        if ack.controller_endpoints:  # the controllers serving the store changed
            self._set_endpoints(list(ack.controller_endpoints))

    def _set_endpoints(self, endpoints: list[str]) -> None:
        """The controllers' node ports the controller listed (this one's first)."""
        endpoints = list(dict.fromkeys(endpoints))
        if endpoints != self._endpoints:
            self._endpoints = endpoints
            log.info("controllers: %s", ", ".join(endpoints))

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
