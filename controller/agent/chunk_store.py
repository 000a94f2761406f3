"""The on-disk chunk store of a storage node (its layout, and the commands that use it, are
in :mod:`controller.agent.chunks`): :class:`ChunkStore` keeps sealed chunks by id, reads,
deletes, inventories and scrubs them; :class:`ChunkWriter` streams one copy to a temporary
file (``O_DIRECT`` where the file system allows it), verifies it and renames it into place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import re
import secrets
import threading
from pathlib import Path

from automator67.v1 import node_pb2

MAGIC = b"A67C1 "
HEADER_BYTES = len(MAGIC) + 64 + 1
STAGING_BYTES = 4 * 1024 * 1024
"""The page-aligned buffer a copy is staged in on its way to the disk (one per copy being
written, reused: :meth:`ChunkStore.take_buffer`)."""
ALIGN = 4096
"""Direct writes go in whole blocks of this many bytes (from an aligned buffer, at an
aligned offset): a multiple of any disk's logical block size."""
SPARE_BUFFERS = 4
"""Staging buffers a store keeps for the next copies (about as many as are written at once)."""
_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_SHA = re.compile(r"[0-9a-f]{64}")


class ChunkStore:
    """Sealed chunks in one directory (see :mod:`controller.agent.chunks`). Blocking methods:
    call them in a worker thread."""

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
