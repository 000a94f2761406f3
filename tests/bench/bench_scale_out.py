#!/usr/bin/env python3
"""Throughput with one and with two controllers on one PostgreSQL and one Redis, side by side.

    .venv/bin/python tests/bench/bench_scale_out.py [--seconds 8] [--procs 4] [--inflight 2] [--rounds 2]

Each round starts two topologies, one after the other (scripts/scale_out.py's ``Topology``:
a fresh PostgreSQL database, ``A67_SCALE_OUT=1`` in both, so both pay the same
coordination), of 1 and of 2 controllers — in alternating order from round to round, so
neither always runs first. In each: a user, two real agents (database nodes, enrolled and
connected to the first controller), bench_hot_paths.py's 4-shard database of 20,000 rows;
then ``--procs`` client processes with ``--inflight`` calls each, spread over the
controllers (client i talks to controller i mod n), closed loop for ``--seconds``:

* ``me``: ``AuthService/GetCurrentUser`` (token check, session and user from memory);
* ``point``: a point SELECT on one shard through the agents, every answer checked. With two
  controllers, the statements sent to the second are relayed to the first (which holds both
  agents' streams) over Redis; their rows come straight back to the second.

Reported per topology: calls/s, errors, latency p50/p99, and the CPU of all controllers
and of the agents per call. Heartbeats and CreateDeployment are not measured here (see
BENCHMARKS.md). Loopback only; not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from tests.bench import bench_hot_paths as hp  # noqa: E402
from tests.bench.stats import describe  # noqa: E402
from tests.support import scale_out_script  # noqa: E402


def measure(
    pool: multiprocessing.pool.Pool,
    rpc: str,
    addresses: list[str],
    token: str,
    args: argparse.Namespace,
    ctx: hp.QueryContext,
    controllers: list[psutil.Process],
    agents: list[psutil.Process],
) -> dict[str, Any]:
    barrier = hp._manager().Barrier(args.procs + 1)
    jobs = [
        (rpc, addresses[i % len(addresses)], token, args.inflight, barrier, args.seconds, ctx)
        for i in range(args.procs)
    ]
    pending = pool.starmap_async(hp._client_process, jobs)
    barrier.wait(120)

    def cpu(processes: list[psutil.Process]) -> float:
        return sum(p.cpu_times().user + p.cpu_times().system for p in processes)

    c0, a0 = cpu(controllers), cpu(agents)
    time.sleep(args.seconds)
    c1, a1 = cpu(controllers), cpu(agents)
    results = pending.get(timeout=args.seconds + 60)
    done = sum(r[0] for r in results)
    return {
        "rate": done / args.seconds,
        "errors": sum(r[1] for r in results),
        "latencies": [x for r in results for x in r[2]],
        "controllers_ms": (c1 - c0) * 1000 / done if done else float("nan"),
        "agents_ms": (a1 - a0) * 1000 / done if done else float("nan"),
    }


def run(n: int, args: argparse.Namespace, pool: multiprocessing.pool.Pool) -> dict[str, dict[str, Any]]:
    scale_out = scale_out_script()
    with tempfile.TemporaryDirectory(prefix=f"a67-bench-scale-out-{n}-") as tmp:
        root = Path(tmp)
        topology = scale_out.Topology(
            root, controllers=n, postgres_admin_url=args.postgres_admin_url, redis_url=args.redis
        )
        agents: list[subprocess.Popen[bytes]] = []
        try:
            asyncio.run(topology.start())
            first = topology.controllers[0].address
            token = hp.register(first)
            ctx = hp.setup_query(first, token, root, agents)
            controllers = [psutil.Process(c.process.pid) for c in topology.controllers]
            agent_ps = [psutil.Process(a.pid) for a in agents]
            addresses = [c.address for c in topology.controllers]
            out = {}
            for rpc in ("me", "point"):
                measure(
                    pool,
                    rpc,
                    addresses,
                    token,
                    argparse.Namespace(**{**vars(args), "seconds": 2.0}),
                    ctx,
                    controllers,
                    agent_ps,
                )  # fmt: skip  (a warm-up: connections, caches, plans)
                out[rpc] = measure(pool, rpc, addresses, token, args, ctx, controllers, agent_ps)
            return out
        finally:
            for agent in agents:
                agent.terminate()
            for agent in agents:
                try:
                    agent.wait(15)
                except subprocess.TimeoutExpired:
                    agent.kill()
            topology.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--procs", type=int, default=4, help="client processes (default 4)")
    parser.add_argument("--inflight", type=int, default=2, help="calls in flight per process (default 2)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--postgres-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    print(
        f"1 vs 2 controllers (A67_SCALE_OUT, PostgreSQL + Redis); {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; {args.procs} client processes x {args.inflight} in flight, "
        f"{args.seconds:g} s per RPC; load average {os.getloadavg()[0]:.2f} at start",
        flush=True,
    )
    context = multiprocessing.get_context("spawn")
    rows: list[tuple[int, int, dict[str, dict[str, Any]]]] = []
    with context.Pool(args.procs) as pool:
        for round_ in range(args.rounds):
            for n in (1, 2) if round_ % 2 == 0 else (2, 1):
                rows.append((round_ + 1, n, run(n, args, pool)))
                print(f"  round {round_ + 1}, {n} controller(s): done", flush=True)
    print()
    print(
        "| round | controllers | RPC | calls/s | errors | latency | controllers' CPU ms/call | agents' CPU ms/call |"
    )
    print("|---:|---:|---|---:|---:|---|---:|---:|")
    for round_, n, out in rows:
        for rpc, m in out.items():
            print(
                f"| {round_} | {n} | {rpc} | {m['rate']:,.0f} | {m['errors']} | {describe(m['latencies'])} | "
                f"{m['controllers_ms']:.3f} | {m['agents_ms']:.3f} |"
            )
    print(f"\nload average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
