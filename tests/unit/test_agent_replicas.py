"""The agent's replica supervisor, with real processes: a tiny http.server app.

The app's behaviour is chosen by the env map of the deploy command (``MODE``), so one
package serves every test: ``ok`` (serves /health 200 and / with its env), ``crash``
(exits at once with code 3), ``sick`` (/health answers 500), ``stubborn`` (ignores
SIGTERM). A file ``sick`` in its directory makes /health answer 500 later.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from automator67.v1 import deployment_pb2 as pb
from automator67.v1 import node_pb2, node_pb2_grpc

from controller.agent import replicas as replicas_module
from controller.agent.cli import add_agent_parser
from controller.agent.client import server_keepalive_options
from controller.agent.handlers import CommandHandlers
from controller.agent.replica_process import _ReplicaLog
from controller.agent.replicas import (
    FAILED,
    RUNNING,
    STOPPED,
    UNHEALTHY,
    ReplicaSupervisor,
    http_health_check,
    launcher_prefix,
    port_is_free,
    register_replica_handlers,
    replica_env,
    startup_deadline_seconds,
)
from controller.deployments import Package, build_package, validate_manifest
from controller.deployments.manifest_health import HealthCheckSpec
from tests.unit.test_agent_client import INTERVAL_MS, OAUTH, TOKEN, FakeNodeService, Pki

REPO_ROOT = Path(__file__).resolve().parents[2]

APP = textwrap.dedent(
    """
    import http.server, json, os, signal, sys

    PORT = int(os.environ["PORT"])
    MODE = os.environ.get("MODE", "ok")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/health":
                sick = MODE == "sick" or os.path.exists("sick")
                code, body = (500, b"sick") if sick else (200, b"ok")
            else:
                code = 200
                body = json.dumps({
                    "port": PORT,
                    "greeting": os.environ.get("GREETING", ""),
                    "deployment": os.environ["A67_DEPLOYMENT_ID"],
                    "index": os.environ["A67_REPLICA_INDEX"],
                    "home": os.environ["HOME"],
                    "agent_secret": os.environ.get("AGENT_ONLY_SECRET", ""),
                }).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    if MODE == "crash":
        print("boom: DATABASE_URL is not set", file=sys.stderr)
        sys.exit(3)
    if MODE == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("listening on", PORT, flush=True)
    http.server.HTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
    """
)


def _source(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _package(files: dict[str, str], **manifest: Any) -> Package:
    fields: dict[str, Any] = {
        "name": "hello",
        "app_type": pb.APP_TYPE_BACKEND,
        "runtime": "python",
        "entrypoint": "app.py",
        "replicas": 1,
        "resources": pb.Resources(memory="64MB", cpu="0.1"),
        # startup deadline 2 * 3 + 1 = 7 s: room for a slow start on a busy machine
        "health_check": pb.HealthCheck(path="/health", interval_seconds=2, timeout_seconds=1, retries=3),
    }
    fields.update(manifest)
    source = _source(files)
    valid = validate_manifest(pb.DeploymentManifest(**fields), source_size=len(source))
    return build_package(valid, source)


@pytest.fixture(scope="module")
def web_package() -> Package:
    return _package({"app.py": APP})


@pytest.fixture(scope="module")
def strict_package() -> Package:
    """The validator's minimum health check: startup deadline 2 * 1 + 1 = 3 s, and one
    failed check (every 2 s) makes a running replica unhealthy."""
    return _package(
        {"app.py": APP},
        health_check=pb.HealthCheck(path="/health", interval_seconds=2, timeout_seconds=1, retries=1),
    )


SERVED: dict[str, bytes] = {}
"""Packages a test deploys, served to every supervisor's cache as the controller would."""


async def _serve(sha256: str, offset: int) -> AsyncIterator[node_pb2.FetchPackageResponse]:
    data = SERVED[sha256]
    for start in range(offset, len(data), 65536):
        yield node_pb2.FetchPackageResponse(
            offset=start, data=data[start : start + 65536], total_size=len(data)
        )


class _ServedCache(replicas_module.PackageCache):
    def __init__(self, directory: Path, fetch: Any = None, **kwargs: Any) -> None:
        super().__init__(directory, fetch or _serve, **kwargs)


@pytest.fixture(autouse=True)
def _packages_served(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replicas_module, "PackageCache", _ServedCache)


@pytest.fixture
async def supervisor(tmp_path: Path) -> AsyncIterator[ReplicaSupervisor]:
    sup = ReplicaSupervisor(tmp_path / "agent", stop_grace_seconds=2.0)
    try:
        yield sup
    finally:
        await sup.close()


def deploy(
    package: Package,
    *,
    deployment_id: str = "dep-1",
    index: int = 0,
    generation: int = 1,
    env: dict[str, str] | None = None,
    port: int = 0,
    sha256: str | None = None,
) -> node_pb2.NodeCommand:
    return node_pb2.NodeCommand(
        command_id=f"deploy-{deployment_id}-{index}-{generation}",
        deploy_replica=node_pb2.DeployReplica(
            deployment_id=deployment_id,
            replica_index=index,
            generation=generation,
            package_sha256=_served(package, sha256),
            package_size=package.size,
            env=env or {},
            port=port,
        ),
    )


def _served(package: Package, sha256: str | None = None) -> str:
    """Serve ``package`` under its digest, or under a wrong one (bytes that do not match it)."""
    digest = package.sha256 if sha256 is None else sha256
    SERVED[digest] = package.data
    return digest


def stop(*, deployment_id: str = "dep-1", index: int = 0, generation: int = 1) -> node_pb2.NodeCommand:
    return node_pb2.NodeCommand(
        command_id=f"stop-{deployment_id}-{index}-{generation}",
        stop_replica=node_pb2.StopReplica(
            deployment_id=deployment_id, replica_index=index, generation=generation
        ),
    )


def payload(result: node_pb2.CommandResult) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(result.payload)
    return data


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - a local test URL
        return int(response.status), bytes(response.read())


async def get_json(url: str) -> dict[str, Any]:
    status, body = await asyncio.to_thread(_get, url)
    assert status == 200
    data: dict[str, Any] = json.loads(body)
    return data


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def bindable(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def wait_until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def state_of(sup: ReplicaSupervisor, deployment_id: str = "dep-1", index: int = 0) -> node_pb2.ReplicaState:
    found = [s for s in sup.states() if (s.deployment_id, s.replica_index) == (deployment_id, index)]
    assert len(found) == 1, sup.states()
    return found[0]


# --------------------------------------------------------------------------- pure parts


def test_startup_deadline_is_interval_times_retries_plus_timeout() -> None:
    check = HealthCheckSpec(path="/health", interval_seconds=10, timeout_seconds=2, retries=3)
    assert startup_deadline_seconds(check) == 32.0


def test_replica_env_is_minimal_and_platform_values_win(tmp_path: Path) -> None:
    env = replica_env(
        {"GREETING": "hi", "PORT": "1"},
        deployment_id="d",
        replica_index=2,
        generation=7,
        port=20001,
        replica_dir=tmp_path,
        runtime="python",
        base={"PATH": "/bin", "SECRET": "agent's", "LANG": "en_US.UTF-8"},
    )
    assert env == {
        "PATH": "/bin",
        "HOME": str(tmp_path),
        "LANG": "en_US.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "GREETING": "hi",
        "PORT": "20001",
        "A67_PORT": "20001",
        "A67_DEPLOYMENT_ID": "d",
        "A67_REPLICA_INDEX": "2",
        "A67_GENERATION": "7",
        "A67_REPLICA_DIR": str(tmp_path),
    }


def test_register_replica_handlers(tmp_path: Path) -> None:
    handlers = CommandHandlers()
    register_replica_handlers(handlers, ReplicaSupervisor(tmp_path))
    assert handlers.kinds() == {"deploy_replica", "stop_replica", "remove_deployment"}


# --------------------------------------------------------------------------- deploy and stop


async def test_deploy_serves_env_then_stop_frees_everything(
    supervisor: ReplicaSupervisor, web_package: Package, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_ONLY_SECRET", "do-not-leak")
    result = await supervisor.deploy_replica(deploy(web_package, env={"GREETING": "hello from env"}))
    assert result.ok, result.error_message
    assert result.command_id == "deploy-dep-1-0-1"
    info = payload(result)
    port = info["port"]
    assert info["endpoint"] == f"http://127.0.0.1:{port}"
    assert 20000 <= port <= 29999
    assert info["status"] == RUNNING
    pid = info["pid"]
    assert alive(pid)

    body = await get_json(info["endpoint"] + "/")
    replica_dir = supervisor.root / "dep-1" / "0-g1"
    assert body == {
        "port": port,
        "greeting": "hello from env",
        "deployment": "dep-1",
        "index": "0",
        "home": str(replica_dir),
        "agent_secret": "",  # the agent's own environment does not leak into replicas
    }
    assert os.getpgid(pid) == pid  # its own process group
    state = state_of(supervisor)
    assert (state.status, state.generation, state.endpoint, state.error_message) == (
        RUNNING,
        1,
        info["endpoint"],
        "",
    )
    replica = supervisor.get("dep-1", 0)
    assert replica is not None
    assert replica.directory == replica_dir
    assert (replica_dir / "app" / "app.py").is_file()
    assert (replica_dir / "manifest.json").is_file()
    assert "listening on" in replica.log_path.read_text()

    stopped = await supervisor.stop_replica(stop())
    assert stopped.ok
    assert payload(stopped) == {"stopped": True, "generation": 1}
    assert not alive(pid)
    assert bindable(port)
    assert port_is_free(port)
    assert state_of(supervisor).status == STOPPED
    assert replica.log_path.exists()  # kept for post-mortems

    again = await supervisor.stop_replica(stop())
    assert again.ok
    assert payload(again) == {"stopped": False, "generation": 1}


async def test_stop_of_unknown_replica_is_ok(supervisor: ReplicaSupervisor) -> None:
    result = await supervisor.stop_replica(stop(deployment_id="never-deployed"))
    assert result.ok
    assert supervisor.states() == []


async def test_app_that_exits_at_once_fails_with_code_and_log_tail(
    supervisor: ReplicaSupervisor, web_package: Package
) -> None:
    result = await supervisor.deploy_replica(deploy(web_package, env={"MODE": "crash"}))
    assert not result.ok
    assert "exited with code 3" in result.error_message
    assert "boom: DATABASE_URL is not set" in result.error_message
    assert payload(result) == {"error_kind": "exited"}
    state = state_of(supervisor)
    assert state.status == FAILED
    assert "exited with code 3" in state.error_message


async def test_health_check_failing_fails_after_startup_deadline_and_stops_the_process(
    supervisor: ReplicaSupervisor, strict_package: Package
) -> None:
    started = time.monotonic()
    result = await supervisor.deploy_replica(deploy(strict_package, env={"MODE": "sick"}))
    elapsed = time.monotonic() - started
    assert not result.ok
    assert "health check failed" in result.error_message
    assert "within 3 s" in result.error_message
    assert "HTTP 500" in result.error_message
    assert payload(result) == {"error_kind": "unhealthy"}
    assert 2.5 <= elapsed < 8
    replica = supervisor.get("dep-1", 0)
    assert replica is not None
    assert replica.status == FAILED
    assert not alive(replica.pid)
    assert bindable(replica.port)


async def test_replica_that_turns_sick_becomes_unhealthy_then_recovers(
    supervisor: ReplicaSupervisor, strict_package: Package
) -> None:
    result = await supervisor.deploy_replica(deploy(strict_package))
    assert result.ok, result.error_message
    replica = supervisor.get("dep-1", 0)
    assert replica is not None
    sick = replica.directory / "app" / "sick"
    sick.touch()
    await wait_until(lambda: state_of(supervisor).status == UNHEALTHY, within=5)
    assert "HTTP 500" in state_of(supervisor).error_message
    assert alive(replica.pid)  # no restart by the agent: the controller decides
    sick.unlink()
    await wait_until(lambda: state_of(supervisor).status == RUNNING, within=4)
    assert state_of(supervisor).error_message == ""


async def test_replica_that_dies_later_is_reported_failed(
    supervisor: ReplicaSupervisor, web_package: Package
) -> None:
    result = await supervisor.deploy_replica(deploy(web_package))
    assert result.ok, result.error_message
    os.kill(payload(result)["pid"], signal.SIGKILL)
    await wait_until(lambda: state_of(supervisor).status == FAILED)
    assert "killed by signal SIGKILL" in state_of(supervisor).error_message
    assert "listening on" in state_of(supervisor).error_message


async def test_same_generation_twice_is_one_replica(
    supervisor: ReplicaSupervisor, web_package: Package
) -> None:
    first, second = await asyncio.gather(
        supervisor.deploy_replica(deploy(web_package)), supervisor.deploy_replica(deploy(web_package))
    )
    assert first.ok
    assert second.ok
    assert payload(first)["pid"] == payload(second)["pid"]
    assert len(supervisor.states()) == 1


async def test_requested_port_is_used_and_a_busy_one_refused(
    supervisor: ReplicaSupervisor, web_package: Package
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        refused = await supervisor.deploy_replica(deploy(web_package, port=busy))
    assert not refused.ok
    assert f"port {busy} is in use" in refused.error_message
    assert payload(refused) == {"error_kind": "no_port"}

    with socket.socket() as finder:
        finder.bind(("127.0.0.1", 0))
        free = finder.getsockname()[1]
    result = await supervisor.deploy_replica(deploy(web_package, index=1, port=free))
    assert result.ok, result.error_message
    assert payload(result)["endpoint"] == f"http://127.0.0.1:{free}"


async def test_stubborn_app_is_killed_after_the_grace(tmp_path: Path, web_package: Package) -> None:
    sup = ReplicaSupervisor(tmp_path, stop_grace_seconds=0.3)
    try:
        result = await sup.deploy_replica(deploy(web_package, env={"MODE": "stubborn"}))
        assert result.ok, result.error_message
        pid = payload(result)["pid"]
        assert (await sup.stop_replica(stop())).ok
        assert not alive(pid)
    finally:
        await sup.close()


# --------------------------------------------------------------------------- fencing


async def test_higher_generation_replaces_lower(supervisor: ReplicaSupervisor, web_package: Package) -> None:
    first = await supervisor.deploy_replica(deploy(web_package, generation=1))
    assert first.ok, first.error_message
    second = await supervisor.deploy_replica(deploy(web_package, generation=2, env={"GREETING": "v2"}))
    assert second.ok, second.error_message
    assert not alive(payload(first)["pid"])
    assert alive(payload(second)["pid"])
    assert [(s.generation, s.status) for s in supervisor.states()] == [(2, RUNNING)]
    assert (await get_json(payload(second)["endpoint"]))["greeting"] == "v2"
    # the previous generation's directory stays (for its log), older ones go
    third = await supervisor.deploy_replica(deploy(web_package, generation=3))
    assert third.ok, third.error_message
    assert sorted(p.name for p in (supervisor.root / "dep-1").iterdir()) == ["0-g2", "0-g3"]


async def test_lower_generation_is_refused_and_a_stop_fences(
    supervisor: ReplicaSupervisor, web_package: Package
) -> None:
    current = await supervisor.deploy_replica(deploy(web_package, generation=5))
    assert current.ok, current.error_message
    pid = payload(current)["pid"]

    stale_deploy = await supervisor.deploy_replica(deploy(web_package, generation=4))
    assert not stale_deploy.ok
    assert "stale generation" in stale_deploy.error_message
    assert payload(stale_deploy) == {"error_kind": "stale_generation"}
    stale_stop = await supervisor.stop_replica(stop(generation=4))
    assert not stale_stop.ok
    assert "stale generation" in stale_stop.error_message
    assert alive(pid)

    # a node coming back is told to stop with the newer generation: nothing runs twice
    assert (await supervisor.stop_replica(stop(generation=6))).ok
    assert not alive(pid)
    late = await supervisor.deploy_replica(deploy(web_package, generation=6))
    assert not late.ok
    assert "stale generation" in late.error_message
    newer = await supervisor.deploy_replica(deploy(web_package, generation=7))
    assert newer.ok, newer.error_message


async def test_checksum_mismatch_is_refused_and_leaves_the_running_replica(
    supervisor: ReplicaSupervisor, web_package: Package
) -> None:
    running = await supervisor.deploy_replica(deploy(web_package, generation=1))
    assert running.ok, running.error_message
    bad = await supervisor.deploy_replica(deploy(web_package, generation=2, sha256="0" * 64))
    assert not bad.ok
    assert "checksum mismatch" in bad.error_message.lower()
    assert payload(bad) == {"error_kind": "checksum_mismatch"}
    assert alive(payload(running)["pid"])
    assert [(s.generation, s.status) for s in supervisor.states()] == [(1, RUNNING)]
    assert not (supervisor.root / "dep-1" / "0-g2").exists()


async def test_invalid_ids_are_refused(supervisor: ReplicaSupervisor, web_package: Package) -> None:
    result = await supervisor.deploy_replica(deploy(web_package, deployment_id="../escape"))
    assert not result.ok
    assert payload(result) == {"error_kind": "invalid"}


# --------------------------------------------------------------------------- workers and commands


async def test_command_worker_runs_without_port_and_a_crashing_one_fails(
    supervisor: ReplicaSupervisor,
) -> None:
    sleeper = _package(
        {"README": "a worker"},
        app_type=pb.APP_TYPE_WORKER,
        runtime="command",
        entrypoint="sleep 30",
        health_check=pb.HealthCheck(),
    )
    result = await supervisor.deploy_replica(deploy(sleeper, deployment_id="worker"))
    assert result.ok, result.error_message
    assert payload(result)["endpoint"] == ""
    assert payload(result)["port"] == 0
    assert state_of(supervisor, "worker").status == RUNNING

    crasher = _package(
        {"README": "a worker"},
        app_type=pb.APP_TYPE_WORKER,
        runtime="command",
        entrypoint="sh -c 'echo no queue configured >&2; exit 4'",
        health_check=pb.HealthCheck(),
    )
    failed = await supervisor.deploy_replica(deploy(crasher, deployment_id="crasher"))
    assert not failed.ok
    assert "exited with code 4" in failed.error_message
    assert "no queue configured" in failed.error_message


async def test_missing_program_is_refused_before_starting(supervisor: ReplicaSupervisor) -> None:
    package = _package(
        {"README": "x"},
        app_type=pb.APP_TYPE_WORKER,
        runtime="command",
        entrypoint="no-such-program-a67 --serve",
        health_check=pb.HealthCheck(),
    )
    result = await supervisor.deploy_replica(deploy(package))
    assert not result.ok
    assert "'no-such-program-a67' is not on the node's PATH" in result.error_message
    assert payload(result) == {"error_kind": "spawn_failed"}


# --------------------------------------------------------------------------- shutdown and death


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the launcher is Linux only")
def test_launcher_refuses_to_start_when_its_parent_is_not_the_agent() -> None:
    orphaned = subprocess.run([*launcher_prefix(sys.executable, parent_pid=1), "true"], check=False)
    assert orphaned.returncode == 70
    started = subprocess.run([*launcher_prefix(sys.executable), "sh", "-c", "exit 5"], check=False)
    assert started.returncode == 5


async def test_close_stops_every_replica_and_refuses_new_ones(tmp_path: Path, web_package: Package) -> None:
    sup = ReplicaSupervisor(tmp_path)
    results = await asyncio.gather(
        sup.deploy_replica(deploy(web_package, index=0)), sup.deploy_replica(deploy(web_package, index=1))
    )
    pids = [payload(r)["pid"] for r in results]
    assert all(r.ok for r in results)
    await sup.close()
    assert not any(alive(pid) for pid in pids)
    assert {s.status for s in sup.states()} == {STOPPED}
    refused = await sup.deploy_replica(deploy(web_package, index=2))
    assert not refused.ok
    assert payload(refused) == {"error_kind": "shutting_down"}


DEATH_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from automator67.v1 import node_pb2
    from controller.agent.replicas import ReplicaSupervisor

    async def main():
        sup = ReplicaSupervisor(Path(sys.argv[1]))
        (Path(sys.argv[1]) / "packages" / sys.argv[3]).write_bytes(Path(sys.argv[2]).read_bytes())
        command = node_pb2.NodeCommand(command_id="c", deploy_replica=node_pb2.DeployReplica(
            deployment_id="dz", replica_index=0, generation=1, package_sha256=sys.argv[3]))
        result = await sup.deploy_replica(command)
        print(result.payload.decode() if result.ok else "ERROR " + result.error_message, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
async def test_replicas_die_with_a_killed_agent(tmp_path: Path, web_package: Package) -> None:
    package_file = tmp_path / "package.tar.gz"
    package_file.write_bytes(web_package.data)
    agent = subprocess.Popen(  # noqa: ASYNC220 - read in a thread below
        [sys.executable, "-c", DEATH_SCRIPT, str(tmp_path / "agent"), str(package_file), web_package.sha256],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert agent.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(agent.stdout.readline), 20)
        info = json.loads(line)
        pid, port = info["pid"], info["port"]
        assert alive(pid)
        agent.kill()  # kill -9: no chance to clean up
        await asyncio.to_thread(agent.wait, 5)
        await wait_until(lambda: not alive(pid), within=3)
        await wait_until(lambda: bindable(port), within=3)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        if agent.stdout is not None:
            agent.stdout.close()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
def test_reap_orphans_kills_leftovers_of_this_agent_only(tmp_path: Path) -> None:
    sup = ReplicaSupervisor(tmp_path / "agent")
    mine = subprocess.Popen(
        ["sleep", "30"],
        env={"PATH": os.defpath, "A67_REPLICA_DIR": str(sup.root / "dep" / "0-g1")},
        start_new_session=True,
    )
    other = subprocess.Popen(
        ["sleep", "30"],
        env={
            "PATH": os.defpath,
            "A67_REPLICA_DIR": str(tmp_path / "other-agent" / "replicas" / "d" / "0-g1"),
        },
        start_new_session=True,
    )
    try:
        assert sup.reap_orphans() == 1
        assert mine.wait(5) == -signal.SIGKILL
        assert other.poll() is None
    finally:
        for process in (mine, other):
            if process.poll() is None:
                process.kill()
            process.wait()


async def test_http_health_check_reasons() -> None:
    with socket.socket() as finder:
        finder.bind(("127.0.0.1", 0))
        closed_port = finder.getsockname()[1]
    assert await http_health_check(closed_port, "/health", 1) == "connection refused"


def test_log_is_rotated_and_keeps_its_tail(tmp_path: Path) -> None:
    replica_log = _ReplicaLog(tmp_path / "replica.log", max_bytes=100, tail_lines=3)
    for i in range(30):
        replica_log.write(f"line {i}\n".encode())
    replica_log.write(b"partial")
    replica_log.close()
    assert (tmp_path / "replica.log.1").stat().st_size >= 100
    assert (tmp_path / "replica.log").stat().st_size < 100
    assert replica_log.tail() == "line 28\nline 29\npartial"


async def test_stopped_replicas_expire_with_their_directory(tmp_path: Path, web_package: Package) -> None:
    now = [1000.0]
    sup = ReplicaSupervisor(tmp_path, clock=lambda: now[0], stopped_retention_seconds=60)
    try:
        assert (await sup.deploy_replica(deploy(web_package))).ok
        assert (await sup.stop_replica(stop())).ok
        now[0] += 59
        assert [s.status for s in sup.states()] == [STOPPED]
        now[0] += 1
        assert sup.states() == []
        assert (sup.root / "dep-1" / "0-g1").is_dir()
        assert (await sup.stop_replica(stop(deployment_id="other"))).ok  # any command tidies up
        assert not (sup.root / "dep-1").exists()
        # the fence outlives the record: the stopped generation cannot come back
        assert not (await sup.deploy_replica(deploy(web_package))).ok
    finally:
        await sup.close()


def test_cli_replica_flags() -> None:
    parser = argparse.ArgumentParser(prog="a67")
    add_agent_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["agent"])
    assert (args.advertise_host, args.replica_port_range) == ("127.0.0.1", (20000, 29999))
    args = parser.parse_args(["agent", "--advertise-host", "10.0.0.5", "--replica-port-range", "31000-31010"])
    assert (args.advertise_host, args.replica_port_range) == ("10.0.0.5", (31000, 31010))
    with pytest.raises(SystemExit):
        parser.parse_args(["agent", "--replica-port-range", "9-1"])


AGENT_SCRIPT = (
    "import argparse, sys\n"
    "from controller.agent.cli import add_agent_parser\n"
    "parser = argparse.ArgumentParser(prog='a67')\n"
    "add_agent_parser(parser.add_subparsers(dest='command', required=True))\n"
    "args = parser.parse_args(sys.argv[1:])\n"
    "sys.exit(args.func(args))\n"
)


class _ServingNodeService(FakeNodeService):
    """The fake controller, serving the packages a test deploys (mutual TLS, node port)."""

    async def FetchPackage(
        self, request: node_pb2.FetchPackageRequest, context: Any
    ) -> AsyncIterator[node_pb2.FetchPackageResponse]:
        async for chunk in _serve(request.sha256, request.offset):
            yield chunk


async def test_agent_process_runs_replicas_reports_them_and_stops_them_on_sigterm(
    tmp_path: Path, web_package: Package
) -> None:
    """The real ``a67 agent`` against a fake controller: deploy over the stream, the
    replica's state in heartbeats, and SIGTERM stops the replica before the agent exits."""
    service = _ServingNodeService(Pki.create())
    service.commands = [deploy(web_package, env={"GREETING": "via the stream"})]
    server = grpc.aio.server(options=server_keepalive_options(INTERVAL_MS))
    node_pb2_grpc.add_NodeServiceServicer_to_server(service, server)
    plain_port = server.add_insecure_port("127.0.0.1:0")
    credentials = grpc.ssl_server_credentials(
        [(service.pki.server_key_pem, service.pki.server_cert_pem)],
        root_certificates=service.pki.ca_pem,
        require_client_auth=True,
    )
    service.stream_endpoint = f"127.0.0.1:{server.add_secure_port('127.0.0.1:0', credentials)}"
    await server.start()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        AGENT_SCRIPT,
        "agent",
        "--controller",
        f"127.0.0.1:{plain_port}",
        "--data-dir",
        str(tmp_path / "agent"),
        "--advertise-host",
        "localhost",
        "--replica-port-range",
        "21000-21999",
        cwd=REPO_ROOT,
        env={**os.environ, "A67_AGENT_TOKEN": TOKEN, "A67_AGENT_OAUTH_TOKEN": OAUTH},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:

        def results() -> list[node_pb2.CommandResult]:
            return [r for c in service.connections for r in c.results]

        def reported() -> list[node_pb2.ReplicaState]:
            """The replicas in the latest heartbeat."""
            beats = [hb for c in service.connections for _, hb in c.heartbeats]
            return list(beats[-1].replicas) if beats else []

        await wait_until(lambda: bool(results()), within=20)
        result = results()[0]
        assert result.ok, result.error_message
        info = payload(result)
        assert info["endpoint"] == f"http://localhost:{info['port']}"
        assert 21000 <= info["port"] <= 21999
        assert (await get_json(f"http://127.0.0.1:{info['port']}/"))["greeting"] == "via the stream"
        await wait_until(lambda: any(s.status == RUNNING for s in reported()), within=5)
        assert [(s.deployment_id, s.generation, s.endpoint) for s in reported()] == [
            ("dep-1", 1, info["endpoint"])
        ]

        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 10)
        assert process.returncode == 0, stderr.decode()
        assert not alive(info["pid"])
        assert "via the stream" not in stderr.decode()  # env values are never logged
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await server.stop(None)


# --------------------------------------------------------------------------- isolation


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="replica users need root")
async def test_replicas_run_as_their_own_users_and_cannot_read_the_agent_or_each_other(
    tmp_path: Path,
) -> None:
    """As root, with the agent's layout: one replica keeps a secret in its own directory,
    another tries to read it, the agent's key and its directory; all it gets is EACCES."""
    import tempfile

    from controller.agent.hardening import ensure_traversable
    from controller.agent.identity import Identity

    data_dir = tmp_path / "agent"
    identity = Identity(data_dir)
    identity.key()  # node.key, 0600, in a 0700 directory
    key_lines = identity.key_path.read_text().splitlines()[1:-1]
    base = Path(tempfile.mkdtemp(prefix="a67-replicas-", dir="/tmp"))
    ensure_traversable(base)
    sup = ReplicaSupervisor(data_dir, root=base / "r", uid_range=(200100, 200199), stop_grace_seconds=1.0)
    try:
        keeper = _package(
            {"keep.sh": "echo TOP-SECRET-4711 > secret.txt\nexec sleep 30\n"},
            app_type=pb.APP_TYPE_WORKER,
            runtime="command",
            entrypoint="sh keep.sh",
            health_check=pb.HealthCheck(),
        )
        kept = await sup.deploy_replica(deploy(keeper, deployment_id="keeper"))
        assert kept.ok, kept.error_message
        secret_file = base / "r" / "keeper" / "0-g1" / "app" / "secret.txt"
        await wait_until(secret_file.exists)
        thief = _package(
            {
                "steal.sh": (
                    'echo "uid=$(id -u) gid=$(id -g) groups=$(id -G)"\n'
                    f"cat {secret_file} 2>&1\n"
                    f"cat {identity.key_path} 2>&1\n"
                    f"ls {data_dir} 2>&1\n"
                    f"ls {base / 'r'} 2>&1\n"
                    "echo STOLEN-DONE\nexit 3\n"
                )
            },
            app_type=pb.APP_TYPE_WORKER,
            runtime="command",
            entrypoint="sh steal.sh",
            health_check=pb.HealthCheck(),
        )
        stolen = await sup.deploy_replica(deploy(thief, deployment_id="thief"))
        assert not stolen.ok
        message = stolen.error_message
        assert "STOLEN-DONE" in message
        assert "uid=200101 gid=200101 groups=200101" in message  # its own user, no groups
        assert "TOP-SECRET-4711" not in message
        assert not any(line in message for line in key_lines)
        assert message.count("Permission denied") >= 3
        assert f"cannot open directory '{base / 'r'}': Permission denied" in message  # not listable
        app_dir = secret_file.parent
        assert (app_dir.stat().st_uid, app_dir.stat().st_mode & 0o777) == (200100, 0o700)
        log_file = app_dir.parent / "replica.log"
        assert (log_file.stat().st_uid, log_file.stat().st_mode & 0o777) == (0, 0o600)
    finally:
        await sup.close()
        shutil.rmtree(base, ignore_errors=True)
