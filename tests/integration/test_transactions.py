"""Transactions end to end: a real controller, real agent processes, SQLite or PostgreSQL shards.

A database ``bank`` of two range shards — ids [0, 100) on shard 0 (agent a), [100, 200)
on shard 1 (agent b) — holds ``acct (id, balance)``. Covers single-shard transactions,
the refusals, two-phase commit, recovery from a controller crash at every step of a
commit (the crash is a test hook that stops the commit there; a fresh
TransactionManager over the same store then recovers, as a restarted controller would),
an agent killed with SIGKILL while prepared, idle timeouts on an injected clock, and the
isolation a reader of two shards gets mid-commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from automator67.v1 import auth_pb2_grpc, node_pb2, node_pb2_grpc, query_pb2, query_pb2_grpc
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from controller.config import Settings
from controller.errors import NotFound
from controller.federation.results import ShardResults
from controller.federation.transactions import CrashPoint, TransactionLog, TransactionManager
from controller.limits import CONTROL_MESSAGE_MAX_BYTES
from controller.server import Controller
from controller.store.models import DatabaseTransaction
from tests.conftest import require_prepared_transactions
from tests.support import bearer, controller_settings, register, running_controller

# The ingress xDS port (default 127.0.0.1:50053) is of no use here and may be taken.
NO_XDS = {"xds_listen_address": ""} if "xds_listen_address" in Settings.__dataclass_fields__ else {}

INTERVAL = 0.3
A, B = 1, 101  # an account on shard 0 and one on shard 1


def reason_of(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


class Fleet:
    def __init__(self, postgres_url: str = "") -> None:
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.args: dict[str, tuple[list[str], dict[str, str]]] = {}
        self.postgres_url = postgres_url

    def start(self, name: str, address: str, data_dir: Path, token: str | None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("A67_")}
        args = [sys.executable, "-m", "controller.cli", "agent", "--data-dir", str(data_dir), "--region", name,
                "--node-types", "database", "--controller", address]  # fmt: skip
        if token:
            env["A67_AGENT_TOKEN"] = token
        if self.postgres_url:
            env["A67_SHARD_POSTGRES_URL"] = self.postgres_url
        self.args[name] = (args, env)
        self.agents[name] = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )

    def restart(self, name: str) -> None:
        args, env = self.args[name]
        env = {k: v for k, v in env.items() if k != "A67_AGENT_TOKEN"}  # enrolled already
        self.agents[name] = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
        )

    def kill(self, name: str) -> None:
        agent = self.agents[name]
        agent.send_signal(signal.SIGKILL)
        agent.wait()

    def stop_all(self) -> None:
        for agent in self.agents.values():
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
                try:
                    agent.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    agent.kill()
                    agent.wait()


async def ready_nodes(stub: node_pb2_grpc.NodeServiceStub, token: str, count: int) -> dict[str, str]:
    for _ in range(600):
        nodes = (await stub.ListNodes(node_pb2.ListNodesRequest(), metadata=bearer(token))).nodes
        ready = [n for n in nodes if n.status in (2, 3)]  # READY, or BUSY on a loaded machine (CPU > 90 %)
        if len(ready) == count:
            return {n.region: n.id for n in ready}
        await asyncio.sleep(0.05)
    raise AssertionError("agents did not become ready")


@dataclass
class Bank:
    controller: Controller
    stub: query_pb2_grpc.QueryServiceStub
    token: str
    db_id: str
    fleet: Fleet
    ids: dict[str, str]
    channel: grpc.aio.Channel
    user_id: str

    async def query(self, sql: str, txid: str = "") -> query_pb2.ExecuteQueryResponse:
        return await self.stub.ExecuteQuery(
            query_pb2.ExecuteQueryRequest(db_id=self.db_id, query=sql, transaction_id=txid),
            metadata=bearer(self.token),
        )

    async def balances(self) -> dict[int, int]:
        response = await self.query("SELECT id, balance FROM acct ORDER BY id")
        return {int(r.values[0].number_value): int(r.values[1].number_value) for r in response.data}

    async def begin(self, distributed: bool = False, **kw: int) -> str:
        response = await self.stub.BeginTransaction(
            query_pb2.BeginTransactionRequest(db_id=self.db_id, distributed=distributed, **kw),
            metadata=bearer(self.token),
        )
        return response.transaction.id

    async def commit(self, txid: str) -> query_pb2.Transaction:
        response = await self.stub.CommitTransaction(
            query_pb2.CommitTransactionRequest(db_id=self.db_id, transaction_id=txid),
            metadata=bearer(self.token),
        )
        return response.transaction

    async def rollback(self, txid: str) -> query_pb2.Transaction:
        response = await self.stub.RollbackTransaction(
            query_pb2.RollbackTransactionRequest(db_id=self.db_id, transaction_id=txid),
            metadata=bearer(self.token),
        )
        return response.transaction

    @property
    def results(self) -> ShardResults:
        assert self.controller.shard_results is not None
        return self.controller.shard_results

    async def row(self, txid: str) -> DatabaseTransaction | None:
        return await TransactionLog(self.controller.store).get(txid)


async def wait_for(condition, what: str, attempts: int = 600) -> None:  # type: ignore[no-untyped-def]
    for _ in range(attempts):
        if await condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def value(v: int) -> struct_pb2.Value:
    return struct_pb2.Value(number_value=v)


@contextlib.asynccontextmanager
async def make_bank(
    tmp_path: Path, postgres_url: str = "", *, replicas: bool = False, **overrides: object
) -> AsyncIterator[Bank]:
    """Agents a and b hold shards 0 and 1; with ``replicas``, agent c holds a replica of each.
    ``overrides`` are settings of the controller."""
    settings = controller_settings(
        tmp_path / "controller", heartbeat_interval_seconds=INTERVAL, **NO_XDS, **overrides
    )
    fleet = Fleet(postgres_url)
    names = ("a", "b", "c") if replicas else ("a", "b")
    try:
        async with (
            running_controller(settings) as controller,
            grpc.aio.insecure_channel(controller.address) as channel,
        ):
            registered = await register(auth_pb2_grpc.AuthServiceStub(channel))
            token = registered.access_token
            nodes = node_pb2_grpc.NodeServiceStub(channel)
            enrollment = await nodes.CreateEnrollmentToken(
                node_pb2.CreateEnrollmentTokenRequest(max_uses=len(names)), metadata=bearer(token)
            )
            for name in names:
                fleet.start(name, controller.address, tmp_path / f"agent-{name}", enrollment.token)
            ids = await ready_nodes(nodes, token, len(names))
            stub = query_pb2_grpc.QueryServiceStub(channel)
            copies = [ids["c"]] if replicas else []
            created = await stub.CreateDatabase(
                query_pb2.CreateDatabaseRequest(
                    name="bank",
                    dialect="postgres" if postgres_url else "sqlite",
                    sharding=query_pb2.Sharding(
                        strategy=query_pb2.SHARDING_STRATEGY_RANGE,
                        shard_count=2,
                        sharding_key="id",
                        ranges=[
                            query_pb2.ShardRange(upper=value(100), shard_index=0),
                            query_pb2.ShardRange(lower=value(100), shard_index=1),
                        ],
                    ),
                    shards=[
                        query_pb2.ShardPlacement(
                            shard_index=0, primary_node_id=ids["a"], replica_node_ids=copies
                        ),
                        query_pb2.ShardPlacement(
                            shard_index=1, primary_node_id=ids["b"], replica_node_ids=copies
                        ),
                    ],
                ),
                metadata=bearer(token),
            )
            bank = Bank(controller, stub, token, created.database.id, fleet, ids, channel, registered.user_id)
            await stub.ApplySchema(
                query_pb2.ApplySchemaRequest(
                    db_id=bank.db_id,
                    ddl="CREATE TABLE acct (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)",
                ),
                metadata=bearer(token),
            )
            await bank.query(
                f"INSERT INTO acct (id, balance) VALUES ({A}, 100), (2, 100), ({B}, 100), (102, 100)"
            )
            yield bank
    finally:
        fleet.stop_all()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def bank(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Bank]:
    postgres_url = ""
    if request.param == "postgres":
        databases = request.getfixturevalue("postgres_databases")
        postgres_url = databases.create().replace("postgresql+psycopg://", "postgresql://")
        require_prepared_transactions(postgres_url)
    async with make_bank(tmp_path, postgres_url) as made:
        yield made


async def test_single_shard_transaction_commit_rollback_and_refusals(bank: Bank) -> None:
    txid = await bank.begin()
    await bank.query(f"UPDATE acct SET balance = balance - 10 WHERE id = {A}", txid)
    inside = await bank.query(f"SELECT balance FROM acct WHERE id = {A}", txid)
    assert inside.data[0].values[0].number_value == 90  # the transaction reads its own write
    assert (await bank.balances())[A] == 100  # nobody else sees it yet

    with pytest.raises(grpc.aio.AioRpcError) as info:  # a second shard, not distributed
        await bank.query(f"UPDATE acct SET balance = balance + 10 WHERE id = {B}", txid)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(info.value) == "TRANSACTION_SPANS_SHARDS"
    assert "shard(s) 1" in (info.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await bank.query("CREATE TABLE other (id INTEGER PRIMARY KEY)", txid)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as info:  # transaction control in SQL text stays refused
        await bank.query("COMMIT")
    assert reason_of(info.value) == "TRANSACTION_CONTROL_UNSUPPORTED"

    committed = await bank.commit(txid)  # the refusals left the transaction usable
    assert committed.state == "committed"
    assert list(committed.participants) == [0]
    assert (await bank.balances())[A] == 90
    row = await bank.row(txid)
    assert row is not None
    assert row.state == "committed"
    assert row.resolved_at is not None

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await bank.commit(txid)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(info.value) == "TRANSACTION_COMMITTED"

    txid = await bank.begin()
    await bank.query(f"UPDATE acct SET balance = 0 WHERE id = {A}", txid)
    assert (await bank.rollback(txid)).state == "aborted"
    assert (await bank.balances())[A] == 90
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await bank.query(f"SELECT 1 FROM acct WHERE id = {A}", txid)
    assert info.value.code() == grpc.StatusCode.ABORTED


async def test_another_users_transaction_looks_missing(bank: Bank) -> None:
    txid = await bank.begin()
    other = (await register(auth_pb2_grpc.AuthServiceStub(bank.channel), "eve@example.com")).access_token
    with pytest.raises(grpc.aio.AioRpcError) as info:  # her request on the owner's database
        await bank.stub.CommitTransaction(
            query_pb2.CommitTransactionRequest(db_id=bank.db_id, transaction_id=txid), metadata=bearer(other)
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    for txn in (txid, "00000000-0000-0000-0000-000000000000", "nonsense"):
        with pytest.raises(grpc.aio.AioRpcError) as info:  # the owner's database, a foreign or missing id
            await bank.stub.ExecuteQuery(
                query_pb2.ExecuteQueryRequest(
                    db_id=bank.db_id, query="SELECT 1 FROM acct", transaction_id=txn
                ),
                metadata=bearer(other),
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # the owner asking for a transaction that does not exist, or for one of another database
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await bank.commit("00000000-0000-0000-0000-000000000000")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert reason_of(info.value) == "TRANSACTION_NOT_FOUND"
    manager = bank.controller.transactions
    assert manager is not None
    for user, database in ((bank.user_id, "another-database"), ("another-user", bank.db_id)):
        with pytest.raises(NotFound) as caught:
            await manager.get(user, database, txid)
        assert caught.value.reason == "TRANSACTION_NOT_FOUND"
    await bank.rollback(txid)


async def test_distributed_transfer_commits_on_both_shards(bank: Bank) -> None:
    txid = await bank.begin(distributed=True)
    await bank.query(f"UPDATE acct SET balance = balance - 25 WHERE id = {A}", txid)
    await bank.query(f"UPDATE acct SET balance = balance + 25 WHERE id = {B}", txid)
    total = await bank.query("SELECT sum(balance) FROM acct", txid)  # both shards, inside the transaction
    assert total.data[0].values[0].number_value == 400
    committed = await bank.commit(txid)
    assert committed.state == "committed"
    assert list(committed.participants) == [0, 1]
    balances = await bank.balances()
    assert (balances[A], balances[B]) == (75, 125)
    row = await bank.row(txid)
    assert row is not None
    assert row.state == "committed"
    assert row.resolved_at is not None
    assert sorted(p["shard"] for p in row.participants) == [0, 1]


async def test_a_statement_error_rolls_the_transaction_back(bank: Bank) -> None:
    txid = await bank.begin(distributed=True)
    await bank.query(f"UPDATE acct SET balance = balance - 25 WHERE id = {A}", txid)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await bank.query(f"INSERT INTO acct (id, balance) VALUES ({B}, 1)", txid)  # duplicate key on shard 1
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "rolled back" in (info.value.details() or "")
    assert (await bank.balances())[A] == 100
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await bank.commit(txid)
    assert info.value.code() == grpc.StatusCode.ABORTED


STEPS = [
    ("preparing", 100, 100),  # crash before any prepare: rolled back
    ("prepared:0", 100, 100),  # after some prepares: rolled back (presumed abort)
    ("prepared:1", 100, 100),  # after every prepare, before the decision: rolled back
    ("decided", 75, 125),  # after the decision: committed
    ("committed:0", 75, 125),  # after some commits: committed
]


@pytest.mark.parametrize(("step", "balance_a", "balance_b"), STEPS)
async def test_controller_crash_at_each_step_is_recovered(
    bank: Bank, step: str, balance_a: int, balance_b: int
) -> None:
    manager = bank.controller.transactions
    assert manager is not None
    await manager.stop()  # recovery runs below, from a "restarted" controller

    async def crash_at(where: str) -> None:
        if where == step:
            raise CrashPoint(where)

    manager.step_hook = crash_at
    txid = await bank.begin(distributed=True)
    await bank.query(f"UPDATE acct SET balance = balance - 25 WHERE id = {A}", txid)
    await bank.query(f"UPDATE acct SET balance = balance + 25 WHERE id = {B}", txid)
    with pytest.raises(grpc.aio.AioRpcError):
        await bank.commit(txid)
    manager.step_hook = None
    row = await bank.row(txid)
    assert row is not None
    assert row.resolved_at is None  # in doubt

    restarted = TransactionManager(
        log_store=TransactionLog(bank.controller.store),
        streams=bank.controller.fleet.streams,
        results=bank.results,
    )
    assert await restarted.recover() == 1
    row = await bank.row(txid)
    assert row is not None
    assert row.resolved_at is not None
    assert row.state == ("committed" if balance_a == 75 else "aborted")
    balances = await bank.balances()
    assert (balances[A], balances[B]) == (balance_a, balance_b)
    # neither shard is left held: a new transaction on both commits
    txid = await bank.begin(distributed=True)
    await bank.query(f"UPDATE acct SET balance = balance + 1 WHERE id IN ({A}, {B})", txid)
    await bank.commit(txid)
    balances = await bank.balances()
    assert (balances[A], balances[B]) == (balance_a + 1, balance_b + 1)


async def test_agent_killed_while_prepared_commits_after_restart(bank: Bank, tmp_path: Path) -> None:
    manager = bank.controller.transactions
    assert manager is not None

    async def kill_b(where: str) -> None:
        if where == "decided":  # both prepared, the decision durable: agent b dies before its commit
            bank.fleet.kill("b")

    manager.step_hook = kill_b
    txid = await bank.begin(distributed=True)
    await bank.query(f"UPDATE acct SET balance = balance - 25 WHERE id = {A}", txid)
    await bank.query(f"UPDATE acct SET balance = balance + 25 WHERE id = {B}", txid)
    committed = await bank.commit(txid)  # the decision is durable: committed, shard 1 follows later
    assert committed.state == "committed"
    manager.step_hook = None
    row = await bank.row(txid)
    assert row is not None
    assert row.state == "committed"
    assert row.resolved_at is None

    bank.fleet.restart("b")

    async def resolved() -> bool:
        row = await bank.row(txid)
        return row is not None and row.resolved_at is not None

    await wait_for(resolved, "the recovery loop to commit shard 1 on the restarted agent")
    balances = await bank.balances()
    assert (balances[A], balances[B]) == (75, 125)


async def test_a_transactions_rows_take_the_data_path_past_the_control_bound(bank: Bank) -> None:
    """A statement in a transaction may return more than one control message holds (256 KiB):
    its rows come over PushShardResult like any other statement's."""
    await bank.stub.ApplySchema(
        query_pb2.ApplySchemaRequest(
            db_id=bank.db_id, ddl="CREATE TABLE blobs (id INTEGER PRIMARY KEY, body TEXT)"
        ),
        metadata=bearer(bank.token),
    )
    body = "x" * 16_000
    values = ", ".join(f"({i}, '{body}{i}')" for i in range(40))  # shard 0: 640 KB of rows
    await bank.query(f"INSERT INTO blobs (id, body) VALUES {values}")
    txid = await bank.begin()
    await bank.query("UPDATE blobs SET body = 'changed' WHERE id = 7", txid)
    inside = await bank.query("SELECT id, body FROM blobs WHERE id < 100 ORDER BY id", txid)
    assert len(inside.data) == 40
    assert sum(len(r.values[1].string_value) for r in inside.data) > CONTROL_MESSAGE_MAX_BYTES
    assert inside.data[7].values[1].string_value == "changed"  # its own write, on its held connection
    assert inside.data[8].values[1].string_value == f"{body}8"
    await bank.rollback(txid)
    after = await bank.query("SELECT body FROM blobs WHERE id = 7")
    assert after.data[0].values[0].string_value == f"{body}7"


async def test_commit_after_the_shard_lost_the_transaction_is_an_abort(bank: Bank) -> None:
    """A one-phase commit that the shard answers "unknown" was rolled back there (the agent
    restarted, or its stream was replaced): the client must hear ABORTED, never success."""
    txid = await bank.begin()
    await bank.query(f"UPDATE acct SET balance = 0 WHERE id = {A}", txid)
    bank.fleet.kill("a")
    bank.fleet.restart("a")
    nodes = node_pb2_grpc.NodeServiceStub(bank.channel)

    async def back() -> bool:
        listed = (await nodes.ListNodes(node_pb2.ListNodesRequest(), metadata=bearer(bank.token))).nodes
        return any(n.id == bank.ids["a"] and n.status in (2, 3) for n in listed)  # READY or BUSY

    await wait_for(back, "agent a to be connected and ready again")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await bank.commit(txid)
    assert info.value.code() == grpc.StatusCode.ABORTED
    assert reason_of(info.value) == "TRANSACTION_ABORTED"
    assert "rolled back" in (info.value.details() or "")
    assert (await bank.balances())[A] == 100
    row = await bank.row(txid)
    assert row is not None
    assert row.state == "aborted"


async def test_idle_transaction_times_out_and_rolls_back(bank: Bank) -> None:
    now = [0.0]
    manager = TransactionManager(
        log_store=TransactionLog(bank.controller.store),
        streams=bank.controller.fleet.streams,
        clock=lambda: now[0],
        results=bank.results,
    )
    # run the transaction through a manager on an injected clock
    txn = await manager.begin(bank.user_id, bank.db_id, distributed=False, idle_timeout_ms=5000, timeout_ms=0)
    executor = manager.executor(txn, 5.0)
    await manager.enlist(txn, {0: bank.ids["a"]})
    await executor.run(
        0, f"UPDATE acct SET balance = 0 WHERE id = {A}", asyncio.get_running_loop().time() + 5
    )
    now[0] = 4.9
    assert await manager.reap() == 0
    now[0] = 5.1
    assert await manager.reap() == 1
    assert txn.state == "aborted"
    assert (await bank.balances())[A] == 100
    # the shard is free: a transaction through the API commits at once
    txid = await bank.begin()
    await bank.query(f"UPDATE acct SET balance = 1 WHERE id = {A}", txid)
    await bank.commit(txid)
    assert (await bank.balances())[A] == 1


async def test_a_reader_of_two_shards_may_see_a_commit_half_applied(bank: Bank) -> None:
    """Isolation across shards is per shard (read committed): no snapshot spans shards."""
    manager = bank.controller.transactions
    assert manager is not None
    paused, release = asyncio.Event(), asyncio.Event()

    async def pause(where: str) -> None:
        if where == "committed:0":
            paused.set()
            await release.wait()

    manager.step_hook = pause
    txid = await bank.begin(distributed=True)
    await bank.query(f"UPDATE acct SET balance = balance - 25 WHERE id = {A}", txid)
    await bank.query(f"UPDATE acct SET balance = balance + 25 WHERE id = {B}", txid)
    commit = asyncio.create_task(bank.commit(txid))
    await asyncio.wait_for(paused.wait(), 30)
    mid = await bank.balances()  # shard 0 committed, shard 1 still prepared
    assert (mid[A], mid[B]) == (75, 100)
    assert sum(mid.values()) == 400 - 25
    release.set()
    assert (await commit).state == "committed"
    manager.step_hook = None
    after = await bank.balances()
    assert (after[A], after[B]) == (75, 125)
    assert sum(after.values()) == 400


async def test_replicas_follow_the_committed_state_only(tmp_path: Path) -> None:
    """Agent c holds a replica of both shards: it gets a transaction's writes once committed, whole."""
    async with make_bank(tmp_path, replicas=True) as bank:

        def on_replica(account: int) -> int:
            shard = 0 if account < 100 else 1
            path = tmp_path / "agent-c" / "shards" / bank.db_id / f"{shard}.sqlite3"
            with contextlib.closing(sqlite3.connect(path)) as conn:
                row = conn.execute("SELECT balance FROM acct WHERE id = ?", (account,)).fetchone()
            return int(row[0])

        assert (on_replica(A), on_replica(B)) == (100, 100)
        txid = await bank.begin(distributed=True)
        await bank.query(f"UPDATE acct SET balance = balance - 25 WHERE id = {A}", txid)
        await bank.query(f"UPDATE acct SET balance = balance + 25 WHERE id = {B}", txid)
        assert (on_replica(A), on_replica(B)) == (100, 100)  # nothing before the commit
        await bank.commit(txid)
        assert (on_replica(A), on_replica(B)) == (75, 125)  # replayed, as a transaction, on commit
        rolled = await bank.begin(distributed=True)
        await bank.query(f"UPDATE acct SET balance = 0 WHERE id IN ({A}, {B})", rolled)
        await bank.rollback(rolled)
        assert (on_replica(A), on_replica(B)) == (75, 125)  # a rollback never reaches a replica
        bank.fleet.kill("a")  # reads of shard 0 now come from the replica
        balances = await bank.balances()
        assert (balances[A], balances[B]) == (75, 125)
