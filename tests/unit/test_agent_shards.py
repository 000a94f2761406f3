"""The agent's shard executor on real SQLite files (and PostgreSQL where reachable)."""

from __future__ import annotations

import asyncio
import json
import stat
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from automator67.v1 import node_pb2
from psycopg import sql

from controller.agent import shard_results
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
from controller.limits import CONTROL_MESSAGE_MAX_BYTES
from controller.wire import decode_result, decode_rows, decode_value, encode_result, encode_value


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


class FakePush:
    """A PushShardResult call that keeps what the agent writes (the controller's side)."""

    def __init__(self) -> None:
        self.messages: list[node_pb2.PushShardResultRequest] = []
        self.ended = asyncio.get_running_loop().create_future()
        self.opened = asyncio.Event()

    async def write(self, message: node_pb2.PushShardResultRequest) -> None:
        self.messages.append(message)
        self.opened.set()

    async def done_writing(self) -> None:
        if not self.ended.done():
            self.ended.set_result(node_pb2.PushShardResultResponse())

    def cancel(self) -> None:
        if not self.ended.done():
            self.ended.cancel()

    def __await__(self):  # type: ignore[no-untyped-def]
        return self.ended.__await__()


async def test_handler_pushes_rows_in_batches_and_answers_a_summary(tmp_path: Path) -> None:
    store = ShardStore(tmp_path)
    handlers = CommandHandlers()
    register_shard_handlers(handlers, store)
    counters = RequestCounters()
    pushes: list[FakePush] = []

    def open_push() -> FakePush:
        pushes.append(FakePush())
        return pushes[-1]

    def command(command_id: str, sql: str, **caps: int) -> node_pb2.NodeCommand:
        return node_pb2.NodeCommand(
            command_id=command_id,
            execute_shard_statement=node_pb2.ExecuteShardStatement(
                database_id="d", shard_index=0, sql=sql, read_only=True, **caps
            ),
        )

    try:
        unconnected = await handlers.dispatch(command("c0", "SELECT 1"), counters)
        assert not unconnected.ok
        assert json.loads(unconnected.payload) == {"error_kind": "unavailable"}
        store.open_push = open_push
        many = (
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 20000) SELECT x FROM c"
        )
        ok = await handlers.dispatch(command("c1", many), counters)
        assert ok.ok
        assert json.loads(ok.payload) == {"rows": 20000, "rowcount": -1, "columns": [["x", "INTEGER"]]}
        messages = pushes[-1].messages
        assert messages[0].command_id == "c1"
        assert messages[1].columns_known
        assert messages[-1].done
        assert not messages[-1].error_kind
        assert len(messages) > 3  # batches, not one payload
        assert all(m.ByteSize() <= CONTROL_MESSAGE_MAX_BYTES for m in messages)
        rows = [r for m in messages for r in (decode_rows(m.rows) if m.row_count else [])]
        assert rows == [(x,) for x in range(1, 20001)]

        capped = await handlers.dispatch(command("c2", many, max_rows=20000), counters)
        assert capped.ok  # exactly the cap is fine
        over = await handlers.dispatch(command("c3", many, max_rows=19999), counters)
        assert not over.ok
        assert json.loads(over.payload) == {"error_kind": "too_large"}
        assert pushes[-1].messages[-1].error_kind == "too_large"
        assert sum(m.row_count for m in pushes[-1].messages) < 20000  # never sent past the cap

        bad = await handlers.dispatch(command("c4", "SELEC 1"), counters)
        assert not bad.ok
        assert json.loads(bad.payload) == {"error_kind": "invalid"}
        assert "syntax error" in bad.error_message
        assert pushes[-1].messages[-1].error_kind == "invalid"
    finally:
        await store.close()


async def test_a_statement_stops_when_the_controller_ends_the_call(tmp_path: Path) -> None:
    store = ShardStore(tmp_path)
    push = FakePush()
    store.open_push = lambda: push
    try:
        endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
        request = node_pb2.ExecuteShardStatement(
            database_id="d", shard_index=0, sql=endless, timeout_ms=600_000, read_only=True
        )
        running = asyncio.ensure_future(store.push_result("c1", request, lambda: push))
        await push.opened.wait()  # the call is open: the statement runs
        assert not running.done()
        push.cancel()  # the controller ended the call
        result = await asyncio.wait_for(running, 10)
        assert not result.ok
        assert json.loads(result.payload) == {"error_kind": "cancelled"}
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


async def test_a_small_result_ready_at_once_rides_on_the_command_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "At once" is a wait of INLINE_WAIT_SECONDS; made long here so that a slow machine
    # cannot turn the inline case into a push (which would be correct, but not this test).
    monkeypatch.setattr(shard_results, "INLINE_WAIT_SECONDS", 60.0)
    store = ShardStore(tmp_path)
    pushes: list[FakePush] = []

    def open_push() -> FakePush:
        pushes.append(FakePush())
        return pushes[-1]

    def request(
        sql: str, *, inline_ok: bool = True, read_only: bool = True
    ) -> node_pb2.ExecuteShardStatement:
        return node_pb2.ExecuteShardStatement(
            database_id="d", shard_index=0, sql=sql, read_only=read_only, inline_ok=inline_ok
        )

    try:
        await store.execute("d", 0, "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)", 5000)
        write = await store.push_result(
            "w", request("INSERT INTO t VALUES (1, 'a'), (2, 'b')", read_only=False), open_push
        )
        assert write.ok
        assert not pushes
        assert json.loads(write.payload) == {"rows": 0, "rowcount": 2, "columns": [], "inline": True}
        point = await store.push_result("p", request("SELECT id, name FROM t WHERE id = 2"), open_push)
        assert point.ok
        assert not pushes
        assert json.loads(point.payload) == {
            "rows": 1,
            "rowcount": -1,
            "columns": [["id", "INTEGER"], ["name", "TEXT"]],
            "inline": True,
        }
        assert decode_rows(point.inline_rows) == [(2, "b")]
        bad = await store.push_result("b", request("SELECT nope FROM t"), open_push)
        assert not bad.ok
        assert not pushes
        assert json.loads(bad.payload) == {"error_kind": "invalid"}

        # Too big for the command's result: pushed, as before.
        big = f"SELECT '{'x' * 40_000}' AS wide"
        pushed = await store.push_result("big", request(big), open_push)
        assert pushed.ok
        assert len(pushes) == 1
        assert not pushed.inline_rows
        assert "inline" not in json.loads(pushed.payload)
        assert decode_rows(pushes[0].messages[1].rows) == [("x" * 40_000,)]
        # A controller that does not take inline results gets the push, whatever the size.
        plain = await store.push_result("plain", request("SELECT 1", inline_ok=False), open_push)
        assert plain.ok
        assert len(pushes) == 2
        assert not plain.inline_rows
    finally:
        await store.close()


async def test_a_slow_statement_gets_its_call_and_so_its_cancellation(tmp_path: Path) -> None:
    store = ShardStore(tmp_path)
    push = FakePush()
    try:
        endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
        request = node_pb2.ExecuteShardStatement(
            database_id="d", shard_index=0, sql=endless, timeout_ms=600_000, read_only=True, inline_ok=True
        )
        running = asyncio.ensure_future(store.push_result("c1", request, lambda: push))
        await push.opened.wait()  # not ready within the inline wait: the call is opened
        assert not running.done()
        push.cancel()
        result = await asyncio.wait_for(running, 10)
        assert json.loads(result.payload) == {"error_kind": "cancelled"}
    finally:
        await store.close()
