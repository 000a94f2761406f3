"""The incremental snapshot builder makes, byte for byte, what a full rebuild makes."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from automator67.v1 import common_pb2  # noqa: F401  (the generated package must import first)
from google.protobuf import any_pb2

from controller.ingress.service import IngressService
from controller.ingress.snapshot import (
    CLUSTER,
    ENDPOINT,
    ROUTE,
    AppRoute,
    Endpoint,
    IngressOptions,
    Snapshot,
    SnapshotBuilder,
    build_snapshot,
)
from controller.ingress.xds import XdsServer

SHARED = (CLUSTER, ENDPOINT, ROUTE)


def _wire(snapshot: Snapshot) -> dict[str, list[tuple[str, bytes]]]:
    """Every resource as it goes on the wire, in the snapshot's order."""
    return {t: [(n, e.data) for n, e in snapshot.encoded(t).items()] for t in SHARED}


def _endpoints(rng: random.Random) -> tuple[Endpoint, ...]:
    return tuple(
        Endpoint(
            rng.choice(["127.0.0.1", "10.0.0.7", "::1"]),
            rng.randrange(20000, 20010),
            rng.choice([0, 1, 5, 50, 100]),
            rng.choice(["", "node-1", "node-2", "node-3"]),
            index,
        )
        for index in range(rng.randrange(4))
    )


def _change(rng: random.Random, apps: dict[str, AppRoute]) -> None:
    """One random change: add, delete, rename, move a replica, or touch nothing."""
    kind = rng.choice(["add", "add", "delete", "name", "handle", "endpoints", "endpoints", "same"])
    if kind == "add" or not apps:
        deployment_id = f"dep-{rng.randrange(24):02d}"
        apps[deployment_id] = AppRoute(deployment_id, rng.choice(["web", "api"]), "ada-1234", _endpoints(rng))
        return
    deployment_id = rng.choice(sorted(apps))
    app = apps[deployment_id]
    if kind == "delete":
        del apps[deployment_id]
    elif kind == "name":
        apps[deployment_id] = AppRoute(deployment_id, f"app{rng.randrange(3)}", app.handle, app.endpoints)
    elif kind == "handle":
        apps[deployment_id] = AppRoute(deployment_id, app.name, f"bob-{rng.randrange(3)}", app.endpoints)
    elif kind == "endpoints":
        apps[deployment_id] = AppRoute(deployment_id, app.name, app.handle, _endpoints(rng))
    else:  # an equal route, a new object
        apps[deployment_id] = AppRoute(app.deployment_id, app.name, app.handle, tuple(app.endpoints))


@pytest.mark.parametrize("seed", range(8))
def test_incremental_snapshots_equal_full_rebuilds(seed: int) -> None:
    rng = random.Random(seed)
    options = IngressOptions(
        apps_domain=rng.choice(["apps.localhost", "apps.example.com"]),
        retries=rng.randrange(4),
        connect_timeout_seconds=rng.choice([0.25, 1.0]),
    )
    builder = SnapshotBuilder(options)
    apps: dict[str, AppRoute] = {}
    for _ in range(40):
        for _ in range(rng.randrange(1, 4)):
            _change(rng, apps)
        routes = list(apps.values())
        rng.shuffle(routes)  # the builder sorts, like build_snapshot
        incremental = builder.build(routes)
        fresh = build_snapshot(routes, options)
        assert _wire(incremental) == _wire(fresh)
        for t in SHARED:
            assert incremental.digest(t) == fresh.digest(t)
            # what the xDS server sends (Any of the kept bytes) is what it packed before:
            # the same type URL and message (Any.Pack's own bytes order a map's entries by
            # the process's hash seed; the kept bytes are the deterministic order)
            for name, message in fresh.of(t).items():
                packed = any_pb2.Any()
                packed.Pack(message)
                assert packed.type_url == t
                sent = type(message).FromString(incremental.encoded(t)[name].data)
                assert sent == message
                unpacked = type(message)()
                assert packed.Unpack(unpacked)
                assert unpacked == sent


def test_unchanged_deployments_reuse_their_resources() -> None:
    options = IngressOptions()
    builder = SnapshotBuilder(options)
    apps = [AppRoute(f"d{i}", "web", "h", (Endpoint("127.0.0.1", 20000 + i, 50),)) for i in range(5)]
    first = builder.build(apps)
    moved = AppRoute("d2", "web", "h", (Endpoint("127.0.0.1", 30000, 50),))
    second = builder.build([*apps[:2], moved, *apps[3:]])
    for t in (CLUSTER, ENDPOINT):
        changed = {n for n in first.encoded(t) if first.encoded(t)[n] is not second.encoded(t)[n]}
        assert changed == (set() if t == CLUSTER else {"d2"})
    # only endpoints moved: the route configuration is the same object, not rebuilt
    assert first.encoded(ROUTE)["a67_apps"] is second.encoded(ROUTE)["a67_apps"]
    assert builder.build([*apps[:2], moved, *apps[3:]]).encoded(ROUTE) == second.encoded(ROUTE)
    # messages are available too (parsed from the bytes on demand)
    assert [vh.name for vh in second.of(ROUTE)["a67_apps"].virtual_hosts][-1] == "default"  # type: ignore[attr-defined]


def test_the_xds_server_sees_no_change_between_equal_snapshots() -> None:
    options = IngressOptions()
    apps = [AppRoute("d1", "web", "h", (Endpoint("127.0.0.1", 20000, 50),)), AppRoute("d2", "api", "h")]
    server = XdsServer(options)
    assert server.publish(build_snapshot(apps, options))
    assert not server.publish(SnapshotBuilder(options).build(apps))
    assert server.version == 1


def _row(name: str, user_id: str, port: int) -> Any:
    return SimpleNamespace(
        name=name,
        user_id=user_id,
        status="running",
        node_assignments=[
            {"replica_index": 0, "node_id": "n1", "status": "running", "endpoint": f"http://127.0.0.1:{port}"}
        ],
    )


class _Users:
    """Users as the store gives them: ``asked``, every id looked up; ``down``, the store away."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.down = False

    async def get(self, user_id: str) -> Any:
        if self.down:
            raise RuntimeError("the store is unavailable")
        self.asked.append(user_id)
        return SimpleNamespace(email=f"{user_id}@example.com")


def _service(users: _Users, fleet: Any = None, clock: Callable[[], float] = time.monotonic) -> IngressService:
    return IngressService(
        fleet=fleet or SimpleNamespace(live={}, streams={}, state_of=lambda node_id: None),
        users=users,  # type: ignore[arg-type]
        listen_address="127.0.0.1:0",
        options=IngressOptions(),
        clock=clock,
    )


async def test_the_service_asks_for_each_user_once_and_publishes_only_changes() -> None:

    users = _Users()
    asked = users.asked
    service = _service(users)
    for i in range(6):
        service.deployment_changed(f"d{i}", _row(f"app{i}", f"user{i % 2}", 20000 + i))
    assert await service.refresh()
    assert sorted(asked) == ["user0", "user1"]
    first = await service.current_routes()
    assert not await service.refresh()  # nothing changed: no new version
    version = service.xds.version

    service.deployment_changed("d3", _row("app3", "user1", 30000))
    assert await service.refresh()
    assert service.xds.version == version + 1
    second = await service.current_routes()
    # the unchanged deployments' routes are the very same objects
    assert [a is b for a, b in zip(first, second, strict=True)] == [True, True, True, False, True, True]
    fresh = build_snapshot(second, service.options)
    assert _wire(service.xds._snapshot) == _wire(fresh)
    assert sorted(asked) == ["user0", "user1"]


def _metrics(cpu: float) -> Any:
    return SimpleNamespace(
        metrics=SimpleNamespace(cpu_percent=cpu, memory_percent=10.0, active_requests=0),
        capabilities=SimpleNamespace(max_concurrent_requests=100),
    )


async def test_a_pass_rebuilds_only_what_a_row_node_state_or_weight_changed() -> None:
    from controller.nodes.health import NodeState

    now = [0.0]
    states = {"n1": NodeState.READY, "n2": NodeState.READY}
    fleet = SimpleNamespace(live={"n1": _metrics(5.0), "n2": _metrics(5.0)}, streams={}, state_of=states.get)
    service = _service(_Users(), fleet, clock=lambda: now[0])
    for i, node in enumerate(["n1", "n2"]):
        row = _row(f"app{i}", "u", 20000 + i)
        row.node_assignments[0]["node_id"] = node
        service.deployment_changed(f"d{i}", row)
    first = await service.current_routes()
    assert [[e.weight for e in r.endpoints] for r in first] == [[85], [85]]
    assert await service.current_routes() is first  # nothing changed: the same tuple

    states["n1"] = NodeState.SUSPECT  # looked at on every pass
    second = await service.current_routes()
    assert second[0].endpoints == ()
    assert second[1] is first[1]
    states["n1"] = NodeState.READY
    assert [len(r.endpoints) for r in await service.current_routes()] == [1, 1]

    fleet.live["n2"] = _metrics(95.0)  # a weight moves at most every WEIGHT_SECONDS
    assert [e.weight for e in (await service.current_routes())[1].endpoints] == [85]
    now[0] += 1.0
    third = await service.current_routes()
    assert [e.weight for e in third[1].endpoints] == [60]
    assert third[0].endpoints[0].weight == 85

    service.deployment_changed("d1", None)  # gone: its route and its node with it
    assert [r.deployment_id for r in await service.current_routes()] == ["d0"]
    assert "n2" not in service._on_node
    assert "n2" not in service._node_seen


async def test_a_pass_that_fails_leaves_its_deployments_for_the_next() -> None:
    users = _Users()
    users.down = True
    service = _service(users)
    service.deployment_changed("d0", _row("app0", "u0", 20000))
    with pytest.raises(RuntimeError):
        await service.refresh()
    users.down = False
    assert await service.refresh()  # built on the next pass, not lost
    assert [r.deployment_id for r in await service.current_routes()] == ["d0"]
