"""App logs end to end: a real controller, a real agent process, a real app process.

1. ``GetReplicaLogs`` returns the app's output (with times); a line holding a secret env
   value arrives masked; ``follow`` receives a line the app prints after the call started,
   and cancelling the call stops the reading on the agent; another user gets NOT_FOUND.
2. The CLI: ``a67 logs APP`` prints the lines; ``a67 logs APP -f`` prints a new line and
   exits on SIGINT; ``a67 deploy`` of a crashing app shows its last log lines.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from automator67.v1 import deployment_pb2

from tests.integration.test_deployments import manifest, source_tar_gz
from tests.integration.test_deployments_real import HEARTBEAT, Client, _body, _until, processes
from tests.integration.test_node_api import _user
from tests.support import bearer, controller_settings, running_controller

ROOT = Path(__file__).resolve().parents[2]
SECRET = "tok-9f8e7d6c5b4a"

APP = """\
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

print("hello from the logs app", flush=True)
print("connecting with " + os.environ["API_TOKEN"], flush=True)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/say/"):
            print("said " + self.path[len("/say/"):], flush=True)
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""

CRASHING_APP = "print('about to fail: missing CONFIG_PATH', flush=True)\nraise SystemExit(3)\n"


def logs_manifest(name: str = "logs") -> deployment_pb2.DeploymentManifest:
    return manifest(
        name=name,
        replicas=1,
        env={"API_TOKEN": SECRET, "GREETING": "hi"},
        resources=deployment_pb2.Resources(memory="64MB", cpu="0.1"),
        health_check=deployment_pb2.HealthCheck(
            path="/health", interval_seconds=2, timeout_seconds=1, retries=3
        ),
    )


def texts(batches: list[deployment_pb2.GetReplicaLogsResponse]) -> list[str]:
    return [line.text for b in batches for line in b.lines]


async def deploy_running(client: Client) -> deployment_pb2.Deployment:
    created = await client.deployments.CreateDeployment(
        deployment_pb2.CreateDeploymentRequest(
            manifest=logs_manifest(), source_tar_gz=source_tar_gz({"app.py": APP})
        ),
        metadata=bearer(client.token),
    )
    return await client.wait(
        created.deployment_id,
        lambda d: (
            d.status == deployment_pb2.DEPLOYMENT_STATUS_RUNNING
            and any(a.status == "running" for a in d.node_assignments)
        ),
        "the logs app running",
        within=60,
    )


async def test_logs_follow_scrubbing_and_ownership(tmp_path: Path) -> None:
    settings = controller_settings(tmp_path / "controller", heartbeat_interval_seconds=HEARTBEAT)
    with processes(tmp_path) as procs:
        async with (
            running_controller(settings) as controller,
            grpc.aio.insecure_channel(controller.address) as channel,
        ):
            client = Client(channel, await _user(channel))
            base = 30000 + (os.getpid() % 50) * 40
            procs.agent(controller.address, await client.enrollment(uses=1), "eu-west", (base, base + 19))
            await client.wait_ready(1)
            d = await deploy_running(client)
            endpoint = d.node_assignments[0].endpoint

            # The last lines, with times; the secret env value is masked.
            async def read_all() -> list[deployment_pb2.GetReplicaLogsResponse]:
                call = client.deployments.GetReplicaLogs(
                    deployment_pb2.GetReplicaLogsRequest(deployment_id=d.id), metadata=bearer(client.token)
                )
                return [batch async for batch in call]

            batches: list[deployment_pb2.GetReplicaLogsResponse] = []

            async def has_hello() -> bool:
                batches[:] = await read_all()
                return "hello from the logs app" in texts(batches)

            await _until(has_hello, "the app's first line in its logs")
            lines = texts(batches)
            assert not any(SECRET in text for text in lines), lines
            assert "connecting with ***" in lines
            assert all(b.node_id == d.node_assignments[0].node_id and b.replica_index == 0 for b in batches)
            assert all(line.HasField("time") for b in batches for line in b.lines)

            # tail_lines and replica_index filter; an unknown replica is NOT_FOUND.
            one = [
                b
                async for b in client.deployments.GetReplicaLogs(
                    deployment_pb2.GetReplicaLogsRequest(deployment_id=d.id, replica_index=0, tail_lines=1),
                    metadata=bearer(client.token),
                )
            ]
            assert len(texts(one)) == 1
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                async for _ in client.deployments.GetReplicaLogs(
                    deployment_pb2.GetReplicaLogsRequest(deployment_id=d.id, replica_index=7),
                    metadata=bearer(client.token),
                ):
                    pass
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND

            # Follow: a line printed after the call started arrives on it.
            follow = client.deployments.GetReplicaLogs(
                deployment_pb2.GetReplicaLogsRequest(deployment_id=d.id, follow=True, tail_lines=5),
                metadata=bearer(client.token),
            )
            received: list[str] = []

            async def read_follow() -> None:
                async for batch in follow:
                    received.extend(line.text for line in batch.lines)

            reader = asyncio.create_task(read_follow())
            await _until(lambda: _async(bool(received)), "the followed log's first lines")
            assert await _body(f"{endpoint}/say/after-the-call-started") == "ok"
            await _until(
                lambda: _async("said after-the-call-started" in received), "the new line on the followed log"
            )
            assert controller.replica_logs is not None
            assert len(controller.replica_logs.slots) == 1
            follow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reader
            # Cancelling reached the agent: the controller's slot is gone and the agent ended its push.
            await _until(lambda: _async(len(controller.replica_logs.slots) == 0), "the log read to end")
            agent_log = tmp_path / "agent-eu-west.log"
            await _until(
                lambda: _async("the controller ended the push" in agent_log.read_text()),
                "the agent to stop following",
            )

            # Another user's app looks like a missing one.
            other = await _user(channel, email="eve@example.com")
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                async for _ in client.deployments.GetReplicaLogs(
                    deployment_pb2.GetReplicaLogsRequest(deployment_id=d.id), metadata=bearer(other)
                ):
                    pass
            assert denied.value.code() == grpc.StatusCode.NOT_FOUND


async def _async(value: bool) -> bool:
    return value


# --------------------------------------------------------------------------- the CLI


def _cli_env(address: str, config: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("A67_")}
    env.update(A67_CONTROLLER=address, A67_CONFIG_DIR=str(config), COLUMNS="200")
    return env


def _cli(address: str, config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=_cli_env(address, config),
        cwd=ROOT,
        timeout=300,
    )


async def test_cli_logs_follow_and_failed_deploy(tmp_path: Path) -> None:
    settings = controller_settings(tmp_path / "controller", heartbeat_interval_seconds=HEARTBEAT)
    config = tmp_path / "config"
    with processes(tmp_path) as procs:
        async with (
            running_controller(settings) as controller,
            grpc.aio.insecure_channel(controller.address) as channel,
        ):
            address = controller.address
            made = await asyncio.to_thread(
                _cli, address, config, "register", "--email", "ada@example.com", "--password-stdin",
                stdin="correct horse battery staple\n",
            )  # fmt: skip
            assert made.returncode == 0, made.stderr
            token = json.loads((config / "credentials.json").read_text())[address]["access_token"]
            client = Client(channel, token)
            base = 30000 + (os.getpid() % 50) * 40 + 20
            procs.agent(address, await client.enrollment(uses=1), "eu-west", (base, base + 19))
            await client.wait_ready(1)
            d = await deploy_running(client)
            endpoint = d.node_assignments[0].endpoint

            async def printed() -> bool:
                shown = await asyncio.to_thread(_cli, address, config, "logs", "logs", "--json")
                assert shown.returncode == 0, shown.stderr
                records = [json.loads(line) for line in shown.stdout.splitlines()]
                return any(r["text"] == "hello from the logs app" for r in records)

            await _until(printed, "a67 logs --json to print the app's first line", within=60)
            plain = await asyncio.to_thread(_cli, address, config, "logs", "logs", "--replica", "0")
            assert plain.returncode == 0, plain.stderr
            assert "[0] hello from the logs app" in plain.stdout
            assert SECRET not in plain.stdout

            # a67 logs -f: a new line shows up, then SIGINT ends it.
            out_path = tmp_path / "follow.out"
            with out_path.open("wb") as sink:
                follower = subprocess.Popen(  # noqa: ASYNC220 - it runs while the test reads its output
                    [sys.executable, "-m", "controller.cli", "logs", d.id, "-f", "--tail", "5"],
                    stdout=sink,
                    stderr=subprocess.PIPE,
                    env=_cli_env(address, config),
                    cwd=ROOT,
                )
                try:
                    await _until(
                        lambda: _async("hello from the logs app" in out_path.read_text()),
                        "a67 logs -f to print the first lines",
                        within=60,
                    )
                    assert await _body(f"{endpoint}/say/while-following") == "ok"
                    await _until(
                        lambda: _async("said while-following" in out_path.read_text()),
                        "a67 logs -f to print the new line",
                        within=60,
                    )
                    follower.send_signal(signal.SIGINT)
                    code = await asyncio.to_thread(follower.wait, 60)
                finally:
                    if follower.poll() is None:
                        follower.kill()
                        follower.wait()
                assert follower.stderr is not None
                err = follower.stderr.read().decode()
                follower.stderr.close()
            assert code == 0, err
            assert controller.replica_logs is not None
            await _until(lambda: _async(len(controller.replica_logs.slots) == 0), "the followed read to end")

            # A crashing app: a67 deploy fails and shows the last lines of its log.
            app_dir = tmp_path / "crashing"
            app_dir.mkdir()
            (app_dir / "app.py").write_text(CRASHING_APP)
            (app_dir / "a67.toml").write_text(
                'name = "crashing"\ntype = "backend"\nruntime = "python"\nentrypoint = "app.py"\n'
                'replicas = 1\n[resources]\nmemory = "64MB"\ncpu = "0.1"\n'
                '[health_check]\npath = "/health"\ninterval_seconds = 2\ntimeout_seconds = 1\nretries = 3\n'
            )
            failed = await asyncio.to_thread(
                _cli, address, config, "deploy", str(app_dir), "--timeout", "120"
            )
            assert failed.returncode == 1, (failed.stdout, failed.stderr)
            assert "last lines of replica 0's log:" in failed.stderr, failed.stderr
            assert (
                "about to fail: missing CONFIG_PATH"
                in failed.stderr.split("last lines of replica 0's log:")[1]
            )
