"""Two controllers on one store: a deployment is worked on by one of them at a time.

Two harnesses (controllers "A" and "B", each with its own store connection pool) share a
real store (SQLite file and PostgreSQL) and one injected wall clock: the lease in the
deployment's row decides who works on it; a controller paused past its lease finds its
next write refused and changes nothing; the work in progress (surge, draining replicas,
retry backoffs) is read from the row by the other one.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from controller.cache.memory import MemoryCache
from controller.deployments import decide, fencing, versions
from controller.deployments.blobs import PackageStore
from controller.deployments.harness import Harness, set_replicas
from controller.deployments.harness_index import view_of
from controller.deployments.leases import LeaseLost
from controller.deployments.records import DeploymentStatus, Replica, ReplicaStatus
from controller.deployments.recovery import Recovery
from controller.deployments.rollout import Rollouts
from controller.nodes import HealthConfig
from controller.nodes.fleet import Fleet
from controller.nodes.repository import NodeRepository
from controller.store import Store, UserRepository
from controller.store.models import Deployment
from controller.vault import Keyring, Vault
from tests.support import migrated_store

T0 = datetime(2027, 2, 1, 12, 0, tzinfo=UTC)
LEASE = 15.0


class Wall:
    """One wall clock for both controllers (their skew is far below a lease)."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def monotonic(self) -> float:
        return (self.now - T0).total_seconds()


@pytest.fixture
async def store_pair(store_url: str) -> AsyncIterator[tuple[Store, Store]]:
    """Two connection pools on one store: what two controller processes have."""
    async with migrated_store(store_url) as a, migrated_store(store_url) as b:
        yield a, b


def _harness(store: Store, name: str, wall: Wall) -> Harness:
    fleet = Fleet(
        nodes=NodeRepository(store),
        cache=MemoryCache(),
        health_config=HealthConfig.fast(1.0),
        clock=wall.monotonic,
        wall_clock=wall.monotonic,
    )
    return Harness(
        store=store,
        fleet=fleet,
        vault=Vault(Keyring.generate("k1")),
        clock=wall.monotonic,
        wall=wall,
        packages=PackageStore(tempfile.mkdtemp(prefix="a67-test-packages-")),
        controller_id=name,
        lease_seconds=LEASE,
    )


async def _deployment(store: Store, status: DeploymentStatus, replicas: list[Replica]) -> str:
    user = await UserRepository(store).create("alice@example.com", "hash")
    row = Deployment(
        user_id=user.id,
        name="web",
        app_type="backend",
        status=status.value,
        manifest={
            "generation": 10,
            "version": 1,
            "resources": {"cpu_cores": 0.5, "memory_mb": 256, "disk_mb": 100},
        },
        desired_replicas=len(replicas),
        created_at=T0,
        updated_at=T0,
    )
    set_replicas(row, replicas)
    async with store.session() as session:
        session.add(row)
    return row.id


async def _stored(h: Harness, deployment_id: str) -> Deployment:
    row = await h.repo.get(deployment_id)
    assert row is not None
    return row


async def _settled(*harnesses: Harness) -> None:
    for h in harnesses:
        while h.tasks:
            await asyncio.gather(*list(h.tasks), return_exceptions=True)


@pytest.fixture
async def world(store_pair: tuple[Store, Store]) -> AsyncIterator[tuple[Harness, Harness, Wall]]:
    wall = Wall()
    a, b = _harness(store_pair[0], "A", wall), _harness(store_pair[1], "B", wall)
    try:
        yield a, b, wall
    finally:
        for h in (a, b):
            h.closing = True
            await _settled(h)
            h.fleet.monitor.stop()


async def test_one_controller_at_a_time_and_the_lease_is_given_back(
    world: tuple[Harness, Harness, Wall],
) -> None:
    a, b, _ = world
    d = await _deployment(a.store, DeploymentStatus.RUNNING, [Replica(0, "n1", 10, ReplicaStatus.RUNNING)])
    async with a.leases.working_on(d) as leased_a:
        assert leased_a
        stored = await _stored(b, d)
        assert (stored.lease_owner, stored.lease_until) == ("A", T0 + timedelta(seconds=LEASE))
        assert b.leases.elsewhere(stored)
        async with b.leases.working_on(d) as leased_b:
            assert not leased_b
        async with a.leases.working_on(d) as again:  # a second task of A shares it
            assert again
        assert a.leases.held == {d: 1}
    await _settled(a)
    assert a.leases.held == {}
    assert (await _stored(b, d)).lease_owner is None  # given back at once, not left to expire
    async with b.leases.working_on(d) as leased_b:
        assert leased_b
        assert (await _stored(a, d)).lease_owner == "B"


async def test_two_controllers_racing_for_a_lease_one_wins(world: tuple[Harness, Harness, Wall]) -> None:
    a, b, _ = world
    d = await _deployment(a.store, DeploymentStatus.RUNNING, [Replica(0, "n1", 10, ReplicaStatus.RUNNING)])
    for h in (a, b):  # both have the row cached, lease free: both try the same version
        assert await h.row(d) is not None
    won = await asyncio.gather(a.leases.acquire(d), b.leases.acquire(d))
    assert sorted(won) == [False, True]
    owner = (await _stored(a, d)).lease_owner
    assert owner == ("A" if won[0] else "B")


async def test_a_controller_paused_past_its_lease_changes_nothing(
    world: tuple[Harness, Harness, Wall],
) -> None:
    a, b, wall = world
    d = await _deployment(a.store, DeploymentStatus.RUNNING, [Replica(0, "n1", 10, ReplicaStatus.FAILED)])
    async with a.leases.working_on(d) as leased:
        assert leased
        # A's writes renew the lease
        wall.now += timedelta(seconds=10)
        now = wall.now
        await a.mutate(d, lambda v: decide.backoff(v, 0, now))
        assert (await _stored(b, d)).lease_until == now + timedelta(seconds=LEASE)
        # A is paused (SIGSTOP) past its lease; B takes the deployment over
        wall.now += timedelta(seconds=LEASE + 1)
        async with b.leases.working_on(d) as taken:
            assert taken
            before = await _stored(b, d)
            assert before.lease_owner == "B"
            # A resumes: its next write is refused, and nothing of it reaches the store
            with pytest.raises(LeaseLost):
                await a.mutate(d, lambda v: decide.backoff(v, 0, wall.now))
            await a.leases._renew_one(d)  # its renewer does not take it back either
            after = await _stored(b, d)
            assert (after.lease_owner, after.updated_at, after.node_assignments) == (
                "B",
                before.updated_at,
                before.node_assignments,
            )
            # B's own work goes on
            await b.mutate(d, lambda v: decide.backoff(v, 0, wall.now))
            assert (await _stored(a, d)).lease_owner == "B"


async def test_the_reconciler_leaves_a_leased_deployment_and_takes_over_an_expired_lease(
    world: tuple[Harness, Harness, Wall],
) -> None:
    a, b, wall = world
    pending = [Replica(0, "gone-node", 10, ReplicaStatus.PENDING)]
    d = await _deployment(a.store, DeploymentStatus.DEPLOYING, pending)
    recovery_b = Recovery(b, Rollouts(b, rollout_deadline_seconds=60))
    async with a.leases.working_on(d) as leased:
        assert leased
        for _ in range(3):  # A rolls it out: B's reconciler does nothing to it
            await recovery_b.reconcile()
            assert not b.rolling
            assert not b.tasks
        assert (await _stored(b, d)).status == DeploymentStatus.DEPLOYING.value
        # A dies (stops renewing): once the lease has expired, B resumes the rollout
        wall.now += timedelta(seconds=LEASE + 1)
        await recovery_b.reconcile()
        assert d in b.rolling
        await _settled(b)
    row = await _stored(a, d)
    # B's rollout ran (no node can take the replica: failed and rolled back) and gave the lease back
    assert row.status == DeploymentStatus.FAILED.value
    assert row.lease_owner is None
    assert "cannot be placed" in str(row.manifest.get("message")) or row.node_assignments[0]["status"] in (
        "failed",
        "stopped",
    )


async def test_work_in_progress_is_read_from_the_row_by_another_controller(
    world: tuple[Harness, Harness, Wall],
) -> None:
    a, b, wall = world
    old = Replica(0, "n1", 10, ReplicaStatus.RUNNING, endpoint="http://n1")
    d = await _deployment(a.store, DeploymentStatus.DEPLOYING, [old])
    a.drain_seconds = 30.0
    # A starts a surge replica of index 0 on n2 (a rolling update)
    row = await a.row(d)
    assert row is not None
    reserve, generation = versions.reserve_generation(view_of(row), 0, "n2")
    await a.commit(row, reserve)
    # B, holding n2's stream, reads the row: its fence leaves the surge replica running
    b.remember(await _stored(b, d))
    assert b.surging == {(d, 0): ("n2", generation)}
    reported = [fencing.Reported(d, 0, generation, "running", "http://n2", "")]

    def fence_on_b(node_id: str, replicas: list[fencing.Reported]) -> fencing.FencePlan:
        return fencing.fence(
            node_id,
            replicas,
            complete=True,
            assignments={i: k.assignments for i, k in b.index.items()},
            surging=b.surging,
            draining=b.draining_now(),
            sent={},
            now=0.0,
        )

    assert fence_on_b("n2", reported).stops == ()
    # the switch: the old replica drains (recorded until its drain time), the surge is gone
    row = await a.row(d)
    assert row is not None
    switch = versions.switch_replica(view_of(row), 0, "n2", generation, "http://n2", 1, wall.now)
    assert switch is not None
    await a.commit(row, switch)
    b.remember(await _stored(b, d))
    assert b.surging == {}
    assert b.draining == {("n1", d, 0, 10): wall.now + timedelta(seconds=30)}
    old_reported = [fencing.Reported(d, 0, 10, "running", "http://n1", "")]
    assert fence_on_b("n1", old_reported).stops == ()  # still draining: left running
    wall.now += timedelta(seconds=31)  # A died before stopping it: past its drain time B's fence stops it
    assert [s.generation for s in fence_on_b("n1", old_reported).stops] == [10]
    # a retry backoff stored by A holds B's reconciler back until it is due
    row = await a.row(d)
    assert row is not None
    failed = row.node_assignments[0] | {"status": "failed"}
    row.node_assignments = [failed]
    backoff = decide.backoff(view_of(row), 0, wall.now)
    assert backoff is not None
    await a.commit(row, backoff)
    view = replace(view_of(await _stored(b, d)), status=DeploymentStatus.RUNNING)
    facts = {"n2": decide.NodeFact(connected=True)}
    assert decide.reconcile(view, now=wall.now, inflight=(), nodes=facts).retry == ()
    due = wall.now + timedelta(seconds=1)
    assert decide.reconcile(view, now=due, inflight=(), nodes=facts).retry == (0,)


async def test_a_stopping_controller_gives_its_leases_back(world: tuple[Harness, Harness, Wall]) -> None:
    a, b, _ = world
    ids = [
        await _deployment(a.store, DeploymentStatus.RUNNING, [Replica(0, "n1", 10, ReplicaStatus.RUNNING)])
        if i == 0
        else await _other_deployment(a.store, f"web{i}")
        for i in range(3)
    ]
    for d in ids[:2]:
        assert await a.leases.acquire(d)
    for d in ids:  # B read them while A held two
        assert await b.row(d) is not None
    await a.leases.give_back_all()  # SIGTERM: A's tasks were cancelled
    assert a.leases.held == {}
    assert [(await _stored(b, d)).lease_owner for d in ids] == [None, None, None]
    for d in ids:  # at once, and B's older copies are not written back over the store's
        assert await b.leases.acquire(d)
    assert [(await _stored(a, d)).lease_owner for d in ids] == ["B", "B", "B"]


async def _other_deployment(store: Store, name: str) -> str:
    user = await UserRepository(store).get_by_email("alice@example.com")
    assert user is not None
    row = Deployment(
        user_id=user.id,
        name=name,
        app_type="backend",
        status="running",
        manifest={
            "generation": 1,
            "version": 1,
            "resources": {"cpu_cores": 0.5, "memory_mb": 256, "disk_mb": 1},
        },
        desired_replicas=0,
        created_at=T0,
        updated_at=T0,
    )
    async with store.session() as session:
        session.add(row)
    return row.id


async def test_a_users_call_waits_for_the_lease_another_controller_gives_back(
    world: tuple[Harness, Harness, Wall],
) -> None:
    a, b, _ = world
    d = await _deployment(a.store, DeploymentStatus.RUNNING, [Replica(0, "n1", 10, ReplicaStatus.RUNNING)])
    a_holds, b_got = asyncio.Event(), asyncio.Event()
    release = asyncio.Event()

    async def a_works() -> None:
        async with a.leases.working_on(d) as leased:
            assert leased
            a_holds.set()
            await release.wait()

    async def b_waits() -> bool:
        async with b.leases.working_on(d, wait=True) as leased:
            b_got.set()
            return leased

    a_task = asyncio.create_task(a_works())
    await a_holds.wait()
    b_task = asyncio.create_task(b_waits())
    assert not b_got.is_set()
    release.set()  # A's work ends: the lease is given back, B's next try takes it
    await a_task
    assert await b_task
    await _settled(b)
    assert (await _stored(a, d)).lease_owner is None  # B gave it back in turn
