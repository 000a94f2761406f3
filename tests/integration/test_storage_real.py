"""Storage federation with REAL agent processes, a real controller and both stores.

4 storage agents in 4 regions. A 64 MiB file is uploaded with 3 replicas, downloaded
byte-identical (whole and by range), and never appears in plaintext on a node's disk;
another user can neither get, list, download nor delete it. One holder is killed with
SIGKILL: downloads stay byte-identical, repair brings every chunk back to 3 verified
copies on the survivors, and the restarted node's stale copies are trimmed (never
served). A byte flipped in a chunk file: the next download is still correct and the copy
is repaired. A broken upload leaves no file and its chunks are gone after the grace
period (on an injected clock).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
import threading
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import psutil
import pytest
from automator67.v1 import storage_pb2, storage_pb2_grpc
from sqlalchemy import event, select, text

from controller.agent.chunk_store import HEADER_BYTES
from controller.cache.memory import MemoryCache
from controller.errors import ResourceExhausted
from controller.federation.storage import StorageLimits, StorageService
from controller.federation.storage.plan import NodeCondition
from controller.federation.storage.service import _Upload
from controller.nodes import HealthConfig
from controller.nodes.fleet import Fleet
from controller.nodes.repository import NodeRepository
from controller.store import Store, UserRepository
from controller.store.db import create_engine_for
from controller.store.migrate import upgrade
from controller.store.models import StorageChunk, StorageChunkCopy, StorageFile
from controller.vault import Keyring, Vault
from tests.integration.test_deployments_real import Client, _until, processes
from tests.integration.test_node_api import _user
from tests.support import bearer, controller_settings, running_controller

HEARTBEAT = 0.3
SIZE = 64 * 1024 * 1024
MARKER = b"A67-PLAINTEXT-MARKER-0123456789"
REGIONS = ["eu-west", "us-east", "ap-south", "sa-east"]


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def payload(size: int) -> bytes:
    data = bytearray(os.urandom(size))
    for at in range(0, size - len(MARKER), 1024 * 1024):  # one marker per MiB
        data[at : at + len(MARKER)] = MARKER
    return bytes(data)


async def upload(
    stub: storage_pb2_grpc.StorageServiceStub, token: str, path: str, data: bytes, replicas: int = 3
) -> storage_pb2.StorageFile:
    async def messages() -> AsyncIterator[storage_pb2.UploadFileRequest]:
        yield storage_pb2.UploadFileRequest(
            metadata=storage_pb2.UploadFileMetadata(
                path=path, mime_type="application/x-test", replicas=replicas, size=len(data)
            )
        )
        for start in range(0, len(data), 256 * 1024):
            yield storage_pb2.UploadFileRequest(data=data[start : start + 256 * 1024])

    reply = await stub.UploadFile(messages(), metadata=bearer(token))
    return reply.file


async def download(
    stub: storage_pb2_grpc.StorageServiceStub, token: str, file_id: str, offset: int = 0, length: int = 0
) -> bytes:
    parts = []
    async for message in stub.DownloadFile(
        storage_pb2.DownloadFileRequest(file_id=file_id, offset=offset, length=length), metadata=bearer(token)
    ):
        parts.append(message.data)
    return b"".join(parts)


async def get(stub: storage_pb2_grpc.StorageServiceStub, token: str, file_id: str) -> storage_pb2.StorageFile:
    return (await stub.GetFile(storage_pb2.GetFileRequest(file_id=file_id), metadata=bearer(token))).file


def chunk_files(root: Path) -> dict[str, set[str]]:
    """region -> chunk ids on its disk."""
    out: dict[str, set[str]] = {}
    for region in REGIONS:
        directory = root / region / "chunks"
        out[region] = (
            {p.name for p in directory.iterdir() if not p.name.startswith(".")}
            if directory.is_dir()
            else set()
        )
    return out


def storage_agent(procs: object, address: str, token: str, region: str) -> object:
    args = [sys.executable, "-m", "controller.cli", "agent", "--data-dir", str(procs.root / region)]  # type: ignore[attr-defined]
    args += ["--region", region, "--controller", address, "--node-types", "storage", "--scrub-interval", "3"]
    return procs.start(args, f"agent-{region}.log", {"A67_AGENT_TOKEN": token})  # type: ignore[attr-defined]


async def test_files_are_chunked_encrypted_replicated_repaired_and_collected(
    tmp_path: Path, store_url: str
) -> None:
    clock = Clock()
    upgrade(store_url)
    settings = controller_settings(
        tmp_path / "controller",
        store_url=store_url,
        heartbeat_interval_seconds=HEARTBEAT,
        node_restart_grace_seconds=1.0,
        storage_gc_interval_seconds=3600.0,
        storage_repair_interval_seconds=0.5,
        storage_repair_rate_per_second=200.0,
    )
    with processes(tmp_path) as procs:
        async with (
            running_controller(settings) as controller,
            grpc.aio.insecure_channel(controller.address) as channel,
        ):
            assert controller.storage is not None
            controller.storage.clock = clock
            token = await _user(channel)
            client = Client(channel, token)
            stub = storage_pb2_grpc.StorageServiceStub(channel)
            enrollment = await client.enrollment(uses=4)
            agents = {r: storage_agent(procs, controller.address, enrollment, r) for r in REGIONS}
            nodes = await client.wait_ready(4, within=60)
            region_of = {n.id: n.region for n in nodes}

            # -- upload, placement, download, ranges --------------------------------------
            data = payload(SIZE)
            stored = await upload(stub, token, "big/data.bin", data)
            assert stored.size == SIZE
            assert stored.checksum == hashlib.sha256(data).hexdigest()
            assert stored.replication_status == storage_pb2.REPLICATION_STATUS_COMPLETE
            assert stored.encryption.algorithm == "AES-256-GCM"
            assert stored.encryption.key_id
            assert len(stored.chunks) == SIZE // settings.storage_chunk_bytes
            for chunk in stored.chunks:
                holders = [loc.node_id for loc in chunk.locations]
                assert len(holders) == 3
                assert len(set(holders)) == 3
                assert len({region_of[n] for n in holders}) == 3  # distinct regions
            assert {d.status for d in stored.distribution} == {"ready"}
            assert await download(stub, token, stored.id) == data
            assert (
                await download(stub, token, stored.id, offset=5_000_000, length=9_000_000)
                == data[5_000_000:14_000_000]
            )
            assert await download(stub, token, stored.id, offset=SIZE - 10) == data[-10:]

            # -- nodes hold ciphertext only -------------------------------------------------
            for region in REGIONS:
                for path in (tmp_path / region).rglob("*"):
                    if path.is_file():
                        assert MARKER not in path.read_bytes(), path

            # -- another user sees nothing --------------------------------------------------
            other = await _user(channel, "eve@example.com")
            for call in (
                stub.GetFile(storage_pb2.GetFileRequest(file_id=stored.id), metadata=bearer(other)),
                download(stub, other, stored.id),
                stub.DeleteFile(storage_pb2.DeleteFileRequest(file_id=stored.id), metadata=bearer(other)),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await call
                assert refused.value.code() == grpc.StatusCode.NOT_FOUND
            listed = await stub.ListFiles(storage_pb2.ListFilesRequest(), metadata=bearer(other))
            assert list(listed.files) == []
            mine = await stub.ListFiles(storage_pb2.ListFilesRequest(prefix="big/"), metadata=bearer(token))
            assert [f.id for f in mine.files] == [stored.id]

            # -- kill -9 one holder: reads go on, repair restores 3 copies on survivors -----
            victim = stored.chunks[0].locations[0].node_id
            victim_region = region_of[victim]
            agents[victim_region].send_signal(signal.SIGKILL)  # type: ignore[attr-defined]
            agents[victim_region].wait(timeout=10)  # type: ignore[attr-defined]
            assert await download(stub, token, stored.id) == data

            async def repaired() -> bool:
                f = await get(stub, token, stored.id)
                return f.replication_status == storage_pb2.REPLICATION_STATUS_COMPLETE and all(
                    len(c.locations) == 3 and victim not in {loc.node_id for loc in c.locations}
                    for c in f.chunks
                )

            await _until(repaired, "every chunk back to 3 copies on survivors", within=120)
            assert await download(stub, token, stored.id) == data
            on_victim = chunk_files(tmp_path)[victim_region]
            assert on_victim & {c.id for c in stored.chunks}  # its stale copies are still on its disk

            # -- the killed node comes back: its stale copies are trimmed, never served ------
            agents[victim_region] = storage_agent(procs, controller.address, enrollment, victim_region)

            async def trimmed() -> bool:
                return not (chunk_files(tmp_path)[victim_region] & {c.id for c in stored.chunks})

            await _until(trimmed, "the returning node's stale copies trimmed", within=60)
            latest = await get(stub, token, stored.id)
            assert all(victim not in {loc.node_id for loc in c.locations} for c in latest.chunks)

            # -- one flipped byte: the download is still right and the copy is repaired -----
            chunk = latest.chunks[3]
            holder_region = region_of[chunk.locations[0].node_id]
            copy = tmp_path / holder_region / "chunks" / chunk.id
            raw = bytearray(copy.read_bytes())
            raw[HEADER_BYTES + 1000] ^= 0x01
            copy.write_bytes(bytes(raw))
            assert await download(stub, token, stored.id) == data

            async def healed() -> bool:
                f = await get(stub, token, stored.id)
                c = next(c for c in f.chunks if c.id == chunk.id)
                on_disk = [
                    p.read_bytes()
                    for p in (tmp_path / r / "chunks" / chunk.id for r in REGIONS)
                    if p.is_file()
                ]
                good = [b for b in on_disk if hashlib.sha256(b[HEADER_BYTES:]).hexdigest() == chunk.checksum]
                return len(c.locations) == 3 and len(good) == 3 and len(on_disk) == 3

            await _until(healed, "the corrupt copy replaced by a verified one", within=60)
            assert await download(stub, token, stored.id) == data

            # -- a broken upload: no file, its chunks collected after the grace period ------
            sent = asyncio.Event()

            async def broken() -> AsyncIterator[storage_pb2.UploadFileRequest]:
                yield storage_pb2.UploadFileRequest(
                    metadata=storage_pb2.UploadFileMetadata(path="broken.bin", replicas=3)
                )
                piece = os.urandom(1024 * 1024)
                for _ in range(12):
                    yield storage_pb2.UploadFileRequest(data=piece)
                sent.set()
                await asyncio.Event().wait()  # never ends: the client goes away instead

            call = stub.UploadFile(broken(), metadata=bearer(token))
            await sent.wait()
            live = {c.id for c in (await get(stub, token, stored.id)).chunks}

            async def orphans_written() -> bool:
                return any(chunk_files(tmp_path)[r] - live for r in REGIONS)

            await _until(orphans_written, "chunks of the broken upload on the nodes", within=60)
            call.cancel()
            listed = await stub.ListFiles(
                storage_pb2.ListFilesRequest(prefix="broken"), metadata=bearer(token)
            )
            assert list(listed.files) == []

            await asyncio.sleep(0)  # let the controller see the cancellation
            # Not yet: within the grace period nothing is removed.
            await controller.storage.collect_garbage()
            assert any(chunk_files(tmp_path)[r] - live for r in REGIONS)

            async def collected() -> bool:
                clock.now += timedelta(seconds=settings.storage_gc_grace_seconds + 1)
                await controller.storage.collect_garbage()
                return not any(chunk_files(tmp_path)[r] - live for r in REGIONS)

            await _until(collected, "the broken upload's chunks removed after the grace period", within=60)
            assert await download(stub, token, stored.id) == data

            # -- delete: gone at once for the user, copies collected after the grace -------
            await stub.DeleteFile(storage_pb2.DeleteFileRequest(file_id=stored.id), metadata=bearer(token))
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await get(stub, token, stored.id)
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND
            clock.now += timedelta(seconds=settings.storage_gc_grace_seconds + 1)
            await controller.storage.collect_garbage()

            async def emptied() -> bool:
                return not any(chunk_files(tmp_path).values())

            await _until(emptied, "every copy of the deleted file removed", within=30)


# -- the controller's memory while a large file streams through it -----------------------------

STREAM_SIZE = 192 * 1024 * 1024
"""Big enough that holding the file (its plaintext or its ciphertext) would show: a
buffering upload grows by at least this much; a streaming one holds a few chunks
(3 sealed chunks being copied, 2 reused buffers: about 50 MiB measured, allocator slack
included). Small enough to take a few seconds with 3 local agents."""
STREAM_RSS_BOUND = STREAM_SIZE // 2


def rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


async def test_a_large_upload_streams_through_the_controller(tmp_path: Path) -> None:
    # A 1 s heartbeat: the upload keeps both cores busy, and a node late by more than a
    # tenth of an interval is suspect (and takes no copies).
    settings = controller_settings(tmp_path / "controller", heartbeat_interval_seconds=1.0)
    block = os.urandom(1024 * 1024)
    with processes(tmp_path) as procs:
        async with (
            running_controller(settings) as controller,
            grpc.aio.insecure_channel(controller.address) as channel,
        ):
            token = await _user(channel)
            client = Client(channel, token)
            stub = storage_pb2_grpc.StorageServiceStub(channel)
            enrollment = await client.enrollment(uses=3)
            for region in REGIONS[:3]:
                storage_agent(procs, controller.address, enrollment, region)
            await client.wait_ready(3, within=60)
            digest = hashlib.sha256()

            async def messages() -> AsyncIterator[storage_pb2.UploadFileRequest]:
                yield storage_pb2.UploadFileRequest(
                    metadata=storage_pb2.UploadFileMetadata(path="stream.bin", replicas=3, size=STREAM_SIZE)
                )
                for n in range(STREAM_SIZE // len(block)):
                    piece = n.to_bytes(8, "big") + block[8:]  # every MiB different
                    digest.update(piece)
                    for start in range(0, len(piece), 256 * 1024):
                        yield storage_pb2.UploadFileRequest(data=piece[start : start + 256 * 1024])

            # The controller runs in this process: sample its RSS while the upload runs.
            base = rss_bytes()
            peak = base
            done = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, rss_bytes())
                    done.wait(0.005)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            try:
                stored = (await stub.UploadFile(messages(), metadata=bearer(token))).file
            finally:
                done.set()
                sampler.join()
            assert stored.size == STREAM_SIZE
            assert stored.checksum == digest.hexdigest()
            assert stored.replication_status == storage_pb2.REPLICATION_STATUS_COMPLETE
            growth = peak - base
            assert growth < STREAM_RSS_BOUND, f"RSS grew by {growth / 2**20:.0f} MiB during the upload"


# -- the quota at commit: two concurrent uploads of one user --------------------------------------


async def test_concurrent_uploads_cannot_overshoot_the_quota(store_url: str, tmp_path: Path) -> None:
    """Two uploads that each fit but not together reach the commit at the same time:
    exactly one commits. The test holds the store's write lock (SQLite) or an exclusive
    lock on ``storage_files`` (PostgreSQL) until both commits are waiting inside the
    store, so both have passed every check made before the commit transaction."""
    await asyncio.to_thread(upgrade, store_url)
    store = await Store.open(store_url)
    blocker_engine = create_engine_for(store_url)
    try:
        user = await UserRepository(store).create("quota@example.com", "hash")
        limits = StorageLimits(max_bytes_per_user=100)
        fleet = Fleet(nodes=NodeRepository(store), cache=MemoryCache(), health_config=HealthConfig.fast(1.0))
        service = StorageService(store=store, fleet=fleet, vault=Vault(Keyring.generate("k1")), limits=limits)

        waiting = 0

        def before(*_: object) -> None:
            nonlocal waiting
            waiting += 1

        def after(*_: object) -> None:
            nonlocal waiting
            waiting -= 1

        event.listen(store.engine.sync_engine, "before_cursor_execute", before)
        event.listen(store.engine.sync_engine, "after_cursor_execute", after)

        async def commit(path: str) -> StorageFile:
            upload = _Upload(
                user_id=user.id, version_id=str(uuid.uuid4()), key=b"k" * 32, replicas=3, nodes=[]
            )
            upload.bytes_in = 60
            return await service._commit(upload, storage_pb2.UploadFileMetadata(path=path), [], "0" * 64)

        async with blocker_engine.connect() as blocker:
            if store.dialect_name == "sqlite":
                await blocker.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                await blocker.execute(text("LOCK TABLE storage_files IN EXCLUSIVE MODE"))
            first = asyncio.create_task(commit("a.bin"))
            second = asyncio.create_task(commit("b.bin"))

            async def both_waiting() -> bool:
                # on SQLite the second commit queues at the store's write gate, before SQLite
                gate = store.write_gate
                return waiting + (gate.waiting if gate is not None else 0) >= 2

            await _until(both_waiting, "both commits waiting inside the store", within=10)
            await blocker.rollback()
        results = await asyncio.gather(first, second, return_exceptions=True)
        committed = [r for r in results if isinstance(r, StorageFile)]
        refused = [r for r in results if isinstance(r, ResourceExhausted)]
        assert len(committed) == 1, results
        assert len(refused) == 1, results
        assert refused[0].reason == "STORAGE_QUOTA_EXCEEDED"
        async with store.session() as session:
            rows = list((await session.execute(select(StorageFile.path))).scalars())
        assert rows == [committed[0].path]
    finally:
        await blocker_engine.dispose()
        await store.close()


# -- repair reads the copies of lost nodes, not the whole store ---------------------------------


async def test_repair_reads_only_the_copies_of_lost_nodes(store_url: str) -> None:
    await asyncio.to_thread(upgrade, store_url)
    store = await Store.open(store_url)
    try:
        user = await UserRepository(store).create("repair@example.com", "hash")
        conditions = {"n1": NodeCondition.UP, "n2": NodeCondition.UP, "n3": NodeCondition.UP}
        conditions["n4"] = NodeCondition.UP

        class Service(StorageService):
            def condition(self, node_id: str) -> NodeCondition:
                return conditions.get(node_id, NodeCondition.LOST)

        fleet = Fleet(nodes=NodeRepository(store), cache=MemoryCache(), health_config=HealthConfig.fast(1.0))
        service = Service(store=store, fleet=fleet, vault=Vault(Keyring.generate("k1")))
        healthy = [str(uuid.uuid4()) for _ in range(60)]
        on_n4 = [str(uuid.uuid4()) for _ in range(3)]
        async with store.session() as session:
            for i, chunk_id in enumerate(healthy + on_n4):
                session.add(
                    StorageChunk(
                        id=chunk_id,
                        user_id=user.id,
                        version_id="v",
                        index=i,
                        size=1,
                        stored_size=29,
                        checksum="0" * 64,
                        replicas=3,
                        state="live",
                    )
                )
            await session.flush()
            for chunk_id in healthy:
                session.add_all(
                    StorageChunkCopy(chunk_id=chunk_id, node_id=n, state="ok") for n in ("n1", "n2", "n3")
                )
            for chunk_id in on_n4:
                session.add_all(
                    StorageChunkCopy(chunk_id=chunk_id, node_id=n, state="ok") for n in ("n1", "n2", "n4")
                )

        assert await service.repair_once() == 0  # the first pass reads everything once
        assert service.chunks_examined == len(healthy) + len(on_n4)
        assert await service.repair_once() == 0  # nothing lost, nothing flagged: nothing read
        assert service.chunks_examined == 0

        conditions["n4"] = NodeCondition.LOST
        await service.on_node_failed("n4", user.id)
        await service.repair_once()  # no storage node to copy to: the repair fails, and is retried
        assert service.chunks_examined == len(on_n4)
        await service.repair_once()
        assert service.chunks_examined == len(on_n4)

        await service.repair_once(full=True)
        assert service.chunks_examined == len(healthy) + len(on_n4)
    finally:
        await store.close()
