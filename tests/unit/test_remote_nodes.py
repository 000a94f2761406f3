"""Nodes whose stream another live controller holds (scale-out), as this controller's
placement and reconciler see them: connected there, with the state and metrics their
watcher stored; once that controller is gone, not connected anywhere."""

from __future__ import annotations

from typing import Any, cast

from controller.cache.memory import MemoryCache
from controller.deployments.snapshot import node_view
from controller.nodes import HealthConfig
from controller.nodes.fleet import Fleet
from controller.nodes.health import NodeState
from controller.scheduling import Resources
from controller.store.models import Node


def _fleet(peers: frozenset[str]) -> Fleet:
    fleet = Fleet(nodes=cast(Any, None), cache=MemoryCache(), health_config=HealthConfig.fast(1.0))
    fleet.holder_id = "A"
    fleet.live_peers = peers
    return fleet


def _node(holder: str | None) -> Node:
    return Node(
        id="n1",
        user_id="u1",
        provider="test",
        endpoint="http://n1",
        region="eu",
        status="ready",
        capabilities={"cpu_cores": 2, "memory_gb": 4, "disk_gb": 20},
        metrics_current={
            "cpu_percent": 42.0,
            "memory_percent": 10.0,
            "disk_percent": 5.0,
            "active_requests": 3,
        },
        stream_holder=holder,
    )


def test_a_node_held_by_a_live_peer_is_placeable_with_its_stored_metrics() -> None:
    view = node_view(_node("B"), _fleet(frozenset({"B"})), Resources())
    assert view.state is NodeState.READY
    assert view.metrics is not None
    assert (view.metrics.cpu_percent, view.metrics.active_requests) == (42.0, 3)


def test_a_node_whose_controller_is_gone_or_that_no_one_holds_is_suspect_here() -> None:
    for holder, peers in (("B", frozenset()), (None, frozenset({"B"})), ("A", frozenset({"B"}))):
        view = node_view(_node(holder), _fleet(peers), Resources())
        assert view.state is NodeState.SUSPECT, (holder, peers)
        assert view.metrics is None
