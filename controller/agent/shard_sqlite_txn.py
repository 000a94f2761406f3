"""Transactions on SQLite shards: the wait-die gate, ``PREPARE`` to a redo log, and its
replay after a restart (see :mod:`~controller.agent.shard_transactions` for the whole).

A transaction runs on a connection of its own, opened with ``BEGIN IMMEDIATE``; a shard
has one writer at a time, so the agent queues transactions per shard with *wait-die*
(:class:`_Gate`: an older transaction waits for the holder, a younger one fails at once
with ``conflict``; one that holds no other shard yet always waits): no deadlock across
shards. ``PREPARE`` writes the statements that changed rows to a redo log,
``<shard>.prepared/<transaction id>.json``, fsynced, and keeps the connection and its
lock. After an agent restart the redo log is replayed into a new held transaction
before anything else runs on the shard (:meth:`_SqliteTransactions._restore_prepared`),
so the prepared state (and its lock) survives the crash; a marker row in
:data:`TXLOG_TABLE`, written in the same SQLite transaction as the changes, tells a
redo log whose commit already happened (then it is only deleted).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncGenerator
from pathlib import Path

from controller.agent.shard_results import ResultPart, Stop, _Batcher
from controller.agent.shard_sqlite import _sqlite_columns, _sqlite_error, _SqliteShards
from controller.agent.shard_state import ShardError, _Transaction

log = logging.getLogger("controller.agent.shards")

# The table of committed redo logs in an SQLite shard (hidden from schema reads).
TXLOG_TABLE = "_a67_txlog"


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


class _SqliteTransactions(_SqliteShards):
    """The SQLite transactions of :class:`~controller.agent.shards.ShardStore`."""

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

    async def _sqlite_statement_parts(
        self, txn: _Transaction, sql: str, limit_s: float, batcher: _Batcher, stop: Stop
    ) -> AsyncGenerator[ResultPart, None]:
        """Run ``sql`` in SQLite transaction ``txn`` and yield its rows in batches as they are
        fetched; a statement that changed rows goes to the transaction's redo log."""
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
