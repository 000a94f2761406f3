"""App logs through the real gateway (Envoy): ``GET /api/v1/deployments/{id}/logs`` as NDJSON,
with a real controller, a real agent process and a real app.

The last lines come back one JSON object per line (a secret env value masked); with
``follow=true`` the response stays open and a line the app prints after the request started
arrives on it; another user's app is 404, like a missing one.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from tests.e2e.conftest import Rest, start_gateway
from tests.integration.test_app_logs_real import SECRET, deploy_running
from tests.integration.test_deployments_real import Client, _body, _until, processes
from tests.support import PASSWORD, controller_settings, running_controller


def ndjson(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def texts(records: list[dict[str, Any]]) -> list[str]:
    return [line["text"] for r in records for line in r.get("lines", [])]


class Follower(threading.Thread):
    """Reads a streaming response line by line until ``done`` says it has what it waits for
    (or the response ends); the status, headers and records read are kept."""

    def __init__(
        self, rest: Rest, path: str, token: str, done: Callable[[list[dict[str, Any]]], bool]
    ) -> None:
        super().__init__(daemon=True)
        self.rest, self.path, self.token, self.done = rest, path, token, done
        self.status = 0
        self.headers: dict[str, str] = {}
        self.records: list[dict[str, Any]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        connection = http.client.HTTPConnection(self.rest.host, self.rest.port, timeout=60)
        try:
            connection.request("GET", self.path, headers={"authorization": f"Bearer {self.token}"})
            response = connection.getresponse()
            self.status = response.status
            self.headers = {k.lower(): v for k, v in response.getheaders()}
            while not self.done(self.records) and (line := response.readline()):
                if line.strip():
                    self.records.append(json.loads(line))
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            connection.close()


def reason(reply: Any) -> str:
    (info,) = [d for d in reply.json["details"] if d["@type"].endswith("google.rpc.ErrorInfo")]
    return str(info["reason"])


async def _async(value: bool) -> bool:
    return value


async def test_rest_logs_ndjson_follow_and_ownership(tmp_path: Path) -> None:
    settings = controller_settings(tmp_path / "controller", heartbeat_interval_seconds=0.3)
    with processes(tmp_path) as procs:
        async with (
            running_controller(settings) as controller,
            grpc.aio.insecure_channel(controller.address) as channel,
        ):
            gateways = start_gateway(controller.address, tmp_path)
            rest: Rest = next(gateways).rest
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

                token = await login("ada-logs@example.com")
                reply = await call(rest.post, "/api/v1/nodes/enrollment-tokens", {"max_uses": 1}, token=token)
                assert reply.status == 201, reply.body
                base = 45000 + (os.getpid() % 50) * 20
                args = [
                    sys.executable,
                    "-m",
                    "controller.cli",
                    "agent",
                    "--data-dir",
                    str(tmp_path / "eu-west"),
                ]
                args += ["--region", "eu-west", "--controller", controller.address]
                args += ["--advertise-host", "127.0.0.1", "--replica-port-range", f"{base}-{base + 19}"]
                procs.start(args, "agent-eu-west.log", {"A67_AGENT_TOKEN": reply.json["token"]})
                client = Client(channel, token)
                await client.wait_ready(1, within=60)
                d = await deploy_running(client)
                endpoint = d.node_assignments[0].endpoint
                path = f"/api/v1/deployments/{d.id}/logs"

                # The last lines: NDJSON, one batch of one replica's lines per line.
                got: list[Any] = []

                async def has_hello() -> bool:
                    got[:] = [await call(rest.get, f"{path}?tail_lines=50", token=token)]
                    assert got[0].status == 200, got[0].body
                    return "hello from the logs app" in texts(ndjson(got[0].body))

                await _until(has_hello, "the app's first line through REST", within=60)
                assert got[0].headers["content-type"].startswith("application/x-ndjson"), got[0].headers
                records = ndjson(got[0].body)
                assert all(r["node_id"] == d.node_assignments[0].node_id for r in records), records
                lines = texts(records)
                assert "connecting with ***" in lines
                assert not any(SECRET in text for text in lines)
                assert all(line["time"].endswith("Z") for r in records for line in r["lines"])

                # follow=true: the response stays open and a line printed later arrives on it.
                follower = Follower(
                    rest,
                    f"{path}?tail_lines=5&follow=true",
                    token,
                    lambda records: "said over-rest" in texts(records),
                )
                follower.start()
                await _until(
                    lambda: _async(bool(follower.records) or follower.error is not None), "first lines"
                )
                assert follower.error is None, follower.error
                assert follower.status == 200
                assert await _body(f"{endpoint}/say/over-rest") == "ok"
                await _until(
                    lambda: _async(not follower.is_alive()), "the followed response to carry the new line"
                )
                assert follower.error is None, follower.error
                assert "said over-rest" in texts(follower.records)
                assert controller.replica_logs is not None
                await _until(
                    lambda: _async(len(controller.replica_logs.slots) == 0),
                    "the gateway's disconnect to end the read on the controller",
                )

                # Another user's app is 404, exactly like a missing one.
                eve = await login("eve-logs@example.com")
                denied = await call(rest.get, path, token=eve)
                missing = await call(rest.get, "/api/v1/deployments/no-such-app/logs", token=eve)
                assert denied.status == 404, denied.body
                assert missing.status == 404, missing.body
                assert denied.json["code"] == missing.json["code"] == 5  # NOT_FOUND
                assert reason(denied) == reason(missing) == "DEPLOYMENT_NOT_FOUND"
                unsigned = await call(rest.get, path)
                assert unsigned.status == 401, unsigned.body
            finally:
                gateways.close()
