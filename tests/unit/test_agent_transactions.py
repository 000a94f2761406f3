"""Shard transactions on the agent: real SQLite files and a real PostgreSQL server.

A crash of the agent is simulated by abandoning a ShardStore without closing it (its
SQLite connections are closed unceremoniously, which loses their open transactions as
a killed process would) and opening a new one on the same data directory.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
from automator67.v1 import node_pb2

from controller.agent.shards import ShardError, ShardStore
from controller.limits import CONTROL_MESSAGE_MAX_BYTES
from controller.wire import decode_result, decode_rows

A = node_pb2.ShardTransactionAction
DB = "db1"


def step(
    action: int,
    txid: str,
    sql: str = "",
    *,
    shard: int = 0,
    priority: int = 0,
    idle_ms: int = 0,
    timeout_ms: int = 2000,
    distributed: bool = False,
):
    return node_pb2.ShardTransaction(
        database_id=DB, shard_index=shard, transaction_id=txid, action=action, sql=sql,
        timeout_ms=timeout_ms, priority=priority, idle_timeout_ms=idle_ms, distributed=distributed,
    )  # fmt: skip


async def rows(store: ShardStore, sql: str, shard: int = 0) -> list[tuple]:
    return (await store.execute(DB, shard, sql, 2000))[1]


def crash(store: ShardStore) -> None:
    """What SIGKILL does to the store's SQLite transactions: gone, uncommitted."""
    for txn in list(store._transactions.values()):
        if txn.conn is not None:
            txn.conn.close()
    for shard in store._sqlite.values():
        shard.conn.close()
    if store._reaper is not None:
        store._reaper.cancel()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[ShardStore]:
    store = ShardStore(tmp_path)
    await store.execute(DB, 0, "CREATE TABLE acct (id INTEGER PRIMARY KEY, balance INTEGER)", 1000)
    await store.execute(DB, 0, "INSERT INTO acct VALUES (1, 100), (2, 100)", 1000)
    yield store
    await store.close()


async def test_sqlite_commit_and_rollback(sqlite_store: ShardStore) -> None:
    store = sqlite_store
    payload = await store.transaction(
        step(A.SHARD_TRANSACTION_ACTION_BEGIN, "t1", "SELECT balance FROM acct WHERE id = 1")
    )
    assert decode_result(payload)[1] == [(100,)]
    await store.transaction(
        step(A.SHARD_TRANSACTION_ACTION_EXECUTE, "t1", "UPDATE acct SET balance = 90 WHERE id = 1")
    )
    assert await rows(store, "SELECT balance FROM acct WHERE id = 1") == [(100,)]  # not yet visible
    done = json.loads(await store.transaction(step(A.SHARD_TRANSACTION_ACTION_COMMIT, "t1")))
    assert done == {"state": "committed"}
    assert await rows(store, "SELECT balance FROM acct WHERE id = 1") == [(90,)]

    await store.transaction(step(A.SHARD_TRANSACTION_ACTION_BEGIN, "t2", "UPDATE acct SET balance = 0"))
    await store.transaction(step(A.SHARD_TRANSACTION_ACTION_ROLLBACK, "t2"))
    assert await rows(store, "SELECT balance FROM acct ORDER BY id") == [(90,), (100,)]
    # resolving again, or a transaction the shard never saw, is no error
    assert json.loads(await store.transaction(step(A.SHARD_TRANSACTION_ACTION_COMMIT, "t2"))) == {
        "state": "unknown"
    }
    with pytest.raises(ShardError) as info:
        await store.transaction(step(A.SHARD_TRANSACTION_ACTION_EXECUTE, "t2", "SELECT 1"))
    assert info.value.kind == "transaction_missing"


async def test_sqlite_prepared_transaction_survives_a_crash_and_commits(
    sqlite_store: ShardStore, tmp_path: Path
) -> None:
    store = sqlite_store
    await store.transaction(
        step(A.SHARD_TRANSACTION_ACTION_BEGIN, "t1", "UPDATE acct SET balance = balance - 30 WHERE id = 1")
    )
    await store.transaction(
        step(A.SHARD_TRANSACTION_ACTION_EXECUTE, "t1", "SELECT * FROM acct")
    )  # not logged
    await store.transaction(step(A.SHARD_TRANSACTION_ACTION_PREPARE, "t1"))
    redo = tmp_path / "shards" / DB / "0.prepared" / "t1.json"
    assert json.loads(redo.read_text())["statements"] == [
        "UPDATE acct SET balance = balance - 30 WHERE id = 1"
    ]
    crash(store)

    restarted = ShardStore(tmp_path)
    try:
        listed = json.loads(await restarted.transaction(step(A.SHARD_TRANSACTION_ACTION_LIST_PREPARED, "x")))
        assert listed == {"prepared": ["t1"]}
        # the prepared transaction holds the shard again: a writer waits for its outcome
        with pytest.raises(ShardError) as info:
            await restarted.transaction(
                step(A.SHARD_TRANSACTION_ACTION_BEGIN, "t2", priority=5, timeout_ms=100)
            )
        assert info.value.kind == "timeout"
        assert await rows(restarted, "SELECT balance FROM acct WHERE id = 1") == [(100,)]
        done = json.loads(await restarted.transaction(step(A.SHARD_TRANSACTION_ACTION_COMMIT, "t1")))
        assert done == {"state": "committed"}
        assert await rows(restarted, "SELECT balance FROM acct WHERE id = 1") == [(70,)]
        assert not redo.exists()
        # the marker table is the agent's own: schema reads skip it
        assert await rows(
            restarted, "SELECT name FROM sqlite_master WHERE name LIKE '\\_a67\\_%' ESCAPE '\\'"
        ) == [("_a67_txlog",)]
    finally:
        await restarted.close()


async def test_sqlite_prepared_transaction_rolls_back_after_a_crash(
    sqlite_store: ShardStore, tmp_path: Path
) -> None:
    store = sqlite_store
    await store.transaction(step(A.SHARD_TRANSACTION_ACTION_BEGIN, "t1", "DELETE FROM acct"))
    await store.transaction(step(A.SHARD_TRANSACTION_ACTION_PREPARE, "t1"))
    crash(store)
    restarted = ShardStore(tmp_path)
    try:
        done = json.loads(await restarted.transaction(step(A.SHARD_TRANSACTION_ACTION_ROLLBACK, "t1")))
        assert done == {"state": "rolled_back"}
        assert await rows(restarted, "SELECT count(*) FROM acct") == [(2,)]
        assert not (tmp_path / "shards" / DB / "0.prepared" / "t1.json").exists()
    finally:
        await restarted.close()


async def test_sqlite_commit_whose_redo_log_outlived_it_is_not_applied_twice(
    sqlite_store: ShardStore, tmp_path: Path
) -> None:
    store = sqlite_store
    await store.transaction(
        step(A.SHARD_TRANSACTION_ACTION_BEGIN, "t1", "UPDATE acct SET balance = balance + 1")
    )
    await store.transaction(step(A.SHARD_TRANSACTION_ACTION_PREPARE, "t1"))
    redo = tmp_path / "shards" / DB / "0.prepared" / "t1.json"
    kept = tmp_path / "kept.json"
    shutil.copy(redo, kept)
    await store.transaction(step(A.SHARD_TRANSACTION_ACTION_COMMIT, "t1"))
    crash(store)
    shutil.copy(kept, redo)  # a crash between COMMIT and removing the redo log
    restarted = ShardStore(tmp_path)
    try:
        assert await rows(restarted, "SELECT balance FROM acct ORDER BY id") == [(101,), (101,)]
        assert not redo.exists()
        assert json.loads(await restarted.transaction(step(A.SHARD_TRANSACTION_ACTION_COMMIT, "t1"))) == {
            "state": "unknown"
        }
    finally:
        await restarted.close()


async def test_sqlite_wait_die(sqlite_store: ShardStore) -> None:
    store = sqlite_store
    await store.transaction(step(A.SHARD_TRANSACTION_ACTION_BEGIN, "holder", priority=10))
    with pytest.raises(ShardError) as info:  # younger than the holder: dies
        await store.transaction(step(A.SHARD_TRANSACTION_ACTION_BEGIN, "young", priority=20))
    assert info.value.kind == "conflict"
    older = asyncio.create_task(store.transaction(step(A.SHARD_TRANSACTION_ACTION_BEGIN, "old", priority=5)))
    await asyncio.sleep(0)
    assert not older.done()  # waits for the holder
    await store.transaction(step(A.SHARD_TRANSACTION_ACTION_COMMIT, "holder"))
    await asyncio.wait_for(older, 5)
    assert store.open_transactions() == {"old": "active"}
    await store.transaction(step(A.SHARD_TRANSACTION_ACTION_ROLLBACK, "old"))


async def test_idle_open_transactions_are_rolled_back_prepared_ones_wait(tmp_path: Path) -> None:
    now = [1000.0]
    store = ShardStore(tmp_path, clock=lambda: now[0])
    try:
        await store.execute(DB, 0, "CREATE TABLE t (id INTEGER PRIMARY KEY)", 1000)
        await store.execute(DB, 1, "CREATE TABLE t (id INTEGER PRIMARY KEY)", 1000)
        await store.transaction(
            step(A.SHARD_TRANSACTION_ACTION_BEGIN, "idle", "INSERT INTO t VALUES (1)", idle_ms=5000)
        )
        await store.transaction(
            step(A.SHARD_TRANSACTION_ACTION_BEGIN, "prep", "INSERT INTO t VALUES (2)", shard=1, idle_ms=5000)
        )
        await store.transaction(step(A.SHARD_TRANSACTION_ACTION_PREPARE, "prep", shard=1))
        now[0] += 4.9
        assert await store.reap_idle() == 0
        now[0] += 0.2
        assert await store.reap_idle() == 1
        assert store.open_transactions() == {"prep": "prepared"}
        assert await rows(store, "SELECT count(*) FROM t") == [(0,)]
        # the shard is free again
        await store.transaction(step(A.SHARD_TRANSACTION_ACTION_BEGIN, "next", "INSERT INTO t VALUES (3)"))
        await store.transaction(step(A.SHARD_TRANSACTION_ACTION_COMMIT, "next"))
        assert await rows(store, "SELECT id FROM t") == [(3,)]
    finally:
        await store.close()


async def _replaced(store: ShardStore) -> None:
    """The agent's stream to its controller was replaced: wait for the rollbacks it starts."""
    store.stream_replaced()
    await asyncio.gather(*store._abandoning)


async def test_a_replaced_stream_rolls_back_open_transactions_prepared_ones_wait(tmp_path: Path) -> None:
    store = ShardStore(tmp_path)  # no clock moves: the idle timeout plays no part
    try:
        await store.execute(DB, 0, "CREATE TABLE t (id INTEGER PRIMARY KEY)", 1000)
        await store.execute(DB, 1, "CREATE TABLE t (id INTEGER PRIMARY KEY)", 1000)
        await store.transaction(
            step(A.SHARD_TRANSACTION_ACTION_BEGIN, "open", "INSERT INTO t VALUES (1)", idle_ms=600_000)
        )
        await store.transaction(
            step(A.SHARD_TRANSACTION_ACTION_BEGIN, "prep", "INSERT INTO t VALUES (2)", shard=1)
        )
        await store.transaction(step(A.SHARD_TRANSACTION_ACTION_PREPARE, "prep", shard=1))
        await _replaced(store)
        assert store.open_transactions() == {"prep": "prepared"}
        # the shard's one writer is free at once, not after the idle timeout
        await store.transaction(step(A.SHARD_TRANSACTION_ACTION_BEGIN, "next", "INSERT INTO t VALUES (3)"))
        await store.transaction(step(A.SHARD_TRANSACTION_ACTION_COMMIT, "next"))
        assert await rows(store, "SELECT id FROM t") == [(3,)]
        # the old controller's commit finds nothing: "unknown", which a one-phase commit reads as rolled back
        assert json.loads(await store.transaction(step(A.SHARD_TRANSACTION_ACTION_COMMIT, "open"))) == {
            "state": "unknown"
        }
        assert json.loads(
            await store.transaction(step(A.SHARD_TRANSACTION_ACTION_COMMIT, "prep", shard=1))
        ) == {"state": "committed"}
        assert await rows(store, "SELECT id FROM t", shard=1) == [(2,)]
        await _replaced(store)  # nothing open: nothing to do
    finally:
        await store.close()


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
async def pg_store(postgres_databases, tmp_path: Path) -> AsyncIterator[tuple[ShardStore, str]]:
    url = postgres_databases.create().replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as conn:
        prepared = conn.execute("SHOW max_prepared_transactions").fetchone()
    if not prepared or int(prepared[0]) == 0:
        pytest.fail(
            "PostgreSQL has max_prepared_transactions = 0: run ALTER SYSTEM SET max_prepared_transactions = 100 "
            "and restart it (see docs/databases.md, Transactions)"
        )
    store = ShardStore(tmp_path, url)
    await store.execute(DB, 0, "CREATE TABLE acct (id INTEGER PRIMARY KEY, balance INTEGER)", 1000)
    await store.execute(DB, 0, "INSERT INTO acct VALUES (1, 100), (2, 100)", 1000)
    yield store, url
    await store.close()


@pytest.mark.postgres
async def test_postgres_prepared_transaction_survives_a_restart(pg_store, tmp_path: Path) -> None:
    store, url = pg_store
    await store.transaction(
        step(A.SHARD_TRANSACTION_ACTION_BEGIN, "t1", "UPDATE acct SET balance = 70 WHERE id = 1")
    )
    await store.transaction(step(A.SHARD_TRANSACTION_ACTION_PREPARE, "t1"))
    await store.transaction(
        step(A.SHARD_TRANSACTION_ACTION_BEGIN, "t2", "UPDATE acct SET balance = 0 WHERE id = 2")
    )
    await store.transaction(step(A.SHARD_TRANSACTION_ACTION_PREPARE, "t2"))
    await store.close()  # the agent goes away; PostgreSQL keeps both prepared

    restarted = ShardStore(tmp_path, url)
    try:
        listed = json.loads(await restarted.transaction(step(A.SHARD_TRANSACTION_ACTION_LIST_PREPARED, "x")))
        assert listed == {"prepared": ["t1", "t2"]}
        assert await rows(restarted, "SELECT balance FROM acct ORDER BY id") == [(100,), (100,)]
        assert json.loads(await restarted.transaction(step(A.SHARD_TRANSACTION_ACTION_COMMIT, "t1"))) == {
            "state": "committed"
        }
        assert json.loads(await restarted.transaction(step(A.SHARD_TRANSACTION_ACTION_ROLLBACK, "t2"))) == {
            "state": "rolled_back"
        }
        assert json.loads(await restarted.transaction(step(A.SHARD_TRANSACTION_ACTION_COMMIT, "t1"))) == {
            "state": "unknown"
        }
        assert await rows(restarted, "SELECT balance FROM acct ORDER BY id") == [(70,), (100,)]
        with psycopg.connect(url) as conn:
            owner = conn.execute(
                "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()"
            ).fetchone()
        assert owner == (0,)
    finally:
        await restarted.close()


@pytest.mark.postgres
async def test_postgres_statement_error_and_deadlock_kinds(pg_store) -> None:
    store, _ = pg_store
    await store.transaction(
        step(A.SHARD_TRANSACTION_ACTION_BEGIN, "a", "UPDATE acct SET balance = 1 WHERE id = 1")
    )
    await store.transaction(
        step(A.SHARD_TRANSACTION_ACTION_BEGIN, "b", "UPDATE acct SET balance = 2 WHERE id = 2")
    )
    first = asyncio.create_task(
        store.transaction(
            step(A.SHARD_TRANSACTION_ACTION_EXECUTE, "a", "UPDATE acct SET balance = 1 WHERE id = 2")
        )
    )
    second = asyncio.create_task(
        store.transaction(
            step(A.SHARD_TRANSACTION_ACTION_EXECUTE, "b", "UPDATE acct SET balance = 2 WHERE id = 1")
        )
    )
    results = await asyncio.gather(first, second, return_exceptions=True)
    errors = [r for r in results if isinstance(r, ShardError)]
    assert [e.kind for e in errors] == ["conflict"]  # PostgreSQL broke the deadlock
    for txid in ("a", "b"):
        await store.transaction(step(A.SHARD_TRANSACTION_ACTION_ROLLBACK, txid))
    assert await rows(store, "SELECT balance FROM acct ORDER BY id") == [(100,), (100,)]
    with pytest.raises(ShardError) as info:
        await store.transaction(step(A.SHARD_TRANSACTION_ACTION_BEGIN, "c", "INSERT INTO acct VALUES (1, 5)"))
    assert info.value.kind == "constraint"
    assert store.open_transactions() == {}


class _Push:
    """A PushShardResult call that keeps what the agent writes (the controller's side)."""

    def __init__(self) -> None:
        self.messages: list[node_pb2.PushShardResultRequest] = []
        self.ended = asyncio.get_running_loop().create_future()

    async def write(self, message: node_pb2.PushShardResultRequest) -> None:
        self.messages.append(message)

    async def done_writing(self) -> None:
        if not self.ended.done():
            self.ended.set_result(node_pb2.PushShardResultResponse())

    def cancel(self) -> None:
        if not self.ended.done():
            self.ended.cancel()

    def __await__(self):  # type: ignore[no-untyped-def]
        return self.ended.__await__()


async def _transaction_rows_take_the_data_path(store: ShardStore) -> None:
    """A transaction's statement pushes its rows in batches within its caps; the command's
    result is a summary; going over the cap fails the statement (and so the transaction)."""
    pushes: list[_Push] = []

    def open_push() -> _Push:
        pushes.append(_Push())
        return pushes[-1]

    def pushed(txid: str, action: int, sql: str, **caps: int) -> node_pb2.ShardTransaction:
        request = step(action, txid, sql, timeout_ms=20_000)
        request.push_rows = True
        request.max_rows, request.max_bytes = caps.get("max_rows", 0), caps.get("max_bytes", 0)
        return request

    body = "x" * 1000
    values = ", ".join(f"({i}, '{body}')" for i in range(10, 410))
    begin = await store.push_transaction(
        "c1", pushed("t1", A.SHARD_TRANSACTION_ACTION_BEGIN, f"INSERT INTO docs VALUES {values}"), open_push
    )
    assert begin.ok, begin.error_message
    assert json.loads(begin.payload)["rowcount"] == 400
    select = await store.push_transaction(
        "c2",
        pushed("t1", A.SHARD_TRANSACTION_ACTION_EXECUTE, "SELECT id, body FROM docs ORDER BY id"),
        open_push,
    )
    assert select.ok, select.error_message
    messages = pushes[-1].messages
    assert messages[0].command_id == "c2"
    assert messages[-1].done
    assert not messages[-1].error_kind
    got = [r for m in messages if m.row_count for r in decode_rows(m.rows)]
    assert got == [(i, body) for i in range(10, 410)]  # the transaction reads its own writes
    assert (
        sum(len(m.rows) for m in messages) > CONTROL_MESSAGE_MAX_BYTES
    )  # more than one control message holds
    assert all(m.ByteSize() <= CONTROL_MESSAGE_MAX_BYTES for m in messages)
    assert len(select.payload) < 1024  # the command's own result is a summary

    over = await store.push_transaction(
        "c3", pushed("t1", A.SHARD_TRANSACTION_ACTION_EXECUTE, "SELECT id FROM docs", max_rows=399), open_push
    )
    assert not over.ok
    assert json.loads(over.payload) == {"error_kind": "too_large"}
    assert pushes[-1].messages[-1].error_kind == "too_large"
    assert sum(m.row_count for m in pushes[-1].messages) <= 399  # never sent past the cap
    gone = await store.push_transaction(
        "c4", pushed("nope", A.SHARD_TRANSACTION_ACTION_EXECUTE, "SELECT 1"), open_push
    )
    assert json.loads(gone.payload) == {"error_kind": "transaction_missing"}
    await store.transaction(step(A.SHARD_TRANSACTION_ACTION_ROLLBACK, "t1"))
    assert await rows(store, "SELECT COUNT(*) FROM docs") == [(0,)]


async def test_sqlite_transaction_rows_take_the_data_path(sqlite_store: ShardStore) -> None:
    await sqlite_store.execute(DB, 0, "CREATE TABLE docs (id INTEGER PRIMARY KEY, body TEXT)", 1000)
    await _transaction_rows_take_the_data_path(sqlite_store)


@pytest.mark.postgres
async def test_postgres_transaction_rows_take_the_data_path(pg_store) -> None:
    store, _ = pg_store
    await store.execute(DB, 0, "CREATE TABLE docs (id INTEGER PRIMARY KEY, body TEXT)", 1000)
    await _transaction_rows_take_the_data_path(store)


@pytest.mark.postgres
async def test_postgres_replaced_stream_releases_row_locks(pg_store) -> None:
    store, _ = pg_store
    await store.transaction(
        step(
            A.SHARD_TRANSACTION_ACTION_BEGIN,
            "old",
            "UPDATE acct SET balance = 0 WHERE id = 1",
            idle_ms=600_000,
        )
    )
    await _replaced(store)
    assert store.open_transactions() == {}
    # the row lock went with it: a new transaction updates the row without waiting (it would
    # fail as a conflict after lock_timeout if the lock were still held)
    await store.transaction(
        step(
            A.SHARD_TRANSACTION_ACTION_BEGIN,
            "new",
            "UPDATE acct SET balance = 5 WHERE id = 1",
            distributed=True,
        )
    )
    await store.transaction(step(A.SHARD_TRANSACTION_ACTION_COMMIT, "new"))
    assert await rows(store, "SELECT balance FROM acct ORDER BY id") == [(5,), (100,)]


@pytest.mark.postgres
async def test_postgres_distributed_lock_wait_is_bounded(pg_store) -> None:
    """A distributed transaction's wait for a row lock fails as a conflict: across shards,
    the holder may be waiting for it (a deadlock no single server sees)."""
    store, _ = pg_store
    await store.transaction(
        step(A.SHARD_TRANSACTION_ACTION_BEGIN, "holder", "UPDATE acct SET balance = 1 WHERE id = 1")
    )
    with pytest.raises(ShardError) as info:
        await store.transaction(
            step(
                A.SHARD_TRANSACTION_ACTION_BEGIN, "waiter", "UPDATE acct SET balance = 2 WHERE id = 1",
                distributed=True, timeout_ms=30_000,
            )
        )  # fmt: skip
    assert info.value.kind == "conflict"
    assert "lock" in str(info.value).lower()
    await store.transaction(step(A.SHARD_TRANSACTION_ACTION_COMMIT, "holder"))
    assert store.open_transactions() == {}
    assert await rows(store, "SELECT balance FROM acct ORDER BY id") == [(1,), (100,)]
