"""The data path of shard results: rows pushed by agents over ``NodeService.PushShardResult``.

A shard statement is an ``execute_shard_statement`` command on the node's control stream
(small); its rows come back on a call of their own that the agent opens on the node
port (mutual TLS), keyed by the command id. Why the agent opens it (and not a fetch by
the controller, like ``FetchPackage``): the rows exist only on the agent, while its
statement runs; pushing them as they are fetched needs no buffer on the agent and lets
gRPC's flow control pace the statement itself.

:class:`ShardResults` pairs a call with the statement waiting for it
(:meth:`ShardResults.open` before the command is sent): the call's messages go into the
slot's bounded queue (:data:`QUEUE_BATCHES`), and the servicer reads the next message
only once the last one is queued, so a consumer that stops reading stops the agent
(HTTP/2 flow control) instead of growing the controller's memory. Closing the slot
(the query is done, failed or was cancelled) ends the call with ``CANCELLED``, which
interrupts the statement on the agent. A call for a command that is not waiting, or
from another node than the one the command went to, is refused (``NOT_FOUND``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, Generic, Protocol, TypeVar

from automator67.v1 import node_pb2

from controller.errors import FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger("a67.federation")

M = TypeVar("M")

QUEUE_BATCHES = 4
"""Batches (each at most about 256 KiB) queued per shard statement before the agent is paced
(``A67_SHARD_RESULT_QUEUE_BATCHES``)."""


_CLOSED = node_pb2.PushShardResultRequest(
    done=True,
    error_kind="unavailable",
    error_message="the shard's result stream was closed before its rows ended",
)


class QueuedSlot(Generic[M]):
    """Where the messages pushed for one command arrive: a bounded queue, and ``gone`` once
    the slot is closed. Shared by shard results and replicas' logs."""

    def __init__(self, command_id: str, node_id: str, queue_batches: int) -> None:
        self.command_id = command_id
        self.node_id = node_id
        self.queue: asyncio.Queue[M] = asyncio.Queue(queue_batches)
        self.attached = False
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._held: list[M] = []
        """A message taken off the queue by a :meth:`next` that was cancelled before it
        returned it: the next call returns it."""
        self._last: M | None = None
        """The message that ends a slot closed by :meth:`end` (returned after the queue)."""

    async def next(self) -> M | None:
        """The next message; None once the slot is closed and drained (after the final
        message given to :meth:`end`, if it was ended that way).

        A caller may cancel a pending call (to wait on something else) and call again
        without losing a message: one that arrived just as the call was cancelled is kept
        for the next. (Losing it would lose the failure that ends a read, and a reader
        waiting with no deadline would wait for ever.)
        """
        if self._held:
            return self._held.pop()
        if not self.queue.empty():
            return self.queue.get_nowait()
        if self.gone.done():
            return self._take_last()
        getter = asyncio.ensure_future(self.queue.get())
        try:
            waiters: set[asyncio.Future[Any]] = {getter, self.gone}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            if getter.done() and not getter.cancelled():
                self._held.append(getter.result())
            raise
        finally:
            if not getter.done():
                getter.cancel()  # a Queue.get cancelled before it returns leaves the item queued
        if getter.done() and not getter.cancelled():
            return getter.result()
        return self.queue.get_nowait() if not self.queue.empty() else self._take_last()

    def _take_last(self) -> M | None:
        last, self._last = self._last, None
        return last

    def close(self) -> None:
        if not self.gone.done():
            self.gone.set_result(None)

    def end(self, last: M) -> None:
        """Close the slot with ``last`` as its final message, after what is queued (for a
        call that broke while the queue was full)."""
        if not self.gone.done():
            self._last = last
        self.close()


class ResultSlot(QueuedSlot[node_pb2.PushShardResultRequest]):
    """Where the rows of one shard statement arrive."""

    def __init__(self, command_id: str, node_id: str, queue_batches: int = QUEUE_BATCHES) -> None:
        super().__init__(command_id, node_id, queue_batches)

    async def get(self) -> node_pb2.PushShardResultRequest:
        """The next batch; once the slot is closed and drained, an ``unavailable`` end.

        Never waits for ever: a slot closed while nothing is queued (the statement was
        cancelled, its transaction rolled back, its node's stream ended) answers at once.
        """
        message = await self.next()
        return _CLOSED if message is None else message


class PushedSlot(Protocol[M]):
    """What :class:`PushedSlots` needs of a slot."""

    command_id: str
    node_id: str
    queue: asyncio.Queue[M]
    attached: bool
    gone: asyncio.Future[None]

    def close(self) -> None: ...

    def end(self, last: M) -> None: ...


S = TypeVar("S", bound=PushedSlot[Any])


class PushedSlots(Generic[S, M]):
    """Requests waiting for what a node pushes on a call of its own, by command id: the
    pairing, flow control and cancellation shared by shard results and replicas' logs.

    A subclass names its call (:attr:`RPC`), what waits (:attr:`WHAT`), what arrives
    (:attr:`ITEMS`) and its reasons' prefix (:attr:`REASON`), makes its slots and the
    final message of a call that broke."""

    RPC = ""
    WHAT = ""
    ITEMS = ""
    REASON = ""
    ENDED_EARLY = ""
    """The failure when the node ends its call before the last message."""
    BROKE = ""
    """The failure when the call breaks (``{kind}``: the exception's type)."""

    def __init__(self, queue_batches: int) -> None:
        self._queue_batches = queue_batches
        self._slots: dict[str, S] = {}

    def _new_slot(self, command_id: str, node_id: str) -> S:
        raise NotImplementedError

    def _failure(self, message: str) -> M:
        raise NotImplementedError

    def _received(self, message: M) -> None:
        """Count what arrived (for diagnostics); nothing by default."""

    def open(self, command_id: str, node_id: str) -> S:
        slot = self._new_slot(command_id, node_id)
        self._slots[command_id] = slot
        return slot

    def close(self, slot: S) -> None:
        slot.close()
        if self._slots.get(slot.command_id) is slot:
            del self._slots[slot.command_id]

    def __len__(self) -> int:
        return len(self._slots)

    async def receive(self, node_id: str, requests: AsyncIterator[M]) -> bool:
        """Feed a call into its slot; ``False`` if the slot was closed before the node was
        done (the servicer then ends the call with ``CANCELLED``)."""
        iterator = aiter(requests)
        first = await anext(iterator, None)
        command_id = getattr(first, "command_id", "")
        if first is None or not command_id:
            raise InvalidArgument(f"{self.RPC} must start with the command id", reason="COMMAND_ID_EXPECTED")
        slot = self._slots.get(command_id)
        if slot is None or slot.node_id != node_id:
            raise NotFound(
                f"No {self.WHAT} {command_id!r} waits for {self.ITEMS} from this node (it ended or was cancelled)",
                reason=f"{self.REASON}_UNKNOWN",
            )
        if slot.attached:
            raise FailedPrecondition(
                f"The {self.ITEMS} of {command_id!r} are already arriving", reason=f"{self.REASON}_ATTACHED"
            )
        slot.attached = True
        pump = asyncio.ensure_future(self._pump(slot, iterator))
        try:
            waiters: set[asyncio.Future[Any]] = {pump, slot.gone}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not pump.done():
                pump.cancel()
            with contextlib.suppress(BaseException):
                await pump
            if pump.cancelled() and not slot.gone.done():
                # The call was cancelled under it (gRPC cancels the handler when the node goes
                # away mid-call, before or instead of its request iterator raising): the
                # reader, which waits for this call's items with no deadline, must hear of it.
                self._broke(slot, "CancelledError")
        return pump.done() and not pump.cancelled() and pump.result()

    def _broke(self, slot: S, kind: str) -> None:
        failure = self._failure(self.BROKE.format(kind=kind))
        try:
            slot.queue.put_nowait(failure)
        except asyncio.QueueFull:  # the reader is behind: it gets what is queued, then the end
            slot.end(failure)

    async def _pump(self, slot: S, iterator: AsyncIterator[M]) -> bool:
        try:
            async for message in iterator:
                self._received(message)
                await slot.queue.put(message)  # waits while the consumer is behind: flow control
                if getattr(message, "done", False):
                    return True
            failure = self.ENDED_EARLY
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the call broke (the agent died, the connection dropped)
            failure = self.BROKE.format(kind=type(exc).__name__)
        if not slot.gone.done():
            await slot.queue.put(self._failure(failure))
        return True


class ShardResults(PushedSlots[ResultSlot, node_pb2.PushShardResultRequest]):
    """The shard statements waiting for their rows, by command id."""

    RPC = "PushShardResult"
    WHAT = "shard statement"
    ITEMS = "rows"
    REASON = "SHARD_RESULT"
    ENDED_EARLY = "the node ended its result stream before the last rows"
    BROKE = "the node's result stream broke ({kind})"

    def __init__(self, queue_batches: int = QUEUE_BATCHES) -> None:
        super().__init__(queue_batches)
        self.received_rows = 0
        """Rows received from agents since the start (for tests and diagnostics)."""

    def _new_slot(self, command_id: str, node_id: str) -> ResultSlot:
        return ResultSlot(command_id, node_id, self._queue_batches)

    def _failure(self, message: str) -> node_pb2.PushShardResultRequest:
        return node_pb2.PushShardResultRequest(done=True, error_kind="unavailable", error_message=message)

    def _received(self, message: node_pb2.PushShardResultRequest) -> None:
        self.received_rows += message.row_count

    def paced(self) -> bool:
        """Every statement whose rows are arriving has a full queue: its agent is held back
        by flow control until the consumer reads again."""
        attached = [slot for slot in self._slots.values() if slot.attached]
        return bool(attached) and all(slot.queue.full() for slot in attached)
