"""Deployments end to end with REAL agent processes running a tiny real HTTP app.

1. Deploy 3 replicas over 3 agents in 3 regions, kill -9 an agent, scale to 5 over
   new agents, roll out version 2, a broken version 3 reverts by itself, delete:
   nothing answers and no replica process is left.
2. kill -9 the controller (a subprocess) while a rollout is in progress, start it
   again on the same data dir and ports: the rollout completes and no replica runs twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO

import grpc
import psutil
from automator67.v1 import common_pb2, deployment_pb2, deployment_pb2_grpc, node_pb2, node_pb2_grpc

from tests.integration.test_deployments import manifest, source_tar_gz
from tests.integration.test_node_api import _user
from tests.support import bearer, controller_settings, running_controller

HEARTBEAT = 0.3
SCHEDULABLE = (common_pb2.NODE_STATUS_READY, common_pb2.NODE_STATUS_BUSY)

APP = """\
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = {version!r}
HEALTHY_AFTER = {healthy_after!r}
STARTED = time.monotonic()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health":
            healthy = time.monotonic() - STARTED >= HEALTHY_AFTER
            code, body = (200, b"ok") if healthy else (503, b"warming up")
        else:
            code, body = 200, VERSION.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""

BROKEN_APP = "import sys\nprint('v3 cannot start')\nsys.exit(3)\n"


def app_source(version: str, healthy_after: float = 0.0) -> bytes:
    return source_tar_gz({"app.py": APP.format(version=version, healthy_after=healthy_after)})


def app_manifest(replicas: int) -> deployment_pb2.DeploymentManifest:
    # The validator's minimums: interval 2 s, timeout 1 s; 3 retries leave a slow
    # app 2 * 3 + 1 = 7 s to get healthy.
    return manifest(
        name="hello",
        replicas=replicas,
        env={"GREETING": "hi"},
        resources=deployment_pb2.Resources(memory="64MB", cpu="0.1"),
        health_check=deployment_pb2.HealthCheck(
            path="/health", interval_seconds=2, timeout_seconds=1, retries=3
        ),
    )


# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (a local test URL)
        return str(response.read().decode())


async def _body(url: str) -> str | None:
    try:
        return await asyncio.to_thread(_get, url)
    except OSError:
        return None


async def _until(check: Callable[[], Awaitable[bool]], what: str, within: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.1)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("A67_")}


def _environ(process: psutil.Process) -> dict[str, str]:
    try:
        if process.status() == psutil.STATUS_ZOMBIE:
            return {}
        return dict(process.environ())
    except (psutil.Error, OSError):
        return {}


def replica_pids(deployment_id: str) -> set[int]:
    """Live processes that carry ``A67_DEPLOYMENT_ID=<deployment_id>`` in their environment."""
    return {p.pid for p in psutil.process_iter() if _environ(p).get("A67_DEPLOYMENT_ID") == deployment_id}


class Processes:
    """Every process a test starts; all of them (and every replica under ``root``) die at teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []

    def start(
        self, args: list[str], log_name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.root / log_name, "ab")  # noqa: SIM115 - closed at teardown
        self._logs.append(log)
        process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env={**_clean_env(), **(env or {})}
        )
        self.started.append(process)
        return process

    def agent(self, address: str, token: str, region: str, ports: tuple[int, int]) -> subprocess.Popen[bytes]:
        args = [sys.executable, "-m", "controller.cli", "agent", "--data-dir", str(self.root / region)]
        args += ["--region", region, "--controller", address]
        args += ["--advertise-host", "127.0.0.1", "--replica-port-range", f"{ports[0]}-{ports[1]}"]
        return self.start(args, f"agent-{region}.log", {"A67_AGENT_TOKEN": token})

    def close(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.started:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        marker = str(self.root) + os.sep
        for p in psutil.process_iter():
            if _environ(p).get("A67_REPLICA_DIR", "").startswith(marker):
                with contextlib.suppress(psutil.Error):
                    p.kill()
        for log in self._logs:
            log.close()


@contextlib.contextmanager
def processes(root: Path) -> Iterator[Processes]:
    tracked = Processes(root)
    try:
        yield tracked
    finally:
        tracked.close()


class Client:
    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        self.token = token
        self.nodes = node_pb2_grpc.NodeServiceStub(channel)
        self.deployments = deployment_pb2_grpc.DeploymentServiceStub(channel)

    async def enrollment(self, uses: int) -> str:
        reply = await self.nodes.CreateEnrollmentToken(
            node_pb2.CreateEnrollmentTokenRequest(max_uses=uses), metadata=bearer(self.token)
        )
        return str(reply.token)

    async def list_nodes(self) -> list[node_pb2.Node]:
        return list(
            (await self.nodes.ListNodes(node_pb2.ListNodesRequest(), metadata=bearer(self.token))).nodes
        )

    async def wait_ready(self, count: int, within: float = 30.0) -> list[node_pb2.Node]:
        async def check() -> bool:
            # Busy (the machine's CPU above 90 %, as real agents report it) still takes replicas.
            return sum(n.status in SCHEDULABLE for n in await self.list_nodes()) >= count

        await _until(check, f"{count} ready (or busy) agents", within)
        return await self.list_nodes()

    async def get(self, deployment_id: str) -> deployment_pb2.Deployment:
        return (
            await self.deployments.GetDeployment(
                deployment_pb2.GetDeploymentRequest(deployment_id=deployment_id), metadata=bearer(self.token)
            )
        ).deployment

    async def wait(
        self,
        deployment_id: str,
        predicate: Callable[[deployment_pb2.Deployment], bool],
        what: str,
        within: float = 20.0,
    ) -> deployment_pb2.Deployment:
        latest: list[deployment_pb2.Deployment] = []

        async def check() -> bool:
            latest[:] = [await self.get(deployment_id)]
            return predicate(latest[0])

        try:
            await _until(check, what, within)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; deployment is {latest[0] if latest else None}") from None
        return latest[0]

    async def wait_answering(
        self, deployment_id: str, replicas: int, version: str, within: float = 20.0
    ) -> deployment_pb2.Deployment:
        """Running with ``replicas`` replicas, each endpoint answering ``version``."""
        latest: list[deployment_pb2.Deployment] = []
        bodies: list[str | None] = []

        async def check() -> bool:
            latest[:] = [await self.get(deployment_id)]
            d = latest[0]
            if d.status != deployment_pb2.DEPLOYMENT_STATUS_RUNNING or d.current_replicas != replicas:
                return False
            if len(d.node_assignments) != replicas or len(set(d.endpoints)) != replicas:
                return False
            bodies[:] = await asyncio.gather(*(_body(a.endpoint) for a in d.node_assignments))
            return all(a.status == "running" for a in d.node_assignments) and bodies == [version] * replicas

        try:
            await _until(check, f"{replicas} replicas answering {version!r}", within)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; bodies {bodies}; deployment is {latest[0] if latest else None}"
            ) from None
        return latest[0]


# --------------------------------------------------------------------------- test 1


async def test_real_agents_deploy_recover_scale_update_revert_and_delete(tmp_path: Path) -> None:
    settings = controller_settings(tmp_path / "controller", heartbeat_interval_seconds=HEARTBEAT)
    with processes(tmp_path) as procs:
        async with (
            running_controller(settings) as controller,
            grpc.aio.insecure_channel(controller.address) as channel,
        ):
            client = Client(channel, await _user(channel))
            enrollment = await client.enrollment(uses=5)
            base = 20000 + (os.getpid() % 50) * 100
            regions = ["eu-west", "us-east", "ap-south", "sa-east", "af-south"]
            ports = {region: (base + i * 20, base + i * 20 + 19) for i, region in enumerate(regions)}
            agent = {r: procs.agent(controller.address, enrollment, r, ports[r]) for r in regions[:3]}
            nodes = await client.wait_ready(3)
            region_of = {n.id: n.region for n in nodes}

            # Deploy 3 replicas: one per region, each answering v1.
            created = await client.deployments.CreateDeployment(
                deployment_pb2.CreateDeploymentRequest(
                    manifest=app_manifest(3), source_tar_gz=app_source("v1")
                ),
                metadata=bearer(client.token),
            )
            deployment_id = created.deployment_id
            d = await client.wait_answering(deployment_id, 3, "v1")
            assert {region_of[a.node_id] for a in d.node_assignments} == set(regions[:3])
            assert len(replica_pids(deployment_id)) == 3

            # kill -9 the agent of replica 0: its replica dies with it and runs elsewhere.
            victim = next(a for a in d.node_assignments if a.replica_index == 0)
            killed = agent[region_of[victim.node_id]]
            killed.send_signal(signal.SIGKILL)
            killed.wait()
            d = await client.wait(
                deployment_id,
                lambda d: (
                    d.current_replicas == 3
                    and any(
                        a.replica_index == 0 and a.node_id != victim.node_id and a.status == "running"
                        for a in d.node_assignments
                    )
                ),
                "replica 0 healthy on another node",
            )
            d = await client.wait_answering(deployment_id, 3, "v1")
            replaced = next(a for a in d.node_assignments if a.replica_index == 0)
            assert replaced.generation > victim.generation
            assert await _body(victim.endpoint) is None  # the old process died with its agent

            # Two more agents in new regions; scale to 5.
            for r in regions[3:]:
                agent[r] = procs.agent(controller.address, enrollment, r, ports[r])
            await client.wait_ready(4)
            region_of.update({n.id: n.region for n in await client.list_nodes()})
            await client.deployments.ScaleDeployment(
                deployment_pb2.ScaleDeploymentRequest(deployment_id=deployment_id, replicas=5),
                metadata=bearer(client.token),
            )
            d = await client.wait_answering(deployment_id, 5, "v1")
            assert sorted(a.replica_index for a in d.node_assignments) == [0, 1, 2, 3, 4]
            await _until(lambda: _async(len(replica_pids(deployment_id)) == 5), "5 replica processes")

            # Rolling update to v2.
            async def update(source: bytes) -> None:
                reply = await client.deployments.UpdateDeployment(
                    deployment_pb2.UpdateDeploymentRequest(
                        deployment_id=deployment_id, manifest=app_manifest(5), source_tar_gz=source
                    ),
                    metadata=bearer(client.token),
                )
                assert reply.deployment.status == deployment_pb2.DEPLOYMENT_STATUS_DEPLOYING

            v1_sha = d.package_sha256
            await update(app_source("v2"))
            d = await client.wait_answering(deployment_id, 5, "v2", within=40)
            assert d.version == 2
            assert d.package_sha256 != v1_sha
            v2 = {(a.replica_index, a.node_id, a.generation) for a in d.node_assignments}
            await _until(lambda: _async(len(replica_pids(deployment_id)) == 5), "v1 replicas stopped")

            # A broken v3 (the app exits at once) reverts by itself to v2.
            watch = client.deployments.WatchDeployment(
                deployment_pb2.WatchDeploymentRequest(deployment_id=deployment_id),
                metadata=bearer(client.token),
            )
            await watch.read()  # the current state: the watch is open
            await update(source_tar_gz({"app.py": BROKEN_APP}))
            messages: list[str] = []

            async def reverted() -> None:
                while (event := await watch.read()) != grpc.aio.EOF:
                    assert isinstance(event, deployment_pb2.WatchDeploymentResponse)
                    messages.append(event.message)
                    if "reverted to version 2" in event.message:
                        return

            try:
                await asyncio.wait_for(reverted(), 20)
            except TimeoutError:
                raise AssertionError(f"no revert announced; events: {messages}") from None
            finally:
                watch.cancel()
            assert any("starting version 3" in m for m in messages), messages
            d = await client.wait(
                deployment_id,
                lambda d: d.status == deployment_pb2.DEPLOYMENT_STATUS_RUNNING and d.version == 2,
                "reverted to version 2",
            )
            d = await client.wait_answering(deployment_id, 5, "v2")
            assert {(a.replica_index, a.node_id, a.generation) for a in d.node_assignments} == v2
            await _until(lambda: _async(len(replica_pids(deployment_id)) == 5), "no v3 replica left")

            # Delete: nothing answers, no replica process is left.
            endpoints = set(d.endpoints) | {victim.endpoint}
            pids = replica_pids(deployment_id)
            await client.deployments.DeleteDeployment(
                deployment_pb2.DeleteDeploymentRequest(deployment_id=deployment_id),
                metadata=bearer(client.token),
            )

            async def gone() -> bool:
                bodies = await asyncio.gather(*(_body(url) for url in endpoints))
                return all(b is None for b in bodies) and not replica_pids(deployment_id)

            await _until(gone, "no endpoint answering and no replica process", within=15)
            assert not any(psutil.pid_exists(pid) and _environ(psutil.Process(pid)) for pid in pids)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await client.get(deployment_id)
                raise AssertionError("the deployment still exists")


async def _async(value: bool) -> bool:
    return value


# --------------------------------------------------------------------------- test 2


async def _controller_up(address: str, within: float = 30.0) -> None:
    async def check() -> bool:
        async with grpc.aio.insecure_channel(address) as channel:
            try:
                await asyncio.wait_for(channel.channel_ready(), 1.0)
            except TimeoutError:
                return False
        return True

    await _until(check, f"controller at {address}", within)


async def test_controller_killed_during_a_rollout_resumes_it(tmp_path: Path) -> None:
    port, node_port = _free_port(), _free_port()
    address = f"127.0.0.1:{port}"
    serve = [sys.executable, "-m", "controller.cli", "serve", "--listen", address]
    serve += ["--node-listen", f"127.0.0.1:{node_port}", "--data-dir", str(tmp_path / "controller")]
    serve += ["--heartbeat-interval", "0.5"]
    with processes(tmp_path) as procs:
        controller = procs.start(serve, "controller-1.log")
        await _controller_up(address)
        async with grpc.aio.insecure_channel(address) as channel:
            token = await _user(channel)
            client = Client(channel, token)
            enrollment = await client.enrollment(uses=2)
            base = 25000 + (os.getpid() % 50) * 100
            for i, region in enumerate(("eu-west", "us-east")):
                procs.agent(address, enrollment, region, (base + i * 50, base + i * 50 + 49))
            await client.wait_ready(2)

            # The app answers /health 200 only after 3 s: the rollout is in progress meanwhile.
            created = await client.deployments.CreateDeployment(
                deployment_pb2.CreateDeploymentRequest(
                    manifest=app_manifest(2), source_tar_gz=app_source("v1", healthy_after=3.0)
                ),
                metadata=bearer(token),
            )
            deployment_id = created.deployment_id
            await client.wait(
                deployment_id,
                lambda d: d.status == deployment_pb2.DEPLOYMENT_STATUS_DEPLOYING,
                "deploying",
                within=10,
            )
            await _until(lambda: _async(len(replica_pids(deployment_id)) == 2), "2 replicas starting", 10)
            assert (await client.get(deployment_id)).status == deployment_pb2.DEPLOYMENT_STATUS_DEPLOYING

        controller.send_signal(signal.SIGKILL)
        controller.wait()
        controller = procs.start(serve, "controller-2.log")
        await _controller_up(address)
        async with grpc.aio.insecure_channel(address) as channel:
            client = Client(channel, token)
            d = await client.wait_answering(deployment_id, 2, "v1", within=40)
            assert sorted(a.replica_index for a in d.node_assignments) == [0, 1]

            # No replica runs twice: one process per replica, and it is the one answering.
            await _until(
                lambda: _async(len(replica_pids(deployment_id)) == 2), "exactly 2 replica processes", 20
            )
            pids = replica_pids(deployment_id)
            ports = sorted(int(a.endpoint.rsplit(":", 1)[1]) for a in d.node_assignments)
            listening = sorted(
                c.laddr.port
                for pid in pids
                for c in psutil.Process(pid).net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN
            )
            assert listening == ports
            assert (await client.get(deployment_id)).status == deployment_pb2.DEPLOYMENT_STATUS_RUNNING
