"""The storage federation harness: uploads, downloads, repair, inventory and GC.

Decisions come from :mod:`.plan` (pure) and the scheduler; this module reads the store
and the fleet, applies plans (one transaction each) and moves bytes through
:class:`.transfers.Transfers` and the node stream. See docs/storage.md.

Uploads of several controllers
    The chunks of an upload are ``pending`` until it commits, and name the controller
    running it (``uploader``: this service's ``controller_id``). An upload does not
    survive its controller: at start a controller marks garbage its own pending chunks
    (from before its restart) and those of no controller (rows from before migration
    0013); garbage collection also takes the pending chunks of uploads this process is
    not running whose controller is this one, none, or no longer serving the store
    (:func:`controller.registry.live_controllers`, read at most once per pass and only
    when such chunks of another controller exist). Another live controller's uploads
    are left to it. A service without a ``controller_id`` (tests, tools) is the only
    controller on its store: every pending chunk not of its running uploads is
    abandoned.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import logging
import math
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from automator67.v1 import node_pb2, storage_pb2
from sqlalchemy import Table, delete, func, insert, or_, select, true, update
from sqlalchemy.exc import IntegrityError

from controller.deployments.snapshot import node_view, user_nodes
from controller.errors import (
    ControllerError,
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from controller.federation.storage import crypto, plan
from controller.federation.storage.plan import ChunkView, NodeCondition, Replication
from controller.federation.storage.transfers import ChunkMissing, Payload, Transfers
from controller.leases import Fence, LoopLeases, my_turn
from controller.nodes.fleet import Fleet
from controller.nodes.health import NodeState
from controller.registry import live_controllers
from controller.scheduling import ReplicaRequest, Resources, Snapshot, place
from controller.store.db import Store
from controller.store.models import Node, StorageChunk, StorageChunkCopy, StorageFile, User
from controller.store.paging import keyset_page
from controller.timestamps import timestamp
from controller.vault import Vault

log = logging.getLogger("a67.storage")

GC_LEASE = "storage-gc"
"""Garbage collection's loop lease: one controller sharing the store collects at a time."""

STORAGE_NODE_TYPE = "storage"
CHUNK_DIR = "chunks"
UPLOAD_WINDOW = 3
"""Sealed chunks of one upload being replicated at once; the next one is sealed (in a
worker thread) while they are pushed. Bounds the upload's memory: this many sealed
chunks, one plaintext buffer (reused) and the chunk being sealed."""
REPAIR_CONCURRENCY = 4
FULL_REPAIR_SWEEP_SECONDS = 600.0
"""How often a repair pass reads every live chunk (a safety net: copies on nodes the
health monitor no longer tracks, anything a restart forgot). Other passes read only the
copies on lost nodes (by the copies' node index) and the chunks known to lack a copy."""
STORE_ATTEMPTS = 3
"""Targets tried per missing copy before an upload gives up on a chunk."""
DOWNLOAD_PIECE = 1024 * 1024
READ_AHEAD = 2
"""Chunks of a download being read beyond the one being sent."""
INVENTORY_MARGIN_SECONDS = 60.0
"""A copy row must have been verified this long before a complete inventory that lacks
it counts it as lost (the node listed its disk a moment before it reported)."""
STATUS = {
    Replication.REPLICATING: storage_pb2.REPLICATION_STATUS_REPLICATING,
    Replication.COMPLETE: storage_pb2.REPLICATION_STATUS_COMPLETE,
    Replication.DEGRADED: storage_pb2.REPLICATION_STATUS_DEGRADED,
}


def fetch_message(piece: bytes | memoryview) -> bytes:
    """The serialized ``FetchChunkResponse(data=piece)``, made with one copy of ``piece``
    (field 1, length-delimited: its tag, its length as a varint, the bytes).

    >>> fetch_message(b"x" * 300) == node_pb2.FetchChunkResponse(data=b"x" * 300).SerializeToString()
    True
    >>> fetch_message(b"") == node_pb2.FetchChunkResponse().SerializeToString()
    True
    """
    length = len(piece)
    if not length:
        return b""
    head = bytearray(b"\x0a")
    while length > 0x7F:
        head.append(0x80 | (length & 0x7F))
        length >>= 7
    head.append(length)
    return b"".join((head, piece))


def _payload(sealed: bytes | memoryview) -> Payload[bytes]:
    return Payload(sealed, fetch_message)


def _seal(
    sealer: crypto.Sealer, digest: Any, chunk_id: str, index: int, plaintext: memoryview, out: memoryview
) -> str:
    """In a worker thread: the file digest goes on (chunks are sealed one at a time, in
    order), the chunk is sealed into ``out`` and the SHA-256 of the sealed bytes returned."""
    digest.update(plaintext)
    sealer.seal_into(chunk_id, index, plaintext, out)
    return hashlib.sha256(out).hexdigest()


_INSERT_CHUNK = insert(cast(Table, StorageChunk.__table__))
_INSERT_COPY = insert(cast(Table, StorageChunkCopy.__table__))


def transfer_seconds(size: int) -> float:
    """How long one chunk transfer may take: 15 s plus 2 s per MiB."""
    return 15.0 + 2.0 * size / (1024 * 1024)


@dataclass(frozen=True)
class StorageLimits:
    chunk_bytes: int = 4 * 1024 * 1024
    max_bytes_per_user: int = 10 * 1024**3
    max_files_per_user: int = 100_000
    gc_grace_seconds: float = 3600.0
    gc_interval_seconds: float = 60.0
    repair_interval_seconds: float = 10.0
    repair_rate_per_second: float = 20.0


def _not_found(file_id: str) -> NotFound:
    return NotFound(f"File {file_id!r} was not found", reason="FILE_NOT_FOUND")


@dataclass
class _Upload:
    user_id: str
    version_id: str
    key: bytes
    replicas: int
    nodes: list[Node]
    bytes_in: int = 0


class StorageService:
    """Files of users, spread over their storage nodes (docs/storage.md)."""

    def __init__(
        self,
        *,
        store: Store,
        fleet: Fleet,
        vault: Vault,
        limits: StorageLimits | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
        controller_id: str | None = None,
    ) -> None:
        self.store = store
        self.controller_id = controller_id
        """This controller's id (``controllers.id``), written on its uploads' chunks; None:
        the only controller on the store (see the module's docstring)."""
        self.fleet = fleet
        self.vault = vault
        self.limits = limits or StorageLimits()
        self.clock = clock
        self.transfers = Transfers()
        rate = self.limits.repair_rate_per_second
        self.repair_bucket = plan.TokenBucket(rate=rate, burst=max(1.0, rate), clock=monotonic)
        self._active_versions: set[str] = set()
        self._writing: dict[str, int] = defaultdict(int)  # node -> bytes being written
        self._repair_wanted = asyncio.Event()
        self._repairing: set[str] = set()  # chunk ids being repaired
        # What the next repair pass looks at (besides the copies on lost nodes): nodes the
        # health monitor reported failed and chunks known to lack a copy. A full pass over
        # every live chunk runs only at start and every FULL_REPAIR_SWEEP_SECONDS.
        self._repair_nodes: set[str] = set()
        self._repair_chunks: set[str] = set()
        self._monotonic = monotonic
        self._last_full_sweep: float | None = None
        self.chunks_examined = 0
        """Chunks the latest repair pass read (for tests and operators)."""
        self._tasks: list[asyncio.Task[None]] = []
        self.loop_leases: LoopLeases | None = None
        """Set by the server: garbage collection runs where its lease is (controller/leases.py)."""
        self.copies_repaired = 0
        self.copies_collected = 0

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Uploads do not survive a restart: this controller's pending chunks (and those of
        no controller) become garbage now; another controller's are left to GC."""
        async with self.store.session() as session:
            await session.execute(
                update(StorageChunk)
                .where(StorageChunk.state == "pending", self._mine())
                .values(state="garbage", garbage_at=self.clock())
            )
        self._tasks = [
            asyncio.create_task(self._repair_loop(), name="storage-repair"),
            asyncio.create_task(self._gc_loop(), name="storage-gc"),
        ]

    def _mine(self) -> Any:
        """The condition on a chunk's ``uploader``: this controller's or no controller's
        (all chunks, without a ``controller_id``)."""
        if self.controller_id is None:
            return true()
        return or_(StorageChunk.uploader.is_(None), StorageChunk.uploader == self.controller_id)

    async def _orphaned(self) -> list[str]:
        """The pending chunks of other controllers' uploads whose controller is gone (one
        read of the live controllers, only when other controllers' pending chunks exist).
        The chunks are read before the controllers, so an upload of a controller that
        (re)starts after the read is never among them."""
        if self.controller_id is None:
            return []
        async with self.store.session() as session:
            rows = (
                await session.execute(
                    select(StorageChunk.id, StorageChunk.uploader).where(
                        StorageChunk.state == "pending",
                        StorageChunk.uploader.is_not(None),
                        StorageChunk.uploader != self.controller_id,
                    )
                )
            ).all()
        if not rows:
            return []
        live = await live_controllers(self.store, wall=self.clock)
        return [chunk_id for chunk_id, uploader in rows if uploader not in live]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    # -- nodes ------------------------------------------------------------------------------

    def condition(self, node_id: str) -> NodeCondition:
        state = self.fleet.state_of(node_id)
        if state is None or state == NodeState.REMOVED:
            return NodeCondition.LOST
        if state == NodeState.FAILED:
            return NodeCondition.LOST if self.fleet.recovery_due(node_id) else NodeCondition.AWAY
        if self.fleet.streams.get(node_id) is None or state == NodeState.SUSPECT:
            return NodeCondition.AWAY
        return NodeCondition.UP

    def _snapshot(self, user_id: str, nodes: Sequence[Node]) -> Snapshot:
        views = []
        for node in nodes:
            if node.user_id != user_id:
                continue
            view = node_view(node, self.fleet, Resources())
            live = self.fleet.live.get(node.id)
            announced = live.capabilities if live is not None else None
            types = list(announced.node_types) if announced is not None and announced.node_types else []
            if not types:
                types = list((node.capabilities or {}).get("node_types", []))
            used_mb = 0.0
            if live is not None:
                used_mb = live.metrics.disk_percent / 100.0 * view.capabilities.disk_gb * 1024
            used_mb += self._writing.get(node.id, 0) / (1024 * 1024)
            views.append(
                dataclasses.replace(
                    view, node_types=frozenset(types), reserved=Resources(disk_mb=math.ceil(used_mb))
                )
            )
        return Snapshot(tuple(views), user_id=user_id)

    def _targets(
        self,
        user_id: str,
        nodes: Sequence[Node],
        count: int,
        seed: str,
        size: int,
        exclude: Iterable[str],
        occupied: Iterable[str],
    ) -> list[str]:
        snapshot = self._snapshot(user_id, nodes)
        regions: dict[str, int] = defaultdict(int)
        for node_id in occupied:
            view = snapshot.node(node_id)
            if view is not None:
                regions[view.region] += 1
        request = ReplicaRequest(
            cpu_cores=0.0,
            memory_mb=0,
            disk_mb=max(1, math.ceil(size / (1024 * 1024))),
            node_type=STORAGE_NODE_TYPE,
        )
        try:
            return place(
                snapshot, request, count, seed, exclude=frozenset(exclude), occupied_regions=regions
            ).node_ids
        except Unavailable as exc:
            raise Unavailable(
                f"Not enough storage nodes for {count} more cop{'y' if count == 1 else 'ies'} of a chunk: {exc.message}",
                reason="INSUFFICIENT_STORAGE_NODES",
            ) from None

    # -- node commands --------------------------------------------------------------------

    async def _store_copy(self, node_id: str, chunk_id: str, sealed: Payload[bytes], checksum: str) -> None:
        """Send one copy to ``node_id`` and wait until it is durable and verified there."""
        transfer_id = self.transfers.offer(node_id, sealed)
        size = sealed.size
        self._writing[node_id] += size
        try:
            result = await self.fleet.streams.send_command(
                node_id,
                node_pb2.NodeCommand(
                    store_chunk=node_pb2.StoreChunk(
                        chunk_id=chunk_id, transfer_id=transfer_id, size=size, sha256=checksum
                    )
                ),
                transfer_seconds(size),
            )
        finally:
            self.transfers.finish(transfer_id)
            self._writing[node_id] -= size
            if self._writing[node_id] <= 0:
                del self._writing[node_id]
        if not result.ok:
            raise Unavailable(f"node {node_id} did not store chunk {chunk_id}: {result.error_message}")

    async def _read_copy(self, node_id: str, chunk_id: str, checksum: str, stored_size: int) -> bytes:
        """One node's copy of a chunk, verified against ``checksum``.

        ``ChunkMissing`` when the node has no good copy or sent bytes that do not match
        (the copy is bad); ``ControllerError`` when the node cannot be asked now."""
        transfer_id, result = self.transfers.expect(node_id, stored_size)
        try:
            command = node_pb2.NodeCommand(
                read_chunk=node_pb2.ReadChunk(chunk_id=chunk_id, transfer_id=transfer_id, sha256=checksum)
            )
            wait = transfer_seconds(stored_size)
            answer = asyncio.ensure_future(self.fleet.streams.send_command(node_id, command, wait))
            try:
                waiters: set[asyncio.Future[Any]] = {answer, result}
                done, _ = await asyncio.wait(waiters, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if result in done:
                    data = result.result()
                elif answer in done:
                    reply = answer.result()
                    if not reply.ok:
                        if "missing" in reply.error_message or "corrupt" in reply.error_message:
                            raise ChunkMissing(reply.error_message)
                        raise Unavailable(
                            f"node {node_id} did not send chunk {chunk_id}: {reply.error_message}"
                        )
                    data = await asyncio.wait_for(result, wait)
                else:
                    raise DeadlineExceeded(f"node {node_id} did not send chunk {chunk_id} in time")
            finally:
                if not answer.done():
                    answer.cancel()
                with contextlib.suppress(BaseException):
                    await answer
        finally:
            self.transfers.finish(transfer_id)
        if hashlib.sha256(data).hexdigest() != checksum:
            raise ChunkMissing(f"node {node_id} sent chunk {chunk_id} with the wrong checksum")
        return data

    async def _delete_copies(self, node_id: str, chunk_ids: Sequence[str]) -> bool:
        """Ask a node to remove copies; whether it did."""
        if not chunk_ids:
            return True
        try:
            for start in range(0, len(chunk_ids), 1000):
                reply = await self.fleet.streams.send_command(
                    node_id,
                    node_pb2.NodeCommand(
                        delete_chunks=node_pb2.DeleteChunks(chunk_ids=chunk_ids[start : start + 1000])
                    ),
                    30.0,
                )
                if not reply.ok:
                    return False
        except ControllerError:
            return False
        return True

    # -- upload -----------------------------------------------------------------------------

    async def _usage(self, user_id: str, exclude_path: str) -> tuple[int, int]:
        async with self.store.session() as session:
            row = (
                await session.execute(
                    select(func.count(StorageFile.id), func.coalesce(func.sum(StorageFile.size), 0)).where(
                        StorageFile.user_id == user_id, StorageFile.path != exclude_path
                    )
                )
            ).one()
        return int(row[0]), int(row[1])

    def _quota_error(self, what: str, limit: int) -> ResourceExhausted:
        return ResourceExhausted(
            f"Storage quota exceeded: {what} (limit {limit}); nothing was stored",
            reason="STORAGE_QUOTA_EXCEEDED",
            metadata={"limit": str(limit)},
        )

    async def upload(
        self, user_id: str, metadata: storage_pb2.UploadFileMetadata, data: AsyncIterator[bytes | memoryview]
    ) -> storage_pb2.StorageFile:
        violations = plan.metadata_violations(
            metadata.path, metadata.mime_type, metadata.replicas, metadata.size, metadata.sha256
        )
        if violations:
            raise InvalidArgument(
                "The upload's metadata is invalid: "
                + "; ".join(f"{v.field}: {v.description}" for v in violations),
                reason="INVALID_FILE_METADATA",
                field_violations=violations,
            )
        replicas = metadata.replicas or plan.DEFAULT_REPLICAS
        limits = self.limits
        files, used = await self._usage(user_id, metadata.path)
        if files + 1 > limits.max_files_per_user:
            raise self._quota_error(f"{files} files already", limits.max_files_per_user)
        allowed = limits.max_bytes_per_user - used
        if metadata.size > allowed:
            raise self._quota_error(
                f"{metadata.size} bytes announced, {allowed} left", limits.max_bytes_per_user
            )
        nodes = await user_nodes(self.store, user_id)
        # Fail fast when the fleet cannot hold the copies at all.
        self._targets(user_id, nodes, replicas, metadata.path, limits.chunk_bytes, (), ())
        upload = _Upload(
            user_id=user_id,
            version_id=str(uuid.uuid4()),
            key=crypto.new_data_key(),
            replicas=replicas,
            nodes=nodes,
        )
        self._active_versions.add(upload.version_id)
        digest = hashlib.sha256()
        sealer = crypto.Sealer(upload.key)
        entries: dict[int, dict[str, Any]] = {}
        in_flight: set[asyncio.Task[None]] = set()
        failures: list[BaseException] = []
        chunk_bytes = limits.chunk_bytes
        # Two buffers, reused for every chunk: the plaintext being filled and the chunk
        # being sealed (the messages of a sealed chunk hold their own copy).
        window = memoryview(bytearray(chunk_bytes))
        sealed_window = memoryview(bytearray(chunk_bytes + crypto.OVERHEAD_BYTES))
        filled = 0
        index = 0

        def done(task: asyncio.Task[None]) -> None:
            in_flight.discard(task)
            if not task.cancelled() and task.exception() is not None:
                failures.append(task.exception())  # type: ignore[arg-type]

        async def put(length: int) -> None:
            """Seal the buffered chunk (the buffer is free again after) and start its copies."""
            nonlocal index
            while len(in_flight) >= UPLOAD_WINDOW:
                await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            if failures:
                raise failures[0]
            chunk_id = str(uuid.uuid4())
            out = sealed_window[: length + crypto.OVERHEAD_BYTES]
            checksum = await asyncio.to_thread(_seal, sealer, digest, chunk_id, index, window[:length], out)
            task = asyncio.create_task(
                self._put_chunk(upload, index, chunk_id, length, _payload(out), checksum, entries)
            )
            in_flight.add(task)
            task.add_done_callback(done)
            index += 1

        try:
            async for piece in data:
                if failures:
                    raise failures[0]
                upload.bytes_in += len(piece)
                if upload.bytes_in > allowed:
                    raise self._quota_error(
                        f"the upload passed the {allowed} bytes left", limits.max_bytes_per_user
                    )
                if metadata.size and upload.bytes_in > metadata.size:
                    raise InvalidArgument(
                        f"The upload has more than the {metadata.size} bytes announced",
                        reason="FILE_SIZE_MISMATCH",
                        field_violations=[FieldViolation("metadata.size", "does not match the bytes sent")],
                    )
                source = memoryview(piece)
                taken = 0
                while taken < len(source):
                    n = min(len(source) - taken, chunk_bytes - filled)
                    window[filled : filled + n] = source[taken : taken + n]
                    filled += n
                    taken += n
                    if filled == chunk_bytes:
                        await put(filled)
                        filled = 0
            if filled or index == 0:
                await put(filled)
            if in_flight:
                await asyncio.wait(set(in_flight))
            if failures:
                raise failures[0]
            if metadata.size and upload.bytes_in != metadata.size:
                raise InvalidArgument(
                    f"The upload has {upload.bytes_in} bytes, {metadata.size} were announced; nothing was stored",
                    reason="FILE_SIZE_MISMATCH",
                    field_violations=[FieldViolation("metadata.size", "does not match the bytes sent")],
                )
            if metadata.sha256 and digest.hexdigest() != metadata.sha256:
                raise InvalidArgument(
                    "The upload's SHA-256 does not match the one announced; nothing was stored",
                    reason="FILE_CHECKSUM_MISMATCH",
                    field_violations=[FieldViolation("metadata.sha256", "does not match the bytes sent")],
                )
            row = await self._commit(
                upload, metadata, [entries[i] for i in sorted(entries)], digest.hexdigest()
            )
        except BaseException:
            for task in list(in_flight):
                task.cancel()
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._abandon(upload.version_id)
            raise
        finally:
            self._active_versions.discard(upload.version_id)
        log.info(
            "stored file %s (%d bytes, %d chunks, %d copies each)",
            row.id,
            row.size,
            len(row.chunks),
            replicas,
        )
        return await self._to_proto(row)

    async def _put_chunk(
        self,
        upload: _Upload,
        index: int,
        chunk_id: str,
        size: int,
        sealed: Payload[bytes],
        checksum: str,
        entries: dict[int, dict[str, Any]],
    ) -> None:
        row = {
            "id": chunk_id,
            "user_id": upload.user_id,
            "version_id": upload.version_id,
            "index": index,
            "size": size,
            "stored_size": sealed.size,
            "checksum": checksum,
            "replicas": upload.replicas,
            "state": "pending",
            "created_at": self.clock(),
            "uploader": self.controller_id,
        }
        await self._replicate(
            upload.user_id, upload.nodes, chunk_id, sealed, checksum, upload.replicas, set(), chunk=row
        )
        entries[index] = {"id": chunk_id, "index": index, "size": size, "checksum": checksum}

    async def _replicate(
        self,
        user_id: str,
        nodes: Sequence[Node],
        chunk_id: str,
        sealed: Payload[bytes],
        checksum: str,
        wanted: int,
        holders: set[str],
        *,
        chunk: dict[str, Any] | None = None,
    ) -> list[str]:
        """Make ``wanted`` verified copies on nodes not in ``holders``; a target that fails is
        replaced by another node. Returns the nodes that now hold a verified copy.

        A copy row (``writing``) is written before its copy is sent. With ``chunk`` (the
        row of an upload's new chunk) the chunk row goes in the same transaction as the
        first copy rows, and verified copies stay ``writing`` until the upload's commit marks them
        ``ok`` in one statement (a pending chunk is read by nobody); otherwise (repair)
        they are marked ``ok`` at once."""
        stored: list[str] = []
        tried: set[str] = set()
        attempts = 0
        while len(stored) < wanted:
            attempts += 1
            if attempts > STORE_ATTEMPTS + wanted:
                raise Unavailable(
                    f"Chunk {chunk_id} could not be stored on enough nodes (tried {sorted(tried)})",
                    reason="CHUNK_NOT_STORED",
                )
            targets = self._targets(
                user_id,
                nodes,
                wanted - len(stored),
                chunk_id,
                sealed.size,
                holders | tried | set(stored),
                [*holders, *stored],
            )
            async with self.store.session() as session:
                if chunk is not None:  # plain inserts (no unit of work): the rows are new
                    # Core inserts of the tables with the rows as parameters: compiled once
                    # (cached), not per chunk as an ORM insert of literal values would be.
                    if attempts == 1:
                        await session.execute(_INSERT_CHUNK, [chunk])
                    now = self.clock()
                    await session.execute(
                        _INSERT_COPY,
                        [
                            {"chunk_id": chunk_id, "node_id": n, "state": "writing", "created_at": now}
                            for n in targets
                        ],
                    )
                else:
                    for node_id in targets:
                        await session.merge(
                            StorageChunkCopy(
                                chunk_id=chunk_id, node_id=node_id, state="writing", created_at=self.clock()
                            )
                        )
            results = await asyncio.gather(
                *(self._store_copy(n, chunk_id, sealed, checksum) for n in targets), return_exceptions=True
            )
            good = [n for n, r in zip(targets, results, strict=True) if not isinstance(r, BaseException)]
            bad = [n for n, r in zip(targets, results, strict=True) if isinstance(r, BaseException)]
            for node_id, error in zip(targets, results, strict=True):
                if isinstance(error, asyncio.CancelledError):
                    raise error
                if isinstance(error, BaseException):
                    log.warning(
                        "chunk %s: copy on node %s failed (%s); another node takes its place",
                        chunk_id,
                        node_id,
                        error,
                    )
            if (good and chunk is None) or bad:
                async with self.store.session() as session:
                    await self._settle_copies(session, chunk_id, [] if chunk is not None else good, bad)
            stored += good
            tried |= set(bad)
        return stored

    async def _settle_copies(self, session: Any, chunk_id: str, good: list[str], bad: list[str]) -> None:
        """Verified copies ``ok``, failed ones' rows gone."""
        if good:
            await session.execute(
                update(StorageChunkCopy)
                .where(StorageChunkCopy.chunk_id == chunk_id, StorageChunkCopy.node_id.in_(good))
                .values(state="ok", created_at=self.clock())
            )
        if bad:
            await session.execute(
                delete(StorageChunkCopy).where(
                    StorageChunkCopy.chunk_id == chunk_id, StorageChunkCopy.node_id.in_(bad)
                )
            )

    async def _commit(
        self,
        upload: _Upload,
        metadata: storage_pb2.UploadFileMetadata,
        chunks: list[dict[str, Any]],
        checksum: str,
    ) -> StorageFile:
        """Make the new version visible in one transaction (replacing a file at the path)."""
        now = self.clock()
        key_id = str(uuid.uuid4())
        wrapped = self.vault.encrypt(
            upload.key, owner=crypto.key_owner(upload.user_id), purpose=crypto.key_purpose(key_id)
        )
        encryption = {"algorithm": crypto.ALGORITHM, "key_id": key_id, "wrapped_key": wrapped}
        for attempt in range(2):
            try:
                async with self.store.session() as session:
                    # The user's row is locked first (a no-op write): concurrent commits of
                    # one user queue here, so the quota read below counts every file
                    # committed before (PostgreSQL: row lock; SQLite: the write lock,
                    # taken before any read of this transaction).
                    await session.execute(
                        update(User).where(User.id == upload.user_id).values(active=User.active)
                    )
                    existing = (
                        await session.execute(
                            select(StorageFile).where(
                                StorageFile.user_id == upload.user_id, StorageFile.path == metadata.path
                            )
                        )
                    ).scalar_one_or_none()
                    count, used = (
                        await session.execute(
                            select(
                                func.count(StorageFile.id), func.coalesce(func.sum(StorageFile.size), 0)
                            ).where(StorageFile.user_id == upload.user_id, StorageFile.path != metadata.path)
                        )
                    ).one()
                    if int(count) + 1 > self.limits.max_files_per_user:
                        raise self._quota_error(f"{count} files already", self.limits.max_files_per_user)
                    if int(used) + upload.bytes_in > self.limits.max_bytes_per_user:
                        raise self._quota_error(
                            f"{int(used) + upload.bytes_in} bytes with this file",
                            self.limits.max_bytes_per_user,
                        )
                    values = {
                        "size": upload.bytes_in,
                        "mime_type": metadata.mime_type or plan.DEFAULT_MIME_TYPE,
                        "chunks": chunks,
                        "distribution": [],
                        "checksum": checksum,
                        "encryption": encryption,
                        "replicas": upload.replicas,
                        "replication_status": str(Replication.COMPLETE),
                        "modified_at": now,
                        "version_id": upload.version_id,
                    }
                    if existing is not None:
                        old_version = existing.version_id
                        for name, value in values.items():
                            setattr(existing, name, value)
                        row = existing
                        if old_version:
                            await session.execute(
                                update(StorageChunk)
                                .where(StorageChunk.version_id == old_version)
                                .values(state="garbage", garbage_at=now)
                            )
                    else:
                        row = StorageFile(
                            id=str(uuid.uuid4()),
                            user_id=upload.user_id,
                            path=metadata.path,
                            created_at=now,
                            **values,
                        )
                        session.add(row)
                    await self._seal_version(session, upload, len(chunks), now)
                return row
            except IntegrityError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def _seal_version(self, session: Any, upload: _Upload, chunks: int, now: datetime) -> None:
        """In the commit: the upload's copies (every one verified; failed ones' rows were
        dropped) become ``ok`` and its chunks ``live`` — unless a copy row vanished
        meanwhile (a node reported it corrupt), then nothing is committed."""
        version_chunks = select(StorageChunk.id).where(StorageChunk.version_id == upload.version_id)
        await session.execute(
            update(StorageChunkCopy)
            .where(StorageChunkCopy.chunk_id.in_(version_chunks), StorageChunkCopy.state == "writing")
            .values(state="ok", created_at=now)
        )
        counts = (
            await session.execute(
                select(StorageChunkCopy.chunk_id, func.count())
                .where(StorageChunkCopy.chunk_id.in_(version_chunks), StorageChunkCopy.state == "ok")
                .group_by(StorageChunkCopy.chunk_id)
            )
        ).all()
        if len(counts) != chunks or any(int(c[1]) < upload.replicas for c in counts):
            raise Unavailable(
                "A copy of the upload was lost before it completed; nothing was stored",
                reason="CHUNK_NOT_STORED",
            )
        sealed = await session.execute(
            update(StorageChunk)
            .where(StorageChunk.version_id == upload.version_id, StorageChunk.state == "pending")
            .values(state="live")
        )
        if getattr(sealed, "rowcount", chunks) != chunks:
            # collected meanwhile: this controller was taken for gone (paused past the stale
            # time) and another one's garbage collection abandoned the upload
            raise Unavailable(
                "The upload was abandoned before it completed (its controller was taken for gone); "
                "nothing was stored",
                reason="UPLOAD_ABANDONED",
            )

    async def _abandon(self, version_id: str) -> None:
        async with self.store.session() as session:
            await session.execute(
                update(StorageChunk)
                .where(StorageChunk.version_id == version_id, StorageChunk.state == "pending")
                .values(state="garbage", garbage_at=self.clock())
            )

    # -- metadata -------------------------------------------------------------------------

    async def _owned(self, user_id: str, file_id: str) -> StorageFile:
        row = None
        if file_id and len(file_id) <= 36:
            async with self.store.session() as session:
                row = (
                    await session.execute(
                        select(StorageFile).where(StorageFile.id == file_id, StorageFile.user_id == user_id)
                    )
                ).scalar_one_or_none()
        if row is None:
            raise _not_found(file_id)
        return row

    async def _chunk_views(self, version_ids: Sequence[str]) -> dict[str, list[ChunkView]]:
        if not version_ids:
            return {}
        async with self.store.session() as session:
            chunks = list(
                (
                    await session.execute(
                        select(StorageChunk).where(StorageChunk.version_id.in_(version_ids))
                    )
                ).scalars()
            )
            ids = [c.id for c in chunks]
            copies: dict[str, dict[str, str]] = defaultdict(dict)
            for start in range(0, len(ids), 500):
                for copy in (
                    await session.execute(
                        select(StorageChunkCopy).where(
                            StorageChunkCopy.chunk_id.in_(ids[start : start + 500])
                        )
                    )
                ).scalars():
                    copies[copy.chunk_id][copy.node_id] = copy.state
        out: dict[str, list[ChunkView]] = defaultdict(list)
        for c in sorted(chunks, key=lambda c: c.index):
            out[c.version_id].append(
                ChunkView(c.id, c.user_id, c.replicas, c.stored_size, c.checksum, dict(copies.get(c.id, {})))
            )
        return out

    async def _to_proto(
        self, row: StorageFile, views: list[ChunkView] | None = None, *, locations: bool = True
    ) -> storage_pb2.StorageFile:
        if views is None:
            views = (await self._chunk_views([row.version_id] if row.version_id else [])).get(
                row.version_id or "", []
            )
        by_id = {v.chunk_id: v for v in views}
        repairing = any(v.chunk_id in self._repairing for v in views)
        status = plan.replication_status(views, self.condition, repairing) if views else Replication.COMPLETE
        encryption = row.encryption or {}
        message = storage_pb2.StorageFile(
            id=row.id,
            user_id=row.user_id,
            path=row.path,
            size=row.size,
            mime_type=row.mime_type,
            checksum=row.checksum or "",
            replicas=row.replicas,
            replication_status=STATUS[status],
            created_at=timestamp(row.created_at),
            modified_at=timestamp(row.modified_at),
            encryption=storage_pb2.FileEncryption(
                algorithm=str(encryption.get("algorithm", "")), key_id=str(encryption.get("key_id", ""))
            ),
        )
        accessed = timestamp(row.last_accessed) if row.last_accessed is not None else None
        if accessed is not None:
            message.last_accessed.CopyFrom(accessed)
        per_node: dict[str, list[str]] = defaultdict(list)
        for entry in row.chunks or []:
            chunk = message.chunks.add(
                index=int(entry["index"]),
                size=int(entry["size"]),
                checksum=str(entry["checksum"]),
                id=str(entry["id"]),
            )
            view = by_id.get(str(entry["id"]))
            if view is None:
                continue
            for node_id, state in sorted(view.copies.items()):
                per_node[node_id].append(state)
                if locations and state == "ok":
                    chunk.locations.add(node_id=node_id, storage_path=f"{CHUNK_DIR}/{view.chunk_id}")
        if locations and per_node:
            providers = await self._providers(list(per_node))
            for node_id, states in sorted(per_node.items()):
                condition = self.condition(node_id)
                if condition != NodeCondition.UP:
                    node_status = "failed"
                elif any(s == "writing" for s in states):
                    node_status = "uploading"
                else:
                    node_status = "ready"
                message.distribution.add(
                    node_id=node_id,
                    provider=providers.get(node_id, ""),
                    storage_path=CHUNK_DIR,
                    status=node_status,
                    chunks=len(states),
                )
        return message

    async def _providers(self, node_ids: list[str]) -> dict[str, str]:
        async with self.store.session() as session:
            rows = (await session.execute(select(Node.id, Node.provider).where(Node.id.in_(node_ids)))).all()
        return {r[0]: r[1] for r in rows}

    async def get(self, user_id: str, file_id: str) -> storage_pb2.StorageFile:
        return await self._to_proto(await self._owned(user_id, file_id))

    async def list_files(
        self, user_id: str, prefix: str, page_size: int, page_token: str
    ) -> tuple[list[storage_pb2.StorageFile], str]:
        statement = select(StorageFile).where(StorageFile.user_id == user_id)
        if prefix:
            statement = statement.where(StorageFile.path.startswith(prefix, autoescape=True))
        rows, token = await keyset_page(self.store, statement, StorageFile, page_size, page_token)
        views = await self._chunk_views([r.version_id for r in rows if r.version_id])
        return [
            await self._to_proto(r, views.get(r.version_id or "", []), locations=False) for r in rows
        ], token

    async def delete(self, user_id: str, file_id: str) -> None:
        row = await self._owned(user_id, file_id)
        async with self.store.session() as session:
            await session.execute(
                delete(StorageFile).where(StorageFile.id == row.id, StorageFile.user_id == user_id)
            )
            if row.version_id:
                await session.execute(
                    update(StorageChunk)
                    .where(StorageChunk.version_id == row.version_id)
                    .values(state="garbage", garbage_at=self.clock())
                )
        log.info("deleted file %s; its chunks are collected after the grace period", row.id)

    # -- download ---------------------------------------------------------------------------

    async def open_download(
        self, user_id: str, file_id: str, offset: int, length: int
    ) -> tuple[storage_pb2.StorageFile, int, int, AsyncIterator[bytes]]:
        """The file, the range served, and its bytes. The chunk list and key are pinned
        now: a replacement or deletion meanwhile does not mix versions (the old chunks
        stay on the nodes for the grace period)."""
        row = await self._owned(user_id, file_id)
        if offset < 0 or length < 0:
            raise InvalidArgument(
                "The range is invalid",
                field_violations=[
                    FieldViolation("offset" if offset < 0 else "length", "must not be negative")
                ],
            )
        if offset > row.size or (offset == row.size and row.size > 0 and length > 0):
            raise InvalidArgument(
                f"The range starts at {offset}; the file has {row.size} bytes",
                reason="RANGE_NOT_SATISFIABLE",
                field_violations=[FieldViolation("offset", "is past the end of the file")],
            )
        end = row.size if length == 0 else min(row.size, offset + length)
        encryption = row.encryption or {}
        key = self.vault.decrypt(
            str(encryption["wrapped_key"]),
            owner=crypto.key_owner(user_id),
            purpose=crypto.key_purpose(str(encryption["key_id"])),
        )
        views = (await self._chunk_views([row.version_id] if row.version_id else [])).get(
            row.version_id or "", []
        )
        by_id = {v.chunk_id: v for v in views}
        entries = sorted(row.chunks or [], key=lambda e: int(e["index"]))
        async with self.store.session() as session:
            await session.execute(
                update(StorageFile).where(StorageFile.id == row.id).values(last_accessed=self.clock())
            )
        message = await self._to_proto(row, views, locations=False)
        return message, offset, end - offset, self._stream(user_id, key, entries, by_id, offset, end)

    async def _stream(
        self,
        user_id: str,
        key: bytes,
        entries: list[dict[str, Any]],
        views: dict[str, ChunkView],
        start: int,
        end: int,
    ) -> AsyncIterator[bytes]:
        wanted: list[tuple[dict[str, Any], int]] = []
        position = 0
        for entry in entries:
            size = int(entry["size"])
            if position + size > start and position < end:
                wanted.append((entry, position))
            position += size
        if not wanted:
            return

        async def fetch(entry: dict[str, Any]) -> bytes:
            view = views.get(str(entry["id"]))
            if view is None:
                raise Unavailable(f"Chunk {entry['index']} of the file is gone", reason="CHUNK_UNAVAILABLE")
            sealed = await self._read_any(view)
            return await asyncio.to_thread(crypto.open_chunk, key, view.chunk_id, int(entry["index"]), sealed)

        # The next READ_AHEAD chunks are read while one is sent (a node reads a copy from
        # its disk: copies are written around the page cache).
        ahead: collections.deque[asyncio.Task[bytes]] = collections.deque()
        queued = 0
        try:
            for _entry, chunk_start in wanted:
                while queued < len(wanted) and len(ahead) <= READ_AHEAD:
                    ahead.append(asyncio.create_task(fetch(wanted[queued][0])))
                    queued += 1
                plaintext = await ahead.popleft()
                lo = max(start - chunk_start, 0)
                hi = min(end - chunk_start, len(plaintext))
                view = memoryview(plaintext)[lo:hi]
                for p in range(0, len(view), DOWNLOAD_PIECE):
                    yield bytes(view[p : p + DOWNLOAD_PIECE])
        finally:
            for task in ahead:
                task.cancel()
            for task in ahead:
                with contextlib.suppress(BaseException):
                    await task

    def _read_order(self, view: ChunkView) -> list[str]:
        """Nodes to read a chunk from: up nodes with a verified copy, quickest stream first."""
        rtt: dict[str, float] = {}
        for node_id, state in view.copies.items():
            session = self.fleet.streams.get(node_id)
            if state == "ok" and session is not None and self.condition(node_id) == NodeCondition.UP:
                rtt[node_id] = session.last_rtt_ms or 0.0
        return sorted(rtt, key=lambda n: (rtt[n], n))

    async def _read_any(self, view: ChunkView, sources: Sequence[str] | None = None) -> bytes:
        """A verified copy of the chunk from any node that has one; a bad copy met on the
        way is dropped and a repair is scheduled."""
        problems: list[str] = []
        for node_id in sources if sources is not None else self._read_order(view):
            try:
                return await self._read_copy(node_id, view.chunk_id, view.checksum, view.stored_size)
            except ChunkMissing as exc:
                log.warning(
                    "chunk %s: the copy on node %s is bad (%s): dropped, repair scheduled",
                    view.chunk_id,
                    node_id,
                    exc,
                )
                problems.append(f"{node_id}: bad copy")
                await self._drop_copy(node_id, view.chunk_id)
            except (ControllerError, ConnectionError) as exc:
                problems.append(f"{node_id}: {exc}")
        raise Unavailable(
            f"No good copy of chunk {view.chunk_id} can be read now ({'; '.join(problems) or 'no node holding it is up'})",
            reason="CHUNK_UNAVAILABLE",
        )

    async def _drop_copy(self, node_id: str, chunk_id: str) -> None:
        async with self.store.session() as session:
            await session.execute(
                delete(StorageChunkCopy).where(
                    StorageChunkCopy.chunk_id == chunk_id, StorageChunkCopy.node_id == node_id
                )
            )
        self._repair_chunks.add(chunk_id)
        self._repair_wanted.set()
        task = asyncio.create_task(self._delete_copies(node_id, [chunk_id]))
        task.add_done_callback(lambda _: None)

    # -- node reports -------------------------------------------------------------------------

    async def chunks_reported(
        self, node_id: str, reports: Sequence[plan.ReportedCopy], complete: bool
    ) -> plan.InventoryPlan:
        """A node's inventory (or its scrubber's findings): reconcile and act."""
        ids = [r.chunk_id for r in reports]
        known: dict[str, plan.KnownChunk] = {}
        rows_on_node: dict[str, str] = {}
        async with self.store.session() as session:
            for start in range(0, len(ids), 500):
                part = ids[start : start + 500]
                chunks = {
                    c.id: c
                    for c in (
                        await session.execute(select(StorageChunk).where(StorageChunk.id.in_(part)))
                    ).scalars()
                }
                copies: dict[str, dict[str, str]] = defaultdict(dict)
                for copy in (
                    await session.execute(
                        select(StorageChunkCopy).where(StorageChunkCopy.chunk_id.in_(list(chunks)))
                    )
                ).scalars():
                    copies[copy.chunk_id][copy.node_id] = copy.state
                for chunk_id, c in chunks.items():
                    others = copies[chunk_id]
                    good_elsewhere = sum(
                        1
                        for n, s in others.items()
                        if n != node_id and s == "ok" and self.condition(n) != NodeCondition.LOST
                    )
                    known[chunk_id] = plan.KnownChunk(
                        chunk_id, c.state, c.checksum, c.replicas, others.get(node_id), good_elsewhere
                    )
            if complete:
                # Only copies verified well before the report: the node listed its disk
                # before it sent it, so a copy stored meanwhile may be missing from it.
                settled = self.clock() - timedelta(seconds=INVENTORY_MARGIN_SECONDS)
                for copy in (
                    await session.execute(
                        select(StorageChunkCopy).where(
                            StorageChunkCopy.node_id == node_id, StorageChunkCopy.created_at < settled
                        )
                    )
                ).scalars():
                    rows_on_node[copy.chunk_id] = copy.state
        decided = plan.reconcile_inventory(reports, known, rows_on_node, complete)
        async with self.store.session() as session:
            if decided.drop_rows:
                await session.execute(
                    delete(StorageChunkCopy).where(
                        StorageChunkCopy.node_id == node_id, StorageChunkCopy.chunk_id.in_(decided.drop_rows)
                    )
                )
            for chunk_id in decided.reuse:
                await session.merge(
                    StorageChunkCopy(chunk_id=chunk_id, node_id=node_id, state="ok", created_at=self.clock())
                )
        if decided.delete:
            log.info("node %s: removing %d stale, corrupt or collected copies", node_id, len(decided.delete))
            await self._delete_copies(node_id, decided.delete)
        if decided.drop_rows or decided.reuse:
            log.info(
                "node %s: %d copies lost or corrupt, %d stale copies reused",
                node_id,
                len(decided.drop_rows),
                len(decided.reuse),
            )
        if decided.repair:
            self._repair_chunks.update(decided.drop_rows)
            self._repair_chunks.update(decided.reuse)
            self._repair_wanted.set()
        return decided

    async def on_node_failed(self, node_id: str, user_id: str) -> None:
        """The health monitor's recovery hook (after the mass-failure window, never during a freeze)."""
        log.warning("node %s failed: re-replicating its chunks", node_id)
        self._repair_nodes.add(node_id)
        self._repair_wanted.set()

    # -- repair ---------------------------------------------------------------------------------

    async def _repair_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._repair_wanted.wait(), self.limits.repair_interval_seconds)
            self._repair_wanted.clear()
            try:
                await self.repair_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("storage repair pass failed", exc_info=True)

    async def repair_once(self, *, full: bool | None = None) -> int:
        """One repair pass: copies made. It reads the chunks with a copy on a lost node
        (the copies' node index: a failed node costs its own copies, not the whole store)
        and those known to lack a copy; every live chunk only when ``full`` (default: at
        the first pass and every :data:`FULL_REPAIR_SWEEP_SECONDS`)."""
        now = self._monotonic()
        if full is None:
            full = self._last_full_sweep is None or now - self._last_full_sweep >= FULL_REPAIR_SWEEP_SECONDS
        flagged = set(self._repair_chunks)
        lost_nodes = set(self._repair_nodes)
        self._repair_nodes.clear()
        if full:
            self._last_full_sweep = now
            views = await self._live_views(None)
        else:
            lost_nodes |= {n for n in self.fleet.monitor if self.condition(n) == NodeCondition.LOST}
            chunk_ids = set(flagged)
            if lost_nodes:
                async with self.store.session() as session:
                    for node_id in sorted(lost_nodes):
                        chunk_ids.update(
                            (
                                await session.execute(
                                    select(StorageChunkCopy.chunk_id).where(
                                        StorageChunkCopy.node_id == node_id
                                    )
                                )
                            ).scalars()
                        )
            views = await self._live_views(sorted(chunk_ids)) if chunk_ids else []
        self.chunks_examined = len(views)
        self._repair_chunks -= flagged
        # Chunks still short after this pass are looked at again by the next one.
        short = {v.chunk_id for v in views if len(plan.good_copies(v, self.condition)) < v.replicas}
        tasks = [
            t
            for t in plan.repair_plan(views, self.condition, self.fleet.monitor.frozen_users)
            if t.chunk_id not in self._repairing
        ]
        if not tasks:
            self._repair_chunks |= short
            return 0
        log.info("storage repair: %d chunks lack copies (most endangered has %d)", len(tasks), tasks[0].good)
        by_id = {v.chunk_id: v for v in views}
        nodes: dict[str, list[Node]] = {}
        made = 0
        semaphore = asyncio.Semaphore(REPAIR_CONCURRENCY)

        async def repair(task: plan.RepairTask) -> int:
            async with semaphore:
                delay = self.repair_bucket.take()
                if delay > 0:
                    await asyncio.sleep(delay)
                if task.user_id not in nodes:
                    nodes[task.user_id] = await user_nodes(self.store, task.user_id)
                return await self._repair_chunk(task, by_id[task.chunk_id], nodes[task.user_id])

        for task in tasks:
            self._repairing.add(task.chunk_id)
        try:
            results = await asyncio.gather(*(repair(t) for t in tasks), return_exceptions=True)
        finally:
            for task in tasks:
                self._repairing.discard(task.chunk_id)
        for task, result in zip(tasks, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("chunk %s: repair failed: %s", task.chunk_id, result)
            else:
                made += result
                short.discard(task.chunk_id)
        self._repair_chunks |= short
        self.copies_repaired += made
        return made

    async def _live_views(self, chunk_ids: Sequence[str] | None) -> list[ChunkView]:
        """Live chunks with their copies: those of ``chunk_ids`` (in batches), or every one."""
        chunks: list[StorageChunk] = []
        copies: dict[str, dict[str, str]] = defaultdict(dict)
        async with self.store.session() as session:
            if chunk_ids is None:
                chunks = list(
                    (
                        await session.execute(select(StorageChunk).where(StorageChunk.state == "live"))
                    ).scalars()
                )
                rows = (
                    await session.execute(
                        select(StorageChunkCopy)
                        .join(StorageChunk, StorageChunk.id == StorageChunkCopy.chunk_id)
                        .where(StorageChunk.state == "live")
                    )
                ).scalars()
                for copy in rows:
                    copies[copy.chunk_id][copy.node_id] = copy.state
            else:
                for start in range(0, len(chunk_ids), 500):
                    part = chunk_ids[start : start + 500]
                    chunks += (
                        await session.execute(
                            select(StorageChunk).where(
                                StorageChunk.id.in_(part), StorageChunk.state == "live"
                            )
                        )
                    ).scalars()
                    for copy in (
                        await session.execute(
                            select(StorageChunkCopy).where(StorageChunkCopy.chunk_id.in_(part))
                        )
                    ).scalars():
                        copies[copy.chunk_id][copy.node_id] = copy.state
        return [
            ChunkView(c.id, c.user_id, c.replicas, c.stored_size, c.checksum, dict(copies[c.id]))
            for c in chunks
        ]

    async def _repair_chunk(self, task: plan.RepairTask, view: ChunkView, nodes: list[Node]) -> int:
        sealed = await self._read_any(view, task.sources)
        stored = await self._replicate(
            task.user_id,
            nodes,
            task.chunk_id,
            _payload(sealed),
            view.checksum,
            task.missing,
            set(task.holders),
        )
        if task.lost:
            async with self.store.session() as session:
                await session.execute(
                    delete(StorageChunkCopy).where(
                        StorageChunkCopy.chunk_id == task.chunk_id,
                        StorageChunkCopy.node_id.in_(list(task.lost)),
                    )
                )
        log.info(
            "chunk %s: %d copies made on %s (had %d)",
            task.chunk_id,
            len(stored),
            ", ".join(stored),
            task.good,
        )
        return len(stored)

    # -- garbage collection ------------------------------------------------------------------------

    async def _gc_loop(self) -> None:
        while True:
            await asyncio.sleep(self.limits.gc_interval_seconds)
            try:
                turn = await my_turn(self.loop_leases, GC_LEASE, self.limits.gc_interval_seconds)
                if turn:
                    await self.collect_garbage(turn if isinstance(turn, Fence) else None)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("storage garbage collection failed", exc_info=True)

    async def collect_garbage(self, fence: Fence | None = None) -> int:
        """Remove the copies of garbage chunks past the grace period; copies removed. With
        ``fence`` (the loop's lease), its store writes happen only while the lease holds."""
        now = self.clock()
        grace = timedelta(seconds=self.limits.gc_grace_seconds)
        orphaned = await self._orphaned()
        async with self.store.session() as session:
            if fence is not None:
                await fence.guard(session)
            # Uploads no controller runs: this one's it is not running (a controller killed
            # mid-upload, then restarted), none's, and those of controllers that are gone.
            await session.execute(
                update(StorageChunk)
                .where(
                    StorageChunk.state == "pending",
                    StorageChunk.version_id.not_in(list(self._active_versions) or [""]),
                    self._mine(),
                )
                .values(state="garbage", garbage_at=now)
            )
            for start in range(0, len(orphaned), 500):
                await session.execute(
                    update(StorageChunk)
                    .where(
                        StorageChunk.id.in_(orphaned[start : start + 500]), StorageChunk.state == "pending"
                    )
                    .values(state="garbage", garbage_at=now)
                )
            garbage = list(
                (await session.execute(select(StorageChunk).where(StorageChunk.state == "garbage"))).scalars()
            )
            due = [c.id for c in garbage if plan.gc_due(c.garbage_at, now, grace)]
            copies: dict[str, list[str]] = defaultdict(list)
            for start in range(0, len(due), 500):
                for copy in (
                    await session.execute(
                        select(StorageChunkCopy).where(
                            StorageChunkCopy.chunk_id.in_(due[start : start + 500])
                        )
                    )
                ).scalars():
                    copies[copy.node_id].append(copy.chunk_id)
        removed = 0
        for node_id, chunk_ids in copies.items():
            if self.condition(node_id) == NodeCondition.UP and await self._delete_copies(node_id, chunk_ids):
                removed += len(chunk_ids)
            # Copies on nodes that are away are found by their next inventory (no row: deleted).
        if due:
            async with self.store.session() as session:
                if fence is not None:
                    await fence.guard(session)
                for start in range(0, len(due), 500):
                    await session.execute(
                        delete(StorageChunkCopy).where(
                            StorageChunkCopy.chunk_id.in_(due[start : start + 500])
                        )
                    )
                    await session.execute(
                        delete(StorageChunk).where(StorageChunk.id.in_(due[start : start + 500]))
                    )
            log.info("storage GC: %d garbage chunks collected (%d copies removed)", len(due), removed)
        self.copies_collected += removed
        return removed
