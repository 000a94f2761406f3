"""A hand-driven node for credential tests: its key, CSR, certificate and mutual-TLS channel."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import grpc
from automator67.v1 import auth_pb2, auth_pb2_grpc, common_pb2, node_pb2, node_pb2_grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from controller.nodes.ca import SERVER_NAME
from controller.server import Controller
from tests.support import PASSWORD, bearer


def reason(err: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(err)
    if status is None:
        return ""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


def stamp(epoch: float) -> timestamp_pb2.Timestamp:
    value = timestamp_pb2.Timestamp()
    value.FromDatetime(datetime.fromtimestamp(epoch, UTC))
    return value


async def user(channel: grpc.aio.Channel, email: str) -> str:
    reply = await auth_pb2_grpc.AuthServiceStub(channel).Register(
        auth_pb2.RegisterRequest(email=email, password_hash=PASSWORD)
    )
    return reply.access_token


class CredentialNode:
    """A node's key and certificate; registers with a provider token."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        spki = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.fingerprint = hashlib.sha256(spki).hexdigest()
        self.reply: node_pb2.RegisterNodeResponse | None = None

    @property
    def node_id(self) -> str:
        assert self.reply is not None
        return self.reply.node_id

    async def register(
        self,
        channel: grpc.aio.Channel,
        token: str,
        *,
        oauth_token: str,
        refresh_token: str = "",
        expires_at: float | None = None,
    ) -> str:
        stub = node_pb2_grpc.NodeServiceStub(channel)
        enrollment = await stub.CreateEnrollmentToken(
            node_pb2.CreateEnrollmentTokenRequest(), metadata=bearer(token)
        )
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node")]))
            .sign(self.key, hashes.SHA256())
        )
        request = node_pb2.RegisterNodeRequest(
            enrollment_token=enrollment.token,
            provider=common_pb2.PROVIDER_RENDER,
            endpoint="https://node.onrender.com",
            region="eu-west",
            capabilities=common_pb2.NodeCapabilities(cpu_cores=2, memory_gb=4, disk_gb=20),
            csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode(),
            fingerprint=self.fingerprint,
            oauth_token=oauth_token,
            oauth_refresh_token=refresh_token,
        )
        if expires_at is not None:
            request.oauth_expires_at.CopyFrom(stamp(expires_at))
        self.reply = await stub.RegisterNode(request)
        return self.reply.node_id

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def channel(self, controller: Controller) -> grpc.aio.Channel:
        assert self.reply is not None
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.reply.ca_certificate_pem.encode(),
            private_key=self.key_pem(),
            certificate_chain=self.reply.certificate_pem.encode(),
        )
        return grpc.aio.secure_channel(
            f"127.0.0.1:{controller.node_port}",
            credentials,
            options=[("grpc.ssl_target_name_override", SERVER_NAME)],
        )


class Stream:
    """A node stream driven by hand: hello, then read what the controller sends."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.outbox: asyncio.Queue[node_pb2.ConnectRequest | None] = asyncio.Queue()
        self.call = node_pb2_grpc.NodeServiceStub(channel).Connect(self._requests())

    async def _requests(self) -> AsyncIterator[node_pb2.ConnectRequest]:
        while (message := await self.outbox.get()) is not None:
            yield message

    async def hello(self) -> node_pb2.HelloAck:
        capabilities = common_pb2.NodeCapabilities(cpu_cores=2, memory_gb=4, disk_gb=20)
        await self.outbox.put(
            node_pb2.ConnectRequest(hello=node_pb2.NodeHello(agent_version="test", capabilities=capabilities))
        )
        return (await self.call.read()).hello_ack

    async def command(self) -> node_pb2.NodeCommand:
        while True:
            message = await self.call.read()
            if message.WhichOneof("message") == "command":
                return message.command

    async def close(self) -> None:
        await self.outbox.put(None)
        self.call.cancel()
