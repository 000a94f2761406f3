"""The node CA: CSR signing, peer identity from the TLS auth context, files on disk, real mTLS."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import stat
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from controller.errors import FailedPrecondition, InvalidArgument
from controller.nodes.ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    NODE_URI_PREFIX,
    SERVER_NAME,
    CertificateAuthority,
    parse_node_csr,
)

NODE_ID = "3f0c2a8e-6d1b-4b7a-9c55-0d6e2f1a7b90"


def make_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, common_name: str = "agent") -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load(cert_pem: str | bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(cert_pem.encode() if isinstance(cert_pem, str) else cert_pem)


def auth_context_of(cert_pem: str | bytes) -> dict[str, list[bytes]]:
    raw = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    return {"transport_security_type": [b"ssl"], "x509_pem_cert": [raw]}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate()


@pytest.fixture(scope="module")
def foreign_ca() -> CertificateAuthority:
    return CertificateAuthority.generate()


# --- signing ------------------------------------------------------------------------------------


def test_signed_certificate_names_the_node_and_allows_client_auth_only(ca: CertificateAuthority) -> None:
    key = make_key()
    signed = ca.sign_node_csr(make_csr(key), NODE_ID)
    cert = load(signed.cert_pem)

    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == NODE_ID
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [NODE_URI_PREFIX + NODE_ID]
    assert sans.get_values_for_type(x509.DNSName) == []
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.issuer == ca.certificate.subject
    cert.verify_directly_issued_by(ca.certificate)
    assert signed.serial_hex == format(cert.serial_number, "x")
    assert cert.serial_number.bit_length() > 64
    assert signed.not_after == cert.not_valid_after_utc
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=364) < lifetime <= dt.timedelta(days=365)
    pub = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert (
        cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == pub
    )


def test_serials_differ(ca: CertificateAuthority) -> None:
    csr = make_csr(make_key())
    assert ca.sign_node_csr(csr, NODE_ID).serial_hex != ca.sign_node_csr(csr, NODE_ID).serial_hex


def test_the_subject_and_extensions_a_csr_asks_for_are_ignored(ca: CertificateAuthority) -> None:
    key = make_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other-node")]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(NODE_URI_PREFIX + "other-node"), x509.DNSName("evil")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    signed = ca.sign_node_csr(csr.public_bytes(serialization.Encoding.PEM).decode(), NODE_ID)
    cert = load(signed.cert_pem)

    assert cert.subject.rfc4514_string() == f"CN={NODE_ID}"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(sans) == [x509.UniformResourceIdentifier(NODE_URI_PREFIX + NODE_ID)]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert ca.node_id_from_auth_context(auth_context_of(signed.cert_pem)) == (NODE_ID, signed.serial_hex)


@pytest.mark.parametrize("key_size", [2048, 3072])
def test_rsa_csrs_are_accepted(ca: CertificateAuthority, key_size: int) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    signed = ca.sign_node_csr(make_csr(key), NODE_ID)
    assert ca.node_id_from_auth_context(auth_context_of(signed.cert_pem)) == (NODE_ID, signed.serial_hex)


def _tampered_csr() -> str:
    pem = make_csr(make_key(), common_name="agent-aaaa")
    der = x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER)
    index = der.index(b"agent-aaaa")
    tampered = der[:index] + b"agent-bbbb" + der[index + len(b"agent-aaaa") :]
    return x509.load_der_x509_csr(tampered).public_bytes(serialization.Encoding.PEM).decode()


def _ed25519_csr() -> str:
    key = ed25519.Ed25519PrivateKey.generate()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent")]))
        .sign(key, None)
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _small_rsa_csr() -> str:
    return make_csr(rsa.generate_private_key(public_exponent=65537, key_size=1024))  # noqa: S505 - refused, on purpose


def _p521_csr() -> str:
    return make_csr(ec.generate_private_key(ec.SECP521R1()))


def _certificate_not_csr() -> str:
    return CertificateAuthority.generate().ca_cert_pem


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (_tampered_csr, "signature"),
        (_ed25519_csr, "unsupported key"),
        (_small_rsa_csr, "unsupported RSA key size"),
        (_p521_csr, "unsupported curve"),
        (lambda: "", "required"),
        (lambda: "   \n", "required"),
        (lambda: "garbage", "not a PEM"),
        (
            lambda: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "not a PEM",
        ),
        (_certificate_not_csr, "not a PEM"),
        (lambda: "x" * 20000, "at most"),
    ],
    ids=[
        "tampered",
        "ed25519",
        "rsa-1024",
        "p-521",
        "empty",
        "blank",
        "garbage",
        "bad-der",
        "certificate",
        "huge",
    ],
)
def test_bad_csrs_are_invalid_argument_on_csr_pem(
    ca: CertificateAuthority, make: Callable[[], str], words: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        ca.sign_node_csr(make(), NODE_ID)
    assert [v.field for v in info.value.field_violations] == ["csr_pem"]
    assert words in info.value.field_violations[0].description
    with pytest.raises(InvalidArgument):
        parse_node_csr(make())


@pytest.mark.parametrize("node_id", ["", "a b", "x" * 65, "../etc", "-leading-dash"])
def test_node_ids_are_checked(ca: CertificateAuthority, node_id: str) -> None:
    with pytest.raises(ValueError, match="node ids"):
        ca.sign_node_csr(make_csr(make_key()), node_id)


# --- identity from the auth context -------------------------------------------------------------


def test_a_certificate_of_another_ca_has_no_identity(
    ca: CertificateAuthority, foreign_ca: CertificateAuthority
) -> None:
    signed = foreign_ca.sign_node_csr(make_csr(make_key()), NODE_ID)
    assert foreign_ca.node_id_from_auth_context(auth_context_of(signed.cert_pem)) is not None
    assert ca.node_id_from_auth_context(auth_context_of(signed.cert_pem)) is None


def test_a_certificate_with_our_issuer_name_but_another_key_has_no_identity(ca: CertificateAuthority) -> None:
    impostor_key = make_key()
    now = dt.datetime.now(dt.UTC)
    forged = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NODE_ID)]))
        .issuer_name(ca.certificate.subject)
        .public_key(make_key().public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(NODE_URI_PREFIX + NODE_ID)]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(impostor_key, hashes.SHA256())
    )
    assert (
        ca.node_id_from_auth_context(auth_context_of(forged.public_bytes(serialization.Encoding.PEM))) is None
    )


def test_the_server_certificate_is_not_a_node_identity(ca: CertificateAuthority) -> None:
    _, cert_pem = ca.server_certificate(["localhost"])
    assert ca.node_id_from_auth_context(auth_context_of(cert_pem)) is None


@pytest.mark.parametrize(
    "context",
    [
        {},
        {"transport_security_type": [b"insecure"]},
        {"x509_pem_cert": []},
        {"x509_pem_cert": [b""]},
        {"x509_pem_cert": [b"not a certificate"]},
    ],
)
def test_no_or_bad_certificate_in_the_auth_context_is_no_identity(
    ca: CertificateAuthority, context: dict[str, list[bytes]]
) -> None:
    assert ca.node_id_from_auth_context(context) is None


def test_an_expired_certificate_has_no_identity() -> None:
    now = [time.time()]
    ca = CertificateAuthority.generate(clock=lambda: now[0])
    signed = ca.sign_node_csr(make_csr(make_key()), NODE_ID, valid_days=1)
    assert ca.node_id_from_auth_context(auth_context_of(signed.cert_pem)) == (NODE_ID, signed.serial_hex)
    now[0] += 2 * 86400
    assert ca.node_id_from_auth_context(auth_context_of(signed.cert_pem)) is None


# --- the server certificate ---------------------------------------------------------------------


def test_server_certificate_names(ca: CertificateAuthority) -> None:
    key_bytes, cert_bytes = ca.server_certificate(
        ["controller.example.com", "127.0.0.1", "[::1]", "0.0.0.0", "", "127.0.0.1"]  # noqa: S104 - skipped, on purpose
    )
    cert = load(cert_bytes)
    serialization.load_pem_private_key(key_bytes, password=None)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [SERVER_NAME, "controller.example.com"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    cert.verify_directly_issued_by(ca.certificate)


# --- files --------------------------------------------------------------------------------------


def test_load_or_create_generates_once_then_reuses(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    keys = tmp_path / "keys"
    with caplog.at_level(logging.INFO, logger="controller.nodes.ca"):
        first = CertificateAuthority.load_or_create(keys)
    assert any("generated the node CA" in r.getMessage() for r in caplog.records)
    assert mode(keys / CA_KEY_FILE) == 0o600
    assert mode(keys / CA_CERT_FILE) == 0o600
    assert mode(keys) == 0o700
    assert list(keys.glob(".*")) == []  # no temporary files left

    cert = first.certificate
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime >= dt.timedelta(days=3650)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="controller.nodes.ca"):
        second = CertificateAuthority.load_or_create(keys)
    assert not any("generated" in r.getMessage() for r in caplog.records)
    assert second.ca_cert_pem == first.ca_cert_pem
    # A certificate from the first instance is accepted by the reloaded one.
    signed = first.sign_node_csr(make_csr(make_key()), NODE_ID)
    assert second.node_id_from_auth_context(auth_context_of(signed.cert_pem)) == (NODE_ID, signed.serial_hex)
    # Key bytes are never logged.
    key_text = (keys / CA_KEY_FILE).read_text()
    body = "".join(key_text.splitlines()[1:-1])
    assert all(body[:40] not in r.getMessage() for r in caplog.records)


def test_load_or_create_tightens_a_readable_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    CertificateAuthority.load_or_create(keys)
    (keys / CA_KEY_FILE).chmod(0o644)
    CertificateAuthority.load_or_create(keys)
    assert mode(keys / CA_KEY_FILE) == 0o600


def test_a_certificate_that_does_not_match_the_key_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    CertificateAuthority.load_or_create(keys)
    (keys / CA_CERT_FILE).write_text(CertificateAuthority.generate().ca_cert_pem)
    with pytest.raises(FailedPrecondition) as info:
        CertificateAuthority.load_or_create(keys)
    assert info.value.reason == "INVALID_KEY_MATERIAL"


def test_an_unreadable_key_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    (keys / CA_KEY_FILE).write_text("not a key")
    (keys / CA_KEY_FILE).chmod(0o600)
    with pytest.raises(FailedPrecondition) as info:
        CertificateAuthority.load_or_create(keys)
    assert info.value.reason == "INVALID_KEY_MATERIAL"


def test_a_lost_certificate_is_recreated_for_the_same_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    first = CertificateAuthority.load_or_create(keys)
    (keys / CA_CERT_FILE).unlink()
    second = CertificateAuthority.load_or_create(keys)
    signed = first.sign_node_csr(make_csr(make_key()), NODE_ID)
    # Same key, so certificates signed before still verify against the new CA certificate.
    assert second.node_id_from_auth_context(auth_context_of(signed.cert_pem)) == (NODE_ID, signed.serial_hex)


# --- real mutual TLS ----------------------------------------------------------------------------


@dataclass
class MtlsServer:
    port: int
    seen: list[dict[str, list[bytes]]]


@pytest.fixture
async def mtls_server(ca: CertificateAuthority) -> AsyncIterator[MtlsServer]:
    server = grpc.aio.server()
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    seen: list[dict[str, list[bytes]]] = []

    async def who_am_i(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        auth_context = context.auth_context()
        seen.append({k: list(v) for k, v in auth_context.items()})
        identity = ca.node_id_from_auth_context(auth_context)
        return b"" if identity is None else identity[0].encode()

    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Identity", {"WhoAmI": grpc.unary_unary_rpc_method_handler(who_am_i)}
            ),
        )
    )
    key_bytes, cert_bytes = ca.server_certificate(["127.0.0.1"])
    credentials = grpc.ssl_server_credentials(
        [(key_bytes, cert_bytes)], root_certificates=ca.ca_cert_pem.encode(), require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield MtlsServer(port=port, seen=seen)
    finally:
        await server.stop(None)


def _channel(port: int, credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}", credentials, options=[("grpc.ssl_target_name_override", SERVER_NAME)]
    )


def _node_credentials(
    issuing_ca: CertificateAuthority, trusted_ca: CertificateAuthority
) -> grpc.ChannelCredentials:
    key = make_key()
    signed = issuing_ca.sign_node_csr(make_csr(key), NODE_ID)
    return grpc.ssl_channel_credentials(
        root_certificates=trusted_ca.ca_cert_pem.encode(),
        private_key=key_pem(key),
        certificate_chain=signed.cert_pem.encode(),
    )


async def test_mutual_tls_carries_the_node_identity(
    ca: CertificateAuthority, mtls_server: MtlsServer
) -> None:
    async with _channel(mtls_server.port, _node_credentials(ca, ca)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        who = await channel.unary_unary("/test.Identity/WhoAmI")(b"", timeout=10)
    assert who == NODE_ID.encode()
    [context] = mtls_server.seen
    identity = ca.node_id_from_auth_context(context)
    assert identity is not None
    assert identity[0] == NODE_ID
    assert identity[1] == format(load(context["x509_pem_cert"][0]).serial_number, "x")


async def test_a_client_without_a_certificate_cannot_connect(
    ca: CertificateAuthority, mtls_server: MtlsServer
) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.ca_cert_pem.encode())
    async with _channel(mtls_server.port, credentials) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert mtls_server.seen == []


async def test_a_client_with_a_certificate_of_another_ca_cannot_connect(
    ca: CertificateAuthority, foreign_ca: CertificateAuthority, mtls_server: MtlsServer
) -> None:
    async with _channel(mtls_server.port, _node_credentials(foreign_ca, ca)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary("/test.Identity/WhoAmI")(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert mtls_server.seen == []


async def test_a_server_of_another_ca_is_not_trusted(
    ca: CertificateAuthority, foreign_ca: CertificateAuthority, mtls_server: MtlsServer
) -> None:
    # The node trusts only the CA it got at registration: a server signed by another CA fails.
    async with _channel(mtls_server.port, _node_credentials(ca, foreign_ca)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary("/test.Identity/WhoAmI")(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert mtls_server.seen == []
