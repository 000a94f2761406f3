"""Commands relayed between controllers over a real Redis (controller/nodes/relay.py).

Two controllers' stream registries, "A" and "B", each with its relay on the test Redis;
a node's stream is held by A (a session in A's registry, answered by a small node loop
that reads what A queues for it). B commands the node: through A, with the node's own
result or error, and at once a clear error when nobody holds the node or its holder
does not listen.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from automator67.v1 import node_pb2

from controller.errors import DeadlineExceeded, Unavailable
from controller.nodes.relay import CommandRelay
from controller.nodes.sessions import NodeSession, StreamRegistry


@dataclass
class Controllers:
    a: StreamRegistry
    b: StreamRegistry
    holders: dict[str, str]


async def _node(session: NodeSession, answer: bool = True) -> None:
    """The node: answers each command with its kind and id (unless told not to answer)."""
    while True:
        message = await session.outbound.get()
        if message is None:
            return
        command = message.command
        if answer:
            session.resolve(
                node_pb2.CommandResult(
                    command_id=command.command_id, ok=True, payload=command.WhichOneof("kind").encode()
                )
            )


@pytest.fixture
async def controllers(redis_server_url: str, redis_key_prefix: str) -> AsyncIterator[Controllers]:
    holders: dict[str, str] = {}

    async def holder_of(node_id: str) -> str | None:
        return holders.get(node_id)

    a, b = StreamRegistry(), StreamRegistry()
    relays = []
    for name, streams in (("A", a), ("B", b)):
        relay = CommandRelay(
            redis_server_url,
            name,
            streams.send_local,
            holder_of,
            key_prefix=redis_key_prefix,
            margin_seconds=5,
        )
        await relay.listening()
        streams.relay = relay
        relays.append(relay)
    try:
        yield Controllers(a, b, holders)
    finally:
        for relay in relays:
            await relay.close()


def _command() -> node_pb2.NodeCommand:
    return node_pb2.NodeCommand(stop_replica=node_pb2.StopReplica(deployment_id="d1", replica_index=0))


async def test_a_command_for_a_node_held_by_another_controller_goes_through_it(
    controllers: Controllers,
) -> None:
    session = controllers.a.open("n1", "u1")
    controllers.holders["n1"] = "A"
    node = asyncio.create_task(_node(session))
    try:
        command = _command()
        result = await controllers.b.send_command("n1", command, 10)
        assert result.ok
        assert result.payload == b"stop_replica"
        assert result.command_id == command.command_id  # the id B gave it reached the node
        assert command.command_id
        assert controllers.b.relay is not None
        assert controllers.a.relay is not None
        assert (controllers.b.relay.relayed, controllers.a.relay.served) == (1, 1)
        # A's own command for its own node does not touch the relay
        assert (await controllers.a.send_command("n1", _command(), 10)).ok
        assert controllers.a.relay.relayed == 0
    finally:
        session.close("test over")
        await node


async def test_the_nodes_error_comes_back_with_its_code_and_reason(controllers: Controllers) -> None:
    session = controllers.a.open("n1", "u1")
    controllers.holders["n1"] = "A"
    node = asyncio.create_task(_node(session, answer=False))
    try:
        with pytest.raises(DeadlineExceeded) as timed_out:  # A's wait for the node ran out
            await controllers.b.send_command("n1", _command(), 0.3)
        assert timed_out.value.reason == "NODE_COMMAND_TIMEOUT"
        assert "did not answer command" in timed_out.value.message
    finally:
        session.close("test over")
        await node
    controllers.a.release(session, "gone")
    with pytest.raises(Unavailable) as gone:  # the store still says A; A has no stream for it
        await controllers.b.send_command("n1", _command(), 5)
    assert gone.value.reason == "NODE_NOT_CONNECTED"


async def test_a_node_nobody_holds_is_unavailable_at_once(controllers: Controllers) -> None:
    with pytest.raises(Unavailable) as nobody:
        await controllers.b.send_command("n2", _command(), 600)
    assert nobody.value.reason == "NODE_NOT_CONNECTED"
    assert nobody.value.message == "Node n2 is not connected to any controller"


async def test_a_holder_that_does_not_listen_is_reported_at_once(controllers: Controllers) -> None:
    controllers.holders["n1"] = "A"
    assert controllers.a.relay is not None
    await controllers.a.relay.close()  # A died (or lost Redis): nobody listens on its channel
    with pytest.raises(Unavailable) as gone:
        await controllers.b.send_command("n1", _command(), 600)
    assert gone.value.reason == "NODE_HOLDER_GONE"
    assert "held by controller A" in gone.value.message


async def test_many_commands_in_flight_each_get_their_own_answer(controllers: Controllers) -> None:
    sessions = [controllers.a.open(f"n{i}", "u1") for i in range(20)]
    for i in range(20):
        controllers.holders[f"n{i}"] = "A"
    nodes = [asyncio.create_task(_node(s)) for s in sessions]
    try:
        commands = [_command() for _ in range(100)]
        results = await asyncio.gather(
            *(controllers.b.send_command(f"n{i % 20}", c, 30) for i, c in enumerate(commands))
        )
        assert [r.command_id for r in results] == [c.command_id for c in commands]
    finally:
        for s in sessions:
            s.close("test over")
        with contextlib.suppress(Exception):
            await asyncio.gather(*nodes)


async def test_the_holder_is_read_once_and_read_again_when_the_node_moved(
    redis_server_url: str, redis_key_prefix: str
) -> None:
    """Each asker keeps a node's holder for a while (a relayed command costs no store read);
    an answer that the holder has no stream for the node makes it read the store again."""
    holders = {"n1": "A"}
    reads: list[str] = []

    async def holder_of(node_id: str) -> str | None:
        reads.append(node_id)
        return holders.get(node_id)

    a, b = StreamRegistry(), StreamRegistry()
    relays = []
    for name, streams in (("A", a), ("B", b)):
        relay = CommandRelay(
            redis_server_url, name, streams.send_local, holder_of, key_prefix=redis_key_prefix
        )
        await relay.listening()
        streams.relay = relay
        relays.append(relay)
    session = a.open("n1", "u1")
    node = asyncio.create_task(_node(session))
    try:
        for _ in range(3):
            assert (await b.send_command("n1", _command(), 10)).ok
        assert reads == ["n1"]  # one read for three commands
        session.close("the node left A")
        await node
        a.release(session, "gone")
        del holders["n1"]  # and no controller holds it now
        with pytest.raises(Unavailable) as moved:  # B still thinks A: A says it has no stream
            await b.send_command("n1", _command(), 10)
        assert moved.value.message == "Node n1 is not connected"
        with pytest.raises(Unavailable) as nobody:  # read again: no holder at all
            await b.send_command("n1", _command(), 10)
        assert nobody.value.message == "Node n1 is not connected to any controller"
        assert reads == ["n1", "n1"]
    finally:
        for relay in relays:
            await relay.close()
