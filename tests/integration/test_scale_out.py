"""Two real controllers on one PostgreSQL store and one Redis (``A67_SCALE_OUT=1``), a
real agent connected to the first: the second commands the node through the first, and
the command's own calls — its rows, a long statement's text — come to the second
directly (``reply_to``). Without scale-out a second controller is refused; with the
embedded store or cache, scale-out is refused at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from automator67.v1 import common_pb2, deployment_pb2, node_pb2, query_pb2, query_pb2_grpc
from sqlalchemy import select, text

from controller.config import Settings
from controller.errors import FailedPrecondition, Unavailable
from controller.federation.repository import DatabaseRepository
from controller.federation.shards import ResultCaps, collect, open_rows
from controller.limits import SQL_INLINE_MAX_BYTES
from controller.server import Controller, start_controller
from controller.store.migrate import upgrade
from controller.store.models import DatabaseInstance, Node, User
from tests.conftest import PostgresDatabases
from tests.integration.test_deployments_real import (
    HEARTBEAT,
    Client,
    Processes,
    _user,
    app_manifest,
    app_source,
    processes,
)
from tests.support import bearer, controller_settings, migrated_store, running_controller

pytestmark = pytest.mark.postgres


async def _statement(
    controller: Controller, node_id: str, sql: str, *, read: bool
) -> list[tuple[object, ...]]:
    """Run ``sql`` on shard 0 of database ``db1`` on ``node_id`` from ``controller``, its
    rows pushed back on the data path (never inline)."""
    command = node_pb2.NodeCommand(
        command_id=str(uuid.uuid4()),
        execute_shard_statement=node_pb2.ExecuteShardStatement(
            database_id="db1", shard_index=0, sql=sql, timeout_ms=30_000, read_only=read, inline_ok=False
        ),
    )
    assert controller.shard_results is not None
    rows = await open_rows(
        controller.fleet.streams, controller.shard_results, node_id, 0, command, ResultCaps(), 30
    )
    return list((await collect(rows, not read)).rows)


async def _pair(tmp_path: Path, databases: PostgresDatabases, redis_url: str) -> tuple[Settings, Settings]:
    """Two controllers' settings for one migrated PostgreSQL store (``a67 migrate``: a
    PostgreSQL store is never migrated at start) and one Redis, with ``A67_SCALE_OUT``.
    Start the first, then copy its keys to the second's data directory with :func:`_same_keys`."""
    store_url = databases.create()
    await asyncio.to_thread(upgrade, store_url)
    common = {"heartbeat_interval_seconds": HEARTBEAT, "store_url": store_url, "cache_url": redis_url}
    return (
        controller_settings(tmp_path / "a", scale_out=True, **common),
        controller_settings(tmp_path / "b", scale_out=True, **common),
    )


def _same_keys(first: Settings, second: Settings) -> None:
    """Every controller has the same keys (here: the first's development keys, copied)."""
    shutil.copytree(first.keys_dir, second.keys_dir)


@contextlib.asynccontextmanager
async def _two_controllers(
    tmp_path: Path, databases: PostgresDatabases, redis_url: str
) -> AsyncIterator[tuple[Controller, Controller, Processes]]:
    """Two running controllers (:func:`_pair`, the same keys) and the test's processes."""
    a_settings, b_settings = await _pair(tmp_path, databases, redis_url)
    with processes(tmp_path) as procs:
        async with running_controller(a_settings) as a:
            _same_keys(a_settings, b_settings)
            async with running_controller(b_settings) as b:
                yield a, b, procs


async def test_a_second_controller_commands_a_node_held_by_the_first(
    tmp_path: Path, postgres_databases: PostgresDatabases, redis_server_url: str
) -> None:
    a_settings, b_settings = await _pair(tmp_path, postgres_databases, redis_server_url)
    with processes(tmp_path) as procs:
        async with running_controller(a_settings) as a:
            _same_keys(a_settings, b_settings)
            async with (
                running_controller(b_settings) as b,
                grpc.aio.insecure_channel(a.address) as channel,
            ):
                assert a.relay is not None
                assert b.relay is not None
                client = Client(channel, await _user(channel))
                enrollment = await client.enrollment(uses=1)
                base = 32000 + (os.getpid() % 50) * 20
                procs.agent(a.address, enrollment, "eu-west", (base, base + 19))
                (node,) = await client.wait_ready(1)
                assert a.fleet.streams.get(node.id) is not None
                assert b.fleet.streams.get(node.id) is None

                async def held_by_a() -> bool:
                    async with b.store.session() as session:
                        holder = (
                            await session.execute(select(Node.stream_holder).where(Node.id == node.id))
                        ).scalar_one()
                    return bool(holder == a_settings.resolved_controller_id())

                while not await held_by_a():  # noqa: ASYNC110 - the store is written by A's writer task
                    await asyncio.sleep(0.05)

                # B commands the node through A; the rows come straight to B
                await _statement(b, node.id, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)", read=False)
                long_value = "x" * (SQL_INLINE_MAX_BYTES + 1000)  # the text rides beside the command
                await _statement(
                    b, node.id, f"INSERT INTO t (id, v) VALUES (1, 'short'), (2, '{long_value}')", read=False
                )
                rows = await _statement(b, node.id, "SELECT id, length(v) FROM t ORDER BY id", read=True)
                assert rows == [(1, 5), (2, len(long_value))]
                assert b.relay.relayed == 3
                assert a.relay.served == 3
                assert b.shard_results is not None
                assert b.shard_results.received_rows >= 2  # pushed to B, not to A
                # A's own command for its own node does not touch the relay
                assert await _statement(a, node.id, "SELECT count(*) FROM t", read=True) == [(2,)]
                assert a.relay.relayed == 0


async def test_scale_out_needs_postgresql_and_redis_and_a_second_controller_needs_scale_out(
    tmp_path: Path, postgres_databases: PostgresDatabases, redis_server_url: str
) -> None:
    with pytest.raises(ValueError, match="A67_SCALE_OUT: several controllers share one PostgreSQL store"):
        controller_settings(tmp_path / "x", scale_out=True)
    with pytest.raises(ValueError, match="A67_SCALE_OUT"):
        controller_settings(tmp_path / "y", scale_out=True, store_url=postgres_databases.create())
    store_url = postgres_databases.create()
    await asyncio.to_thread(upgrade, store_url)
    first = controller_settings(
        tmp_path / "a", store_url=store_url, cache_url=redis_server_url, auto_migrate=True
    )
    async with running_controller(first):
        shutil.copytree(first.keys_dir, tmp_path / "b" / "keys")
        second: Settings = controller_settings(
            tmp_path / "b", store_url=store_url, cache_url=redis_server_url
        )
        with pytest.raises(FailedPrecondition, match="Several controllers need A67_SCALE_OUT=1"):
            async with running_controller(second):
                pass


async def test_a_node_moves_to_another_controller_when_its_own_goes_away(
    tmp_path: Path, postgres_databases: PostgresDatabases, redis_server_url: str
) -> None:
    """A node connected before a second controller started hears of it (a heartbeat's
    answer lists every controller's node port once the list changed); when its own
    controller stops, it reconnects to the other one, which watches it from then on, and
    the node is never declared failed."""
    a_settings, b_settings = await _pair(tmp_path, postgres_databases, redis_server_url)
    with processes(tmp_path) as procs:
        a = await start_controller(a_settings)
        try:
            async with grpc.aio.insecure_channel(a.address) as on_a:
                token = await _user(on_a)
                enrollment = await Client(on_a, token).enrollment(uses=1)
                base = 33000 + (os.getpid() % 50) * 20
                procs.agent(a.address, enrollment, "eu-west", (base, base + 19))  # only A exists yet
                (node,) = await Client(on_a, token).wait_ready(1)
            _same_keys(a_settings, b_settings)
            async with running_controller(b_settings) as b, grpc.aio.insecure_channel(b.address) as channel:
                assert a.registry is not None
                assert b.registry is not None
                await a.registry._read_endpoints()  # as its next refresh would: B is listed
                assert a.registry.node_endpoints[1:] == (b.registry.node_endpoint,)
                agent_log = tmp_path / "agent-eu-west.log"
                told = f"controllers: {a.registry.node_endpoint}, {b.registry.node_endpoint}"
                deadline = asyncio.get_running_loop().time() + 60
                while told not in agent_log.read_text():
                    assert asyncio.get_running_loop().time() < deadline, "the node never heard of B"
                    await asyncio.sleep(0.05)
                client = Client(channel, token)
                statuses: list[int] = []

                async def on_b() -> bool:
                    statuses.extend(n.status for n in await client.list_nodes())
                    return b.fleet.streams.get(node.id) is not None

                await a.stop(grace=0.5)  # its stream ends; A cannot be reached any more
                while not await on_b():
                    assert asyncio.get_running_loop().time() < deadline + 60, "the node did not move to B"
                    await asyncio.sleep(0.05)
                async with b.store.session() as session:
                    holder = (
                        await session.execute(select(Node.stream_holder).where(Node.id == node.id))
                    ).scalar_one()
                assert holder == b_settings.resolved_controller_id()
                assert await _statement(b, node.id, "SELECT 1", read=True) == [(1,)]
                assert b.relay is not None
                assert b.relay.relayed == 0  # B holds the stream now: nothing relayed
                assert common_pb2.NODE_STATUS_FAILED not in statuses
        finally:
            await a.stop(grace=0.5)


async def test_a_deployment_made_on_one_controller_runs_on_a_node_held_by_the_other(
    tmp_path: Path, postgres_databases: PostgresDatabases, redis_server_url: str
) -> None:
    """B places a deployment on a node whose stream A holds (its state and metrics from the
    store), sends DeployReplica through A, and the node fetches the package from B
    (``reply_to``); the package's bytes are in the store too, so A can hand it to a node."""
    a_settings, b_settings = await _pair(tmp_path, postgres_databases, redis_server_url)
    with processes(tmp_path) as procs:
        async with running_controller(a_settings) as a:
            _same_keys(a_settings, b_settings)
            async with (
                running_controller(b_settings) as b,
                grpc.aio.insecure_channel(a.address) as on_a,
                grpc.aio.insecure_channel(b.address) as on_b,
            ):
                token = await _user(on_a)
                enrollment = await Client(on_a, token).enrollment(uses=1)
                base = 34000 + (os.getpid() % 50) * 20
                procs.agent(a.address, enrollment, "eu-west", (base, base + 19))
                client = Client(on_b, token)  # the user talks to B from now on
                (node,) = await client.wait_ready(1)
                assert a.fleet.streams.get(node.id) is not None
                deadline = asyncio.get_running_loop().time() + 60
                while not b.fleet.watched_elsewhere(a_settings.resolved_controller_id()):
                    assert asyncio.get_running_loop().time() < deadline, "B's watchers never saw A"
                    await asyncio.sleep(0.05)
                created = await client.deployments.CreateDeployment(
                    deployment_pb2.CreateDeploymentRequest(
                        manifest=app_manifest(1), source_tar_gz=app_source("v1")
                    ),
                    metadata=bearer(token),
                )
                d = await client.wait_answering(created.deployment_id, 1, "v1", within=60)
                assert d.node_assignments[0].node_id == node.id
                assert b.relay is not None
                assert b.relay.relayed >= 1  # DeployReplica went through A
                # the package is in the store: A writes it to its own disk when it needs it
                sha256 = next(iter(b.deployments.packages.packages_dir.iterdir())).name
                assert a.deployments.packages.package(sha256) is None
                found = await a.deployments._h.sources.package_file(sha256)
                assert found is not None
                assert found.size == b.deployments.packages.package(sha256).size  # type: ignore[union-attr]


async def test_writes_through_two_controllers_reach_the_replica_in_the_primarys_order(
    tmp_path: Path, postgres_databases: PostgresDatabases, redis_server_url: str
) -> None:
    async with (
        _two_controllers(tmp_path, postgres_databases, redis_server_url) as (a, b, procs),
        grpc.aio.insecure_channel(a.address) as to_a,
        grpc.aio.insecure_channel(b.address) as to_b,
    ):
        client = Client(to_a, await _user(to_a))
        md = bearer(client.token)
        enrollment = await client.enrollment(uses=2)
        base = 33000 + (os.getpid() % 50) * 20
        procs.agent(a.address, enrollment, "eu-west", (base, base + 9))
        procs.agent(b.address, enrollment, "us-east", (base + 10, base + 19))
        region = {n.id: n.region for n in await client.wait_ready(2)}
        primary, replica = sorted(region)
        stubs = [query_pb2_grpc.QueryServiceStub(c) for c in (to_a, to_b)]
        database = (
            await stubs[0].CreateDatabase(
                query_pb2.CreateDatabaseRequest(
                    name="ordered",
                    dialect="sqlite",
                    sharding=query_pb2.Sharding(
                        strategy=query_pb2.SHARDING_STRATEGY_HASH, shard_count=1, sharding_key="id"
                    ),
                    shards=[
                        query_pb2.ShardPlacement(
                            shard_index=0, primary_node_id=primary, replica_node_ids=[replica]
                        )
                    ],
                ),
                metadata=md,
            )
        ).database
        await stubs[1].ApplySchema(
            query_pb2.ApplySchemaRequest(
                db_id=database.id, ddl="CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER NOT NULL)"
            ),
            metadata=md,
        )

        async def run(stub: query_pb2_grpc.QueryServiceStub, sql: str) -> None:
            await stub.ExecuteQuery(query_pb2.ExecuteQueryRequest(db_id=database.id, query=sql), metadata=md)

        await run(stubs[0], "INSERT INTO t (id, v) VALUES (1, 0)")

        async def writer(stub: query_pb2_grpc.QueryServiceStub, first: int) -> None:
            for k in range(first, first + 25):  # v * 3 + k: the result depends on the order
                await run(stub, f"UPDATE t SET v = (v * 3 + {k}) % 1000000007 WHERE id = 1")

        await asyncio.gather(writer(stubs[0], 1), writer(stubs[1], 1000))

        def value(node_id: str) -> int:
            path = tmp_path / region[node_id] / "shards" / database.id / "0.sqlite3"
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                return int(db.execute("SELECT v FROM t WHERE id = 1").fetchone()[0])

        async with a.store.session() as session:
            replication = await session.scalar(
                select(DatabaseInstance.replication).where(DatabaseInstance.id == database.id)
            )
        assert not (replication or {}).get("stale")  # the replica took every write
        assert value(replica) == value(primary)


async def test_a_write_waits_for_another_controllers_write_to_the_same_database_boundedly(
    postgres_databases: PostgresDatabases,
) -> None:
    url = postgres_databases.create()
    await asyncio.to_thread(upgrade, url)
    async with migrated_store(url) as one, migrated_store(url) as other:
        async with one.session() as session:
            session.add(User(id="u1", email="ada@example.com", password_hash="x"))
            await session.flush()
            session.add(
                DatabaseInstance(
                    id="db1",
                    user_id="u1",
                    name="d",
                    provider="sqlite",
                    connection={},
                    replication={"stale": {"0": ["n2"]}},
                )
            )
        first, second = DatabaseRepository(one), DatabaseRepository(other)
        async with first.write_order("db1") as stored:
            assert stored == {"stale": {"0": ["n2"]}}
            with pytest.raises(Unavailable):  # the other controller's write waits, then gives up
                async with second.write_order("db1", wait_seconds=0.2):
                    pass
            async with second.write_order("db2", wait_seconds=0.2) as missing:  # another database
                assert missing is None
        async with second.write_order("db1", wait_seconds=0.2):  # free again
            pass
        async with other.engine.connect() as conn:  # the wait's bound left the pool as it was
            assert await conn.scalar(text("SHOW lock_timeout")) == "0"
