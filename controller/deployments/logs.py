"""App logs: ``DeploymentService.GetReplicaLogs`` over the data path.

The agents keep each replica's output in size-capped, rotated files
(:mod:`controller.agent.replica_process`). To read them the controller sends each node
that runs one of the deployment's replicas a small ``read_replica_logs`` command on its
node stream; the node pushes the lines on ``NodeService.PushReplicaLogs`` (node port,
mutual TLS), a call of its own keyed by the command id — the pattern of shard results
(:mod:`controller.federation.results`), so that log bytes never ride the node stream,
whose messages stay under 256 KiB (:mod:`controller.limits`).

:class:`ReplicaLogSlots` pairs such a call with the request waiting for it: a call for a
command nobody waits for, or from another node than the one the command went to, is
refused (``NOT_FOUND``). Each slot's queue is bounded (:data:`QUEUE_BATCHES`), so a
client that reads slowly holds the agent back (HTTP/2 flow control). When the client
cancels (or a non-follow read has everything) the slots are closed, which ends the
agents' calls with ``CANCELLED``: that is how a followed log stops on the agent.

A followed log follows the replicas, not the nodes: every :data:`MOVE_CHECK_SECONDS` the
stream reads the deployment's placement again and :func:`reads_to_start` decides which
replicas need a read of their own — one that moved to another node (its node failed and
recovery placed it elsewhere, a drain, an update), one placed or added after the call
started, one started again on a node whose read had ended. Like ``nomad alloc logs -f``
and ``kubectl logs -f`` users expect, the stream goes on with the replica's new output
(batches then name the new ``node_id`` and ``generation``) instead of ending.

Lines are scrubbed twice, as error messages are: on the agent (the replica's secret env
values and :func:`controller.redact.redact`) and here again (``redact``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from automator67.v1 import deployment_pb2, node_pb2

from controller.agent.replica_logs import LINE_CHARS, MAX_TAIL_LINES
from controller.deployments.harness_index import view_of
from controller.deployments.records import SERVING, Replica
from controller.errors import ControllerError, FieldViolation, InvalidArgument, NotFound
from controller.federation.results import PushedSlots, QueuedSlot
from controller.nodes.sessions import StreamRegistry
from controller.redact import redact
from controller.store.models import Deployment

log = logging.getLogger("a67.deployments")

QUEUE_BATCHES = 8
"""Batches (each at most about 128 KiB of text) queued per node before its agent is paced."""

COMMAND_SECONDS = 15.0
"""How long a node has to start pushing the lines it was asked for."""

FOLLOW_COMMAND_SECONDS = 7 * 24 * 3600.0
"""How long the controller waits for a followed read's command result (the call ends first)."""

MOVE_CHECK_SECONDS = 1.0
"""How often a followed log reads the deployment's placement again, to follow replicas that
moved or were added (one small store read per followed stream; a move itself takes a
mass-failure window and a rollout, seconds)."""

AGAIN = "; the follow goes on once the replica runs again (on this node or another)"
"""Added to a followed replica's read error: a follow that tracks placement is not over."""

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_since(text: str, now: datetime | None = None) -> datetime | None:
    """``since`` of a request: a duration back from ``now`` (``90s``, ``10m``, ``2h``,
    ``1d``, ``1h30m``) or an RFC 3339 time; None if empty; ``INVALID_ARGUMENT`` otherwise."""
    text = text.strip()
    if not text:
        return None
    now = now or datetime.now(UTC)
    total = 0.0
    rest = text
    while rest:
        match = _DURATION_PART.match(rest)
        if match is None:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        rest = rest[match.end() :]
    if not rest and total <= 10 * 365 * 86400:
        return now - timedelta(seconds=total)
    with contextlib.suppress(ValueError):
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            raise ValueError("no time zone")
        return moment.astimezone(UTC)
    raise InvalidArgument(
        "Invalid request",
        field_violations=[
            FieldViolation(
                "since", 'must be a duration such as "10m", "90s", "2h" or an RFC 3339 time with a time zone'
            )
        ],
    )


@dataclass(frozen=True)
class Followed:
    """Where a followed replica's log is being read."""

    node_id: str
    generation: int
    """The newest generation whose lines arrived (or the one the read started with)."""
    reading: bool
    """False once the read on ``node_id`` ended (its node went away, or it failed)."""


def reads_to_start(
    followed: Mapping[int, Followed], replicas: Iterable[Replica], only: int | None = None
) -> dict[str, list[int]]:
    """The new reads a followed log needs, by node: for each serving replica (``only`` that
    index, if given) that is not followed yet, moved to another node, or was started again
    (a new generation) on a node whose read has ended. A replica that is not serving yet
    (pending, starting) waits for the next check: its agent does not have it yet.

    >>> from controller.deployments.records import ReplicaStatus as S
    >>> now = [Replica(0, "b", 5, S.RUNNING), Replica(1, "a", 2, S.RUNNING), Replica(2, "c", 1, S.STARTING)]
    >>> reads_to_start({0: Followed("a", 3, False), 1: Followed("a", 2, True)}, now)
    {'b': [0]}
    >>> reads_to_start({1: Followed("a", 1, False)}, now, only=1)
    {'a': [1]}
    >>> reads_to_start({1: Followed("a", 2, False)}, now, only=1)
    {}
    """
    wanted: dict[str, list[int]] = {}
    for r in replicas:
        if (only is not None and r.replica_index != only) or not r.node_id or r.status not in SERVING:
            continue
        seen = followed.get(r.replica_index)
        if (
            seen is None
            or seen.node_id != r.node_id
            or (not seen.reading and r.generation != seen.generation)
        ):
            wanted.setdefault(r.node_id, []).append(r.replica_index)
    return {node: sorted(indexes) for node, indexes in sorted(wanted.items())}


class LogSlot(QueuedSlot[node_pb2.PushReplicaLogsRequest]):
    """Where the lines pushed for one ``read_replica_logs`` command arrive."""

    def __init__(self, command_id: str, node_id: str, queue_batches: int = QUEUE_BATCHES) -> None:
        super().__init__(command_id, node_id, queue_batches)


class ReplicaLogSlots(PushedSlots[LogSlot, node_pb2.PushReplicaLogsRequest]):
    """The log reads waiting for their lines, by command id (the pairing, flow control and
    cancellation of :class:`~controller.federation.results.PushedSlots`)."""

    RPC = "PushReplicaLogs"
    WHAT = "log read"
    ITEMS = "lines"
    REASON = "REPLICA_LOGS"
    ENDED_EARLY = "the node ended its log stream early"
    BROKE = "the node's log stream broke ({kind})"

    def __init__(self, queue_batches: int = QUEUE_BATCHES) -> None:
        super().__init__(queue_batches)

    def _new_slot(self, command_id: str, node_id: str) -> LogSlot:
        return LogSlot(command_id, node_id, self._queue_batches)

    def _failure(self, message: str) -> node_pb2.PushReplicaLogsRequest:
        return node_pb2.PushReplicaLogsRequest(done=True, error_message=message)


class ReplicaLogs:
    """Reads deployments' logs from their nodes (see the module docstring)."""

    def __init__(
        self,
        streams: StreamRegistry,
        slots: ReplicaLogSlots | None = None,
        *,
        command_seconds: float = COMMAND_SECONDS,
        move_check_seconds: float = MOVE_CHECK_SECONDS,
    ) -> None:
        self.streams = streams
        self.slots = slots if slots is not None else ReplicaLogSlots()
        self.command_seconds = command_seconds
        self.move_check_seconds = move_check_seconds

    async def stream(
        self,
        row: Deployment,
        request: deployment_pb2.GetReplicaLogsRequest,
        placement: Callable[[], Awaitable[Deployment | None]] | None = None,
    ) -> AsyncIterator[deployment_pb2.GetReplicaLogsResponse]:
        """The lines of ``row``'s replicas (the caller checked it is theirs). With
        ``request.follow`` and ``placement`` (the deployment as stored now; None once it is
        deleted) the follow goes after replicas that move (see the module docstring)."""
        if not 0 <= request.tail_lines <= MAX_TAIL_LINES:
            raise InvalidArgument(
                "Invalid request",
                field_violations=[FieldViolation("tail_lines", f"must be between 0 and {MAX_TAIL_LINES}")],
            )
        since = parse_since(request.since)
        only = request.replica_index if request.HasField("replica_index") else None
        replicas = [r for r in view_of(row).replicas if only is None or r.replica_index == only]
        if only is not None and not replicas:
            raise NotFound(f"Deployment {row.id!r} has no replica {only}", reason="REPLICA_NOT_FOUND")
        tracking = request.follow and placement is not None
        by_node: dict[str, set[int]] = {}
        unplaced: list[int] = []
        for r in replicas:
            if r.node_id:
                by_node.setdefault(r.node_id, set()).add(r.replica_index)
            else:
                unplaced.append(r.replica_index)
        for index in sorted(set(unplaced)):
            message = "the replica is not placed on a node yet"
            yield deployment_pb2.GetReplicaLogsResponse(
                replica_index=index, error_message=message + (AGAIN if tracking else "")
            )
        out: asyncio.Queue[Any] = asyncio.Queue(QUEUE_BATCHES)
        tasks: dict[asyncio.Task[None], str] = {}
        following: dict[int, tuple[str, int, asyncio.Task[None]]] = {}
        """Per replica index: the node its log is read on, the newest generation seen, the read."""

        def start(node_id: str, indexes: list[int], tail_lines: int, generations: Mapping[int, int]) -> None:
            task = asyncio.create_task(self._node(node_id, indexes, row.id, since, request, out, tail_lines))
            tasks[task] = node_id
            for index in indexes:
                following[index] = (node_id, generations.get(index, 0), task)

        generations = {r.replica_index: r.generation for r in replicas}
        for node_id, indexes in sorted(by_node.items()):
            start(node_id, sorted(indexes), request.tail_lines, generations)
        loop = asyncio.get_running_loop()
        next_check = loop.time() + self.move_check_seconds
        try:
            while True:
                running = [t for t in tasks if not t.done()]
                if not tracking and not running and out.empty():
                    break
                getter = asyncio.ensure_future(out.get())
                timeout = max(0.0, next_check - loop.time()) if tracking else None
                await asyncio.wait({getter, *running}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await getter
                if getter.done() and not getter.cancelled():
                    response: deployment_pb2.GetReplicaLogsResponse = getter.result()
                    seen = following.get(response.replica_index)
                    if seen is not None and seen[0] == response.node_id and response.lines:
                        following[response.replica_index] = (seen[0], response.generation, seen[2])
                    if tracking and response.error_message:
                        response.error_message += AGAIN
                    yield response
                for task in [t for t in tasks if t.done()]:
                    del tasks[task]
                if tracking and loop.time() >= next_check:
                    assert placement is not None
                    next_check = loop.time() + self.move_check_seconds
                    try:
                        fresh = await placement()
                    except Exception as exc:  # a store hiccup: look again next time
                        log.info("logs of %s: placement not read (%s)", row.id, type(exc).__name__)
                        continue
                    if fresh is None:
                        break  # deleted: nothing more will be written
                    now = view_of(fresh).replicas
                    snapshot = {
                        index: Followed(node, generation, not read.done())
                        for index, (node, generation, read) in following.items()
                    }
                    wanted = reads_to_start(snapshot, now, only)
                    if wanted:
                        log.info("logs of %s: following %s on their new nodes", row.id, wanted)
                    current = {r.replica_index: r.generation for r in now}
                    for target, moved in wanted.items():
                        start(target, moved, MAX_TAIL_LINES, current)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _node(
        self,
        node_id: str,
        indexes: list[int],
        deployment_id: str,
        since: datetime | None,
        request: deployment_pb2.GetReplicaLogsRequest,
        out: asyncio.Queue[Any],
        tail_lines: int,
    ) -> None:
        """Ask one node for the lines of its replicas ``indexes`` (the last ``tail_lines``
        of each) and put them into ``out``."""
        command = node_pb2.NodeCommand(
            command_id=str(uuid.uuid4()),
            read_replica_logs=node_pb2.ReadReplicaLogs(
                deployment_id=deployment_id,
                replica_indexes=indexes,
                tail_lines=tail_lines,
                follow=request.follow,
            ),
        )
        if since is not None:
            command.read_replica_logs.since.FromDatetime(since)
        slot = self.slots.open(command.command_id, node_id)
        wait = FOLLOW_COMMAND_SECONDS if request.follow else self.command_seconds + 60
        sent = asyncio.ensure_future(self.streams.send_command(node_id, command, wait))

        async def fail(message: str) -> None:
            for index in indexes:
                await out.put(
                    deployment_pb2.GetReplicaLogsResponse(
                        replica_index=index, node_id=node_id, error_message=message
                    )
                )

        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.command_seconds
            while True:
                getter = asyncio.ensure_future(slot.next())
                waiting: set[asyncio.Future[Any]] = {getter}
                if not sent.done():
                    waiting.add(sent)
                timeout = None if slot.attached else max(0.0, deadline - loop.time())
                await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await getter
                    if slot.attached:
                        continue  # the command ended while its lines are still arriving
                    if sent.done():
                        await fail(_command_failure(node_id, sent))
                    else:
                        await fail(f"node {node_id} did not answer in time")
                    return
                message = getter.result()
                if message is None or message.done:
                    if message is not None and message.error_message:
                        await fail(redact(message.error_message, LINE_CHARS))
                    return
                if message.command_id:
                    continue  # the header: the lines follow
                await out.put(_response(node_id, message))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never let one node end the others' lines
            log.warning("logs of %s from node %s: %s", deployment_id, node_id, exc)
            await fail(f"node {node_id}: {type(exc).__name__}")
        finally:
            self.slots.close(slot)  # ends the node's call (CANCELLED): a followed log stops there
            if not sent.done():
                sent.cancel()
            with contextlib.suppress(BaseException):
                await sent


def _command_failure(node_id: str, sent: asyncio.Future[node_pb2.CommandResult]) -> str:
    if sent.cancelled():
        return f"node {node_id} did not answer"
    exc = sent.exception()
    if isinstance(exc, ControllerError):
        return exc.message
    if exc is not None:
        return f"node {node_id}: {type(exc).__name__}"
    result = sent.result()
    if not result.ok:
        return f"node {node_id} cannot read the logs: {redact(result.error_message, LINE_CHARS)}"
    return f"node {node_id} sent no lines"


def _response(
    node_id: str, message: node_pb2.PushReplicaLogsRequest
) -> deployment_pb2.GetReplicaLogsResponse:
    response = deployment_pb2.GetReplicaLogsResponse(
        replica_index=message.replica_index,
        node_id=node_id,
        generation=message.generation,
        error_message=redact(message.error_message, LINE_CHARS) if message.error_message else "",
    )
    for line in message.lines:
        added = response.lines.add(text=redact(line.text, LINE_CHARS))
        if line.HasField("time"):
            added.time.CopyFrom(line.time)
    return response
