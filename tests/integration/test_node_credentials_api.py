"""Node credentials over a real controller: GetNode's state, UpdateNodeCredentials,
RevokeNodeCredentials, and FetchNodeCredentials (HPKE-sealed delivery over the node port),
with the test OAuth 2.0 server as the provider."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import httpx
import pytest
from automator67.v1 import node_pb2, node_pb2_grpc
from sqlalchemy import update

from controller.agent.credentials import AgentCredentials, CredentialsError, channel_fetch
from controller.credentials.delivery import cache_key
from controller.server import Controller
from controller.store.models import Node, NodeCredentialState
from tests.credentials.nodes import CredentialNode, Stream, reason, stamp, user
from tests.credentials.support import OAuthServer
from tests.support import bearer, controller_settings, running_controller

ACCESS = "gho_node_access_token_value"
REFRESH = "rt-node-1"


@pytest.fixture
def oauth(tmp_path: Path) -> Iterator[OAuthServer]:
    server = OAuthServer(tmp_path / "oauth-state.json")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def controller(tmp_path: Path, oauth: OAuthServer) -> AsyncIterator[Controller]:
    settings = controller_settings(tmp_path / "data", provider_oauth=oauth.provider_config())
    async with running_controller(settings) as running:
        yield running


@pytest.fixture
async def channel(controller: Controller) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(controller.address) as chan:
        yield chan


async def _due_now(controller: Controller, node_id: str) -> None:
    async with controller.store.session() as session:
        await session.execute(
            update(NodeCredentialState)
            .where(NodeCredentialState.node_id == node_id)
            .values(refresh_at=datetime.now(UTC) - timedelta(seconds=1))
        )


async def _get(stub: node_pb2_grpc.NodeServiceStub, token: str, node_id: str) -> node_pb2.NodeCredentials:
    reply = await stub.GetNode(node_pb2.GetNodeRequest(node_id=node_id), metadata=bearer(token))
    return reply.node.credentials


async def test_life_cycle_over_the_api(
    controller: Controller, channel: grpc.aio.Channel, oauth: OAuthServer
) -> None:
    await oauth.seed(REFRESH)
    token = await user(channel, "ada@example.com")
    stub = node_pb2_grpc.NodeServiceStub(channel)
    node = CredentialNode()
    expires = datetime.now(UTC).timestamp() + 3600
    node_id = await node.register(
        channel, token, oauth_token=ACCESS, refresh_token=REFRESH, expires_at=expires
    )

    shown = await _get(stub, token, node_id)
    assert shown.state == node_pb2.NODE_CREDENTIALS_STATE_ACTIVE
    assert shown.version == 1
    assert shown.HasField("next_refresh_at")
    assert ACCESS not in str(shown)

    # refreshed when due
    await _due_now(controller, node_id)
    assert controller.refresher is not None
    assert await controller.refresher.refresh_one(node_id) == "refreshed"
    shown = await _get(stub, token, node_id)
    assert (shown.state, shown.version, shown.failures) == (node_pb2.NODE_CREDENTIALS_STATE_ACTIVE, 2, 0)
    assert shown.HasField("refreshed_at")

    # the provider revokes the refresh token: invalid_grant → revoked, alert, shown
    async with httpx.AsyncClient() as client:
        await client.post(
            f"{oauth.url}/revoke", data={"token": REFRESH}, auth=("a67-test-client", "a67-test-client-secret")
        )
    await _due_now(controller, node_id)
    assert await controller.refresher.refresh_one(node_id) == "revoked"
    shown = await _get(stub, token, node_id)
    assert shown.state == node_pb2.NODE_CREDENTIALS_STATE_REVOKED
    assert shown.last_error == "invalid_grant"
    assert not shown.HasField("next_refresh_at")
    alerts = await stub.ListAlerts(node_pb2.ListAlertsRequest(), metadata=bearer(token))
    assert [a.kind for a in alerts.alerts] == ["credentials_revoked"]

    # the user replaces it
    await oauth.seed("rt-node-2")
    reply = await stub.UpdateNodeCredentials(
        node_pb2.UpdateNodeCredentialsRequest(
            node_id=node_id,
            oauth_token="at-replaced",
            oauth_refresh_token="rt-node-2",
            oauth_expires_at=stamp(expires),
        ),
        metadata=bearer(token),
    )
    assert reply.credentials.state == node_pb2.NODE_CREDENTIALS_STATE_ACTIVE
    assert reply.credentials.version == 3  # a failed refresh does not change the token
    assert "at-replaced" not in str(reply)

    # and revokes it: at the provider (refresh token, then access token) and here
    revoked = await stub.RevokeNodeCredentials(
        node_pb2.RevokeNodeCredentialsRequest(node_id=node_id), metadata=bearer(token)
    )
    assert revoked.provider_revoked
    assert revoked.credentials.state == node_pb2.NODE_CREDENTIALS_STATE_REVOKED
    stats = await oauth.stats()
    assert stats["revocations"][-2:] == ["refresh_token", "access_token"]
    assert not stats["refresh_tokens"]["rt-node-2"]["valid"]
    async with controller.store.session() as session:
        row = await session.get(Node, node_id)
        assert row is not None
        assert "oauth_token" not in row.credentials
        assert "refresh_token" not in row.credentials


async def test_update_is_validated_and_owned(controller: Controller, channel: grpc.aio.Channel) -> None:
    owner = await user(channel, "ada@example.com")
    stranger = await user(channel, "eve@example.com")
    stub = node_pb2_grpc.NodeServiceStub(channel)
    node_id = await CredentialNode().register(channel, owner, oauth_token=ACCESS)
    for request, code, metadata in (
        (node_pb2.UpdateNodeCredentialsRequest(node_id=node_id), grpc.StatusCode.INVALID_ARGUMENT, owner),
        (
            node_pb2.UpdateNodeCredentialsRequest(
                node_id=node_id, oauth_token="x", oauth_expires_at=stamp(1000)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            owner,
        ),
        (
            node_pb2.UpdateNodeCredentialsRequest(node_id=node_id, oauth_token="x"),
            grpc.StatusCode.NOT_FOUND,
            stranger,
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.UpdateNodeCredentials(request, metadata=bearer(metadata))
        assert info.value.code() == code
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.RevokeNodeCredentials(
            node_pb2.RevokeNodeCredentialsRequest(node_id=node_id), metadata=bearer(stranger)
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # without a provider token
    bare = await CredentialNode().register(channel, owner, oauth_token="")
    assert (await _get(stub, owner, bare)).state == node_pb2.NODE_CREDENTIALS_STATE_NONE


async def test_list_nodes_shows_each_nodes_credentials_as_get_node_does(
    controller: Controller, channel: grpc.aio.Channel
) -> None:
    token = await user(channel, "ada@example.com")
    stub = node_pb2_grpc.NodeServiceStub(channel)
    expires = datetime.now(UTC).timestamp() + 3600
    active = await CredentialNode().register(
        channel, token, oauth_token=ACCESS, refresh_token=REFRESH, expires_at=expires
    )
    bare = await CredentialNode().register(channel, token, oauth_token="")
    revoked = await CredentialNode().register(channel, token, oauth_token=ACCESS + "-2")
    await stub.RevokeNodeCredentials(
        node_pb2.RevokeNodeCredentialsRequest(node_id=revoked), metadata=bearer(token)
    )

    listed = await stub.ListNodes(node_pb2.ListNodesRequest(), metadata=bearer(token))
    shown = {node.id: node.credentials for node in listed.nodes}
    assert set(shown) == {active, bare, revoked}
    for node_id in shown:
        assert shown[node_id] == await _get(stub, token, node_id), node_id
    assert shown[active].state == node_pb2.NODE_CREDENTIALS_STATE_ACTIVE
    assert shown[active].expires_at.ToDatetime(tzinfo=UTC).timestamp() == pytest.approx(expires, abs=1)
    assert shown[active].HasField("next_refresh_at")
    assert shown[bare].state == node_pb2.NODE_CREDENTIALS_STATE_NONE
    assert shown[revoked].state == node_pb2.NODE_CREDENTIALS_STATE_REVOKED
    assert ACCESS not in str(listed)
    assert REFRESH not in str(listed)
    # pages carry them too
    first = await stub.ListNodes(node_pb2.ListNodesRequest(page_size=1), metadata=bearer(token))
    assert len(first.nodes) == 1
    assert first.nodes[0].credentials == shown[first.nodes[0].id]


async def test_sealed_delivery_to_its_own_node_only(
    controller: Controller, channel: grpc.aio.Channel
) -> None:
    ada = await user(channel, "ada@example.com")
    eve = await user(channel, "eve@example.com")
    stub = node_pb2_grpc.NodeServiceStub(channel)
    expires = datetime.now(UTC).timestamp() + 3600
    node_a, node_b = CredentialNode(), CredentialNode()
    a_id = await node_a.register(channel, ada, oauth_token=ACCESS, expires_at=expires)
    b_id = await node_b.register(channel, eve, oauth_token="eve-provider-token", expires_at=expires)

    async with node_a.channel(controller) as a_channel, node_b.channel(controller) as b_channel:
        a_stub = node_pb2_grpc.NodeServiceStub(a_channel)
        reply = await a_stub.FetchNodeCredentials(node_pb2.FetchNodeCredentialsRequest(node_id=a_id))
        assert ACCESS.encode() not in reply.SerializeToString()  # sealed
        agent = AgentCredentials(node_id=a_id, private_key=node_a.key, fetch=channel_fetch(a_channel))
        held = await agent.refresh()
        assert held.access_token == ACCESS
        assert held.version == 1
        assert held.expires_at is not None
        assert abs(held.expires_at - expires) < 1
        assert ACCESS not in repr(held) + repr(agent)

        # the cache entry holds ciphertext only, with a TTL until the expiry
        cached = await controller.cache.get(cache_key(a_id))
        assert cached is not None
        assert ACCESS.encode() not in cached
        assert json.loads(cached)["ct"].startswith("a67v1:")

        # another node's credentials: refused, for a node of another user or asking by id
        for caller, target in ((a_stub, b_id), (node_pb2_grpc.NodeServiceStub(b_channel), a_id)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await caller.FetchNodeCredentials(node_pb2.FetchNodeCredentialsRequest(node_id=target))
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert reason(info.value) == "NODE_CREDENTIALS_NOT_OWN"
        # a blob sealed to node A does not open with node B's key
        thief = AgentCredentials(node_id=a_id, private_key=node_b.key, fetch=channel_fetch(a_channel))
        with pytest.raises(CredentialsError):
            await thief.refresh()

        # the user port has no client certificate; a user token does not help either
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.FetchNodeCredentials(
                node_pb2.FetchNodeCredentialsRequest(node_id=a_id), metadata=bearer(ada)
            )
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # a replaced token: the node's stream is told, and it fetches the new version
        stream = Stream(a_channel)
        await stream.hello()
        await stub.UpdateNodeCredentials(
            node_pb2.UpdateNodeCredentialsRequest(node_id=a_id, oauth_token="gho_second_token"),
            metadata=bearer(ada),
        )
        command = await stream.command()
        assert command.WhichOneof("kind") == "credentials_changed"
        assert command.credentials_changed.version == 2
        result = await agent.on_credentials_changed(command)
        assert result.ok
        assert agent.current is not None
        assert (agent.current.access_token, agent.current.version) == ("gho_second_token", 2)

        # revoked: nothing to deliver, and the agent drops what it held
        await stub.RevokeNodeCredentials(
            node_pb2.RevokeNodeCredentialsRequest(node_id=a_id), metadata=bearer(ada)
        )
        revoked_cmd = await stream.command()
        assert not (await agent.on_credentials_changed(revoked_cmd)).ok
        assert agent.current is None
        await stream.close()


async def test_delivery_works_from_the_store_with_redis_down(tmp_path: Path, oauth: OAuthServer) -> None:
    settings = controller_settings(
        tmp_path / "data", provider_oauth=oauth.provider_config(), cache_url="redis://127.0.0.1:1/0"
    )
    async with (
        running_controller(settings) as controller,
        grpc.aio.insecure_channel(controller.address) as channel,
    ):
        token = await user(channel, "ada@example.com")
        node = CredentialNode()
        node_id = await node.register(channel, token, oauth_token=ACCESS)
        async with node.channel(controller) as node_channel:
            agent = AgentCredentials(node_id=node_id, private_key=node.key, fetch=channel_fetch(node_channel))
            assert (await agent.refresh()).access_token == ACCESS
            assert (await agent.refresh()).access_token == ACCESS
