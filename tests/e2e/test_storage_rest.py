"""Files through the real gateway (Envoy): a raw-body upload (google.api.HttpBody, the path in
``x-a67-path``, the MIME type in Content-Type), raw downloads with the file's Content-Type and
Content-Length, byte ranges (206 + Content-Range; 400 past the end), JSON metadata and lists,
and another user's file looking missing — with a real controller and 3 real storage agents."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import uuid
from pathlib import Path

import grpc

from tests.e2e.conftest import Rest, start_gateway
from tests.integration.test_deployments_real import Client, processes
from tests.integration.test_node_api import _user
from tests.support import PASSWORD, controller_settings, running_controller

REGIONS = ["eu-west", "us-east", "ap-south"]


async def test_rest_upload_download_range_metadata_and_isolation(tmp_path: Path) -> None:
    settings = controller_settings(tmp_path / "controller", heartbeat_interval_seconds=0.3)
    with processes(tmp_path) as procs:
        async with (
            running_controller(settings) as controller,
            grpc.aio.insecure_channel(controller.address) as channel,
        ):
            client = Client(channel, await _user(channel, f"grpc-{uuid.uuid4().hex[:6]}@example.com"))
            gateways = start_gateway(controller.address, tmp_path)
            gateway = next(gateways)
            rest: Rest = gateway.rest
            try:
                call = asyncio.to_thread

                async def login(email: str) -> str:
                    await call(
                        rest.post, "/api/v1/auth/register", {"email": email, "password_hash": PASSWORD}
                    )
                    reply = await call(
                        rest.post, "/api/v1/auth/login", {"email": email, "password_hash": PASSWORD}
                    )
                    assert reply.status == 200, reply.body
                    return str(reply.json["access_token"])

                token = await login("ada-rest@example.com")
                reply = await call(rest.post, "/api/v1/nodes/enrollment-tokens", {"max_uses": 3}, token=token)
                assert reply.status == 201, reply.body
                enrollment = reply.json["token"]
                for region in REGIONS:
                    args = [
                        sys.executable,
                        "-m",
                        "controller.cli",
                        "agent",
                        "--data-dir",
                        str(tmp_path / region),
                    ]
                    args += [
                        "--region",
                        region,
                        "--controller",
                        controller.address,
                        "--node-types",
                        "storage",
                    ]
                    procs.start(args, f"agent-{region}.log", {"A67_AGENT_TOKEN": enrollment})
                client.token = token
                await client.wait_ready(3, within=60)

                data = os.urandom(9 * 1024 * 1024 + 12345)
                headers = {"content-type": "image/png", "x-a67-path": "pics/cat.png", "x-a67-replicas": "2"}
                reply = await call(
                    rest.request, "POST", "/api/v1/files", raw=data, headers=headers, token=token
                )
                assert reply.status == 201, reply.body
                file = reply.json["file"]
                assert file["path"] == "pics/cat.png"
                assert file["mime_type"] == "image/png"
                assert int(file["size"]) == len(data)
                assert file["checksum"] == hashlib.sha256(data).hexdigest()
                assert file["replicas"] == 2
                assert file["replication_status"] == "REPLICATION_STATUS_COMPLETE"
                assert all(len(c["locations"]) == 2 for c in file["chunks"])
                file_id = file["id"]

                whole = await call(rest.get, f"/api/v1/files/{file_id}:download", token=token)
                assert whole.status == 200, whole.body[:200]
                assert whole.body == data
                assert whole.headers["content-type"] == "image/png"
                assert whole.headers["content-length"] == str(len(data))

                part = await call(
                    rest.get,
                    f"/api/v1/files/{file_id}:download",
                    token=token,
                    headers={"range": "bytes=4194000-4195000"},
                )
                assert part.status == 206, part.body[:200]
                assert part.body == data[4194000:4195001]
                assert part.headers["content-range"] == f"bytes 4194000-4195000/{len(data)}"
                assert part.headers["content-length"] == "1001"
                tail = await call(
                    rest.get, f"/api/v1/files/{file_id}:download", token=token, headers={"range": "bytes=-7"}
                )
                assert tail.status == 206
                assert tail.body == data[-7:]
                past = await call(
                    rest.get,
                    f"/api/v1/files/{file_id}:download",
                    token=token,
                    headers={"range": f"bytes={len(data)}-"},
                )
                assert past.status == 400
                assert "cannot be satisfied" in past.json["message"]

                meta = await call(rest.get, f"/api/v1/files/{file_id}", token=token)
                assert meta.status == 200
                assert meta.json["file"]["id"] == file_id
                listed = await call(rest.get, "/api/v1/files?prefix=pics/&page_size=10", token=token)
                assert listed.status == 200
                assert [f["id"] for f in listed.json["files"]] == [file_id]

                bad = await call(
                    rest.request,
                    "POST",
                    "/api/v1/files",
                    raw=b"x",
                    headers={"content-type": "text/plain", "x-a67-path": "../up"},
                    token=token,
                )
                assert bad.status == 400, bad.body
                assert bad.json["details"], bad.body

                eve = await login("eve-rest@example.com")
                for method, path in (
                    ("GET", f"/api/v1/files/{file_id}"),
                    ("GET", f"/api/v1/files/{file_id}:download"),
                    ("DELETE", f"/api/v1/files/{file_id}"),
                ):
                    refused = await call(rest.request, method, path, token=eve)
                    assert refused.status == 404, (method, path, refused.status)
                assert (await call(rest.get, "/api/v1/files", token=eve)).json["files"] == []

                deleted = await call(rest.request, "DELETE", f"/api/v1/files/{file_id}", token=token)
                assert deleted.status == 200
                assert (await call(rest.get, f"/api/v1/files/{file_id}", token=token)).status == 404
            finally:
                gateways.close()
