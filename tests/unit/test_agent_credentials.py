"""controller/agent/credentials.py: fetch, open and hold the sealed provider token."""

from __future__ import annotations

import json

import grpc
import pytest
from automator67.v1 import node_pb2
from cryptography.hazmat.primitives.asymmetric import ec

from controller.agent.credentials import AgentCredentials, CredentialsError
from controller.credentials.sealing import SUITE_NAME, seal

NODE = "node-1"


class Controller:
    """Answers FetchNodeCredentials as the controller does (sealing to the node's key)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self.public = key.public_key()
        self.version = 1
        self.token = "tok-1"
        self.expires = "2030-01-01T00:00:00+00:00"
        self.requests: list[node_pb2.FetchNodeCredentialsRequest] = []

    async def fetch(
        self, request: node_pb2.FetchNodeCredentialsRequest
    ) -> node_pb2.FetchNodeCredentialsResponse:
        self.requests.append(request)
        document = {
            "access_token": self.token,
            "expires_at": self.expires,
            "provider": "render",
            "version": self.version,
        }
        return node_pb2.FetchNodeCredentialsResponse(
            sealed=seal(json.dumps(document).encode(), self.public, NODE, self.version),
            suite=SUITE_NAME,
            version=self.version,
        )


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


async def test_fetches_opens_and_holds_in_memory(key: ec.EllipticCurvePrivateKey) -> None:
    controller = Controller(key)
    agent = AgentCredentials(
        node_id=NODE, private_key=key, fetch=controller.fetch, clock=lambda: 1_800_000_000.0
    )
    token = await agent.refresh()
    assert (token.access_token, token.version, token.provider) == ("tok-1", 1, "render")
    assert "tok-1" not in repr(token) + repr(agent)
    assert await agent.token() is token  # held: no second fetch
    assert len(controller.requests) == 1
    assert controller.requests[0].node_id == NODE


async def test_fetches_again_when_told_and_near_expiry(key: ec.EllipticCurvePrivateKey) -> None:
    controller = Controller(key)
    now = [1_893_455_000.0]  # 2030-01-01 minus 1000 s
    agent = AgentCredentials(
        node_id=NODE, private_key=key, fetch=controller.fetch, clock=lambda: now[0], margin_seconds=60
    )
    await agent.refresh()
    controller.version, controller.token = 2, "tok-2"
    command = node_pb2.NodeCommand(
        command_id="c1", credentials_changed=node_pb2.CredentialsChanged(version=2)
    )
    result = await agent.on_credentials_changed(command)
    assert (result.command_id, result.ok) == ("c1", True)
    assert controller.requests[-1].min_version == 2
    assert (await agent.token()).access_token == "tok-2"
    now[0] += 950  # 50 s before the expiry: within the margin
    controller.version, controller.token = 3, "tok-3"
    assert (await agent.token()).access_token == "tok-3"


async def test_a_blob_for_another_key_or_version_does_not_open(key: ec.EllipticCurvePrivateKey) -> None:
    controller = Controller(ec.generate_private_key(ec.SECP256R1()))  # sealed to someone else
    agent = AgentCredentials(node_id=NODE, private_key=key, fetch=controller.fetch)
    with pytest.raises(CredentialsError):
        await agent.refresh()
    assert agent.current is None

    honest = Controller(key)

    async def wrong_version(
        request: node_pb2.FetchNodeCredentialsRequest,
    ) -> node_pb2.FetchNodeCredentialsResponse:
        response = await honest.fetch(request)
        response.version = 9
        return response

    with pytest.raises(CredentialsError):
        await AgentCredentials(node_id=NODE, private_key=key, fetch=wrong_version).refresh()
    with pytest.raises(CredentialsError):
        await AgentCredentials(node_id="node-2", private_key=key, fetch=honest.fetch).refresh()


async def test_a_refused_fetch_drops_what_is_held(key: ec.EllipticCurvePrivateKey) -> None:
    controller = Controller(key)
    refuse = False

    async def fetch(request: node_pb2.FetchNodeCredentialsRequest) -> node_pb2.FetchNodeCredentialsResponse:
        if refuse:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.FAILED_PRECONDITION, grpc.aio.Metadata(), grpc.aio.Metadata(), "revoked"
            )
        return await controller.fetch(request)

    agent = AgentCredentials(node_id=NODE, private_key=key, fetch=fetch)
    await agent.refresh()
    refuse = True
    result = await agent.on_credentials_changed(
        node_pb2.NodeCommand(command_id="c2", credentials_changed=node_pb2.CredentialsChanged(version=2))
    )
    assert not result.ok
    assert "FAILED_PRECONDITION" in result.error_message
    assert agent.current is None
