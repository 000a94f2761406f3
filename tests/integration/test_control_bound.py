"""The node stream stays small: each end refuses to send a message over 256 KiB, with a clear
error, and the stream survives (a real controller and an in-process agent over mutual TLS)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import grpc
import pytest
from automator67.v1 import node_pb2, node_pb2_grpc

from controller.agent.client import Agent, AgentConfig
from controller.agent.handlers import CommandHandlers, ok_result
from controller.errors import FailedPrecondition
from controller.limits import CONTROL_MESSAGE_MAX_BYTES
from tests.integration.test_node_api import _user
from tests.support import bearer, controller_settings, running_controller


async def _until(check: object, what: str, within: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_oversized_control_messages_are_refused_by_their_sender_and_the_stream_survives(
    tmp_path: Path,
) -> None:
    settings = controller_settings(tmp_path / "controller", heartbeat_interval_seconds=0.3)
    async with (
        running_controller(settings) as controller,
        grpc.aio.insecure_channel(controller.address) as channel,
    ):
        token = await _user(channel)
        enrollment = await node_pb2_grpc.NodeServiceStub(channel).CreateEnrollmentToken(
            node_pb2.CreateEnrollmentTokenRequest(max_uses=1), metadata=bearer(token)
        )
        handlers = CommandHandlers()

        async def huge_result(command: node_pb2.NodeCommand) -> node_pb2.CommandResult:
            if command.stop_replica.deployment_id == "big":
                return ok_result(command, {"rows": "x" * (CONTROL_MESSAGE_MAX_BYTES + 1)})
            return ok_result(command, {"small": True})

        handlers.register("stop_replica", huge_result)
        agent = Agent(
            AgentConfig(controller=controller.address, token=enrollment.token, data_dir=tmp_path / "agent"),
            handlers=handlers,
        )
        stop = asyncio.Event()
        running = asyncio.create_task(agent.run(stop))
        try:
            await _until(lambda: agent.connected and agent.node_id is not None, "the agent's stream")
            node_id = str(agent.node_id)
            streams = controller.fleet.streams
            session = streams.get(node_id)
            assert session is not None

            # Controller → node: a command over the bound is refused before it is sent.
            big = node_pb2.NodeCommand(
                stop_replica=node_pb2.StopReplica(deployment_id="d" * (CONTROL_MESSAGE_MAX_BYTES + 1))
            )
            with pytest.raises(FailedPrecondition) as refused:
                await streams.send_command(node_id, big, 5.0)
            assert refused.value.reason == "CONTROL_MESSAGE_TOO_LARGE"
            assert (
                f"over the node stream's limit of {CONTROL_MESSAGE_MAX_BYTES} bytes" in refused.value.message
            )

            # Node → controller: a result over the bound arrives as a failed result saying so.
            result = await streams.send_command(
                node_id, node_pb2.NodeCommand(stop_replica=node_pb2.StopReplica(deployment_id="big")), 10.0
            )
            assert not result.ok
            assert "was not sent" in result.error_message
            assert f"limit of {CONTROL_MESSAGE_MAX_BYTES} bytes" in result.error_message

            # The same stream is still up and answers a normal command.
            small = await streams.send_command(
                node_id, node_pb2.NodeCommand(stop_replica=node_pb2.StopReplica(deployment_id="s")), 10.0
            )
            assert small.ok
            assert json.loads(small.payload) == {"small": True}
            assert streams.get(node_id) is session
            assert agent.connections == 1
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(running, 15)
