"""The agent's command handlers: one registry from a command kind to an async function.

A command arrives on the stream as a ``NodeCommand``; its kind is the name of the
field set in its ``kind`` oneof (``"deploy_replica"``, ``"stop_replica"``,
``"execute_shard_statement"``, and whatever later issues add to node.proto). The
agent looks the kind up in a :class:`CommandHandlers` and sends back the
``CommandResult`` the handler returns. Registering a handler is one line::

    handlers = CommandHandlers()

    @handlers.register("stop_replica")
    async def stop_replica(command: node_pb2.NodeCommand) -> node_pb2.CommandResult:
        request = command.stop_replica
        ...
        return ok_result(command, {"stopped": True})

    handlers.register("deploy_replica", deploy_replica)   # or without the decorator

Rules of :meth:`CommandHandlers.dispatch` (it never raises, except when cancelled):

* a kind with no handler, or a command with no kind set → ``ok=False`` and
  ``error_message="unsupported command <kind>"``;
* a handler that raises → ``ok=False`` with the exception's message;
* the result always carries the command's ``command_id``;
* every command counts as one request in the agent's :class:`RequestCounters`
  (``active_requests``, ``error_rate``, ``avg_response_time_ms`` of the heartbeats).

Handlers run as their own asyncio tasks, concurrently with each other and with the
heartbeats; a handler must therefore not block the event loop (run blocking work
with ``asyncio.to_thread``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

from automator67.v1 import node_pb2

from controller.agent.metrics import RequestCounters

log = logging.getLogger(__name__)

CommandHandler = Callable[[node_pb2.NodeCommand], Awaitable[node_pb2.CommandResult]]
"""An async function from a command to its result."""

H = TypeVar("H", bound=CommandHandler)

NO_KIND = "<none>"
"""The kind reported for a command whose ``kind`` oneof is not set."""


def command_kinds() -> frozenset[str]:
    """Every kind ``NodeCommand`` can carry: the fields of its ``kind`` oneof in node.proto."""
    oneof = node_pb2.NodeCommand.DESCRIPTOR.oneofs_by_name["kind"]
    return frozenset(f.name for f in oneof.fields)


def command_kind(command: node_pb2.NodeCommand) -> str:
    """The kind of ``command`` (the name of its set ``kind`` field), or :data:`NO_KIND`."""
    kind = command.WhichOneof("kind")
    return kind if kind is not None else NO_KIND


def ok_result(command: node_pb2.NodeCommand, payload: Any = None) -> node_pb2.CommandResult:
    """A successful result for ``command``; ``payload`` (if not None) is JSON-encoded,
    or sent as is when it is already ``bytes``."""
    result = node_pb2.CommandResult(command_id=command.command_id, ok=True)
    if payload is not None:
        result.payload = (
            payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode()
        )
    return result


def error_result(command: node_pb2.NodeCommand, message: str) -> node_pb2.CommandResult:
    """A failed result for ``command`` carrying ``message``."""
    return node_pb2.CommandResult(command_id=command.command_id, ok=False, error_message=message)


class CommandHandlers:
    """The registry of command handlers, by command kind."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._handlers: dict[str, CommandHandler] = {}
        self._clock = clock

    @overload
    def register(self, kind: str) -> Callable[[H], H]: ...

    @overload
    def register(self, kind: str, handler: H, *, replace: bool = False) -> H: ...

    def register(self, kind: str, handler: H | None = None, *, replace: bool = False) -> H | Callable[[H], H]:
        """Register ``handler`` for ``kind``; without ``handler``, a decorator that does.

        ``kind`` must be a field of ``NodeCommand.kind`` in node.proto (catching typos at
        start-up). Registering a kind twice is an error unless ``replace=True``.
        """
        if kind not in command_kinds():
            known = ", ".join(sorted(command_kinds()))
            raise ValueError(f"unknown command kind {kind!r} (node.proto NodeCommand.kind has: {known})")

        def add(fn: H) -> H:
            if kind in self._handlers and not replace:
                raise ValueError(f"a handler for {kind!r} is already registered")
            self._handlers[kind] = fn
            return fn

        return add(handler) if handler is not None else add

    def kinds(self) -> frozenset[str]:
        """The kinds that have a handler."""
        return frozenset(self._handlers)

    def __contains__(self, kind: object) -> bool:
        return kind in self._handlers

    def __len__(self) -> int:
        return len(self._handlers)

    async def dispatch(
        self, command: node_pb2.NodeCommand, counters: RequestCounters | None = None
    ) -> node_pb2.CommandResult:
        """Run the handler for ``command`` and return its result (see the module docstring)."""
        kind = command_kind(command)
        handler = self._handlers.get(kind)
        if handler is None:
            log.warning("command %s: unsupported command %s", command.command_id, kind)
            return error_result(command, f"unsupported command {kind}")
        start = self._clock()
        ok = False
        if counters is not None:
            counters.started()
        try:
            result = await handler(command)
            if not isinstance(result, node_pb2.CommandResult):
                log.error("command %s: the %s handler returned %s", command.command_id, kind, type(result))
                result = error_result(command, f"the {kind} handler returned no CommandResult")
            else:
                result.command_id = command.command_id
            ok = result.ok
        except Exception as exc:
            message = str(exc) or type(exc).__name__
            log.warning(
                "command %s (%s) failed: %s: %s", command.command_id, kind, type(exc).__name__, message
            )
            result = error_result(command, message)
        finally:
            if counters is not None:
                counters.finished(ok=ok, duration_s=self._clock() - start)
        return result
