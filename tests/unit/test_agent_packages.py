"""The agent's package cache: one download per digest, resumed after a broken connection,
verified before use; a corrupted cached package is fetched again (no controller needed: the
fetch function plays the controller's FetchPackage)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from automator67.v1 import node_pb2

from controller.agent.packages import PackageCache, PackageFetchError

CHUNK = 64 * 1024


class Served:
    """What a controller serves, with faults to inject; counts and records the calls."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.offsets: list[int] = []
        self.break_after_chunks: list[int] = []
        """Each call pops one entry: the stream breaks (UNAVAILABLE) after that many chunks."""
        self.gate: asyncio.Event | None = None

    async def fetch(self, sha256: str, offset: int) -> AsyncIterator[node_pb2.FetchPackageResponse]:
        self.offsets.append(offset)
        if self.gate is not None:
            await self.gate.wait()
        if sha256 != self.sha256:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.PERMISSION_DENIED, grpc.aio.Metadata(), grpc.aio.Metadata(), "not yours"
            )
        limit = self.break_after_chunks.pop(0) if self.break_after_chunks else None
        for count, start in enumerate(range(offset, len(self.data), CHUNK)):
            if limit is not None and count == limit:
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "connection reset"
                )
            yield node_pb2.FetchPackageResponse(
                offset=start, data=self.data[start : start + CHUNK], total_size=len(self.data)
            )


@pytest.fixture
def served() -> Served:
    return Served(os.urandom(CHUNK * 10 + 123))


async def test_several_waiters_share_one_download(tmp_path: Path, served: Served) -> None:
    cache = PackageCache(tmp_path, served.fetch)
    served.gate = asyncio.Event()
    waiters = [asyncio.create_task(cache.get(served.sha256, len(served.data))) for _ in range(3)]
    await asyncio.sleep(0)  # all three wait on the one download
    served.gate.set()
    paths = await asyncio.gather(*waiters)
    assert len(set(paths)) == 1
    assert paths[0].read_bytes() == served.data
    assert served.offsets == [0]  # one download for three replicas
    assert cache.completed == 1
    await cache.get(served.sha256, len(served.data))
    assert served.offsets == [0]  # cached: no second download


async def test_a_broken_download_resumes_from_the_last_good_offset(tmp_path: Path, served: Served) -> None:
    served.break_after_chunks = [3, 4]
    cache = PackageCache(tmp_path, served.fetch, retry_delay_seconds=0.0)
    path = await cache.get(served.sha256, len(served.data))
    assert path.read_bytes() == served.data
    assert served.offsets == [0, 3 * CHUNK, 7 * CHUNK]
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".part")]


async def test_a_part_left_by_a_killed_agent_is_resumed(tmp_path: Path, served: Served) -> None:
    (tmp_path / f"{served.sha256}.part").write_bytes(served.data[: 5 * CHUNK])
    cache = PackageCache(tmp_path, served.fetch)
    path = await cache.get(served.sha256, len(served.data))
    assert path.read_bytes() == served.data
    assert served.offsets == [5 * CHUNK]


async def test_wrong_bytes_are_refused_and_nothing_is_cached(tmp_path: Path, served: Served) -> None:
    (tmp_path / f"{served.sha256}.part").write_bytes(b"\0" * CHUNK)  # a bad prefix: the digest fails
    cache = PackageCache(tmp_path, served.fetch)
    with pytest.raises(PackageFetchError, match="checksum mismatch"):
        await cache.get(served.sha256, len(served.data))
    assert os.listdir(tmp_path) == []
    assert (await cache.get(served.sha256, len(served.data))).read_bytes() == served.data  # clean retry


async def test_a_refusal_is_final_and_a_dead_controller_is_given_up(tmp_path: Path, served: Served) -> None:
    cache = PackageCache(tmp_path, served.fetch, attempts=3, retry_delay_seconds=0.0)
    with pytest.raises(PackageFetchError, match="PERMISSION_DENIED"):
        await cache.get("ab" * 32, 10)
    assert served.offsets == [0]
    served.break_after_chunks = [0, 0, 0]
    with pytest.raises(PackageFetchError, match="gave up after 3 tries"):
        await cache.get(served.sha256, len(served.data))
