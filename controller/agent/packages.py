"""The agent's package cache: packages fetched by SHA-256, once per digest.

A ``deploy_replica`` command names its package by SHA-256 and size only; the bytes
come from ``NodeService.FetchPackage`` on the node port (mutual TLS), in chunks, on a
connection of their own (never the node stream). :class:`PackageCache`:

* keeps packages under ``<data dir>/packages/<sha256>``; several replicas of one
  version wait for one download (a lock per digest);
* downloads into ``<sha256>.part`` while hashing, and after a broken connection goes
  on from the last byte written (the controller serves from an offset), up to
  :data:`~controller.limits.FETCH_ATTEMPTS` tries; a ``.part`` left by a killed agent
  is resumed the same way (its bytes are hashed again first);
* verifies the SHA-256 before the file is used (a mismatch removes the download and
  fails the deploy), fsyncs and renames it into place: a cached file is always whole.

A cached package is verified again when a replica is unpacked from it
(:func:`controller.deployments.package_unpack.unpack_package`); if it was corrupted on disk,
:meth:`PackageCache.evict` drops it and the replica fetches it again.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO

import grpc
from automator67.v1 import node_pb2

from controller.limits import FETCH_ATTEMPTS

log = logging.getLogger("controller.agent.packages")

Fetch = Callable[[str, int], AsyncIterator[node_pb2.FetchPackageResponse]]
"""Opens a download of package ``sha256`` from ``offset``: the agent's ``fetch_package``."""

FINAL_CODES = frozenset(
    {
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
"""Errors that another try would only repeat."""

_SHA256 = re.compile(r"[0-9a-f]{64}")


class PackageFetchError(Exception):
    """The package could not be fetched (the message says why)."""


class PackageCache:
    """Packages by SHA-256 on the agent's disk (see the module docstring)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        fetch: Fetch | None = None,
        *,
        attempts: int = FETCH_ATTEMPTS,
        retry_delay_seconds: float = 0.2,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.fetch = fetch
        self._attempts = attempts
        self._retry_delay = retry_delay_seconds
        self._locks: dict[str, asyncio.Lock] = {}
        self.downloads = 0
        """Downloads started (a resumed one counts once per connection)."""
        self.completed = 0
        """Packages downloaded and verified."""

    def path(self, sha256: str) -> Path:
        return self.directory / sha256

    def _lock(self, sha256: str) -> asyncio.Lock:
        lock = self._locks.get(sha256)
        if lock is None:
            lock = self._locks[sha256] = asyncio.Lock()
        return lock

    async def get(self, sha256: str, size: int) -> Path:
        """The cached package ``sha256``, downloaded first if it is not here."""
        if not _SHA256.fullmatch(sha256):
            raise PackageFetchError(f"invalid package digest {sha256!r}")
        async with self._lock(sha256):
            target = self.path(sha256)
            if await asyncio.to_thread(target.is_file):
                return target
            await self._download(sha256, size)
            return target

    async def evict(self, sha256: str) -> None:
        """Drop a cached package found corrupt, so that the next :meth:`get` fetches it again."""
        async with self._lock(sha256):
            log.warning("cached package %s is corrupt: removing it", sha256)
            await asyncio.to_thread(self.path(sha256).unlink, True)

    async def _download(self, sha256: str, size: int) -> None:
        if self.fetch is None:
            raise PackageFetchError("this agent cannot fetch packages (not connected to a controller)")
        part = self.directory / f"{sha256}.part"
        hasher, offset, handle = await asyncio.to_thread(_open_part, part, size)
        try:
            total = size
            for attempt in range(1, self._attempts + 1):
                if size and offset >= size:
                    break
                self.downloads += 1
                try:
                    async for chunk in self.fetch(sha256, offset):
                        if chunk.offset != offset:
                            raise PackageFetchError(
                                f"package {sha256}: chunk at offset {chunk.offset}, expected {offset}"
                            )
                        total = chunk.total_size
                        if size and total != size:
                            raise PackageFetchError(
                                f"package {sha256} is {total} bytes, the command said {size}"
                            )
                        await asyncio.to_thread(_append, handle, hasher, chunk.data)
                        offset += len(chunk.data)
                    if offset >= total:
                        break
                    reason = f"the download ended at {offset} of {total} bytes"
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in FINAL_CODES:
                        raise PackageFetchError(
                            f"the controller refused package {sha256}: {exc.code().name} {exc.details()}"
                        ) from None
                    reason = f"{exc.code().name} {exc.details() or ''}".strip()
                if attempt == self._attempts:
                    raise PackageFetchError(
                        f"package {sha256}: gave up after {attempt} tries at {offset} bytes ({reason})"
                    )
                log.warning(
                    "package %s: download broke at %d bytes (%s); resuming (try %d)",
                    sha256,
                    offset,
                    reason,
                    attempt + 1,
                )
                await asyncio.sleep(self._retry_delay * attempt)
            actual = hasher.hexdigest()
            if not hmac.compare_digest(actual, sha256):
                await asyncio.to_thread(_discard, handle, part)
                raise PackageFetchError(f"package checksum mismatch: SHA-256 is {actual}, expected {sha256}")
            await asyncio.to_thread(_commit, handle, part, self.path(sha256))
            self.completed += 1
            log.info("package %s fetched (%d bytes)", sha256, offset)
        finally:
            if not handle.closed:
                await asyncio.to_thread(handle.close)


def _open_part(part: Path, size: int) -> tuple[hashlib._Hash, int, IO[bytes]]:
    """Open (or resume) ``part``: its hasher over what it holds, its length, the handle."""
    hasher = hashlib.sha256()
    descriptor = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
    handle = os.fdopen(descriptor, "r+b")
    length = 0
    while piece := handle.read(1024 * 1024):
        hasher.update(piece)
        length += len(piece)
    if size and length > size:  # not a prefix of this package: start again
        handle.seek(0)
        handle.truncate()
        return hashlib.sha256(), 0, handle
    if length:
        log.info("package %s: resuming a download left at %d bytes", part.stem, length)
    return hasher, length, handle


def _append(handle: IO[bytes], hasher: hashlib._Hash, data: bytes) -> None:
    hasher.update(data)
    handle.write(data)


def _commit(handle: IO[bytes], part: Path, target: Path) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()
    os.replace(part, target)
    descriptor = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _discard(handle: IO[bytes], part: Path) -> None:
    handle.close()
    part.unlink(missing_ok=True)
