"""Two controllers on one store (SQLite and PostgreSQL): each one's index of deployments
follows what the other creates, changes and deletes (``Recovery.sync``, run every pass by
every controller, whoever holds the reconciler's lease). The index is what placement
reserves, what the fence recognises on a controller's nodes and what its ingress routes:
without it, a node held by one controller would have another's new deployment removed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from automator67.v1 import node_pb2

from controller.deployments.harness import Harness, set_replicas
from controller.deployments.harness_index import view_of
from controller.deployments.records import DeploymentStatus, Replica, ReplicaStatus
from controller.deployments.recovery import Recovery
from controller.deployments.repository import Conflict
from controller.deployments.rollout import Rollouts
from controller.errors import Aborted
from controller.nodes.health import NodeState
from controller.nodes.repository import NodeRepository
from controller.store.models import Deployment
from tests.integration.test_deployment_leases import T0, Wall, _deployment, _harness, _settled
from tests.support import migrated_store


@pytest.fixture
async def pair(store_url: str) -> AsyncIterator[tuple[Harness, Harness, Wall]]:
    async with migrated_store(store_url) as sa, migrated_store(store_url) as sb:
        wall = Wall()
        a, b = _harness(sa, "A", wall), _harness(sb, "B", wall)
        try:
            yield a, b, wall
        finally:
            for h in (a, b):
                h.closing = True
                await _settled(h)
                h.fleet.monitor.stop()


async def test_the_index_follows_another_controllers_deployments(pair: tuple[Harness, Harness, Wall]) -> None:
    a, b, wall = pair
    sync_b = Recovery(b, Rollouts(b)).sync
    d = await _deployment(a.store, DeploymentStatus.RUNNING, [Replica(0, "n1", 10, ReplicaStatus.RUNNING)])
    await sync_b()
    assert b.index[d].assignments[0].node_id == "n1"
    assert b.names[(b.index[d].user_id, "web")] == d
    # A moves the replica: B's index follows
    wall.now = T0 + timedelta(seconds=1)
    row = await a.repo.get(d)
    assert row is not None
    set_replicas(row, [Replica(0, "n2", 11, ReplicaStatus.RUNNING)])
    await a.save(row)
    await sync_b()
    assert b.index[d].assignments[0].node_id == "n2"
    assert b.index[d].assignments[0].generation == 11
    # A deletes it: first stopping (status STOPPED), then the row goes
    row = await a.repo.get(d)
    assert row is not None
    row.status = DeploymentStatus.STOPPED.value
    await a.save(row)
    await sync_b()
    assert d not in b.index
    await a.repo.delete(d)
    await sync_b()
    assert d not in b.index
    assert d not in b.rows


async def test_a_row_deleted_elsewhere_is_forgotten(pair: tuple[Harness, Harness, Wall]) -> None:
    a, b, _ = pair
    sync_b = Recovery(b, Rollouts(b)).sync
    d = await _deployment(a.store, DeploymentStatus.RUNNING, [Replica(0, "n1", 10, ReplicaStatus.RUNNING)])
    await sync_b()
    assert d in b.index
    await a.repo.delete(d)  # straight away (as a controller killed between the two steps would not)
    await sync_b()
    assert d not in b.index


async def test_a_deployment_indexed_here_before_its_row_is_listed_is_kept(
    pair: tuple[Harness, Harness, Wall],
) -> None:
    """A create indexes the deployment before its (batched) insert commits: a sync that
    lists the store in between must not take it for deleted."""
    _, b, _ = pair
    sync_b = Recovery(b, Rollouts(b)).sync
    await sync_b()
    row = Deployment(
        id="d-new",
        user_id="u1",
        name="new",
        app_type="backend",
        status=DeploymentStatus.DEPLOYING.value,
        manifest={
            "generation": 1,
            "version": 1,
            "resources": {"cpu_cores": 0.1, "memory_mb": 64, "disk_mb": 10},
        },
        desired_replicas=1,
        created_at=T0,
        updated_at=T0,
    )
    set_replicas(row, [Replica(0, "", 0, ReplicaStatus.PENDING)])
    b.remember(row)
    await sync_b()
    assert "d-new" in b.index


async def test_the_reconciler_sees_nodes_another_controller_watches_as_connected(
    pair: tuple[Harness, Harness, Wall],
) -> None:
    """A node whose stream a live peer holds is known to the reconciler by its stored state
    and as connected (through that peer); once the peer is gone, it is neither."""
    a, _, _ = pair
    d = await _deployment(a.store, DeploymentStatus.RUNNING, [Replica(0, "n1", 10, ReplicaStatus.STARTING)])
    row = await a.repo.get(d)
    assert row is not None
    await NodeRepository(a.store).create(
        user_id=row.user_id,
        provider="test",
        endpoint="http://n1",
        region="eu",
        capabilities={},
        node_id="n1",
        status="ready",
    )
    await NodeRepository(a.store).record_stream_holders("B", ["n1"])
    a.fleet.holder_id = "A"
    a.fleet.live_peers = frozenset({"B"})
    recovery = Recovery(a, Rollouts(a))
    await recovery.sync()
    await recovery._load_remote()
    fact = recovery._facts({"n1"})["n1"]
    assert (fact.state, fact.connected, fact.recovery_due) == (NodeState.READY, True, False)
    a.fleet.live_peers = frozenset()  # B is gone
    await recovery._load_remote()
    fact = recovery._facts({"n1"})["n1"]
    assert (fact.state, fact.connected) == (None, False)


async def test_a_replica_another_controller_just_started_is_not_taken_for_a_deleted_ones(
    pair: tuple[Harness, Harness, Wall],
) -> None:
    """A node held here reports a replica of a deployment another controller created since
    this one's last pass: the fence reads it from the store instead of removing it."""
    a, _, _ = pair
    a.loaded = True
    d = await _deployment(a.store, DeploymentStatus.DEPLOYING, [Replica(0, "n1", 1, ReplicaStatus.STARTING)])
    assert d not in a.index
    reported = node_pb2.ReplicaState(deployment_id=d, replica_index=0, generation=1, status="running")
    await Recovery(a, Rollouts(a)).on_replicas_reported("n1", [reported], complete=False)
    assert d in a.index
    assert not a.tasks  # no RemoveDeployment or StopReplica sent
    # a deployment that is really gone still is removed from the node
    gone = node_pb2.ReplicaState(deployment_id="d-deleted", replica_index=0, generation=1, status="running")
    await Recovery(a, Rollouts(a)).on_replicas_reported("n1", [gone], complete=False)
    assert len(a.tasks) == 1


async def test_a_users_call_on_a_stale_copy_decides_again_on_a_fresh_read(
    pair: tuple[Harness, Harness, Wall],
) -> None:
    a, b, wall = pair
    d = await _deployment(a.store, DeploymentStatus.RUNNING, [Replica(0, "n1", 10, ReplicaStatus.RUNNING)])
    async with b.locks[d]:
        assert await b.row(d) is not None  # B keeps a copy of the row
    wall.now = T0 + timedelta(seconds=1)
    row = await a.repo.get(d)
    assert row is not None
    set_replicas(row, [Replica(0, "n2", 11, ReplicaStatus.RUNNING)])
    await a.save(row)  # A moves the replica: B's copy is stale
    wall.now = T0 + timedelta(seconds=2)
    seen: list[str] = []

    async def scale_up() -> Deployment:  # what a user's call on B does: read, decide, write
        async with b.locks[d]:
            fresh = await b.row(d)
            assert fresh is not None
            seen.append(view_of(fresh).replicas[0].node_id)
            fresh.status = DeploymentStatus.SCALING.value
            await b.save(fresh)
            return fresh

    await b.fresh_on_conflict(scale_up)
    assert seen == ["n1", "n2"]  # decided on the stale copy, refused, decided again on the store's
    stored = await a.repo.get(d)
    assert stored is not None
    assert stored.status == DeploymentStatus.SCALING.value
    assert view_of(stored).replicas[0].node_id == "n2"  # A's change kept

    async def always_stale() -> None:
        raise Conflict(f"deployment {d} changed in the store meanwhile")

    with pytest.raises(Aborted) as refused:
        await b.fresh_on_conflict(always_stale)
    assert refused.value.reason == "DEPLOYMENT_CHANGED"
