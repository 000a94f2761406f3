"""NodeService.WatchNodes over a real server (controller/nodes/watch.py).

The snapshot of the caller's nodes, then registrations, state changes (ready, suspect,
failed), removals; another user's nodes never appear; heartbeats are thinned per node and
merged into the next message; cancelling a watch unsubscribes it and a draining controller
ends it. Nodes are the hand-written ones of test_node_api.py. Every wait is for a message
or a condition (the deadline only turns a hang into a failure).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from automator67.v1 import common_pb2, node_pb2, node_pb2_grpc

from controller.nodes.health import NodeState
from controller.nodes.monitor import StateChange
from controller.nodes.watch import Subscription, _Kind
from controller.server import Controller
from tests.integration.test_node_api import FakeNode, Stream, _enroll, _user
from tests.support import bearer, controller_settings, running_controller

INTERVAL = 1.0
"""Heartbeat interval: a node that stops is suspect at once (its stream breaks) and failed
3.1 intervals after its last heartbeat."""
WAIT = 30.0
"""Deadline of one wait (a failure, not a measurement)."""

EXISTING = node_pb2.NODE_CHANGE_KIND_EXISTING
SNAPSHOT_END = node_pb2.NODE_CHANGE_KIND_SNAPSHOT_END
REGISTERED = node_pb2.NODE_CHANGE_KIND_REGISTERED
STATUS_CHANGED = node_pb2.NODE_CHANGE_KIND_STATUS_CHANGED
UPDATED = node_pb2.NODE_CHANGE_KIND_UPDATED
REMOVED = node_pb2.NODE_CHANGE_KIND_REMOVED
SECRET = b"gho_super_secret_oauth_token"  # FakeNode's provider token


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    settings = controller_settings(tmp_path, heartbeat_interval_seconds=INTERVAL)
    async with running_controller(settings) as running:
        yield running


Message = node_pb2.WatchNodesResponse


class Watch:
    """One WatchNodes call and every message it brought."""

    def __init__(self, stub: node_pb2_grpc.NodeServiceStub, token: str, **request: object) -> None:
        self.call = stub.WatchNodes(
            node_pb2.WatchNodesRequest(**request),  # type: ignore[arg-type]
            metadata=bearer(token),
        )
        self.seen: list[Message] = []

    async def until(self, predicate: Callable[[Message], bool], what: str) -> Message:
        async def read() -> Message:
            while True:
                message = await self.call.read()
                assert message is not grpc.aio.EOF, f"the watch ended while waiting for {what}"
                assert isinstance(message, Message)
                self.seen.append(message)
                if predicate(message):
                    return message

        return await asyncio.wait_for(read(), WAIT)

    async def snapshot(self) -> list[node_pb2.Node]:
        await self.until(lambda m: m.kind == SNAPSHOT_END, "the end of the snapshot")
        return [m.node for m in self.seen if m.kind == EXISTING]


def status_of(node_id: str, status: int) -> Callable[[Message], bool]:
    return lambda m: m.kind == STATUS_CHANGED and m.node.id == node_id and m.node.status == status


async def until_true(condition: Callable[[], bool], what: str) -> None:
    async def poll() -> None:
        while not condition():  # noqa: ASYNC110 - the server's task ends the call: poll, no fixed delay
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(poll(), WAIT)
    except TimeoutError:
        raise AssertionError(f"waiting for {what}") from None


async def test_a_watch_sends_the_snapshot_then_registrations_state_changes_and_removals(
    controller: Controller, channel: grpc.aio.Channel
) -> None:
    stub = node_pb2_grpc.NodeServiceStub(channel)
    ada = await _user(channel, "ada@example.com")
    bob = await _user(channel, "bob@example.com")
    first = FakeNode()
    first_id = (await _enroll(stub, ada, first)).node_id

    watch = Watch(stub, ada)
    snapshot = await watch.snapshot()
    listed = (await stub.ListNodes(node_pb2.ListNodesRequest(), metadata=bearer(ada))).nodes
    assert [n.id for n in snapshot] == [n.id for n in listed] == [first_id]
    assert snapshot[0].status == common_pb2.NODE_STATUS_INITIALIZING
    assert snapshot[0].region == "eu-west"
    assert snapshot[0].credentials.state == listed[0].credentials.state  # the state, never the token
    assert snapshot[0].credentials.state == node_pb2.NODE_CREDENTIALS_STATE_ACTIVE

    second = FakeNode()
    second_id = (await _enroll(stub, ada, second)).node_id
    registered = await watch.until(lambda m: m.kind == REGISTERED, "the second node's registration")
    assert registered.node.id == second_id

    bob_watch = Watch(stub, bob)
    assert await bob_watch.snapshot() == []
    bobs = FakeNode()
    bob_id = (await _enroll(stub, bob, bobs)).node_id

    async with first.channel(controller) as first_channel, bobs.channel(controller) as bob_channel:
        stream = Stream(first_channel)
        await stream.hello()
        await stream.heartbeat(1, cpu=12)
        ready = await watch.until(status_of(first_id, common_pb2.NODE_STATUS_READY), "ready")
        assert ready.previous_status == common_pb2.NODE_STATUS_INITIALIZING
        assert ready.reason
        assert ready.node.metrics.cpu_percent == 12
        # the fleet's heartbeat time, not the store's copy (written after the change)
        assert ready.node.HasField("last_heartbeat")
        assert ready.node.HasField("last_metrics_update")

        # Bob's node turns ready in Bob's watch: by then Ada's watch was offered it too (one
        # listener call fans out to both), and must have left it out.
        bob_stream = Stream(bob_channel)
        await bob_stream.hello()
        await bob_stream.heartbeat(1)
        await bob_watch.until(status_of(bob_id, common_pb2.NODE_STATUS_READY), "Bob's node ready")

        await stream.outbox.put(None)  # the node goes away: suspect at once, failed later
        await watch.until(status_of(first_id, common_pb2.NODE_STATUS_FAILED), "the node to fail")
        await bob_stream.outbox.put(None)

    changes = [m for m in watch.seen if m.kind == STATUS_CHANGED and m.node.id == first_id]
    assert changes[0].node.status == common_pb2.NODE_STATUS_READY
    for before, after in itertools.pairwise(changes):
        # each change starts where the last one ended (suspect, then failed; the two are
        # merged into one message, from ready, only for a reader slower than 2 intervals)
        assert after.previous_status == before.node.status

    await stub.DeregisterNode(node_pb2.DeregisterNodeRequest(node_id=second_id), metadata=bearer(ada))
    removed = await watch.until(lambda m: m.kind == REMOVED, "the removal")
    assert removed.node.id == second_id
    assert removed.node.status == common_pb2.NODE_STATUS_REMOVED

    assert {m.node.id for m in watch.seen if m.HasField("node")} == {first_id, second_id}
    assert {m.node.id for m in bob_watch.seen if m.HasField("node")} == {bob_id}
    for message in watch.seen + bob_watch.seen:
        assert SECRET not in message.SerializeToString()
        assert message.HasField("time")
    watch.call.cancel()
    bob_watch.call.cancel()


async def test_heartbeats_are_thinned_and_merged_into_the_next_message(
    controller: Controller, channel: grpc.aio.Channel
) -> None:
    stub = node_pb2_grpc.NodeServiceStub(channel)
    ada = await _user(channel)
    node = FakeNode()
    node_id = (await _enroll(stub, ada, node)).node_id
    async with node.channel(controller) as node_channel:
        stream = Stream(node_channel)
        await stream.hello()
        await stream.heartbeat(1, cpu=10)
        # an hour between a node's metrics updates: within this test, none may come
        watch = Watch(stub, ada, min_metrics_interval_ms=3_600_000)
        (snapshot,) = await watch.snapshot()
        assert snapshot.id == node_id
        for sequence in range(2, 22):
            await stream.heartbeat(sequence, cpu=10 + sequence)  # acked: the fleet has it
        await stub.DrainNode(node_pb2.DrainNodeRequest(node_id=node_id), metadata=bearer(ada))
        drained = await watch.until(lambda m: m.kind == STATUS_CHANGED, "the drain")
        assert drained.node.status == common_pb2.NODE_STATUS_DRAINING
        assert drained.node.metrics.cpu_percent == 31  # the latest heartbeat's, merged in
        assert drained.node.last_heartbeat.ToDatetime() > snapshot.last_heartbeat.ToDatetime()
        after_snapshot = watch.seen[watch.seen.index(next(m for m in watch.seen if m.kind == SNAPSHOT_END)) :]
        assert [m.kind for m in after_snapshot] == [SNAPSHOT_END, STATUS_CHANGED]
        watch.call.cancel()
        await stream.outbox.put(None)


def test_a_subscription_keeps_one_pending_change_per_node_and_thins_heartbeats() -> None:
    async def run() -> None:
        subscription = Subscription("ada", "", min_interval=5.0)
        subscription.note("n1", _Kind.UPDATED, now=100.0)
        subscription.note("n1", _Kind.UPDATED, now=100.5)
        assert list(subscription.pending) == ["n1"]  # merged, not queued twice
        subscription.pending.clear()
        subscription.last_sent["n1"] = 101.0
        subscription.note("n1", _Kind.UPDATED, now=105.9)
        assert subscription.pending == {}  # within the interval of the last message: dropped
        subscription.note("n1", _Kind.UPDATED, now=106.0)
        assert [p.kind for p in subscription.pending.values()] == [_Kind.UPDATED]
        subscription.pending.clear()
        subscription.last_sent["n1"] = 106.0

        def change(old: NodeState, new: NodeState, reason: str) -> StateChange:
            return StateChange("n1", "ada", old, new, reason, 106.1, None)  # type: ignore[arg-type]

        subscription.note(
            "n1", _Kind.STATUS, now=106.1, change=change(NodeState.READY, NodeState.SUSPECT, "a")
        )
        subscription.note("n1", _Kind.UPDATED, now=106.2)
        subscription.note(
            "n1", _Kind.STATUS, now=106.3, change=change(NodeState.SUSPECT, NodeState.FAILED, "b")
        )
        pending = subscription.pending["n1"]
        assert (pending.kind, pending.previous, pending.reason) == (_Kind.STATUS, NodeState.READY, "b")
        subscription.note("n1", _Kind.REMOVED, now=106.4)
        assert [p.kind for p in subscription.pending.values()] == [_Kind.REMOVED]
        subscription.note("n2", _Kind.UPDATED, now=106.5)  # never sent: not thinned
        assert list(subscription.pending) == ["n1", "n2"]
        only = Subscription("ada", "n2", min_interval=5.0)
        only.note("n1", _Kind.STATUS, now=1.0)
        assert only.pending == {}

    asyncio.run(run())


async def test_one_node_can_be_watched_and_bad_requests_are_refused(
    controller: Controller, channel: grpc.aio.Channel
) -> None:
    stub = node_pb2_grpc.NodeServiceStub(channel)
    ada = await _user(channel, "ada@example.com")
    bob = await _user(channel, "bob@example.com")
    mine, other = FakeNode(), FakeNode()
    mine_id = (await _enroll(stub, ada, mine)).node_id
    other_id = (await _enroll(stub, ada, other)).node_id
    bobs_id = (await _enroll(stub, bob, FakeNode())).node_id

    watch = Watch(stub, ada, node_id=mine_id)
    assert [n.id for n in await watch.snapshot()] == [mine_id]
    await stub.DrainNode(node_pb2.DrainNodeRequest(node_id=other_id), metadata=bearer(ada))
    await stub.DrainNode(node_pb2.DrainNodeRequest(node_id=mine_id), metadata=bearer(ada))
    drained = await watch.until(lambda m: m.kind == STATUS_CHANGED, "the drain")
    assert drained.node.id == mine_id  # the other node's drain came first, and was left out
    watch.call.cancel()

    for request, code in (
        (node_pb2.WatchNodesRequest(node_id=bobs_id), grpc.StatusCode.NOT_FOUND),
        (node_pb2.WatchNodesRequest(min_metrics_interval_ms=500), grpc.StatusCode.INVALID_ARGUMENT),
    ):
        call = stub.WatchNodes(request, metadata=bearer(ada))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
        assert refused.value.code() == code
    unauthenticated = stub.WatchNodes(node_pb2.WatchNodesRequest())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await unauthenticated.read()
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_cancelling_a_watch_unsubscribes_it_and_a_drain_ends_the_others(
    controller: Controller, channel: grpc.aio.Channel
) -> None:
    stub = node_pb2_grpc.NodeServiceStub(channel)
    ada = await _user(channel)
    hub = controller.node_watch
    assert hub is not None
    assert hub.subscriptions() == 0
    cancelled, kept = Watch(stub, ada), Watch(stub, ada)
    await cancelled.snapshot()
    await kept.snapshot()
    assert hub.subscriptions() == 2  # subscribed before the snapshot was read
    cancelled.call.cancel()
    await until_true(lambda: hub.subscriptions() == 1, "the cancelled watch to unsubscribe")

    # A draining controller ends the watch itself (OK), long before the grace runs out.
    stopping = asyncio.ensure_future(controller.stop(grace=60))
    assert await asyncio.wait_for(kept.call.read(), WAIT) is grpc.aio.EOF
    assert await kept.call.code() == grpc.StatusCode.OK
    await asyncio.wait_for(stopping, WAIT)
    assert hub.subscriptions() == 0
