"""Real agent processes against a real controller: enroll, ready, kill -9, suspect, failed, back to ready."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from automator67.v1 import auth_pb2_grpc, common_pb2, node_pb2, node_pb2_grpc

from controller.server import Controller
from tests.support import bearer, controller_settings, register, running_controller

INTERVAL = 0.3


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    settings = controller_settings(tmp_path / "controller", heartbeat_interval_seconds=INTERVAL)
    async with running_controller(settings) as running:
        yield running


def _start_agent(controller: Controller, data_dir: Path, token: str | None) -> subprocess.Popen[bytes]:
    args = [
        sys.executable,
        "-m",
        "controller.cli",
        "agent",
        "--data-dir",
        str(data_dir),
        "--region",
        "eu-west",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("A67_")}
    if token is not None:
        args += ["--controller", controller.address]
        env["A67_AGENT_TOKEN"] = token
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


async def _wait_for(
    stub: node_pb2_grpc.NodeServiceStub, token: str, predicate: object, within: float
) -> list:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        nodes = list((await stub.ListNodes(node_pb2.ListNodesRequest(), metadata=bearer(token))).nodes)
        if predicate(nodes):  # type: ignore[operator]
            return nodes
        if asyncio.get_running_loop().time() > deadline:
            states = [common_pb2.NodeStatus.Name(n.status) for n in nodes]
            raise AssertionError(f"condition not reached within {within} s; nodes: {states}")
        await asyncio.sleep(0.05)


def _status(nodes: list, status: int) -> bool:
    return len(nodes) == 1 and nodes[0].status == status


async def test_kill_9_then_suspect_failed_then_restart_is_ready(
    controller: Controller, channel: grpc.aio.Channel, tmp_path: Path
) -> None:
    token = (await register(auth_pb2_grpc.AuthServiceStub(channel))).access_token
    stub = node_pb2_grpc.NodeServiceStub(channel)
    enrollment = await stub.CreateEnrollmentToken(
        node_pb2.CreateEnrollmentTokenRequest(), metadata=bearer(token)
    )
    agent_dir = tmp_path / "agent"
    agent = _start_agent(controller, agent_dir, enrollment.token)
    try:
        nodes = await _wait_for(
            stub,
            token,
            lambda n: _status(n, common_pb2.NODE_STATUS_READY) or _status(n, common_pb2.NODE_STATUS_BUSY),
            within=30,
        )
        node_id = nodes[0].id
        assert nodes[0].region == "eu-west"
        assert nodes[0].capabilities.cpu_cores >= 1
        assert 0 < nodes[0].metrics.memory_percent <= 100

        agent.send_signal(signal.SIGKILL)
        agent.wait()
        await _wait_for(stub, token, lambda n: _status(n, common_pb2.NODE_STATUS_SUSPECT), within=5)
        await _wait_for(stub, token, lambda n: _status(n, common_pb2.NODE_STATUS_FAILED), within=10)

        # Restarted without a token: it resumes as the same node.
        agent = _start_agent(controller, agent_dir, None)
        nodes = await _wait_for(
            stub,
            token,
            lambda n: _status(n, common_pb2.NODE_STATUS_READY) or _status(n, common_pb2.NODE_STATUS_BUSY),
            within=30,
        )
        assert nodes[0].id == node_id
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(timeout=10)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
