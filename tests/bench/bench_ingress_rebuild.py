"""Ingress route rebuild: the CPU one deployment change costs, full rebuild vs incremental.

    .venv/bin/python tests/bench/bench_ingress_rebuild.py [--sizes 1000,5000] [--rounds 10] [--new-per-round 10]

What :meth:`controller.ingress.service.IngressService.refresh` does after collecting the
routes: build the snapshot and ``XdsServer.publish`` it (digests of every type; no Envoy
connected). For each size N, N deployments (one replica each) are routed, then one
deployment changes per rebuild, in two ways:

* ``replica``: one deployment's replica moves to another port (its endpoints change);
* ``create``: a new deployment appears and the one created before it goes (what a burst
  of CreateDeployment looks like to the ingress: the route configuration changes).

``old`` is :func:`build_snapshot` (every cluster, load assignment and route of every
deployment, from JSON via ``ParseDict``) into its own ``XdsServer``; ``new`` is
:class:`SnapshotBuilder` (only what changed) into another. They alternate in rounds
(which one goes first alternates too) so drift on a shared machine hits both; ``new``
runs ``--new-per-round`` rebuilds per round (it is cheap), ``old`` one. Figures are CPU
time per rebuild (``time.process_time``), nearest-rank percentiles (tests/bench/stats.py).
Every round checks that both servers publish the same content for the same routes (digests).

Not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from automator67.v1 import common_pb2  # noqa: F401  (the generated package must import first)

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
from tests.bench.stats import describe, percentile


def _app(index: int, port: int = 20000) -> AppRoute:
    deployment_id = f"{index:08x}-0000-4000-8000-{index:012x}"
    return AppRoute(
        deployment_id,
        f"app{index}",
        "ada-3f2a1c9e",
        (Endpoint(f"10.0.{index // 250 % 250}.{index % 250 + 1}", port, 50, f"node-{index % 997}", 0),),
    )


class _Routes:
    """N deployments and the next single change of a kind."""

    def __init__(self, size: int) -> None:
        self.apps = {a.deployment_id: a for a in (_app(i) for i in range(size))}
        self.size = size
        self.step = 0
        self.created: str | None = None

    def change(self, kind: str) -> tuple[AppRoute, ...]:
        self.step += 1
        if kind == "replica":
            app = _app(self.step * 7919 % self.size, 20000 + self.step % 1000 + 1)
            self.apps[app.deployment_id] = app
        else:
            if self.created is not None:
                del self.apps[self.created]
            app = _app(self.size + self.step)
            self.apps[app.deployment_id] = app
            self.created = app.deployment_id
        return tuple(sorted(self.apps.values(), key=lambda a: a.deployment_id))


def _timed(publish: Callable[[Snapshot], object], build: Callable[[], Snapshot]) -> float:
    """CPU time of building a snapshot and publishing it, in ms."""
    started = time.process_time()
    publish(build())
    return (time.process_time() - started) * 1000


def run(
    size: int, kind: str, rounds: int, new_per_round: int, options: IngressOptions
) -> tuple[list[float], list[float]]:
    routes = _Routes(size)
    old_server, new_server = XdsServer(options), XdsServer(options)
    builder = SnapshotBuilder(options)
    current = routes.change(kind)
    old_server.publish(build_snapshot(current, options))
    new_server.publish(builder.build(current))
    old_ms: list[float] = []
    new_ms: list[float] = []

    def old() -> None:
        nonlocal current
        current = now = routes.change(kind)
        old_ms.append(_timed(old_server.publish, lambda: build_snapshot(now, options)))
        new_server.publish(builder.build(current))  # (untimed) the same routes on both sides
        for t in (CLUSTER, ENDPOINT, ROUTE):
            assert old_server._snapshot.digest(t) == new_server._snapshot.digest(t), (size, kind, t)

    def new() -> None:
        nonlocal current
        for _ in range(new_per_round):
            current = routes.change(kind)
            new_ms.append(_timed(new_server.publish, partial(builder.build, current)))

    for round_ in range(rounds):
        for step in (old, new) if round_ % 2 == 0 else (new, old):
            step()
    return old_ms, new_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,5000", help="deployment counts (default 1000,5000)")
    parser.add_argument("--kinds", default="replica,create", help="changes (default replica,create)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds per size and kind (default 10)")
    parser.add_argument(
        "--new-per-round", type=int, default=10, help="incremental rebuilds per round (default 10)"
    )
    args = parser.parse_args()
    options = IngressOptions()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for size in (int(s) for s in args.sizes.split(",")):
        for kind in args.kinds.split(","):
            old_ms, new_ms = run(size, kind, args.rounds, args.new_per_round, options)
            ratio = percentile(old_ms, 50) / percentile(new_ms, 50)
            print(f"{size:>6} deployments, {kind:<7} old (full):        {describe(old_ms, 'ms CPU', 2)}")
            print(f"{size:>6} deployments, {kind:<7} new (incremental): {describe(new_ms, 'ms CPU', 2)}")
            print(f"{size:>6} deployments, {kind:<7} p50 old / new: {ratio:.0f}x")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
