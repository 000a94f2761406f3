"""Chunk bytes in flight between the controller and its nodes.

The controller never dials a node: to store a chunk it registers the sealed bytes as an
**outgoing** transfer and sends ``StoreChunk`` on the node stream; the node pulls them
with ``NodeService.FetchChunk(transfer_id)``. To read one it registers an **incoming**
transfer and sends ``ReadChunk``; the node pushes the bytes with
``NodeService.PushChunk``. A transfer id is random (128 bits) and bound to one node:
another node presenting it gets ``PERMISSION_DENIED``, as for an unknown id.

The copies of one chunk share one :class:`Payload`: the sealed bytes and the messages
made of them are built once and served to every target. They are already serialized
``FetchChunkResponse`` messages: the node port's FetchChunk sends them as they are
(``controller.api.storage_servicer.raw_storage_messages``), so a copy costs no protobuf
build or serialization of its bytes.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from controller.errors import InvalidArgument, PermissionDenied

PIECE_BYTES = 4 * 1024 * 1024
"""Bytes per FetchChunk message (the agent's storage channel accepts them:
``controller.agent.chunks.STORAGE_MESSAGE_BYTES``): a default chunk in one message. Against
1 MiB messages, about 7 % less CPU per upload over every process (mostly the agents', per
message and system time), for a few MiB more held by gRPC (tests/bench/bench_storage.py)."""

M = TypeVar("M")


class Payload(Generic[M]):
    """The sealed bytes of one chunk, offered to one or more nodes: the messages that
    carry them are made at once (from a buffer the caller may reuse right after) and
    shared by every transfer.

    ``make`` gets a view of each piece (at most :data:`PIECE_BYTES`) of ``sealed`` and
    must return a message that owns its bytes (the buffer is reused as soon as the
    payload is made): the storage service makes serialized ``FetchChunkResponse`` bytes
    with one copy (see ``fetch_message`` there)."""

    def __init__(self, sealed: bytes | memoryview, make: Callable[[memoryview], M]) -> None:
        self.size = len(sealed)
        view = memoryview(sealed)
        pieces = [view[p : p + PIECE_BYTES] for p in range(0, len(view), PIECE_BYTES)]
        self.messages: list[M] = [make(piece) for piece in pieces or [view]]


@dataclass
class _Outgoing:
    node_id: str
    payload: Payload[object]


@dataclass
class _Incoming:
    node_id: str
    max_bytes: int
    result: asyncio.Future[bytes] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class ChunkMissing(Exception):
    """The node has no good copy of the chunk (it said so)."""


def _unknown() -> PermissionDenied:
    return PermissionDenied("No such chunk transfer for this node", reason="CHUNK_TRANSFER_UNKNOWN")


class Transfers:
    """The transfers in flight, by id (one controller process)."""

    def __init__(self) -> None:
        self._outgoing: dict[str, _Outgoing] = {}
        self._incoming: dict[str, _Incoming] = {}

    def __len__(self) -> int:
        return len(self._outgoing) + len(self._incoming)

    def offer(self, node_id: str, payload: Payload[M]) -> str:
        transfer_id = secrets.token_hex(16)
        self._outgoing[transfer_id] = _Outgoing(node_id, payload)  # type: ignore[arg-type]
        return transfer_id

    def expect(self, node_id: str, max_bytes: int) -> tuple[str, asyncio.Future[bytes]]:
        transfer_id = secrets.token_hex(16)
        incoming = _Incoming(node_id, max_bytes)
        self._incoming[transfer_id] = incoming
        return transfer_id, incoming.result

    def finish(self, transfer_id: str) -> None:
        self._outgoing.pop(transfer_id, None)
        incoming = self._incoming.pop(transfer_id, None)
        if incoming is not None and not incoming.result.done():
            incoming.result.cancel()

    def serve(self, node_id: str, transfer_id: str) -> list[object]:
        """The messages of an outgoing transfer (FetchChunk), shared with its other copies."""
        outgoing = self._outgoing.get(transfer_id)
        if outgoing is None or outgoing.node_id != node_id:
            raise _unknown()
        return outgoing.payload.messages

    async def receive(
        self, node_id: str, first_transfer_id: str, first_error: str, pieces: AsyncIterator[bytes]
    ) -> None:
        """Collect an incoming transfer (PushChunk) and hand it to whoever waits for it."""
        incoming = self._incoming.get(first_transfer_id)
        if incoming is None or incoming.node_id != node_id:
            raise _unknown()
        if first_error:
            if not incoming.result.done():
                incoming.result.set_exception(ChunkMissing(first_error))
            return
        buffer = bytearray()
        try:
            async for piece in pieces:
                buffer += piece
                if len(buffer) > incoming.max_bytes:
                    raise InvalidArgument(
                        f"The chunk is larger than the {incoming.max_bytes} bytes expected",
                        reason="CHUNK_TOO_LARGE",
                    )
        except BaseException as exc:
            if not incoming.result.done():
                incoming.result.set_exception(
                    ConnectionError(f"the node's push broke: {type(exc).__name__}")
                    if not isinstance(exc, InvalidArgument)
                    else exc
                )
            raise
        if not incoming.result.done():
            incoming.result.set_result(bytes(buffer))
