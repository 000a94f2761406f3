"""DeploymentService over a real server, with hand-driven fake nodes on mutual-TLS streams.

Each fake agent registers, connects, heartbeats every ``INTERVAL`` (reporting the
replicas it runs) and answers DeployReplica with ok + an endpoint, or with a
failure when told to; every command it receives is recorded.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from automator67.v1 import common_pb2, deployment_pb2, deployment_pb2_grpc, node_pb2, node_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from controller.server import Controller
from tests.integration.test_node_api import FakeNode, _reason, _user
from tests.support import bearer, controller_settings, running_controller

INTERVAL = 0.2
WAIT = 15.0


def source_tar_gz(files: dict[str, str] | None = None) -> bytes:
    files = files or {"app.py": "print('hello')\n"}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def manifest(name: str = "web", replicas: int = 2, **overrides: object) -> deployment_pb2.DeploymentManifest:
    fields: dict[str, object] = {
        "name": name,
        "app_type": deployment_pb2.APP_TYPE_BACKEND,
        "runtime": "python",
        "entrypoint": "app.py",
        "resources": deployment_pb2.Resources(memory="256MB", cpu="0.5"),
        "replicas": replicas,
        "env": {"SECRET_TOKEN": "s3cr3t-value"},
    }
    fields.update(overrides)
    return deployment_pb2.DeploymentManifest(**fields)  # type: ignore[arg-type]


class Agent:
    """A fake node: registration, a stream, heartbeats, and answers to commands."""

    def __init__(self, controller: Controller, channel: grpc.aio.Channel, token: str, region: str) -> None:
        self.controller = controller
        self.stub = node_pb2_grpc.NodeServiceStub(channel)
        self.token = token
        self.region = region
        self.node = FakeNode()
        self.node_id = ""
        self.fail_deploys = False
        self.answer_deploys = True
        self.running: dict[tuple[str, int], int] = {}
        self.commands: list[node_pb2.NodeCommand] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._channel: grpc.aio.Channel | None = None
        self._outbox: asyncio.Queue[node_pb2.ConnectRequest | None] = asyncio.Queue()

    async def register(self) -> None:
        enrollment = await self.stub.CreateEnrollmentToken(
            node_pb2.CreateEnrollmentTokenRequest(max_uses=1), metadata=bearer(self.token)
        )
        self.node.reply = await self.stub.RegisterNode(
            self.node.request(enrollment.token, region=self.region, endpoint=f"https://{self.region}.test")
        )
        self.node_id = self.node.reply.node_id

    async def connect(self, report: list[node_pb2.ReplicaState] | None = None) -> None:
        self._channel = self.node.channel(self.controller)
        self._outbox = asyncio.Queue()
        call = node_pb2_grpc.NodeServiceStub(self._channel).Connect(self._requests(self._outbox))
        await self._outbox.put(
            node_pb2.ConnectRequest(
                hello=node_pb2.NodeHello(
                    agent_version="test",
                    capabilities=common_pb2.NodeCapabilities(cpu_cores=2, memory_gb=4, disk_gb=20),
                    replicas=report if report is not None else self._states(),
                )
            )
        )
        assert (await call.read()).WhichOneof("message") == "hello_ack"
        self._tasks = [
            asyncio.create_task(self._read(call, self._outbox)),
            asyncio.create_task(self._beat(self._outbox)),
        ]

    @staticmethod
    async def _requests(
        outbox: asyncio.Queue[node_pb2.ConnectRequest | None],
    ) -> AsyncIterator[node_pb2.ConnectRequest]:
        while (message := await outbox.get()) is not None:
            yield message

    def _states(self) -> list[node_pb2.ReplicaState]:
        return [
            node_pb2.ReplicaState(
                deployment_id=dep,
                replica_index=index,
                generation=gen,
                status="running",
                endpoint=self.endpoint(index),
            )
            for (dep, index), gen in self.running.items()
        ]

    def endpoint(self, index: int) -> str:
        return f"http://{self.region}.test:{8000 + index}"

    async def _beat(self, outbox: asyncio.Queue[node_pb2.ConnectRequest | None]) -> None:
        sequence = 0
        while True:
            sequence += 1
            metrics = common_pb2.NodeMetrics(cpu_percent=10, memory_percent=20, disk_percent=30)
            await outbox.put(
                node_pb2.ConnectRequest(
                    heartbeat=node_pb2.Heartbeat(sequence=sequence, metrics=metrics, replicas=self._states())
                )
            )
            await asyncio.sleep(INTERVAL)

    async def _read(self, call: object, outbox: asyncio.Queue[node_pb2.ConnectRequest | None]) -> None:
        while (message := await call.read()) != grpc.aio.EOF:  # type: ignore[attr-defined]
            assert isinstance(message, node_pb2.ConnectResponse)
            if message.WhichOneof("message") != "command":
                continue
            command = message.command
            self.commands.append(command)
            result = node_pb2.CommandResult(command_id=command.command_id, ok=True)
            if command.HasField("deploy_replica"):
                deploy = command.deploy_replica
                if not self.answer_deploys:
                    continue
                if self.fail_deploys or deploy.env.get("BROKEN") == "1":
                    result = node_pb2.CommandResult(
                        command_id=command.command_id, ok=False, error_message=f"{self.region}: app crashed"
                    )
                else:
                    self.running[(deploy.deployment_id, deploy.replica_index)] = deploy.generation
                    result.payload = json.dumps({"endpoint": self.endpoint(deploy.replica_index)}).encode()
            elif command.HasField("stop_replica"):
                stop = command.stop_replica
                if self.running.get((stop.deployment_id, stop.replica_index)) == stop.generation:
                    del self.running[(stop.deployment_id, stop.replica_index)]
            await outbox.put(node_pb2.ConnectRequest(result=result))

    def deploys(self) -> list[node_pb2.DeployReplica]:
        return [c.deploy_replica for c in self.commands if c.HasField("deploy_replica")]

    def stops(self) -> list[node_pb2.StopReplica]:
        return [c.stop_replica for c in self.commands if c.HasField("stop_replica")]

    async def kill(self) -> None:
        """The stream breaks (the process died): no goodbye, no more heartbeats."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def ready(self) -> None:
        await _until(lambda: self._is_ready(), f"node {self.region} ready")

    async def _is_ready(self) -> bool:
        node = (
            await self.stub.GetNode(
                node_pb2.GetNodeRequest(node_id=self.node_id), metadata=bearer(self.token)
            )
        ).node
        return node.status in (
            common_pb2.NODE_STATUS_READY,
            common_pb2.NODE_STATUS_BUSY,
        )  # BUSY: a loaded machine


async def _until(check: Callable[[], Awaitable[bool]], what: str, within: float = WAIT) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    async with running_controller(
        controller_settings(tmp_path, heartbeat_interval_seconds=INTERVAL)
    ) as running:
        yield running


class World:
    def __init__(self, controller: Controller, channel: grpc.aio.Channel, token: str) -> None:
        self.controller = controller
        self.channel = channel
        self.token = token
        self.stub = deployment_pb2_grpc.DeploymentServiceStub(channel)
        self.agents: list[Agent] = []

    async def add_agents(self, *regions: str) -> list[Agent]:
        agents = [Agent(self.controller, self.channel, self.token, region) for region in regions]
        for agent in agents:
            await agent.register()
            await agent.connect()
        for agent in agents:
            await agent.ready()
        self.agents.extend(agents)
        return agents

    async def get(self, deployment_id: str) -> deployment_pb2.Deployment:
        return (
            await self.stub.GetDeployment(
                deployment_pb2.GetDeploymentRequest(deployment_id=deployment_id), metadata=bearer(self.token)
            )
        ).deployment

    async def create(self, m: deployment_pb2.DeploymentManifest, request_id: str = "") -> str:
        response = await self.stub.CreateDeployment(
            deployment_pb2.CreateDeploymentRequest(
                manifest=m, source_tar_gz=source_tar_gz(), request_id=request_id
            ),
            metadata=bearer(self.token),
        )
        assert response.status == deployment_pb2.DEPLOYMENT_STATUS_PENDING
        return response.deployment_id

    async def wait_status(
        self, deployment_id: str, status: int, replicas: int | None = None
    ) -> deployment_pb2.Deployment:
        latest: list[deployment_pb2.Deployment] = []

        async def check() -> bool:
            latest[:] = [await self.get(deployment_id)]
            d = latest[0]
            return d.status == status and (replicas is None or d.current_replicas == replicas)

        try:
            await _until(check, f"deployment {deployment_pb2.DeploymentStatus.Name(status)}")
        except AssertionError:
            raise AssertionError(f"deployment is {latest[0] if latest else None}") from None
        return latest[0]

    async def close(self) -> None:
        for agent in self.agents:
            await agent.kill()


@pytest.fixture
async def world(controller: Controller) -> AsyncIterator[World]:
    async with grpc.aio.insecure_channel(controller.address) as channel:
        token = await _user(channel)
        w = World(controller, channel, token)
        try:
            yield w
        finally:
            await w.close()


def _violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return {v.field: v.description for v in bad.field_violations}
    return {}


async def test_create_places_deploys_and_publishes_endpoints(world: World) -> None:
    agents = await world.add_agents("eu-west", "us-east", "ap-south")
    call = world.stub.CreateDeployment(
        deployment_pb2.CreateDeploymentRequest(manifest=manifest(replicas=3), source_tar_gz=source_tar_gz()),
        metadata=bearer(world.token),
    )
    response = await call
    assert ("x-a67-http-status", "202") in list(await call.initial_metadata() or ())
    deployment = await world.wait_status(response.deployment_id, deployment_pb2.DEPLOYMENT_STATUS_RUNNING, 3)

    assert sorted(deployment.endpoints) == sorted(a.endpoint for a in deployment.node_assignments)
    assert len(deployment.endpoints) == 3
    hosts = {a.node_id for a in deployment.node_assignments}
    assert hosts == {a.node_id for a in agents}  # one replica per region
    assert all(a.status == "running" and a.generation > 0 for a in deployment.node_assignments)
    selected = [p for p in deployment.placement if p.selected]
    assert len(selected) == 3
    assert set(selected[0].factor_scores) == {"cpu", "memory", "latency", "connections", "reliability"}
    assert deployment.deployed_at.seconds > 0
    assert deployment.package_sha256
    assert not deployment.manifest.env  # env is never returned
    # The replica got its env and the package.
    deploy = next(d for a in agents for d in a.deploys())
    assert deploy.env == {"SECRET_TOKEN": "s3cr3t-value"}
    assert deploy.package_size > 0  # the bytes are fetched by digest, not sent on the stream
    assert deploy.package_sha256 == deployment.package_sha256

    resolved = await world.stub.ResolveEndpoint(
        deployment_pb2.ResolveEndpointRequest(deployment_id=deployment.id), metadata=bearer(world.token)
    )
    assert resolved.endpoint in deployment.endpoints

    listed = await world.stub.ListDeployments(
        deployment_pb2.ListDeploymentsRequest(), metadata=bearer(world.token)
    )
    assert [d.id for d in listed.deployments] == [deployment.id]
    nodes = await node_pb2_grpc.NodeServiceStub(world.channel).ListNodes(
        node_pb2.ListNodesRequest(), metadata=bearer(world.token)
    )
    assert all(n.deployments == 1 for n in nodes.nodes)


async def test_a_failing_node_is_replaced_by_another(world: World) -> None:
    bad, *_ = await world.add_agents("eu-west", "us-east", "ap-south")
    bad.fail_deploys = True
    deployment_id = await world.create(manifest(replicas=2))
    deployment = await world.wait_status(deployment_id, deployment_pb2.DEPLOYMENT_STATUS_RUNNING, 2)
    assert bad.node_id not in {a.node_id for a in deployment.node_assignments}
    assert len(deployment.endpoints) == 2


async def test_all_failing_rolls_back_and_fails(world: World) -> None:
    agents = await world.add_agents("eu-west", "us-east")
    agents[1].fail_deploys = True
    # 1.5 CPU: a node (2 CPU) holds one replica, so the failed one has nowhere else to go.
    m = manifest(replicas=2, atomic=True, resources=deployment_pb2.Resources(memory="256MB", cpu="1.5"))
    deployment_id = await world.create(m)
    deployment = await world.wait_status(deployment_id, deployment_pb2.DEPLOYMENT_STATUS_FAILED)
    assert deployment.current_replicas == 0
    assert not deployment.endpoints
    assert any("app crashed" in a.error_message for a in deployment.node_assignments)
    # What started on the good node was stopped again.
    await _until(lambda: _async(bool(agents[0].stops())), "StopReplica on the good node")
    assert not agents[0].running


async def _async(value: bool) -> bool:
    return value


async def test_every_node_failing_fails_the_best_effort_deployment(world: World) -> None:
    agents = await world.add_agents("eu-west", "us-east")
    for agent in agents:
        agent.fail_deploys = True
    deployment_id = await world.create(manifest(replicas=1))
    await world.wait_status(deployment_id, deployment_pb2.DEPLOYMENT_STATUS_FAILED)
    assert len([d for a in agents for d in a.deploys()]) == 2  # tried on both nodes


async def test_insufficient_capacity_is_unavailable_and_stores_nothing(world: World) -> None:
    await world.add_agents("eu-west")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await world.create(manifest(replicas=3))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _reason(info.value) == "INSUFFICIENT_CAPACITY"
    listed = await world.stub.ListDeployments(
        deployment_pb2.ListDeploymentsRequest(), metadata=bearer(world.token)
    )
    assert not listed.deployments


async def test_validation_duplicate_name_and_request_id(world: World) -> None:
    await world.add_agents("eu-west", "us-east")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await world.create(manifest(name="Bad Name!", replicas=0))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {"manifest.name", "manifest.replicas"} <= set(_violations(info.value))

    first = await world.create(manifest(name="api", replicas=1), request_id="req-1")
    again = await world.create(manifest(name="api", replicas=1), request_id="req-1")
    assert again == first
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await world.create(manifest(name="api", replicas=1), request_id="req-2")
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert _reason(info.value) == "DEPLOYMENT_NAME_TAKEN"
    listed = await world.stub.ListDeployments(
        deployment_pb2.ListDeploymentsRequest(), metadata=bearer(world.token)
    )
    assert len(listed.deployments) == 1
    second = await world.create(manifest(name="worker", replicas=1))
    page = await world.stub.ListDeployments(
        deployment_pb2.ListDeploymentsRequest(page_size=1), metadata=bearer(world.token)
    )
    assert [d.id for d in page.deployments] == [first]
    assert page.next_page_token
    page = await world.stub.ListDeployments(
        deployment_pb2.ListDeploymentsRequest(page_size=1, page_token=page.next_page_token),
        metadata=bearer(world.token),
    )
    assert [d.id for d in page.deployments] == [second]
    assert not page.next_page_token

    other = await _user(world.channel, email="eve@example.com")
    for rpc, request in (
        (world.stub.GetDeployment, deployment_pb2.GetDeploymentRequest(deployment_id=first)),
        (world.stub.DeleteDeployment, deployment_pb2.DeleteDeploymentRequest(deployment_id=first)),
        (world.stub.ResolveEndpoint, deployment_pb2.ResolveEndpointRequest(deployment_id=first)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rpc(request, metadata=bearer(other))  # type: ignore[operator]
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await world.stub.ListDeployments(deployment_pb2.ListDeploymentsRequest(), metadata=bearer(other))
    assert not listed.deployments


async def test_scale_up_down_watch_and_delete(world: World) -> None:
    agents = await world.add_agents("eu-west", "us-east", "ap-south")
    deployment_id = await world.create(manifest(replicas=1))
    await world.wait_status(deployment_id, deployment_pb2.DEPLOYMENT_STATUS_RUNNING, 1)
    watch = world.stub.WatchDeployment(
        deployment_pb2.WatchDeploymentRequest(deployment_id=deployment_id), metadata=bearer(world.token)
    )
    first = await watch.read()
    assert first.status == deployment_pb2.DEPLOYMENT_STATUS_RUNNING

    scaled = await world.stub.ScaleDeployment(
        deployment_pb2.ScaleDeploymentRequest(deployment_id=deployment_id, replicas=3),
        metadata=bearer(world.token),
    )
    assert scaled.deployment.desired_replicas == 3
    deployment = await world.wait_status(deployment_id, deployment_pb2.DEPLOYMENT_STATUS_RUNNING, 3)
    assert len({a.node_id for a in deployment.node_assignments}) == 3  # avoided the node already hosting it

    await world.stub.ScaleDeployment(
        deployment_pb2.ScaleDeploymentRequest(deployment_id=deployment_id, replicas=1),
        metadata=bearer(world.token),
    )
    deployment = await world.wait_status(deployment_id, deployment_pb2.DEPLOYMENT_STATUS_RUNNING, 1)
    assert [a.replica_index for a in deployment.node_assignments] == [0]
    await _until(lambda: _async(sum(len(a.running) for a in agents) == 1), "highest replicas stopped")

    await world.stub.DeleteDeployment(
        deployment_pb2.DeleteDeploymentRequest(deployment_id=deployment_id), metadata=bearer(world.token)
    )
    assert sum(len(a.running) for a in agents) == 0
    events = []
    while (event := await watch.read()) != grpc.aio.EOF:  # the watch ends with the deletion
        assert isinstance(event, deployment_pb2.WatchDeploymentResponse)
        events.append(event)
    assert any("replica 1 running" in e.message for e in events)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await world.get(deployment_id)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_rolling_update_reverts_a_broken_version_and_rolls_back(world: World) -> None:
    agents = await world.add_agents("eu-west", "us-east", "ap-south")
    deployment_id = await world.create(manifest(replicas=2))
    v1 = await world.wait_status(deployment_id, deployment_pb2.DEPLOYMENT_STATUS_RUNNING, 2)
    first_generation = max(a.generation for a in v1.node_assignments)

    async def update(env: dict[str, str], text: str) -> deployment_pb2.Deployment:
        call = world.stub.UpdateDeployment(
            deployment_pb2.UpdateDeploymentRequest(
                deployment_id=deployment_id,
                manifest=manifest(replicas=2, env=env),
                source_tar_gz=source_tar_gz({"app.py": text}),
            ),
            metadata=bearer(world.token),
        )
        response = await call
        assert ("x-a67-http-status", "202") in list(await call.initial_metadata() or ())
        assert response.deployment.status == deployment_pb2.DEPLOYMENT_STATUS_DEPLOYING
        return response.deployment

    async def settled(version: int) -> deployment_pb2.Deployment:
        async def check() -> bool:
            d = await world.get(deployment_id)
            return d.status == deployment_pb2.DEPLOYMENT_STATUS_RUNNING and d.version == version

        await _until(check, f"running at version {version}")
        return await world.get(deployment_id)

    # A good update: every replica replaced (new generations), the old ones stopped.
    assert (await update({"SECRET_TOKEN": "v2"}, "print('v2')\n")).version == 2
    v2 = await settled(2)
    assert v2.current_replicas == 2
    assert v2.package_sha256 != v1.package_sha256
    assert all(a.generation > first_generation for a in v2.node_assignments)
    await _until(lambda: _async(sum(len(a.running) for a in agents) == 2), "old replicas stopped")
    assert {d.env["SECRET_TOKEN"] for a in agents for d in a.deploys()} == {"s3cr3t-value", "v2"}

    # A broken update (its replicas never get healthy) reverts by itself.
    await update({"BROKEN": "1"}, "print('v3')\n")
    await _until(
        lambda: _async(any(d.env.get("BROKEN") == "1" for a in agents for d in a.deploys())), "v3 tried"
    )
    reverted = await settled(2)
    assert reverted.package_sha256 == v2.package_sha256
    assert reverted.current_replicas == 2
    assert {(a.node_id, a.generation) for a in reverted.node_assignments} == {
        (a.node_id, a.generation) for a in v2.node_assignments
    }

    # Roll back to version 1 by hand; an unknown version is refused.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await world.stub.RollbackDeployment(
            deployment_pb2.RollbackDeploymentRequest(deployment_id=deployment_id, version=9),
            metadata=bearer(world.token),
        )
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await world.stub.RollbackDeployment(
        deployment_pb2.RollbackDeploymentRequest(deployment_id=deployment_id, version=1),
        metadata=bearer(world.token),
    )
    back = await settled(1)
    assert back.package_sha256 == v1.package_sha256
    assert back.current_replicas == 2
    await _until(lambda: _async(sum(len(a.running) for a in agents) == 2), "v2 replicas stopped")


async def test_recovery_replaces_a_failed_nodes_replica_and_fences_the_old_one(world: World) -> None:
    agents = await world.add_agents("eu-west", "us-east", "ap-south", "sa-east")
    deployment_id = await world.create(manifest(replicas=2))
    deployment = await world.wait_status(deployment_id, deployment_pb2.DEPLOYMENT_STATUS_RUNNING, 2)
    victim_assignment = deployment.node_assignments[0]
    victim = next(a for a in agents if a.node_id == victim_assignment.node_id)
    old_report = victim._states()
    await victim.kill()

    async def moved() -> bool:
        d = await world.get(deployment_id)
        a = d.node_assignments[0]
        return d.current_replicas == 2 and a.node_id != victim.node_id and a.status == "running"

    await _until(moved, "replica 0 re-placed on a healthy node")
    deployment = await world.get(deployment_id)
    replaced = deployment.node_assignments[0]
    assert replaced.generation > victim_assignment.generation
    assert victim_assignment.endpoint not in deployment.endpoints
    assert deployment.status == deployment_pb2.DEPLOYMENT_STATUS_RUNNING

    # The old node returns, still running the old replica: it is told to stop it.
    await victim.connect(report=old_report)
    await _until(lambda: _async(bool(victim.stops())), "StopReplica to the returning node")
    stop = victim.stops()[0]
    assert (stop.deployment_id, stop.replica_index, stop.generation) == (
        deployment_id,
        0,
        victim_assignment.generation,
    )
    assert not victim.running


async def test_a_mass_failure_freezes_recovery_and_the_reconciler_respects_it(world: World) -> None:
    agents = await world.add_agents("eu-west", "us-east", "ap-south", "sa-east", "af-south")
    deployment_id = await world.create(manifest(replicas=3))
    deployment = await world.wait_status(deployment_id, deployment_pb2.DEPLOYMENT_STATUS_RUNNING, 3)
    hosting = {a.node_id for a in deployment.node_assignments}
    victims = [a for a in agents if a.node_id in hosting]
    for victim in victims:  # 3 of 5 nodes fail together: most likely our own network
        await victim.kill()
    fleet = world.controller.fleet

    async def alerted() -> bool:
        return any(e.kind == "alert" for e in fleet.events)

    await _until(alerted, "the mass-failure alert")
    # Several reconciler passes later nothing has moved to the two healthy nodes: run the
    # passes here rather than sleeping for them, so how many ran does not depend on timing.
    for _ in range(6):
        await world.controller.deployments.reconcile()
    deployment = await world.get(deployment_id)
    assert {a.node_id for a in deployment.node_assignments} == hosting
    survivors = [a for a in agents if a.node_id not in hosting]
    assert all(not survivor.running for survivor in survivors)
    assert not any(e.kind == "recovery" for e in fleet.events)


async def test_a_restarted_controller_resumes_a_rollout(tmp_path: Path) -> None:
    settings = controller_settings(tmp_path, heartbeat_interval_seconds=INTERVAL)
    async with (
        running_controller(settings) as controller,
        grpc.aio.insecure_channel(controller.address) as channel,
    ):
        token = await _user(channel)
        world = World(controller, channel, token)
        agents = await world.add_agents("eu-west", "us-east")
        for agent in agents:
            agent.answer_deploys = False  # the controller dies before any replica answers
        deployment_id = await world.create(manifest(replicas=2))
        await world.wait_status(deployment_id, deployment_pb2.DEPLOYMENT_STATUS_DEPLOYING)
        await _until(lambda: _async(all(a.deploys() for a in agents)), "DeployReplica sent")
    await world.close()

    async with (
        running_controller(settings) as controller,
        grpc.aio.insecure_channel(controller.address) as channel,
    ):
        world = World(controller, channel, token)
        assert (await world.get(deployment_id)).status == deployment_pb2.DEPLOYMENT_STATUS_DEPLOYING
        for old in agents:
            agent = Agent(controller, channel, token, old.region)
            agent.node, agent.node_id = old.node, old.node_id
            await agent.connect()
            world.agents.append(agent)
        deployment = await world.wait_status(deployment_id, deployment_pb2.DEPLOYMENT_STATUS_RUNNING, 2)
        assert len(deployment.endpoints) == 2
        assert all(a.generation > 2 for a in deployment.node_assignments)  # new attempts, new generations
        await world.close()


APP = """\
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("replica " + os.environ.get("A67_REPLICA_INDEX", "?") + " " + os.environ["GREETING"]).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (a local test URL)
        return str(response.read().decode())


async def _answers(url: str) -> bool:
    try:
        await asyncio.to_thread(_get, url)
    except OSError:
        return False
    return True


def _start_real_agent(
    controller: Controller, data_dir: Path, token: str, region: str
) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "controller.cli", "agent", "--data-dir", str(data_dir), "--region", region]
    args += ["--controller", controller.address, "--advertise-host", "127.0.0.1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("A67_")}
    env["A67_AGENT_TOKEN"] = token
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


async def test_real_agents_run_recover_and_delete_a_real_app(tmp_path: Path) -> None:
    """3 agent processes in 3 regions run a real HTTP app; kill -9 one; delete; nothing left."""
    settings = controller_settings(tmp_path / "controller", heartbeat_interval_seconds=0.3)
    processes: list[subprocess.Popen[bytes]] = []
    async with (
        running_controller(settings) as controller,
        grpc.aio.insecure_channel(controller.address) as channel,
    ):
        token = await _user(channel)
        nodes_stub = node_pb2_grpc.NodeServiceStub(channel)
        stub = deployment_pb2_grpc.DeploymentServiceStub(channel)
        world = World(controller, channel, token)
        try:
            enrollment = await nodes_stub.CreateEnrollmentToken(
                node_pb2.CreateEnrollmentTokenRequest(max_uses=3), metadata=bearer(token)
            )
            for region in ("eu-west", "us-east", "ap-south"):
                processes.append(_start_real_agent(controller, tmp_path / region, enrollment.token, region))

            async def three_ready() -> bool:
                nodes = (
                    await nodes_stub.ListNodes(node_pb2.ListNodesRequest(), metadata=bearer(token))
                ).nodes
                return len(nodes) == 3 and all(
                    n.status in (common_pb2.NODE_STATUS_READY, common_pb2.NODE_STATUS_BUSY) for n in nodes
                )

            await _until(three_ready, "three ready agents", within=60)
            nodes = (await nodes_stub.ListNodes(node_pb2.ListNodesRequest(), metadata=bearer(token))).nodes
            process_of = {n.id: processes[("eu-west", "us-east", "ap-south").index(n.region)] for n in nodes}

            m = manifest(
                name="hello",
                replicas=3,
                env={"GREETING": "hi"},
                resources=deployment_pb2.Resources(memory="64MB", cpu="0.1"),
                health_check=deployment_pb2.HealthCheck(
                    path="/", interval_seconds=2, timeout_seconds=1, retries=2
                ),
            )
            response = await stub.CreateDeployment(
                deployment_pb2.CreateDeploymentRequest(
                    manifest=m, source_tar_gz=source_tar_gz({"app.py": APP})
                ),
                metadata=bearer(token),
            )
            deployment = await world.wait_status(
                response.deployment_id, deployment_pb2.DEPLOYMENT_STATUS_RUNNING, 3
            )
            assert len({a.node_id for a in deployment.node_assignments}) == 3
            for a in deployment.node_assignments:
                assert await asyncio.to_thread(_get, a.endpoint) == f"replica {a.replica_index} hi"
            old_endpoints = list(deployment.endpoints)

            victim = deployment.node_assignments[0]
            process_of[victim.node_id].send_signal(signal.SIGKILL)
            process_of[victim.node_id].wait()

            async def moved() -> bool:
                d = await world.get(response.deployment_id)
                a = d.node_assignments[0]
                return d.current_replicas == 3 and a.node_id != victim.node_id and a.status == "running"

            await _until(moved, "replica 0 healthy on another node", within=30)
            deployment = await world.get(response.deployment_id)
            replaced = deployment.node_assignments[0]
            assert replaced.generation > victim.generation
            assert await asyncio.to_thread(_get, replaced.endpoint) == "replica 0 hi"

            await stub.DeleteDeployment(
                deployment_pb2.DeleteDeploymentRequest(deployment_id=response.deployment_id),
                metadata=bearer(token),
            )
            endpoints = set(old_endpoints) | set(deployment.endpoints)

            async def none_answer() -> bool:
                return not any([await _answers(url) for url in endpoints])

            await _until(none_answer, "no replica process left", within=15)
        finally:
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
