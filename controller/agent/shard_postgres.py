"""PostgreSQL shard access (``--shard-postgres-url``): one schema per shard, reached as
the shard's own role (:mod:`controller.agent.pg_shards`), its statements and its
transactions.

A statement outside a transaction runs on the shard's own connection when it writes,
and on a pooled connection of its own in a ``READ ONLY`` transaction with a server-side
cursor when it reads (rows are fetched while they are pushed). A transaction holds a
pooled connection as the shard's role from ``BEGIN`` until ``PREPARE TRANSACTION
'a67tx_<id>_<shard name>'`` (or its end); ``COMMIT PREPARED`` / ``ROLLBACK PREPARED``
run on the shard's own connection. A shard has at most :data:`MAX_PG_TRANSACTIONS`
connections open for statements and transactions, and keeps :data:`PG_POOL_SIZE` idle.
Interrupting a statement is PostgreSQL's cancel request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import Any

from controller.agent.shard_results import ResultPart, Stop, _Batcher
from controller.agent.shard_state import ShardError, _ShardStoreState, _Transaction

# Open transactions per PostgreSQL shard (each holds a connection as the shard's role).
MAX_PG_TRANSACTIONS = 32
# How long a statement of a distributed transaction on PostgreSQL waits for a lock before
# it fails as a conflict (PostgreSQL's own deadlock_timeout is 1 s by default).
PG_LOCK_TIMEOUT_MS = 1000
# Idle PostgreSQL connections kept per shard for the next transaction.
PG_POOL_SIZE = 8


class _PgShards(_ShardStoreState):
    """The PostgreSQL part of :class:`~controller.agent.shards.ShardStore`."""

    async def _stream_pg(
        self, key: tuple[str, int], sql: str, limit_s: float, batcher: _Batcher, read_only: bool, stop: Stop
    ) -> AsyncGenerator[ResultPart, None]:
        import psycopg

        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s

        def columns_of(cursor: Any) -> Callable[[list[Any]], list[tuple[str, str]]]:
            described = []
            for d in cursor.description or ():
                info = psycopg.adapters.types.get(d.type_code)
                described.append((d.name, info.name if info else str(d.type_code)))
            return lambda _rows: described

        def timeout_ms() -> int:
            return max(1, int((deadline - loop.time()) * 1000))

        if not read_only:  # a write: the shard's own connection, as before
            conn = await self._pg_connection(key)
            try:
                async with conn.cursor() as cursor:
                    await cursor.execute(f"SET statement_timeout = {timeout_ms()}")
                    await cursor.execute(sql.encode())
                    rows = [tuple(r) for r in await cursor.fetchall()] if cursor.description else []
                    described = columns_of(cursor)
                    rowcount = cursor.rowcount
            except Exception as exc:
                raise _pg_error(exc, stop) from exc
            batcher.size = max(1, len(rows))
            for part in await asyncio.to_thread(batcher.parts, rows, len(rows) + 1, described, rowcount):
                yield part
            return

        conn = await self._pg_borrow(key, limit_s)
        healthy = False
        forget = stop.on_set(lambda: asyncio.ensure_future(_pg_cancel(conn)))
        try:
            try:
                await conn.execute("BEGIN READ ONLY")
                await conn.execute(f"SET LOCAL statement_timeout = {timeout_ms()}")
                await conn.execute(b"DECLARE a67_rows NO SCROLL CURSOR FOR " + sql.encode())
            except Exception as exc:
                raise _pg_error(exc, stop) from exc
            while True:
                asked = batcher.want()
                try:
                    if loop.time() >= deadline:
                        raise ShardError("timeout", "the statement passed its deadline")
                    cursor = await conn.execute(f"FETCH FORWARD {asked} FROM a67_rows")
                    rows = await cursor.fetchall()
                except Exception as exc:
                    raise _pg_error(exc, stop) from exc
                parts = await asyncio.to_thread(batcher.parts, rows, asked, columns_of(cursor), -1)
                for part in parts:
                    yield part
                if parts[-1].done:
                    break
            healthy = True
        finally:
            forget()
            await self._pg_return(key, conn, healthy and not stop.is_set())

    async def _pg_borrow(self, key: tuple[str, int], wait_s: float) -> Any:
        """A connection as the shard's role of its own (from the idle pool), within the
        shard's connection slots."""
        slots = self._pg_slots.setdefault(key, asyncio.Semaphore(MAX_PG_TRANSACTIONS))
        try:
            await asyncio.wait_for(slots.acquire(), wait_s)
        except TimeoutError as exc:
            raise ShardError("timeout", "too many statements open on the shard") from exc
        try:
            pool = self._pg_pool.setdefault(key, [])
            while pool:
                candidate = pool.pop()
                if not candidate.closed:
                    return candidate
            await self._pg_connection(key)  # the shard is set up (once) by its own connection
            async with self._pg_lock:
                return await self._pg_shards.reopen(*key)
        except BaseException:
            slots.release()
            raise

    async def _pg_return(self, key: tuple[str, int], conn: Any, healthy: bool) -> None:
        try:
            if healthy:
                try:
                    await conn.execute("ROLLBACK")
                except Exception:
                    healthy = False
            pool = self._pg_pool.setdefault(key, [])
            if healthy and not conn.closed and len(pool) < PG_POOL_SIZE:
                pool.append(conn)
            elif not conn.closed:
                with contextlib.suppress(Exception):
                    await conn.close()
        finally:
            self._pg_slots[key].release()

    async def _pg_connection(self, key: tuple[str, int]) -> Any:
        """The shard's own connection for single statements (and COMMIT/ROLLBACK PREPARED)."""
        async with self._pg_lock:
            conn = self._pg.get(key)
            if conn is None or conn.closed:
                conn = await self._pg_open(key)
                self._pg[key] = conn
            return conn

    async def _pg_open(self, key: tuple[str, int]) -> Any:
        from controller.agent.pg_shards import PostgresShards

        if self._pg_shards is None:
            self._pg_shards = PostgresShards(self._postgres_url, self._root.parent)
        return await self._pg_shards.open(*key)

    async def _pg_name(self, key: tuple[str, int]) -> str:
        if self._pg_shards is None:
            from controller.agent.pg_shards import PostgresShards

            self._pg_shards = PostgresShards(self._postgres_url, self._root.parent)
        return str(self._pg_shards.name_of(*key))

    async def _gid(self, key: tuple[str, int], transaction_id: str) -> str:
        return f"a67tx_{transaction_id}_{await self._pg_name(key)}"

    async def _pg_begin(self, txn: _Transaction, wait_s: float) -> None:
        slots = self._pg_slots.setdefault(txn.key, asyncio.Semaphore(MAX_PG_TRANSACTIONS))
        try:
            await asyncio.wait_for(slots.acquire(), wait_s)
        except TimeoutError as exc:
            raise ShardError("timeout", "too many open transactions on the shard") from exc
        try:
            pool = self._pg_pool.setdefault(txn.key, [])
            conn = None
            while pool and conn is None:
                candidate = pool.pop()
                conn = None if candidate.closed else candidate
            if conn is None:
                await self._pg_connection(txn.key)  # the shard is set up (once) by its own connection
                async with self._pg_lock:
                    conn = await self._pg_shards.reopen(*txn.key)
            try:
                await conn.execute("BEGIN")
                if txn.distributed:
                    # A lock wait that crosses shards can be a deadlock no server sees (each
                    # shard's session waits on another's, through the controller): bounded,
                    # it fails as a conflict and the client retries. Wait-die for SQLite.
                    await conn.execute(f"SET LOCAL lock_timeout = {PG_LOCK_TIMEOUT_MS}")
            except Exception as exc:
                await conn.close()
                raise _pg_error(exc) from exc
            txn.conn = conn
        except BaseException:
            slots.release()
            raise

    async def _pg_statement(
        self, txn: _Transaction, sql: str, limit_s: float
    ) -> tuple[list[tuple[str, str]], list[tuple[Any, ...]], int]:
        import psycopg

        try:
            async with txn.conn.cursor() as cursor:
                await cursor.execute(f"SET LOCAL statement_timeout = {max(1, int(limit_s * 1000))}")
                await cursor.execute(sql.encode())
                rows = [tuple(r) for r in await cursor.fetchall()] if cursor.description else []
                columns = []
                for d in cursor.description or ():
                    info = psycopg.adapters.types.get(d.type_code)
                    columns.append((d.name, info.name if info else str(d.type_code)))
                return columns, rows, cursor.rowcount
        except Exception as exc:
            raise _pg_error(exc) from exc

    async def _pg_statement_parts(
        self, txn: _Transaction, sql: str, limit_s: float, batcher: _Batcher, stop: Stop
    ) -> AsyncGenerator[ResultPart, None]:
        import psycopg

        forget = stop.on_set(lambda: asyncio.ensure_future(_pg_cancel(txn.conn)))
        try:
            async with txn.conn.cursor() as cursor:
                try:
                    await cursor.execute(f"SET LOCAL statement_timeout = {max(1, int(limit_s * 1000))}")
                    await cursor.execute(sql.encode())
                except Exception as exc:
                    raise _pg_error(exc, stop) from exc
                described = []
                for d in cursor.description or ():
                    info = psycopg.adapters.types.get(d.type_code)
                    described.append((d.name, info.name if info else str(d.type_code)))
                rowcount = cursor.rowcount
                while True:
                    asked = batcher.want()
                    rows = [tuple(r) for r in await cursor.fetchmany(asked)] if cursor.description else []
                    if not cursor.description:
                        asked = 1
                    parts = await asyncio.to_thread(
                        batcher.parts, rows, asked, lambda _rows: described, rowcount
                    )
                    for part in parts:
                        yield part
                    if parts[-1].done:
                        return
        finally:
            forget()

    async def _pg_prepare(self, txn: _Transaction) -> None:
        gid = await self._gid(txn.key, txn.id)
        try:
            await txn.conn.execute(f"PREPARE TRANSACTION '{gid}'")
        except Exception as exc:
            raise _pg_error(exc) from exc
        await self._pg_release(txn)

    async def _pg_end(self, txn: _Transaction, *, commit: bool) -> None:
        try:
            await txn.conn.execute("COMMIT" if commit else "ROLLBACK")
        except Exception as exc:
            await txn.conn.close()
            await self._pg_release(txn)
            raise _pg_error(exc) from exc
        await self._pg_release(txn)

    async def _pg_release(self, txn: _Transaction) -> None:
        conn, txn.conn = txn.conn, None
        if conn is None:
            return
        pool = self._pg_pool.setdefault(txn.key, [])
        if not conn.closed and len(pool) < PG_POOL_SIZE:
            pool.append(conn)
        elif not conn.closed:
            await conn.close()
        self._pg_slots[txn.key].release()

    async def _pg_finish_prepared(self, key: tuple[str, int], transaction_id: str, *, commit: bool) -> str:
        gid = await self._gid(key, transaction_id)
        conn = await self._pg_connection(key)
        try:
            cursor = await conn.execute("SELECT 1 FROM pg_prepared_xacts WHERE gid = %s", (gid,))
            if await cursor.fetchone() is None:
                return "unknown"
            await conn.execute(f"{'COMMIT' if commit else 'ROLLBACK'} PREPARED '{gid}'")
        except Exception as exc:
            raise _pg_error(exc) from exc
        return "committed" if commit else "rolled_back"


async def _pg_cancel(conn: Any) -> None:
    """Ask PostgreSQL to cancel what ``conn`` runs (a new connection to the server)."""
    with contextlib.suppress(Exception):
        await conn.cancel_safe(timeout=5.0)


def _pg_error(exc: BaseException, stop: Stop | None = None) -> ShardError:
    import psycopg
    from psycopg import errors as pg_errors

    if isinstance(exc, ShardError):
        return exc
    if isinstance(exc, pg_errors.QueryCanceled):
        if stop is not None and stop.is_set():
            return ShardError("cancelled", f"the statement was interrupted: {stop.reason}")
        return ShardError("timeout", "the statement passed its deadline")
    if isinstance(
        exc, pg_errors.DeadlockDetected | pg_errors.SerializationFailure | pg_errors.LockNotAvailable
    ):
        return ShardError("conflict", str(exc).strip())
    if isinstance(exc, psycopg.errors.IntegrityError):
        return ShardError("constraint", str(exc).strip())
    if isinstance(exc, psycopg.OperationalError):
        return ShardError("unavailable", str(exc).strip())
    if isinstance(exc, psycopg.Error):
        return ShardError("invalid", str(exc).strip())
    return ShardError("invalid", f"{type(exc).__name__}: {exc}")
