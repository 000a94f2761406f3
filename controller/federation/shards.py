"""Running shard statements on agents, with retries, replica fallback and replica catch-up.

:class:`NodeShardExecutor` is the :class:`~controller.federation.query.ShardExecutor`
the query router runs plans through. Each shard has a primary node and replica
nodes (agents serving that shard from their own database).

Reads
    The primary is tried first, with 2 retries (spec §9 decision 4) for errors
    that may pass (node not connected, shard unreachable), then each *in-sync*
    replica once. A statement's own error (syntax, constraint) is not retried.

Writes (INSERT/UPDATE/DELETE/DDL)
    Go to the primary (same retries; the agent answers a repeated command id
    from its cache, so a retry never applies a statement twice), then to every
    replica. A replica that misses a write becomes **stale** and is never read
    from until it has caught up: the controller keeps each shard's recent writes
    in order (:data:`WRITE_LOG_SIZE` of them, in memory) and replays the missed
    ones to a stale replica before its next use. A replica whose missed writes
    are no longer in the log (after a controller restart, or a very long outage)
    stays stale — reads never use it — until it is re-seeded; the stale set is
    kept in the store so a restart does not forget it. Writes do not fail over:
    if the primary cannot take a write, the write fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from automator67.v1 import node_pb2

from controller.errors import ControllerError, ResourceExhausted
from controller.federation.query import ShardError, ShardResult
from controller.federation.results import ResultSlot, ShardResults
from controller.nodes.sessions import StreamRegistry
from controller.wire import decode_rows

log = logging.getLogger("a67.federation")

# Retries of a shard's primary after the first attempt (spec §9 decision 4).
PRIMARY_RETRIES = 2
# Pause between two attempts on the primary.
RETRY_PAUSE_SECONDS = 0.05
# Writes kept per shard for replaying to a replica that missed them.
WRITE_LOG_SIZE = 10_000
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


@dataclass
class _ShardLog:
    # a write: one statement, or the write statements of one committed transaction
    writes: deque[tuple[int, str | tuple[str, ...]]] = field(
        default_factory=lambda: deque(maxlen=WRITE_LOG_SIZE)
    )
    sequence: int = 0
    applied: dict[str, int] = field(default_factory=dict)  # replica node → last applied sequence


class ReplicationState:
    """Which replicas of a database are in step, and the writes to replay to the others."""

    def __init__(self, shards: list[ShardNodes], stale: dict[int, set[str]]) -> None:
        self.shards = {s.shard_index: s for s in shards}
        self.stale = {index: set(nodes) for index, nodes in stale.items()}
        self._logs: dict[int, _ShardLog] = {}
        self.lock = asyncio.Lock()

    def log(self, shard: int) -> _ShardLog:
        return self._logs.setdefault(shard, _ShardLog())

    def in_sync(self, shard: int) -> list[str]:
        nodes = self.shards[shard]
        return [r for r in nodes.replicas if r not in self.stale.get(shard, set())]

    def stale_map(self) -> dict[str, list[str]]:
        return {str(k): sorted(v) for k, v in self.stale.items() if v}


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
        caps: ResultCaps | None = None,
    ) -> None:
        self._database_id = database_id
        self._streams = streams
        self._replication = replication
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
        async with state.lock:  # one write at a time per database keeps the log in order
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
            shard_log = state.log(nodes.shard_index)
            shard_log.sequence += 1
            shard_log.writes.append((shard_log.sequence, sql))
            changed = False
            for replica in nodes.replicas:
                if replica in state.stale.get(nodes.shard_index, set()):
                    continue  # caught up lazily before its next use
                try:
                    await self._send(replica, nodes.shard_index, sql, deadline, str(uuid.uuid4()))
                    shard_log.applied[replica] = shard_log.sequence
                except ShardError as exc:
                    log.warning(
                        "replica %s of shard %d missed a write (%s): stale until it catches up",
                        replica,
                        nodes.shard_index,
                        exc,
                    )
                    state.stale.setdefault(nodes.shard_index, set()).add(replica)
                    shard_log.applied.setdefault(replica, shard_log.sequence - 1)
                    changed = True
            if changed:
                await self._on_stale_changed(state)
            return result

    async def catch_up(self, shard: int, replica: str, deadline: float) -> bool:
        """Make a stale replica current (see :meth:`_catch_up`); whether it is usable."""
        return await self._catch_up(shard, replica, deadline)

    async def _catch_up(self, shard: int, replica: str, deadline: float) -> bool:
        """Make a stale replica current by replaying missed writes; whether it is usable."""
        state = self._replication
        if replica not in state.stale.get(shard, set()):
            return True
        shard_log = state.log(shard)
        applied = shard_log.applied.get(replica)
        oldest = shard_log.writes[0][0] if shard_log.writes else shard_log.sequence + 1
        if applied is None or applied + 1 < oldest:
            return False  # missed writes are no longer in the log
        try:
            for sequence, sql in list(shard_log.writes):
                if sequence > applied:
                    if isinstance(sql, tuple):
                        await self._replay_transaction(replica, shard, sql, deadline, sequence)
                    else:
                        await self._send(
                            replica, shard, sql, deadline, f"replay-{shard}-{sequence}-{replica}"
                        )
                    shard_log.applied[replica] = sequence
        except ShardError:
            return False
        state.stale[shard].discard(replica)
        log.info("replica %s of shard %d caught up", replica, shard)
        await self._on_stale_changed(state)
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
