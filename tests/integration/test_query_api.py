"""QueryService end to end: a real controller, real agent processes serving SQLite shards.

Two agents; a database with 2 hash shards, each shard's primary on one agent and its
replica on the other. Covers schema management, routed reads and writes, merged
results, replica fallback when an agent is killed, partial results and errors.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from automator67.v1 import auth_pb2_grpc, node_pb2, node_pb2_grpc, query_pb2, query_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from controller.server import Controller
from tests.support import bearer, controller_settings, register, running_controller

INTERVAL = 0.3


def _reason(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    settings = controller_settings(tmp_path / "controller", heartbeat_interval_seconds=INTERVAL)
    async with running_controller(settings) as running:
        yield running


class Fleet:
    def __init__(self) -> None:
        self.agents: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, controller: Controller, data_dir: Path, token: str | None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("A67_")}
        args = [sys.executable, "-m", "controller.cli", "agent", "--data-dir", str(data_dir), "--region", name,
                "--node-types", "database"]  # fmt: skip
        if token:
            args += ["--controller", controller.address]
            env["A67_AGENT_TOKEN"] = token
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


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    running = Fleet()
    yield running
    running.stop_all()


async def _ready_nodes(stub: node_pb2_grpc.NodeServiceStub, token: str, count: int) -> dict[str, str]:
    for _ in range(600):
        nodes = (await stub.ListNodes(node_pb2.ListNodesRequest(), metadata=bearer(token))).nodes
        ready = [n for n in nodes if n.status in (2, 3)]  # READY, or BUSY on a loaded machine (CPU > 90 %)
        if len(ready) == count:
            return {n.region: n.id for n in ready}
        await asyncio.sleep(0.05)
    raise AssertionError("agents did not become ready")


@pytest.fixture
async def setup(
    controller: Controller, channel: grpc.aio.Channel, fleet: Fleet, tmp_path: Path
) -> tuple[query_pb2_grpc.QueryServiceStub, str, str, dict[str, str]]:
    token = (await register(auth_pb2_grpc.AuthServiceStub(channel))).access_token
    nodes = node_pb2_grpc.NodeServiceStub(channel)
    enrollment = await nodes.CreateEnrollmentToken(
        node_pb2.CreateEnrollmentTokenRequest(max_uses=3), metadata=bearer(token)
    )
    for name in ("a", "b", "c"):
        fleet.start(name, controller, tmp_path / f"agent-{name}", enrollment.token)
    ids = await _ready_nodes(nodes, token, 3)
    stub = query_pb2_grpc.QueryServiceStub(channel)
    created = await stub.CreateDatabase(
        query_pb2.CreateDatabaseRequest(
            name="shop",
            dialect="sqlite",
            sharding=query_pb2.Sharding(
                strategy=query_pb2.SHARDING_STRATEGY_HASH, shard_count=3, sharding_key="customer_id"
            ),
            shards=[
                query_pb2.ShardPlacement(
                    shard_index=0, primary_node_id=ids["a"], replica_node_ids=[ids["b"]]
                ),
                query_pb2.ShardPlacement(
                    shard_index=1, primary_node_id=ids["b"], replica_node_ids=[ids["a"]]
                ),
                query_pb2.ShardPlacement(shard_index=2, primary_node_id=ids["c"]),  # no replica
            ],
            credentials="postgres://user:secret@host/db",
        ),
        metadata=bearer(token),
    )
    db_id = created.database.id
    await stub.ApplySchema(
        query_pb2.ApplySchemaRequest(
            db_id=db_id,
            ddl="CREATE TABLE orders (id INTEGER NOT NULL, customer_id INTEGER NOT NULL, amount REAL, "
            "status TEXT, PRIMARY KEY (customer_id, id))",
        ),
        metadata=bearer(token),
    )
    values = ", ".join(
        f"({i}, {i % 7}, {'NULL' if i % 5 == 0 else i * 1.5}, '{'paid' if i % 2 else 'open'}')"
        for i in range(1, 41)
    )
    inserted = await stub.ExecuteQuery(
        query_pb2.ExecuteQueryRequest(
            db_id=db_id, query=f"INSERT INTO orders (id, customer_id, amount, status) VALUES {values}"
        ),
        metadata=bearer(token),
    )
    assert inserted.rows_returned == 40
    assert inserted.shards_queried == 3
    return stub, token, db_id, ids


async def _query(
    stub: query_pb2_grpc.QueryServiceStub, token: str, db_id: str, sql: str, **kw: object
) -> query_pb2.ExecuteQueryResponse:
    return await stub.ExecuteQuery(
        query_pb2.ExecuteQueryRequest(db_id=db_id, query=sql, **kw), metadata=bearer(token)
    )  # type: ignore[arg-type]


def _rows(response: query_pb2.ExecuteQueryResponse) -> list[list[object]]:
    return [
        [v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for v in row.values]
        for row in response.data
    ]


async def test_schema_reads_writes_and_merged_results(setup: tuple) -> None:
    stub, token, db_id, _ = setup
    database = (
        await stub.GetDatabase(query_pb2.GetDatabaseRequest(db_id=db_id), metadata=bearer(token))
    ).database
    assert [t.name for t in database.tables] == ["orders"]
    assert [c.name for c in database.tables[0].columns] == ["id", "customer_id", "amount", "status"]

    count = await _query(
        stub, token, db_id, "SELECT count(*), count(amount), sum(amount), avg(amount) FROM orders"
    )
    assert count.shards_queried == 3
    assert _rows(count) == [
        [
            40,
            32,
            pytest.approx(sum(i * 1.5 for i in range(1, 41) if i % 5)),
            pytest.approx(sum(i * 1.5 for i in range(1, 41) if i % 5) / 32),
        ]
    ]

    grouped = await _query(
        stub, token, db_id,
        "SELECT status, count(*) AS n FROM orders GROUP BY status HAVING count(*) > 1 ORDER BY status LIMIT 5",
    )  # fmt: skip
    assert _rows(grouped) == [["open", 20], ["paid", 20]]
    assert [c.name for c in grouped.columns] == ["status", "n"]

    point = await _query(stub, token, db_id, "SELECT id FROM orders WHERE customer_id = 3 ORDER BY id")
    assert point.shards_queried == 1
    assert _rows(point) == [[i] for i in range(1, 41) if i % 7 == 3]

    page = await _query(stub, token, db_id, "SELECT id FROM orders ORDER BY id DESC LIMIT 3 OFFSET 2")
    assert _rows(page) == [[38], [37], [36]]

    updated = await _query(stub, token, db_id, "UPDATE orders SET status = 'void' WHERE customer_id = 3")
    assert updated.rows_returned == len([i for i in range(1, 41) if i % 7 == 3])
    voids = await _query(stub, token, db_id, "SELECT count(*) FROM orders WHERE status = 'void'")
    assert _rows(voids) == [[updated.rows_returned]]


async def test_errors(setup: tuple, channel: grpc.aio.Channel) -> None:
    stub, token, db_id, _ = setup
    cases = [
        ("SELEC id FROM orders", grpc.StatusCode.INVALID_ARGUMENT),
        ("SELECT * FROM missing_table", grpc.StatusCode.NOT_FOUND),
        ("SELECT id, row_number() OVER (ORDER BY id) FROM orders", grpc.StatusCode.FAILED_PRECONDITION),
        ("INSERT INTO orders (id, customer_id) VALUES (1, 1)", grpc.StatusCode.FAILED_PRECONDITION),
    ]
    for sql, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _query(stub, token, db_id, sql)
        assert info.value.code() == code, (sql, info.value.details())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _query(stub, token, db_id, "SELEC id FROM orders")
    assert "line 1" in (info.value.details() or "").lower() or "col" in (info.value.details() or "").lower()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _query(stub, token, db_id, "INSERT INTO orders (id, customer_id) VALUES (1, 1)")
    assert "shard" in (info.value.details() or "")

    other = (await register(auth_pb2_grpc.AuthServiceStub(channel), email="eve@example.com")).access_token
    for target in (db_id, "00000000-0000-0000-0000-000000000000"):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _query(stub, other, target, "SELECT 1")
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert _reason(info.value) == "DATABASE_NOT_ACCESSIBLE"
    listed = await stub.ListDatabases(query_pb2.ListDatabasesRequest(), metadata=bearer(token))
    assert [d.name for d in listed.databases] == ["shop"]
    assert "secret" not in str(listed)


async def test_replica_fallback_and_catch_up(
    setup: tuple, fleet: Fleet, controller: Controller, channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    stub, token, db_id, ids = setup
    before = await _query(stub, token, db_id, "SELECT count(*) FROM orders")
    assert {s.shard_index: s.node_id for s in before.shard_statuses} == {
        0: ids["a"],
        1: ids["b"],
        2: ids["c"],
    }
    fleet.kill("a")  # primary of shard 0, replica of shard 1
    total = await _query(stub, token, db_id, "SELECT count(*) FROM orders")
    assert _rows(total) == [[40]]  # shard 0 answered from its replica on b
    answered = {s.shard_index: s.node_id for s in total.shard_statuses}
    assert answered == {0: ids["b"], 1: ids["b"], 2: ids["c"]}  # the node that answered, not the primary

    # Writes while a is down: shard 0's primary is a, and writes do not fail over;
    # shard 1's take them on b, and a's copy of shard 1 is now stale.
    outcomes = []
    for customer in range(7):
        sql = f"INSERT INTO orders (id, customer_id) VALUES ({100 + customer}, {customer})"
        try:
            await _query(stub, token, db_id, sql)
            outcomes.append(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as err:
            outcomes.append(err.code())
    written = outcomes.count(grpc.StatusCode.OK)
    assert grpc.StatusCode.UNAVAILABLE in outcomes
    assert written

    # a comes back; b dies: shard 1 is read from a, which first replays what it missed.
    fleet.start("a", controller, tmp_path / "agent-a", None)
    await _ready_nodes(node_pb2_grpc.NodeServiceStub(channel), token, 3)
    fleet.kill("b")
    total = await _query(stub, token, db_id, "SELECT count(*) FROM orders")
    assert _rows(total) == [[40 + written]]


async def test_partial_results_and_every_shard_down(setup: tuple, fleet: Fleet) -> None:
    stub, token, db_id, _ = setup
    fleet.kill("c")  # shard 2 has no replica
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _query(stub, token, db_id, "SELECT count(*) FROM orders", timeout_ms=3000)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shard 2" in (info.value.details() or "")
    partial = await _query(
        stub, token, db_id, "SELECT id FROM orders ORDER BY id", timeout_ms=3000, allow_partial_results=True
    )
    assert partial.partial
    statuses = {s.shard_index: s.status for s in partial.shard_statuses}
    assert statuses[0] == "ok"
    assert statuses[1] == "ok"
    assert statuses[2] != "ok"
    ids = [row[0] for row in _rows(partial)]
    assert ids == sorted(ids)
    assert 0 < len(ids) < 40

    fleet.kill("a")
    fleet.kill("b")
    for allow_partial in (False, True):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _query(
                stub,
                token,
                db_id,
                "SELECT count(*) FROM orders",
                timeout_ms=3000,
                allow_partial_results=allow_partial,
            )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_primary_killed_mid_query_falls_back_to_its_replica(setup: tuple, fleet: Fleet) -> None:
    stub, token, db_id, ids = setup
    names = {node_id: name for name, node_id in ids.items()}
    # A customer on a shard that has a replica (shards 0 and 1), and its primary agent.
    for customer in range(7):
        probe = await _query(
            stub, token, db_id, f"SELECT count(*) FROM orders WHERE customer_id = {customer}"
        )
        (status,) = probe.shard_statuses
        if status.shard_index in (0, 1):
            break
    primary = names[status.node_id]
    bulk = range(1000, 4000)
    rows = ", ".join(f"({i}, {customer}, {i}, 'bulk')" for i in bulk)
    await _query(stub, token, db_id, f"INSERT INTO orders (id, customer_id, amount, status) VALUES {rows}")
    ids = [*bulk, *(i for i in range(1, 41) if i % 7 == customer)]
    expected = sum(1 for x in ids for y in ids if (x * y) % 7 == 3)
    # About nine million row pairs on one shard: long enough to kill its primary meanwhile.
    slow = (
        "SELECT count(*) FROM orders a JOIN orders b ON a.customer_id = b.customer_id "
        f"WHERE a.customer_id = {customer} AND (a.id * b.id) % 7 = 3"
    )
    agent = psutil.Process(fleet.agents[primary].pid)
    before = sum(agent.cpu_times()[:2])
    running = asyncio.ensure_future(_query(stub, token, db_id, slow))
    # Kill the primary once it is busy with the join (its CPU time grows), not after a fixed delay.
    for _ in range(2000):
        if running.done() or sum(agent.cpu_times()[:2]) - before > 0.3:
            break
        await asyncio.sleep(0.01)
    assert not running.done(), "the query should still be running on the primary"
    fleet.kill(primary)
    answer = await running
    assert _rows(answer) == [[expected]]
    assert answer.shards_queried == 1
