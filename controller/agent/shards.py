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

Transactions (``shard_transaction`` commands, docs/databases.md "Transactions")
    **SQLite**: a transaction runs on a connection of its own, opened with
    ``BEGIN IMMEDIATE``; a shard has one writer at a time, so the agent queues
    transactions per shard with *wait-die* (an older transaction waits for the
    holder, a younger one fails at once with ``conflict``; one that holds no other
    shard yet always waits): no deadlock across shards.
    ``PREPARE`` writes the statements that changed rows to a redo log,
    ``<shard>.prepared/<transaction id>.json``, fsynced, and keeps the connection
    and its lock. After an agent restart the redo log is replayed into a new held
    transaction before anything else runs on the shard, so the prepared state (and
    its lock) survives the crash; a marker row in ``_a67_txlog``, written in the
    same SQLite transaction as the changes, tells a redo log whose commit already
    happened (then it is only deleted). **PostgreSQL**: a connection as the shard's
    role with ``BEGIN``; ``PREPARE TRANSACTION 'a67tx_<id>_<shard name>'``;
    ``COMMIT PREPARED`` / ``ROLLBACK PREPARED`` on the shard's own connection (the
    same role). ``COMMIT``/``ROLLBACK`` of a transaction the shard does not know is
    no error: it was resolved before. An open transaction that is not prepared is
    rolled back after its idle timeout (the controller's is shorter), and at once when
    the agent's controller stream is replaced: the agent never holds a shard for a
    controller that went away. A prepared one waits for its decision however long it
    takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from automator67.v1 import node_pb2

from controller.agent.handlers import CommandHandlers
from controller.limits import CONTROL_MESSAGE_MAX_BYTES
from controller.wire import decode_rows, encode_result, encode_rows

log = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Deadline used when a command gives none.
DEFAULT_TIMEOUT_MS = 30_000
# Idle timeout of an open, unprepared transaction when a command gives none.
DEFAULT_IDLE_TIMEOUT_MS = 120_000
# How often the agent looks for idle transactions (while any is open).
REAP_INTERVAL_SECONDS = 1.0
# Open transactions per PostgreSQL shard (each holds a connection as the shard's role).
MAX_PG_TRANSACTIONS = 32
# How long a statement of a distributed transaction on PostgreSQL waits for a lock before
# it fails as a conflict (PostgreSQL's own deadlock_timeout is 1 s by default).
PG_LOCK_TIMEOUT_MS = 1000
# Idle PostgreSQL connections kept per shard for the next transaction.
PG_POOL_SIZE = 8
# The table of committed redo logs in an SQLite shard (hidden from schema reads).
TXLOG_TABLE = "_a67_txlog"
# Encoded bytes aimed at per batch of a result (the batch size adapts to the rows' width).
BATCH_TARGET_BYTES = 128 * 1024
# Rows of the first batch (the first rows leave quickly), and at most per batch.
FIRST_BATCH_ROWS = 64
MAX_BATCH_ROWS = 16_384
# Largest batch message: what the node port accepts on one message, less framing.
MAX_BATCH_BYTES = CONTROL_MESSAGE_MAX_BYTES - 2048
# Idle read-only SQLite connections kept per shard.
SQLITE_READERS = 4


class ShardError(Exception):
    """A statement failed on its shard."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _type_of(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "BOOLEAN"
    if isinstance(value, int):
        return "INTEGER"
    if isinstance(value, float):
        return "REAL"
    if isinstance(value, bytes):
        return "BLOB"
    return "TEXT"


def _run_sqlite(
    conn: sqlite3.Connection, sql: str, deadline: float
) -> tuple[list[tuple[str, str]], list[tuple[Any, ...]], int]:
    conn.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 1000)
    try:
        cursor = conn.execute(sql)
        rows = cursor.fetchall()
        names = [d[0] for d in cursor.description or ()]
        types = ["NULL"] * len(names)
        for row in rows:  # the first non-NULL value of each column gives its type
            for i, value in enumerate(row):
                if types[i] == "NULL" and value is not None:
                    types[i] = _type_of(value)
        return list(zip(names, types, strict=True)), rows, cursor.rowcount
    except sqlite3.IntegrityError as exc:
        raise ShardError("constraint", str(exc)) from exc
    except sqlite3.OperationalError as exc:
        if "interrupted" in str(exc):
            raise ShardError("timeout", "the statement passed its deadline") from exc
        if "locked" in str(exc) or "busy" in str(exc):
            raise ShardError("conflict", str(exc)) from exc
        raise ShardError("invalid", str(exc)) from exc
    except (sqlite3.ProgrammingError, sqlite3.DataError, sqlite3.Warning) as exc:
        raise ShardError("invalid", str(exc)) from exc
    finally:
        conn.set_progress_handler(None, 0)


class Stop:
    """Interrupts a running statement: a flag its worker thread polls (SQLite's progress
    handler) and callbacks run on the event loop when it is set (PostgreSQL's cancel)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason = ""
        self._callbacks: list[Callable[[], object]] = []

    def is_set(self) -> bool:
        return self.event.is_set()

    def set(self, reason: str) -> None:
        if self.event.is_set():
            return
        self.reason = reason
        self.event.set()
        for callback in self._callbacks:
            with contextlib.suppress(Exception):
                callback()

    def on_set(self, callback: Callable[[], object]) -> Callable[[], None]:
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None


@dataclass
class ResultPart:
    """One batch of a statement's result (:func:`controller.wire.encode_rows`)."""

    rows: bytes = b"[]"
    count: int = 0
    columns: list[tuple[str, str]] | None = None
    """Set on the first part only."""
    done: bool = False
    rowcount: int = -1


class _Batcher:
    """Cuts a result into :class:`ResultPart` s of about :data:`BATCH_TARGET_BYTES`, enforcing
    the statement's caps (it asks for at most ``max_rows + 1`` rows in all)."""

    def __init__(self, max_rows: int, max_bytes: int) -> None:
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.size = FIRST_BATCH_ROWS
        self.rows = 0
        self.bytes = 0
        self.columns_sent = False

    def want(self) -> int:
        """How many rows to fetch next (never more than the cap plus one in all)."""
        return self.size if not self.max_rows else min(self.size, self.max_rows + 1 - self.rows)

    def parts(
        self,
        rows: list[Any],
        asked: int,
        columns: Callable[[list[Any]], list[tuple[str, str]]],
        rowcount: int,
    ) -> list[ResultPart]:
        self.rows += len(rows)
        if self.max_rows and self.rows > self.max_rows:
            raise ShardError(
                "too_large", f"the result has more than {self.max_rows} rows (the statement's cap)"
            )
        done = len(rows) < asked
        pieces = _encode_pieces(rows)
        out: list[ResultPart] = []
        for data, count in pieces:
            self.bytes += len(data)
            if self.max_bytes and self.bytes > self.max_bytes:
                raise ShardError(
                    "too_large", f"the result has more than {self.max_bytes} bytes (the statement's cap)"
                )
            out.append(ResultPart(rows=data, count=count))
        if not out:
            out.append(ResultPart())
        if rows:
            per_row = max(1, sum(len(d) for d, _ in pieces) // len(rows))
            self.size = max(1, min(MAX_BATCH_ROWS, BATCH_TARGET_BYTES // per_row))
        if not self.columns_sent:
            out[0].columns = columns(rows)
            self.columns_sent = True
        if done:
            out[-1].done = True
            out[-1].rowcount = rowcount
        return out


def _encode_pieces(rows: list[Any]) -> list[tuple[bytes, int]]:
    """``rows`` encoded, split so that every piece fits one message."""
    if not rows:
        return []
    data = encode_rows(rows)
    if len(data) <= MAX_BATCH_BYTES:
        return [(data, len(rows))]
    if len(rows) == 1:
        raise ShardError(
            "too_large",
            f"a row of {len(data)} bytes is over the data path's message limit ({MAX_BATCH_BYTES})",
        )
    half = len(rows) // 2
    return _encode_pieces(rows[:half]) + _encode_pieces(rows[half:])


def _sqlite_columns(names: list[str]) -> Callable[[list[Any]], list[tuple[str, str]]]:
    def columns(rows: list[Any]) -> list[tuple[str, str]]:
        types = ["NULL"] * len(names)
        for row in rows:  # the first non-NULL value of each column gives its type
            for i, value in enumerate(row):
                if types[i] == "NULL" and value is not None:
                    types[i] = _type_of(value)
        return list(zip(names, types, strict=True))

    return columns


def _sqlite_error(exc: sqlite3.Error, stop: Stop) -> ShardError:
    if isinstance(exc, sqlite3.IntegrityError):
        return ShardError("constraint", str(exc))
    if isinstance(exc, sqlite3.OperationalError):
        if "interrupted" in str(exc):
            if stop.is_set():
                return ShardError("cancelled", f"the statement was interrupted: {stop.reason}")
            return ShardError("timeout", "the statement passed its deadline")
        if "locked" in str(exc) or "busy" in str(exc):
            return ShardError("conflict", str(exc))
    return ShardError("invalid", str(exc))


class _SqliteShard:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA foreign_keys=ON")

    def run(self, sql: str, deadline: float) -> tuple[list[tuple[str, str]], list[tuple[Any, ...]], int]:
        with self.lock:
            return _run_sqlite(self.conn, sql, deadline)

    def close(self) -> None:
        self.conn.close()


@dataclass(eq=False)
class _Transaction:
    """One open (or prepared) transaction on one shard of this agent."""

    id: str
    key: tuple[str, int]
    priority: int
    idle_timeout: float
    last_used: float
    state: str = "active"  # active → prepared
    conn: Any = None  # sqlite3.Connection, or a psycopg AsyncConnection while active
    statements: list[str] = field(default_factory=list)  # SQLite: the ones that changed rows
    distributed: bool = False  # may hold other shards: PostgreSQL lock waits are bounded
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class _Gate:
    """The one-writer-at-a-time gate of an SQLite shard, with wait-die."""

    def __init__(self) -> None:
        self.holder: _Transaction | None = None
        self.changed = asyncio.Condition()

    async def acquire(self, txn: _Transaction, wait_s: float, *, may_wait: bool = False) -> None:
        """Take the shard for ``txn``: an older transaction, or one that holds no other shard
        (``may_wait``), waits for the holder; a younger one that holds another shard dies."""
        async with self.changed:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait_s
            while self.holder is not None:
                holder = self.holder
                # a prepared holder waits for nothing any more: waiting for it is deadlock-free
                if (
                    not may_wait
                    and holder.state != "prepared"
                    and (txn.priority, txn.id) > (holder.priority, holder.id)
                ):
                    raise ShardError(
                        "conflict",
                        "the shard is held by an older transaction (wait-die): retry the transaction",
                    )
                try:
                    await asyncio.wait_for(self.changed.wait(), max(0.0, deadline - loop.time()))
                except TimeoutError as exc:
                    raise ShardError("timeout", "the shard stayed held by another transaction") from exc
            self.holder = txn

    async def release(self, txn: _Transaction) -> None:
        async with self.changed:
            if self.holder is txn:
                self.holder = None
                self.changed.notify_all()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _remove_durably(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        _fsync_dir(path.parent)


class ShardStore:
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

    async def _stream_sqlite(
        self, key: tuple[str, int], sql: str, deadline: float, batcher: _Batcher, read_only: bool, stop: Stop
    ) -> AsyncGenerator[ResultPart, None]:
        lock: threading.Lock | None = None
        if read_only:
            conn = await asyncio.to_thread(self._sqlite_reader, key)
        else:
            shard = self._sqlite.get(key)
            if shard is None:
                shard = self._sqlite[key] = _SqliteShard(self._sqlite_path(key))
            conn, lock = shard.conn, shard.lock
        held = threading.Event()
        cursor: sqlite3.Cursor | None = None

        def start() -> sqlite3.Cursor:
            if lock is not None:
                lock.acquire()
                held.set()
            conn.set_progress_handler(
                lambda: 1 if stop.event.is_set() or time.monotonic() > deadline else 0, 1000
            )
            try:
                return conn.execute(sql)
            except sqlite3.Error as exc:
                raise _sqlite_error(exc, stop) from exc
            except ValueError as exc:  # e.g. a NUL character in the text
                raise ShardError("invalid", str(exc)) from exc

        def fetch(cur: sqlite3.Cursor) -> list[ResultPart]:
            asked = batcher.want()
            try:
                rows = cur.fetchmany(asked) if cur.description else []
            except sqlite3.Error as exc:
                raise _sqlite_error(exc, stop) from exc
            if not cur.description:
                asked = 1  # no rows to fetch: done at once
            names = [d[0] for d in cur.description or ()]
            return batcher.parts(rows, asked, _sqlite_columns(names), cur.rowcount)

        def finish() -> None:
            try:
                if cursor is not None:
                    cursor.close()
                conn.set_progress_handler(None, 0)
            finally:
                if held.is_set() and lock is not None:
                    lock.release()
                elif read_only:
                    self._sqlite_return(key, conn)

        try:
            cursor = await asyncio.to_thread(start)
            while True:
                parts = await asyncio.to_thread(fetch, cursor)
                for part in parts:
                    yield part
                if parts[-1].done:
                    return
        finally:
            await asyncio.to_thread(finish)

    def _sqlite_reader(self, key: tuple[str, int]) -> sqlite3.Connection:
        pool = self._sqlite_readers.setdefault(key, [])
        if pool:
            return pool.pop()
        path = self._sqlite_path(key)
        if not path.exists():  # the shard's own connection creates the file (WAL mode)
            shard = self._sqlite.get(key)
            if shard is None:
                self._sqlite[key] = _SqliteShard(path)
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA query_only=ON")
        return conn

    def _sqlite_return(self, key: tuple[str, int], conn: sqlite3.Connection) -> None:
        pool = self._sqlite_readers.setdefault(key, [])
        if len(pool) < SQLITE_READERS:
            pool.append(conn)
        else:
            conn.close()

    def _sqlite_path(self, key: tuple[str, int]) -> Path:
        return self._root / key[0] / f"{key[1]}.sqlite3"

    def _redo_dir(self, key: tuple[str, int]) -> Path:
        return self._root / key[0] / f"{key[1]}.prepared"

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

    async def push_result(
        self,
        command_id: str,
        request: node_pb2.ExecuteShardStatement,
        open_push: Callable[[], Any],
    ) -> node_pb2.CommandResult:
        """Run an ``execute_shard_statement`` and push its rows over ``PushShardResult``
        (``open_push`` opens the call); the command's result is a small summary."""
        return await self._push(
            command_id,
            request.shard_index,
            open_push,
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
        return await self._push(
            command_id, request.shard_index, open_push, lambda stop: self.transaction_rows(request, stop)
        )

    async def _push(
        self,
        command_id: str,
        shard_index: int,
        open_push: Callable[[], Any],
        start: Callable[[Stop], AsyncGenerator[ResultPart, None]],
    ) -> node_pb2.CommandResult:
        stop = Stop()
        call = open_push()
        rows = 0
        columns: list[tuple[str, str]] = []
        rowcount = -1

        def ended(_: object) -> None:
            stop.set("the controller ended the result stream")

        watcher: asyncio.Future[Any] = asyncio.ensure_future(_await(call))
        watcher.add_done_callback(ended)
        parts = start(stop)
        try:
            try:
                await call.write(node_pb2.PushShardResultRequest(command_id=command_id))
                async for part in parts:
                    message = node_pb2.PushShardResultRequest(
                        rows=part.rows, row_count=part.count, done=part.done, rowcount=part.rowcount
                    )
                    if part.columns is not None:
                        columns = part.columns
                        message.columns_known = True
                        message.columns.extend(
                            node_pb2.ShardResultColumn(name=n, type=t) for n, t in part.columns
                        )
                    rows += part.count
                    rowcount = part.rowcount if part.done else rowcount
                    await call.write(message)
                await call.done_writing()
                await watcher
            except ShardError as exc:
                if not stop.is_set():  # tell the controller on the data path too
                    with contextlib.suppress(Exception):
                        await call.write(
                            node_pb2.PushShardResultRequest(
                                done=True, error_kind=exc.kind, error_message=str(exc)
                            )
                        )
                        await call.done_writing()
                raise
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
                stop.set("the controller ended the result stream")
                raise ShardError("cancelled", f"the result stream ended: {_rpc_text(exc)}") from exc
            finally:
                await parts.aclose()
        except ShardError as exc:
            if exc.kind == "cancelled" or stop.is_set():
                log.info(
                    "shard statement %s on shard %d interrupted after %d rows: %s",
                    command_id,
                    shard_index,
                    rows,
                    stop.reason or exc,
                )
                exc = ShardError("cancelled", f"the statement was interrupted: {stop.reason or exc}")
            return node_pb2.CommandResult(
                command_id=command_id,
                ok=False,
                error_message=str(exc),
                payload=json.dumps({"error_kind": exc.kind}).encode(),
            )
        finally:
            watcher.remove_done_callback(ended)
            if not watcher.done():
                call.cancel()
            with contextlib.suppress(BaseException):
                await watcher
        return node_pb2.CommandResult(
            command_id=command_id,
            ok=True,
            payload=json.dumps(
                {"rows": rows, "rowcount": rowcount, "columns": [list(c) for c in columns]},
                separators=(",", ":"),
            ).encode(),
        )

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

    # ------------------------------------------------------------------ transactions

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
        conn: sqlite3.Connection = txn.conn
        deadline = time.monotonic() + limit_s
        before = conn.total_changes
        cursor: sqlite3.Cursor | None = None

        def start() -> sqlite3.Cursor:
            conn.set_progress_handler(
                lambda: 1 if stop.event.is_set() or time.monotonic() > deadline else 0, 1000
            )
            try:
                return conn.execute(sql)
            except sqlite3.Error as exc:
                raise _sqlite_error(exc, stop) from exc
            except ValueError as exc:
                raise ShardError("invalid", str(exc)) from exc

        def fetch(cur: sqlite3.Cursor) -> list[ResultPart]:
            asked = batcher.want()
            try:
                rows = cur.fetchmany(asked) if cur.description else []
            except sqlite3.Error as exc:
                raise _sqlite_error(exc, stop) from exc
            if not cur.description:
                asked = 1
            names = [d[0] for d in cur.description or ()]
            return batcher.parts(rows, asked, _sqlite_columns(names), cur.rowcount)

        def finish() -> None:
            if cursor is not None:
                cursor.close()
            conn.set_progress_handler(None, 0)
            if conn.total_changes != before:
                txn.statements.append(sql)

        try:
            cursor = await asyncio.to_thread(start)
            while True:
                parts = await asyncio.to_thread(fetch, cursor)
                for part in parts:
                    yield part
                if parts[-1].done:
                    return
        finally:
            await asyncio.to_thread(finish)

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

    # -- SQLite

    def _gate(self, key: tuple[str, int]) -> _Gate:
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = _Gate()
        return gate

    def _sqlite_connect(self, key: tuple[str, int]) -> sqlite3.Connection:
        path = self._sqlite_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    async def _sqlite_begin(self, txn: _Transaction, wait_s: float, *, may_wait: bool) -> None:
        await self._gate(txn.key).acquire(txn, wait_s, may_wait=may_wait)

        def begin() -> sqlite3.Connection:
            conn = self._sqlite_connect(txn.key)
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                conn.close()
                raise ShardError("conflict", f"the shard is busy: {exc}") from exc
            return conn

        txn.conn = await asyncio.to_thread(begin)

    def _sqlite_prepare(self, txn: _Transaction) -> None:
        conn: sqlite3.Connection = txn.conn
        try:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {TXLOG_TABLE} (id TEXT PRIMARY KEY, at REAL)")
            conn.execute(f"INSERT INTO {TXLOG_TABLE} (id, at) VALUES (?, ?)", (txn.id, time.time()))  # noqa: S608
        except sqlite3.Error as exc:
            raise ShardError("invalid", f"the transaction cannot be prepared: {exc}") from exc
        directory = self._redo_dir(txn.key)
        directory.mkdir(parents=True, exist_ok=True)
        record = {"transaction_id": txn.id, "statements": txn.statements}
        _write_durably(directory / f"{txn.id}.json", json.dumps(record).encode())

    def _sqlite_end(self, txn: _Transaction, commit: bool) -> None:
        conn: sqlite3.Connection = txn.conn
        try:
            if commit:
                try:
                    conn.execute("COMMIT")
                except sqlite3.Error as exc:
                    raise ShardError("invalid", f"the commit failed: {exc}") from exc
            else:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if txn.state == "prepared":
                _remove_durably(self._redo_dir(txn.key) / f"{txn.id}.json")
        finally:
            conn.close()
            txn.conn = None

    async def _restore_prepared(self, key: tuple[str, int]) -> None:
        """Once per process and shard: bring back prepared transactions from their redo logs."""
        if key in self._restored:
            return
        async with self._restore_lock:
            if key in self._restored:
                return
            directory = self._redo_dir(key)
            records = sorted(directory.glob("*.json")) if directory.is_dir() else []
            for path in records:
                try:
                    record = json.loads(path.read_text())
                    transaction_id = str(record["transaction_id"])
                    statements = [str(s) for s in record["statements"]]
                except (OSError, ValueError, KeyError, TypeError):
                    log.error("unreadable redo log %s: left in place", path)
                    continue
                txn = _Transaction(
                    id=transaction_id, key=key, priority=-1, idle_timeout=float("inf"),
                    last_used=self._clock(), state="prepared",
                )  # fmt: skip
                gate = self._gate(key)
                if gate.holder is not None:
                    log.error("two prepared transactions on shard %s: %s waits", key, transaction_id)
                    continue
                gate.holder = txn

                def replay(txn: _Transaction = txn, statements: list[str] = statements) -> bool:
                    conn = self._sqlite_connect(key)
                    conn.execute("BEGIN IMMEDIATE")
                    done = (
                        conn.execute(
                            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (TXLOG_TABLE,)
                        ).fetchone()
                        and conn.execute(
                            f"SELECT 1 FROM {TXLOG_TABLE} WHERE id = ?",  # noqa: S608
                            (txn.id,),
                        ).fetchone()
                    )
                    if done:
                        conn.execute("ROLLBACK")
                        conn.close()
                        return False
                    for statement in statements:
                        conn.execute(statement)
                    conn.execute(f"CREATE TABLE IF NOT EXISTS {TXLOG_TABLE} (id TEXT PRIMARY KEY, at REAL)")
                    conn.execute(
                        f"INSERT INTO {TXLOG_TABLE} (id, at) VALUES (?, ?)",  # noqa: S608
                        (txn.id, time.time()),
                    )
                    txn.conn = conn
                    txn.statements = statements
                    return True

                try:
                    held = await asyncio.to_thread(replay)
                except sqlite3.Error as exc:
                    gate.holder = None
                    log.error("replaying the redo log %s failed: %s", path, exc)
                    raise ShardError("unavailable", "a prepared transaction could not be restored") from exc
                if held:
                    self._transactions[txn.id] = txn
                    log.info("restored prepared transaction %s on shard %d", txn.id, key[1])
                else:
                    gate.holder = None
                    _remove_durably(path)
                    log.info("prepared transaction %s on shard %d was committed before", txn.id, key[1])
            self._restored.add(key)

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

    # -- PostgreSQL

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


async def _await(call: Any) -> Any:
    return await call


def _rpc_text(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


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
