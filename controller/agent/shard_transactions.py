"""Transactions on shards (``shard_transaction`` commands, docs/databases.md "Transactions"):
the steps (``BEGIN``, ``EXECUTE``, ``PREPARE``, ``COMMIT``, ``ROLLBACK``,
``LIST_PREPARED``), the idle reaper and :meth:`_Transactions.stream_replaced`, over the
SQLite (:mod:`~controller.agent.shard_sqlite_txn`) and PostgreSQL
(:mod:`~controller.agent.shard_postgres`) backends.

**SQLite** (:mod:`~controller.agent.shard_sqlite_txn`): a transaction runs on a
connection of its own, opened with ``BEGIN IMMEDIATE``; a shard has one writer at a
time, so the agent queues transactions per shard with *wait-die*: no deadlock across
shards. ``PREPARE`` writes the statements that changed rows to a redo log, fsynced,
and keeps the connection and its lock; after an agent restart the redo log is replayed
into a new held transaction before anything else runs on the shard.

**PostgreSQL** (:mod:`~controller.agent.shard_postgres`): a connection as the shard's
role with ``BEGIN``; ``PREPARE TRANSACTION 'a67tx_<id>_<shard name>'``; ``COMMIT
PREPARED`` / ``ROLLBACK PREPARED`` on the shard's own connection (the same role).

``COMMIT``/``ROLLBACK`` of a transaction the shard does not know is no error: it was
resolved before. An open transaction that is not prepared is rolled back after its
idle timeout (the controller's is shorter), and at once when the agent's controller
stream is replaced: the agent never holds a shard for a controller that went away. A
prepared one waits for its decision however long it takes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

from automator67.v1 import node_pb2

from controller.agent.shard_postgres import _pg_error, _PgShards
from controller.agent.shard_results import ResultPart, Stop, _Batcher
from controller.agent.shard_sqlite import _run_sqlite
from controller.agent.shard_sqlite_txn import _SqliteTransactions
from controller.agent.shard_state import _ID, DEFAULT_TIMEOUT_MS, ShardError, _Transaction
from controller.wire import encode_result

log = logging.getLogger("controller.agent.shards")

# Idle timeout of an open, unprepared transaction when a command gives none.
DEFAULT_IDLE_TIMEOUT_MS = 120_000
# How often the agent looks for idle transactions (while any is open).
REAP_INTERVAL_SECONDS = 1.0


class _Transactions(_SqliteTransactions, _PgShards):
    """The transactions of :class:`~controller.agent.shards.ShardStore`."""

    async def transaction(self, request: node_pb2.ShardTransaction) -> bytes:
        """Run one step of a transaction; the result payload (see node.proto)."""
        if not _ID.match(request.database_id) or not 0 <= request.shard_index < 4096:
            raise ShardError("invalid", "bad database id or shard index")
        if not _ID.match(request.transaction_id):
            raise ShardError("invalid", "bad transaction id")
        key = (request.database_id, request.shard_index)
        timeout = (request.timeout_ms or DEFAULT_TIMEOUT_MS) / 1000
        actions = node_pb2.ShardTransactionAction
        await self.reap_idle()
        if not self._postgres_url:
            await self._restore_prepared(key)
        action = request.action
        if action == actions.SHARD_TRANSACTION_ACTION_BEGIN:
            return await self._begin(key, request, timeout)
        if action == actions.SHARD_TRANSACTION_ACTION_LIST_PREPARED:
            return json.dumps({"prepared": await self._list_prepared(key)}).encode()
        txn = self._transactions.get(request.transaction_id)
        if txn is not None and txn.key != key:
            raise ShardError("invalid", "the transaction is open on another shard")
        if action == actions.SHARD_TRANSACTION_ACTION_EXECUTE:
            if txn is None or txn.state != "active":
                raise ShardError(
                    "transaction_missing",
                    f"shard {key[1]} has no open transaction {request.transaction_id} "
                    "(it was rolled back: idle too long, or the agent restarted)",
                )
            async with txn.lock:
                txn.last_used = self._clock()
                return encode_result(*await self._statement(txn, request.sql, timeout))
        if action == actions.SHARD_TRANSACTION_ACTION_PREPARE:
            if txn is None or (txn.state == "active" and txn.conn is None):
                raise ShardError("transaction_missing", f"shard {key[1]} has no open transaction to prepare")
            async with txn.lock:
                if txn.state == "active":
                    await self._prepare(txn)
            return json.dumps({"state": "prepared"}).encode()
        if action == actions.SHARD_TRANSACTION_ACTION_COMMIT:
            return json.dumps(
                {"state": await self._finish(key, request.transaction_id, commit=True)}
            ).encode()
        if action == actions.SHARD_TRANSACTION_ACTION_ROLLBACK:
            return json.dumps(
                {"state": await self._finish(key, request.transaction_id, commit=False)}
            ).encode()
        raise ShardError("invalid", "unknown transaction action")

    async def transaction_rows(
        self, request: node_pb2.ShardTransaction, stop: Stop
    ) -> AsyncGenerator[ResultPart, None]:
        """A ``BEGIN`` (with sql) or ``EXECUTE`` step whose rows are yielded in batches (the
        first part has the columns, the last is ``done``), within the request's caps. A
        failed ``BEGIN`` leaves no transaction behind."""
        actions = node_pb2.ShardTransactionAction
        if not _ID.match(request.database_id) or not 0 <= request.shard_index < 4096:
            raise ShardError("invalid", "bad database id or shard index")
        if not _ID.match(request.transaction_id):
            raise ShardError("invalid", "bad transaction id")
        if request.action not in (
            actions.SHARD_TRANSACTION_ACTION_BEGIN,
            actions.SHARD_TRANSACTION_ACTION_EXECUTE,
        ):
            raise ShardError("invalid", "only BEGIN and EXECUTE return rows")
        key = (request.database_id, request.shard_index)
        timeout = (request.timeout_ms or DEFAULT_TIMEOUT_MS) / 1000
        batcher = _Batcher(max(0, request.max_rows), max(0, request.max_bytes))
        await self.reap_idle()
        if not self._postgres_url:
            await self._restore_prepared(key)
        if request.action == actions.SHARD_TRANSACTION_ACTION_BEGIN:
            opened = await self._open_transaction(key, request, timeout)
            try:
                async with opened.lock:
                    async for part in self._statement_parts(opened, request.sql, timeout, batcher, stop):
                        yield part
                    opened.last_used = self._clock()
            except BaseException:
                await self._discard(opened, commit=False)
                raise
            return
        txn = self._transactions.get(request.transaction_id)
        if txn is not None and txn.key != key:
            raise ShardError("invalid", "the transaction is open on another shard")
        if txn is None or txn.state != "active":
            raise ShardError(
                "transaction_missing",
                f"shard {key[1]} has no open transaction {request.transaction_id} "
                "(it was rolled back: idle too long, or the agent restarted)",
            )
        async with txn.lock:
            txn.last_used = self._clock()
            async for part in self._statement_parts(txn, request.sql, timeout, batcher, stop):
                yield part
            txn.last_used = self._clock()

    async def _open_transaction(
        self, key: tuple[str, int], request: node_pb2.ShardTransaction, limit_s: float
    ) -> _Transaction:
        """Open ``request``'s transaction on the shard (no statement yet)."""
        if request.transaction_id in self._transactions:
            raise ShardError("invalid", f"transaction {request.transaction_id} is already open here")
        txn = _Transaction(
            id=request.transaction_id,
            key=key,
            priority=request.priority,
            idle_timeout=(request.idle_timeout_ms or DEFAULT_IDLE_TIMEOUT_MS) / 1000,
            last_used=self._clock(),
            distributed=request.distributed,
        )
        async with txn.lock:
            self._transactions[txn.id] = txn
            try:
                if self._postgres_url:
                    await self._pg_begin(txn, limit_s)
                else:
                    await self._sqlite_begin(txn, limit_s, may_wait=request.holds_nothing)
                self._start_reaper()
                txn.last_used = self._clock()
                return txn
            except BaseException:
                await self._discard(txn, commit=False)
                raise

    async def _statement_parts(
        self, txn: _Transaction, sql: str, limit_s: float, batcher: _Batcher, stop: Stop
    ) -> AsyncGenerator[ResultPart, None]:
        """Run ``sql`` in ``txn`` and yield its rows in batches as they are fetched."""
        if not sql:
            yield ResultPart(columns=[], done=True)
            return
        if self._postgres_url:
            async for part in self._pg_statement_parts(txn, sql, limit_s, batcher, stop):
                yield part
            return
        parts = self._sqlite_statement_parts(txn, sql, limit_s, batcher, stop)
        try:
            async for part in parts:
                yield part
        finally:
            await parts.aclose()

    async def _begin(self, key: tuple[str, int], request: node_pb2.ShardTransaction, limit_s: float) -> bytes:
        """Open ``request``'s transaction, then run its first statement (if any) in it."""
        txn = await self._open_transaction(key, request, limit_s)
        if not request.sql:
            return encode_result([], [], -1)
        async with txn.lock:
            try:
                result = await self._statement(txn, request.sql, limit_s)
                txn.last_used = self._clock()
                return encode_result(*result)
            except BaseException:
                await self._discard(txn, commit=False)
                raise

    async def _statement(
        self, txn: _Transaction, sql: str, limit_s: float
    ) -> tuple[list[tuple[str, str]], list[tuple[Any, ...]], int]:
        if self._postgres_url:
            return await self._pg_statement(txn, sql, limit_s)

        def run() -> tuple[list[tuple[str, str]], list[tuple[Any, ...]], int]:
            before = txn.conn.total_changes
            result = _run_sqlite(txn.conn, sql, time.monotonic() + limit_s)
            if txn.conn.total_changes != before:
                txn.statements.append(sql)
            return result

        return await asyncio.to_thread(run)

    async def _prepare(self, txn: _Transaction) -> None:
        if self._postgres_url:
            await self._pg_prepare(txn)
        else:
            await asyncio.to_thread(self._sqlite_prepare, txn)
        txn.state = "prepared"

    async def _finish(self, key: tuple[str, int], transaction_id: str, *, commit: bool) -> str:
        """Commit or roll back ``transaction_id`` on the shard; ``unknown`` if it was resolved before."""
        txn = self._transactions.get(transaction_id)
        if txn is None:
            if self._postgres_url:
                return await self._pg_finish_prepared(key, transaction_id, commit=commit)
            return "unknown"
        async with txn.lock:
            if self._transactions.get(transaction_id) is not txn:
                return "unknown"
            await self._discard(txn, commit=commit)
        return "committed" if commit else "rolled_back"

    async def _discard(self, txn: _Transaction, *, commit: bool) -> None:
        """End ``txn`` (commit or roll back) and forget it; rolling back never raises."""
        try:
            if self._postgres_url:
                if txn.state == "prepared":
                    await self._pg_finish_prepared(txn.key, txn.id, commit=commit)
                elif txn.conn is not None:
                    await self._pg_end(txn, commit=commit)
            elif txn.conn is not None:
                await asyncio.to_thread(self._sqlite_end, txn, commit)
        except ShardError:
            if commit:
                raise
            log.warning("rolling back transaction %s failed", txn.id, exc_info=True)
        finally:
            self._transactions.pop(txn.id, None)
            if not self._postgres_url:
                await self._gate(txn.key).release(txn)

    async def reap_idle(self) -> int:
        """Roll back open, unprepared transactions idle past their timeout; how many."""
        now = self._clock()
        idle = [
            t for t in list(self._transactions.values())
            if t.state == "active" and now - t.last_used > t.idle_timeout and not t.lock.locked()
        ]  # fmt: skip
        for txn in idle:
            log.info("transaction %s on shard %d idle for %.0f s: rolled back", txn.id, txn.key[1],
                     now - txn.last_used)  # fmt: skip
            async with txn.lock:
                if self._transactions.get(txn.id) is txn:
                    await self._discard(txn, commit=False)
        return len(idle)

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap_forever(), name="agent-transaction-reaper")

    async def _reap_forever(self) -> None:
        while any(t.state == "active" for t in self._transactions.values()):
            await asyncio.sleep(REAP_INTERVAL_SECONDS)
            try:
                await self.reap_idle()
            except Exception:  # keep reaping
                log.warning("reaping idle transactions failed", exc_info=True)

    def stream_replaced(self) -> None:
        """The agent's ``on_connected`` hook: roll back every open, unprepared transaction.

        Only the controller that spoke on the stream that ended can use them, and it treats
        them as aborted (a new controller presumes abort; the same one after a break finds
        them gone at its next statement or one-phase commit). Held until the idle timeout,
        their locks — PostgreSQL row locks, SQLite's one writer — would only make the next
        transactions wait. Prepared transactions stay: they wait for their decision."""
        abandoned = [t for t in self._transactions.values() if t.state == "active"]
        if not abandoned:
            return
        log.info("controller stream replaced: rolling back %d open transaction(s)", len(abandoned))
        task = asyncio.create_task(self._abandon(abandoned), name="agent-abandon-transactions")
        self._abandoning.add(task)
        task.add_done_callback(self._abandoning.discard)

    async def _abandon(self, transactions: list[_Transaction]) -> None:
        async def one(txn: _Transaction) -> None:
            async with txn.lock:  # a statement of the old stream may still be running
                if self._transactions.get(txn.id) is txn and txn.state == "active":
                    await self._discard(txn, commit=False)

        for outcome in await asyncio.gather(*(one(t) for t in transactions), return_exceptions=True):
            if isinstance(outcome, BaseException):
                log.warning("rolling back an abandoned transaction failed", exc_info=outcome)

    def open_transactions(self) -> dict[str, str]:
        """Transaction id → state, for tests and diagnostics."""
        return {t.id: t.state for t in self._transactions.values()}

    async def _list_prepared(self, key: tuple[str, int]) -> list[str]:
        if not self._postgres_url:
            return sorted(t.id for t in self._transactions.values() if t.key == key and t.state == "prepared")
        prefix, suffix = "a67tx_", "_" + await self._pg_name(key)
        conn = await self._pg_connection(key)
        try:
            cursor = await conn.execute(
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() AND gid LIKE %s",
                ("a67tx\\_%",),
            )
            rows = await cursor.fetchall()
        except Exception as exc:
            raise _pg_error(exc) from exc
        return sorted(g[len(prefix) : -len(suffix)] for (g,) in rows if g.endswith(suffix))
