"""NodeService over a real server: enrollment, registration, the mutual-TLS stream, management.

The node side here is a minimal hand-written client (not the agent), so each
protocol rule can be exercised directly.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from automator67.v1 import (
    auth_pb2_grpc,
    common_pb2,
    deployment_pb2,
    deployment_pb2_grpc,
    metrics_pb2,
    metrics_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from controller.nodes.ca import SERVER_NAME
from controller.server import Controller
from tests.support import bearer, controller_settings, register, running_controller

INTERVAL = 0.2


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    settings = controller_settings(tmp_path, heartbeat_interval_seconds=INTERVAL)
    async with running_controller(settings) as running:
        yield running


def _reason(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


class FakeNode:
    """A node's key, CSR and certificate."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        spki = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.fingerprint = hashlib.sha256(spki).hexdigest()
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node")]))
            .sign(self.key, hashes.SHA256())
        )
        self.csr_pem = csr.public_bytes(serialization.Encoding.PEM).decode()
        self.reply: node_pb2.RegisterNodeResponse | None = None

    def request(self, token: str, **overrides: object) -> node_pb2.RegisterNodeRequest:
        fields: dict[str, object] = {
            "enrollment_token": token,
            "provider": common_pb2.PROVIDER_RENDER,
            "endpoint": "https://node-1.onrender.com",
            "region": "eu-west",
            "capabilities": common_pb2.NodeCapabilities(cpu_cores=2, memory_gb=4, disk_gb=20),
            "csr_pem": self.csr_pem,
            "fingerprint": self.fingerprint,
            "oauth_token": "gho_super_secret_oauth_token",
        }
        fields.update(overrides)
        return node_pb2.RegisterNodeRequest(**fields)  # type: ignore[arg-type]

    def channel(self, controller: Controller) -> grpc.aio.Channel:
        assert self.reply is not None
        key_pem = self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.reply.ca_certificate_pem.encode(),
            private_key=key_pem,
            certificate_chain=self.reply.certificate_pem.encode(),
        )
        return grpc.aio.secure_channel(
            f"127.0.0.1:{controller.node_port}",
            credentials,
            options=[("grpc.ssl_target_name_override", SERVER_NAME)],
        )


async def _user(channel: grpc.aio.Channel, email: str = "ada@example.com") -> str:
    return (await register(auth_pb2_grpc.AuthServiceStub(channel), email=email)).access_token


async def _enroll(
    stub: node_pb2_grpc.NodeServiceStub, token: str, node: FakeNode, max_uses: int = 1
) -> node_pb2.RegisterNodeResponse:
    enrollment = await stub.CreateEnrollmentToken(
        node_pb2.CreateEnrollmentTokenRequest(max_uses=max_uses), metadata=bearer(token)
    )
    node.reply = await stub.RegisterNode(node.request(enrollment.token))
    return node.reply


async def _wait_status(
    stub: node_pb2_grpc.NodeServiceStub, token: str, node_id: str, status: int, within: float = 10.0
) -> node_pb2.Node:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        node = (await stub.GetNode(node_pb2.GetNodeRequest(node_id=node_id), metadata=bearer(token))).node
        if node.status == status:
            return node
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"node stayed {common_pb2.NodeStatus.Name(node.status)}")
        await asyncio.sleep(0.05)


class Stream:
    """A node stream driven by hand."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.outbox: asyncio.Queue[node_pb2.ConnectRequest | None] = asyncio.Queue()
        self.call = node_pb2_grpc.NodeServiceStub(channel).Connect(self._requests())

    async def _requests(self) -> AsyncIterator[node_pb2.ConnectRequest]:
        while (message := await self.outbox.get()) is not None:
            yield message

    async def hello(self) -> node_pb2.HelloAck:
        capabilities = common_pb2.NodeCapabilities(cpu_cores=3, memory_gb=6, disk_gb=40)
        hello = node_pb2.NodeHello(agent_version="test", capabilities=capabilities)
        await self.outbox.put(node_pb2.ConnectRequest(hello=hello))
        return (await self.call.read()).hello_ack

    async def heartbeat(self, sequence: int, cpu: float = 10.0) -> node_pb2.HeartbeatAck:
        metrics = common_pb2.NodeMetrics(cpu_percent=cpu, memory_percent=20, disk_percent=30)
        await self.outbox.put(
            node_pb2.ConnectRequest(heartbeat=node_pb2.Heartbeat(sequence=sequence, metrics=metrics))
        )
        return (await self.call.read()).heartbeat_ack


async def test_register_connect_heartbeat_list_drain_deregister(
    controller: Controller, channel: grpc.aio.Channel
) -> None:
    token = await _user(channel)
    stub = node_pb2_grpc.NodeServiceStub(channel)
    node = FakeNode()
    reply = await _enroll(stub, token, node)
    assert reply.heartbeat_interval_ms == round(INTERVAL * 1000)
    assert "BEGIN CERTIFICATE" in reply.certificate_pem
    listed = await stub.ListNodes(node_pb2.ListNodesRequest(), metadata=bearer(token))
    assert [n.id for n in listed.nodes] == [reply.node_id]
    assert listed.nodes[0].status == common_pb2.NODE_STATUS_INITIALIZING

    async with node.channel(controller) as node_channel:
        stream = Stream(node_channel)
        ack = await stream.hello()
        assert ack.generation >= 1
        assert (await stream.heartbeat(1)).status == common_pb2.NODE_STATUS_READY
        got = await _wait_status(stub, token, reply.node_id, common_pb2.NODE_STATUS_READY)
        assert got.metrics.cpu_percent == 10.0
        assert (await stream.heartbeat(2, cpu=95)).status == common_pb2.NODE_STATUS_BUSY

        system = await metrics_pb2_grpc.MetricsServiceStub(channel).GetSystemMetrics(
            metrics_pb2.GetSystemMetricsRequest(), metadata=bearer(token)
        )
        assert system.metrics.total_nodes == 1
        assert system.metrics.cpu_percent == 95.0
        assert system.metrics.total_cpu_cores == 3  # what the hello announced
        assert system.metrics.total_memory_gb == 6
        node_metrics = await metrics_pb2_grpc.MetricsServiceStub(channel).GetNodeMetrics(
            metrics_pb2.GetNodeMetricsRequest(node_id=reply.node_id), metadata=bearer(token)
        )
        assert node_metrics.current.cpu_percent == 95.0
        assert [sample.metrics.cpu_percent for sample in node_metrics.history] == [10.0]

        drained = await stub.DrainNode(
            node_pb2.DrainNodeRequest(node_id=reply.node_id), metadata=bearer(token)
        )
        assert drained.node.status == common_pb2.NODE_STATUS_DRAINING
        assert (await stream.heartbeat(3)).status == common_pb2.NODE_STATUS_DRAINING

        await stub.DeregisterNode(
            node_pb2.DeregisterNodeRequest(node_id=reply.node_id), metadata=bearer(token)
        )
        # The stream is closed and the certificate no longer accepted.
        assert await stream.call.read() == grpc.aio.EOF
        again = Stream(node_channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await again.hello()
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await stream.outbox.put(None)
        await again.outbox.put(None)
    listed = await stub.ListNodes(node_pb2.ListNodesRequest(), metadata=bearer(token))
    assert list(listed.nodes) == []


async def test_broken_stream_is_suspect_then_failed_then_ready_again(
    controller: Controller, channel: grpc.aio.Channel
) -> None:
    token = await _user(channel)
    stub = node_pb2_grpc.NodeServiceStub(channel)
    node = FakeNode()
    reply = await _enroll(stub, token, node)
    async with node.channel(controller) as node_channel:
        stream = Stream(node_channel)
        await stream.hello()
        await stream.heartbeat(1)
        stream.call.cancel()
        await _wait_status(stub, token, reply.node_id, common_pb2.NODE_STATUS_SUSPECT, within=2)
        await _wait_status(stub, token, reply.node_id, common_pb2.NODE_STATUS_FAILED, within=5)
        # Recovery is held one mass-failure window (one interval) after the failure.
        for _ in range(100):
            if any(e.kind == "recovery" and e.node_id == reply.node_id for e in controller.fleet.events):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the recovery hook was not called")
        back = Stream(node_channel)
        await back.hello()
        assert (await back.heartbeat(1)).status == common_pb2.NODE_STATUS_READY
        await back.outbox.put(None)


async def test_second_connection_replaces_the_first(
    controller: Controller, channel: grpc.aio.Channel
) -> None:
    token = await _user(channel)
    stub = node_pb2_grpc.NodeServiceStub(channel)
    node = FakeNode()
    await _enroll(stub, token, node)
    async with node.channel(controller) as node_channel:
        first = Stream(node_channel)
        first_ack = await first.hello()
        second = Stream(node_channel)
        second_ack = await second.hello()
        assert second_ack.generation > first_ack.generation
        # The old stream ends cleanly; the new one works.
        assert await first.call.read() == grpc.aio.EOF
        assert (await second.heartbeat(1)).status == common_pb2.NODE_STATUS_READY
        await first.outbox.put(None)
        await second.outbox.put(None)


async def test_registration_errors(controller: Controller, channel: grpc.aio.Channel) -> None:
    token = await _user(channel)
    stub = node_pb2_grpc.NodeServiceStub(channel)
    node = FakeNode()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.RegisterNode(node.request("a67e_" + "x" * 43))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    enrollment = await stub.CreateEnrollmentToken(
        node_pb2.CreateEnrollmentTokenRequest(max_uses=2), metadata=bearer(token)
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.RegisterNode(node.request(enrollment.token, provider=0, endpoint="ftp://x"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    first = await stub.RegisterNode(node.request(enrollment.token))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.RegisterNode(node.request(enrollment.token))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert first.node_id in (info.value.details() or "") or _reason(info.value)
    # Without a token, user RPCs are refused.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CreateEnrollmentToken(node_pb2.CreateEnrollmentTokenRequest())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_node_certificate_acts_only_as_itself(
    controller: Controller, channel: grpc.aio.Channel
) -> None:
    token = await _user(channel)
    stub = node_pb2_grpc.NodeServiceStub(channel)
    node = FakeNode()
    reply = await _enroll(stub, token, node)
    async with node.channel(controller) as node_channel:
        node_stub = node_pb2_grpc.NodeServiceStub(node_channel)
        for call in (
            node_stub.GetNode(node_pb2.GetNodeRequest(node_id=reply.node_id)),
            node_stub.ListNodes(node_pb2.ListNodesRequest()),
            node_stub.DeregisterNode(node_pb2.DeregisterNodeRequest(node_id=reply.node_id)),
            metrics_pb2_grpc.MetricsServiceStub(node_channel).GetSystemMetrics(
                metrics_pb2.GetSystemMetricsRequest()
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert _reason(info.value) == "NODE_CERTIFICATE_NOT_ALLOWED"
    # Connect on the user port has no certificate: refused.
    plain = Stream(channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await plain.hello()
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await plain.outbox.put(None)


async def test_another_users_node_looks_missing(controller: Controller, channel: grpc.aio.Channel) -> None:
    owner = await _user(channel)
    stranger = await _user(channel, email="eve@example.com")
    stub = node_pb2_grpc.NodeServiceStub(channel)
    reply = await _enroll(stub, owner, FakeNode())
    for call in (
        stub.GetNode(node_pb2.GetNodeRequest(node_id=reply.node_id), metadata=bearer(stranger)),
        stub.DrainNode(node_pb2.DrainNodeRequest(node_id=reply.node_id), metadata=bearer(stranger)),
        stub.DeregisterNode(node_pb2.DeregisterNodeRequest(node_id=reply.node_id), metadata=bearer(stranger)),
        stub.GetNode(
            node_pb2.GetNodeRequest(node_id="00000000-0000-0000-0000-000000000000"), metadata=bearer(owner)
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await stub.ListNodes(node_pb2.ListNodesRequest(), metadata=bearer(stranger))
    assert list(listed.nodes) == []


async def test_watch_system_metrics_pushes_updates(controller: Controller, channel: grpc.aio.Channel) -> None:
    token = await _user(channel)
    stub = node_pb2_grpc.NodeServiceStub(channel)
    node = FakeNode()
    await _enroll(stub, token, node)
    watch = metrics_pb2_grpc.MetricsServiceStub(channel).WatchSystemMetrics(
        metrics_pb2.WatchSystemMetricsRequest(min_interval_ms=200), metadata=bearer(token)
    )
    first = await watch.read()
    assert first.metrics.healthy_nodes == 0
    async with node.channel(controller) as node_channel:
        stream = Stream(node_channel)
        await stream.hello()
        await stream.heartbeat(1, cpu=42)
        while True:
            update = await asyncio.wait_for(watch.read(), 5)
            if update.metrics.healthy_nodes == 1:
                break
        assert update.metrics.cpu_percent == 42
        watch.cancel()
        await stream.outbox.put(None)


def _violations(err: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return {v.field: v.description for v in bad.field_violations}
    return {}


def _assert_finite(message: Message) -> None:
    """Every float of ``message`` (recursively) is finite."""
    for descriptor, value in message.ListFields():
        if descriptor.message_type is not None:
            for item in [value] if isinstance(value, Message) else value:
                _assert_finite(item)
        elif isinstance(value, float):
            assert math.isfinite(value), f"{descriptor.full_name} is {value}"


def _strict_json(raw: bytes) -> object:
    def refuse(constant: str) -> object:
        raise AssertionError(f"{constant} in JSON: {raw!r}")

    return json.loads(raw, parse_constant=refuse)


async def test_an_invalid_hello_is_refused_and_nothing_is_placed_on_the_node(
    controller: Controller, channel: grpc.aio.Channel
) -> None:
    from tests.integration.test_deployments import manifest, source_tar_gz

    token = await _user(channel)
    stub = node_pb2_grpc.NodeServiceStub(channel)
    node = FakeNode()
    reply = await _enroll(stub, token, node)
    capabilities = common_pb2.NodeCapabilities(
        cpu_cores=math.nan,
        memory_gb=math.inf,
        disk_gb=-50,
        network_bandwidth_mbps=1e308,
        max_concurrent_requests=-1,
    )
    async with node.channel(controller) as node_channel:
        stream = Stream(node_channel)
        await stream.outbox.put(
            node_pb2.ConnectRequest(hello=node_pb2.NodeHello(agent_version="evil", capabilities=capabilities))
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stream.call.read()
        await stream.outbox.put(None)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _reason(info.value) == "INVALID_HELLO"
    violations = _violations(info.value)
    assert set(violations) == {
        "hello.capabilities.cpu_cores",
        "hello.capabilities.memory_gb",
        "hello.capabilities.disk_gb",
        "hello.capabilities.network_bandwidth_mbps",
        "hello.capabilities.max_concurrent_requests",
    }
    assert violations["hello.capabilities.cpu_cores"].startswith("is NaN")
    # Nothing the hello claimed was kept, and the node has no stream: no replica goes there.
    assert reply.node_id not in controller.fleet.announced
    assert controller.fleet.streams.get(reply.node_id) is None
    got = (await stub.GetNode(node_pb2.GetNodeRequest(node_id=reply.node_id), metadata=bearer(token))).node
    assert got.status == common_pb2.NODE_STATUS_INITIALIZING
    _assert_finite(got)
    deployments = deployment_pb2_grpc.DeploymentServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await deployments.CreateDeployment(
            deployment_pb2.CreateDeploymentRequest(
                manifest=manifest(replicas=1), source_tar_gz=source_tar_gz()
            ),
            metadata=bearer(token),
        )
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert _reason(info.value) == "INSUFFICIENT_CAPACITY"


async def test_an_invalid_hello_does_not_replace_the_nodes_stream(
    controller: Controller, channel: grpc.aio.Channel
) -> None:
    token = await _user(channel)
    stub = node_pb2_grpc.NodeServiceStub(channel)
    node = FakeNode()
    reply = await _enroll(stub, token, node)
    async with node.channel(controller) as node_channel:
        good = Stream(node_channel)
        ack = await good.hello()
        bad = Stream(node_channel)
        hello = node_pb2.NodeHello(
            capabilities=common_pb2.NodeCapabilities(cpu_cores=2, memory_gb=4, disk_gb=20),
            replicas=[node_pb2.ReplicaState(deployment_id="d", replica_index=-1, generation=-1)],
        )
        await bad.outbox.put(node_pb2.ConnectRequest(hello=hello))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await bad.call.read()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert set(_violations(info.value)) == {
            "hello.replicas[0].replica_index",
            "hello.replicas[0].generation",
        }
        session = controller.fleet.streams.get(reply.node_id)
        assert session is not None
        assert session.generation == ack.generation
        assert (await good.heartbeat(1)).status == common_pb2.NODE_STATUS_READY
        assert controller.fleet.announced[reply.node_id].cpu_cores == 3  # what the good hello said
        await good.outbox.put(None)
        await bad.outbox.put(None)


async def test_an_invalid_heartbeat_degrades_the_node_and_its_numbers_go_nowhere(
    controller: Controller, channel: grpc.aio.Channel
) -> None:
    token = await _user(channel)
    stub = node_pb2_grpc.NodeServiceStub(channel)
    metrics_stub = metrics_pb2_grpc.MetricsServiceStub(channel)
    node = FakeNode()
    reply = await _enroll(stub, token, node)
    bad = common_pb2.NodeMetrics(cpu_percent=math.nan, memory_percent=1e308, disk_percent=-50)

    async def beat(stream: Stream, sequence: int, metrics: common_pb2.NodeMetrics) -> int:
        heartbeat = node_pb2.Heartbeat(sequence=sequence, metrics=metrics)
        await stream.outbox.put(node_pb2.ConnectRequest(heartbeat=heartbeat))
        ack = (await stream.call.read()).heartbeat_ack
        await controller.fleet.monitor.flush()  # state-change writes (store, cache) are done
        return ack.status

    async def system() -> metrics_pb2.SystemMetrics:
        metrics = (
            await metrics_stub.GetSystemMetrics(metrics_pb2.GetSystemMetricsRequest(), metadata=bearer(token))
        ).metrics
        _assert_finite(metrics)
        return metrics

    async def node_metrics() -> metrics_pb2.GetNodeMetricsResponse:
        response = await metrics_stub.GetNodeMetrics(
            metrics_pb2.GetNodeMetricsRequest(node_id=reply.node_id), metadata=bearer(token)
        )
        _assert_finite(response)
        return response

    async def stored_and_cached() -> None:
        row = await controller.fleet.nodes.get(reply.node_id)
        assert row is not None
        for value in (row.metrics_current or {}).values():
            assert math.isfinite(value)
        cached = await controller.cache.get(f"node:health:{reply.node_id}")
        assert cached is not None
        _strict_json(cached)

    async with node.channel(controller) as node_channel:
        stream = Stream(node_channel)
        await stream.hello()
        # The very first heartbeat is invalid: degraded, and nothing of it is kept anywhere.
        assert await beat(stream, 1, bad) == common_pb2.NODE_STATUS_DEGRADED
        got = (
            await stub.GetNode(node_pb2.GetNodeRequest(node_id=reply.node_id), metadata=bearer(token))
        ).node
        assert got.status == common_pb2.NODE_STATUS_DEGRADED
        _assert_finite(got)
        metrics = await system()
        assert (metrics.total_nodes, metrics.healthy_nodes) == (1, 0)
        assert (metrics.cpu_percent, metrics.memory_percent, metrics.total_cpu_cores) == (0, 0, 0)
        assert list((await node_metrics()).history) == []
        await stored_and_cached()

        # A valid heartbeat brings it back and is what counts.
        assert await beat(stream, 2, common_pb2.NodeMetrics(cpu_percent=42, memory_percent=20)) == (
            common_pb2.NODE_STATUS_READY
        )
        metrics = await system()
        assert (metrics.healthy_nodes, metrics.cpu_percent, metrics.total_cpu_cores) == (1, 42, 3)

        # Invalid again: not healthy, left out of the aggregates; the last valid numbers stay.
        assert await beat(stream, 3, bad) == common_pb2.NODE_STATUS_DEGRADED
        metrics = await system()
        assert (metrics.total_nodes, metrics.healthy_nodes, metrics.cpu_percent) == (1, 0, 0)
        current = await node_metrics()
        assert current.current.cpu_percent == 42
        assert [sample.metrics.cpu_percent for sample in current.history] == [42]
        await stored_and_cached()
        await stream.outbox.put(None)


async def test_a_deregistered_nodes_certificate_is_refused_at_once_on_its_other_calls(
    controller: Controller, channel: grpc.aio.Channel
) -> None:
    """The node port remembers a certificate's verification and the node's row check
    (FetchChunk and PushShardResult are one call per chunk or shard statement), but
    deregistering the node forgets them: its next call is refused."""
    token = await _user(channel)
    stub = node_pb2_grpc.NodeServiceStub(channel)
    node = FakeNode()
    reply = await _enroll(stub, token, node)
    async with node.channel(controller) as node_channel:
        node_stub = node_pb2_grpc.NodeServiceStub(node_channel)

        async def fetch_refusal() -> str:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in node_stub.FetchPackage(node_pb2.FetchPackageRequest(sha256="0" * 64)):
                    pass
            return _reason(info.value)

        first = await fetch_refusal()  # no such package for this node, but the node is known
        assert first != "NODE_CERTIFICATE_REVOKED"
        assert await fetch_refusal() == first  # the remembered check: the same answer
        await stub.DeregisterNode(
            node_pb2.DeregisterNodeRequest(node_id=reply.node_id), metadata=bearer(token)
        )
        assert await fetch_refusal() == "NODE_CERTIFICATE_REVOKED"
