#!/usr/bin/env python3
"""Start several controllers on one PostgreSQL store and one Redis, with agents, locally.

    .venv/bin/python scripts/scale_out.py [--controllers 2] [--agents 3] [--postgres-admin-url …] [--redis …]

Makes a fresh PostgreSQL database (dropped at the end), migrates it (``a67 migrate``),
starts ``--controllers`` ``a67 serve`` processes with ``A67_SCALE_OUT=1`` — each with its
own data directory and ports, all with the first one's keys (node CA, token signing key,
vault keys) — registers a user ``ops@example.com`` through the first (``a67 register``, then
``a67 login`` at the others; its CLI configuration in the topology's directory), and starts ``--agents``
``a67 agent`` processes enrolled through it (``a67 nodes enroll``). Prints every address
and how to run ``a67`` as that user, then waits for Ctrl-C (SIGINT or SIGTERM) and stops
everything.

What docs/operations.md describes, on one machine: kill a controller
(``kill -9 <pid>``) and watch its nodes reconnect to another (``a67 nodes list``, or the
store's ``nodes.stream_holder``). ``tests/bench/bench_failover.py`` and
``tests/integration/test_scale_out_processes.py`` use :class:`Topology`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg import sql

ROOT = Path(__file__).resolve().parents[1]
EMAIL = "ops@example.com"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env() -> dict[str, str]:
    """This process's environment without any A67_ setting."""
    return {k: v for k, v in os.environ.items() if not k.startswith("A67_")}


class ControllerProcess:
    """One ``a67 serve`` of the topology."""

    def __init__(self, name: str, root: Path, env: dict[str, str]) -> None:
        self.name = name
        self.data_dir = root / name
        self.port = free_port()
        self.node_port = free_port()
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.log = root / f"{name}.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def node_address(self) -> str:
        return f"127.0.0.1:{self.node_port}"

    @property
    def controller_id(self) -> str:
        return (self.data_dir / "controller-id").read_text().strip()

    def start(self) -> None:
        args = [sys.executable, "-m", "controller.cli", "serve", "--listen", self.address]
        args += ["--node-listen", self.node_address, "--xds-listen", "", "--data-dir", str(self.data_dir)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT
            )

    async def serving(self, within: float = 60.0) -> None:
        """Until its health check says SERVING (RuntimeError if it exits or takes too long)."""
        deadline = time.monotonic() + within
        while True:
            try:
                async with grpc.aio.insecure_channel(self.address) as channel:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.aio.AioRpcError:
                pass
            assert self.process is not None
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"controller {self.name} did not start: see {self.log}")
            await asyncio.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        """SIGTERM: drain and exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Topology:
    """Controllers and agents on a fresh database (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        *,
        controllers: int,
        postgres_admin_url: str,
        redis_url: str,
        heartbeat_interval_seconds: float = 1.0,
    ) -> None:
        self.root = root
        self.admin_url = postgres_admin_url
        self.database = f"a67_scale_out_{uuid.uuid4().hex[:8]}"
        admin = psycopg.conninfo.conninfo_to_dict(postgres_admin_url)
        where = f"{admin.get('user', 'postgres')}@{admin.get('host', '127.0.0.1')}:{admin.get('port', 5432)}"
        self.store_url = f"postgresql+psycopg://{where}/{self.database}"
        self.plain_url = f"postgresql://{where}/{self.database}"
        self.env = {
            **clean_env(),
            "A67_SCALE_OUT": "1",
            "A67_STORE_URL": self.store_url,
            "A67_CACHE_URL": redis_url,
            "A67_HEARTBEAT_INTERVAL_SECONDS": str(heartbeat_interval_seconds),
            "A67_DRAIN_GRACE_SECONDS": "1",
        }
        self.controllers = [ControllerProcess(chr(ord("a") + i), root, self.env) for i in range(controllers)]
        self.agents: list[subprocess.Popen[bytes]] = []
        self.config = root / "config"
        """The CLI's configuration directory of the topology's user (``A67_CONFIG_DIR``)."""

    async def start(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))
        migrate = [sys.executable, "-m", "controller.cli", "migrate"]
        subprocess.run(migrate, env=self.env, cwd=ROOT, check=True, capture_output=True)  # noqa: ASYNC221
        first, *others = self.controllers
        first.start()
        await first.serving()
        for controller in others:  # the same keys everywhere
            shutil.copytree(first.data_dir / "keys", controller.data_dir / "keys")
            controller.start()
        for controller in others:
            await controller.serving()
        password = secrets.token_urlsafe(18) + "\n"
        made = await asyncio.to_thread(
            self.cli, "register", "--email", EMAIL, "--password-stdin", stdin=password
        )
        if made.returncode != 0:
            raise RuntimeError(f"a67 register failed: {made.stderr}")
        for controller in others:  # the CLI keeps a session per controller address
            made = await asyncio.to_thread(
                self.cli, "login", "--email", EMAIL, "--password-stdin", stdin=password, controller=controller
            )
            if made.returncode != 0:
                raise RuntimeError(f"a67 login at {controller.name} failed: {made.stderr}")

    def cli(
        self, *args: str, stdin: str = "", controller: ControllerProcess | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``a67 …`` as the topology's user, against ``controller`` (default: the first)."""
        address = (controller or self.controllers[0]).address
        env = {**clean_env(), "A67_CONTROLLER": address, "A67_CONFIG_DIR": str(self.config)}
        return subprocess.run(
            [sys.executable, "-m", "controller.cli", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=120,
            check=False,
        )

    async def enrollment(self, uses: int) -> str:
        made = await asyncio.to_thread(self.cli, "nodes", "enroll", "--uses", str(uses), "--json")
        if made.returncode != 0:
            raise RuntimeError(f"a67 nodes enroll failed: {made.stderr}")
        return str(json.loads(made.stdout)["token"])

    def add_agent(
        self,
        token: str,
        *,
        controller: ControllerProcess | None = None,
        ports: tuple[int, int] | None = None,
    ) -> subprocess.Popen[bytes]:
        """An ``a67 agent`` enrolled with ``token``, dialling ``controller`` (default: the
        first), its replicas on ``ports`` (first, last; default: the agent's own range);
        its data directory and log ``agent-<i>`` in the topology's directory, region ``r<i>``."""
        i = len(self.agents)
        args = [sys.executable, "-m", "controller.cli", "agent", "--data-dir", str(self.root / f"agent-{i}")]
        args += ["--region", f"r{i}", "--controller", (controller or self.controllers[0]).address]
        args += ["--advertise-host", "127.0.0.1"]
        if ports is not None:
            args += ["--replica-port-range", f"{ports[0]}-{ports[1]}"]
        with (self.root / f"agent-{i}.log").open("ab") as log:
            agent = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**clean_env(), "A67_AGENT_TOKEN": token},
                cwd=ROOT,
            )
        self.agents.append(agent)
        return agent

    def stop_agents(self) -> None:
        """SIGTERM every agent (they stop their replicas), SIGKILL those still up after 15 s."""
        for agent in self.agents:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
        for agent in self.agents:
            try:
                agent.wait(15)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()

    def stop(self) -> None:
        self.stop_agents()
        for controller in self.controllers:
            controller.stop()
        with psycopg.connect(self.admin_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.database))
            )


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="a67-scale-out-"))
    topology = Topology(
        root,
        controllers=args.controllers,
        postgres_admin_url=args.postgres_admin_url,
        redis_url=args.redis,
        heartbeat_interval_seconds=args.interval,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await topology.start()
        token = await topology.enrollment(max(1, args.agents))
        for _ in range(args.agents):
            topology.add_agent(token)
        for c in topology.controllers:
            assert c.process is not None
            print(
                f"controller {c.name}: pid {c.process.pid}, API {c.address}, nodes {c.node_address}, log {c.log}"
            )
        print(f"store: {topology.store_url}; {args.agents} agents (logs in {root})")
        print(
            f"as user {EMAIL}: A67_CONFIG_DIR={topology.config} A67_CONTROLLER={topology.controllers[0].address} a67 nodes"
        )
        print("Ctrl-C stops everything", flush=True)
        await stop.wait()
    finally:
        topology.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--controllers", type=int, default=2)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--interval", type=float, default=1.0, help="heartbeat interval, s")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--postgres-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    asyncio.run(main(parser.parse_args()))
