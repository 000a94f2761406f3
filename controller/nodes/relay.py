"""Commands for nodes whose streams another controller holds: relayed over Redis pub/sub.

A node holds one stream, to one controller; with several controllers sharing a store,
the controller that needs to command a node (it served the user's call, or its
reconciler decided) is often not that one. The store says who holds each node's stream
(``nodes.stream_holder``, written by the holder when the stream opens and closes: see
:meth:`controller.nodes.fleet.Fleet.stream_connected`), and every controller listens on a
Redis channel of its own, ``a67:relay:<controller id>``:

* the asking controller publishes a *call* (the command, serialized; how long to wait;
  where to answer) on the holder's channel. ``PUBLISH`` answers how many subscribers got
  it: none means the holder is not listening (dead, or cut off from Redis), which is
  reported at once instead of after a timeout;
* the holder sends the command on the node's stream
  (:meth:`~controller.nodes.sessions.StreamRegistry.send_command`, as for its own calls)
  and publishes the node's ``CommandResult``, or the error, on the asker's channel;
* the asker waits at most the command's own wait plus :data:`RELAY_MARGIN_SECONDS`.

Why Redis pub/sub and not PostgreSQL ``LISTEN/NOTIFY``: a command is small and
latency-bound (a round trip of Redis adds well under a millisecond), ``NOTIFY`` payloads
are capped at 8,000 bytes and every notification goes through PostgreSQL's single
notification queue and WAL-ordered commit path, which is the store's critical resource;
Redis is already required for several controllers (revocations, caches). Pub/sub is
fire-and-forget, which suits a request with its own timeout: a lost call or answer is a
timeout that the caller handles like a node that did not answer (deployments retry
elsewhere, queries fail over to a replica).

Errors keep their gRPC code, reason and message across the relay. A node that no
controller holds is ``UNAVAILABLE`` (``NODE_NOT_CONNECTED``).

What is relayed is the command and its result. The calls a command makes on the node
port — its rows (``PushShardResult``), log lines (``PushReplicaLogs``), chunks
(``FetchChunk``/``PushChunk``), a long statement's text (``FetchStatement``, held by the
asker), its package (``FetchPackage``) — go to the asker directly: a relayed command
carries the asker's node port in ``reply_to``, and the node opens those calls there
(controller/agent/agent_node_port.py). Every controller's node port must therefore be
reachable by the nodes, as the stream's is.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from automator67.v1 import node_pb2
from redis.asyncio import Redis
from redis.exceptions import RedisError

from controller.errors import ControllerError, DeadlineExceeded, Internal, Unavailable

log = logging.getLogger("a67.nodes")

CHANNEL = "a67:relay:"
"""Each controller's channel: this prefix and its id (after the cache's key prefix)."""

HOLDER_SECONDS = 2.0
"""How long the asker keeps a node's holder as read from the store. An answer that the
holder has no stream for the node, or no holder listening, drops it at once."""

RELAY_MARGIN_SECONDS = 2.0
"""How much longer than the command's own wait the asker waits for the holder's answer."""

MAX_HOLDERS_KEPT = 100_000
"""Nodes whose holder is kept at most (past it, all are forgotten at once)."""

FORGET_HOLDER_ON = frozenset({"NODE_NOT_CONNECTED", "NODE_HOLDER_GONE", "NODE_DISCONNECTED", "RELAY_TIMEOUT"})
"""Reasons of a relayed command's failure that say the kept holder may be wrong."""

RECONNECT_SECONDS = 1.0
SOCKET_TIMEOUT_SECONDS = 3.0

HolderOf = Callable[[str], Awaitable[str | None]]
"""The controller holding a node's stream, from the store (None: no controller does)."""

Local = Callable[[str, node_pb2.NodeCommand, float], Awaitable[node_pb2.CommandResult]]
"""Sends a command on a stream this controller holds (``StreamRegistry.send_command``)."""

_ERRORS: dict[str, type[ControllerError]] = {}


def _error_class(code: str) -> type[ControllerError]:
    if not _ERRORS:
        stack: list[type[ControllerError]] = [ControllerError]
        while stack:
            cls = stack.pop()
            _ERRORS.setdefault(cls.code.name, cls)
            stack.extend(cls.__subclasses__())
    return _ERRORS.get(code, Internal)


def encode_error(exc: BaseException) -> dict[str, Any]:
    """An error as the holder sends it back (a ControllerError keeps its code and reason)."""
    if isinstance(exc, ControllerError):
        return {"code": exc.code.name, "reason": exc.reason, "message": exc.message}
    return {"code": "INTERNAL", "reason": "RELAY_FAILED", "message": f"relaying failed: {type(exc).__name__}"}


def decode_error(payload: dict[str, Any]) -> ControllerError:
    """The error an asker raises for ``payload`` (see :func:`encode_error`).

    >>> e = decode_error(encode_error(Unavailable("Node n is not connected", reason="NODE_NOT_CONNECTED")))
    >>> type(e).__name__, e.reason, e.message
    ('Unavailable', 'NODE_NOT_CONNECTED', 'Node n is not connected')
    """
    cls = _error_class(str(payload.get("code", "INTERNAL")))
    return cls(str(payload.get("message", "")), reason=str(payload.get("reason") or cls.default_reason))


class CommandRelay:
    """This controller's end of the relay (see the module docstring)."""

    def __init__(
        self,
        url: str,
        controller_id: str,
        local: Local,
        holder_of: HolderOf,
        *,
        key_prefix: str = "",
        margin_seconds: float = RELAY_MARGIN_SECONDS,
        reply_to: str = "",
        holder_seconds: float = HOLDER_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.controller_id = controller_id
        self.reply_to = reply_to
        """This controller's node port as nodes dial it: where relayed commands' calls come."""
        self._url = url
        self._local = local
        self._holder_of = holder_of
        self._prefix = key_prefix + CHANNEL
        self._margin = margin_seconds
        self._holder_seconds = holder_seconds
        self._clock = clock
        self._holders: dict[str, tuple[str | None, float]] = {}
        """Per node: its holder as last read, and until when it is trusted."""
        self._waiting: dict[str, asyncio.Future[node_pb2.CommandResult]] = {}
        self._publisher: Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._calls: set[asyncio.Task[None]] = set()
        self.relayed = 0
        """Commands this controller sent through another (for tests and operators)."""
        self.served = 0
        """Commands other controllers sent through this one."""

    def channel(self, controller_id: str) -> str:
        return self._prefix + controller_id

    def _client(self) -> Redis:
        return Redis.from_url(
            self._url, socket_timeout=SOCKET_TIMEOUT_SECONDS, socket_connect_timeout=SOCKET_TIMEOUT_SECONDS
        )

    def start(self) -> None:
        """Listen on this controller's channel (from now on, and again after Redis outages)."""
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="a67-command-relay")

    async def listening(self) -> None:
        """Until this controller listens (for tests and start-up)."""
        self.start()
        await self._subscribed.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for task in list(self._calls):
            task.cancel()
        await asyncio.gather(*self._calls, return_exceptions=True)
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(Unavailable("This controller is stopping", reason="CONTROLLER_STOPPING"))
        if self._publisher is not None:
            with contextlib.suppress(Exception):
                await self._publisher.aclose()
            self._publisher = None

    # -- asking ---------------------------------------------------------------------------

    async def send(
        self, node_id: str, command: node_pb2.NodeCommand, wait_seconds: float
    ) -> node_pb2.CommandResult:
        """Send ``command`` to ``node_id`` through the controller holding its stream."""
        holder = await self._holder(node_id)
        try:
            return await self._send(node_id, holder, command, wait_seconds)
        except ControllerError as exc:
            if exc.reason in FORGET_HOLDER_ON:
                self._holders.pop(node_id, None)  # the node moved, or its holder is gone: read again
            raise

    async def _holder(self, node_id: str) -> str | None:
        """The controller holding the node's stream (kept :data:`HOLDER_SECONDS`)."""
        now = self._clock()
        kept = self._holders.get(node_id)
        if kept is not None and kept[1] > now:
            return kept[0]
        try:
            holder = await self._holder_of(node_id)
        except ControllerError:
            raise
        except Exception as exc:
            raise Unavailable(
                f"Node {node_id}: where its stream is held cannot be read ({type(exc).__name__})",
                reason="NODE_HOLDER_UNKNOWN",
            ) from exc
        if len(self._holders) >= MAX_HOLDERS_KEPT:
            self._holders.clear()
        self._holders[node_id] = (holder, now + self._holder_seconds)
        return holder

    async def _send(
        self, node_id: str, holder: str | None, command: node_pb2.NodeCommand, wait_seconds: float
    ) -> node_pb2.CommandResult:
        if holder is None or holder == self.controller_id:
            # None: no controller holds it. This one: the store is behind (the stream just
            # ended here, or its opening is not written yet): the node is not connected here.
            raise Unavailable(
                f"Node {node_id} is not connected to any controller", reason="NODE_NOT_CONNECTED"
            )
        if self.reply_to:
            command.reply_to = self.reply_to
        request_id = uuid.uuid4().hex
        future: asyncio.Future[node_pb2.CommandResult] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        call = {
            "kind": "call",
            "id": request_id,
            "reply": self.channel(self.controller_id),
            "node": node_id,
            "wait": wait_seconds,
            "command": base64.b64encode(command.SerializeToString()).decode(),
        }
        try:
            try:
                if self._publisher is None:
                    self._publisher = self._client()
                receivers = await self._publisher.publish(self.channel(holder), json.dumps(call))
            except (RedisError, OSError) as exc:
                raise Unavailable(
                    f"Node {node_id}'s stream is held by controller {holder}, which cannot be reached: "
                    f"Redis is unavailable ({type(exc).__name__})",
                    reason="RELAY_UNAVAILABLE",
                ) from exc
            if not receivers:
                raise Unavailable(
                    f"Node {node_id}'s stream is held by controller {holder}, which is not listening "
                    "(stopped or cut off); the node reconnects to another controller",
                    reason="NODE_HOLDER_GONE",
                )
            self.relayed += 1
            try:
                return await asyncio.wait_for(future, wait_seconds + self._margin)
            except TimeoutError as exc:
                raise DeadlineExceeded(
                    f"Controller {holder}, holding node {node_id}'s stream, did not answer command "
                    f"{command.command_id} within {wait_seconds + self._margin:.1f} s",
                    reason="RELAY_TIMEOUT",
                ) from exc
        finally:
            self._waiting.pop(request_id, None)

    # -- listening --------------------------------------------------------------------------

    async def _listen(self) -> None:
        warned = False
        while True:
            client = self._client()
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel(self.controller_id))
                self._subscribed.set()
                if warned:
                    log.info("command relay: listening again")
                    warned = False
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._received(message.get("data"))
            except (RedisError, OSError) as exc:
                if not warned:
                    log.warning(
                        "command relay: lost Redis (%s); commands for nodes held by other "
                        "controllers fail until it is back",
                        type(exc).__name__,
                    )
                    warned = True
            finally:
                self._subscribed.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(RECONNECT_SECONDS)

    def _received(self, data: Any) -> None:
        try:
            message = json.loads(data)
            kind = message["kind"]
        except (ValueError, KeyError, TypeError):
            log.warning("command relay: ignored a malformed message")
            return
        if kind == "call":
            task = asyncio.create_task(self._serve(message))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)
            return
        future = self._waiting.get(str(message.get("id")))
        if future is None or future.done():
            return  # the asker gave up (timeout) before the answer came
        if kind == "result":
            result = node_pb2.CommandResult()
            result.ParseFromString(base64.b64decode(message["result"]))
            future.set_result(result)
        else:
            future.set_exception(decode_error(message.get("error") or {}))

    async def _serve(self, call: dict[str, Any]) -> None:
        """Send a call's command on the node's stream held here; answer the asker."""
        answer: dict[str, Any] = {"id": call.get("id")}
        try:
            command = node_pb2.NodeCommand()
            command.ParseFromString(base64.b64decode(call["command"]))
            self.served += 1
            result = await self._local(str(call["node"]), command, float(call["wait"]))
            answer |= {"kind": "result", "result": base64.b64encode(result.SerializeToString()).decode()}
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            answer |= {"kind": "error", "error": encode_error(exc)}
        try:
            if self._publisher is None:
                self._publisher = self._client()
            await self._publisher.publish(str(call["reply"]), json.dumps(answer))
        except (RedisError, OSError, KeyError) as exc:
            log.warning("command relay: could not answer a relayed command (%s)", type(exc).__name__)


__all__ = ["CHANNEL", "CommandRelay", "decode_error", "encode_error"]
