"""RegisterNode logic on SQLite and PostgreSQL: validation, tokens, duplicates, certificates, secrets."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from automator67.v1 import common_pb2, node_pb2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select

from controller.errors import AlreadyExists, InvalidArgument, Unauthenticated, Unavailable
from controller.nodes.ca import NODE_URI_PREFIX, CertificateAuthority
from controller.nodes.enrollment import EnrollmentTokens
from controller.nodes.registration import (
    OAUTH_TOKEN_PURPOSE,
    NodeRegistrar,
    decrypt_oauth_token,
    provider_name,
    provider_value,
)
from controller.nodes.repository import NodeRepository
from controller.store import Store, UserRepository
from controller.store.models import Node, NodeEnrollmentToken, User
from controller.vault import Keyring, Vault

OAUTH = "gho_s3cr3t-0auth-t0ken-value-that-must-never-leak"
CONTROLLER_ENDPOINT = "controller.example.com:50052"
HEARTBEAT_MS = 30_000


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def make_csr(common_name: str = "agent") -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


CSR = make_csr()


def timestamp(when: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


def request(token: str, **changes: Any) -> node_pb2.RegisterNodeRequest:
    values: dict[str, Any] = {
        "enrollment_token": token,
        "provider": common_pb2.PROVIDER_RENDER,
        "endpoint": "https://node-1.onrender.com",
        "region": "us-east-1",
        "capabilities": common_pb2.NodeCapabilities(
            cpu_cores=2, memory_gb=4, disk_gb=20, network_bandwidth_mbps=100
        ),
        "csr_pem": CSR,
        "fingerprint": "sha256:0123456789abcdef0123",
    }
    values.update(changes)
    return node_pb2.RegisterNodeRequest(**{k: v for k, v in values.items() if v is not None})


@pytest.fixture
async def user(store: Store) -> User:
    return await UserRepository(store).create("owner@example.com", "hash")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tokens(store: Store, clock: FakeClock) -> EnrollmentTokens:
    return EnrollmentTokens(store, clock=clock)


@pytest.fixture
def nodes(store: Store) -> NodeRepository:
    return NodeRepository(store)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate()


@pytest.fixture(scope="module")
def vault() -> Vault:
    return Vault(Keyring.generate("k1"))


@pytest.fixture
def registrar(
    store: Store,
    tokens: EnrollmentTokens,
    nodes: NodeRepository,
    ca: CertificateAuthority,
    vault: Vault,
    clock: FakeClock,
) -> NodeRegistrar:
    return NodeRegistrar(store, tokens, nodes, ca, vault, CONTROLLER_ENDPOINT, HEARTBEAT_MS, clock=clock)


async def token_for(tokens: EnrollmentTokens, user: User, **kwargs: int) -> str:
    return (await tokens.create(user.id, **kwargs)).token


async def uses_of(store: Store) -> list[int]:
    async with store.session() as session:
        return list((await session.execute(select(NodeEnrollmentToken.uses))).scalars())


async def node_rows(store: Store) -> list[Node]:
    async with store.session() as session:
        return list((await session.execute(select(Node))).scalars())


def row_json(node: Node) -> str:
    return json.dumps({c.name: getattr(node, c.name) for c in Node.__table__.columns}, default=str)


# --- the happy path -----------------------------------------------------------------------------


async def test_register_returns_what_the_node_needs(
    store: Store,
    registrar: NodeRegistrar,
    tokens: EnrollmentTokens,
    user: User,
    ca: CertificateAuthority,
    vault: Vault,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token = await token_for(tokens, user)
    expires = datetime.fromtimestamp(clock.now, UTC).replace(microsecond=0) + timedelta(days=30)
    with caplog.at_level(logging.DEBUG):
        response = await registrar.register(
            request(token, oauth_token=OAUTH, oauth_expires_at=timestamp(expires))
        )

    assert response.node_id
    assert response.controller_endpoint == CONTROLLER_ENDPOINT
    assert response.heartbeat_interval_ms == HEARTBEAT_MS
    assert response.ca_certificate_pem == ca.ca_cert_pem
    cert = x509.load_pem_x509_certificate(response.certificate_pem.encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == response.node_id
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [NODE_URI_PREFIX + response.node_id]
    cert.verify_directly_issued_by(ca.certificate)

    [node] = await node_rows(store)
    assert node.id == response.node_id
    assert node.user_id == user.id
    assert node.status == "initializing"
    assert node.provider == "render"
    assert node.endpoint == "https://node-1.onrender.com"
    assert node.region == "us-east-1"
    assert node.fingerprint == "sha256:0123456789abcdef0123"
    assert node.cert_serial == format(cert.serial_number, "x")
    assert node.capabilities == {
        "cpu_cores": 2.0,
        "memory_gb": 4.0,
        "disk_gb": 20.0,
        "network_bandwidth_mbps": 100.0,
        "max_concurrent_requests": 100,
        "node_types": ["compute"],
    }
    assert set(node.credentials) == {"oauth_token", "oauth_provider", "oauth_expires_at"}
    assert node.credentials["oauth_provider"] == "render"
    assert datetime.fromisoformat(node.credentials["oauth_expires_at"]) == expires
    # Only ciphertext is stored, bound to the node.
    assert OAUTH not in row_json(node)
    assert OAUTH[:12] not in row_json(node)
    assert decrypt_oauth_token(vault, node) == OAUTH
    assert (
        vault.decrypt_str(node.credentials["oauth_token"], owner=node.id, purpose=OAUTH_TOKEN_PURPOSE)
        == OAUTH
    )
    # Never logged, nor the enrollment token.
    for record in caplog.records:
        assert OAUTH not in record.getMessage()
        assert token not in record.getMessage()
    # The token was used.
    assert await uses_of(store) == [1]
    with pytest.raises(Unauthenticated):
        await tokens.peek(token)
    # The certificate identifies the node to the CA.
    assert ca.node_id_from_auth_context({"x509_pem_cert": [response.certificate_pem.encode()]}) == (
        node.id,
        node.cert_serial,
    )


async def test_register_without_an_oauth_token_stores_no_credentials(
    store: Store, registrar: NodeRegistrar, tokens: EnrollmentTokens, user: User, vault: Vault
) -> None:
    caps = common_pb2.NodeCapabilities(
        cpu_cores=0.5,
        memory_gb=0.5,
        max_concurrent_requests=7,
        node_types=["storage", "database", "storage"],
    )
    response = await registrar.register(
        request(await token_for(tokens, user), provider=common_pb2.PROVIDER_FLYIO, capabilities=caps)
    )
    [node] = await node_rows(store)
    assert node.id == response.node_id
    assert node.provider == "flyio"
    assert node.credentials == {}
    assert decrypt_oauth_token(vault, node) is None
    assert node.capabilities["max_concurrent_requests"] == 7
    assert node.capabilities["node_types"] == ["storage", "database"]
    assert node.capabilities["disk_gb"] == 0.0


def test_provider_names() -> None:
    assert provider_name(common_pb2.PROVIDER_NETLIFY) == "netlify"
    assert provider_value("vercel") == common_pb2.PROVIDER_VERCEL
    assert provider_value("nope") == common_pb2.PROVIDER_UNSPECIFIED
    with pytest.raises(ValueError, match="unspecified"):
        provider_name(common_pb2.PROVIDER_UNSPECIFIED)


# --- validation ---------------------------------------------------------------------------------


def caps(**changes: Any) -> common_pb2.NodeCapabilities:
    values: dict[str, Any] = {"cpu_cores": 2, "memory_gb": 4, "disk_gb": 20, "network_bandwidth_mbps": 100}
    values.update(changes)
    return common_pb2.NodeCapabilities(**values)


def past() -> Timestamp:
    return timestamp(datetime.now(UTC) - timedelta(minutes=1))


def future() -> Timestamp:
    return timestamp(datetime.now(UTC) + timedelta(days=1))


CASES: list[tuple[str, Callable[[], dict[str, Any]], str]] = [
    ("no-token", lambda: {"enrollment_token": ""}, "enrollment_token"),
    ("no-provider", lambda: {"provider": common_pb2.PROVIDER_UNSPECIFIED}, "provider"),
    ("unknown-provider", lambda: {"provider": 99}, "provider"),
    ("no-endpoint", lambda: {"endpoint": ""}, "endpoint"),
    ("ftp-endpoint", lambda: {"endpoint": "ftp://node.example.com"}, "endpoint"),
    ("no-scheme", lambda: {"endpoint": "node.example.com"}, "endpoint"),
    ("no-host", lambda: {"endpoint": "https://"}, "endpoint"),
    ("credentials-in-url", lambda: {"endpoint": "https://user:pw@node.example.com"}, "endpoint"),
    ("bad-port", lambda: {"endpoint": "https://node.example.com:99999"}, "endpoint"),
    ("space", lambda: {"endpoint": "https://node example.com"}, "endpoint"),
    ("long-endpoint", lambda: {"endpoint": "https://e.com/" + "a" * 490}, "endpoint"),
    ("no-region", lambda: {"region": ""}, "region"),
    ("upper-region", lambda: {"region": "US-East"}, "region"),
    ("underscore-region", lambda: {"region": "eu_west"}, "region"),
    ("long-region", lambda: {"region": "a" * 101}, "region"),
    ("no-capabilities", lambda: {"capabilities": None}, "capabilities"),
    ("zero-cpu", lambda: {"capabilities": caps(cpu_cores=0)}, "capabilities.cpu_cores"),
    ("nan-cpu", lambda: {"capabilities": caps(cpu_cores=float("nan"))}, "capabilities.cpu_cores"),
    ("negative-memory", lambda: {"capabilities": caps(memory_gb=-1)}, "capabilities.memory_gb"),
    ("inf-memory", lambda: {"capabilities": caps(memory_gb=float("inf"))}, "capabilities.memory_gb"),
    ("negative-disk", lambda: {"capabilities": caps(disk_gb=-0.5)}, "capabilities.disk_gb"),
    (
        "negative-bandwidth",
        lambda: {"capabilities": caps(network_bandwidth_mbps=-1)},
        "capabilities.network_bandwidth_mbps",
    ),
    (
        "inf-bandwidth",
        lambda: {"capabilities": caps(network_bandwidth_mbps=float("-inf"))},
        "capabilities.network_bandwidth_mbps",
    ),
    (
        "negative-concurrency",
        lambda: {"capabilities": caps(max_concurrent_requests=-1)},
        "capabilities.max_concurrent_requests",
    ),
    ("gpu-type", lambda: {"capabilities": caps(node_types=["compute", "gpu"])}, "capabilities.node_types"),
    ("no-csr", lambda: {"csr_pem": ""}, "csr_pem"),
    ("garbage-csr", lambda: {"csr_pem": "-----BEGIN CERTIFICATE REQUEST-----\nxx\n"}, "csr_pem"),
    ("no-fingerprint", lambda: {"fingerprint": ""}, "fingerprint"),
    ("short-fingerprint", lambda: {"fingerprint": "abc"}, "fingerprint"),
    ("long-fingerprint", lambda: {"fingerprint": "a" * 129}, "fingerprint"),
    ("bad-fingerprint", lambda: {"fingerprint": "has spaces in it, ok?"}, "fingerprint"),
    ("huge-oauth", lambda: {"oauth_token": "x" * (8 * 1024 + 1)}, "oauth_token"),
    ("past-expiry", lambda: {"oauth_token": OAUTH, "oauth_expires_at": past()}, "oauth_expires_at"),
    ("expiry-without-token", lambda: {"oauth_expires_at": future()}, "oauth_expires_at"),
]


@pytest.mark.parametrize(("changes", "field"), [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
async def test_each_bad_field_is_invalid_argument_naming_it(
    store: Store,
    registrar: NodeRegistrar,
    tokens: EnrollmentTokens,
    user: User,
    changes: Callable[[], dict[str, Any]],
    field: str,
) -> None:
    token = await token_for(tokens, user)
    with pytest.raises(InvalidArgument) as info:
        await registrar.register(request(token, **changes()))
    assert [v.field for v in info.value.field_violations] == [field]
    assert field in info.value.message
    # Nothing was written and the token is still usable.
    assert await node_rows(store) == []
    assert await uses_of(store) == [0]


async def test_limits_that_are_allowed(
    registrar: NodeRegistrar, tokens: EnrollmentTokens, user: User
) -> None:
    token = await token_for(tokens, user)
    await registrar.register(
        request(
            token,
            endpoint="http://10.0.0.5:8080/" + "a" * (500 - len("http://10.0.0.5:8080/")),
            region="a" * 100,
            fingerprint="A:b_c-" + "0" * 122,
            oauth_token="x" * (8 * 1024),
            capabilities=caps(disk_gb=0, network_bandwidth_mbps=0, max_concurrent_requests=0),
        )
    )


async def test_all_bad_fields_are_reported_at_once(registrar: NodeRegistrar) -> None:
    with pytest.raises(InvalidArgument) as info:
        await registrar.register(node_pb2.RegisterNodeRequest())
    assert {v.field for v in info.value.field_violations} == {
        "enrollment_token",
        "provider",
        "endpoint",
        "region",
        "capabilities",
        "csr_pem",
        "fingerprint",
    }


# --- tokens -------------------------------------------------------------------------------------


async def test_an_unknown_token_is_unauthenticated(store: Store, registrar: NodeRegistrar) -> None:
    with pytest.raises(Unauthenticated) as info:
        await registrar.register(request("a67e_" + "Z" * 43))
    assert info.value.reason == "ENROLLMENT_TOKEN_INVALID"
    assert await node_rows(store) == []


async def test_an_expired_token_is_unauthenticated(
    store: Store, registrar: NodeRegistrar, tokens: EnrollmentTokens, user: User, clock: FakeClock
) -> None:
    token = await token_for(tokens, user, ttl_seconds=60)
    clock.now += 61
    with pytest.raises(Unauthenticated) as info:
        await registrar.register(request(token))
    assert info.value.reason == "ENROLLMENT_TOKEN_INVALID"
    assert await node_rows(store) == []


async def test_a_two_use_token_registers_two_nodes_then_no_more(
    store: Store, registrar: NodeRegistrar, tokens: EnrollmentTokens, user: User
) -> None:
    token = await token_for(tokens, user, max_uses=2)
    first = await registrar.register(request(token, fingerprint="fingerprint-node-0001", csr_pem=make_csr()))
    second = await registrar.register(request(token, fingerprint="fingerprint-node-0002", csr_pem=make_csr()))
    assert first.node_id != second.node_id
    with pytest.raises(Unauthenticated) as info:
        await registrar.register(request(token, fingerprint="fingerprint-node-0003", csr_pem=make_csr()))
    assert info.value.reason == "ENROLLMENT_TOKEN_INVALID"
    assert {n.id for n in await node_rows(store)} == {first.node_id, second.node_id}
    assert await uses_of(store) == [2]


# --- duplicates ---------------------------------------------------------------------------------


async def test_the_same_installation_again_is_already_exists_with_its_node_id(
    store: Store, registrar: NodeRegistrar, tokens: EnrollmentTokens, user: User
) -> None:
    first = await registrar.register(request(await token_for(tokens, user)))
    second_token = await token_for(tokens, user)
    with pytest.raises(AlreadyExists) as info:
        await registrar.register(request(second_token, csr_pem=make_csr()))
    assert info.value.reason == "NODE_ALREADY_REGISTERED"
    assert info.value.metadata == {"node_id": first.node_id}
    # The second token was not used.
    assert sorted(await uses_of(store)) == [0, 1]
    assert await tokens.peek(second_token) == user.id
    assert len(await node_rows(store)) == 1


async def test_the_same_fingerprint_under_another_user_is_another_node(
    store: Store, registrar: NodeRegistrar, tokens: EnrollmentTokens, user: User
) -> None:
    other = await UserRepository(store).create("other@example.com", "hash")
    a = await registrar.register(request(await token_for(tokens, user)))
    b = await registrar.register(request(await token_for(tokens, other)))
    assert a.node_id != b.node_id


async def test_concurrent_registrations_of_one_installation_use_the_token_once(
    store: Store, registrar: NodeRegistrar, tokens: EnrollmentTokens, user: User
) -> None:
    token = await token_for(tokens, user, max_uses=10)

    async def attempt() -> node_pb2.RegisterNodeResponse | AlreadyExists:
        try:
            return await registrar.register(request(token))
        except AlreadyExists as exc:
            return exc

    results = await asyncio.gather(*(attempt() for _ in range(6)))
    winners = [r for r in results if isinstance(r, node_pb2.RegisterNodeResponse)]
    losers = [r for r in results if isinstance(r, AlreadyExists)]
    assert len(winners) == 1
    assert len(losers) == 5
    assert {e.metadata["node_id"] for e in losers} == {winners[0].node_id}
    # The losers' token uses were rolled back with their inserts.
    assert await uses_of(store) == [1]
    assert [n.id for n in await node_rows(store)] == [winners[0].node_id]


async def test_a_removed_installation_may_enroll_again(
    store: Store, registrar: NodeRegistrar, tokens: EnrollmentTokens, nodes: NodeRepository, user: User
) -> None:
    first = await registrar.register(request(await token_for(tokens, user)))
    await nodes.mark_removed(first.node_id, datetime.now(UTC))
    second = await registrar.register(request(await token_for(tokens, user), csr_pem=make_csr()))
    assert second.node_id != first.node_id


# --- the store down -----------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_store_down_is_unavailable(ca: CertificateAuthority, vault: Vault) -> None:
    down = await Store.open(f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/none", check=False)
    try:
        registrar = NodeRegistrar(
            down, EnrollmentTokens(down), NodeRepository(down), ca, vault, CONTROLLER_ENDPOINT, HEARTBEAT_MS
        )
        with pytest.raises(Unavailable) as info:
            await registrar.register(request("a67e_" + "Z" * 43))
        assert info.value.reason == "STORE_UNAVAILABLE"
    finally:
        await down.close()
