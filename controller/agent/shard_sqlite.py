"""SQLite shards: one file per shard, ``<data dir>/shards/<database id>/<shard index>.sqlite3``
(WAL mode, foreign keys on). Statements outside transactions run on the shard's own
connection, one at a time (:class:`_SqliteShard`); ``read_only`` ones on pooled read-only
connections of their own (WAL readers do not wait for the writer). Rows are fetched
with ``fetchmany`` while they are pushed; SQLite's progress handler interrupts a
statement past its deadline or when its :class:`~controller.agent.shard_results.Stop`
is set.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

from controller.agent.shard_results import ResultPart, Stop, _Batcher
from controller.agent.shard_state import ShardError, _ShardStoreState

# Idle read-only SQLite connections kept per shard.
SQLITE_READERS = 4


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


class _SqliteShards(_ShardStoreState):
    """The SQLite part of :class:`~controller.agent.shards.ShardStore`: statements outside
    transactions, and where a shard's files are."""

    async def _stream_sqlite(
        self, key: tuple[str, int], sql: str, deadline: float, batcher: _Batcher, read_only: bool, stop: Stop
    ) -> AsyncGenerator[ResultPart, None]:
        lock: threading.Lock | None = None
        conn: sqlite3.Connection | None = None
        if not read_only:
            shard = self._sqlite.get(key)
            if shard is None:
                shard = self._sqlite[key] = _SqliteShard(self._sqlite_path(key))
            conn, lock = shard.conn, shard.lock
        held = threading.Event()
        cursor: sqlite3.Cursor | None = None
        finished = False

        def start() -> sqlite3.Cursor:
            assert conn is not None
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
            nonlocal finished
            finished = True
            if conn is None:
                return
            try:
                if cursor is not None:
                    cursor.close()
                conn.set_progress_handler(None, 0)
            finally:
                if held.is_set() and lock is not None:
                    lock.release()
                elif read_only:
                    self._sqlite_return(key, conn)

        def begin() -> list[ResultPart]:
            """In one worker thread: a connection, the statement, its first batch, and the
            clean-up when that was all (a point query costs one hop to a thread, not four)."""
            nonlocal conn, cursor
            try:
                if conn is None:
                    conn = self._sqlite_reader(key)
                cursor = start()
                parts = fetch(cursor)
            except BaseException:
                finish()
                raise
            if parts[-1].done:
                finish()
            return parts

        try:
            parts = await asyncio.to_thread(begin)
            while True:
                for part in parts:
                    yield part
                if parts[-1].done:
                    return
                assert cursor is not None
                parts = await asyncio.to_thread(fetch, cursor)
        finally:
            if not finished:
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
