"""Sources and packages on the controller's disk, by SHA-256.

Layout under ``<data dir>/packages``::

    tmp/<random>.part          uploads and builds in progress (removed on any failure)
    sources/<user id>/<sha256> uploaded sources, owned by the uploading user
    packages/<sha256>          built packages, shared by digest

An upload is streamed into a private temporary file while it is hashed; past
``max_bytes`` it stops with ``RESOURCE_EXHAUSTED``. A complete upload is fsynced and
renamed into place (and the directory fsynced), so a file under ``sources/`` or
``packages/`` is always whole: nothing is ever half-stored. Another user's source
looks exactly like a missing one. Hashing and writing run in a worker thread, in
batches of :data:`WRITE_BATCH_BYTES`, so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from controller.errors import FieldViolation, InvalidArgument, ResourceExhausted
from controller.limits import CHUNK_BYTES, DEFAULT_MAX_PACKAGE_BYTES

WRITE_BATCH_BYTES = 1024 * 1024
"""Uploaded bytes gathered before one write-and-hash step in a worker thread."""

READ_BATCH_CHUNKS = 8
"""Chunks read from disk per worker-thread step when a package is served."""

_SHA256 = re.compile(r"[0-9a-f]{64}")
_SAFE_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


@dataclass(frozen=True, slots=True)
class Stored:
    """A stored file: its SHA-256 (hex), size and path."""

    sha256: str
    size: int
    path: Path


def is_sha256(value: str) -> bool:
    return bool(_SHA256.fullmatch(value))


def too_large(limit: int, size: int | None = None) -> ResourceExhausted:
    got = f" ({size} bytes)" if size is not None else ""
    return ResourceExhausted(
        f"The source is larger than the limit of {limit} bytes{got}; nothing was stored",
        reason="SOURCE_TOO_LARGE",
        metadata={"limit_bytes": str(limit)},
    )


def _empty_source() -> InvalidArgument:
    return InvalidArgument(
        "The source is empty", field_violations=[FieldViolation("chunk", "no bytes were sent")]
    )


def _fsync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class _Sink:
    """A private temporary file that hashes what is written to it."""

    def __init__(self, tmp_dir: Path) -> None:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        self.path = tmp_dir / f"{secrets.token_hex(16)}.part"
        descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.file: IO[bytes] = os.fdopen(descriptor, "wb")
        self.hasher = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.hasher.update(data)
        self.file.write(data)
        self.size += len(data)
        return len(data)

    def commit(self, target: Path) -> None:
        """fsync, rename to ``target`` (atomic), fsync the directory."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, target)
        _fsync_dir(target.parent)

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        self.path.unlink(missing_ok=True)


class PackageStore:
    """Uploaded sources (per user) and built packages (shared), on disk by SHA-256."""

    def __init__(self, root: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_PACKAGE_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.tmp_dir = self.root / "tmp"
        self.sources_dir = self.root / "sources"
        self.packages_dir = self.root / "packages"
        for directory in (self.tmp_dir, self.sources_dir, self.packages_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in self.tmp_dir.glob("*.part"):  # a crash mid-upload: never whole
            leftover.unlink(missing_ok=True)

    # -- sources --------------------------------------------------------------------------

    def _user_dir(self, user_id: str) -> Path:
        if not _SAFE_ID.fullmatch(user_id) or user_id in (".", ".."):
            raise ValueError(f"unusable user id {user_id!r}")
        return self.sources_dir / user_id

    def source(self, user_id: str, sha256: str) -> Stored | None:
        """The user's uploaded source ``sha256``; None if missing (or another user's)."""
        if not is_sha256(sha256):
            return None
        path = self._user_dir(user_id) / sha256
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        return Stored(sha256, size, path)

    async def receive(
        self,
        user_id: str,
        chunks: AsyncIterable[bytes],
        *,
        expected_size: int = 0,
        expected_sha256: str = "",
    ) -> Stored:
        """Stream ``chunks`` into the user's sources; the stored source.

        ``RESOURCE_EXHAUSTED`` past ``max_bytes`` (or if ``expected_size`` is over it),
        ``INVALID_ARGUMENT`` if empty or if the size or SHA-256 differs from what was
        announced. On any failure (the client going away included) nothing is kept.
        """
        expected_sha256 = expected_sha256.strip().lower()
        if expected_sha256 and not is_sha256(expected_sha256):
            raise InvalidArgument(
                "Invalid upload metadata",
                field_violations=[FieldViolation("metadata.sha256", "must be 64 hexadecimal characters")],
            )
        if expected_size < 0:
            raise InvalidArgument(
                "Invalid upload metadata",
                field_violations=[FieldViolation("metadata.size", "must not be negative")],
            )
        if expected_size > self.max_bytes:
            raise too_large(self.max_bytes, expected_size)
        user_dir = self._user_dir(user_id)
        sink = await asyncio.to_thread(_Sink, self.tmp_dir)
        try:
            batch: list[bytes] = []
            pending = 0
            total = 0
            async for chunk in chunks:
                total += len(chunk)
                if total > self.max_bytes:
                    raise too_large(self.max_bytes)
                batch.append(chunk)
                pending += len(chunk)
                if pending >= WRITE_BATCH_BYTES:
                    await asyncio.to_thread(_write_all, sink, batch)
                    batch, pending = [], 0
            if batch:
                await asyncio.to_thread(_write_all, sink, batch)
            if total == 0:
                raise _empty_source()
            if expected_size and total != expected_size:
                raise InvalidArgument(
                    f"The upload announced {expected_size} bytes but sent {total}; nothing was stored",
                    field_violations=[
                        FieldViolation("metadata.size", f"announced {expected_size}, got {total}")
                    ],
                )
            digest = sink.hasher.hexdigest()
            if expected_sha256 and digest != expected_sha256:
                raise InvalidArgument(
                    f"The upload's SHA-256 is {digest}, not the announced {expected_sha256}; nothing was stored",
                    reason="SOURCE_CHECKSUM_MISMATCH",
                    field_violations=[FieldViolation("metadata.sha256", f"got {digest}")],
                )
            target = user_dir / digest
            await asyncio.to_thread(sink.commit, target)
            return Stored(digest, total, target)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(sink.discard))
            raise

    async def receive_bytes(self, user_id: str, data: bytes) -> Stored:
        """Store an inline source as if it had been uploaded: one worker-thread step (hash,
        and unless the user already has that source, write, fsync and rename)."""
        if not data:
            raise _empty_source()
        if len(data) > self.max_bytes:
            raise too_large(self.max_bytes, len(data))
        user_dir = self._user_dir(user_id)

        def store() -> Stored:
            digest = hashlib.sha256(data).hexdigest()
            target = user_dir / digest
            with contextlib.suppress(FileNotFoundError):
                if target.stat().st_size == len(data):
                    return Stored(digest, len(data), target)  # content-addressed: already whole
            sink = _Sink(self.tmp_dir)
            try:
                sink.write(data)
                sink.commit(target)
            except BaseException:
                sink.discard()
                raise
            return Stored(digest, len(data), target)

        return await asyncio.to_thread(store)

    async def put_source_bytes(self, user_id: str, sha256: str, data: bytes) -> Stored:
        """Write a user's source kept in the store (uploaded through another controller)."""
        return await self._put_verified(self._user_dir(user_id) / sha256, sha256, data, "source")

    async def _put_verified(self, target: Path, sha256: str, data: bytes, what: str) -> Stored:
        """Write ``data`` to ``target`` whole (fsync, rename) if it has the SHA-256 ``sha256``."""

        def write() -> Stored:
            sink = _Sink(self.tmp_dir)
            try:
                sink.write(data)
                if sink.hasher.hexdigest() != sha256:
                    raise ValueError(f"stored {what} {sha256} does not match its checksum")
                sink.commit(target)
            except BaseException:
                sink.discard()
                raise
            return Stored(sha256, len(data), target)

        return await asyncio.to_thread(write)

    # -- packages -------------------------------------------------------------------------

    def package_path(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise ValueError(f"not a SHA-256: {sha256!r}")
        return self.packages_dir / sha256

    def package(self, sha256: str) -> Stored | None:
        """The built package ``sha256``, if it is on disk."""
        if not is_sha256(sha256):
            return None
        path = self.packages_dir / sha256
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        return Stored(sha256, size, path)

    def new_sink(self) -> _Sink:
        """A temporary file to build a package into (blocking: call it in the worker thread
        that builds, never on the event loop)."""
        return _Sink(self.tmp_dir)

    async def put_package_bytes(self, sha256: str, data: bytes) -> Stored:
        """Write a package kept in the store by an earlier version (its bytes in the row)."""
        return await self._put_verified(self.package_path(sha256), sha256, data, "package")

    async def read_package(self, sha256: str, offset: int = 0) -> AsyncIterator[tuple[int, bytes, int]]:
        """``(offset, data, total size)`` chunks of package ``sha256`` from ``offset``.

        Reads happen in a worker thread, :data:`READ_BATCH_CHUNKS` chunks at a time."""
        path = self.package_path(sha256)
        handle = await asyncio.to_thread(path.open, "rb")
        try:
            total = os.fstat(handle.fileno()).st_size
            position = offset
            await asyncio.to_thread(handle.seek, offset)
            while position < total:
                pieces = await asyncio.to_thread(_read_chunks, handle, READ_BATCH_CHUNKS)
                if not pieces:
                    break
                for piece in pieces:
                    yield position, piece, total
                    position += len(piece)
        finally:
            await asyncio.to_thread(handle.close)


def _write_all(sink: _Sink, batch: list[bytes]) -> None:
    for piece in batch:
        sink.write(piece)


def _read_chunks(handle: Any, count: int) -> list[bytes]:
    pieces = []
    for _ in range(count):
        piece = handle.read(CHUNK_BYTES)
        if not piece:
            break
        pieces.append(piece)
    return pieces
