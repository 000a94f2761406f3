"""Running shard statements on agents, with retries, replica fallback and replica catch-up.

:class:`NodeShardExecutor` is the :class:`~controller.federation.query.ShardExecutor`
the query router runs plans through. Each shard has a primary node and replica
nodes (agents serving that shard from their own database).

Reads
    The primary is tried first, with 2 retries (spec §9 decision 4) for errors
    that may pass (node not connected, shard unreachable), then each *in-sync*
    replica once. A statement's own error (syntax, constraint) is not retried.
    A read never touches the store unless it falls back to a stale replica.

Writes (INSERT/UPDATE/DELETE/DDL)
    Go to the primary (same retries; the agent answers a repeated command id
    from its cache, so a retry never applies a statement twice), then to every
    replica. A replica that misses a write becomes **stale** and is never read
    from until it has caught up. Writes do not fail over: if the primary cannot
    take a write, the write fails.

The write log
    Each write a primary took on a shard that has replicas (one statement, or the
    write statements of a committed transaction) is appended to the shard's
    :class:`WriteLog` with the shard's next sequence number, before it goes to the
    replicas: one store write per write statement. In the controller the log is
    :class:`StoreWriteLog`, the ``shard_writes`` table, so it survives a controller
    restart and any controller sharing the store can replay it; the newest
    :data:`WRITE_LOG_SIZE` writes of each shard are kept (older ones are deleted
    every :data:`WRITE_LOG_TRIM_EVERY` writes of the shard). A shard's current
    sequence after a restart is the newest one in the store.

    The stale replicas, and the last sequence each of them has (its position), are
    kept in the database's ``replication`` JSON (``DatabaseInstance.replication``)::

        {"shards": [...], "stale": {"1": ["node-a"]}, "applied": {"1": {"node-a": 41}}}

    In-sync replicas have every write, so only stale replicas have a position.
    Before a stale replica's next use (a read falling back to it, or after a
    commit) the writes after its position are read from the log in order and
    replayed: a statement with the command id ``replay-{database}-{shard}-{sequence}-{replica}``
    (unique across databases: agents answer a repeated command id from their cache),
    a transaction as one transaction on the replica. A replica stays stale — reads
    never use it — until it is re-seeded when its position is unknown (rows written
    before positions were kept, or a write the log could not record) or when the
    writes it missed are no longer in the log (a very long outage).

Concurrency
    One write at a time per database (``ReplicationState.hold``): it allocates the
    sequences and keeps the log in the primaries' order; a catch-up holds it too, so
    no write slips in between the replay and the replica rejoining. In one process an
    asyncio lock; with several controllers on one store (``A67_SCALE_OUT``) also a
    PostgreSQL advisory lock per database, held across the primary's write, the
    replicas' and the log's append, and each holder first reads the stale replicas
    and their positions again from the store, where the previous holder (on any
    controller) left them. The store's primary key on the log still keeps two writers
    from taking the same sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from automator67.v1 import node_pb2
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from controller.errors import ControllerError, ResourceExhausted
from controller.federation.query import ShardError, ShardResult
from controller.federation.results import ResultSlot, ShardResults
from controller.nodes.sessions import StreamRegistry
from controller.store.db import Store
from controller.store.models import ShardWrite
from controller.wire import decode_rows

log = logging.getLogger("a67.federation")

# Retries of a shard's primary after the first attempt (spec §9 decision 4).
PRIMARY_RETRIES = 2
# Pause between two attempts on the primary.
RETRY_PAUSE_SECONDS = 0.05
# Writes kept per shard for replaying to a replica that missed them.
WRITE_LOG_SIZE = 10_000
# Older writes of a shard are deleted from the store every this many writes of the shard.
WRITE_LOG_TRIM_EVERY = 100
# Writes read from the log at a time while a replica catches up.
REPLAY_BATCH = 500
# Attempts at appending to the store's log when another controller took the sequence.
APPEND_ATTEMPTS = 3
# SQLSTATE-like classes the router maps: 23 → FailedPrecondition, 42 → InvalidArgument.
SQLSTATE = {"constraint": "23000", "invalid": "42000"}
# Batches bigger than this are decoded in a worker thread, off the event loop.
INLINE_DECODE_BYTES = 16 * 1024
# Worker threads that decode shard batches (JSON → rows) for collected results.
DECODE_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="a67-decode")


@dataclass(frozen=True)
class ResultCaps:
    """What one shard statement may return (the agent fetches at most ``rows + 1`` rows)."""

    rows: int = 0
    bytes: int = 0


class ShardRows:
    """The rows of one shard statement as they arrive over ``PushShardResult`` (a
    :class:`~controller.federation.query.execute.ShardSource`): batches in order,
    decoded by the consumer (:meth:`decode`, thread-safe), then :meth:`close`."""

    encoded_batches = True
    """Batches are :func:`controller.wire.encode_rows` bytes: a merge worker process can take them."""

    def __init__(
        self,
        *,
        shard: int,
        node_id: str,
        columns: Sequence[tuple[str, str]],
        results: ShardResults,
        slot: ResultSlot | None,
        command: asyncio.Future[node_pb2.CommandResult] | None,
        first: node_pb2.PushShardResultRequest | None,
        caps: ResultCaps,
        rowcount: int = -1,
        sqlstates: Mapping[str, str] = SQLSTATE,
    ) -> None:
        self.shard = shard
        self.node_id = node_id
        self.columns = list(columns)
        self.rowcount = rowcount
        self._results = results
        self._slot = slot
        self._command = command
        self._next = first
        self._caps = caps
        self._sqlstates = sqlstates
        self._finished = first is None

    async def next_batch(self) -> bytes | None:
        """The next batch (encoded rows), or None after the last."""
        while not self._finished:
            message = self._next
            self._next = None
            if message is None:
                assert self._slot is not None
                message = await self._slot.get()
            if message.error_kind:
                self._finished = True
                raise _failure(
                    self.shard,
                    self.node_id,
                    message.error_kind,
                    message.error_message,
                    self._caps,
                    self._sqlstates,
                )
            if message.done:
                self._finished = True
                self.rowcount = message.rowcount
            if message.row_count:
                return message.rows
        return None

    @staticmethod
    def decode(batch: bytes) -> list[tuple[Any, ...]]:
        return decode_rows(batch)

    async def close(self) -> None:
        """Stop the statement if it still runs (the agent's call ends: CANCELLED)."""
        if self._slot is not None:
            self._results.close(self._slot)
        if self._command is not None and not self._command.done():
            self._command.cancel()
            with contextlib.suppress(BaseException):
                await self._command


def _failure(
    shard: int,
    node_id: str,
    kind: str,
    message: str,
    caps: ResultCaps,
    sqlstates: Mapping[str, str] = SQLSTATE,
) -> BaseException:
    if kind == "timeout":
        return TimeoutError(message)
    if kind == "too_large":
        return ResourceExhausted(
            f"shard {shard} (node {node_id}): {message}",
            reason="RESULT_TOO_LARGE",
            metadata={"shard": str(shard), "max_rows": str(caps.rows), "max_bytes": str(caps.bytes)},
        )
    retryable = kind in ("unavailable", "cancelled")
    return ShardError(
        shard,
        # the node matters when it failed; a statement's own error (a missing column, a
        # constraint) is the same on any node and names what is wrong itself
        f"node {node_id}: {message}" if retryable else message,
        retryable=retryable,
        sqlstate=sqlstates.get(kind),
    )


@dataclass(frozen=True)
class ShardNodes:
    """Where one shard lives."""

    shard_index: int
    primary: str
    replicas: tuple[str, ...]


@dataclass(frozen=True)
class LoggedWrite:
    """One write of a shard's log: a statement, or a committed transaction's write statements."""

    sequence: int
    statements: tuple[str, ...]
    transaction: bool = False


class WriteLog(Protocol):
    """Each shard's writes in the order its primary took them, numbered 1, 2, 3… per shard
    (see the module's docstring). Callers append under the database's lock."""

    async def append(self, database_id: str, shard: int, statements: Sequence[str], transaction: bool) -> int:
        """Record a write after the shard's newest one; its sequence."""
        ...

    async def since(
        self, database_id: str, shard: int, after: int, limit: int = REPLAY_BATCH
    ) -> list[LoggedWrite]:
        """The kept writes of the shard with a sequence above ``after``, oldest first, at most ``limit``."""
        ...

    async def newest(self, database_id: str, shard: int) -> int:
        """The shard's newest sequence (0 before its first write)."""
        ...

    async def drop(self, database_id: str) -> None:
        """Forget a (deleted) database's writes."""
        ...


class MemoryWriteLog:
    """A :class:`WriteLog` in this process's memory (tests, and a service without a store):
    lost when the process ends."""

    def __init__(self, size: int = WRITE_LOG_SIZE) -> None:
        self._size = size
        self._writes: dict[tuple[str, int], deque[LoggedWrite]] = {}
        self._newest: dict[tuple[str, int], int] = {}

    async def append(self, database_id: str, shard: int, statements: Sequence[str], transaction: bool) -> int:
        key = (database_id, shard)
        sequence = self._newest.get(key, 0) + 1
        self._newest[key] = sequence
        writes = self._writes.setdefault(key, deque(maxlen=self._size))
        writes.append(LoggedWrite(sequence, tuple(statements), transaction))
        return sequence

    async def since(
        self, database_id: str, shard: int, after: int, limit: int = REPLAY_BATCH
    ) -> list[LoggedWrite]:
        writes = self._writes.get((database_id, shard), deque())
        return [w for w in writes if w.sequence > after][:limit]

    async def newest(self, database_id: str, shard: int) -> int:
        return self._newest.get((database_id, shard), 0)

    async def drop(self, database_id: str) -> None:
        for key in [k for k in self._newest if k[0] == database_id]:
            self._newest.pop(key, None)
            self._writes.pop(key, None)


class StoreWriteLog:
    """The :class:`WriteLog` in the store (table ``shard_writes``): what a restarted
    controller, or another one sharing the store, replays from.

    The newest sequence of each shard is read from the store once (the largest kept),
    then counted here: an append is one INSERT, with a DELETE of the writes older than
    the newest ``size`` every ``trim_every`` appends of the shard (in the same
    transaction). If another controller took the sequence (the primary key refuses
    it), the newest is read again and the append retried.
    """

    def __init__(
        self, store: Store, *, size: int = WRITE_LOG_SIZE, trim_every: int = WRITE_LOG_TRIM_EVERY
    ) -> None:
        self._store = store
        self._size = size
        self._trim_every = max(1, trim_every)
        self._newest: dict[tuple[str, int], int] = {}

    async def append(self, database_id: str, shard: int, statements: Sequence[str], transaction: bool) -> int:
        key = (database_id, shard)
        for attempt in range(APPEND_ATTEMPTS):
            sequence = await self.newest(database_id, shard) + 1
            try:
                async with self._store.session() as session:
                    session.add(
                        ShardWrite(
                            database_id=database_id,
                            shard_index=shard,
                            sequence=sequence,
                            transaction=transaction,
                            statements=list(statements),
                        )
                    )
                    if sequence % self._trim_every == 0 and sequence > self._size:
                        await session.execute(
                            delete(ShardWrite).where(
                                ShardWrite.database_id == database_id,
                                ShardWrite.shard_index == shard,
                                ShardWrite.sequence <= sequence - self._size,
                            )
                        )
            except IntegrityError:
                self._newest.pop(key, None)  # another controller wrote the shard: read it again
                if attempt + 1 == APPEND_ATTEMPTS:
                    raise
                continue
            self._newest[key] = sequence
            return sequence
        raise AssertionError("unreachable")  # pragma: no cover

    async def since(
        self, database_id: str, shard: int, after: int, limit: int = REPLAY_BATCH
    ) -> list[LoggedWrite]:
        async with self._store.session() as session:
            rows = await session.execute(
                select(ShardWrite.sequence, ShardWrite.statements, ShardWrite.transaction)
                .where(
                    ShardWrite.database_id == database_id,
                    ShardWrite.shard_index == shard,
                    ShardWrite.sequence > after,
                )
                .order_by(ShardWrite.sequence)
                .limit(limit)
            )
            return [
                LoggedWrite(int(sequence), tuple(str(s) for s in statements), bool(transaction))
                for sequence, statements, transaction in rows
            ]

    async def newest(self, database_id: str, shard: int) -> int:
        key = (database_id, shard)
        cached = self._newest.get(key)
        if cached is not None:
            return cached
        async with self._store.session() as session:
            newest = await session.scalar(
                select(func.max(ShardWrite.sequence)).where(
                    ShardWrite.database_id == database_id, ShardWrite.shard_index == shard
                )
            )
        # an append that finished meanwhile counted further: keep the larger
        value = max(int(newest or 0), self._newest.get(key, 0))
        self._newest[key] = value
        return value

    async def drop(self, database_id: str) -> None:
        for key in [k for k in self._newest if k[0] == database_id]:
            self._newest.pop(key, None)
        async with self._store.session() as session:
            await session.execute(delete(ShardWrite).where(ShardWrite.database_id == database_id))


class ReplicationState:
    """Which replicas of a database are in step, and where each stale one is.

    ``applied[shard][replica]`` is the last sequence of the shard's :class:`WriteLog` a
    stale replica has (no entry: unknown, it cannot catch up). ``pending`` holds the
    positions not to keep in the store yet: set just before a commit whose write is
    not in the log yet (a controller stopping in between must not find the replica
    at a position past which the log shows nothing missed).
    """

    def __init__(
        self,
        shards: list[ShardNodes],
        stale: dict[int, set[str]],
        applied: Mapping[int, Mapping[str, int]] | None = None,
    ) -> None:
        self.shards = {s.shard_index: s for s in shards}
        self.stale = {index: set(nodes) for index, nodes in stale.items()}
        self.applied: dict[int, dict[str, int]] = {
            index: {
                node: int(sequence) for node, sequence in nodes.items() if node in self.stale.get(index, ())
            }
            for index, nodes in (applied or {}).items()
        }
        self.pending: set[tuple[int, str]] = set()
        self.lock = asyncio.Lock()
        self.shared: Callable[[], AbstractAsyncContextManager[Mapping[str, Any] | None]] | None = None
        """With several controllers on one store: the database's write order across them
        (:meth:`DatabaseRepository.write_order`), giving the stored state as it was taken."""

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """One write (or catch-up) at a time for the database: in this process, and with
        :attr:`shared`, across controllers too — then the stale replicas and positions are
        first read again from the store, where the previous holder left them."""
        async with self.lock:
            if self.shared is None:
                yield
                return
            async with self.shared() as stored:
                self.refresh(stored)
                yield

    def refresh(self, stored: Mapping[str, Any] | None) -> None:
        """Take the stale replicas and their positions from the stored ``replication`` JSON."""
        if stored is None:
            return
        fresh = ReplicationState.from_json({"stale": stored.get("stale"), "applied": stored.get("applied")})
        self.stale, self.applied = fresh.stale, fresh.applied
        self.pending.clear()

    @classmethod
    def from_json(cls, stored: Mapping[str, Any]) -> ReplicationState:
        """From ``DatabaseInstance.replication`` (``"applied"`` may be missing: older rows)."""
        return cls(
            [
                ShardNodes(s["shard_index"], s["primary_node_id"], tuple(s.get("replica_node_ids", ())))
                for s in stored.get("shards", [])
            ],
            {int(k): set(v) for k, v in (stored.get("stale") or {}).items()},
            {
                int(k): {str(node): int(seq) for node, seq in v.items()}
                for k, v in (stored.get("applied") or {}).items()
            },
        )

    def in_sync(self, shard: int) -> list[str]:
        nodes = self.shards[shard]
        return [r for r in nodes.replicas if r not in self.stale.get(shard, set())]

    def position(self, shard: int, replica: str) -> int | None:
        """The last sequence a stale replica has, if known."""
        return self.applied.get(shard, {}).get(replica)

    def mark_stale(self, shard: int, replica: str, position: int | None) -> None:
        """``replica`` missed the writes after ``position`` (None: after an unknown one)."""
        self.stale.setdefault(shard, set()).add(replica)
        if position is None:
            self.applied.get(shard, {}).pop(replica, None)
        else:
            self.applied.setdefault(shard, {})[replica] = position

    def caught_up(self, shard: int, replica: str) -> None:
        self.stale.get(shard, set()).discard(replica)
        self.applied.get(shard, {}).pop(replica, None)
        self.pending.discard((shard, replica))

    def forget_positions(self, shard: int) -> None:
        """A write of the shard is not in the log: its stale replicas cannot catch up from it."""
        for replica in self.stale.get(shard, set()):
            self.applied.get(shard, {}).pop(replica, None)
            self.pending.discard((shard, replica))

    def stale_map(self) -> dict[str, list[str]]:
        return {str(k): sorted(v) for k, v in self.stale.items() if v}

    def applied_map(self) -> dict[str, dict[str, int]]:
        """The known positions of the stale replicas, for the ``replication`` JSON."""
        out: dict[str, dict[str, int]] = {}
        for shard, replicas in sorted(self.stale.items()):
            positions = {
                r: self.applied[shard][r]
                for r in sorted(replicas)
                if r in self.applied.get(shard, {}) and (shard, r) not in self.pending
            }
            if positions:
                out[str(shard)] = positions
        return out


async def log_write(
    write_log: WriteLog,
    state: ReplicationState,
    database_id: str,
    shard: int,
    statements: Sequence[str],
    transaction: bool,
) -> int | None:
    """Append a write the shard's primary took to the log (under ``state.lock``); its
    sequence, or None if the log could not record it: then the shard's stale replicas
    lose their positions (a replay past it would skip it) and stay stale until re-seeded."""
    try:
        return await write_log.append(database_id, shard, statements, transaction)
    except Exception:
        log.exception(
            "the write log of shard %d of database %s cannot record a write: its stale replicas "
            "can no longer catch up",
            shard,
            database_id,
        )
        state.forget_positions(shard)
        return None


StaleChanged = Callable[[ReplicationState], Awaitable[None]]


class NodeShardExecutor:
    """Runs one statement on its shards through the agents' streams."""

    def __init__(
        self,
        *,
        database_id: str,
        streams: StreamRegistry,
        replication: ReplicationState,
        is_write: bool,
        on_stale_changed: StaleChanged,
        results: ShardResults,
        write_log: WriteLog,
        caps: ResultCaps | None = None,
    ) -> None:
        self._database_id = database_id
        self._streams = streams
        self._replication = replication
        self._write_log = write_log
        self._is_write = is_write
        self._on_stale_changed = on_stale_changed
        self._results = results
        self._caps = caps if caps is not None and not is_write else ResultCaps()

    async def run(self, shard: int, sql: str, deadline: float) -> ShardResult:
        """The whole result of ``sql`` on ``shard`` (within the caps)."""
        nodes = self._replication.shards.get(shard)
        if nodes is None:
            raise ShardError(shard, f"shard {shard} has no placement", retryable=False)
        if self._is_write:
            return await self._write(nodes, sql, deadline)
        return await collect(await self._read(nodes, sql, deadline), is_write=False)

    async def open(self, shard: int, sql: str, deadline: float) -> ShardRows:
        """The rows of a read as they arrive (StreamQuery): the primary with retries, then
        the replicas, until one starts answering; after the first rows there is no retry."""
        nodes = self._replication.shards.get(shard)
        if nodes is None:
            raise ShardError(shard, f"shard {shard} has no placement", retryable=False)
        return await self._read(nodes, sql, deadline)

    async def _read(self, nodes: ShardNodes, sql: str, deadline: float) -> ShardRows:
        errors: list[str] = []
        for attempt in range(1 + PRIMARY_RETRIES):
            try:
                return await self._open(nodes.primary, nodes.shard_index, sql, deadline, str(uuid.uuid4()))
            except ShardError as exc:
                if not exc.retryable:
                    raise
                errors.append(f"primary {nodes.primary}: {exc}")
            if attempt < PRIMARY_RETRIES:
                await asyncio.sleep(RETRY_PAUSE_SECONDS)
        for replica in nodes.replicas:
            if not await self._catch_up(nodes.shard_index, replica, deadline):
                continue
            try:
                return await self._open(replica, nodes.shard_index, sql, deadline, str(uuid.uuid4()))
            except ShardError as exc:
                if not exc.retryable:
                    raise
                errors.append(f"replica {replica}: {exc}")
        raise ShardError(nodes.shard_index, "; ".join(errors) or "no node could answer", retryable=True)

    async def _write(self, nodes: ShardNodes, sql: str, deadline: float) -> ShardResult:
        state = self._replication
        async with state.hold():  # one write at a time per database keeps the log in order
            command_id = str(uuid.uuid4())
            result: ShardResult | None = None
            last_error: ShardError | None = None
            for attempt in range(1 + PRIMARY_RETRIES):
                try:
                    result = await self._send(nodes.primary, nodes.shard_index, sql, deadline, command_id)
                    break
                except ShardError as exc:
                    if not exc.retryable:
                        raise
                    last_error = exc
                if attempt < PRIMARY_RETRIES:
                    await asyncio.sleep(RETRY_PAUSE_SECONDS)
            if result is None:
                assert last_error is not None
                raise ShardError(
                    nodes.shard_index,
                    f"the primary {nodes.primary} cannot take the write: {last_error}",
                    retryable=True,
                )
            shard = nodes.shard_index
            if not nodes.replicas:
                return result  # nothing to replay to: no log
            sequence = await log_write(self._write_log, state, self._database_id, shard, (sql,), False)
            changed = sequence is None  # the stale replicas' positions are gone
            for replica in nodes.replicas:
                if replica in state.stale.get(shard, set()):
                    continue  # caught up lazily before its next use
                try:
                    await self._send(replica, shard, sql, deadline, str(uuid.uuid4()))
                except ShardError as exc:
                    log.warning(
                        "replica %s of shard %d missed a write (%s): stale until it catches up",
                        replica,
                        shard,
                        exc,
                    )
                    # it was in step: it has every write before this one
                    state.mark_stale(shard, replica, None if sequence is None else sequence - 1)
                    changed = True
            if changed:
                await self._on_stale_changed(state)
            return result

    async def catch_up(self, shard: int, replica: str, deadline: float) -> bool:
        """Make a stale replica current (see :meth:`_catch_up`); whether it is usable."""
        return await self._catch_up(shard, replica, deadline)

    async def _catch_up(self, shard: int, replica: str, deadline: float) -> bool:
        """Make a stale replica current by replaying, from the write log, the writes after
        its position; whether it is usable. Holds the database's write lock meanwhile, so
        no write goes by the replica between the replay and its rejoining."""
        state = self._replication
        if state.shared is None:  # else another controller may have marked it: ask the store
            if replica not in state.stale.get(shard, set()):
                return True
            if state.position(shard, replica) is None:
                return False  # where it stopped is unknown: only a re-seed helps
        async with state.hold():
            if replica not in state.stale.get(shard, set()):
                return True  # caught up meanwhile
            start = state.position(shard, replica)
            if start is None:
                return False
            try:
                done = await self._replay_missed(shard, replica, start, deadline)
            except ShardError as exc:
                log.info("replica %s of shard %d cannot catch up yet: %s", replica, shard, exc)
                done = False
            except BaseException:
                if state.position(shard, replica) != start:  # keep what it replayed
                    with contextlib.suppress(Exception):
                        await self._on_stale_changed(state)
                raise
            if done:
                state.caught_up(shard, replica)
                log.info("replica %s of shard %d caught up", replica, shard)
            if done or state.position(shard, replica) != start:
                await self._on_stale_changed(state)
            return done

    async def _replay_missed(self, shard: int, replica: str, applied: int, deadline: float) -> bool:
        """Replay the logged writes after ``applied`` to ``replica`` in order, moving its
        position along; False if one it needs is no longer in the log."""
        state = self._replication
        while True:
            try:
                writes = await self._write_log.since(self._database_id, shard, applied, REPLAY_BATCH)
            except Exception as exc:
                raise ShardError(shard, f"the write log cannot be read: {exc}", retryable=True) from exc
            for write in writes:
                if write.sequence != applied + 1:
                    log.warning(
                        "replica %s of shard %d missed write %d, which is no longer in the log: "
                        "stale until it is re-seeded",
                        replica,
                        shard,
                        applied + 1,
                    )
                    return False
                if write.transaction or len(write.statements) != 1:
                    await self._replay_transaction(replica, shard, write.statements, deadline, write.sequence)
                else:
                    await self._send(
                        replica,
                        shard,
                        write.statements[0],
                        deadline,
                        f"replay-{self._database_id}-{shard}-{write.sequence}-{replica}",
                    )
                applied = write.sequence
                state.applied.setdefault(shard, {})[replica] = applied
            if len(writes) < REPLAY_BATCH:
                return True

    async def _replay_transaction(
        self, replica: str, shard: int, statements: tuple[str, ...], deadline: float, sequence: int
    ) -> None:
        """Apply a committed transaction's writes to a replica as one transaction."""
        actions = node_pb2.ShardTransactionAction
        transaction_id = f"replay-{sequence}-{shard}-{uuid.uuid4().hex[:12]}"
        steps: list[tuple[int, str]] = [
            (
                actions.SHARD_TRANSACTION_ACTION_BEGIN
                if i == 0
                else actions.SHARD_TRANSACTION_ACTION_EXECUTE,
                sql,
            )
            for i, sql in enumerate(statements)
        ]
        steps.append((actions.SHARD_TRANSACTION_ACTION_COMMIT, ""))
        try:
            for action, sql in steps:
                await self._send_step(replica, shard, transaction_id, action, sql, deadline)
        except BaseException:
            with contextlib.suppress(BaseException):
                await self._send_step(
                    replica, shard, transaction_id, actions.SHARD_TRANSACTION_ACTION_ROLLBACK, "", deadline
                )
            raise

    async def _send_step(
        self, node_id: str, shard: int, transaction_id: str, action: int, sql: str, deadline: float
    ) -> None:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise TimeoutError
        command = node_pb2.NodeCommand(
            command_id=str(uuid.uuid4()),
            shard_transaction=node_pb2.ShardTransaction(
                database_id=self._database_id,
                shard_index=shard,
                transaction_id=transaction_id,
                action=action,  # type: ignore[arg-type]
                sql=sql,
                timeout_ms=max(1, int(remaining * 1000)),
            ),
        )
        try:
            result = await self._streams.send_command(node_id, command, remaining + 0.5)
        except ControllerError as exc:
            raise ShardError(shard, f"node {node_id}: {exc.message}", retryable=True) from exc
        if not result.ok:
            raise ShardError(shard, f"node {node_id}: {result.error_message}", retryable=True)

    async def _send(
        self, node_id: str, shard: int, sql: str, deadline: float, command_id: str
    ) -> ShardResult:
        """Run a write (or a replayed one) on one node and collect its whole result."""
        return await collect(await self._open(node_id, shard, sql, deadline, command_id, read=False), True)

    async def _open(
        self, node_id: str, shard: int, sql: str, deadline: float, command_id: str, *, read: bool = True
    ) -> ShardRows:
        """Send the statement and wait for its first rows (or its end) on the data path.
        A read runs read-only on the agent and within the caps; a write is never cut short."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise TimeoutError
        caps = self._caps if read else ResultCaps()
        command = node_pb2.NodeCommand(
            command_id=command_id,
            execute_shard_statement=node_pb2.ExecuteShardStatement(
                database_id=self._database_id,
                shard_index=shard,
                sql=sql,
                timeout_ms=max(1, int(remaining * 1000)),
                max_rows=caps.rows,
                max_bytes=caps.bytes,
                read_only=read,
                inline_ok=True,
            ),
        )
        return await open_rows(self._streams, self._results, node_id, shard, command, caps, remaining)


async def open_rows(
    streams: StreamRegistry,
    results: ShardResults,
    node_id: str,
    shard: int,
    command: node_pb2.NodeCommand,
    caps: ResultCaps,
    remaining: float,
    sqlstates: Mapping[str, str] = SQLSTATE,
) -> ShardRows:
    """Send ``command`` (a statement whose rows come back on ``PushShardResult``, keyed by
    its command id, or, when few and ready at once, on the command's result itself) and
    wait for its first rows, or its end; :class:`ShardError` (or
    ``TimeoutError``, :class:`ResourceExhausted`) if it failed."""
    slot = results.open(command.command_id, node_id)
    sent = asyncio.ensure_future(streams.send_command(node_id, command, remaining + 0.5))
    first = asyncio.ensure_future(slot.get())
    try:
        await asyncio.wait({sent, first}, return_when=asyncio.FIRST_COMPLETED, timeout=remaining + 1)
        if not first.done() and slot.attached:  # the rows are on their way: the header comes first
            await asyncio.wait_for(first, remaining + 1)
        if first.done():
            message = first.result()
            if message.error_kind:
                raise _failure(shard, node_id, message.error_kind, message.error_message, caps, sqlstates)
            return ShardRows(
                shard=shard,
                node_id=node_id,
                columns=[(c.name, c.type) for c in message.columns],
                results=results,
                slot=slot,
                command=sent,
                first=message,
                caps=caps,
                sqlstates=sqlstates,
            )
        if not sent.done():
            raise TimeoutError(f"node {node_id} did not answer shard {shard}'s statement in time")
        try:
            result = sent.result()
        except ControllerError as exc:  # not connected, stream gone, no answer in time
            raise ShardError(shard, f"node {node_id}: {exc.message}", retryable=True) from exc
        payload = json.loads(result.payload or b"{}")
        if not result.ok:
            raise _failure(
                shard, node_id, payload.get("error_kind", "invalid"), result.error_message, caps, sqlstates
            )
        results.close(slot)
        if payload.get("inline"):  # the whole (small) result came on the command's result
            columns = [(str(n), str(t)) for n, t in payload.get("columns", [])]
            return ShardRows(
                shard=shard,
                node_id=node_id,
                columns=columns,
                results=results,
                slot=None,
                command=None,
                first=node_pb2.PushShardResultRequest(
                    rows=result.inline_rows,
                    row_count=int(payload.get("rows", 0)),
                    done=True,
                    rowcount=int(payload.get("rowcount", -1)),
                ),
                caps=caps,
                sqlstates=sqlstates,
            )
        if payload.get("rows", 0):  # a result sent again for a repeated command: its rows are gone
            raise ShardError(
                shard,
                f"node {node_id}: the statement ran, but its rows were not received",
                retryable=False,
            )
        return ShardRows(
            shard=shard,
            node_id=node_id,
            columns=[(str(n), str(t)) for n, t in payload.get("columns", [])],
            results=results,
            slot=None,
            command=None,
            first=None,
            caps=caps,
            rowcount=int(payload.get("rowcount", -1)),
            sqlstates=sqlstates,
        )
    except BaseException:
        first.cancel()
        if not sent.done():
            sent.cancel()
        results.close(slot)
        with contextlib.suppress(BaseException):
            await asyncio.gather(first, sent, return_exceptions=True)
        raise


async def collect(rows: ShardRows, is_write: bool) -> ShardResult:
    """Every batch of ``rows``, decoded (big batches in a worker thread)."""
    loop = asyncio.get_running_loop()
    collected: list[tuple[Any, ...]] = []
    try:
        while (batch := await rows.next_batch()) is not None:
            if len(batch) > INLINE_DECODE_BYTES:
                collected.extend(await loop.run_in_executor(DECODE_POOL, decode_rows, batch))
            else:
                collected.extend(decode_rows(batch))
    finally:
        await rows.close()
    return ShardResult(
        columns=rows.columns,
        rows=collected,
        rows_affected=rows.rowcount if is_write else None,
        node_id=rows.node_id,
    )
