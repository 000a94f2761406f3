"""The agent's chunk store (storage nodes): sealed chunks by id, inventory and scrubbing.

The controller encrypts every chunk before it leaves (AES-256-GCM, a key per file that
never reaches a node); this store only ever sees ciphertext. Layout::

    <data dir>/chunks/            0700
        <chunk id>                0600: "A67C1 <sha256 of the ciphertext>\\n" + ciphertext
        .tmp-<chunk id>-<random>  a copy being written (removed at start)

* ``store_chunk``: pull the bytes with ``NodeService.FetchChunk(transfer_id)`` (one 4 MiB
  message for a default chunk) and hand them, :data:`WRITE_BATCH_BYTES` at a time, to a
  worker thread that hashes them and writes them to a temporary file — with ``O_DIRECT``
  from a reused page-aligned buffer, around the page cache
  (:class:`~controller.agent.chunk_store.ChunkWriter`) —;
  check size and SHA-256, fdatasync, rename into place, fsync the directory (one
  directory fsync covers every rename made before it: concurrent stores share it);
  answered ok only then (the copy is durable and verified).
* ``read_chunk``: the copy's bytes are hashed first; a missing or corrupt copy is
  answered ``missing``/``corrupt`` (the controller reads another copy and repairs),
  a good one pushed with ``NodeService.PushChunk``.
* ``delete_chunks``: unlink.
* After each connect the whole inventory (id, recorded SHA-256, size) goes up with
  ``NodeService.ReportChunks``; a background scrubber re-hashes every copy each
  ``scrub_interval`` seconds and reports mismatches at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
from automator67.v1 import node_pb2, node_pb2_grpc

from controller.agent.chunk_store import ChunkStore
from controller.agent.handlers import CommandHandlers, error_result, ok_result
from controller.wire import only_bytes_field

log = logging.getLogger("controller.agent.chunks")

PIECE_BYTES = 1024 * 1024
"""Bytes per PushChunk message (downloads)."""
FETCH_MESSAGE_BYTES = 4 * 1024 * 1024
"""The largest FetchChunk message (``controller.federation.storage.transfers.PIECE_BYTES``:
a default chunk in one message)."""
STORAGE_MESSAGE_BYTES = FETCH_MESSAGE_BYTES + 64 * 1024
WRITE_BATCH_BYTES = 4 * 1024 * 1024
"""Received bytes of a copy handed to the writing thread at once: a default chunk takes
one hop (each hop wakes a thread, then the event loop). The agent holds at most this much
of a copy beyond what gRPC holds."""
REPORT_BATCH = 2000
DEFAULT_SCRUB_INTERVAL_SECONDS = 3600.0


FETCH_CHUNK_METHOD = "/automator67.v1.NodeService/FetchChunk"


def fetch_chunk_data(raw: bytes) -> bytes | memoryview:
    """The ``data`` of a serialized ``FetchChunkResponse`` without copying it: the message
    is the field's tag, its length and the bytes (anything else is parsed normally).

    >>> bytes(fetch_chunk_data(node_pb2.FetchChunkResponse(data=b"x" * 300).SerializeToString()))[:3]
    b'xxx'
    >>> fetch_chunk_data(b"")
    b''
    """
    data = only_bytes_field(raw, 0x0A)  # FetchChunkResponse.data: field 1, length-delimited
    return data if data is not None else node_pb2.FetchChunkResponse.FromString(raw).data


def storage_message_options() -> list[tuple[str, int]]:
    """Options of the agent's storage channel: message limits (4 MiB FetchChunk messages),
    and socket reads and HTTP/2 frames and window sized for them (fewer system calls and
    frames per chunk than gRPC's defaults; measured with tests/bench/bench_storage.py)."""
    return [
        ("grpc.max_send_message_length", STORAGE_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", STORAGE_MESSAGE_BYTES),
        ("grpc.experimental.tcp_min_read_chunk_size", 256 * 1024),
        ("grpc.experimental.tcp_read_chunk_size", 1024 * 1024),
        ("grpc.experimental.tcp_max_read_chunk_size", 4 * 1024 * 1024),
        ("grpc.http2.max_frame_size", 1024 * 1024),
        ("grpc.http2.lookahead_bytes", 8 * 1024 * 1024),
    ]


class StorageAgent:
    """Wires a :class:`ChunkStore` to an agent: command handlers, inventory, scrubbing."""

    def __init__(
        self,
        data_dir: Path,
        channel: Callable[[], grpc.aio.Channel],
        *,
        scrub_interval_seconds: float = DEFAULT_SCRUB_INTERVAL_SECONDS,
    ) -> None:
        self.store = ChunkStore(data_dir / "chunks")
        self._channel = channel
        self.scrub_interval = scrub_interval_seconds
        self._tasks: set[asyncio.Task[None]] = set()
        self._scrubber: asyncio.Task[None] | None = None

    def register(self, handlers: CommandHandlers) -> None:
        handlers.register("store_chunk", self._store_chunk)
        handlers.register("read_chunk", self._read_chunk)
        handlers.register("delete_chunks", self._delete_chunks)

    def _stub(self) -> node_pb2_grpc.NodeServiceStub:
        return node_pb2_grpc.NodeServiceStub(self._channel())

    async def _store_chunk(self, command: node_pb2.NodeCommand) -> node_pb2.CommandResult:
        request = command.store_chunk
        # Pieces are hashed and written in a worker thread (a write can wait for the disk
        # when the page cache is full of dirty pages), then fsynced there. They are handed
        # over in batches of WRITE_BATCH_BYTES (the pieces gRPC made, uncopied): a default
        # chunk takes one hop to the thread — hash, one writev, fdatasync, rename — not
        # one per piece (each hop wakes a thread and then the event loop).
        writer = self.store.writer(request.chunk_id, request.size, request.sha256)
        try:
            # Raw responses: the bytes gRPC hands over are written as they are (no
            # protobuf parse and copy of every piece; see fetch_chunk_data).
            fetch = self._channel().unary_stream(
                FETCH_CHUNK_METHOD,
                request_serializer=node_pb2.FetchChunkRequest.SerializeToString,
                response_deserializer=None,
            )
            call = fetch(node_pb2.FetchChunkRequest(transfer_id=request.transfer_id))
            batch: list[bytes | memoryview] = []
            batched = received = 0
            try:
                async for raw in call:
                    piece = fetch_chunk_data(raw)
                    received += len(piece)
                    if received > request.size:
                        raise ValueError(f"chunk {request.chunk_id}: more than {request.size} bytes sent")
                    batch.append(piece)
                    batched += len(piece)
                    if batched >= WRITE_BATCH_BYTES:
                        await asyncio.to_thread(writer.add_all, batch)
                        batch, batched = [], 0
                await asyncio.to_thread(writer.finish, batch)
            except ValueError as exc:
                call.cancel()
                return error_result(command, str(exc))
        finally:
            writer.close()
        return ok_result(command, {"chunk_id": request.chunk_id, "sha256": request.sha256})

    async def _read_chunk(self, command: node_pb2.NodeCommand) -> node_pb2.CommandResult:
        request = command.read_chunk
        try:
            data = await asyncio.to_thread(self.store.read, request.chunk_id, request.sha256)
        except FileNotFoundError:
            return error_result(command, f"chunk {request.chunk_id} is missing")
        except ValueError as exc:
            log.warning("%s: not sent", exc)
            return error_result(
                command, str(exc) if "corrupt" in str(exc) else f"chunk {request.chunk_id} is corrupt"
            )

        async def pieces() -> AsyncIterator[node_pb2.PushChunkRequest]:
            view = memoryview(data)
            yield node_pb2.PushChunkRequest(transfer_id=request.transfer_id, data=bytes(view[:PIECE_BYTES]))
            for start in range(PIECE_BYTES, len(view), PIECE_BYTES):
                yield node_pb2.PushChunkRequest(data=bytes(view[start : start + PIECE_BYTES]))

        await self._stub().PushChunk(pieces())
        return ok_result(command, {"chunk_id": request.chunk_id})

    async def _delete_chunks(self, command: node_pb2.NodeCommand) -> node_pb2.CommandResult:
        ids = list(command.delete_chunks.chunk_ids)
        removed = await asyncio.to_thread(self.store.delete, ids)
        log.info("removed %d of %d chunk copies the controller no longer wants", removed, len(ids))
        return ok_result(command, {"removed": removed})

    # -- inventory and scrubbing --------------------------------------------------------------

    def connected(self) -> None:
        """The agent's ``on_connected`` hook: report the inventory, start the scrubber."""
        self._spawn(self.report_inventory())
        if self._scrubber is None or self._scrubber.done():
            self._scrubber = asyncio.create_task(self._scrub_loop(), name="agent-scrubber")

    def _spawn(self, coroutine: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coroutine)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _report(self, reports: list[node_pb2.ChunkReport], complete: bool) -> None:
        async def batches() -> AsyncIterator[node_pb2.ReportChunksRequest]:
            for start in range(0, max(len(reports), 1), REPORT_BATCH):
                last = start + REPORT_BATCH >= len(reports)
                yield node_pb2.ReportChunksRequest(
                    chunks=reports[start : start + REPORT_BATCH], complete=complete and last
                )

        await self._stub().ReportChunks(batches())

    async def report_inventory(self) -> None:
        try:
            reports = await asyncio.to_thread(self.store.inventory)
            await self._report(reports, complete=True)
            log.info("reported %d chunk copies to the controller", len(reports))
        except Exception as exc:  # the next connect reports again
            log.warning("could not report the chunk inventory: %s", exc)

    async def scrub_once(self) -> int:
        """Re-hash every copy; report the corrupt ones. How many were corrupt."""
        corrupt = []
        for report in await asyncio.to_thread(self.store.inventory):
            found = await asyncio.to_thread(self.store.scrub_one, report.chunk_id)
            if found is not None:
                log.warning("scrub: chunk %s is corrupt", report.chunk_id)
                corrupt.append(found)
        if corrupt:
            await self._report(corrupt, complete=False)
        return len(corrupt)

    async def _scrub_loop(self) -> None:
        while True:
            await asyncio.sleep(self.scrub_interval)
            try:
                await self.scrub_once()
                await self.report_inventory()  # orphans left by broken transfers are found too
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("scrub failed: %s", exc)

    async def close(self) -> None:
        tasks = [*self._tasks, *([self._scrubber] if self._scrubber else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
