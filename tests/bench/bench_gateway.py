#!/usr/bin/env python3
"""REST through Envoy against direct gRPC, on the same unary RPC, side by side in one run.

    .venv/bin/python tests/bench/bench_gateway.py [--requests 3000] [--seconds 5] [--clients 4]

Starts a real controller (``python -m controller.cli serve``, SQLite in a temp
dir, log level WARNING so access logs do not dominate) and a real Envoy with
the gateway configuration, registers one user, then measures
``AuthService.GetCurrentUser`` (token check + one store read) three ways:

* ``grpc-direct``   a grpc sync stub straight to the controller;
* ``grpc-envoy``    the same stub through Envoy (gRPC passed through, no transcoding);
* ``rest-envoy``    ``GET /api/v1/auth/me`` with http.client keep-alive through Envoy.

1. Sequential latency: one client, one request at a time, the three paths
   interleaved in rounds so that drift on a shared machine hits them alike;
   p50/p90/p99 and the REST-minus-direct difference against the issue's goals
   (p50 added <= 1 ms, p99 added <= 3 ms).
2. Throughput at saturation: ``--clients`` separate client processes (Python
   clients are slow: one process cannot saturate the server) in closed loops for
   ``--seconds`` each path, bounded by ``--max-per-client`` requests.

Loopback only. Not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from automator67.v1 import auth_pb2, auth_pb2_grpc  # noqa: E402

from controller.gateway.config import GatewaySettings  # noqa: E402
from controller.gateway.process import ControllerProcess, EnvoyProcess  # noqa: E402
from controller.gateway.render import write_config  # noqa: E402
from tests.e2e.conftest import free_port  # noqa: E402

PATHS = ("grpc-direct", "grpc-envoy", "rest-envoy")
PASSWORD_HASH = "YmVuY2htYXJrLWNsaWVudC1zYWx0ZWQtaGFzaA=="
REST_PATH = "/api/v1/auth/me"


@dataclass(frozen=True)
class Target:
    grpc_direct: str
    envoy_host: str
    envoy_port: int
    token: str


def make_call(path: str, target: Target) -> tuple[Callable[[], None], Callable[[], None]]:
    """A function doing one GetCurrentUser over ``path`` (raising on failure), and its closer."""
    if path == "rest-envoy":
        connection = http.client.HTTPConnection(target.envoy_host, target.envoy_port, timeout=10)
        headers = {"authorization": f"Bearer {target.token}"}

        def rest() -> None:
            connection.request("GET", REST_PATH, headers=headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")

        return rest, connection.close
    address = target.grpc_direct if path == "grpc-direct" else f"{target.envoy_host}:{target.envoy_port}"
    channel = grpc.insecure_channel(address)
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    request = auth_pb2.GetCurrentUserRequest()
    metadata = (("authorization", f"Bearer {target.token}"),)

    def rpc() -> None:
        stub.GetCurrentUser(request, metadata=metadata, timeout=10)

    return rpc, channel.close


# -- sequential latency ------------------------------------------------------


def sequential(target: Target, requests: int, rounds: int, warmup: int) -> dict[str, list[float]]:
    calls = {path: make_call(path, target) for path in PATHS}
    samples: dict[str, list[float]] = {path: [] for path in PATHS}
    try:
        for call, _ in calls.values():
            for _ in range(warmup):
                call()
        per_round = max(1, requests // rounds)
        for round_no in range(rounds):
            order = PATHS if round_no % 2 == 0 else tuple(reversed(PATHS))
            for path in order:
                call = calls[path][0]
                out = samples[path]
                for _ in range(per_round):
                    start = time.perf_counter_ns()
                    call()
                    out.append((time.perf_counter_ns() - start) / 1e6)
    finally:
        for _, close in calls.values():
            close()
    return samples


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# -- throughput --------------------------------------------------------------


def _worker(path: str, target: Target, start_at: float, stop_at: float, limit: int) -> tuple[int, int]:
    call, close = make_call(path, target)
    done = errors = 0
    try:
        call()  # connect before the clock starts
        while time.time() < start_at:
            time.sleep(0.001)
        while done + errors < limit and time.time() < stop_at:
            try:
                call()
                done += 1
            except Exception:
                errors += 1
    finally:
        close()
    return done, errors


def throughput(
    pool: multiprocessing.pool.Pool, path: str, target: Target, clients: int, seconds: float, limit: int
) -> tuple[float, int, int]:
    start_at = time.time() + 1.0
    stop_at = start_at + seconds
    results = pool.starmap(_worker, [(path, target, start_at, stop_at, limit)] * clients)
    elapsed = min(time.time(), stop_at) - start_at
    done = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    return done / elapsed, done, errors


# -- setup -------------------------------------------------------------------


def register(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        reply = auth_pb2_grpc.AuthServiceStub(channel).Register(
            auth_pb2.RegisterRequest(
                email=f"bench-{uuid.uuid4().hex[:8]}@example.com", password_hash=PASSWORD_HASH
            )
        )
    return str(reply.access_token)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--requests", type=int, default=3000, help="sequential requests per path (default 3000)"
    )
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up requests per path (default 200)")
    parser.add_argument("--clients", type=int, default=4, help="client processes at saturation (default 4)")
    parser.add_argument("--seconds", type=float, default=5.0, help="saturation time per path (default 5)")
    parser.add_argument("--max-per-client", type=int, default=200_000, help="bound per client and path")
    parser.add_argument(
        "--envoy-concurrency",
        type=int,
        default=GatewaySettings.concurrency,
        help="Envoy worker threads (default: the gateway's default, 0 = one per CPU)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="a67-bench-") as tmp:
        work = Path(tmp)
        grpc_address = f"127.0.0.1:{free_port()}"
        controller = ControllerProcess(
            grpc_address,
            work / "data",
            node_listen_address=f"127.0.0.1:{free_port()}",
            extra_args=["--log-level", "WARNING"],
            log_path=work / "controller.log",
            own_session=False,
        )
        settings = GatewaySettings.from_env(
            {},
            listen_address=f"127.0.0.1:{free_port()}",
            upstream_address=grpc_address,
            concurrency=args.envoy_concurrency,
        )
        envoy = EnvoyProcess(
            write_config(settings, work / "envoy.yaml"),
            settings,
            log_path=work / "envoy.log",
            own_session=False,
        )
        try:
            controller.start()
            controller.wait_ready(60)
            envoy.start()
            envoy.wait_ready(30)
            host, port = settings.listen
            target = Target(grpc_address, host, port, register(grpc_address))

            print(
                f"GetCurrentUser, loopback; {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
                f"Python {platform.python_version()}, grpcio {grpc.__version__}, "
                f"Envoy concurrency {args.envoy_concurrency or 'one per CPU'}, "
                "controller: SQLite store, memory cache"
            )
            samples = sequential(target, args.requests, args.rounds, args.warmup)
            print(
                f"\nSequential latency, one client, {len(samples[PATHS[0]])} requests per path "
                f"in {args.rounds} interleaved rounds (ms):\n"
            )
            print("| path | p50 | p90 | p99 | mean |")
            print("|---|---:|---:|---:|---:|")
            stats = {}
            for path in PATHS:
                values = samples[path]
                stats[path] = (percentile(values, 50), percentile(values, 90), percentile(values, 99))
                p50, p90, p99 = stats[path]
                print(f"| {path} | {p50:.3f} | {p90:.3f} | {p99:.3f} | {statistics.fmean(values):.3f} |")
            added50 = stats["rest-envoy"][0] - stats["grpc-direct"][0]
            added99 = stats["rest-envoy"][2] - stats["grpc-direct"][2]
            hop50 = stats["grpc-envoy"][0] - stats["grpc-direct"][0]
            print(
                f"\nREST through Envoy adds p50 {added50:+.3f} ms (goal <= 1 ms: "
                f"{'met' if added50 <= 1 else 'MISSED'}), p99 {added99:+.3f} ms (goal <= 3 ms: "
                f"{'met' if added99 <= 3 else 'MISSED'}); the Envoy hop alone (gRPC) adds p50 {hop50:+.3f} ms."
            )

            print(
                f"\nThroughput at saturation, {args.clients} client processes, closed loop, "
                f"{args.seconds:g} s per path:\n"
            )
            print("| path | req/s | requests | errors |")
            print("|---|---:|---:|---:|")
            context = multiprocessing.get_context("spawn")
            with context.Pool(args.clients) as pool:
                for path in PATHS:
                    rate, done, errors = throughput(
                        pool, path, target, args.clients, args.seconds, args.max_per_client
                    )
                    print(f"| {path} | {rate:,.0f} | {done:,} | {errors} |")
        finally:
            envoy.stop()
            controller.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
