"""Operations made visible (issue 11): stored alerts, lifting a freeze, undraining a node.

A real controller with fake nodes on mutual-TLS streams (test_deployments.py's World).
"""

from __future__ import annotations

import dataclasses

import grpc
import pytest
from automator67.v1 import common_pb2, deployment_pb2, node_pb2, node_pb2_grpc

from tests.integration.test_deployments import (
    World,
    _until,
    _violations,
    controller,  # noqa: F401 - fixture
    manifest,
    world,  # noqa: F401 - fixture
)
from tests.integration.test_node_api import _user
from tests.support import bearer


def _nodes(w: World) -> node_pb2_grpc.NodeServiceStub:
    return node_pb2_grpc.NodeServiceStub(w.channel)


async def _alerts(w: World, token: str | None = None, **request: object) -> node_pb2.ListAlertsResponse:
    return await _nodes(w).ListAlerts(
        node_pb2.ListAlertsRequest(**request),  # type: ignore[arg-type]
        metadata=bearer(token or w.token),
    )


async def test_a_mass_failure_is_stored_listed_and_lifted_by_the_user(world: World) -> None:  # noqa: F811
    # The three failures must fall within the mass-failure window (1.5 intervals: 0.3 s at
    # this test's 0.2 s heartbeats); on a loaded machine their detection can spread wider,
    # and then they are three separate failures, not a mass failure. This test is about
    # what follows a mass failure, so its window is wide.
    fleet = world.controller.fleet
    fleet.monitor_config = dataclasses.replace(fleet.monitor_config, mass_failure_window_seconds=5.0)
    fleet.monitor.config = fleet.monitor_config
    agents = await world.add_agents("eu-west", "us-east", "ap-south", "sa-east", "af-south")
    deployment_id = await world.create(manifest(replicas=3))
    deployment = await world.wait_status(deployment_id, deployment_pb2.DEPLOYMENT_STATUS_RUNNING, 3)
    hosting = {a.node_id for a in deployment.node_assignments}
    for victim in [a for a in agents if a.node_id in hosting]:
        await victim.kill()

    async def frozen_alert() -> bool:
        return any(a.kind == "mass_failure" and a.active for a in (await _alerts(world)).alerts)

    await _until(frozen_alert, "a stored, active mass-failure alert")
    alert = (await _alerts(world)).alerts[0]
    assert "mass failure: 3 of 5 nodes failed" in alert.message
    assert alert.created_at.seconds > 0
    assert not alert.HasField("resolved_at")
    # Another user sees none of it.
    async with grpc.aio.insecure_channel(world.controller.address) as other:
        stranger = await _user(other, email="grace@example.com")
        assert not (await _alerts(world, stranger)).alerts
        unfrozen = await _nodes(world).UnfreezeRecovery(
            node_pb2.UnfreezeRecoveryRequest(), metadata=bearer(stranger)
        )
        assert not unfrozen.was_frozen  # the stranger's call lifts nothing of ada's
    assert world.controller.fleet.monitor.frozen_users

    unfrozen = await _nodes(world).UnfreezeRecovery(
        node_pb2.UnfreezeRecoveryRequest(), metadata=bearer(world.token)
    )
    assert unfrozen.was_frozen
    assert set(unfrozen.recovering_node_ids) == hosting
    survivors = {a.node_id for a in agents if a.node_id not in hosting}

    async def moved() -> bool:
        d = await world.get(deployment_id)
        running = [a for a in d.node_assignments if a.status == "running"]
        # Three replicas on two nodes: the third shares a node (a last resort, not a failure).
        return d.current_replicas == 3 and {a.node_id for a in running} == survivors

    await _until(moved, "the replicas re-placed on the two healthy nodes after the freeze was lifted")
    alert = (await _alerts(world)).alerts[0]
    assert alert.HasField("resolved_at")
    assert not alert.active
    again = await _nodes(world).UnfreezeRecovery(
        node_pb2.UnfreezeRecoveryRequest(), metadata=bearer(world.token)
    )
    assert not again.was_frozen
    assert not again.recovering_node_ids


async def test_a_failed_rollout_raises_an_alert_and_alerts_page(world: World) -> None:  # noqa: F811
    agents = await world.add_agents("eu-west", "us-east")
    for agent in agents:
        agent.fail_deploys = True
    ids = []
    for name in ("one", "two", "three"):
        ids.append(await world.create(manifest(name=name, replicas=1)))
        await world.wait_status(ids[-1], deployment_pb2.DEPLOYMENT_STATUS_FAILED)

    async def three() -> bool:
        return len((await _alerts(world)).alerts) == 3

    await _until(three, "three stored alerts")
    listed = await _alerts(world)
    assert [(a.kind, a.deployment_id) for a in listed.alerts] == [("rollout_failed", i) for i in ids]
    assert "app crashed" in listed.alerts[0].message
    assert not listed.alerts[0].active
    first = await _alerts(world, page_size=2)
    assert len(first.alerts) == 2
    assert first.next_page_token
    second = await _alerts(world, page_size=2, page_token=first.next_page_token)
    assert [a.id for a in [*first.alerts, *second.alerts]] == [a.id for a in listed.alerts]
    assert not second.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _alerts(world, page_size=-1)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_size" in _violations(caught.value)


async def test_a_drained_node_can_be_undrained(world: World) -> None:  # noqa: F811
    (agent,) = await world.add_agents("eu-west")
    stub = _nodes(world)
    drained = await stub.DrainNode(
        node_pb2.DrainNodeRequest(node_id=agent.node_id), metadata=bearer(world.token)
    )
    assert drained.node.status == common_pb2.NODE_STATUS_DRAINING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await world.create(manifest(name="blocked", replicas=1))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "node is draining" in (caught.value.details() or "")

    undrained = await stub.UndrainNode(
        node_pb2.UndrainNodeRequest(node_id=agent.node_id), metadata=bearer(world.token)
    )
    assert undrained.node.status == common_pb2.NODE_STATUS_READY
    # Heartbeats keep it ready (no longer draining), and it takes replicas again.
    await agent.ready()
    deployment_id = await world.create(manifest(name="placed", replicas=1))
    await world.wait_status(deployment_id, deployment_pb2.DEPLOYMENT_STATUS_RUNNING, 1)
    # Undraining a node that is not draining returns it as it is; another user's is NOT_FOUND.
    same = await stub.UndrainNode(
        node_pb2.UndrainNodeRequest(node_id=agent.node_id), metadata=bearer(world.token)
    )
    assert same.node.status == common_pb2.NODE_STATUS_READY
    async with grpc.aio.insecure_channel(world.controller.address) as other:
        stranger = await _user(other, email="grace@example.com")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.UndrainNode(
                node_pb2.UndrainNodeRequest(node_id=agent.node_id), metadata=bearer(stranger)
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
