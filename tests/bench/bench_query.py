#!/usr/bin/env python3
"""The SQL router: planning cost, routing overhead, and a fan-out GROUP BY over 1M rows.

    .venv/bin/python tests/bench/bench_query.py [--rows 1000000] [--iterations 3000]

1. **Parse + plan** of a point SELECT (``... WHERE customer_id = ?``, a new literal each
   time so nothing is cached) vs the same statement through ``PlanCache`` (a repeat):
   p50 / p99 per statement. Goal: p50 <= 0.3 ms with the cache.
2. **Routed vs direct**, side by side on one SQLite shard file (100k rows, indexed on
   the key): *direct* runs the SQL on the shard executor; *routed* is
   ``PlanCache.plan`` + ``execute`` (tasks, deadline, merge) through the same executor.
   Alternating, so drift hits both. Goal: p50 added <= 1 ms.
3. **Fan-out** over ``--rows`` rows on 4 SQLite shards (one file each, queried in
   parallel threads): a GROUP BY with ~50k groups (so the shards return many partial
   rows and the merge has real work), a GROUP BY with 5 groups, a k-way ORDER BY merge
   of every row, and ORDER BY ... LIMIT 100. For each: end-to-end time, the merge alone
   (replaying the shards' answers through ``execute``), rows through the merge per
   second, and the merge's peak Python memory (tracemalloc, a separate run since it
   slows allocation) next to the size of the shards' answers.

Not a test: pytest does not collect it. Figures depend on the machine: compare the
side-by-side numbers, not absolute ones across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from controller.federation.query import (  # noqa: E402
    FunctionExecutor,
    PlanCache,
    ShardLayout,
    ShardResult,
    execute,
    plan_sql,
)

SCHEMA = {"orders": ["id", "customer_id", "grp", "status", "amount"]}
LAYOUT = ShardLayout("hash", 4, "customer_id", key_type="integer")
STATUSES = ["new", "paid", "shipped", "cancelled", "refunded"]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.4f} ms"


class SqliteShard:
    """A shard executor over SQLite files; ``threaded`` runs each statement in a worker thread."""

    def __init__(self, paths: list[Path], *, threaded: bool) -> None:
        self.connections = [sqlite3.connect(p, check_same_thread=False) for p in paths]
        self.threaded = threaded

    def _run(self, shard: int, sql: str) -> ShardResult:
        cursor = self.connections[shard].execute(sql)
        rows = cursor.fetchall()
        return ShardResult([(d[0], "") for d in cursor.description or ()], rows)

    async def run(self, shard: int, sql: str, deadline: float) -> ShardResult:
        if self.threaded:
            return await asyncio.to_thread(self._run, shard, sql)
        return self._run(shard, sql)


def make_shards(directory: Path, rows: int, shard_count: int) -> list[Path]:
    paths = [directory / f"shard{i}.db" for i in range(shard_count)]
    connections = [sqlite3.connect(p) for p in paths]
    for connection in connections:
        connection.execute(
            "CREATE TABLE orders (id INTEGER, customer_id INTEGER, grp INTEGER, status TEXT, amount REAL)"
        )
    rng = random.Random(67)
    layout = ShardLayout("hash", shard_count, "customer_id", key_type="integer")
    owner = {cid: layout.shard_for(cid) for cid in range(1, 20_001)}
    batches: list[list[tuple[object, ...]]] = [[] for _ in range(shard_count)]
    for oid in range(1, rows + 1):
        cid = rng.randint(1, 20_000)
        amount = None if rng.random() < 0.1 else round(rng.uniform(1, 500), 2)
        batches[owner[cid]].append((oid, cid, rng.randint(1, 50_000), rng.choice(STATUSES), amount))
        if oid % 100_000 == 0 or oid == rows:
            for shard, batch in enumerate(batches):
                connections[shard].executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?)", batch)
                batch.clear()
    for connection in connections:
        connection.execute("CREATE INDEX orders_customer ON orders (customer_id)")
        connection.commit()
        connection.close()
    return paths


def bench_planning(iterations: int) -> None:
    rng = random.Random(1)
    cold: list[float] = []
    for _ in range(iterations):
        sql = f"SELECT id, amount FROM orders WHERE customer_id = {rng.randint(1, 10**9)}"
        start = time.perf_counter()
        plan_sql(sql, "sqlite", LAYOUT, SCHEMA)
        cold.append(time.perf_counter() - start)
    cache = PlanCache()
    sql = "SELECT id, amount FROM orders WHERE customer_id = 42"
    cache.plan(sql, "sqlite", LAYOUT, SCHEMA)
    warm: list[float] = []
    for _ in range(iterations):
        start = time.perf_counter()
        cache.plan(sql, "sqlite", LAYOUT, SCHEMA)
        warm.append(time.perf_counter() - start)
    fan = "SELECT status, AVG(amount), COUNT(DISTINCT customer_id) FROM orders GROUP BY status ORDER BY 2 DESC LIMIT 3"
    fan_out: list[float] = []
    for _ in range(max(1, iterations // 4)):
        start = time.perf_counter()
        plan_sql(fan, "sqlite", LAYOUT, SCHEMA)
        fan_out.append(time.perf_counter() - start)
    print("1. parse + plan, point SELECT (sqlite dialect)")
    print(
        f"   no cache (new literal each time): p50 {ms(percentile(cold, 0.5))}  p99 {ms(percentile(cold, 0.99))}"
    )
    print(
        f"   plan cache hit:                   p50 {ms(percentile(warm, 0.5))}  p99 {ms(percentile(warm, 0.99))}"
    )
    print(f"   (fan-out GROUP BY, no cache:      p50 {ms(percentile(fan_out, 0.5))})")


async def bench_routed_vs_direct(directory: Path, iterations: int) -> None:
    path = directory / "point.db"
    connection = sqlite3.connect(path)
    connection.execute(
        "CREATE TABLE orders (id INTEGER, customer_id INTEGER, grp INTEGER, status TEXT, amount REAL)"
    )
    rng = random.Random(2)
    connection.executemany(
        "INSERT INTO orders VALUES (?, ?, ?, ?, ?)",
        (
            (i, rng.randint(1, 20_000), i % 50, rng.choice(STATUSES), rng.uniform(1, 500))
            for i in range(100_000)
        ),
    )
    connection.execute("CREATE INDEX orders_customer ON orders (customer_id)")
    connection.commit()
    connection.close()
    single = ShardLayout("hash", 1, "customer_id", key_type="integer")
    shard = SqliteShard([path], threaded=False)
    cache = PlanCache()
    keys = [rng.randint(1, 20_000) for _ in range(200)]
    statements = [f"SELECT id, amount, status FROM orders WHERE customer_id = {k}" for k in keys]
    loop = asyncio.get_running_loop()
    direct: list[float] = []
    routed: list[float] = []
    for i in range(iterations + 200):
        sql = statements[i % len(statements)]
        start = time.perf_counter()
        expected = await shard.run(0, sql, loop.time() + 30)
        middle = time.perf_counter()
        plan = cache.plan(sql, "sqlite", single, SCHEMA)
        result = await execute(plan, shard)
        end = time.perf_counter()
        assert result.rows == list(expected.rows)
        if i >= 200:  # warm-up: first pass fills the plan cache and the page cache
            direct.append(middle - start)
            routed.append(end - middle)
    added = [r - d for r, d in zip(routed, direct, strict=True)]
    print("2. single-shard point SELECT on an SQLite shard (100k rows), side by side")
    print(f"   direct: p50 {ms(percentile(direct, 0.5))}  p99 {ms(percentile(direct, 0.99))}")
    print(f"   routed: p50 {ms(percentile(routed, 0.5))}  p99 {ms(percentile(routed, 0.99))}")
    print(
        f"   added:  p50 {ms(statistics.median(added))}  (p50 routed - p50 direct: "
        f"{ms(percentile(routed, 0.5) - percentile(direct, 0.5))})"
    )


async def bench_fan_out(directory: Path, rows: int) -> None:
    start = time.perf_counter()
    paths = make_shards(directory, rows, 4)
    print(f"3. fan-out over {rows:,} rows on 4 SQLite shards (loaded in {time.perf_counter() - start:.1f} s)")
    shards = SqliteShard(paths, threaded=True)
    cases = [
        (
            "GROUP BY ~50k groups",
            "SELECT grp, COUNT(*), SUM(amount), AVG(amount), MAX(status) FROM orders GROUP BY grp",
        ),
        (
            "GROUP BY 5 groups",
            "SELECT status, COUNT(*), AVG(amount), COUNT(DISTINCT customer_id) FROM orders GROUP BY status",
        ),
        ("ORDER BY, every row", "SELECT id, amount FROM orders ORDER BY amount DESC, id"),
        ("ORDER BY LIMIT 100", "SELECT id, amount FROM orders ORDER BY amount DESC, id LIMIT 100"),
    ]
    for name, sql in cases:
        plan = plan_sql(sql, "sqlite", LAYOUT, SCHEMA)
        start = time.perf_counter()
        result = await execute(plan, shards, deadline_seconds=300)
        total = time.perf_counter() - start
        tracemalloc.start()
        answers = {s: shards._run(s, plan.shard_sql[s]) for s in plan.shards}
        answers_size, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        shard_rows = sum(len(a.rows) for a in answers.values())

        async def replay(
            shard: int, _sql: str, _deadline: float, answers: dict[int, ShardResult] = answers
        ) -> ShardResult:
            return answers[shard]

        replayer = FunctionExecutor(replay)
        merge_times = []
        for _ in range(3):
            start = time.perf_counter()
            replayed = await execute(plan, replayer, deadline_seconds=300)
            merge_times.append(time.perf_counter() - start)
        merge = min(merge_times)
        assert replayed.rows == result.rows
        tracemalloc.start()
        await execute(plan, replayer, deadline_seconds=300)
        _, merge_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(
            f"   {name:<22} end-to-end {total:6.2f} s | shards returned {shard_rows:>9,} rows "
            f"({answers_size / 2**20:6.1f} MiB as Python tuples) | merge {merge:6.3f} s = "
            f"{shard_rows / merge:>10,.0f} rows/s | merge peak {merge_peak / 2**20:6.1f} MiB | "
            f"{len(result.rows):,} result rows"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--iterations", type=int, default=3000)
    args = parser.parse_args()
    print(
        f"python {platform.python_version()}, sqlite {sqlite3.sqlite_version}, "
        f"{os.cpu_count()} CPUs, {platform.machine()}"
    )
    bench_planning(args.iterations)
    with tempfile.TemporaryDirectory(prefix="a67-bench-query-") as tmp:
        await bench_routed_vs_direct(Path(tmp), args.iterations)
        await bench_fan_out(Path(tmp), args.rows)


if __name__ == "__main__":
    asyncio.run(main())
