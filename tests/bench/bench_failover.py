#!/usr/bin/env python3
"""Failover of node streams between controllers (scale-out): a controller killed with
SIGKILL, and how long until each of its nodes is connected to the other one.

    .venv/bin/python tests/bench/bench_failover.py [--runs 20] [--agents 5] [--interval 1]

Starts two ``a67 serve`` processes (``A67_SCALE_OUT=1``) on a fresh PostgreSQL database
(127.0.0.1:5432, ``--postgres-admin-url``) and the test Redis, with the same keys, and
``--agents`` real agent processes enrolled through the first. Each run kills (SIGKILL)
the controller holding the nodes' streams, and measures, per node, the time from the
kill until the node's stream is accepted by the survivor (the agent's log line, to the
millisecond; its first heartbeat follows at once); then starts the killed controller again (same data directory, so same id), waits until
it serves and ``--settle`` seconds more (the nodes' streams up long enough that their
reconnect backoff starts again from its base, as in a fleet that was stable). The next run kills the other one. Reports p50/p99 (or "max of N")
over every node of every run, and each run's slowest node. (Not the store: the survivor
adopts a killed controller's nodes as soon as it sees the process gone, before they
reconnect.)

What a node does meanwhile: its stream breaks; it dials its controller again after its
reconnect backoff (refused: the process is gone), then the next controller the hello's
answer listed, after another backoff; the survivor records the stream and the first
heartbeat makes the node ready.

Loopback only; not a test (pytest does not collect it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg import sql

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from controller.store.migrate import upgrade  # noqa: E402
from tests.bench.stats import describe, percentile  # noqa: E402
from tests.integration.test_deployments_real import Client, _user  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ControllerProcess:
    def __init__(self, name: str, root: Path, env: dict[str, str]) -> None:
        self.name = name
        self.data_dir = root / name
        self.port = _free_port()
        self.node_port = _free_port()
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.log = root / f"{name}.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [sys.executable, "-m", "controller.cli", "serve", "--listen", self.address]
        args += ["--node-listen", f"127.0.0.1:{self.node_port}", "--xds-listen", ""]
        args += ["--data-dir", str(self.data_dir)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT
            )

    async def serving(self, within: float = 60.0) -> None:
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
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _connected_after(log: Path, node_port: int, after: float) -> float | None:
    """When the agent's log says it connected to ``node_port`` after ``after`` (epoch s)."""
    marker = f"connected to 127.0.0.1:{node_port} as node"
    for line in log.read_text(errors="replace").splitlines():
        if marker in line:
            at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()  # the agent's local time
            if at > after:
                return at
    return None


def _agent(root: Path, i: int, controller: str, token: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "controller.cli", "agent", "--data-dir", str(root / f"agent-{i}")]
    args += ["--region", f"r{i}", "--controller", controller, "--advertise-host", "127.0.0.1"]
    with (root / f"agent-{i}.log").open("ab") as log:
        return subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env={**env, "A67_AGENT_TOKEN": token}, cwd=ROOT
        )


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="a67-bench-failover-"))
    database = f"a67_failover_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.postgres_admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    store_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"
    plain_url = f"postgresql://postgres@127.0.0.1:5432/{database}"
    upgrade(store_url)
    base = {k: v for k, v in os.environ.items() if not k.startswith("A67_")}
    env = {
        **base,
        "A67_SCALE_OUT": "1",
        "A67_STORE_URL": store_url,
        "A67_CACHE_URL": args.redis,
        "A67_HEARTBEAT_INTERVAL_SECONDS": str(args.interval),
        "A67_DRAIN_GRACE_SECONDS": "1",
    }
    controllers = [ControllerProcess("a", root, env), ControllerProcess("b", root, env)]
    agents: list[subprocess.Popen[bytes]] = []
    samples: list[float] = []
    slowest: list[float] = []
    finished = False
    try:
        controllers[0].start()
        await controllers[0].serving()
        shutil.copytree(controllers[0].data_dir / "keys", controllers[1].data_dir / "keys")
        controllers[1].start()
        await controllers[1].serving()
        async with grpc.aio.insecure_channel(controllers[0].address) as channel:
            client = Client(channel, await _user(channel))
            token = await client.enrollment(uses=args.agents)
            for i in range(args.agents):
                agents.append(_agent(root, i, controllers[0].address, token, base))
            await client.wait_ready(args.agents, within=120)
        await asyncio.sleep(args.settle)  # the controllers list each other (refreshed every 5 s)
        ids = {c.name: (c.data_dir / "controller-id").read_text().strip() for c in controllers}
        with psycopg.connect(plain_url, autocommit=True) as db:

            def held_by() -> dict[str, int]:
                rows = db.execute(
                    "SELECT stream_holder, count(*) FROM nodes GROUP BY stream_holder"
                ).fetchall()
                return {str(h): int(n) for h, n in rows}

            for run in range(args.runs):
                victim = max(controllers, key=lambda c: held_by().get(ids[c.name], 0))
                survivor = next(c for c in controllers if c is not victim)
                if held_by().get(ids[victim.name], 0) != args.agents:
                    raise RuntimeError(f"run {run}: the nodes are not all on one controller: {held_by()}")
                killed_at = time.time()
                victim.kill()
                connected_at: dict[int, float] = {}
                deadline = time.monotonic() + 120
                while len(connected_at) < args.agents:
                    for i in range(args.agents):
                        if i not in connected_at:
                            at = _connected_after(root / f"agent-{i}.log", survivor.node_port, killed_at)
                            if at is not None:
                                connected_at[i] = at
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"run {run}: only {len(connected_at)} nodes reached {survivor.name}"
                        )
                    await asyncio.sleep(0.05)
                times = [(t - killed_at) * 1000 for t in connected_at.values()]
                samples.extend(times)
                slowest.append(max(times))
                print(
                    f"run {run + 1:2d}: killed {victim.name}, {args.agents} nodes reconnected to {survivor.name}: {describe(times)}"
                )
                victim.start()
                await victim.serving()
                # settled: the restarted controller's row refreshed, the nodes' streams up long
                # enough for their reconnect backoff to start again from its base
                await asyncio.sleep(args.settle)
        print(f"\nevery node of every run: {describe(samples)}")
        print(
            f"slowest node per run:     p50 {percentile(slowest, 50):.0f} ms, max of {len(slowest)} {max(slowest):.0f} ms"
        )
        finished = True
    finally:
        for agent in agents:
            agent.send_signal(signal.SIGTERM)
        for agent in agents:
            try:
                agent.wait(15)
            except subprocess.TimeoutExpired:
                agent.kill()
        for controller in controllers:
            controller.stop()
        with psycopg.connect(args.postgres_admin_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
        if finished:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"logs kept in {root}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--agents", type=int, default=5)
    parser.add_argument("--interval", type=float, default=1.0, help="heartbeat interval, s")
    parser.add_argument("--settle", type=float, default=6.0, help="pause between runs, s")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--postgres-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    asyncio.run(main(parser.parse_args()))
