"""The agent's chunk store (storage nodes): sealed chunks by id, inventory and scrubbing.

The controller encrypts every chunk before it leaves (AES-256-GCM, a key per file that
never reaches a node); this store only ever sees ciphertext. Layout::

    <data dir>/chunks/            0700
        <chunk id>                0600: "A67C1 <sha256 of the ciphertext>\\n" + ciphertext
        .tmp-<chunk id>-<random>  a copy being written (removed at start)

* ``store_chunk``: pull the bytes with ``NodeService.FetchChunk(transfer_id)``, check size
  and SHA-256, write a temporary file, fsync, rename into place, fsync the directory;
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
import contextlib
import hashlib
import logging
import os
import re
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
from automator67.v1 import node_pb2, node_pb2_grpc

from controller.agent.handlers import CommandHandlers, error_result, ok_result

log = logging.getLogger("controller.agent.chunks")

MAGIC = b"A67C1 "
HEADER_BYTES = len(MAGIC) + 64 + 1
PIECE_BYTES = 1024 * 1024
STORAGE_MESSAGE_BYTES = PIECE_BYTES + 64 * 1024
REPORT_BATCH = 2000
DEFAULT_SCRUB_INTERVAL_SECONDS = 3600.0
_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_SHA = re.compile(r"[0-9a-f]{64}")


def storage_message_options() -> list[tuple[str, int]]:
    """Message limits of the agent's storage channel (1 MiB pieces)."""
    return [
        ("grpc.max_send_message_length", STORAGE_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", STORAGE_MESSAGE_BYTES),
    ]


class ChunkStore:
    """Sealed chunks in one directory (see the module docstring). Blocking methods: call
    them in a worker thread."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        for leftover in directory.glob(".tmp-*"):
            leftover.unlink(missing_ok=True)

    def path(self, chunk_id: str) -> Path:
        if not _ID.fullmatch(chunk_id):
            raise ValueError(f"invalid chunk id {chunk_id!r}")
        return self.directory / chunk_id

    def write(self, chunk_id: str, data: bytes, size: int, sha256: str) -> None:
        """Keep a verified, durable copy (replacing any older one atomically)."""
        if not _SHA.fullmatch(sha256):
            raise ValueError("invalid checksum")
        if len(data) != size:
            raise ValueError(f"chunk {chunk_id}: got {len(data)} bytes, expected {size}")
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(f"chunk {chunk_id}: the bytes received do not match their SHA-256")
        target = self.path(chunk_id)
        tmp = self.directory / f".tmp-{chunk_id}-{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(MAGIC + sha256.encode() + b"\n")
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @staticmethod
    def _header(raw: bytes) -> str | None:
        if (
            len(raw) < HEADER_BYTES
            or not raw.startswith(MAGIC)
            or raw[HEADER_BYTES - 1 : HEADER_BYTES] != b"\n"
        ):
            return None
        sha = raw[len(MAGIC) : HEADER_BYTES - 1].decode("ascii", "replace")
        return sha if _SHA.fullmatch(sha) else None

    def read(self, chunk_id: str, sha256: str) -> bytes:
        """The copy's bytes; ``FileNotFoundError`` if missing, ``ValueError`` if corrupt."""
        raw = self.path(chunk_id).read_bytes()
        recorded = self._header(raw)
        data = raw[HEADER_BYTES:]
        if recorded is None or recorded != sha256 or hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(f"chunk {chunk_id} is corrupt")
        return data

    def delete(self, chunk_ids: list[str]) -> int:
        removed = 0
        for chunk_id in chunk_ids:
            with contextlib.suppress(FileNotFoundError, ValueError):
                self.path(chunk_id).unlink()
                removed += 1
        return removed

    def inventory(self) -> list[node_pb2.ChunkReport]:
        """Every copy with its recorded SHA-256 (headers only: fast)."""
        out = []
        for entry in os.scandir(self.directory):
            if not _ID.fullmatch(entry.name):
                continue
            try:
                with open(entry.path, "rb") as handle:
                    head = handle.read(HEADER_BYTES)
                size = entry.stat().st_size - HEADER_BYTES
            except OSError:
                continue
            sha = self._header(head)
            out.append(
                node_pb2.ChunkReport(
                    chunk_id=entry.name, sha256=sha or "", size=max(size, 0), corrupt=sha is None
                )
            )
        return out

    def scrub_one(self, chunk_id: str) -> node_pb2.ChunkReport | None:
        """A report if the copy is corrupt (its bytes do not match its recorded SHA-256)."""
        try:
            raw = self.path(chunk_id).read_bytes()
        except (OSError, ValueError):
            return None
        recorded = self._header(raw)
        if recorded is not None and hashlib.sha256(raw[HEADER_BYTES:]).hexdigest() == recorded:
            return None
        return node_pb2.ChunkReport(chunk_id=chunk_id, sha256=recorded or "", size=len(raw), corrupt=True)


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
        call = self._stub().FetchChunk(node_pb2.FetchChunkRequest(transfer_id=request.transfer_id))
        buffer = bytearray()
        async for piece in call:
            buffer += piece.data
            if len(buffer) > request.size:
                call.cancel()
                return error_result(command, f"chunk {request.chunk_id}: more than {request.size} bytes sent")
        await asyncio.to_thread(
            self.store.write, request.chunk_id, bytes(buffer), request.size, request.sha256
        )
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
