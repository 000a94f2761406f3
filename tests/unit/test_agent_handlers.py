"""The command registry: registering, dispatching, unknown kinds, failing handlers, counters."""

from __future__ import annotations

import asyncio
import json

import pytest
from automator67.v1 import node_pb2

from controller.agent.handlers import (
    CommandHandlers,
    command_kind,
    command_kinds,
    error_result,
    ok_result,
)
from controller.agent.metrics import RequestCounters


def stop_command(command_id: str = "c1") -> node_pb2.NodeCommand:
    return node_pb2.NodeCommand(command_id=command_id, stop_replica=node_pb2.StopReplica(deployment_id="d1"))


def deploy_command(command_id: str = "c2") -> node_pb2.NodeCommand:
    return node_pb2.NodeCommand(
        command_id=command_id, deploy_replica=node_pb2.DeployReplica(deployment_id="d1")
    )


def test_command_kinds_come_from_node_proto() -> None:
    assert {"deploy_replica", "stop_replica", "execute_shard_statement"} <= command_kinds()
    assert command_kind(stop_command()) == "stop_replica"
    assert command_kind(node_pb2.NodeCommand(command_id="x")) == "<none>"


async def test_register_with_the_decorator_and_dispatch() -> None:
    handlers = CommandHandlers()

    @handlers.register("stop_replica")
    async def stop(command: node_pb2.NodeCommand) -> node_pb2.CommandResult:
        return ok_result(command, {"stopped": command.stop_replica.deployment_id})

    assert "stop_replica" in handlers
    assert handlers.kinds() == {"stop_replica"}
    assert len(handlers) == 1
    result = await handlers.dispatch(stop_command("c9"))
    assert result.ok
    assert result.command_id == "c9"
    assert json.loads(result.payload) == {"stopped": "d1"}


async def test_register_without_the_decorator_returns_the_handler() -> None:
    handlers = CommandHandlers()

    async def deploy(command: node_pb2.NodeCommand) -> node_pb2.CommandResult:
        return ok_result(command)

    assert handlers.register("deploy_replica", deploy) is deploy
    result = await handlers.dispatch(deploy_command())
    assert result.ok
    assert result.payload == b""


@pytest.mark.parametrize(
    ("command", "message"),
    [
        pytest.param(deploy_command("c2"), "unsupported command deploy_replica", id="kind-without-handler"),
        pytest.param(node_pb2.NodeCommand(command_id="c3"), "unsupported command <none>", id="no-kind-set"),
    ],
)
async def test_unsupported_commands_get_a_failed_result(command: node_pb2.NodeCommand, message: str) -> None:
    result = await CommandHandlers().dispatch(command)
    assert not result.ok
    assert result.error_message == message
    assert result.command_id == command.command_id


async def test_a_raising_handler_gives_a_failed_result_with_its_message() -> None:
    handlers = CommandHandlers()

    @handlers.register("stop_replica")
    async def stop(command: node_pb2.NodeCommand) -> node_pb2.CommandResult:
        raise RuntimeError("replica d1/0 is not running")

    @handlers.register("deploy_replica")
    async def deploy(command: node_pb2.NodeCommand) -> node_pb2.CommandResult:
        raise KeyError  # no message: the type name stands in

    result = await handlers.dispatch(stop_command("c4"))
    assert (result.ok, result.command_id, result.error_message) == (
        False,
        "c4",
        "replica d1/0 is not running",
    )
    result = await handlers.dispatch(deploy_command("c5"))
    assert (result.ok, result.error_message) == (False, "KeyError")


async def test_result_always_carries_the_command_id_and_must_be_a_command_result() -> None:
    handlers = CommandHandlers()

    @handlers.register("stop_replica")
    async def stop(command: node_pb2.NodeCommand) -> node_pb2.CommandResult:
        return node_pb2.CommandResult(command_id="wrong", ok=True)

    @handlers.register("deploy_replica")
    async def deploy(command: node_pb2.NodeCommand) -> node_pb2.CommandResult:
        return None  # type: ignore[return-value]

    assert (await handlers.dispatch(stop_command("c6"))).command_id == "c6"
    bad = await handlers.dispatch(deploy_command("c7"))
    assert not bad.ok
    assert "no CommandResult" in bad.error_message


def test_unknown_kind_names_and_double_registration_are_refused() -> None:
    handlers = CommandHandlers()

    async def handler(command: node_pb2.NodeCommand) -> node_pb2.CommandResult:
        return ok_result(command)

    with pytest.raises(ValueError, match="unknown command kind 'stop_replcia'"):
        handlers.register("stop_replcia", handler)
    handlers.register("stop_replica", handler)
    with pytest.raises(ValueError, match="already registered"):
        handlers.register("stop_replica", handler)
    handlers.register("stop_replica", handler, replace=True)


async def test_handlers_run_concurrently() -> None:
    handlers = CommandHandlers()
    both_started = asyncio.Barrier(2)

    @handlers.register("stop_replica")
    async def stop(command: node_pb2.NodeCommand) -> node_pb2.CommandResult:
        await asyncio.wait_for(both_started.wait(), 1)  # deadlocks unless both run at once
        return ok_result(command)

    results = await asyncio.gather(handlers.dispatch(stop_command("a")), handlers.dispatch(stop_command("b")))
    assert [r.ok for r in results] == [True, True]


async def test_dispatch_updates_the_request_counters() -> None:
    now = [100.0]
    clock = lambda: now[0]  # noqa: E731
    counters = RequestCounters(window_seconds=60, clock=clock)
    handlers = CommandHandlers(clock=clock)
    seen_active: list[int] = []

    @handlers.register("stop_replica")
    async def stop(command: node_pb2.NodeCommand) -> node_pb2.CommandResult:
        seen_active.append(counters.active)
        now[0] += 0.25
        if command.command_id == "fail":
            raise RuntimeError("boom")
        return error_result(command, "refused") if command.command_id == "refuse" else ok_result(command)

    for command_id in ("ok", "fail", "refuse", "ok2"):
        await handlers.dispatch(stop_command(command_id), counters)
    await handlers.dispatch(deploy_command(), counters)  # unsupported: not a request that ran
    assert seen_active == [1, 1, 1, 1]
    assert counters.active == 0
    assert counters.window() == (4, 2, pytest.approx(1.0))
    assert counters.error_rate_percent() == 50.0
    assert counters.avg_response_time_ms() == pytest.approx(250.0)


def test_ok_result_payload_encoding() -> None:
    command = stop_command("c8")
    assert ok_result(command, b"raw").payload == b"raw"
    assert json.loads(ok_result(command, {"rows": [1, 2]}).payload) == {"rows": [1, 2]}
    assert error_result(command, "nope") == node_pb2.CommandResult(
        command_id="c8", ok=False, error_message="nope"
    )
