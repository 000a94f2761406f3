#!/usr/bin/env python3
"""The cheapest RPC against an authenticated read: Health.Check and GetCurrentUser side by side.

    .venv/bin/python tests/bench/bench_hot_paths.py [--requests 4000] [--seconds 5]

Starts a real controller (``python -m controller.cli serve``, SQLite in a temp dir,
memory cache, log level INFO so every call writes its access-log line, to a file),
registers one user, then measures two unary RPCs over one plaintext HTTP/2
connection per client:

* ``health``  ``grpc.health.v1.Health/Check`` (public: no token, no store);
* ``me``      ``AuthService/GetCurrentUser`` (Bearer token verified, session state
  and the user record: everything an authenticated read does, and nothing else).

1. **Sequential**: one client, one call at a time, the two interleaved in rounds
   (order alternating) so that drift on a shared machine hits both alike.
2. **Concurrent**: ``--procs`` client processes (default 4), each with ``C``
   calls in flight on its channel (C = 1, then C = 2: 8 concurrent clients), for
   ``--seconds`` per RPC; throughput, latency, and the controller's CPU per call
   (psutil CPU time of the controller process over the window / calls).

Every figure is also printed as a ratio to Health.Check's from the same run.
``--logging`` adds an in-process measurement of the access-log line alone.

``--query`` adds two more RPCs through **real agents** (two ``a67 agent`` processes,
database nodes, one database of 4 hash shards on ``customer_id``, two shards per agent,
20,000 rows written into the shard files before the run):

* ``point``   ``ExecuteQuery``, ``SELECT … FROM orders WHERE customer_id = C AND id = I``:
  one shard (client → controller → node stream → agent → shard → PushShardResult → client);
  64 different statements in turn (all in the plan cache after the warm-up);
* ``groupby`` ``ExecuteQuery``, ``SELECT region, COUNT(*), SUM(total) FROM orders GROUP BY
  region ORDER BY region``: all 4 shards, merged by the controller.

Every answer is checked (the point row, the 4 groups' counts and sums); a wrong one
counts as an error.

Loopback only; the client processes share the machine's cores with the
controller. Not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import psutil  # noqa: E402
from automator67.v1 import (  # noqa: E402
    auth_pb2,
    auth_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from tests.bench.bench_node_streams import start_controller  # noqa: E402
from tests.bench.stats import describe, percentile, tail  # noqa: E402

PASSWORD_HASH = "YmVuY2htYXJrLWNsaWVudC1zYWx0ZWQtaGFzaA=="
RPCS = ("health", "me")
AGENT_PIDS: list[int] = []
"""The agents of ``--query`` (their CPU per call is reported with the controller's)."""
QUERY_RPCS = ("point", "groupby")
QUERY_SCHEMA = (
    "CREATE TABLE orders (id INTEGER NOT NULL, customer_id INTEGER NOT NULL, region TEXT NOT NULL, "
    "total REAL NOT NULL, PRIMARY KEY (customer_id, id))"
)
QUERY_ROWS = 20_000
REGIONS = ("ap", "eu", "sa", "us")
GROUP_BY_SQL = "SELECT region, COUNT(*) AS n, SUM(total) AS s FROM orders GROUP BY region ORDER BY region"


def _order(i: int) -> tuple[int, int, str, float]:
    return i, i % 1000, REGIONS[i % 4], float(i % 100) + 0.5


class QueryContext:
    """What the query RPCs send and expect (picklable: handed to the client processes)."""

    def __init__(self, db_id: str) -> None:
        self.db_id = db_id
        picks = range(7, QUERY_ROWS, QUERY_ROWS // 64)
        self.points = [
            (f"SELECT id, customer_id, region, total FROM orders WHERE customer_id = {c} AND id = {i}",
             [float(i), float(c), r, t])
            for i, c, r, t in map(_order, picks)
        ]  # fmt: skip
        groups: dict[str, list[float]] = {}
        for _, _, region, total in map(_order, range(QUERY_ROWS)):
            n_s = groups.setdefault(region, [0.0, 0.0])
            n_s[0] += 1
            n_s[1] += total
        self.groups = [[region, n, s] for region, (n, s) in sorted(groups.items())]

    def point_check(self, k: int) -> tuple[query_pb2.ExecuteQueryRequest, Any]:
        sql, expected = self.points[k % len(self.points)]

        def check(response: query_pb2.ExecuteQueryResponse) -> None:
            rows = [list(row) for row in response.data]
            if rows != [expected]:
                raise AssertionError(f"point: {rows} != {[expected]}")

        return query_pb2.ExecuteQueryRequest(db_id=self.db_id, query=sql, timeout_ms=10_000), check

    def groupby_check(self) -> tuple[query_pb2.ExecuteQueryRequest, Any]:
        def check(response: query_pb2.ExecuteQueryResponse) -> None:
            rows = [list(row) for row in response.data]
            if rows != self.groups:
                raise AssertionError(f"group by: {rows} != {self.groups}")

        request = query_pb2.ExecuteQueryRequest(db_id=self.db_id, query=GROUP_BY_SQL, timeout_ms=10_000)
        return request, check


def setup_query(address: str, token: str, work: Path, agents: list[subprocess.Popen[bytes]]) -> QueryContext:
    """Two agents (database nodes, appended to ``agents`` as they start: the caller stops
    them), a 4-shard database on them, its rows in the shard files."""
    from controller.federation.query import key_type_from_sql, layout_from_proto

    metadata = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(address) as channel:
        nodes = node_pb2_grpc.NodeServiceStub(channel)
        enroll = nodes.CreateEnrollmentToken(
            node_pb2.CreateEnrollmentTokenRequest(max_uses=2), metadata=metadata
        ).token
        env = {k: v for k, v in os.environ.items() if not k.startswith("A67_")} | {"A67_AGENT_TOKEN": enroll}
        agent_args = [sys.executable, "-m", "controller.cli", "agent", "--node-types", "database",
                      "--controller", address, "--log-level", "WARNING"]  # fmt: skip
        for name in ("a", "b"):
            agents.append(
                subprocess.Popen(
                    [*agent_args, "--data-dir", str(work / f"agent-{name}"), "--region", name],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + 90
        while True:
            listed = nodes.ListNodes(node_pb2.ListNodesRequest(), metadata=metadata).nodes
            ids = {n.region: n.id for n in listed if n.status in (2, 3)}  # ready or busy (a loaded machine)
            if len(ids) == 2:
                break
            if time.monotonic() > deadline:
                raise SystemExit("the agents did not become ready")
            time.sleep(0.1)
        sharding = query_pb2.Sharding(
            strategy=query_pb2.SHARDING_STRATEGY_HASH, shard_count=4, sharding_key="customer_id"
        )
        stub = query_pb2_grpc.QueryServiceStub(channel)
        owner = {0: "a", 1: "b", 2: "a", 3: "b"}
        db_id = stub.CreateDatabase(
            query_pb2.CreateDatabaseRequest(
                name="hot",
                dialect="sqlite",
                sharding=sharding,
                shards=[
                    query_pb2.ShardPlacement(shard_index=i, primary_node_id=ids[owner[i]]) for i in range(4)
                ],
            ),
            metadata=metadata,
        ).database.id
        stub.ApplySchema(query_pb2.ApplySchemaRequest(db_id=db_id, ddl=QUERY_SCHEMA), metadata=metadata)
    layout = layout_from_proto(sharding, key_type=key_type_from_sql("INTEGER"))
    by_shard: dict[int, list[tuple[int, int, str, float]]] = {i: [] for i in range(4)}
    for row in map(_order, range(QUERY_ROWS)):
        by_shard[layout.shard_for(row[1])].append(row)
    for shard, rows in by_shard.items():
        conn = sqlite3.connect(work / f"agent-{owner[shard]}" / "shards" / db_id / f"{shard}.sqlite3")
        conn.executemany("INSERT INTO orders VALUES (?, ?, ?, ?)", rows)
        conn.commit()
        conn.close()
    return QueryContext(db_id)


def register(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        reply = auth_pb2_grpc.AuthServiceStub(channel).Register(
            auth_pb2.RegisterRequest(
                email=f"bench-{uuid.uuid4().hex[:8]}@example.com", password_hash=PASSWORD_HASH
            )
        )
    return str(reply.access_token)


# -- sequential --------------------------------------------------------------


def sequential(
    address: str,
    token: str,
    requests: int,
    rounds: int,
    warmup: int,
    rpcs: tuple[str, ...] = RPCS,
    query: QueryContext | None = None,
) -> dict[str, list[float]]:
    channel = grpc.insecure_channel(address)
    health = health_pb2_grpc.HealthStub(channel).Check
    me = auth_pb2_grpc.AuthServiceStub(channel).GetCurrentUser
    execute = query_pb2_grpc.QueryServiceStub(channel).ExecuteQuery
    health_request = health_pb2.HealthCheckRequest(service="")
    me_request = auth_pb2.GetCurrentUserRequest()
    metadata = (("authorization", f"Bearer {token}"),)
    counter = [0]

    def point() -> None:
        assert query is not None
        counter[0] += 1
        request, check = query.point_check(counter[0])
        check(execute(request, metadata=metadata, timeout=10))

    def groupby() -> None:
        assert query is not None
        request, check = query.groupby_check()
        check(execute(request, metadata=metadata, timeout=10))

    calls = {
        "health": lambda: health(health_request, timeout=10),
        "me": lambda: me(me_request, metadata=metadata, timeout=10),
        "point": point,
        "groupby": groupby,
    }
    samples: dict[str, list[float]] = {rpc: [] for rpc in rpcs}
    try:
        for rpc in rpcs:
            for _ in range(warmup):
                calls[rpc]()
        per_round = max(1, requests // rounds)
        for round_no in range(rounds):
            for rpc in rpcs if round_no % 2 == 0 else tuple(reversed(rpcs)):
                call, out = calls[rpc], samples[rpc]
                for _ in range(per_round):
                    start = time.perf_counter_ns()
                    call()
                    out.append((time.perf_counter_ns() - start) / 1e6)
    finally:
        channel.close()
    return samples


# -- concurrent ----------------------------------------------------------------


async def _client(
    rpc: str,
    address: str,
    token: str,
    inflight: int,
    barrier: Any,
    seconds: float,
    query: QueryContext | None = None,
) -> tuple[int, int, list[float]]:
    async with grpc.aio.insecure_channel(address) as channel:
        if rpc == "health":
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="")

            async def call() -> None:
                await stub.Check(request, timeout=10)
        elif rpc in QUERY_RPCS:
            assert query is not None
            execute = query_pb2_grpc.QueryServiceStub(channel).ExecuteQuery
            query_metadata = (("authorization", f"Bearer {token}"),)
            counter = [os.getpid()]

            async def call() -> None:
                assert query is not None
                counter[0] += 1
                sql, check = query.point_check(counter[0]) if rpc == "point" else query.groupby_check()
                check(await execute(sql, metadata=query_metadata, timeout=10))
        else:
            me = auth_pb2_grpc.AuthServiceStub(channel)
            me_request = auth_pb2.GetCurrentUserRequest()
            metadata = (("authorization", f"Bearer {token}"),)

            async def call() -> None:
                await me.GetCurrentUser(me_request, metadata=metadata, timeout=10)

        await call()  # connected before the clock starts
        # Every client connected (however slowly processes start on a loaded machine),
        # then all start together, and the controller's CPU is read from there.
        await asyncio.to_thread(barrier.wait, 120)
        stop_at = time.time() + seconds
        latencies: list[float] = []
        counts = [0, 0]

        async def loop() -> None:
            while time.time() < stop_at:
                began = time.perf_counter_ns()
                try:
                    await call()
                except (grpc.RpcError, AssertionError):
                    counts[1] += 1
                    continue
                latencies.append((time.perf_counter_ns() - began) / 1e6)
                counts[0] += 1

        await asyncio.gather(*(loop() for _ in range(inflight)))
    return counts[0], counts[1], latencies


def _client_process(
    rpc: str,
    address: str,
    token: str,
    inflight: int,
    barrier: Any,
    seconds: float,
    query: QueryContext | None = None,
) -> tuple[int, int, list[float]]:
    return asyncio.run(_client(rpc, address, token, inflight, barrier, seconds, query))


_MANAGER: Any = None


def _manager() -> Any:
    """One manager process for the clients' start barriers."""
    global _MANAGER
    if _MANAGER is None:
        _MANAGER = multiprocessing.get_context("spawn").Manager()
    return _MANAGER


def concurrent(
    pool: multiprocessing.pool.Pool,
    controller: psutil.Process,
    rpc: str,
    address: str,
    token: str,
    procs: int,
    inflight: int,
    seconds: float,
    query: QueryContext | None = None,
) -> dict[str, float | list[float]]:
    barrier = _manager().Barrier(procs + 1)
    pending = pool.starmap_async(
        _client_process, [(rpc, address, token, inflight, barrier, seconds, query)] * procs
    )
    agents = [psutil.Process(pid) for pid in AGENT_PIDS]
    barrier.wait(120)
    cpu0 = controller.cpu_times()
    agents0 = [a.cpu_times() for a in agents]
    time.sleep(seconds)
    cpu1 = controller.cpu_times()
    agents1 = [a.cpu_times() for a in agents]
    agent_cpu = sum((b.user - a.user) + (b.system - a.system) for a, b in zip(agents0, agents1, strict=True))
    results = pending.get(timeout=seconds + 60)
    done = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    latencies = [x for r in results for x in r[2]]
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return {
        "rate": done / seconds,
        "done": done,
        "errors": errors,
        "cpu_ms_per_call": cpu * 1000 / done if done else float("nan"),
        "controller_cpu_percent": cpu / seconds * 100,
        "agent_cpu_ms_per_call": agent_cpu * 1000 / done if done else float("nan"),
        "latencies": latencies,
    }


# -- the access-log line alone -----------------------------------------------------


def logging_cost(iterations: int = 50_000) -> None:
    """Time the interceptor's access-log call in-process, as ``a67 serve`` configures logging.

    Three ways: INFO with the standard library's default records (caller, thread and
    process looked up per record), INFO with :func:`controller.logging_setup.cheap_records`
    (what the controller uses), and WARNING (the line filtered out).
    """
    import logging

    from controller.api import interceptors
    from controller.logging_setup import FORMAT, cheap_records

    class FakeContext:
        def code(self) -> None:
            return None

        def cancelled(self) -> bool:
            return False

    context = FakeContext()
    saved = (logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing)  # type: ignore[attr-defined]
    root = logging.getLogger()
    with tempfile.NamedTemporaryFile("w", suffix=".log") as sink:
        handler = logging.StreamHandler(sink)
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
        results = {}
        for label, level, cheap in (
            ("INFO, default records", logging.INFO, False),
            ("INFO, cheap records (the controller's)", logging.INFO, True),
            ("WARNING (filtered out)", logging.WARNING, True),
        ):
            if cheap:
                cheap_records()
            root.setLevel(level)
            started = time.perf_counter()
            for _ in range(iterations):
                interceptors._log_call("/grpc.health.v1.Health/Check", context, started, None)  # type: ignore[arg-type]
            results[label] = (time.perf_counter() - started) / iterations * 1e6
        root.removeHandler(handler)
    logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing = saved  # type: ignore[attr-defined]
    for label, us in results.items():
        print(f"  access-log line, {label}: {us:.2f} µs per call (written to a file, flushed per line)")


def profile_only(args: argparse.Namespace, proc: psutil.Process, address: str, token: str) -> None:
    """Only the 8-client phase of one RPC, for a profiler attached to the controller."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.procs) as pool:
        f = concurrent(pool, proc, args.only, address, token, args.procs, 2, args.seconds, args.query_context)
    print(
        f"{args.only}: {f['rate']:,.0f} calls/s, {f['cpu_ms_per_call']:.3f} ms controller CPU per call, "
        f"{f['agent_cpu_ms_per_call']:.3f} ms agents' CPU per call; {describe(f['latencies'])}"  # type: ignore[arg-type]
    )


# -- main --------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000, help="sequential calls per RPC (default 4000)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    parser.add_argument("--warmup", type=int, default=300, help="warm-up calls per RPC (default 300)")
    parser.add_argument("--procs", type=int, default=4, help="client processes (default 4)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per RPC and concurrency (default 5)")
    parser.add_argument(
        "--log-level", default="INFO", help="the controller's (default INFO: one line per call)"
    )
    parser.add_argument("--cache-url", default="memory://", help="the controller's cache (default memory://)")
    parser.add_argument("--logging", action="store_true", help="also time the access-log line in-process")
    parser.add_argument(
        "--only", choices=RPCS + QUERY_RPCS, help="concurrent phase for this RPC alone (profiling)"
    )
    parser.add_argument(
        "--query", action="store_true", help="also a point query and a 4-shard GROUP BY through real agents"
    )
    parser.add_argument(
        "--rpcs", help="comma-separated subset of health,me,point,groupby (default: all measured)"
    )
    parser.add_argument("--pid-file", type=Path, help="write the controller's pid here (for py-spy)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="a67-bench-hot-") as tmp:
        work = Path(tmp)
        controller = start_controller(
            work,
            log_level=args.log_level,
            extra_args=("--cache-url", args.cache_url),
        )
        address = controller.address
        agents: list[subprocess.Popen[bytes]] = []
        try:
            proc = psutil.Process(controller.proc.pid)
            if args.pid_file:
                args.pid_file.write_text(str(proc.pid))
            token = register(address)
            args.query_context = None
            rpcs: tuple[str, ...] = RPCS
            if args.query or (args.only in QUERY_RPCS):
                args.query_context = setup_query(address, token, work, agents)
                AGENT_PIDS.extend(agent.pid for agent in agents)
                rpcs = RPCS + QUERY_RPCS
            if args.rpcs:
                rpcs = tuple(r for r in rpcs if r in args.rpcs.split(","))
                assert rpcs[0] == "health", "the ratios are to health: list it"
            print(
                f"Health.Check vs GetCurrentUser, loopback; {os.cpu_count()} CPUs "
                f"({platform.processor() or platform.machine()}), Python {platform.python_version()}, "
                f"grpcio {grpc.__version__}; controller: SQLite store, cache {args.cache_url}, "
                f"log level {args.log_level}; load average {os.getloadavg()[0]:.2f} at start"
            )
            if args.only:
                profile_only(args, proc, address, token)
                return 0
            samples = sequential(
                address, token, args.requests, args.rounds, args.warmup, rpcs, args.query_context
            )
            base = samples["health"]
            print(
                f"\nSequential, one client, {len(base)} calls per RPC in {args.rounds} interleaved rounds (ms):\n"
            )
            print("| RPC | p50 | p90 | p99 / max | mean | p50 ratio to health |")
            print("|---|---:|---:|---:|---:|---:|")
            for rpc in rpcs:
                values = samples[rpc]
                name, value = tail(values)
                ratio = percentile(values, 50) / percentile(base, 50)
                print(
                    f"| {rpc} | {percentile(values, 50):.3f} | {percentile(values, 90):.3f} | "
                    f"{value:.3f} ({name}) | {statistics.fmean(values):.3f} | {ratio:.2f}x |"
                )

            context = multiprocessing.get_context("spawn")
            with context.Pool(args.procs) as pool:
                for inflight in (1, 2):
                    clients = args.procs * inflight
                    print(
                        f"\n{args.procs} client processes x {inflight} in flight = {clients} concurrent "
                        f"clients, closed loop, {args.seconds:g} s per RPC:\n"
                    )
                    print(
                        "| RPC | calls/s | ratio | latency | controller CPU ms/call | ratio | "
                        "controller CPU % | agents' CPU ms/call | errors |"
                    )
                    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
                    figures = {}
                    order = rpcs if inflight % 2 else tuple(reversed(rpcs))
                    for rpc in order:
                        figures[rpc] = concurrent(
                            pool, proc, rpc, address, token, args.procs, inflight, args.seconds,
                            args.query_context,
                        )  # fmt: skip
                    for rpc in rpcs:
                        f, h = figures[rpc], figures["health"]
                        print(
                            f"| {rpc} | {f['rate']:,.0f} | {f['rate'] / h['rate']:.2f} | "  # type: ignore[operator]
                            f"{describe(f['latencies'])} | {f['cpu_ms_per_call']:.3f} | "  # type: ignore[arg-type]
                            f"{f['cpu_ms_per_call'] / h['cpu_ms_per_call']:.2f}x | "  # type: ignore[operator]
                            f"{f['controller_cpu_percent']:.0f} | {f['agent_cpu_ms_per_call']:.3f} | "
                            f"{f['errors']} |"
                        )
            print(f"\nload average {os.getloadavg()[0]:.2f} at end")
        finally:
            controller.stop()
            for agent in agents:
                agent.terminate()
            for agent in agents:
                try:
                    agent.wait(10)
                except subprocess.TimeoutExpired:
                    agent.kill()
                    agent.wait()
    if args.logging:
        print("\nThe access-log line alone (in-process, this interpreter):")
        logging_cost()
    return 0


if __name__ == "__main__":
    sys.exit(main())
