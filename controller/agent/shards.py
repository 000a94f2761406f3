"""Database shards served by the agent: real SQLite files by default, PostgreSQL when configured.

The controller never executes user SQL itself: it sends each shard its statement
as an ``execute_shard_statement`` command, and the agent runs it here.

* **SQLite** (default): one file per shard,
  ``<data dir>/shards/<database id>/<shard index>.sqlite3``, WAL mode, one
  connection per shard used from one worker thread at a time. A statement is
  interrupted when its deadline passes (SQLite's progress handler).
* **PostgreSQL** (``--shard-postgres-url``): one schema per shard,
  ``a67s<agent tag>_<database id>_<shard index>`` (created on first use). With a
  privileged URL every shard has a LOGIN role of its own that owns exactly that
  schema, and statements run on a connection made *as* that role; with an
  unprivileged URL the agent serves the shards of one database only (see
  :mod:`controller.agent.pg_shards`). ``statement_timeout`` enforces the deadline.

**Results travel on the data path**, never on the node stream: the agent opens
``NodeService.PushShardResult`` on the node port (a connection of its own), names the
command, and writes the rows in batches (:func:`controller.wire.encode_rows`, about
128 KiB each) while it fetches them (SQLite ``fetchmany``; PostgreSQL a server-side
cursor in a ``READ ONLY`` transaction for reads). gRPC's flow control paces it: a
controller that reads slowly makes the agent fetch slowly. It fetches at most
``max_rows + 1`` rows, so "more than the cap" is known exactly, and stops past
``max_bytes``. When the controller ends the call (its client cancelled, or stopped
needing the rows) the statement is interrupted: SQLite's progress handler, PostgreSQL's
cancel request. The command's own result is then a small summary (rows, rowcount).

A failure is a ``CommandResult`` with ``ok=False`` (and the same in the last message of
the push), the database's own message, and ``error_kind`` — ``constraint`` (a constraint was violated: not
retryable), ``invalid`` (the statement is wrong for this shard: not retryable),
``timeout`` (the deadline passed) or ``unavailable`` (the shard's database could
not be reached: retryable on a replica), ``too_large`` (over the statement's row or
byte cap), ``cancelled`` (the controller ended the result stream); transactions add ``conflict`` (another
transaction holds what this one needs, or the database found a deadlock: the
transaction must be retried) and ``transaction_missing`` (the shard has no such open
transaction, e.g. after an agent restart: it was rolled back).

Transactions (``shard_transaction`` commands, docs/databases.md "Transactions"): see
:mod:`~controller.agent.shard_transactions`.

The store is made of parts, one module each: :mod:`~controller.agent.shard_sqlite`
(SQLite shards and their executor), :mod:`~controller.agent.shard_sqlite_txn` (SQLite
transactions: the wait-die gate, the redo log), :mod:`~controller.agent.shard_postgres`
(PostgreSQL shard access and transactions), :mod:`~controller.agent.shard_transactions`
(the transaction steps, the reaper, ``stream_replaced``),
:mod:`~controller.agent.shard_results` (result batching and the push); this module ties
them into :class:`ShardStore` and answers the commands
(:func:`register_shard_handlers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from automator67.v1 import node_pb2

from controller.agent.handlers import CommandHandlers
from controller.agent.shard_postgres import MAX_PG_TRANSACTIONS, PG_LOCK_TIMEOUT_MS, PG_POOL_SIZE
from controller.agent.shard_results import (
    BATCH_TARGET_BYTES,
    FIRST_BATCH_ROWS,
    MAX_BATCH_BYTES,
    MAX_BATCH_ROWS,
    ResultPart,
    Stop,
    _Batcher,
    push_parts,
)
from controller.agent.shard_sqlite import SQLITE_READERS, _SqliteShard
from controller.agent.shard_sqlite_txn import TXLOG_TABLE, _Gate
from controller.agent.shard_state import _ID, DEFAULT_TIMEOUT_MS, ShardError, _Transaction
from controller.agent.shard_transactions import DEFAULT_IDLE_TIMEOUT_MS, REAP_INTERVAL_SECONDS, _Transactions
from controller.wire import decode_rows

__all__ = [
    "BATCH_TARGET_BYTES",
    "DEFAULT_IDLE_TIMEOUT_MS",
    "DEFAULT_TIMEOUT_MS",
    "FIRST_BATCH_ROWS",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_ROWS",
    "MAX_PG_TRANSACTIONS",
    "PG_LOCK_TIMEOUT_MS",
    "PG_POOL_SIZE",
    "REAP_INTERVAL_SECONDS",
    "SQLITE_READERS",
    "TXLOG_TABLE",
    "ResultPart",
    "ShardError",
    "ShardStore",
    "Stop",
    "register_shard_handlers",
]


class ShardStore(_Transactions):
    """The shards this agent serves."""

    def __init__(
        self, data_dir: Path, postgres_url: str = "", *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._root = data_dir / "shards"
        self._postgres_url = postgres_url
        self._sqlite: dict[tuple[str, int], _SqliteShard] = {}
        self._pg: dict[tuple[str, int], Any] = {}
        self._pg_lock = asyncio.Lock()
        self._pg_shards: Any = None  # a pg_shards.PostgresShards, made on first use
        self._clock = clock
        self._transactions: dict[str, _Transaction] = {}
        self._gates: dict[tuple[str, int], _Gate] = {}
        self._restored: set[tuple[str, int]] = set()
        self._restore_lock = asyncio.Lock()
        self._pg_pool: dict[tuple[str, int], list[Any]] = {}
        self._pg_slots: dict[tuple[str, int], asyncio.Semaphore] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._abandoning: set[asyncio.Task[None]] = set()
        self._sqlite_readers: dict[tuple[str, int], list[sqlite3.Connection]] = {}
        self.fetch_statement: Callable[[node_pb2.StatementRef], Awaitable[str]] | None = None
        """Fetches a long statement's text (``NodeService.FetchStatement``); set by the agent."""
        self.open_push: Callable[[], Any] | None = None
        """Opens ``NodeService.PushShardResult`` (the agent's data path); set by the agent."""

    @property
    def backend(self) -> str:
        return "postgres" if self._postgres_url else "sqlite"

    async def execute(
        self, database_id: str, shard_index: int, sql: str, timeout_ms: int
    ) -> tuple[list[tuple[str, str]], list[tuple[Any, ...]], int]:
        """Run ``sql`` and collect its whole result (columns, rows, rowcount): :meth:`stream`
        gathered, for the agent's own use and tests."""
        columns: list[tuple[str, str]] = []
        rows: list[tuple[Any, ...]] = []
        rowcount = -1
        async for part in self.stream(database_id, shard_index, sql, timeout_ms):
            if part.columns is not None:
                columns = part.columns
            if part.count:
                rows.extend(decode_rows(part.rows))
            if part.done:
                rowcount = part.rowcount
        return columns, rows, rowcount

    async def stream(
        self,
        database_id: str,
        shard_index: int,
        sql: str,
        timeout_ms: int,
        *,
        max_rows: int = 0,
        max_bytes: int = 0,
        read_only: bool = False,
        stop: Stop | None = None,
    ) -> AsyncGenerator[ResultPart, None]:
        """Run ``sql`` and yield its result in batches as they are fetched (the first part
        has the columns, the last is ``done``); :class:`ShardError` on failure.

        ``read_only`` statements run on a connection of their own (SQLite: a read-only
        one, WAL readers do not wait for the writer; PostgreSQL: a server-side cursor in a
        ``READ ONLY`` transaction), others on the shard's connection."""
        if not _ID.match(database_id) or not 0 <= shard_index < 4096:
            raise ShardError("invalid", "bad database id or shard index")
        timeout = (timeout_ms or DEFAULT_TIMEOUT_MS) / 1000
        stop = stop or Stop()
        batcher = _Batcher(max(0, max_rows), max(0, max_bytes))
        key = (database_id, shard_index)
        if self._postgres_url:
            parts = self._stream_pg(key, sql, timeout, batcher, read_only, stop)
        else:
            await self._restore_prepared(key)
            parts = self._stream_sqlite(key, sql, time.monotonic() + timeout, batcher, read_only, stop)
        try:
            async for part in parts:
                yield part
        finally:
            await parts.aclose()

    async def push_result(
        self,
        command_id: str,
        request: node_pb2.ExecuteShardStatement,
        open_push: Callable[[], Any],
    ) -> node_pb2.CommandResult:
        """Run an ``execute_shard_statement`` and push its rows over ``PushShardResult``
        (``open_push`` opens the call); the command's result is a small summary."""
        return await push_parts(
            command_id,
            request.shard_index,
            open_push,
            request.inline_ok,
            lambda stop: self.stream(
                request.database_id,
                request.shard_index,
                request.sql,
                request.timeout_ms,
                max_rows=request.max_rows,
                max_bytes=request.max_bytes,
                read_only=request.read_only,
                stop=stop,
            ),
        )

    async def push_transaction(
        self, command_id: str, request: node_pb2.ShardTransaction, open_push: Callable[[], Any]
    ) -> node_pb2.CommandResult:
        """Run a transaction's ``BEGIN`` (with sql) or ``EXECUTE`` with ``push_rows`` and push
        the statement's rows over ``PushShardResult``, like :meth:`push_result`."""
        return await push_parts(
            command_id,
            request.shard_index,
            open_push,
            request.inline_ok,
            lambda stop: self.transaction_rows(request, stop),
        )

    async def close(self) -> None:
        for task in list(self._abandoning):
            with contextlib.suppress(BaseException):
                await task
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(BaseException):
                await self._reaper
        for txn in list(self._transactions.values()):
            if txn.state == "active":
                await self._discard(txn, commit=False)
            elif txn.conn is not None and not self._postgres_url:
                txn.conn.close()  # prepared: the redo log keeps it
        self._transactions.clear()
        for pool in self._pg_pool.values():
            for conn in pool:
                await conn.close()
        self._pg_pool.clear()
        for shard in self._sqlite.values():
            shard.close()
        self._sqlite.clear()
        for readers in self._sqlite_readers.values():
            for reader in readers:
                reader.close()
        self._sqlite_readers.clear()
        for conn in self._pg.values():
            await conn.close()
        self._pg.clear()
        if self._pg_shards is not None:
            await self._pg_shards.close()
            self._pg_shards = None


def register_shard_handlers(handlers: CommandHandlers, store: ShardStore) -> None:
    """Answer ``execute_shard_statement`` commands from ``store``."""

    async def fetch_text(command: node_pb2.NodeCommand, body: Any) -> node_pb2.CommandResult | None:
        """A long statement's text came as a reference: fetch it into ``body.sql``; an error
        result if that failed (None when all is well)."""
        if not body.HasField("sql_ref"):
            return None
        why = "this agent has no data path to the controller (not connected)"
        if store.fetch_statement is not None:
            try:
                body.sql = await store.fetch_statement(body.sql_ref)
                body.ClearField("sql_ref")
                return None
            except (grpc.aio.AioRpcError, ValueError) as exc:
                why = f"could not fetch the statement's text: {exc}"
        return node_pb2.CommandResult(
            command_id=command.command_id,
            ok=False,
            error_message=why,
            payload=json.dumps({"error_kind": "unavailable"}).encode(),
        )

    async def execute_shard_statement(command: node_pb2.NodeCommand) -> node_pb2.CommandResult:
        if (failed := await fetch_text(command, command.execute_shard_statement)) is not None:
            return failed
        if store.open_push is None:
            return node_pb2.CommandResult(
                command_id=command.command_id,
                ok=False,
                error_message="this agent has no data path to the controller (not connected)",
                payload=json.dumps({"error_kind": "unavailable"}).encode(),
            )
        return await store.push_result(command.command_id, command.execute_shard_statement, store.open_push)

    handlers.register("execute_shard_statement", execute_shard_statement)

    async def shard_transaction(command: node_pb2.NodeCommand) -> node_pb2.CommandResult:
        request = command.shard_transaction
        if (failed := await fetch_text(command, request)) is not None:
            return failed
        actions = node_pb2.ShardTransactionAction
        if request.push_rows and request.action in (
            actions.SHARD_TRANSACTION_ACTION_BEGIN,
            actions.SHARD_TRANSACTION_ACTION_EXECUTE,
        ):
            if store.open_push is None:
                return node_pb2.CommandResult(
                    command_id=command.command_id,
                    ok=False,
                    error_message="this agent has no data path to the controller (not connected)",
                    payload=json.dumps({"error_kind": "unavailable"}).encode(),
                )
            return await store.push_transaction(command.command_id, request, store.open_push)
        try:
            payload = await store.transaction(command.shard_transaction)
        except ShardError as exc:
            return node_pb2.CommandResult(
                command_id=command.command_id,
                ok=False,
                error_message=str(exc),
                payload=json.dumps({"error_kind": exc.kind}).encode(),
            )
        return node_pb2.CommandResult(command_id=command.command_id, ok=True, payload=payload)

    handlers.register("shard_transaction", shard_transaction)
