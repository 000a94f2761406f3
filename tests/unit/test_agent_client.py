"""The agent against a real grpc.aio server on port 0 with a small fake NodeService.

The fake signs the agent's CSR with a throwaway CA, serves the stream on a second,
mutual-TLS port (server certificate for DNS ``automator67-controller``), answers the
hello with a 200 ms interval, acknowledges heartbeats, sends commands on the first
connection and then ends that stream to force a reconnect.

Also here: the identity files (node.key 0600, resume without enrolling), the
keepalive numbers, endpoint resolution, provider names and the ``agent`` flags.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import itertools
import json
import logging
import os
import signal
import stat
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from automator67.v1 import common_pb2, node_pb2, node_pb2_grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from controller.agent import Agent, AgentConfig, CommandHandlers, ok_result
from controller.agent.cli import add_agent_parser, config_from_args
from controller.agent.client import (
    EXIT_FAILURE,
    keepalive_options,
    provider_value,
    resolve_stream_endpoint,
    server_keepalive_options,
)
from controller.agent.identity import Enrollment, Identity, IdentityError

INTERVAL_MS = 200
TOKEN = "enroll-s3cret-token-value"
OAUTH = "oauth-s3cret-token-value"
SERVER_NAME = "automator67-controller"
REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- a throwaway PKI


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class Pki:
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    server_key_pem: bytes
    server_cert_pem: bytes

    @property
    def ca_pem(self) -> bytes:
        return self.ca_cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create(cls) -> Pki:
        now = dt.datetime.now(dt.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test node CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )
        server_key = ec.generate_private_key(ec.SECP256R1())
        server_cert = cls._issue(
            ca_key,
            ca_cert,
            server_key.public_key(),
            "controller",
            ExtendedKeyUsageOID.SERVER_AUTH,
            san=x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]),
        )
        return cls(ca_key, ca_cert, _pem(server_key), server_cert.public_bytes(serialization.Encoding.PEM))

    @staticmethod
    def _issue(
        ca_key: ec.EllipticCurvePrivateKey,
        ca_cert: x509.Certificate,
        public_key: Any,
        common_name: str,
        usage: x509.ObjectIdentifier,
        san: x509.SubjectAlternativeName | None = None,
    ) -> x509.Certificate:
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    def sign_csr(self, csr_pem: str, node_id: str) -> bytes:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        assert csr.is_signature_valid
        cert = self._issue(
            self.ca_key, self.ca_cert, csr.public_key(), node_id, ExtendedKeyUsageOID.CLIENT_AUTH
        )
        return cert.public_bytes(serialization.Encoding.PEM)


# --------------------------------------------------------------------------- the fake controller


@dataclass
class Connection:
    """One Connect stream as the fake controller saw it."""

    node_id: str
    generation: int
    first_kind: str | None = None
    hello: node_pb2.NodeHello | None = None
    heartbeats: list[tuple[float, node_pb2.Heartbeat]] = field(default_factory=list)
    results: list[node_pb2.CommandResult] = field(default_factory=list)
    ended_by_client: bool = False


def _status(code: int, message: str, *details: Any) -> status_pb2.Status:
    packed = []
    for detail in details:
        wrapper = any_pb2.Any()
        wrapper.Pack(detail)
        packed.append(wrapper)
    return status_pb2.Status(code=code, message=message, details=packed)


class FakeNodeService(node_pb2_grpc.NodeServiceServicer):
    """RegisterNode signs the CSR; Connect acks, commands, and ends the first stream."""

    def __init__(self, pki: Pki) -> None:
        self.pki = pki
        self.stream_endpoint = ""
        self.registrations: list[node_pb2.RegisterNodeRequest] = []
        self.register_errors: list[status_pb2.Status] = []
        self.connections: list[Connection] = []
        self.hang_up_after: node_pb2.NodeCommand | None = None
        """If set, the first stream sends this command right after the hello_ack and ends."""
        self.later_commands: list[node_pb2.NodeCommand] = []
        """Sent right after the hello_ack on every stream after the first."""
        self.commands = [
            node_pb2.NodeCommand(
                command_id="cmd-stop", stop_replica=node_pb2.StopReplica(deployment_id="d1", replica_index=0)
            ),
            node_pb2.NodeCommand(
                command_id="cmd-deploy", deploy_replica=node_pb2.DeployReplica(deployment_id="d1")
            ),
        ]

    async def RegisterNode(
        self, request: node_pb2.RegisterNodeRequest, context: Any
    ) -> node_pb2.RegisterNodeResponse:
        self.registrations.append(request)
        if self.register_errors:
            await context.abort_with_status(rpc_status.to_status(self.register_errors.pop(0)))
        if request.enrollment_token != TOKEN:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid enrollment token")
        node_id = f"node-{len(self.registrations)}"
        return node_pb2.RegisterNodeResponse(
            node_id=node_id,
            controller_endpoint=self.stream_endpoint,
            certificate_pem=self.pki.sign_csr(request.csr_pem, node_id).decode(),
            ca_certificate_pem=self.pki.ca_pem.decode(),
            heartbeat_interval_ms=INTERVAL_MS,
        )

    async def Connect(self, request_iterator: Any, context: Any) -> None:
        loop = asyncio.get_running_loop()
        common_names = context.auth_context().get("x509_common_name", [b"?"])
        conn = Connection(node_id=common_names[0].decode(), generation=len(self.connections) + 1)
        self.connections.append(conn)
        first = await context.read()
        conn.first_kind = None if first is grpc.aio.EOF else first.WhichOneof("message")
        if conn.first_kind != "hello":
            return
        conn.hello = first.hello
        await context.write(
            node_pb2.ConnectResponse(
                hello_ack=node_pb2.HelloAck(generation=conn.generation, heartbeat_interval_ms=INTERVAL_MS)
            )
        )
        if conn.generation == 1 and self.hang_up_after is not None:
            await context.write(node_pb2.ConnectResponse(command=self.hang_up_after))
            return
        for command in self.later_commands if conn.generation > 1 else ():
            await context.write(node_pb2.ConnectResponse(command=command))
        while True:
            request = await context.read()
            if request is grpc.aio.EOF:
                conn.ended_by_client = True
                return
            kind = request.WhichOneof("message")
            if kind == "heartbeat":
                conn.heartbeats.append((loop.time(), request.heartbeat))
                await context.write(
                    node_pb2.ConnectResponse(
                        heartbeat_ack=node_pb2.HeartbeatAck(
                            sequence=request.heartbeat.sequence, status=common_pb2.NODE_STATUS_READY
                        )
                    )
                )
                if conn.generation == 1 and len(conn.heartbeats) == 2:
                    for command in self.commands:
                        await context.write(node_pb2.ConnectResponse(command=command))
            elif kind == "result":
                conn.results.append(request.result)
            if conn.generation == 1 and len(conn.results) >= len(self.commands) and len(conn.heartbeats) >= 3:
                return  # end the first stream: the agent must reconnect


@dataclass
class FakeController:
    service: FakeNodeService
    address: str
    stream_endpoint: str


@pytest.fixture
async def controller() -> AsyncIterator[FakeController]:
    pki = Pki.create()
    service = FakeNodeService(pki)
    server = grpc.aio.server(options=server_keepalive_options(INTERVAL_MS))
    node_pb2_grpc.add_NodeServiceServicer_to_server(service, server)
    plain_port = server.add_insecure_port("127.0.0.1:0")
    credentials = grpc.ssl_server_credentials(
        [(pki.server_key_pem, pki.server_cert_pem)], root_certificates=pki.ca_pem, require_client_auth=True
    )
    mtls_port = server.add_secure_port("127.0.0.1:0", credentials)
    # A wildcard host, as a controller listening on all interfaces may advertise: the
    # agent must dial the host it enrolled through instead.
    service.stream_endpoint = f"0.0.0.0:{mtls_port}"
    await server.start()
    try:
        yield FakeController(service, f"127.0.0.1:{plain_port}", f"127.0.0.1:{mtls_port}")
    finally:
        await server.stop(None)


def agent_config(controller: FakeController, data_dir: Path, **overrides: Any) -> AgentConfig:
    values: dict[str, Any] = {
        "controller": controller.address,
        "token": TOKEN,
        "oauth_token": OAUTH,
        "provider": common_pb2.PROVIDER_RAILWAY,
        "endpoint": "http://node.test:8080",
        "region": "eu-test",
        "data_dir": data_dir,
        "backoff_base_s": 0.05,
        "backoff_cap_s": 0.2,
        "close_timeout_s": 0.5,
    }
    values.update(overrides)
    return AgentConfig(**values)


async def wait_until(predicate: Callable[[], bool], within: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def stop_replica_handlers() -> CommandHandlers:
    handlers = CommandHandlers()

    @handlers.register("stop_replica")
    async def stop_replica(command: node_pb2.NodeCommand) -> node_pb2.CommandResult:
        return ok_result(command, {"stopped": command.stop_replica.deployment_id})

    return handlers


# --------------------------------------------------------------------------- the whole flow


async def test_enrolls_once_streams_answers_commands_reconnects_and_resumes(
    controller: FakeController, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    service = controller.service
    data_dir = tmp_path / "agent"
    agent = Agent(agent_config(controller, data_dir), handlers=stop_replica_handlers())
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))

    # Reconnected after the first stream ended, and heartbeating on the second.
    await wait_until(lambda: len(service.connections) >= 2 and len(service.connections[1].heartbeats) >= 2)

    # Enrolled exactly once, with what the brief asks for.
    assert len(service.registrations) == 1
    registration = service.registrations[0]
    assert registration.enrollment_token == TOKEN
    assert registration.oauth_token == OAUTH
    assert registration.provider == common_pb2.PROVIDER_RAILWAY
    assert (registration.endpoint, registration.region) == ("http://node.test:8080", "eu-test")
    caps = registration.capabilities
    assert caps.cpu_cores >= 1
    assert caps.memory_gb > 0
    assert caps.disk_gb > 0
    assert caps.network_bandwidth_mbps == 100
    assert caps.max_concurrent_requests == 100
    assert list(caps.node_types) == ["compute"]
    csr_key = x509.load_pem_x509_csr(registration.csr_pem.encode()).public_key()
    spki = csr_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert registration.fingerprint == hashlib.sha256(spki).hexdigest()

    first, second = service.connections[:2]
    # Same node id (the certificate's CN) on both connections, hello first on each.
    assert first.node_id == second.node_id == agent.node_id == "node-1"
    assert first.first_kind == second.first_kind == "hello"
    assert first.hello is not None
    assert first.hello.capabilities.cpu_cores == caps.cpu_cores
    assert first.hello.agent_version

    # Heartbeats at the interval the hello_ack gave, with increasing sequences and real metrics.
    times = [t for t, _ in first.heartbeats]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) >= 2
    assert all(gap > 0.1 for gap in gaps), gaps
    assert 0.15 <= sum(gaps) / len(gaps) <= 0.35, gaps
    sequences = [hb.sequence for _, hb in first.heartbeats + second.heartbeats]
    assert sequences == sorted(set(sequences))
    for _, heartbeat in first.heartbeats:
        m = heartbeat.metrics
        for percent in (m.cpu_percent, m.memory_percent, m.disk_percent, m.error_rate):
            assert 0 <= percent <= 100
        assert m.uptime_seconds >= 0
        assert heartbeat.sent_at.seconds > 0

    # Both commands answered: the registered handler's result, and "unsupported" for the other.
    results = {r.command_id: r for r in first.results}
    assert results["cmd-stop"].ok
    assert json.loads(results["cmd-stop"].payload) == {"stopped": "d1"}
    assert not results["cmd-deploy"].ok
    assert results["cmd-deploy"].error_message == "unsupported command deploy_replica"

    assert agent.connected
    assert agent.generation == 2
    assert agent.heartbeats_sent >= 5
    assert agent.last_ack_rtt_ms is not None
    assert 0 <= agent.last_ack_rtt_ms < 1000
    assert agent.node_status == common_pb2.NODE_STATUS_READY

    # SIGTERM's path: stop closes the stream cleanly (the server sees the half-close).
    stop.set()
    assert await asyncio.wait_for(task, 3) == 0
    await wait_until(lambda: service.connections[-1].ended_by_client)
    assert not agent.connected

    # The identity on disk.
    key_mode = stat.S_IMODE((data_dir / "node.key").stat().st_mode)
    assert key_mode == 0o600
    record = json.loads((data_dir / "node.json").read_text())
    assert record == {
        "node_id": "node-1",
        "controller_endpoint": controller.stream_endpoint,
        "heartbeat_interval_ms": INTERVAL_MS,
    }

    # A second start on the same data directory resumes without enrolling.
    again = Agent(agent_config(controller, data_dir, token=""))
    stop2 = asyncio.Event()
    task2 = asyncio.create_task(again.run(stop2))
    before = len(service.connections)
    await wait_until(
        lambda: len(service.connections) > before and len(service.connections[-1].heartbeats) >= 1
    )
    assert len(service.registrations) == 1
    assert again.node_id == "node-1"
    assert service.connections[-1].node_id == "node-1"
    stop2.set()
    assert await asyncio.wait_for(task2, 3) == 0

    # Secrets never reach the logs.
    assert TOKEN not in caplog.text
    assert OAUTH not in caplog.text
    assert "PRIVATE KEY" not in caplog.text
    assert "enrolled as node node-1" in caplog.text
    assert "resuming as node node-1" in caplog.text


async def test_a_result_ready_while_disconnected_is_sent_on_the_next_stream_once(
    controller: FakeController, tmp_path: Path
) -> None:
    """A slow command outlives its stream: its result arrives on the next one, heartbeats
    keep flowing meanwhile, and the same command sent again is not run twice."""
    service = controller.service
    slow = node_pb2.NodeCommand(command_id="cmd-slow", stop_replica=node_pb2.StopReplica(deployment_id="d9"))
    release = asyncio.Event()
    runs: list[str] = []
    handlers = CommandHandlers()

    @handlers.register("stop_replica")
    async def stop_replica(command: node_pb2.NodeCommand) -> node_pb2.CommandResult:
        runs.append(command.command_id)
        await release.wait()
        return ok_result(command)

    service.hang_up_after = slow
    service.later_commands = [slow]  # sent again while it still runs
    agent = Agent(agent_config(controller, tmp_path / "agent"), handlers=handlers)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await wait_until(lambda: len(service.connections) >= 2 and len(service.connections[1].heartbeats) >= 3)
    assert runs == ["cmd-slow"]  # still running, and not started a second time
    assert service.connections[1].results == []
    release.set()
    await wait_until(lambda: bool(service.connections[1].results))
    await asyncio.sleep(INTERVAL_MS / 1000)  # room for a (wrong) second result
    assert [r.command_id for r in service.connections[1].results] == ["cmd-slow"]
    assert service.connections[1].results[0].ok
    assert runs == ["cmd-slow"]
    stop.set()
    assert await asyncio.wait_for(task, 3) == 0


# --------------------------------------------------------------------------- enrollment errors


def _error_info(reason: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain="automator67.dev", metadata=metadata)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        pytest.param(
            _status(code_pb2.UNAUTHENTICATED, "the enrollment token is invalid or expired"),
            "refused the enrollment token",
            id="bad-token-unauthenticated",
        ),
        pytest.param(
            _status(
                code_pb2.INVALID_ARGUMENT,
                "The request has invalid fields",
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field="region", description="too long")
                    ]
                ),
            ),
            "region: too long",
            id="invalid-argument-with-field-violations",
        ),
        pytest.param(
            _status(
                code_pb2.ALREADY_EXISTS,
                "this node is already registered",
                _error_info("NODE_ALREADY_REGISTERED", node_id="node-42"),
            ),
            "already registered as node node-42, but its certificate is missing",
            id="already-exists-names-the-node",
        ),
        pytest.param(
            _status(code_pb2.PERMISSION_DENIED, "no"),
            "enrollment failed: PERMISSION_DENIED",
            id="other-codes-are-final",
        ),
    ],
)
async def test_enrollment_refusals_exit_nonzero_with_a_clear_message(
    controller: FakeController,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    status: status_pb2.Status,
    expected: str,
) -> None:
    controller.service.register_errors.append(status)
    agent = Agent(agent_config(controller, tmp_path / "agent"))
    code = await asyncio.wait_for(agent.run(asyncio.Event()), 3)
    assert code == EXIT_FAILURE
    assert len(controller.service.registrations) == 1
    assert expected in caplog.text
    assert TOKEN not in caplog.text
    assert not (tmp_path / "agent" / "node.json").exists()


async def test_enrollment_retries_while_unavailable(controller: FakeController, tmp_path: Path) -> None:
    unavailable = _status(code_pb2.UNAVAILABLE, "store down")
    controller.service.register_errors.extend([unavailable, unavailable])
    agent = Agent(agent_config(controller, tmp_path / "agent"))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await wait_until(lambda: agent.connected)
    assert len(controller.service.registrations) == 3
    stop.set()
    assert await asyncio.wait_for(task, 3) == 0


async def test_stop_during_enrollment_retries_exits_zero(controller: FakeController, tmp_path: Path) -> None:
    controller.service.register_errors.extend([_status(code_pb2.UNAVAILABLE, "down")] * 100)
    agent = Agent(agent_config(controller, tmp_path / "agent", backoff_base_s=10.0, backoff_cap_s=10.0))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await wait_until(lambda: len(controller.service.registrations) >= 1)
    stop.set()
    assert await asyncio.wait_for(task, 2) == 0


async def test_missing_token_on_first_start_exits_nonzero(
    controller: FakeController, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent = Agent(agent_config(controller, tmp_path / "agent", token=""))
    assert await agent.run(asyncio.Event()) == EXIT_FAILURE
    assert "--token" in caplog.text
    assert controller.service.registrations == []


# --------------------------------------------------------------------------- a real process


async def test_agent_process_exits_zero_on_sigterm(controller: FakeController, tmp_path: Path) -> None:
    script = (
        "import argparse, sys\n"
        "from controller.agent.cli import add_agent_parser\n"
        "parser = argparse.ArgumentParser(prog='a67')\n"
        "add_agent_parser(parser.add_subparsers(dest='command', required=True))\n"
        "args = parser.parse_args(sys.argv[1:])\n"
        "sys.exit(args.func(args))\n"
    )
    env = {**os.environ, "A67_AGENT_TOKEN": TOKEN, "A67_AGENT_OAUTH_TOKEN": OAUTH}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        "agent",
        "--controller",
        controller.address,
        "--provider",
        "flyio",
        "--data-dir",
        str(tmp_path / "agent"),
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        service = controller.service
        await wait_until(
            lambda: bool(service.connections) and bool(service.connections[-1].heartbeats), within=10
        )
        assert service.registrations[0].provider == common_pb2.PROVIDER_FLYIO
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 5)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    log_text = stderr.decode()
    assert process.returncode == 0, log_text
    assert "connected to" in log_text
    assert "agent stopped" in log_text
    assert TOKEN not in log_text
    assert OAUTH not in log_text
    await wait_until(lambda: service.connections[-1].ended_by_client)


# --------------------------------------------------------------------------- identity


def _enrollment_for(identity: Identity, pki: Pki, node_id: str = "node-7") -> Enrollment:
    return Enrollment(
        node_id=node_id,
        controller_endpoint="127.0.0.1:50052",
        heartbeat_interval_ms=1000,
        certificate_pem=pki.sign_csr(identity.build_csr(), node_id),
        ca_certificate_pem=pki.ca_pem,
    )


def test_identity_key_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    identity = Identity(tmp_path / "data")
    fingerprint = identity.fingerprint()
    key_path = tmp_path / "data" / "node.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
    assert Identity(tmp_path / "data").fingerprint() == fingerprint  # stable per installation
    assert len(fingerprint) == 64
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["node.key"]  # no temporary files left


def test_identity_tightens_a_key_readable_by_others(tmp_path: Path) -> None:
    Identity(tmp_path).key()
    (tmp_path / "node.key").chmod(0o644)
    Identity(tmp_path).key()
    assert stat.S_IMODE((tmp_path / "node.key").stat().st_mode) == 0o600


def test_identity_saves_and_loads_an_enrollment(tmp_path: Path) -> None:
    pki = Pki.create()
    identity = Identity(tmp_path)
    assert identity.load() is None
    enrollment = _enrollment_for(identity, pki)
    identity.save(enrollment)
    assert {p.name for p in tmp_path.iterdir()} == {"node.key", "node.crt", "ca.crt", "node.json"}
    assert stat.S_IMODE((tmp_path / "node.json").stat().st_mode) == 0o600
    assert Identity(tmp_path).load() == enrollment
    # Without its certificate the installation is not enrolled, but its node id is still known.
    (tmp_path / "node.crt").unlink()
    assert Identity(tmp_path).load() is None
    assert Identity(tmp_path).recorded_node_id() == "node-7"


def test_identity_refuses_a_certificate_for_another_key(tmp_path: Path) -> None:
    pki = Pki.create()
    other = Identity(tmp_path / "other")
    enrollment = _enrollment_for(other, pki)
    with pytest.raises(IdentityError, match="not issued for this installation"):
        Identity(tmp_path / "mine").save(enrollment)


def test_identity_rejects_a_corrupt_key(tmp_path: Path) -> None:
    (tmp_path / "node.key").write_bytes(b"not a key")
    (tmp_path / "node.key").chmod(0o600)
    with pytest.raises(IdentityError, match="not a usable"):
        Identity(tmp_path).key()


# --------------------------------------------------------------------------- small pure helpers


@pytest.mark.parametrize(
    ("interval_ms", "expected"),
    [
        pytest.param(
            200, {"grpc.keepalive_time_ms": 500, "grpc.keepalive_timeout_ms": 500}, id="fast-floor-500ms"
        ),
        pytest.param(
            1000, {"grpc.keepalive_time_ms": 500, "grpc.keepalive_timeout_ms": 500}, id="one-second"
        ),
        pytest.param(
            30_000, {"grpc.keepalive_time_ms": 15_000, "grpc.keepalive_timeout_ms": 15_000}, id="spec-default"
        ),
    ],
)
def test_keepalive_options(interval_ms: int, expected: dict[str, int]) -> None:
    options = dict(keepalive_options(interval_ms))
    assert options == {
        **expected,
        "grpc.keepalive_permit_without_calls": 1,
        "grpc.http2.max_pings_without_data": 0,
    }
    server = dict(server_keepalive_options(interval_ms))
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= options["grpc.keepalive_time_ms"]


@pytest.mark.parametrize(
    ("advertised", "enrolled_via", "expected"),
    [
        ("ctl.example.com:50052", "10.0.0.1:50051", "ctl.example.com:50052"),
        ("0.0.0.0:50052", "10.0.0.1:50051", "10.0.0.1:50052"),
        ("[::]:50052", "ctl.example.com:50051", "ctl.example.com:50052"),
        (":50052", "[::1]:50051", "[::1]:50052"),
        ("dns:///ctl:50052", "x:1", "dns:///ctl:50052"),
    ],
)
def test_resolve_stream_endpoint(advertised: str, enrolled_via: str, expected: str) -> None:
    assert resolve_stream_endpoint(advertised, enrolled_via) == expected


def test_provider_names() -> None:
    assert provider_value("render") == common_pb2.PROVIDER_RENDER
    assert provider_value("Fly.io") == common_pb2.PROVIDER_FLYIO
    assert provider_value("netlify") == common_pb2.PROVIDER_NETLIFY
    with pytest.raises(ValueError, match="unknown provider"):
        provider_value("heroku")


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="a67")
    add_agent_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["agent", *argv])


def test_agent_flags_build_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("A67_AGENT_OAUTH_TOKEN", OAUTH)
    monkeypatch.delenv("A67_AGENT_TOKEN", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    args = _parse(
        "--controller",
        "ctl:50051",
        "--token-file",
        str(token_file),
        "--provider",
        "vercel",
        "--region",
        "us-east",
        "--node-types",
        "compute,storage",
        "--bandwidth-mbps",
        "250",
        "--max-concurrent",
        "20",
        "--data-dir",
        str(tmp_path),
    )
    assert callable(args.func)
    config = config_from_args(args)
    assert config.controller == "ctl:50051"
    assert config.token == TOKEN
    assert config.oauth_token == OAUTH
    assert config.provider == common_pb2.PROVIDER_VERCEL
    assert config.region == "us-east"
    assert config.node_types == ("compute", "storage")
    assert (config.bandwidth_mbps, config.max_concurrent_requests) == (250.0, 20)
    assert config.data_dir == tmp_path
    assert config.endpoint.endswith(":8080")
    assert TOKEN not in repr(config)
    assert OAUTH not in repr(config)


def test_agent_flags_defaults_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("A67_AGENT_PROVIDER", "RENDER", "RAILWAY_ENVIRONMENT", "FLY_APP_NAME", "VERCEL", "NETLIFY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("A67_AGENT_TOKEN", TOKEN)
    monkeypatch.setenv("FLY_APP_NAME", "my-node")
    config = config_from_args(_parse("--controller", "ctl:50051"))
    assert config.token == TOKEN
    assert config.provider == common_pb2.PROVIDER_FLYIO  # detected from the platform
    assert config.region == "local"
    assert config.node_types == ("compute",)
    assert config.controller_tls_ca is None


def test_agent_flags_reject_unknown_node_types() -> None:
    with pytest.raises(SystemExit):
        _parse("--node-types", "compute,gpu")
