"""StreamQuery and the shard results' data path, end to end with real agents.

A real controller (in this process, so its RSS is this process's) and two real agent
processes serving two hash shards, from SQLite files or PostgreSQL schemas. The shards
are seeded directly (1,000,000 rows, about 30 MiB of JSON) and every answer is compared
with an unsharded SQLite oracle holding the same rows: the count, the order and a
checksum of every row.

* a 1M-row SELECT (k-way merged by ORDER BY) and a GROUP BY stream exactly, with the
  controller's RSS growing by less than 64 MiB;
* a client that stops reading leaves the agents paced by flow control (the controller's
  queues full, most rows never sent) and the RSS bounded; reading again finishes exactly;
* cancelling the client's call interrupts the agents' statements (their log says so;
  PostgreSQL's pg_stat_activity no longer shows the query);
* ExecuteQuery past its cap is RESOURCE_EXHAUSTED naming StreamQuery; SQL text over the
  bound is INVALID_ARGUMENT before parsing; a write is refused by StreamQuery.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import psycopg
import pytest
from automator67.v1 import auth_pb2_grpc, node_pb2, node_pb2_grpc, query_pb2, query_pb2_grpc
from google.protobuf import struct_pb2
from psycopg import sql as pgsql

from controller.agent.pg_shards import agent_tag, load_secret, shard_name
from controller.federation.query import key_type_from_sql, layout_from_proto
from controller.server import Controller
from tests.support import bearer, controller_settings, register, running_controller

ROWS = 1_000_000
RSS_BOUND = 64 * 1024 * 1024
SHARDING = query_pb2.Sharding(strategy=query_pb2.SHARDING_STRATEGY_HASH, shard_count=2, sharding_key="id")
SCHEMA = "CREATE TABLE t (id INTEGER PRIMARY KEY, k INTEGER NOT NULL, note TEXT NOT NULL)"


def row(i: int) -> tuple[int, int, str]:
    return (i, i % 1000, f"note-{i:07d}-{'x' * (i % 7)}")


def rss() -> int:
    """The controller's RSS: this process and its merge workers (spawned processes)."""
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children():
        with contextlib.suppress(psutil.Error):
            if "spawn_main" in " ".join(child.cmdline()):
                total += child.memory_info().rss
    return int(total)


@dataclass
class Env:
    controller: Controller
    stub: query_pb2_grpc.QueryServiceStub
    token: str
    db_id: str
    logs: dict[str, Path]
    backend: str
    pg_url: str
    oracle: sqlite3.Connection

    def stream(self, sql: str, timeout_ms: int = 300_000) -> grpc.aio.UnaryStreamCall:  # type: ignore[type-arg]
        return self.stub.StreamQuery(
            query_pb2.StreamQueryRequest(db_id=self.db_id, query=sql, timeout_ms=timeout_ms),
            metadata=bearer(self.token),
        )


def _value(value: struct_pb2.Value) -> object:
    kind = value.WhichOneof("kind")
    return None if kind == "null_value" else getattr(value, kind)


def _values(message: query_pb2.StreamQueryResponse) -> Iterator[tuple[object, ...]]:
    for listed in message.rows:
        yield tuple(_value(v) for v in listed.values)


def _normal(values: tuple[object, ...]) -> bytes:
    return repr(tuple(int(v) if isinstance(v, float) and v.is_integer() else v for v in values)).encode()


async def _digest(call: grpc.aio.UnaryStreamCall, peak: list[int]) -> tuple[int, str, list[str], bool]:  # type: ignore[type-arg]
    """Rows, an order-sensitive SHA-256 of them, the columns, and whether `done` came."""
    digest = hashlib.sha256()
    count, columns, done = 0, [], False
    async for message in call:
        if message.columns:
            columns = [c.name for c in message.columns]
        for values in _values(message):
            digest.update(_normal(values))
            count += 1
        done = done or message.done
        peak[0] = max(peak[0], rss())
    return count, digest.hexdigest(), columns, done


def _oracle_digest(oracle: sqlite3.Connection, sql: str) -> tuple[int, str]:
    digest = hashlib.sha256()
    count = 0
    for values in oracle.execute(sql):
        digest.update(_normal(values))
        count += 1
    return count, digest.hexdigest()


class Agents:
    def __init__(self, tmp: Path, pg_url: str) -> None:
        self.tmp = tmp
        self.pg_url = pg_url
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, address: str, token: str) -> Path:
        env = {k: v for k, v in os.environ.items() if not k.startswith("A67_")}
        env["A67_AGENT_TOKEN"] = token
        if self.pg_url:
            env["A67_SHARD_POSTGRES_URL"] = self.pg_url
        log = self.tmp / f"agent-{name}.log"
        args = [sys.executable, "-m", "controller.cli", "agent", "--data-dir", str(self.tmp / f"agent-{name}"),
                "--region", name, "--node-types", "database", "--controller", address]  # fmt: skip
        with open(log, "wb") as out:
            self.procs.append(subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env))
        return log

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


async def _wait_for(condition: object, what: str, attempts: int = 2400) -> None:
    for _ in range(attempts):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _seed(
    env_tmp: Path, backend: str, pg_url: str, db_id: str, placement: dict[int, str]
) -> sqlite3.Connection:
    layout = layout_from_proto(SHARDING, key_type=key_type_from_sql("INTEGER"))
    by_shard: dict[int, list[tuple[int, int, str]]] = {0: [], 1: []}
    oracle = sqlite3.connect(":memory:", check_same_thread=False)
    oracle.execute(SCHEMA)
    batch: list[tuple[int, int, str]] = []
    for i in range(ROWS):
        values = row(i)
        by_shard[layout.shard_for(i)].append(values)
        batch.append(values)
    oracle.executemany("INSERT INTO t VALUES (?, ?, ?)", batch)
    del batch
    for shard, rows in by_shard.items():
        agent_dir = env_tmp / f"agent-{placement[shard]}"
        if backend == "sqlite":
            conn = sqlite3.connect(agent_dir / "shards" / db_id / f"{shard}.sqlite3")
            conn.executemany("INSERT INTO t VALUES (?, ?, ?)", rows)
            conn.commit()
            conn.close()
        else:
            schema = shard_name(agent_tag(load_secret(agent_dir)), db_id, shard)
            with psycopg.connect(pg_url, autocommit=True) as conn, conn.cursor() as cur:
                with cur.copy(
                    pgsql.SQL("COPY {}.t (id, k, note) FROM STDIN").format(pgsql.Identifier(schema))
                ) as copy:
                    for values in rows:
                        copy.write_row(values)
                cur.execute(pgsql.SQL("ANALYZE {}.t").format(pgsql.Identifier(schema)))
    return oracle


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    pg_url = ""
    if request.param == "postgres":
        pg_url = (
            request.getfixturevalue("postgres_databases")
            .create()
            .replace("postgresql+psycopg://", "postgresql://")
        )
    agents = Agents(tmp_path, pg_url)
    settings = controller_settings(tmp_path / "controller", heartbeat_interval_seconds=0.3)
    async with running_controller(settings) as controller:
        channel = grpc.aio.insecure_channel(controller.address)
        try:
            token = (await register(auth_pb2_grpc.AuthServiceStub(channel))).access_token
            nodes = node_pb2_grpc.NodeServiceStub(channel)
            enrollment = await nodes.CreateEnrollmentToken(
                node_pb2.CreateEnrollmentTokenRequest(max_uses=2), metadata=bearer(token)
            )
            logs = {name: agents.start(name, controller.address, enrollment.token) for name in ("a", "b")}
            ids: dict[str, str] = {}
            for _ in range(600):
                listed = (await nodes.ListNodes(node_pb2.ListNodesRequest(), metadata=bearer(token))).nodes
                ids = {n.region: n.id for n in listed if n.status in (2, 3)}  # READY, or BUSY (CPU > 90 %)
                if len(ids) == 2:
                    break
                await asyncio.sleep(0.05)
            assert len(ids) == 2, "agents did not become ready"
            stub = query_pb2_grpc.QueryServiceStub(channel)
            created = await stub.CreateDatabase(
                query_pb2.CreateDatabaseRequest(
                    name="big",
                    dialect="postgres" if pg_url else "sqlite",
                    sharding=SHARDING,
                    shards=[
                        query_pb2.ShardPlacement(shard_index=0, primary_node_id=ids["a"]),
                        query_pb2.ShardPlacement(shard_index=1, primary_node_id=ids["b"]),
                    ],
                ),
                metadata=bearer(token),
            )
            db_id = created.database.id
            await stub.ApplySchema(
                query_pb2.ApplySchemaRequest(db_id=db_id, ddl=SCHEMA), metadata=bearer(token)
            )
            oracle = await asyncio.to_thread(_seed, tmp_path, request.param, pg_url, db_id, {0: "a", 1: "b"})
            yield Env(controller, stub, token, db_id, logs, request.param, pg_url, oracle)
            oracle.close()
        finally:
            agents.stop()
            await channel.close()


async def test_a_million_rows_stream_exactly_with_bounded_memory(env: Env) -> None:
    peak = [0]
    warm = env.stream("SELECT id, k, note FROM t WHERE id < 5000 ORDER BY id")  # warm-up: plans, threads
    assert (await _digest(warm, peak))[0] == 5000
    baseline = rss()
    peak = [baseline]

    sql = "SELECT id, k, note FROM t ORDER BY id"
    count, digest, columns, done = await _digest(env.stream(sql), peak)
    assert (count, digest) == _oracle_digest(env.oracle, sql)
    assert count == ROWS
    assert done
    assert columns == ["id", "k", "note"]
    assert peak[0] - baseline < RSS_BOUND, f"RSS grew by {(peak[0] - baseline) / 2**20:.1f} MiB"

    grouped = "SELECT k, count(*), sum(id), min(note) FROM t GROUP BY k ORDER BY k"
    assert (await _digest(env.stream(grouped), peak))[:2] == _oracle_digest(env.oracle, grouped)
    unordered = "SELECT id, note FROM t WHERE k < 500"
    got = [0]
    total = 0
    async for message in env.stream(unordered):
        for values in _values(message):
            total += int(values[0])  # type: ignore[call-overload]
            got[0] += 1
    expected = env.oracle.execute("SELECT count(*), sum(id) FROM t WHERE k < 500").fetchone()
    assert (got[0], total) == expected
    assert peak[0] - baseline < RSS_BOUND, f"RSS grew by {(peak[0] - baseline) / 2**20:.1f} MiB"
    assert env.controller.shard_results is not None
    assert len(env.controller.shard_results) == 0
    assert env.controller.merge_workers is not None
    assert env.controller.merge_workers.idle, "the merges did not run in a worker process"


async def test_a_client_that_stops_reading_paces_the_agents(env: Env) -> None:
    results = env.controller.shard_results
    assert results is not None
    sql = "SELECT id, k, note FROM t ORDER BY id"
    call = env.stream(sql)
    first = await call.read()
    assert [c.name for c in first.columns] == ["id", "k", "note"]
    baseline = rss()
    received = results.received_rows
    # The client reads nothing more: the merge stops, the controller's queues fill, and the
    # agents are held back by flow control.
    await _wait_for(results.paced, "the agents to be paced")
    stalled = results.received_rows
    assert stalled - received < ROWS // 4, (
        f"{stalled - received} rows arrived for a client that reads nothing"
    )
    assert rss() - baseline < RSS_BOUND
    # Reading again finishes the stream exactly.
    peak = [0]
    digest = hashlib.sha256()
    count = 0
    while (message := await call.read()) is not grpc.aio.EOF:
        for values in _values(message):
            digest.update(_normal(values))
            count += 1
        peak[0] = max(peak[0], rss())
    assert (count, digest.hexdigest()) == _oracle_digest(env.oracle, sql)
    assert peak[0] - baseline < RSS_BOUND


async def test_cancelling_the_call_interrupts_the_shards(env: Env) -> None:
    results = env.controller.shard_results
    assert results is not None
    # Minutes of work per shard before its one row: only an interruption ends it early.
    endless = "SELECT count(*) FROM t WHERE length(md5(repeat(note, 20000))) > k"
    if env.backend == "sqlite":
        endless = "SELECT count(*) FROM t WHERE length(hex(zeroblob(200000 + k))) > 0"
    call = env.stream(endless, timeout_ms=300_000)
    reader = asyncio.ensure_future(call.read())
    await _wait_for(lambda: len(results) == 2, "both shards to run the statement")
    if env.backend == "postgres":
        await _wait_for(lambda: _pg_running(env.pg_url) == 2, "PostgreSQL to run both statements")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    await _wait_for(lambda: len(results) == 0, "the controller to let the shards go")
    for name, log in env.logs.items():
        await _wait_for(
            lambda log=log: "interrupted after 0 rows" in log.read_text(errors="replace"),
            f"agent {name} to interrupt its statement",
        )
    if env.backend == "postgres":
        await _wait_for(lambda: _pg_running(env.pg_url) == 0, "PostgreSQL to stop the statements")


def _pg_running(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        found = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s",
            ("%a67_rows%",),
        ).fetchone()
    return int(found[0]) if found else 0


async def test_bounds_and_refusals(env: Env) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await env.stub.ExecuteQuery(
            query_pb2.ExecuteQueryRequest(db_id=env.db_id, query="SELECT id FROM t WHERE id < 150000"),
            metadata=bearer(env.token),
        )
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "StreamQuery" in (info.value.details() or "")
    small = await env.stub.ExecuteQuery(
        query_pb2.ExecuteQueryRequest(db_id=env.db_id, query="SELECT id FROM t WHERE id < 100000"),
        metadata=bearer(env.token),
    )
    assert len(small.data) == 100_000

    long_sql = "SELECT id FROM t WHERE id IN (" + ",".join(["1"] * 600_000) + ")"
    assert len(long_sql) > 1024 * 1024
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await env.stub.ExecuteQuery(
            query_pb2.ExecuteQueryRequest(db_id=env.db_id, query=long_sql), metadata=bearer(env.token)
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "longer than 1048576 bytes" in (info.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await env.stream(long_sql).read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "longer than 1048576 bytes" in (info.value.details() or "")

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await env.stream("DELETE FROM t WHERE id = 1").read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ExecuteQuery" in (info.value.details() or "")
