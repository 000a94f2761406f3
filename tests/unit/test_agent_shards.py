"""The agent's shard executor on real SQLite files (and PostgreSQL where reachable)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from automator67.v1 import node_pb2

from controller.agent.handlers import CommandHandlers
from controller.agent.metrics import RequestCounters
from controller.agent.shards import ShardError, ShardStore, register_shard_handlers
from controller.wire import decode_result, decode_value, encode_result, encode_value


async def test_sqlite_shards_are_separate_files(tmp_path: Path) -> None:
    store = ShardStore(tmp_path)
    try:
        for shard in (0, 1):
            await store.execute("db1", shard, "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)", 1000)
        await store.execute("db1", 0, "INSERT INTO t VALUES (1, 'a'), (2, NULL)", 1000)
        columns, rows, _ = await store.execute("db1", 0, "SELECT id, name FROM t ORDER BY id", 1000)
        assert columns == [("id", "INTEGER"), ("name", "TEXT")]
        assert rows == [(1, "a"), (2, None)]
        _, rows, _ = await store.execute("db1", 1, "SELECT count(*) FROM t", 1000)
        assert rows == [(0,)]
        assert (tmp_path / "shards" / "db1" / "0.sqlite3").exists()
    finally:
        await store.close()


async def test_errors_are_classified(tmp_path: Path) -> None:
    store = ShardStore(tmp_path)
    try:
        await store.execute("db1", 0, "CREATE TABLE t (id INTEGER PRIMARY KEY)", 1000)
        await store.execute("db1", 0, "INSERT INTO t VALUES (1)", 1000)
        with pytest.raises(ShardError) as info:
            await store.execute("db1", 0, "INSERT INTO t VALUES (1)", 1000)
        assert info.value.kind == "constraint"
        with pytest.raises(ShardError) as info:
            await store.execute("db1", 0, "SELECT * FROM missing", 1000)
        assert info.value.kind == "invalid"
        slow = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
        with pytest.raises(ShardError) as info:
            await store.execute("db1", 0, slow, 50)
        assert info.value.kind == "timeout"
        with pytest.raises(ShardError):
            await store.execute("../etc", 0, "SELECT 1", 1000)
    finally:
        await store.close()


async def test_handler_answers_with_encoded_rows_or_error_kind(tmp_path: Path) -> None:
    store = ShardStore(tmp_path)
    handlers = CommandHandlers()
    register_shard_handlers(handlers, store)
    counters = RequestCounters()
    try:
        ok = await handlers.dispatch(
            node_pb2.NodeCommand(
                command_id="c1",
                execute_shard_statement=node_pb2.ExecuteShardStatement(
                    database_id="d", shard_index=0, sql="SELECT 1 AS one"
                ),
            ),
            counters,
        )
        assert ok.ok
        assert decode_result(ok.payload) == ([("one", "INTEGER")], [(1,)], -1)
        bad = await handlers.dispatch(
            node_pb2.NodeCommand(
                command_id="c2",
                execute_shard_statement=node_pb2.ExecuteShardStatement(
                    database_id="d", shard_index=0, sql="SELEC 1"
                ),
            ),
            counters,
        )
        assert not bad.ok
        assert json.loads(bad.payload) == {"error_kind": "invalid"}
        assert "syntax error" in bad.error_message
    finally:
        await store.close()


@pytest.mark.parametrize("value", [None, 1, 2.5, "x", True, b"\x00\xff", Decimal("10.10")])
def test_values_round_trip_exactly(value: object) -> None:
    assert decode_value(json.loads(json.dumps(encode_value(value)))) == value
    _, rows, _ = decode_result(encode_result([("v", "T")], [(value,)], 1))
    assert rows == [(value,)]


@pytest.mark.postgres
async def test_postgres_shards_are_separate_schemas(tmp_path: Path, postgres_databases: object) -> None:
    url = postgres_databases.create().replace("postgresql+psycopg://", "postgresql://")  # type: ignore[attr-defined]
    store = ShardStore(tmp_path, url)
    try:
        assert store.backend == "postgres"
        for shard in (0, 1):
            await store.execute(
                "db-1", shard, "CREATE TABLE t (id INTEGER PRIMARY KEY, amount NUMERIC)", 1000
            )
        await store.execute("db-1", 0, "INSERT INTO t VALUES (1, 10.10), (2, NULL)", 1000)
        columns, rows, _ = await store.execute("db-1", 0, "SELECT id, amount FROM t ORDER BY id", 1000)
        assert columns == [("id", "int4"), ("amount", "numeric")]
        assert rows == [(1, Decimal("10.10")), (2, None)]
        _, rows, _ = await store.execute("db-1", 1, "SELECT count(*) FROM t", 1000)
        assert rows == [(0,)]
        with pytest.raises(ShardError) as info:
            await store.execute("db-1", 0, "INSERT INTO t VALUES (1, 0)", 1000)
        assert info.value.kind == "constraint"
        with pytest.raises(ShardError) as info:
            await store.execute("db-1", 0, "SELECT pg_sleep(2)", 100)
        assert info.value.kind == "timeout"
        with pytest.raises(ShardError) as info:
            await store.execute("db-1", 0, "SELEC 1", 1000)
        assert info.value.kind == "invalid"
    finally:
        await store.close()
