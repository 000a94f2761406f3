"""The agent's shard executor on real SQLite files (and PostgreSQL where reachable)."""

from __future__ import annotations

import json
import stat
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from automator67.v1 import node_pb2
from psycopg import sql

from controller.agent.handlers import CommandHandlers
from controller.agent.metrics import RequestCounters
from controller.agent.pg_shards import (
    ROLE_PREFIX,
    SECRET_FILE,
    _same_database,
    agent_tag,
    legacy_schema_name,
    load_secret,
    shard_name,
    shard_password,
)
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


def test_shard_names_fit_postgres_and_never_collide(tmp_path: Path) -> None:
    tag = agent_tag(load_secret(tmp_path))
    assert len(tag) == 10
    uuid_id = "0b8e2a4c-6f1d-4c3e-9a57-2d0f8e6b1c93"
    assert shard_name(tag, uuid_id, 3) == f"{ROLE_PREFIX}{tag}_{uuid_id}_3"
    long_id = "x" * 64
    names = {
        shard_name(tag, db, shard)
        for db in (uuid_id, long_id, "x" * 63, "a-b", "a_b")
        for shard in (0, 1, 4095)
    }
    assert len(names) == 15
    assert all(len(name.encode()) <= 63 for name in names)
    assert shard_name("0" * 10, uuid_id, 0) != shard_name("1" * 10, uuid_id, 0)
    assert legacy_schema_name("db-1", 2) == "a67_db_1_2"  # what older agents created
    assert shard_password(b"k" * 32, "r1") != shard_password(b"k" * 32, "r2")
    assert shard_password(b"k" * 32, "r1") != shard_password(b"j" * 32, "r1")


def test_schemas_are_matched_to_their_database() -> None:
    tag = "0123456789"
    name = shard_name(tag, "db-1", 0)
    assert _same_database(name, None, "db-1")
    assert not _same_database(name, None, "db-2")
    assert not _same_database(name, None, "db")
    assert _same_database(shard_name(tag, "x" * 64, 7), None, "x" * 64)
    assert not _same_database(shard_name(tag, "x" * 64, 7), None, "y" * 64)
    assert _same_database("a67_db_1_3", None, "db-1")
    assert not _same_database("a67_db_12_3", None, "db-1")
    comment = "automator67 shard of database db-1, shard 0"
    assert _same_database("anything", comment, "db-1")
    assert not _same_database("anything", comment, "db-2")


def test_the_shard_secret_is_private_and_stable(tmp_path: Path) -> None:
    secret = load_secret(tmp_path)
    path = tmp_path / "shards" / SECRET_FILE
    assert len(secret) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    assert load_secret(tmp_path) == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_secret(tmp_path / "other") != secret
    path.write_text("not-a-secret-value")
    with pytest.raises(ShardError) as info:
        load_secret(tmp_path)
    assert info.value.kind == "unavailable"
    assert "not-a-secret-value" not in str(info.value)


def _drop_agent_roles(admin_url: str, data_dir: Path) -> None:
    """Drop the PostgreSQL roles an agent made (after their database has been dropped)."""
    prefix = ROLE_PREFIX + agent_tag(load_secret(data_dir))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        roles = conn.execute("SELECT rolname FROM pg_roles WHERE starts_with(rolname, %s)", (prefix,))
        for (role,) in roles.fetchall():
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.mark.postgres
async def test_postgres_shards_are_separate_schemas(
    tmp_path: Path, postgres_databases: object, postgres_admin_url: str
) -> None:
    created = postgres_databases.create()  # type: ignore[attr-defined]
    url = created.replace("postgresql+psycopg://", "postgresql://")
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
        postgres_databases.drop(created)  # type: ignore[attr-defined]
        _drop_agent_roles(postgres_admin_url, tmp_path)
