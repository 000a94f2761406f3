#!/usr/bin/env python3
"""Failover of node streams between controllers (scale-out): a controller killed with
SIGKILL, and how long until each of its nodes is connected to the other one.

    .venv/bin/python tests/bench/bench_failover.py [--runs 20] [--agents 5] [--interval 1]

Starts the topology of scripts/scale_out.py: two ``a67 serve`` processes
(``A67_SCALE_OUT=1``) on a fresh PostgreSQL database (``--postgres-admin-url``) and the
test Redis, with the same keys, and ``--agents`` real agent processes enrolled through
the first. Each run kills (SIGKILL) the controller holding the nodes' streams and
measures, per node, the time from the kill until the survivor accepts the node's stream
(the agent's log line, to the millisecond; its first heartbeat follows at once); then it
starts the killed controller again (same data directory, so same id), waits until it
serves and ``--settle`` seconds more (the nodes' streams up long enough that their
reconnect backoff starts again from its base, as in a fleet that was stable). The next
run kills the other one. Reports p50/p99 (or "max of N") over every node of every run,
and each run's slowest node. (Not from the store: the survivor adopts a killed
controller's nodes as soon as it sees the process gone, before they reconnect.)

What a node does meanwhile: its stream breaks; it dials its controller again after its
reconnect backoff (refused: the process is gone), then the next controller the hello's
answer listed, at the base delay; the survivor records the stream and the first
heartbeat makes the node ready.

Loopback only; not a test (pytest does not collect it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from scale_out import Topology  # noqa: E402

from tests.bench.stats import describe, percentile  # noqa: E402


def _connected_after(log: Path, node_address: str, after: float) -> float | None:
    """When the agent's log says it connected to ``node_address`` after ``after`` (epoch s)."""
    marker = f"connected to {node_address} as node"
    for line in log.read_text(errors="replace").splitlines():
        if marker in line:
            at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()  # the agent's local time
            if at > after:
                return at
    return None


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="a67-bench-failover-"))
    topology = Topology(
        root,
        controllers=2,
        postgres_admin_url=args.postgres_admin_url,
        redis_url=args.redis,
        heartbeat_interval_seconds=args.interval,
    )
    controllers = topology.controllers
    samples: list[float] = []
    slowest: list[float] = []
    finished = False
    try:
        await topology.start()
        token = await topology.enrollment(args.agents)
        for _ in range(args.agents):
            topology.add_agent(token)
        while True:  # every agent ready (or busy)
            listed = await asyncio.to_thread(topology.cli, "nodes", "--json")
            nodes = json.loads(listed.stdout).get("nodes", []) if listed.returncode == 0 else []
            if (
                sum(n.get("status") in ("NODE_STATUS_READY", "NODE_STATUS_BUSY") for n in nodes)
                == args.agents
            ):
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(args.settle)  # the controllers list each other (refreshed every 5 s)
        ids = {c.name: c.controller_id for c in controllers}
        with psycopg.connect(topology.plain_url, autocommit=True) as db:

            def held_by() -> dict[str, int]:
                rows = db.execute(
                    "SELECT stream_holder, count(*) FROM nodes GROUP BY stream_holder"
                ).fetchall()
                return {str(h): int(n) for h, n in rows}

            for run in range(args.runs):
                victim = max(controllers, key=lambda c: held_by().get(ids[c.name], 0))
                survivor = next(c for c in controllers if c is not victim)
                if held_by().get(ids[victim.name], 0) != args.agents:
                    raise RuntimeError(f"run {run}: the nodes are not all on one controller: {held_by()}")
                killed_at = time.time()
                victim.kill()
                connected_at: dict[int, float] = {}
                deadline = time.monotonic() + 120
                while len(connected_at) < args.agents:
                    for i in range(args.agents):
                        if i not in connected_at:
                            at = _connected_after(root / f"agent-{i}.log", survivor.node_address, killed_at)
                            if at is not None:
                                connected_at[i] = at
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"run {run}: only {len(connected_at)} nodes reached {survivor.name}"
                        )
                    await asyncio.sleep(0.05)
                times = [(t - killed_at) * 1000 for t in connected_at.values()]
                samples.extend(times)
                slowest.append(max(times))
                print(
                    f"run {run + 1:2d}: killed {victim.name}, {args.agents} nodes reconnected to {survivor.name}: {describe(times)}"
                )
                victim.start()
                await victim.serving()
                # settled: the restarted controller's row refreshed, the nodes' streams up long
                # enough for their reconnect backoff to start again from its base
                await asyncio.sleep(args.settle)
        print(f"\nevery node of every run: {describe(samples)}")
        print(
            f"slowest node per run:     p50 {percentile(slowest, 50):.0f} ms, max of {len(slowest)} {max(slowest):.0f} ms"
        )
        finished = True
    finally:
        topology.stop()
        if finished:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"logs kept in {root}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--agents", type=int, default=5)
    parser.add_argument("--interval", type=float, default=1.0, help="heartbeat interval, s")
    parser.add_argument("--settle", type=float, default=6.0, help="pause between runs, s")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--postgres-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    asyncio.run(main(parser.parse_args()))
