#!/usr/bin/env python3
"""Transfer transactions per second: two shards (two-phase commit) vs one unsharded database.

    .venv/bin/python tests/bench/bench_transactions.py [--seconds 10] [--clients 8] [--backends sqlite,postgres]

A real controller (in this process, its store an SQLite file) and real agent processes.
For each backend (SQLite shard files; PostgreSQL schemas on ``A67_TEST_POSTGRES_URL``,
default ``postgresql://postgres@127.0.0.1:5432/test``, in a fresh database dropped
afterwards) two databases of ``acct (id, balance)`` with 1,000 accounts:

* **2 shards**: range-sharded on two agents; every transfer moves an amount between an
  account on shard 0 and one on shard 1: ``BeginTransaction(distributed)``, two
  ``UPDATE``s, ``CommitTransaction`` (PREPARE on both shards, the decision in the store,
  COMMIT on both);
* **1 shard**: the same transfers on one unsharded database (one agent, one shard): a
  single-shard transaction, committed in one phase.

``--clients`` concurrent clients (closed loop) for ``--seconds`` after a 1 s warm-up; a
transfer that hits a conflict (SQLite's one writer per shard with wait-die, a PostgreSQL
deadlock) is retried and counts once. Prints committed transfers/s, the ratio 2 shards /
1 shard, retries, and p50/p99 latency of a committed transfer (retries included).

Not a test: pytest does not collect it. Client, controller and agents share the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import psycopg  # noqa: E402
from automator67.v1 import auth_pb2_grpc, node_pb2, node_pb2_grpc, query_pb2, query_pb2_grpc  # noqa: E402
from google.protobuf import struct_pb2  # noqa: E402

from controller.config import Settings  # noqa: E402
from tests.support import bearer, controller_settings, register, running_controller  # noqa: E402

# The ingress xDS port (default 127.0.0.1:50053) is of no use here and may be taken.
NO_XDS = {"xds_listen_address": ""} if "xds_listen_address" in Settings.__dataclass_fields__ else {}

ACCOUNTS = 500  # per shard
POSTGRES = os.environ.get("A67_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@asynccontextmanager
async def fresh_postgres() -> AsyncIterator[str]:
    name = f"a67_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" LC_COLLATE "C" LC_CTYPE "C" TEMPLATE template0')
        prepared = conn.execute("SHOW max_prepared_transactions").fetchone()
    if not prepared or int(prepared[0]) == 0:
        raise SystemExit("PostgreSQL has max_prepared_transactions = 0 (docs/databases.md, Transactions)")
    url = POSTGRES.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
    finally:
        with psycopg.connect(POSTGRES, autocommit=True) as conn:
            left = conn.execute("SELECT gid FROM pg_prepared_xacts WHERE database = %s", (name,)).fetchall()
        if left:  # an interrupted run: their database is about to go
            print(f"rolling back {len(left)} prepared transactions left by an interrupted run")
            with psycopg.connect(url, autocommit=True) as conn:
                for (gid,) in left:
                    conn.execute(f"ROLLBACK PREPARED '{gid}'")
        with psycopg.connect(POSTGRES, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def run_backend(backend: str, seconds: float, clients: int, root: Path) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    postgres = fresh_postgres() if backend == "postgres" else None
    url = await postgres.__aenter__() if postgres else ""
    agents: list[subprocess.Popen[bytes]] = []
    try:
        settings = controller_settings(
            root / backend / "controller", heartbeat_interval_seconds=1.0, **NO_XDS
        )
        async with (
            running_controller(settings) as controller,
            grpc.aio.insecure_channel(controller.address) as ch,
        ):
            token = (await register(auth_pb2_grpc.AuthServiceStub(ch))).access_token
            md = bearer(token)
            nodes = node_pb2_grpc.NodeServiceStub(ch)
            enrollment = await nodes.CreateEnrollmentToken(
                node_pb2.CreateEnrollmentTokenRequest(max_uses=3), metadata=md
            )
            for name in ("a", "b", "c"):
                env = {k: v for k, v in os.environ.items() if not k.startswith("A67_")}
                env["A67_AGENT_TOKEN"] = enrollment.token
                if url:
                    env["A67_SHARD_POSTGRES_URL"] = url
                agents.append(
                    subprocess.Popen(  # noqa: ASYNC220 (once, at start-up)
                        [sys.executable, "-m", "controller.cli", "agent", "--data-dir", str(root / backend / name),
                         "--region", name, "--node-types", "database", "--controller", controller.address],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                    )
                )  # fmt: skip
            ids: dict[str, str] = {}
            while len(ids) < 3:
                listed = (await nodes.ListNodes(node_pb2.ListNodesRequest(), metadata=md)).nodes
                ids = {n.region: n.id for n in listed if n.status == 2}
                await asyncio.sleep(0.05)
            stub = query_pb2_grpc.QueryServiceStub(ch)
            for label, shard_count in (("2 shards", 2), ("1 shard", 1)):
                placements = [
                    query_pb2.ShardPlacement(
                        shard_index=0, primary_node_id=ids["a" if shard_count == 2 else "c"]
                    )
                ]
                ranges = []
                if shard_count == 2:
                    placements.append(query_pb2.ShardPlacement(shard_index=1, primary_node_id=ids["b"]))
                    ranges = [
                        query_pb2.ShardRange(upper=struct_pb2.Value(number_value=ACCOUNTS), shard_index=0),
                        query_pb2.ShardRange(lower=struct_pb2.Value(number_value=ACCOUNTS), shard_index=1),
                    ]
                db = (
                    await stub.CreateDatabase(
                        query_pb2.CreateDatabaseRequest(
                            name=f"bank{shard_count}",
                            dialect="postgres" if url else "sqlite",
                            sharding=query_pb2.Sharding(
                                strategy=query_pb2.SHARDING_STRATEGY_RANGE if ranges else query_pb2.SHARDING_STRATEGY_HASH,
                                shard_count=shard_count, sharding_key="id", ranges=ranges,
                            ),
                            shards=placements,
                        ),
                        metadata=md,
                    )
                ).database.id  # fmt: skip
                await stub.ApplySchema(
                    query_pb2.ApplySchemaRequest(
                        db_id=db, ddl="CREATE TABLE acct (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)"
                    ),
                    metadata=md,
                )
                values = ", ".join(f"({i}, 1000)" for i in range(2 * ACCOUNTS))
                await stub.ExecuteQuery(
                    query_pb2.ExecuteQueryRequest(
                        db_id=db, query=f"INSERT INTO acct (id, balance) VALUES {values}"
                    ),
                    metadata=md,
                )
                results[label] = await drive(
                    stub, md, db, distributed=shard_count == 2, seconds=seconds, clients=clients
                )
                check = await stub.ExecuteQuery(
                    query_pb2.ExecuteQueryRequest(db_id=db, query="SELECT sum(balance) FROM acct"),
                    metadata=md,
                )
                assert int(check.data[0].values[0].number_value) == 2 * ACCOUNTS * 1000, (
                    "money was created or lost"
                )
    finally:
        for agent in agents:
            agent.terminate()
        for agent in agents:
            agent.wait()
        if postgres:
            await postgres.__aexit__(None, None, None)
    return results


async def drive(
    stub: query_pb2_grpc.QueryServiceStub, md: tuple[tuple[str, str], ...], db: str, *, distributed: bool,
    seconds: float, clients: int,
) -> dict[str, float]:  # fmt: skip
    loop = asyncio.get_running_loop()
    rng = random.Random(67)
    latencies: list[float] = []
    counts = {"committed": 0, "retries": 0}
    start = loop.time()
    measure_from = start + 1.0
    stop_at = measure_from + seconds

    async def transfer() -> bool:
        src, dst = rng.randrange(ACCOUNTS), ACCOUNTS + rng.randrange(ACCOUNTS)
        amount = rng.randint(1, 9)
        try:
            txid = (
                await stub.BeginTransaction(
                    query_pb2.BeginTransactionRequest(db_id=db, distributed=distributed), metadata=md
                )
            ).transaction.id
            for sql in (
                f"UPDATE acct SET balance = balance - {amount} WHERE id = {src}",
                f"UPDATE acct SET balance = balance + {amount} WHERE id = {dst}",
            ):
                await stub.ExecuteQuery(
                    query_pb2.ExecuteQueryRequest(db_id=db, query=sql, transaction_id=txid), metadata=md
                )
            await stub.CommitTransaction(
                query_pb2.CommitTransactionRequest(db_id=db, transaction_id=txid), metadata=md
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.ABORTED:
                raise
            return False
        return True

    async def client() -> None:
        while loop.time() < stop_at:
            began = loop.time()
            tries = 0
            while not await transfer():
                tries += 1
                if began >= measure_from:
                    counts["retries"] += 1
                await asyncio.sleep(rng.random() * 0.005 * min(tries, 10))  # back off after a conflict
            if began >= measure_from and loop.time() <= stop_at:
                counts["committed"] += 1
                latencies.append(loop.time() - began)

    await asyncio.gather(*(client() for _ in range(clients)))
    return {
        "tps": counts["committed"] / seconds,
        "committed": counts["committed"],
        "retries": counts["retries"],
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "mean_ms": (statistics.fmean(latencies) * 1000) if latencies else float("nan"),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--backends", default="sqlite,postgres")
    args = parser.parse_args()
    print(f"# {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{args.clients} clients, {args.seconds:g} s per configuration")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="a67-bench-tx-") as tmp:
        for backend in args.backends.split(","):
            started = time.perf_counter()
            results = await run_backend(backend, args.seconds, args.clients, Path(tmp))
            print(f"\n## {backend} ({time.perf_counter() - started:.0f} s)")
            print("| database | transfers/s | committed | retries | p50 ms | p99 ms |")
            print("|---|---:|---:|---:|---:|---:|")
            for label, r in results.items():
                print(f"| {label} | {r['tps']:.1f} | {r['committed']:.0f} | {r['retries']:.0f} | "
                      f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")  # fmt: skip
            ratio = results["2 shards"]["tps"] / results["1 shard"]["tps"] if results["1 shard"]["tps"] else 0
            print(f"\nratio 2 shards / 1 shard: {ratio:.2f}")


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=getattr(logging, os.environ.get("BENCH_LOG", "ERROR")))
    asyncio.run(main())
