"""Live node streams: one current session per node, commands down, results up.

A node holds one ``NodeService.Connect`` stream. When it connects again (a new
TCP connection after a network blip, or a second process with the same
identity), the new stream *replaces* the old one: the old session is closed —
its stream ends — and the node's **generation** goes up. Every message carries
the generation of the session it arrived on, so a late heartbeat from a
replaced stream is recognised and ignored.

Commands are sent with :meth:`StreamRegistry.send_command`, which waits for the
node's ``CommandResult`` (matched by ``command_id``) or times out. A command for a node
whose stream another controller holds goes through :attr:`StreamRegistry.relay`
(:mod:`controller.nodes.relay`), when there is one.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from automator67.v1 import node_pb2

from controller.errors import DeadlineExceeded, FailedPrecondition, Unavailable
from controller.limits import MessageTooLarge, check_control_message
from controller.nodes.statements import StatementTexts

if TYPE_CHECKING:
    from controller.nodes.relay import CommandRelay

# Outbound messages a slow node may have queued before it is considered stuck.
MAX_OUTBOUND_QUEUE = 1000
# Smoothing of the stream's round-trip time (RFC 6298's SRTT gain): one slow ack moves
# the estimate by an eighth of the difference, so jitter does not reorder placements.
RTT_GAIN = 0.125
# Reported round-trip times above this (ms) are not believed (a stalled node, a bug).
MAX_RTT_MS = 60_000.0


def smoothed_rtt(previous: float | None, sample: float) -> float:
    """The stream's RTT estimate after ``sample`` (ms): the first sample as it is, then
    ``previous + RTT_GAIN * (sample - previous)``.

    >>> smoothed_rtt(None, 40.0), smoothed_rtt(40.0, 120.0)
    (40.0, 50.0)
    """
    if previous is None:
        return sample
    return previous + RTT_GAIN * (sample - previous)


@dataclass(eq=False)
class NodeSession:
    """One accepted stream of one node."""

    node_id: str
    user_id: str
    generation: int
    outbound: asyncio.Queue[node_pb2.ConnectResponse | None] = field(
        default_factory=lambda: asyncio.Queue(MAX_OUTBOUND_QUEUE)
    )
    pending: dict[str, asyncio.Future[node_pb2.CommandResult]] = field(default_factory=dict)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_reason: str = ""
    last_rtt_ms: float | None = None
    """The stream's smoothed heartbeat round-trip time in ms (see :meth:`record_rtt`);
    ``None`` until the node reported one."""
    endpoints_told: int = 0
    """The version of the controllers' node ports the node was last told (scale-out)."""
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while a message is written to the stream (one write in flight per call)."""

    def record_rtt(self, rtt_ms: float) -> bool:
        """Take a round-trip time the node measured on this stream (``Heartbeat.rtt_ms``).

        How it is measured, across clocks: the node notes its own monotonic time when it
        writes heartbeat *n* and again when it reads the ``heartbeat_ack`` with sequence
        *n* (the controller writes each ack as soon as it has read the heartbeat), and
        sends the difference in its next heartbeat. Both ends of the interval are on the
        node's clock, so skew between node and controller clocks does not enter it. A
        value that is not a finite number in ``[0, MAX_RTT_MS]`` is ignored (False).
        """
        if not (0.0 <= rtt_ms <= MAX_RTT_MS):  # also refuses NaN
            return False
        self.last_rtt_ms = smoothed_rtt(self.last_rtt_ms, float(rtt_ms))
        return True

    def send(self, message: node_pb2.ConnectResponse) -> None:
        """Queue a message for the node; ``Unavailable`` if the session is gone or stuck."""
        if self.closed.is_set():
            raise Unavailable(f"Node {self.node_id} is not connected", reason="NODE_NOT_CONNECTED")
        try:
            self.outbound.put_nowait(message)
        except asyncio.QueueFull as exc:
            raise Unavailable(
                f"Node {self.node_id} is not reading its stream", reason="NODE_STREAM_STUCK"
            ) from exc

    def close(self, reason: str) -> None:
        """End the stream (the writer sees the sentinel) and fail waiting commands."""
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        while True:  # make room for the sentinel even if the queue is full
            try:
                self.outbound.put_nowait(None)
                break
            except asyncio.QueueFull:
                self.outbound.get_nowait()
        for future in self.pending.values():
            if not future.done():
                future.set_exception(
                    Unavailable(f"Node {self.node_id} disconnected ({reason})", reason="NODE_DISCONNECTED")
                )
        self.pending.clear()

    def resolve(self, result: node_pb2.CommandResult) -> bool:
        """Deliver a command result; False if nobody waits for it."""
        future = self.pending.pop(result.command_id, None)
        if future is None or future.done():
            return False
        future.set_result(result)
        return True


class StreamRegistry:
    """The current session of every connected node."""

    def __init__(self) -> None:
        self._sessions: dict[str, NodeSession] = {}
        self._generations = itertools.count(1)
        self.statements = StatementTexts()
        """Long SQL texts of commands in flight (``NodeService.FetchStatement``)."""
        self.relay: CommandRelay | None = None
        """Where commands for nodes held by other controllers go (several controllers)."""

    def __len__(self) -> int:
        return len(self._sessions)

    def open(self, node_id: str, user_id: str) -> NodeSession:
        """Accept a new stream for ``node_id``, replacing (closing) any older one."""
        old = self._sessions.get(node_id)
        session = NodeSession(node_id=node_id, user_id=user_id, generation=next(self._generations))
        self._sessions[node_id] = session
        if old is not None:
            old.close("replaced by a newer connection")
        return session

    def is_current(self, session: NodeSession) -> bool:
        """Whether ``session`` is still the node's current one (stale ones are ignored)."""
        return self._sessions.get(session.node_id) is session

    def release(self, session: NodeSession, reason: str) -> bool:
        """Forget ``session`` when its stream ends; True if it was the current one."""
        session.close(reason)
        if self._sessions.get(session.node_id) is session:
            del self._sessions[session.node_id]
            return True
        return False

    def get(self, node_id: str) -> NodeSession | None:
        return self._sessions.get(node_id)

    def disconnect(self, node_id: str, reason: str) -> bool:
        """Close the node's stream, if it has one."""
        session = self._sessions.pop(node_id, None)
        if session is None:
            return False
        session.close(reason)
        return True

    def close_all(self, reason: str) -> None:
        for session in list(self._sessions.values()):
            session.close(reason)
        self._sessions.clear()

    async def send_command(
        self, node_id: str, command: node_pb2.NodeCommand, wait_seconds: float
    ) -> node_pb2.CommandResult:
        """Send ``command`` to the node and wait for its result: on its stream, if this
        controller holds it, else through the controller that does (:attr:`relay`)."""
        if node_id not in self._sessions and self.relay is not None:
            if not command.command_id:
                command.command_id = str(uuid.uuid4())
            with self.statements.offload(node_id, command):  # fetched from here (``reply_to``)
                return await self.relay.send(node_id, command, wait_seconds)
        return await self.send_local(node_id, command, wait_seconds)

    async def send_local(
        self, node_id: str, command: node_pb2.NodeCommand, wait_seconds: float
    ) -> node_pb2.CommandResult:
        """Send ``command`` on the node's stream held here and wait for its result."""
        session = self._sessions.get(node_id)
        if session is None:
            raise Unavailable(f"Node {node_id} is not connected", reason="NODE_NOT_CONNECTED")
        if not command.command_id:
            command.command_id = str(uuid.uuid4())
        with self.statements.offload(node_id, command):  # a long SQL text goes beside it
            message = node_pb2.ConnectResponse(command=command)
            try:  # refused here, with a clear error: gRPC would fail the whole stream instead
                check_control_message(message, f"Command {command.WhichOneof('kind')} for node {node_id}")
            except MessageTooLarge as exc:
                raise FailedPrecondition(str(exc), reason="CONTROL_MESSAGE_TOO_LARGE") from None
            future: asyncio.Future[node_pb2.CommandResult] = asyncio.get_running_loop().create_future()
            session.pending[command.command_id] = future
            try:
                session.send(message)
                return await asyncio.wait_for(future, wait_seconds)
            except TimeoutError as exc:
                raise DeadlineExceeded(
                    f"Node {node_id} did not answer command {command.command_id} within {wait_seconds:.1f} s",
                    reason="NODE_COMMAND_TIMEOUT",
                ) from exc
            finally:
                session.pending.pop(command.command_id, None)
