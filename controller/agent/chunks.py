"""The agent's chunk store (storage nodes): sealed chunks by id, inventory and scrubbing.

The controller encrypts every chunk before it leaves (AES-256-GCM, a key per file that
never reaches a node); this store only ever sees ciphertext. Layout::

    <data dir>/chunks/            0700
        <chunk id>                0600: "A67C1 <sha256 of the ciphertext>\\n" + ciphertext
        .tmp-<chunk id>-<random>  a copy being written (removed at start)

* ``store_chunk``: pull the bytes with ``NodeService.FetchChunk(transfer_id)`` (one 4 MiB
  message for a default chunk) and hand them, :data:`WRITE_BATCH_BYTES` at a time, to a
  worker thread that hashes them and writes them to a temporary file — with ``O_DIRECT``
  from a reused page-aligned buffer, around the page cache (:class:`ChunkWriter`) —;
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
import contextlib
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import re
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
from automator67.v1 import node_pb2, node_pb2_grpc

from controller.agent.handlers import CommandHandlers, error_result, ok_result
from controller.wire import only_bytes_field

log = logging.getLogger("controller.agent.chunks")

MAGIC = b"A67C1 "
HEADER_BYTES = len(MAGIC) + 64 + 1
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
STAGING_BYTES = 4 * 1024 * 1024
"""The page-aligned buffer a copy is staged in on its way to the disk (one per copy being
written, reused: :meth:`ChunkStore.take_buffer`)."""
ALIGN = 4096
"""Direct writes go in whole blocks of this many bytes (from an aligned buffer, at an
aligned offset): a multiple of any disk's logical block size."""
SPARE_BUFFERS = 4
"""Staging buffers a store keeps for the next copies (about as many as are written at once)."""
REPORT_BATCH = 2000
DEFAULT_SCRUB_INTERVAL_SECONDS = 3600.0
_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_SHA = re.compile(r"[0-9a-f]{64}")


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


class ChunkStore:
    """Sealed chunks in one directory (see the module docstring). Blocking methods: call
    them in a worker thread."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._dir_sync = threading.Condition()
        self._dir_wanted = 0  # renames waiting for a directory fsync (a counter)
        self._dir_synced = 0  # every rename up to this one is durable
        self._dir_syncing = False
        self.direct = True
        """Write copies with ``O_DIRECT`` (off once the file system refused it)."""
        self._buffers: list[mmap.mmap] = []
        self._buffers_lock = threading.Lock()
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
        writer = self.writer(chunk_id, size, sha256)
        try:
            writer.add(data)
            writer.commit()
        finally:
            writer.close()

    def writer(self, chunk_id: str, size: int, sha256: str) -> ChunkWriter:
        """A copy being received: :meth:`ChunkWriter.add` its pieces, then
        :meth:`ChunkWriter.commit` (verify, fsync, rename) — :meth:`ChunkWriter.close` always."""
        if not _SHA.fullmatch(sha256):
            raise ValueError("invalid checksum")
        return ChunkWriter(self, self.path(chunk_id), size, sha256)

    def take_buffer(self) -> mmap.mmap:
        """A page-aligned staging buffer of :data:`STAGING_BYTES` (a spare one when there is)."""
        with self._buffers_lock:
            if self._buffers:
                return self._buffers.pop()
        return mmap.mmap(-1, STAGING_BYTES)

    def give_buffer(self, buffer: mmap.mmap) -> None:
        with self._buffers_lock:
            if len(self._buffers) < SPARE_BUFFERS:
                self._buffers.append(buffer)
                return
        buffer.close()

    def sync_directory(self) -> None:
        """Make every rename done before this call durable. Concurrent callers share one
        fsync: a caller that arrives while one runs waits for the next, which covers it."""
        with self._dir_sync:
            self._dir_wanted += 1
            mine = self._dir_wanted
            while self._dir_syncing and self._dir_synced < mine:
                self._dir_sync.wait()
            if self._dir_synced >= mine:
                return
            self._dir_syncing = True
            covered = self._dir_wanted
        synced = False
        try:
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            synced = True
        finally:
            with self._dir_sync:
                self._dir_syncing = False
                if synced:
                    self._dir_synced = max(self._dir_synced, covered)
                self._dir_sync.notify_all()

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
        with open(self.path(chunk_id), "rb") as handle:  # the header, then the bytes (no slice copy)
            recorded = self._header(handle.read(HEADER_BYTES))
            data = handle.read()
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


class ChunkWriter:
    """One copy streamed to a temporary file (see :meth:`ChunkStore.writer`). Blocking.

    The file is written with ``O_DIRECT`` where the file system allows it: the bytes are
    staged in a page-aligned buffer the store reuses (:data:`STAGING_BYTES`) and go from
    there to the disk, not through the page cache: copying each copy into cache pages (and
    reclaiming them) cost the agent about as much CPU as hashing it, and a copy is written
    once and rarely read soon after. The last block is padded to :data:`ALIGN` and the file truncated to its real
    length. Elsewhere (tmpfs, or a file system that refuses an aligned direct write) the
    same buffer is written through the page cache. The file's layout is the same either way."""

    def __init__(self, store: ChunkStore, target: Path, size: int, sha256: str) -> None:
        self._store = store
        self._target = target
        self._size = size
        self._sha256 = sha256
        self._hash = hashlib.sha256()
        self._written = 0  # bytes of the copy received (hashed and staged or written)
        self._tmp = store.directory / f".tmp-{target.name}-{secrets.token_hex(4)}"
        self._fd: int | None = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._done = False
        self._direct = _set_direct(self._fd, True) if store.direct else False
        self._buffer: mmap.mmap | None = store.take_buffer()
        self._staged = 0  # bytes of the buffer not written yet
        self._file_bytes = 0  # bytes of the file written (a multiple of ALIGN until commit)
        self._stage(MAGIC + sha256.encode() + b"\n")

    def _stage(self, data: bytes | memoryview) -> None:
        assert self._buffer is not None
        view = memoryview(data)
        while view:
            n = min(len(view), STAGING_BYTES - self._staged)
            self._buffer[self._staged : self._staged + n] = view[:n]
            self._staged += n
            view = view[n:]
            if self._staged == STAGING_BYTES:
                self._flush(STAGING_BYTES)
                self._staged = 0

    def _flush(self, length: int) -> None:
        """Write the first ``length`` bytes of the buffer (a multiple of ALIGN when direct)."""
        assert self._fd is not None
        assert self._buffer is not None
        view = memoryview(self._buffer)[:length]
        try:
            while view:
                try:
                    n = os.write(self._fd, view)
                except OSError as exc:
                    if not self._direct or exc.errno != errno.EINVAL:
                        raise
                    # The file system takes no direct writes after all: through the page cache.
                    self._direct = _set_direct(self._fd, False)
                    self._store.direct = False
                    continue
                view = view[n:]
                self._file_bytes += n
        finally:
            view.release()

    def add(self, piece: bytes | memoryview) -> None:
        self.add_all([piece])

    def add_all(self, pieces: list[bytes | memoryview]) -> None:
        """Hash and stage ``pieces`` (written out whenever the buffer is full)."""
        total = sum(len(p) for p in pieces)
        if self._written + total > self._size:
            raise ValueError(f"chunk {self._target.name}: more than {self._size} bytes sent")
        for piece in pieces:
            self._hash.update(piece)
            self._stage(piece)
        self._written += total

    def finish(self, pieces: list[bytes | memoryview]) -> None:
        """:meth:`add_all` the last pieces, then :meth:`commit` (one worker-thread hop)."""
        self.add_all(pieces)
        self.commit()

    def commit(self) -> None:
        """Verify, make durable, rename into place, make the rename durable."""
        name = self._target.name
        if self._written != self._size:
            raise ValueError(f"chunk {name}: got {self._written} bytes, expected {self._size}")
        if self._hash.hexdigest() != self._sha256:
            raise ValueError(f"chunk {name}: the bytes received do not match their SHA-256")
        assert self._fd is not None
        assert self._buffer is not None
        length = self._file_bytes + self._staged
        if self._direct:  # the last block whole (zero padded), then the file cut to its length
            padded = -(-self._staged // ALIGN) * ALIGN
            self._buffer[self._staged : padded] = bytes(padded - self._staged)
            self._flush(padded)
            os.ftruncate(self._fd, length)
        else:
            self._flush(self._staged)
        self._staged = 0
        getattr(os, "fdatasync", os.fsync)(self._fd)
        os.close(self._fd)
        self._fd = None
        os.replace(self._tmp, self._target)
        self._done = True
        self._release()
        self._store.sync_directory()

    def _release(self) -> None:
        if self._buffer is not None:
            self._store.give_buffer(self._buffer)
            self._buffer = None

    def close(self) -> None:
        """Drop the temporary file unless committed."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._release()
        if not self._done:
            self._tmp.unlink(missing_ok=True)


def _set_direct(fd: int, on: bool) -> bool:
    """Turn ``O_DIRECT`` on or off for ``fd``; whether it is on."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | direct if on else flags & ~direct)
    except OSError:
        return bool(flags & direct)
    return on


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
