"""Which controller watches each node (controller/nodes/watchers.py), on a real store.

Two controllers' fleets, "A" and "B", share a store (SQLite and PostgreSQL), each with
its own connection pool and an injected clock; which controllers are alive is what each
test says. The last test runs a real controller with real agent processes.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from automator67.v1 import common_pb2
from sqlalchemy import select

from controller.cache.memory import MemoryCache
from controller.leases import LoopLeases
from controller.nodes import HealthConfig
from controller.nodes.fleet import Fleet
from controller.nodes.health import NodeState
from controller.nodes.repository import NodeRepository
from controller.nodes.watchers import NodeWatchers
from controller.store import Store, UserRepository
from controller.store.models import Node
from tests.integration.test_deployments_real import HEARTBEAT, Client, _user, processes
from tests.support import controller_settings, migrated_store, running_controller


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Two:
    a: Fleet
    b: Fleet
    alive: set[str]
    stores: tuple[Store, Store]
    user_id: str
    clock: Clock

    def watchers(self, fleet: Fleet) -> NodeWatchers:
        async def peers() -> set[str]:
            return set(self.alive)

        store = self.stores[0] if fleet is self.a else self.stores[1]
        return NodeWatchers(fleet, peers, LoopLeases(store, str(fleet.holder_id)), 1.0)

    async def node(self, node_id: str) -> None:
        await self.a.nodes.create(
            user_id=self.user_id,
            provider="test",
            endpoint="http://n",
            region="eu",
            capabilities={},
            node_id=node_id,
        )

    async def holder(self, node_id: str) -> str | None:
        async with self.stores[0].session() as session:
            return (await session.execute(select(Node.stream_holder).where(Node.id == node_id))).scalar_one()

    async def status(self, node_id: str) -> str:
        async with self.stores[0].session() as session:
            return (await session.execute(select(Node.status).where(Node.id == node_id))).scalar_one()


@pytest.fixture
async def two(store_url: str) -> AsyncIterator[Two]:
    async with migrated_store(store_url) as sa, migrated_store(store_url) as sb:
        clock = Clock()
        alive = {"A", "B"}

        def fleet(store: Store, name: str) -> Fleet:
            f = Fleet(
                nodes=NodeRepository(store),
                cache=MemoryCache(),
                health_config=HealthConfig.fast(1.0),
                clock=clock,
                wall_clock=clock,
            )
            f.holder_id = name

            async def peers() -> set[str]:
                return set(alive)

            f.peers = peers
            return f

        user = await UserRepository(sa).create("alice@example.com", "hash")
        fleets = (fleet(sa, "A"), fleet(sb, "B"))
        try:
            yield Two(*fleets, alive, (sa, sb), user.id, clock)
        finally:
            for f in fleets:  # its writes in flight end before the stores close
                await f.stop()


OK = common_pb2.NodeMetrics(cpu_percent=10, memory_percent=20, disk_percent=30)


async def _connect(fleet: Fleet, node_id: str, user_id: str) -> None:
    """The node's stream opens on ``fleet``'s controller (as NodeService.Connect does), and
    its first heartbeat arrives (the state written after the watcher)."""
    fleet.track(node_id, user_id)
    fleet.streams.open(node_id, user_id)
    fleet.stream_connected(node_id)
    fleet.heartbeat(node_id, OK)
    await fleet.monitor.flush()


async def test_a_node_that_moves_is_handed_over_and_its_old_watcher_writes_nothing(two: Two) -> None:
    await two.node("n1")
    await _connect(two.a, "n1", two.user_id)
    assert await two.holder("n1") == "A"
    # the stream breaks on A; the node reconnects to B before A fails it
    session = two.a.streams.get("n1")
    assert session is not None
    two.a.streams.release(session, "broken")
    two.a.stream_broken("n1")
    await two.a.monitor.flush()
    assert await two.status("n1") == "suspect"  # A still watches it: its write lands
    await _connect(two.b, "n1", two.user_id)
    assert await two.holder("n1") == "B"
    assert await two.status("n1") == "ready"
    # until A's next pass, A's state changes for the node are refused by the store
    two.clock.now += 60  # long silent on A: failed there
    await two.a.monitor.sweep(two.clock.now)
    await two.a.monitor.flush()
    assert await two.status("n1") == "ready"
    assert await two.watchers(two.a).sync() == (1, 0)  # A's next pass hands it over
    assert "n1" not in two.a.monitor
    assert "n1" in two.b.monitor


async def test_a_pass_hands_over_a_node_held_elsewhere(two: Two) -> None:
    await two.node("n1")
    await _connect(two.a, "n1", two.user_id)
    await _connect(two.b, "n1", two.user_id)  # A has not noticed its stream broke yet
    assert await two.watchers(two.b).sync() == (0, 0)  # B holds the stream: nothing to do
    session = two.a.streams.get("n1")
    assert session is not None
    two.a.streams.release(session, "broken")
    assert await two.watchers(two.a).sync() == (1, 0)
    assert "n1" not in two.a.monitor


async def _silence(fleet: Fleet, clock: Clock) -> None:
    """A minute of silence, then the mass-failure window: the node fails and its recovery
    (held for the window) is delivered."""
    for _ in range(3):
        clock.now += 60
        await fleet.monitor.sweep(clock.now)
        await fleet.monitor.flush()


async def test_a_failure_seen_by_a_controller_that_lost_the_node_is_not_recovered(two: Two) -> None:
    recovered: list[str] = []

    async def recover(node_id: str, user_id: str) -> None:
        recovered.append(node_id)

    two.a.recovery_handler = recover
    two.b.recovery_handler = recover
    await two.node("n1")
    await _connect(two.a, "n1", two.user_id)
    session = two.a.streams.get("n1")
    assert session is not None
    two.a.streams.release(session, "broken")
    two.a.stream_broken("n1")
    await _connect(two.b, "n1", two.user_id)
    await _silence(two.a, two.clock)  # failed on A, and A's recovery is due
    assert recovered == []  # not recovered: the store says B watches it
    assert "n1" not in two.a.monitor  # handed over on the spot
    # the same silence on the node's watcher is a failure, recovered once
    await _silence(two.b, two.clock)
    assert recovered == ["n1"]
    assert await two.status("n1") == "failed"


async def test_the_nodes_of_a_dead_controller_are_adopted_once_with_a_grace_period(two: Two) -> None:
    for n in ("n1", "n2"):
        await two.node(n)
        await _connect(two.a, n, two.user_id)
    two.alive.discard("A")  # A was killed: its row went stale
    b_watchers = two.watchers(two.b)
    a_lease_holder = two.watchers(two.a)  # a third controller racing B would lose the lease
    handed, adopted = await b_watchers.sync()
    assert (handed, adopted) == (0, 2)
    assert {await two.holder("n1"), await two.holder("n2")} == {"B"}
    assert two.b.monitor.get("n1") is not None
    # a fresh grace period: not failed before it has had time to reconnect
    state = two.b.monitor.get("n1")
    assert state is not None
    assert state.state is not NodeState.FAILED
    del a_lease_holder
    assert await b_watchers.sync() == (0, 0)  # adopted once


async def test_only_the_lease_holder_adopts(two: Two) -> None:
    await two.node("n1")
    await two.node("n2")  # registered, never connected: no controller watches it yet
    await two.a.nodes.record_stream_holders("C", ["n1"])  # watched by C, which died
    a, b = two.watchers(two.a), two.watchers(two.b)
    first = await a.sync()
    second = await b.sync()
    assert (first, second) == ((0, 1), (0, 0))
    assert (await two.holder("n1"), await two.holder("n2")) == ("A", None)
    assert "n1" in two.a.monitor
    assert "n1" not in two.b.monitor


async def _until(check: Callable[[], Awaitable[bool]], what: str, within: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.05)


async def _watchers_in(url: str) -> dict[str, str | None]:
    store = await Store.open(url)
    try:
        async with store.session() as session:
            rows = (await session.execute(select(Node.id, Node.stream_holder))).all()
        return {node_id: holder for node_id, holder in rows}
    finally:
        await store.close()


async def test_a_real_controller_records_the_nodes_it_watches(tmp_path: Path) -> None:
    """Real agents: the controller holding their streams is their watcher, and stays so when
    one is killed (it fails it, on the usual timing) and when it stops (so that another
    controller sharing the store knows to adopt them)."""
    settings = controller_settings(tmp_path / "controller", heartbeat_interval_seconds=HEARTBEAT)
    me = settings.resolved_controller_id()
    with processes(tmp_path) as procs:
        async with (
            running_controller(settings) as controller,
            grpc.aio.insecure_channel(controller.address) as channel,
        ):
            client = Client(channel, await _user(channel))
            enrollment = await client.enrollment(uses=2)
            base = 30000 + (os.getpid() % 50) * 40
            agents = [
                procs.agent(controller.address, enrollment, region, (base + i * 20, base + i * 20 + 19))
                for i, region in enumerate(("eu-west", "us-east"))
            ]
            nodes = await client.wait_ready(2)
            killed = next(n.id for n in nodes if n.region == "eu-west")

            async def watched_here() -> bool:
                return await _watchers_in(settings.effective_store_url) == {n.id: me for n in nodes}

            await _until(watched_here, "both nodes recorded as watched by this controller")
            agents[0].send_signal(signal.SIGKILL)
            await asyncio.to_thread(agents[0].wait)

            async def failed() -> bool:
                return {n.id: n.status for n in await client.list_nodes()}[
                    killed
                ] == common_pb2.NODE_STATUS_FAILED

            await _until(failed, "the killed agent's node failed")
            assert await watched_here()  # still this controller's to watch
    assert await _watchers_in(settings.effective_store_url) == {n.id: me for n in nodes}
