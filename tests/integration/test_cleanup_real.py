"""Deleting a deployment or a database cleans up on REAL agent processes.

1. A deployment's replica directories are gone from its agents once DeleteDeployment returns.
2. A database's SQLite shard files are gone from every agent that held a shard (primaries
   and replicas) — at once on the connected ones, and on an agent that was stopped during
   the delete as soon as it is back — while another database on the same agents stays.
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
from automator67.v1 import auth_pb2_grpc, deployment_pb2, node_pb2, node_pb2_grpc, query_pb2, query_pb2_grpc

from controller.server import Controller
from tests.integration.test_deployments_real import (
    SCHEDULABLE,
    Client,
    _environ,
    _free_port,
    _until,
    app_manifest,
    app_source,
    processes,
)
from tests.support import bearer, controller_settings, register, running_controller

INTERVAL = 0.3


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    settings = controller_settings(tmp_path / "controller", heartbeat_interval_seconds=INTERVAL)
    async with running_controller(settings) as running:
        yield running


# --------------------------------------------------------------------------- deployments


async def test_deleting_a_deployment_removes_its_replica_directories(
    tmp_path: Path, controller: Controller, channel: grpc.aio.Channel
) -> None:
    token = (await register(auth_pb2_grpc.AuthServiceStub(channel))).access_token
    client = Client(channel, token)
    with processes(tmp_path) as procs:
        enrollment = await client.enrollment(2)
        for i, region in enumerate(("eu-west", "us-east")):
            base = 21000 + 200 * i + (_free_port() % 100)
            procs.agent(controller.address, enrollment, region, (base, base + 50))
        await client.wait_ready(2)
        created = await client.deployments.CreateDeployment(
            deployment_pb2.CreateDeploymentRequest(manifest=app_manifest(2), source_tar_gz=app_source("v1")),
            metadata=bearer(token),
        )
        deployment_id = created.deployment_id
        await client.wait_answering(deployment_id, 2, "v1", within=60)
        directories = {
            Path(env["A67_REPLICA_DIR"])
            for p in psutil.process_iter()
            if (env := _environ(p)).get("A67_DEPLOYMENT_ID") == deployment_id
        }
        assert len(directories) == 2
        assert all((d / "app" / "app.py").exists() or d.exists() for d in directories)
        deployment_dirs = {d.parent for d in directories}
        assert all(d.name == deployment_id for d in deployment_dirs)

        await client.deployments.DeleteDeployment(
            deployment_pb2.DeleteDeploymentRequest(deployment_id=deployment_id), metadata=bearer(token)
        )
        left = [str(d) for d in directories | deployment_dirs if d.exists()]
        assert not left, f"still on disk after the delete: {left}"


# --------------------------------------------------------------------------- databases


@pytest.fixture
def agents() -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    running: dict[str, subprocess.Popen[bytes]] = {}
    yield running
    for agent in running.values():
        _stop(agent)


def _stop(agent: subprocess.Popen[bytes]) -> None:
    if agent.poll() is None:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


def _start_agent(name: str, data_dir: Path, address: str, token: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("A67_")}
    env.update(A67_AGENT_TOKEN=token)
    args = [sys.executable, "-m", "controller.cli", "agent", "--data-dir", str(data_dir), "--region", name,
            "--node-types", "database", "--controller", address]  # fmt: skip
    log = open(data_dir.parent / f"agent-{name}.log", "ab")  # noqa: SIM115 - the child keeps it
    try:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    finally:
        log.close()


async def _ready_nodes(nodes: node_pb2_grpc.NodeServiceStub, token: str) -> dict[str, str]:
    listed = (await nodes.ListNodes(node_pb2.ListNodesRequest(), metadata=bearer(token))).nodes
    return {n.region: n.id for n in listed if n.status in SCHEDULABLE}  # ready, or busy (a loaded machine)


async def test_deleting_a_database_drops_its_sqlite_shards_on_every_agent_even_one_that_was_away(
    tmp_path: Path,
    controller: Controller,
    channel: grpc.aio.Channel,
    agents: dict[str, subprocess.Popen[bytes]],
) -> None:
    token = (await register(auth_pb2_grpc.AuthServiceStub(channel))).access_token
    nodes = node_pb2_grpc.NodeServiceStub(channel)
    stub = query_pb2_grpc.QueryServiceStub(channel)
    enrollment = (
        await nodes.CreateEnrollmentToken(
            node_pb2.CreateEnrollmentTokenRequest(max_uses=3), metadata=bearer(token)
        )
    ).token
    names = ("a", "b", "c")
    data = {name: tmp_path / "agents" / name for name in names}
    for name in names:
        data[name].mkdir(parents=True)
        agents[name] = _start_agent(name, data[name], controller.address, enrollment)
    ready: dict[str, str] = {}

    async def all_ready() -> bool:
        ready.update(await _ready_nodes(nodes, token))
        return set(ready) == set(names)

    await _until(all_ready, "three ready agents", within=30)

    async def database(name: str, placements: list[query_pb2.ShardPlacement]) -> str:
        created = await stub.CreateDatabase(
            query_pb2.CreateDatabaseRequest(
                name=name,
                sharding=query_pb2.Sharding(
                    strategy=query_pb2.SHARDING_STRATEGY_HASH, shard_count=len(placements), sharding_key="k"
                ),
                shards=placements,
            ),
            metadata=bearer(token),
        )
        db_id = created.database.id
        await stub.ApplySchema(
            query_pb2.ApplySchemaRequest(
                db_id=db_id, ddl="CREATE TABLE t (k INTEGER PRIMARY KEY, note TEXT)"
            ),
            metadata=bearer(token),
        )
        await stub.ExecuteQuery(
            query_pb2.ExecuteQueryRequest(
                db_id=db_id, query="INSERT INTO t (k, note) VALUES (1, 'x'), (2, 'y')"
            ),
            metadata=bearer(token),
        )
        return db_id

    gone = await database(
        "gone",
        [
            query_pb2.ShardPlacement(
                shard_index=0, primary_node_id=ready["a"], replica_node_ids=[ready["b"]]
            ),
            query_pb2.ShardPlacement(
                shard_index=1, primary_node_id=ready["b"], replica_node_ids=[ready["c"]]
            ),
        ],
    )
    kept = await database("kept", [query_pb2.ShardPlacement(shard_index=0, primary_node_id=ready["a"])])

    def shard_dir(name: str, db_id: str) -> Path:
        return data[name] / "shards" / db_id

    async def files_everywhere() -> bool:
        return all(any(shard_dir(n, gone).glob("*.sqlite3")) for n in names)

    await _until(files_everywhere, "the shard files on a, b and c")
    assert any(shard_dir("a", kept).glob("*.sqlite3"))

    # c goes away; the database is deleted meanwhile.
    _stop(agents["c"])
    await _until(lambda: _not_ready(nodes, token, "c"), "c not ready")
    await stub.DeleteDatabase(query_pb2.DeleteDatabaseRequest(db_id=gone), metadata=bearer(token))
    assert not shard_dir("a", gone).exists()
    assert not shard_dir("b", gone).exists()
    assert any(shard_dir("c", gone).glob("*.sqlite3"))  # c was away

    # c comes back: the controller's retry drops its copy.
    agents["c"] = _start_agent("c", data["c"], controller.address, enrollment)
    await _until(lambda: _async(not shard_dir("c", gone).exists()), "c dropped its shard files", within=30)

    # The other database on the same agents is untouched.
    assert any(shard_dir("a", kept).glob("*.sqlite3"))
    rows = await stub.ExecuteQuery(
        query_pb2.ExecuteQueryRequest(db_id=kept, query="SELECT count(*) AS n FROM t"), metadata=bearer(token)
    )
    assert rows.data[0].values[0].number_value == 2


async def _not_ready(nodes: node_pb2_grpc.NodeServiceStub, token: str, region: str) -> bool:
    return region not in await _ready_nodes(nodes, token)


async def _async(value: bool) -> bool:
    await asyncio.sleep(0)
    return value
