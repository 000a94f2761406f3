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

Loopback only; the client processes share the machine's cores with the
controller. Not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import psutil  # noqa: E402
from automator67.v1 import auth_pb2, auth_pb2_grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from tests.bench.bench_node_streams import start_controller  # noqa: E402
from tests.bench.stats import describe, percentile, tail  # noqa: E402

PASSWORD_HASH = "YmVuY2htYXJrLWNsaWVudC1zYWx0ZWQtaGFzaA=="
RPCS = ("health", "me")


def register(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        reply = auth_pb2_grpc.AuthServiceStub(channel).Register(
            auth_pb2.RegisterRequest(
                email=f"bench-{uuid.uuid4().hex[:8]}@example.com", password_hash=PASSWORD_HASH
            )
        )
    return str(reply.access_token)


# -- sequential --------------------------------------------------------------


def sequential(address: str, token: str, requests: int, rounds: int, warmup: int) -> dict[str, list[float]]:
    channel = grpc.insecure_channel(address)
    health = health_pb2_grpc.HealthStub(channel).Check
    me = auth_pb2_grpc.AuthServiceStub(channel).GetCurrentUser
    health_request = health_pb2.HealthCheckRequest(service="")
    me_request = auth_pb2.GetCurrentUserRequest()
    metadata = (("authorization", f"Bearer {token}"),)
    calls = {
        "health": lambda: health(health_request, timeout=10),
        "me": lambda: me(me_request, metadata=metadata, timeout=10),
    }
    samples: dict[str, list[float]] = {rpc: [] for rpc in RPCS}
    try:
        for call in calls.values():
            for _ in range(warmup):
                call()
        per_round = max(1, requests // rounds)
        for round_no in range(rounds):
            for rpc in RPCS if round_no % 2 == 0 else tuple(reversed(RPCS)):
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
    rpc: str, address: str, token: str, inflight: int, start_at: float, stop_at: float
) -> tuple[int, int, list[float]]:
    async with grpc.aio.insecure_channel(address) as channel:
        if rpc == "health":
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="")

            async def call() -> None:
                await stub.Check(request, timeout=10)
        else:
            me = auth_pb2_grpc.AuthServiceStub(channel)
            me_request = auth_pb2.GetCurrentUserRequest()
            metadata = (("authorization", f"Bearer {token}"),)

            async def call() -> None:
                await me.GetCurrentUser(me_request, metadata=metadata, timeout=10)

        await call()  # connected before the clock starts
        await asyncio.sleep(max(0.0, start_at - time.time()))
        latencies: list[float] = []
        counts = [0, 0]

        async def loop() -> None:
            while time.time() < stop_at:
                began = time.perf_counter_ns()
                try:
                    await call()
                except grpc.RpcError:
                    counts[1] += 1
                    continue
                latencies.append((time.perf_counter_ns() - began) / 1e6)
                counts[0] += 1

        await asyncio.gather(*(loop() for _ in range(inflight)))
    return counts[0], counts[1], latencies


def _client_process(
    rpc: str, address: str, token: str, inflight: int, start_at: float, stop_at: float
) -> tuple[int, int, list[float]]:
    return asyncio.run(_client(rpc, address, token, inflight, start_at, stop_at))


def concurrent(
    pool: multiprocessing.pool.Pool,
    controller: psutil.Process,
    rpc: str,
    address: str,
    token: str,
    procs: int,
    inflight: int,
    seconds: float,
) -> dict[str, float | list[float]]:
    start_at = time.time() + 1.5
    stop_at = start_at + seconds
    pending = pool.starmap_async(
        _client_process, [(rpc, address, token, inflight, start_at, stop_at)] * procs
    )
    time.sleep(max(0.0, start_at - time.time()))
    cpu0 = controller.cpu_times()
    time.sleep(max(0.0, stop_at - time.time()))
    cpu1 = controller.cpu_times()
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
        f = concurrent(pool, proc, args.only, address, token, args.procs, 2, args.seconds)
    print(f"{args.only}: {f['rate']:,.0f} calls/s, {f['cpu_ms_per_call']:.3f} ms controller CPU per call")


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
    parser.add_argument("--only", choices=RPCS, help="concurrent phase for this RPC alone (profiling)")
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
        try:
            proc = psutil.Process(controller.proc.pid)
            if args.pid_file:
                args.pid_file.write_text(str(proc.pid))
            token = register(address)
            print(
                f"Health.Check vs GetCurrentUser, loopback; {os.cpu_count()} CPUs "
                f"({platform.processor() or platform.machine()}), Python {platform.python_version()}, "
                f"grpcio {grpc.__version__}; controller: SQLite store, cache {args.cache_url}, "
                f"log level {args.log_level}; load average {os.getloadavg()[0]:.2f} at start"
            )
            if args.only:
                profile_only(args, proc, address, token)
                return 0
            samples = sequential(address, token, args.requests, args.rounds, args.warmup)
            base = samples["health"]
            print(
                f"\nSequential, one client, {len(base)} calls per RPC in {args.rounds} interleaved rounds (ms):\n"
            )
            print("| RPC | p50 | p90 | p99 / max | mean | p50 ratio to health |")
            print("|---|---:|---:|---:|---:|---:|")
            for rpc in RPCS:
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
                        "controller CPU % | errors |"
                    )
                    print("|---|---:|---:|---|---:|---:|---:|---:|")
                    figures = {}
                    order = RPCS if inflight % 2 else tuple(reversed(RPCS))
                    for rpc in order:
                        figures[rpc] = concurrent(
                            pool, proc, rpc, address, token, args.procs, inflight, args.seconds
                        )
                    for rpc in RPCS:
                        f, h = figures[rpc], figures["health"]
                        print(
                            f"| {rpc} | {f['rate']:,.0f} | {f['rate'] / h['rate']:.2f} | "  # type: ignore[operator]
                            f"{describe(f['latencies'])} | {f['cpu_ms_per_call']:.3f} | "  # type: ignore[arg-type]
                            f"{f['cpu_ms_per_call'] / h['cpu_ms_per_call']:.2f}x | "  # type: ignore[operator]
                            f"{f['controller_cpu_percent']:.0f} | {f['errors']} |"
                        )
            print(f"\nload average {os.getloadavg()[0]:.2f} at end")
        finally:
            controller.stop()
    if args.logging:
        print("\nThe access-log line alone (in-process, this interpreter):")
        logging_cost()
    return 0


if __name__ == "__main__":
    sys.exit(main())
