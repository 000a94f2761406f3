"""Placement is fed complete data (issue 11): node types, stream RTT and reliability.

A real controller on a free port with hand-driven fake nodes on mutual-TLS streams
(the World of test_deployments.py); these nodes also announce their node types in
the hello and report the RTT they measured in their heartbeats, as the agent does.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from automator67.v1 import common_pb2, deployment_pb2, node_pb2, node_pb2_grpc

from tests.integration.test_deployments import (
    INTERVAL,
    Agent,
    World,
    _until,
    controller,  # noqa: F401 - fixture
    manifest,
    source_tar_gz,
    world,  # noqa: F401 - fixture
)
from tests.support import bearer


class TypedAgent(Agent):
    """A fake node that announces node types and reports a measured RTT."""

    node_types: tuple[str, ...] = ()
    rtt_ms: float | None = None

    async def connect(self, report: list[node_pb2.ReplicaState] | None = None) -> None:
        self._channel = self.node.channel(self.controller)
        self._outbox = asyncio.Queue()
        call = node_pb2_grpc.NodeServiceStub(self._channel).Connect(self._requests(self._outbox))
        await self._outbox.put(
            node_pb2.ConnectRequest(
                hello=node_pb2.NodeHello(
                    agent_version="test",
                    capabilities=common_pb2.NodeCapabilities(
                        cpu_cores=2, memory_gb=4, disk_gb=20, node_types=list(self.node_types)
                    ),
                    replicas=report if report is not None else self._states(),
                )
            )
        )
        assert (await call.read()).WhichOneof("message") == "hello_ack"
        self._tasks = [
            asyncio.create_task(self._read(call, self._outbox)),
            asyncio.create_task(self._beat(self._outbox)),
        ]

    async def _beat(self, outbox: asyncio.Queue[node_pb2.ConnectRequest | None]) -> None:
        sequence = 0
        while True:
            sequence += 1
            heartbeat = node_pb2.Heartbeat(
                sequence=sequence,
                metrics=common_pb2.NodeMetrics(cpu_percent=10, memory_percent=20, disk_percent=30),
                replicas=self._states(),
            )
            if self.rtt_ms is not None:
                heartbeat.rtt_ms = self.rtt_ms
            await outbox.put(node_pb2.ConnectRequest(heartbeat=heartbeat))
            await asyncio.sleep(INTERVAL)


async def _add(w: World, region: str, *, types: tuple[str, ...] = (), rtt: float | None = None) -> TypedAgent:
    agent = TypedAgent(w.controller, w.channel, w.token, region)
    agent.node_types = types
    agent.rtt_ms = rtt
    await agent.register()
    await agent.connect()
    await agent.ready()
    w.agents.append(agent)
    return agent


async def _create(w: World, name: str, replicas: int) -> str:
    response = await w.stub.CreateDeployment(
        deployment_pb2.CreateDeploymentRequest(
            manifest=manifest(name=name, replicas=replicas), source_tar_gz=source_tar_gz()
        ),
        metadata=bearer(w.token),
    )
    return response.deployment_id


async def test_a_storage_only_node_never_gets_an_app_replica(world: World) -> None:  # noqa: F811
    storage = await _add(world, "eu-west", types=("storage",), rtt=1.0)  # the better-scored node
    compute = await _add(world, "us-east", types=("compute", "database"), rtt=300.0)
    for i in range(4):
        deployment = await world.wait_status(
            await _create(world, f"app{i}", 1), deployment_pb2.DEPLOYMENT_STATUS_RUNNING, 1
        )
        assert [a.node_id for a in deployment.node_assignments] == [compute.node_id]
    assert not storage.deploys()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _create(world, "two", 2)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "node type mismatch: needs compute, node serves storage" in (caught.value.details() or "")


async def test_placement_explanations_show_the_measured_rtt(world: World) -> None:  # noqa: F811
    near = await _add(world, "eu-west", rtt=20.0)
    far = await _add(world, "eu-west", rtt=400.0)
    sessions = world.controller.fleet.streams

    def measured() -> bool:
        return all(
            (s := sessions.get(a.node_id)) is not None and s.last_rtt_ms is not None for a in (near, far)
        )

    await _until(lambda: _true(measured()), "both RTTs measured")
    deployment = await world.wait_status(
        await _create(world, "web", 1), deployment_pb2.DEPLOYMENT_STATUS_RUNNING, 1
    )
    assert [a.node_id for a in deployment.node_assignments] == [near.node_id]
    chosen = next(p for p in deployment.placement if p.selected)
    # Every report is the same, so the smoothed RTT is the reported one: 1 - rtt / 500.
    assert chosen.factor_scores["latency"] == pytest.approx(1 - 20.0 / 500)
    assert chosen.factor_scores["reliability"] == pytest.approx(1.0)


async def test_a_node_that_was_down_scores_lower_reliability(world: World) -> None:  # noqa: F811
    flaky = await _add(world, "eu-west")
    steady = await _add(world, "eu-west")
    fleet = world.controller.fleet
    await flaky.kill()  # the stream breaks: suspect at once
    await _until(lambda: _true(fleet.state_of(flaky.node_id) == "suspect"), "flaky node suspect")
    await flaky.connect()
    await flaky.ready()
    history = world.controller.deployments.history
    before = history.reliability(flaky.node_id, fleet.clock()).uptime_share
    assert before < 1.0
    deployment = await world.wait_status(
        await _create(world, "web", 2), deployment_pb2.DEPLOYMENT_STATUS_RUNNING, 2
    )
    factors = {p.node_id: p.factor_scores for p in deployment.placement if p.selected}
    assert factors[steady.node_id]["reliability"] == pytest.approx(1.0)
    assert 0.0 < factors[flaky.node_id]["reliability"] < 1.0
    # The share only grows while the node stays up: placement saw one in between.
    after = history.reliability(flaky.node_id, fleet.clock()).uptime_share
    assert before - 1e-6 <= factors[flaky.node_id]["reliability"] <= after + 1e-6


async def _true(value: bool) -> bool:
    return value
