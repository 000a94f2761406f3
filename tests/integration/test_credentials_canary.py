"""Canary: one unique marker as a node's provider token, every credentials path exercised
(registration, listing, refresh, sealed delivery, replacement, errors, a refused refresh,
revocation); the marker never appears in the controller's logs, the store's files, the
cache, or any response."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import httpx
import pytest
from automator67.v1 import node_pb2, node_pb2_grpc
from google.protobuf.message import Message
from sqlalchemy import update

from controller.agent.credentials import AgentCredentials, channel_fetch
from controller.cache.memory import MemoryCache
from controller.store.models import NodeCredentialState
from tests.credentials.nodes import CredentialNode, Stream, stamp, user
from tests.credentials.support import OAuthServer
from tests.support import bearer, controller_settings, running_controller


@pytest.fixture
def oauth(tmp_path: Path) -> Iterator[OAuthServer]:
    server = OAuthServer(tmp_path / "oauth-state.json")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_the_marker_never_leaks(
    tmp_path: Path, oauth: OAuthServer, caplog: pytest.LogCaptureFixture
) -> None:
    marker = f"CANARY{uuid.uuid4().hex}"
    responses: list[bytes] = []

    def seen(message: Message) -> Message:
        responses.append(message.SerializeToString())
        responses.append(str(message).encode())
        return message

    await oauth.configure(access_prefix=marker + "-at-", rotate=True)  # refreshed tokens carry it too
    await oauth.seed(marker + "-rt")
    caplog.set_level(logging.DEBUG)
    data_dir = tmp_path / "data"
    settings = controller_settings(data_dir, provider_oauth=oauth.provider_config(), log_level="DEBUG")
    async with (
        running_controller(settings) as controller,
        grpc.aio.insecure_channel(controller.address) as channel,
    ):
        token = await user(channel, "ada@example.com")
        stub = node_pb2_grpc.NodeServiceStub(channel)
        node = CredentialNode()
        expires = datetime.now(UTC).timestamp() + 3600
        node_id = await node.register(
            channel,
            token,
            oauth_token=marker + "-registered",
            refresh_token=marker + "-rt",
            expires_at=expires,
        )
        assert node.reply is not None
        seen(node.reply)
        seen(await stub.GetNode(node_pb2.GetNodeRequest(node_id=node_id), metadata=bearer(token)))
        seen(await stub.ListNodes(node_pb2.ListNodesRequest(), metadata=bearer(token)))

        async with node.channel(controller) as node_channel:
            stream = Stream(node_channel)
            await stream.hello()
            agent = AgentCredentials(node_id=node_id, private_key=node.key, fetch=channel_fetch(node_channel))
            raw_fetch = channel_fetch(node_channel)

            async def fetch_and_record() -> str:
                seen(await raw_fetch(node_pb2.FetchNodeCredentialsRequest(node_id=node_id)))
                return (await agent.refresh()).access_token

            assert (await fetch_and_record()).startswith(marker)

            # refresh (with rotation), announced on the stream, delivered again
            async with controller.store.session() as session:
                await session.execute(
                    update(NodeCredentialState)
                    .where(NodeCredentialState.node_id == node_id)
                    .values(refresh_at=datetime.now(UTC) - timedelta(seconds=1))
                )
            assert controller.refresher is not None
            assert await controller.refresher.refresh_one(node_id) == "refreshed"
            seen(await stream.command())
            assert (await fetch_and_record()).startswith(marker + "-at-")

            # errors carrying the marker in their requests
            for request in (
                node_pb2.UpdateNodeCredentialsRequest(
                    node_id=node_id, oauth_token=marker + "-bad", oauth_expires_at=stamp(1000)
                ),
                node_pb2.UpdateNodeCredentialsRequest(node_id=node_id, oauth_token=marker * 300),
                node_pb2.UpdateNodeCredentialsRequest(node_id=str(uuid.uuid4()), oauth_token=marker),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.UpdateNodeCredentials(request, metadata=bearer(token))
                responses.append(str(info.value.details()).encode())
                responses.append(repr(info.value.trailing_metadata()).encode())

            # a refused refresh (the provider revoked the refresh token): revoked, alert
            stats = await oauth.stats()
            live = [t for t, e in stats["refresh_tokens"].items() if e["valid"]]
            async with httpx.AsyncClient() as client:
                for rt in live:
                    await client.post(
                        f"{oauth.url}/revoke",
                        data={"token": rt},
                        auth=("a67-test-client", "a67-test-client-secret"),
                    )
            async with controller.store.session() as session:
                await session.execute(
                    update(NodeCredentialState)
                    .where(NodeCredentialState.node_id == node_id)
                    .values(refresh_at=datetime.now(UTC) - timedelta(seconds=1))
                )
            assert await controller.refresher.refresh_one(node_id) == "revoked"
            seen(await stub.ListAlerts(node_pb2.ListAlertsRequest(), metadata=bearer(token)))
            seen(await stub.GetNode(node_pb2.GetNodeRequest(node_id=node_id), metadata=bearer(token)))

            # replaced, delivered, revoked
            seen(
                await stub.UpdateNodeCredentials(
                    node_pb2.UpdateNodeCredentialsRequest(node_id=node_id, oauth_token=marker + "-replaced"),
                    metadata=bearer(token),
                )
            )
            seen(await stream.command())
            assert (await fetch_and_record()) == marker + "-replaced"
            seen(
                await stub.RevokeNodeCredentials(
                    node_pb2.RevokeNodeCredentialsRequest(node_id=node_id), metadata=bearer(token)
                )
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await raw_fetch(node_pb2.FetchNodeCredentialsRequest(node_id=node_id))
            responses.append(str(info.value.details()).encode())
            await stream.close()

        cache = controller.cache
        assert isinstance(cache, MemoryCache)
        cached = b"".join(key.encode() + value for key, (value, _) in cache._entries.items())
        assert controller.secret_audit is not None
        await controller.secret_audit.flush()

    needle = marker.encode()
    assert responses
    for response in responses:
        assert needle not in response
    assert needle not in cached
    logged = "\n".join(record.getMessage() + (record.exc_text or "") for record in caplog.records)
    assert len(caplog.records) > 20
    assert marker not in logged
    for path in data_dir.rglob("*"):
        if path.is_file():
            assert needle not in path.read_bytes(), path
