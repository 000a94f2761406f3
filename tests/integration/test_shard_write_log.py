"""The shards' write log is in the store: a stale replica catches up after a controller restart.

* With a real controller and real agents: a replica's agent is killed while writes (single
  statements, and a committed transaction) go on; the controller is stopped and started
  again on the same store; the primary's agent is killed and the replica's comes back. The
  next read falls back to the replica, which first replays what it missed from the store's
  log: it returns every acknowledged write. With the log in the controller's memory, the
  restarted controller knows the replica is stale but has nothing to replay: the read fails.
* Against the store (SQLite and PostgreSQL): the log (sequences, trimming, a restarted
  reader), and a catch-up after every in-memory object was dropped and rebuilt from the
  store, through a fake agent boundary.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from automator67.v1 import auth_pb2_grpc, node_pb2, node_pb2_grpc, query_pb2, query_pb2_grpc
from sqlalchemy import select

from controller.cache.memory import MemoryCache
from controller.federation.query import ShardError, ShardResult
from controller.federation.repository import DatabaseRepository
from controller.federation.service import DatabaseService
from controller.federation.shards import (
    LoggedWrite,
    NodeShardExecutor,
    ReplicationState,
    StoreWriteLog,
    WriteLog,
)
from controller.store import Store
from controller.store.migrate import upgrade
from controller.store.models import DatabaseInstance, ShardWrite, User
from tests.integration.test_query_api import Fleet, _query, _ready_nodes, _rows
from tests.support import bearer, controller_settings, migrated_store, register, running_controller

INTERVAL = 0.3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _until(check: Callable[[], bool], what: str, attempts: int = 1200) -> None:
    for _ in range(attempts):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    running = Fleet()
    yield running
    running.stop_all()


# --------------------------------------------------------------------------- real controller


async def test_a_stale_replica_catches_up_after_a_controller_restart(
    tmp_path: Path, fleet: Fleet, store_url: str
) -> None:
    # the agents keep the controller's node endpoint: the restarted one listens on the same port
    settings = controller_settings(
        tmp_path / "controller",
        heartbeat_interval_seconds=INTERVAL,
        node_listen_address=f"127.0.0.1:{_free_port()}",
        store_url=store_url,
    )
    await asyncio.to_thread(upgrade, store_url)  # PostgreSQL is migrated by `a67 migrate`

    async with (
        running_controller(settings) as first,
        grpc.aio.insecure_channel(first.address) as channel,
    ):
        token = (await register(auth_pb2_grpc.AuthServiceStub(channel))).access_token
        nodes = node_pb2_grpc.NodeServiceStub(channel)
        enrollment = await nodes.CreateEnrollmentToken(
            node_pb2.CreateEnrollmentTokenRequest(max_uses=2), metadata=bearer(token)
        )
        for name in ("a", "b"):
            fleet.start(name, first, tmp_path / f"agent-{name}", enrollment.token)
        ids = await _ready_nodes(nodes, token, 2)
        stub = query_pb2_grpc.QueryServiceStub(channel)
        created = await stub.CreateDatabase(
            query_pb2.CreateDatabaseRequest(
                name="ledger",
                dialect="sqlite",
                sharding=query_pb2.Sharding(
                    strategy=query_pb2.SHARDING_STRATEGY_HASH, shard_count=2, sharding_key="account"
                ),
                shards=[  # both shards: primary on a, replica on b
                    query_pb2.ShardPlacement(
                        shard_index=i, primary_node_id=ids["a"], replica_node_ids=[ids["b"]]
                    )
                    for i in range(2)
                ],
            ),
            metadata=bearer(token),
        )
        db_id = created.database.id
        await stub.ApplySchema(
            query_pb2.ApplySchemaRequest(
                db_id=db_id,
                ddl="CREATE TABLE entries (id INTEGER NOT NULL, account INTEGER NOT NULL, note TEXT, "
                "PRIMARY KEY (account, id))",
            ),
            metadata=bearer(token),
        )
        values = ", ".join(f"({i}, {i % 5}, 'before')" for i in range(1, 11))
        await _query(stub, token, db_id, f"INSERT INTO entries (id, account, note) VALUES {values}")

        fleet.kill("b")  # the replica of both shards misses everything from here on
        for i in range(11, 31):
            await _query(
                stub, token, db_id, f"INSERT INTO entries (id, account, note) VALUES ({i}, {i % 5}, 'w')"
            )
        # order matters: an update and a delete of rows written while b was down
        await _query(stub, token, db_id, "UPDATE entries SET note = 'updated' WHERE id IN (3, 12, 25)")
        await _query(stub, token, db_id, "DELETE FROM entries WHERE id IN (4, 13)")
        # a committed transaction (one shard: one account)
        txn = (
            await stub.BeginTransaction(
                query_pb2.BeginTransactionRequest(db_id=db_id), metadata=bearer(token)
            )
        ).transaction
        for i in (31, 32):
            await _query(
                stub,
                token,
                db_id,
                f"INSERT INTO entries (id, account, note) VALUES ({i}, 2, 'txn')",
                transaction_id=txn.id,
            )
        await stub.CommitTransaction(
            query_pb2.CommitTransactionRequest(db_id=db_id, transaction_id=txn.id), metadata=bearer(token)
        )
        # every acknowledged write, as the primary has them
        expected = _rows(
            await _query(stub, token, db_id, "SELECT id, account, note FROM entries ORDER BY id")
        )
        assert len(expected) == 30
        async with first.store.session() as session:
            row = await session.get(DatabaseInstance, db_id)
            assert row is not None
            assert row.replication is not None
            assert row.replication["stale"] == {"0": [ids["b"]], "1": [ids["b"]]}
            positions = row.replication["applied"]
            assert set(positions) == {"0", "1"}
            assert all(set(p) == {ids["b"]} for p in positions.values())
        fleet.kill("a")

    # the same store, a new controller process state: nothing of the first is in memory
    async with (
        running_controller(settings) as second,
        grpc.aio.insecure_channel(second.address) as channel,
    ):
        fleet.start("b", second, tmp_path / "agent-b", None)
        await _until(lambda: second.fleet.streams.get(ids["b"]) is not None, "agent b to connect")
        stub = query_pb2_grpc.QueryServiceStub(channel)
        # a (both primaries) is down: the read falls back to b, which replays what it missed
        answer = await _query(stub, token, db_id, "SELECT id, account, note FROM entries ORDER BY id")
        assert _rows(answer) == expected
        assert {s.node_id for s in answer.shard_statuses} == {ids["b"]}
        async with second.store.session() as session:
            row = await session.get(DatabaseInstance, db_id)
            assert row is not None
            assert row.replication is not None
            assert row.replication["stale"] == {}
            assert row.replication["applied"] == {}


# --------------------------------------------------------------------------- the store


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    async with migrated_store(store_url) as opened:
        yield opened


async def test_the_log_keeps_its_sequence_and_its_newest_writes_across_instances(store: Store) -> None:
    log = StoreWriteLog(store, size=5, trim_every=2)
    for i in range(1, 13):
        assert await log.append("db1", 0, [f"INSERT {i}"], False) == i
    assert await log.append("db1", 1, ["A", "B"], True) == 1  # shards count apart
    assert await log.append("db2", 0, ["X"], False) == 1

    restarted = StoreWriteLog(store, size=5, trim_every=2)  # a restarted controller's
    assert await restarted.newest("db1", 0) == 12
    kept = await restarted.since("db1", 0, 0)
    assert [w.sequence for w in kept] == [8, 9, 10, 11, 12]  # the newest 5 (trimmed at 12)
    assert kept[0] == LoggedWrite(8, ("INSERT 8",), False)
    assert await restarted.since("db1", 1, 0) == [LoggedWrite(1, ("A", "B"), True)]
    assert [w.sequence for w in await restarted.since("db1", 0, 9, limit=2)] == [10, 11]
    assert await restarted.append("db1", 0, ["INSERT 13"], False) == 13

    # the first instance still counts 12: the store refuses 13 again, it reads the newest and retries
    assert await log.append("db1", 0, ["INSERT 14"], False) == 14
    assert [w.statements for w in await log.since("db1", 0, 12)] == [("INSERT 13",), ("INSERT 14",)]

    await restarted.drop("db1")
    assert await StoreWriteLog(store).newest("db1", 0) == 0
    async with store.session() as session:
        left = (await session.execute(select(ShardWrite.database_id, ShardWrite.sequence))).all()
    assert [tuple(r) for r in left] == [("db2", 1)]


class Agents:
    """The replicas' boundary: one SQLite database per node; a node that is down refuses."""

    def __init__(self, names: list[str]) -> None:
        self.databases = {n: sqlite3.connect(":memory:") for n in names}
        self.down: set[str] = set()
        self.commands: list[str] = []

    def run(self, node: str, statements: list[str] | tuple[str, ...]) -> None:
        if node in self.down:
            raise ShardError(0, f"node {node}: not connected", retryable=True)
        with self.databases[node] as connection:
            for sql in statements:
                connection.execute(sql)

    def rows(self, node: str) -> list[tuple[Any, ...]]:
        return self.databases[node].execute("SELECT k, v FROM t ORDER BY k").fetchall()


class FakeAgentExecutor(NodeShardExecutor):
    """The executor with its sends to agents replaced by :class:`Agents`."""

    def __init__(self, agents: Agents, **kwargs: Any) -> None:
        super().__init__(streams=None, results=None, is_write=True, **kwargs)  # type: ignore[arg-type]
        self.agents = agents
        self._open_transactions: dict[str, list[str]] = {}

    async def _send(
        self, node_id: str, shard: int, sql: str, deadline: float, command_id: str
    ) -> ShardResult:
        self.agents.run(node_id, [sql])
        self.agents.commands.append(command_id)
        return ShardResult(columns=[], rows=[], rows_affected=1, node_id=node_id)

    async def _send_step(
        self, node_id: str, shard: int, transaction_id: str, action: int, sql: str, deadline: float
    ) -> None:
        if node_id in self.agents.down:
            raise ShardError(shard, f"node {node_id}: not connected", retryable=True)
        actions = node_pb2.ShardTransactionAction
        if action == actions.SHARD_TRANSACTION_ACTION_ROLLBACK:
            self._open_transactions.pop(transaction_id, None)
        elif action == actions.SHARD_TRANSACTION_ACTION_COMMIT:
            self.agents.run(node_id, self._open_transactions.pop(transaction_id))
        else:  # BEGIN, EXECUTE
            self._open_transactions.setdefault(transaction_id, []).append(sql)


async def test_a_replica_catches_up_from_the_store_after_everything_in_memory_is_rebuilt(
    store: Store, store_url: str
) -> None:
    async with store.session() as session:
        session.add(User(id="u1", email="ada@example.com", password_hash="x"))
    repository = DatabaseRepository(store)
    row = await repository.create(
        database_id="db1",
        user_id="u1",
        name="kv",
        provider="sqlite",
        connection={"dialect": "sqlite"},
        sharding={"strategy": "SHARDING_STRATEGY_HASH", "shardCount": 1, "shardingKey": "k"},
        replication={
            "shards": [{"shard_index": 0, "primary_node_id": "p", "replica_node_ids": ["r1", "r2"]}],
            "stale": {},
        },
    )
    agents = Agents(["p", "r1", "r2"])
    service = DatabaseService(
        databases=repository,
        nodes=None,  # type: ignore[arg-type]
        streams=None,  # type: ignore[arg-type]
        vault=None,  # type: ignore[arg-type]
        cache=MemoryCache(),
    )
    assert isinstance(service.write_log, StoreWriteLog)
    loaded = await service._load("u1", row.id)
    executor = _executor(agents, service, loaded)
    deadline = asyncio.get_running_loop().time() + 30
    await executor.run(0, "CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)", deadline)
    await executor.run(0, "INSERT INTO t VALUES (1, 'a')", deadline)
    agents.down.add("r1")
    await executor.run(0, "INSERT INTO t VALUES (2, 'b')", deadline)
    await executor.run(0, "UPDATE t SET v = 'A' WHERE k = 1", deadline)
    # a committed transaction, as commit_transaction logs it (committed on the primary,
    # then replayed to the replicas)
    statements = ["INSERT INTO t VALUES (3, 'c')", "DELETE FROM t WHERE k = 2"]
    async with loaded.replication.lock:
        await service._mark_stale(loaded, [0])
        agents.run("p", statements)
        assert await service.write_log.append(row.id, 0, statements, True) == 5
        loaded.replication.pending.clear()
    await service._persist_stale(loaded, loaded.replication)
    assert not await executor.catch_up(0, "r1", deadline)  # still down
    assert await executor.catch_up(0, "r2", deadline)
    assert agents.rows("p") == agents.rows("r2") == [(1, "A"), (3, "c")]
    assert agents.rows("r1") == [(1, "a")]

    # the controller stops: every object in memory goes; another starts on the same store
    del service, loaded, executor
    async with migrated_store(store_url) as reopened:
        restarted = DatabaseService(
            databases=DatabaseRepository(reopened),
            nodes=None,  # type: ignore[arg-type]
            streams=None,  # type: ignore[arg-type]
            vault=None,  # type: ignore[arg-type]
            cache=MemoryCache(),
        )
        loaded = await restarted._load("u1", "db1")
        assert loaded.replication.stale == {0: {"r1"}}
        assert loaded.replication.position(0, "r1") == 2  # it has the table and the first insert
        assert await restarted.write_log.newest("db1", 0) == 5
        agents.down.discard("r1")
        executor = _executor(agents, restarted, loaded)
        assert await executor.catch_up(0, "r1", asyncio.get_running_loop().time() + 30)
        assert agents.rows("r1") == agents.rows("p")
        assert agents.commands[-2:] == ["replay-db1-0-3-r1", "replay-db1-0-4-r1"]
        stored = await DatabaseRepository(reopened).get_for_user("u1", "db1")
        assert stored is not None
        assert stored.replication is not None
        assert (stored.replication["stale"], stored.replication["applied"]) == ({}, {})
        # the next write takes the sequence after the store's newest
        await executor.run(0, "INSERT INTO t VALUES (4, 'd')", asyncio.get_running_loop().time() + 30)
        assert await restarted.write_log.newest("db1", 0) == 6
        assert [w.sequence for w in await restarted.write_log.since("db1", 0, 5)] == [6]


def _executor(agents: Agents, service: DatabaseService, loaded: Any) -> FakeAgentExecutor:
    async def persist(state: ReplicationState) -> None:
        await service._persist_stale(loaded, state)

    on_stale_changed: Callable[[ReplicationState], Awaitable[None]] = persist
    write_log: WriteLog = service.write_log
    return FakeAgentExecutor(
        agents,
        database_id=loaded.row.id,
        replication=loaded.replication,
        on_stale_changed=on_stale_changed,
        write_log=write_log,
    )
