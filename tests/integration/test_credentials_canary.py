"""Canary (issue 16): one unique marker as a node's provider token, a deployment's env value
and a database's credentials; every path exercised (registration, listing, refresh, sealed
delivery, replacement, a master-key rotation with its rewrap, errors, a temporary and a
refused refresh, revocation), over gRPC and over REST through a real Envoy. The marker never
appears in the controller's or the agent's logs, the store's files or table dumps, the
cache, Envoy's access log, any response, or any file on the agent.

The first test drives a node by hand (so the sealed deliveries themselves are recorded);
the second runs the whole system: a real agent process, a real replica, a real Envoy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import sys
import uuid
from collections.abc import Awaitable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import pytest
from automator67.v1 import (
    deployment_pb2,
    deployment_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
)
from google.protobuf.message import Message
from sqlalchemy import update

from controller.agent.credentials import AgentCredentials, channel_fetch
from controller.cache.memory import MemoryCache
from controller.server import Controller
from controller.store.models import NodeCredentialState
from controller.vault.rewrap import count_by_key, totals
from tests.credentials.nodes import CredentialNode, Stream, stamp, user
from tests.credentials.support import OAuthServer
from tests.e2e.conftest import Reply, Rest, start_gateway
from tests.integration.test_cli import until
from tests.integration.test_deployments import source_tar_gz
from tests.integration.test_deployments_real import SCHEDULABLE, _body, _until, processes
from tests.integration.test_vault_rotation import _a67
from tests.support import PASSWORD, bearer, controller_settings, running_controller

_M = TypeVar("_M", bound=Message)


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


# --------------------------------------------------------------------------- the whole system

CANARY_APP = """\
import hashlib
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# The app proves it received its secret env value without ever printing it.
DIGEST = hashlib.sha256(os.environ["CANARY"].encode()).hexdigest().encode()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"ok" if self.path == "/health" else DIGEST
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""


class Recorder:
    """Every response the test saw (gRPC messages, gRPC errors, REST replies, CLI output)."""

    def __init__(self, rest: Rest) -> None:
        self.rest = rest
        self.rest_calls = 0
        self.seen: list[tuple[str, bytes]] = []

    def message(self, what: str, message: _M) -> _M:
        self.seen.append((what, message.SerializeToString() + str(message).encode()))
        return message

    def error(self, what: str, error: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
        text = f"{error.details()}|{error.trailing_metadata()!r}|{error.debug_error_string()}"
        self.seen.append((what, text.encode()))
        return error

    def text(self, what: str, value: str) -> None:
        self.seen.append((what, value.encode()))

    async def call(self, method: str, path: str, body: Any = None, *, token: str | None = None) -> Reply:
        """One REST call through Envoy (in a thread: the controller runs on this loop)."""
        reply = await asyncio.to_thread(self.rest.request, method, path, body, token=token)
        self.rest_calls += 1
        self.seen.append((f"{method} {path}", json.dumps(dict(reply.headers)).encode() + reply.body))
        return reply

    async def failing(self, what: str, call: Awaitable[Any]) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        return self.error(what, info.value)


def _files(root: Path) -> Iterator[Path]:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            yield path


def _sqlite_dump(path: Path) -> bytes:
    """Every row of every table of a SQLite file, as text."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return b"\n".join(
            repr(row).encode() for table in tables for row in connection.execute(f'SELECT * FROM "{table}"')
        )
    finally:
        connection.close()


async def _due(controller: Controller, node_id: str) -> None:
    async with controller.store.session() as session:
        await session.execute(
            update(NodeCredentialState)
            .where(NodeCredentialState.node_id == node_id)
            .values(refresh_at=datetime.now(UTC) - timedelta(seconds=1))
        )


async def test_one_marker_as_token_env_and_database_credential_never_leaks(
    tmp_path: Path, oauth: OAuthServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The marker is a real agent's provider token, a deployment's env value (delivered to
    that agent's replica) and a database's credentials; every path runs, over REST through
    a real Envoy and over gRPC, across a master-key rotation."""
    marker = f"CANARY{uuid.uuid4().hex}"
    needle = marker.encode()
    await oauth.configure(access_prefix=marker + "-at-", rotate=True)  # refreshed tokens carry it
    await oauth.seed(marker + "-rt")
    caplog.set_level(logging.DEBUG)
    data_dir = tmp_path / "data"
    agents_root = tmp_path / "agents"
    agents_root.mkdir()
    gateway_dir = tmp_path / "gateway"
    gateway_dir.mkdir()
    access_log = gateway_dir / "access.log"
    settings = controller_settings(
        data_dir,
        provider_oauth=oauth.provider_config(),
        log_level="DEBUG",
        heartbeat_interval_seconds=0.3,
        vault_keyring_poll_seconds=0.1,
    )
    ports = 21000 + (os.getpid() % 50) * 40
    with processes(agents_root) as procs:
        async with (
            running_controller(settings) as controller,
            grpc.aio.insecure_channel(controller.address) as channel,
        ):
            with contextlib.contextmanager(start_gateway)(
                controller.address, gateway_dir, access_log_path=str(access_log)
            ) as gateway:
                seen = Recorder(gateway.rest)
                nodes = node_pb2_grpc.NodeServiceStub(channel)
                deployments = deployment_pb2_grpc.DeploymentServiceStub(channel)
                queries = query_pb2_grpc.QueryServiceStub(channel)

                # -- an account and an enrollment token, over REST
                reply = await seen.call(
                    "POST", "/api/v1/auth/register", {"email": "ada@example.com", "password_hash": PASSWORD}
                )
                assert reply.status == 201, reply.body
                token = reply.json["access_token"]
                auth = bearer(token)
                reply = await seen.call(
                    "POST", "/api/v1/nodes/enrollment-tokens", {"max_uses": 1}, token=token
                )
                assert reply.status == 201, reply.body

                # -- registration: a real agent enrolls with the marker as its provider token
                args = [
                    sys.executable,
                    "-m",
                    "controller.cli",
                    "agent",
                    "--data-dir",
                    str(agents_root / "eu"),
                ]
                args += [
                    "--region",
                    "eu",
                    "--controller",
                    controller.address,
                    "--node-types",
                    "compute,database",
                ]
                args += ["--advertise-host", "127.0.0.1", "--replica-port-range", f"{ports}-{ports + 39}"]
                procs.start(
                    args,
                    "agent.log",
                    {"A67_AGENT_TOKEN": reply.json["token"], "A67_AGENT_OAUTH_TOKEN": marker},
                )
                agent_log = agents_root / "agent.log"

                async def holding(version: int) -> None:
                    line = f"holding the provider token version {version}"
                    await _until(
                        lambda: asyncio.to_thread(lambda: line in agent_log.read_text()),
                        f"the agent to hold token version {version}",
                        within=30,
                    )

                async def ready() -> bool:
                    listed = seen.message(
                        "ListNodes", await nodes.ListNodes(node_pb2.ListNodesRequest(), metadata=auth)
                    )
                    return any(n.status in SCHEDULABLE for n in listed.nodes)  # busy: the shared CPU is high

                await _until(ready, "the agent's node to be ready", within=30)
                await holding(1)  # delivered sealed over its mutual-TLS stream
                listed = await nodes.ListNodes(node_pb2.ListNodesRequest(), metadata=auth)
                node_id = listed.nodes[0].id
                assert listed.nodes[0].credentials.state == node_pb2.NODE_CREDENTIALS_STATE_ACTIVE
                for path in ("/api/v1/nodes", f"/api/v1/nodes/{node_id}"):
                    assert (await seen.call("GET", path, token=token)).status == 200

                # -- a database whose credentials are the marker; and refused ones
                database = {
                    "name": "canary",
                    "sharding": {"strategy": "SHARDING_STRATEGY_HASH", "shard_count": 1, "sharding_key": "k"},
                    "shards": [{"shard_index": 0, "primary_node_id": node_id}],
                    "credentials": marker,
                }
                reply = await seen.call("POST", "/api/v1/databases", database, token=token)
                assert reply.status in (200, 201), reply.body
                db_id = reply.json["database"]["id"]
                reply = await seen.call(
                    "POST", "/api/v1/databases", {**database, "credentials": marker * 300}, token=token
                )
                assert reply.status == 400, reply.body
                reply = await seen.call(
                    "POST", "/api/v1/databases", {**database, "name": "Bad!"}, token=token
                )
                assert reply.status == 400, reply.body
                await seen.failing(
                    "CreateDatabase refused",
                    queries.CreateDatabase(
                        query_pb2.CreateDatabaseRequest(name="Bad!", credentials=marker), metadata=auth
                    ),
                )
                seen.message(
                    "GetDatabase",
                    await queries.GetDatabase(query_pb2.GetDatabaseRequest(db_id=db_id), metadata=auth),
                )
                seen.message(
                    "ListDatabases",
                    await queries.ListDatabases(query_pb2.ListDatabasesRequest(), metadata=auth),
                )
                for path in ("/api/v1/databases", f"/api/v1/databases/{db_id}"):
                    assert (await seen.call("GET", path, token=token)).status == 200

                # -- a deployment whose env value is the marker, run by the agent; and a refused one
                manifest = {
                    "name": "canary",
                    "app_type": "APP_TYPE_BACKEND",
                    "runtime": "python",
                    "entrypoint": "app.py",
                    "resources": {"memory": "64MB", "cpu": "0.1"},
                    "replicas": 1,
                    "env": {"CANARY": marker},
                    "health_check": {
                        "path": "/health",
                        "interval_seconds": 2,
                        "timeout_seconds": 1,
                        "retries": 3,
                    },
                }
                source = base64.b64encode(source_tar_gz({"app.py": CANARY_APP})).decode()
                reply = await seen.call(
                    "POST",
                    "/api/v1/deployments",
                    {"manifest": manifest, "source_tar_gz": source},
                    token=token,
                )
                assert reply.status == 202, reply.body
                deployment_id = reply.json["deployment_id"]
                reply = await seen.call(
                    "POST",
                    "/api/v1/deployments",
                    {"manifest": {**manifest, "name": "Bad Name!"}, "source_tar_gz": source},
                    token=token,
                )
                assert reply.status == 400, reply.body
                digest = hashlib.sha256(needle).hexdigest()

                async def answering(replicas: int) -> None:
                    async def check() -> bool:
                        got = seen.message(
                            "GetDeployment",
                            await deployments.GetDeployment(
                                deployment_pb2.GetDeploymentRequest(deployment_id=deployment_id),
                                metadata=auth,
                            ),
                        ).deployment
                        running = [a for a in got.node_assignments if a.status == "running"]
                        if got.status != deployment_pb2.DEPLOYMENT_STATUS_RUNNING or len(running) != replicas:
                            return False
                        bodies = await asyncio.gather(*(_body(a.endpoint) for a in running))
                        return bodies == [digest] * replicas

                    await _until(
                        check, f"{replicas} replicas answering with the env value's digest", within=40
                    )

                await answering(1)  # the env value reached the replica on the agent
                assert (
                    await seen.call("GET", f"/api/v1/deployments/{deployment_id}", token=token)
                ).status == 200

                # -- the user replaces the provider token over REST: delivered again
                expires = (datetime.now(UTC) + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
                reply = await seen.call(
                    "PUT",
                    f"/api/v1/nodes/{node_id}/credentials",
                    {
                        "oauth_token": marker + "-rest",
                        "oauth_refresh_token": marker + "-rt",
                        "oauth_expires_at": expires,
                    },
                    token=token,
                )
                assert reply.status == 200, reply.body
                await holding(2)
                reply = await seen.call(
                    "PUT",
                    f"/api/v1/nodes/{node_id}/credentials",
                    {"oauth_token": marker + "-bad", "oauth_expires_at": "2001-01-01T00:00:00Z"},
                    token=token,
                )
                assert reply.status == 400, reply.body
                await seen.failing(
                    "UpdateNodeCredentials too long",
                    nodes.UpdateNodeCredentials(
                        node_pb2.UpdateNodeCredentialsRequest(node_id=node_id, oauth_token=marker * 300),
                        metadata=auth,
                    ),
                )

                # -- refresh (the provider rotates the refresh token), announced, delivered
                assert controller.refresher is not None
                await _due(controller, node_id)
                assert await controller.refresher.refresh_one(node_id) == "refreshed"
                await holding(3)

                # -- the provider down for a while: a temporary failure, retried later
                oauth.stop()
                await _due(controller, node_id)
                assert await controller.refresher.refresh_one(node_id) == "retry"
                oauth.start()  # on the same port, with the same state

                # -- master-key rotation: every secret rewrapped under k2, k1 retired
                for command in (("vault", "rotate", "--json"),):
                    done = await asyncio.to_thread(_a67, data_dir, *command)
                    assert done.returncode == 0, done.stderr
                    seen.text(" ".join(command), done.stdout + done.stderr)

                async def rewrapped() -> bool:
                    counts = totals(await count_by_key(controller.store))
                    return set(counts) == {"k2"} and counts["k2"] >= 3

                await until(rewrapped, "every secret rewrapped under k2")
                for command in (("vault", "status", "--json"), ("vault", "retire", "k1")):
                    done = await asyncio.to_thread(_a67, data_dir, *command)
                    assert done.returncode == 0, done.stderr
                    seen.text(" ".join(command), done.stdout + done.stderr)

                async def dropped() -> bool:
                    return controller.vault is not None and controller.vault.keyring.key_ids == ("k2",)

                await until(dropped, "the controller to drop k1")
                # the rewrapped secrets still open: a refresh, and a new replica with the env
                await _due(controller, node_id)
                assert await controller.refresher.refresh_one(node_id) == "refreshed"
                await holding(4)
                seen.message(
                    "ScaleDeployment",
                    await deployments.ScaleDeployment(
                        deployment_pb2.ScaleDeploymentRequest(deployment_id=deployment_id, replicas=2),
                        metadata=auth,
                    ),
                )
                await answering(2)

                # -- another node (hand-driven): its own sealed token only
                hand = CredentialNode()
                hand_id = await hand.register(channel, token, oauth_token=marker + "-hand")
                assert hand.reply is not None
                seen.message("RegisterNode", hand.reply)
                async with hand.channel(controller) as hand_channel:
                    fetch = channel_fetch(hand_channel)
                    seen.message(
                        "FetchNodeCredentials",
                        await fetch(node_pb2.FetchNodeCredentialsRequest(node_id=hand_id)),
                    )
                    error = await seen.failing(
                        "FetchNodeCredentials of another node",
                        fetch(node_pb2.FetchNodeCredentialsRequest(node_id=node_id)),
                    )
                    assert error.code() == grpc.StatusCode.PERMISSION_DENIED

                # -- a refused refresh: the provider revoked every refresh token
                stats = await oauth.stats()
                async with httpx.AsyncClient() as client:
                    for rt, entry in stats["refresh_tokens"].items():
                        if entry["valid"]:
                            await client.post(
                                f"{oauth.url}/revoke",
                                data={"token": rt},
                                auth=("a67-test-client", "a67-test-client-secret"),
                            )
                await _due(controller, node_id)
                assert await controller.refresher.refresh_one(node_id) == "revoked"
                reply = await seen.call("GET", f"/api/v1/nodes/{node_id}", token=token)
                assert reply.json["node"]["credentials"]["state"] == "NODE_CREDENTIALS_STATE_REVOKED", (
                    reply.body
                )
                assert (await seen.call("GET", "/api/v1/alerts", token=token)).status == 200
                seen.message(
                    "ListAlerts", await nodes.ListAlerts(node_pb2.ListAlertsRequest(), metadata=auth)
                )
                seen.message(
                    "GetNode", await nodes.GetNode(node_pb2.GetNodeRequest(node_id=node_id), metadata=auth)
                )

                # -- revoked by the user
                reply = await seen.call(
                    "POST", f"/api/v1/nodes/{node_id}/credentials:revoke", {}, token=token
                )
                assert reply.status == 200, reply.body
                seen.message("ListNodes", await nodes.ListNodes(node_pb2.ListNodesRequest(), metadata=auth))

                # Envoy writes its access log in batches: wait for every REST call's line
                calls = seen.rest_calls
                await _until(
                    lambda: asyncio.to_thread(
                        lambda: access_log.exists() and len(access_log.read_text().splitlines()) >= calls
                    ),
                    "Envoy's access log to hold every REST call",
                )
            cache = controller.cache
            assert isinstance(cache, MemoryCache)
            cached = b"".join(key.encode() + value for key, (value, _) in cache._entries.items())
            assert cached
            assert controller.secret_audit is not None
            await controller.secret_audit.flush()

    # Everything is stopped. The marker is nowhere.
    # every kind of exit was recorded (how many of each depends on polling: not counted)
    labels = {what for what, _ in seen.seen}
    assert {
        "ListNodes",
        "GetNode",
        "GetDatabase",
        "ListDatabases",
        "GetDeployment",
        "ScaleDeployment",
        "FetchNodeCredentials",
        "FetchNodeCredentials of another node",
        "CreateDatabase refused",
        "UpdateNodeCredentials too long",
        "RegisterNode",
        "ListAlerts",
    } <= labels
    rest = {
        label.split(" ", 1)[0] + " " + label.split(" ", 1)[1].split("/")[3]
        for label in labels
        if label[:1] in "GPD" and " /api/v1/" in label
    }
    assert {
        "POST auth",
        "POST nodes",
        "POST databases",
        "POST deployments",
        "PUT nodes",
        "GET nodes",
    } <= rest, rest
    assert [what for what, body in seen.seen if needle in body] == []
    assert needle not in cached
    logged = "\n".join(record.getMessage() + (record.exc_text or "") for record in caplog.records)
    assert "rewrapped" in logged or "rewrap" in logged
    assert marker not in logged
    assert "holding the provider token version 4" in agent_log.read_text()
    assert f"/api/v1/nodes/{node_id}/credentials" in access_log.read_text()
    leaking = [
        str(p)
        for root in (data_dir, agents_root, gateway_dir)
        for p in _files(root)
        if needle in p.read_bytes()
    ]
    assert leaking == []
    databases = [p for p in _files(data_dir) if p.read_bytes()[:16] == b"SQLite format 3\x00"]
    assert databases
    for path in databases:
        dump = _sqlite_dump(path)
        if path.name == "controller.db":
            assert b"a67v1:k2:" in dump  # the secrets are there, sealed under the new key
        assert needle not in dump, path
