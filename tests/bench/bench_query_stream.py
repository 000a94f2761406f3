#!/usr/bin/env python3
"""StreamQuery end to end, and heartbeats while it runs.

    .venv/bin/python tests/bench/bench_query_stream.py --rows 1000000 --runs 3 --nodes 200 --seconds 20

Starts a real controller (``python -m controller.cli serve``, a subprocess: its RSS is
measured alone with psutil) and two real agents (``a67 agent`` subprocesses serving two
SQLite hash shards), seeds ``--rows`` rows directly into the shard files, then:

1. **stream**: one warm-up, then ``--runs`` runs of ``SELECT id, k, note FROM t ORDER BY id``
   through ``StreamQuery`` (agents → PushShardResult → k-way merge in a worker thread →
   batches to this client, which reads every value). Reported per run: rows/s end to end
   and the controller's RSS growth (peak during the run over its RSS before), with the
   in-process merge figure of BENCHMARKS.md ("merge, 2 shards") for comparison.
2. **heartbeats under load** (``--nodes`` > 0): ``--nodes`` simulated nodes (the load
   generator of bench_node_streams.py, one mTLS stream each, a heartbeat per second) for
   ``--seconds`` each under four loads, side by side in one run: none; a ``--package-mib``
   package (1 GiB) distributed over ``FetchPackage`` to 3 nodes again and again (three
   fetcher processes running the agent's own ``PackageCache``, as bench_packages.py);
   the 1M-row stream again and again; both at once. Reported: heartbeat → ack latency
   p50/p99 (or "max of N") per load, rows streamed and package bytes served.

The controller runs in a subprocess of this script (``--serve-controller``): the real
``start_controller`` plus a line on stdin to hand it a package and grant it to nodes (the
deployments service grants a package to the nodes it places a replica on).

Not a test: pytest does not collect it. Figures in BENCHMARKS.md, section "Query streams".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import psutil  # noqa: E402
from automator67.v1 import node_pb2, node_pb2_grpc, query_pb2, query_pb2_grpc  # noqa: E402

from controller.federation.query import key_type_from_sql, layout_from_proto  # noqa: E402
from tests.bench import bench_node_streams as streams  # noqa: E402
from tests.bench.stats import percentile, tail  # noqa: E402

SCHEMA = "CREATE TABLE t (id INTEGER PRIMARY KEY, k INTEGER NOT NULL, note TEXT NOT NULL)"
SQL = "SELECT id, k, note FROM t ORDER BY id"
SHARDING = query_pb2.Sharding(strategy=query_pb2.SHARDING_STRATEGY_HASH, shard_count=2, sharding_key="id")


FETCHER = r"""
import asyncio, json, shutil, sys, time
from pathlib import Path
import grpc
from automator67.v1 import node_pb2, node_pb2_grpc
from controller.agent.client import TARGET_NAME_OVERRIDE
from controller.agent.packages import PackageCache
from controller.keepalive import client_options
from controller.limits import node_channel_options

agent_dir, address, sha256, size, out, seconds = sys.argv[1:7]

async def main():
    creds = grpc.ssl_channel_credentials(
        root_certificates=(Path(agent_dir) / "ca.crt").read_bytes(),
        private_key=(Path(agent_dir) / "node.key").read_bytes(),
        certificate_chain=(Path(agent_dir) / "node.crt").read_bytes())
    options = [("grpc.ssl_target_name_override", TARGET_NAME_OVERRIDE), *client_options(1000),
               *node_channel_options(), ("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.secure_channel(address, creds, options=options) as channel:
        await channel.channel_ready()
        stub = node_pb2_grpc.NodeServiceStub(channel)
        async def fetch(digest, offset):
            async for chunk in stub.FetchPackage(node_pb2.FetchPackageRequest(sha256=digest, offset=offset)):
                yield chunk
        print("ready", flush=True)
        sys.stdin.readline()
        end = time.monotonic() + float(seconds)
        fetched = 0
        while time.monotonic() < end:  # again and again: a fresh cache each time
            shutil.rmtree(out, ignore_errors=True)
            await PackageCache(out, fetch).get(sha256, int(size))
            fetched += int(size)
        shutil.rmtree(out, ignore_errors=True)
        print(json.dumps({"bytes": fetched}), flush=True)

asyncio.run(main())
"""


def serve_controller(data_dir: str, port: int, node_port: int, xds_port: int, merge_processes: int) -> None:
    """The controller of this benchmark (in a process of its own): ``start_controller``, and
    stdin lines ``package <path> <sha256>`` (move the file into the package store) and
    ``grant <node id> <sha256>`` (as if a replica of it had been placed on the node)."""
    from controller.config import Settings
    from controller.server import start_controller

    async def run() -> None:
        settings = Settings.from_env(
            {},
            listen_address=f"127.0.0.1:{port}",
            node_listen_address=f"127.0.0.1:{node_port}",
            xds_listen_address=f"127.0.0.1:{xds_port}",
            data_dir=Path(data_dir),
            heartbeat_interval_seconds=1.0,
            log_level="WARNING",
            query_merge_processes=merge_processes,
        )
        controller = await start_controller(settings)
        loop = asyncio.get_running_loop()
        try:
            while line := await loop.run_in_executor(None, sys.stdin.readline):
                words = line.split()
                if words[0] == "package":
                    target = controller.deployments.packages.package_path(words[2])
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(words[1], target)
                elif words[0] == "grant":
                    controller.deployments._granted.add((words[1], words[2]))
                print("ok", flush=True)
        finally:
            await controller.stop(1.0)

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run())


class BenchController(streams.ControllerProc):
    def command(self, line: str) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == b"ok"


def start_bench_controller(data_dir: Path, merge_processes: int) -> BenchController:
    port, node_port, xds_port = streams.free_port(), streams.free_port(), streams.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("A67_")}
    log_path = data_dir / "controller.log"
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve-controller", str(data_dir), str(port), str(node_port), str(xds_port),
         str(merge_processes)],
        cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=open(log_path, "wb"),  # noqa: SIM115 - lives as long as the process
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"controller exited: {log_path.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            socket.create_connection(("127.0.0.1", node_port), 0.2).close()
        except OSError:
            time.sleep(0.1)
            continue
        return BenchController(proc, f"127.0.0.1:{port}", f"127.0.0.1:{node_port}", data_dir, log_path)
    proc.kill()
    raise RuntimeError("controller did not start")


class Distribution:
    """A ``mib`` MiB package fetched by 3 enrolled nodes, again and again, when told."""

    def __init__(self, ctl: BenchController, work: Path, token: str, mib: int) -> None:
        self.ctl = ctl
        self.work = work
        path = work / "package.bin"
        digest = hashlib.sha256()
        with path.open("wb") as out:
            for _ in range(mib):
                block = os.urandom(1024 * 1024)
                digest.update(block)
                out.write(block)
        self.sha256 = digest.hexdigest()
        self.size = mib * 1024 * 1024
        ctl.command(f"package {path} {self.sha256}")
        self.dirs = [work / f"fetcher-{i}" for i in range(3)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("A67_")} | {"A67_AGENT_TOKEN": token}
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "controller.cli",
                    "agent",
                    "--data-dir",
                    str(d),
                    "--region",
                    f"f{i}",
                    "--controller",
                    ctl.address,
                    "--log-level",
                    "WARNING",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for i, d in enumerate(self.dirs)
        ]
        deadline = time.monotonic() + 60
        while not all((d / "node.json").exists() for d in self.dirs):
            if time.monotonic() > deadline:
                raise SystemExit("fetcher nodes did not enroll")
            time.sleep(0.1)
        for p in procs:  # only their certificates are used
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=30)
        for d in self.dirs:
            ctl.command(f"grant {json.loads((d / 'node.json').read_text())['node_id']} {self.sha256}")

    def start(self, seconds: float) -> list[subprocess.Popen[bytes]]:
        fetchers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    FETCHER,
                    str(d),
                    self.ctl.node_address,
                    self.sha256,
                    str(self.size),
                    str(d / "cache"),
                    str(seconds),
                ],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            for d in self.dirs
        ]
        for f in fetchers:
            assert f.stdout is not None
            assert f.stdout.readline().strip() == b"ready"
        return fetchers

    @staticmethod
    def go(fetchers: list[subprocess.Popen[bytes]]) -> None:
        for f in fetchers:
            assert f.stdin is not None
            f.stdin.write(b"go\n")
            f.stdin.flush()

    @staticmethod
    def finish(fetchers: list[subprocess.Popen[bytes]]) -> int:
        served = 0
        for f in fetchers:
            assert f.stdout is not None
            served += json.loads(f.stdout.readline())["bytes"]
            f.wait()
        return served


def md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def setup(
    ctl: streams.ControllerProc, work: Path, rows: int, nodes: int
) -> tuple[str, str, list[subprocess.Popen[bytes]], list[str]]:
    token, tokens = streams.make_user_and_tokens(ctl.address, 2 + 4 * ((nodes + 99) // 100))
    env = {k: v for k, v in os.environ.items() if not k.startswith("A67_")} | {"A67_AGENT_TOKEN": tokens[0]}
    agents = []
    for name in ("a", "b"):
        args = [sys.executable, "-m", "controller.cli", "agent", "--data-dir", str(work / f"agent-{name}"),
                "--region", name, "--node-types", "database", "--controller", ctl.address,
                "--log-level", "WARNING"]  # fmt: skip
        agents.append(subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    with grpc.insecure_channel(ctl.address) as channel:
        nodes = node_pb2_grpc.NodeServiceStub(channel)
        deadline = time.monotonic() + 60
        while True:
            listed = nodes.ListNodes(node_pb2.ListNodesRequest(), metadata=md(token)).nodes
            ids = {n.region: n.id for n in listed if n.status == 2}
            if len(ids) == 2:
                break
            if time.monotonic() > deadline:
                raise SystemExit("agents did not become ready")
            time.sleep(0.1)
        stub = query_pb2_grpc.QueryServiceStub(channel)
        db_id = stub.CreateDatabase(
            query_pb2.CreateDatabaseRequest(
                name="bench",
                dialect="sqlite",
                sharding=SHARDING,
                shards=[
                    query_pb2.ShardPlacement(shard_index=0, primary_node_id=ids["a"]),
                    query_pb2.ShardPlacement(shard_index=1, primary_node_id=ids["b"]),
                ],
            ),
            metadata=md(token),
        ).database.id
        stub.ApplySchema(query_pb2.ApplySchemaRequest(db_id=db_id, ddl=SCHEMA), metadata=md(token))
    layout = layout_from_proto(SHARDING, key_type=key_type_from_sql("INTEGER"))
    by_shard: dict[int, list[tuple[int, int, str]]] = {0: [], 1: []}
    for i in range(rows):
        by_shard[layout.shard_for(i)].append((i, i % 1000, f"note-{i:07d}-{'x' * (i % 7)}"))
    for shard, name in ((0, "a"), (1, "b")):
        conn = sqlite3.connect(work / f"agent-{name}" / "shards" / db_id / f"{shard}.sqlite3")
        conn.executemany("INSERT INTO t VALUES (?, ?, ?)", by_shard[shard])
        conn.commit()
        conn.close()
    return token, db_id, agents, tokens[1:]  # the last one enrolls the package's fetchers


def stream_once(address: str, token: str, db_id: str, pid: int) -> tuple[int, float, int, int]:
    """Rows, seconds, controller RSS (with its merge workers) before and peak (sampled every
    20 ms by a thread)."""
    controller = psutil.Process(pid)

    def measure() -> int:
        total = controller.memory_info().rss
        for child in controller.children():
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return int(total)

    before = measure()
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], measure())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rows = 0
    started = time.perf_counter()
    with grpc.insecure_channel(address) as channel:
        call = query_pb2_grpc.QueryServiceStub(channel).StreamQuery(
            query_pb2.StreamQueryRequest(db_id=db_id, query=SQL, timeout_ms=300_000), metadata=md(token)
        )
        for message in call:
            for row in message.rows:
                for value in row.values:  # read every value, as a client would
                    value.WhichOneof("kind")
                rows += 1
    elapsed = time.perf_counter() - started
    stop.set()
    sampler.join()
    return rows, elapsed, before, peak[0]


def heartbeats(
    ctl: streams.ControllerProc, tokens: list[str], nodes: int, seconds: float, load: threading.Event | None
) -> list[float]:
    """Ack latencies (ms) of ``nodes`` simulated nodes over ``seconds`` (one worker process)."""
    per_token = [tokens[i // 100] for i in range(nodes)]
    ready = multiprocessing.Barrier(2)
    go = multiprocessing.Barrier(2)
    queue: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
    worker = multiprocessing.Process(
        target=streams._worker,
        args=(0, nodes, per_token, ctl.address, [("controller", ctl.node_address, True)], seconds, 1.0, 50, 50,
              ready, go, queue),
    )  # fmt: skip
    worker.start()
    ready.wait()
    if load is not None:
        load.set()
    go.wait()
    result = queue.get()
    worker.join()
    if result.errors:
        print(f"  heartbeat errors: {result.errors}")
    return list(result.latencies_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--package-mib", type=int, default=1024)
    parser.add_argument(
        "--merge-processes", type=int, default=2, help="A67_QUERY_MERGE_PROCESSES (0: merge in a thread)"
    )
    parser.add_argument("--serve-controller", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_controller:
        data_dir, port, node_port, xds_port, processes = args.serve_controller
        serve_controller(data_dir, int(port), int(node_port), int(xds_port), int(processes))
        return
    with tempfile.TemporaryDirectory(prefix="a67-bench-stream-") as tmp:
        work = Path(tmp)
        (work / "controller").mkdir()
        ctl = start_bench_controller(work / "controller", args.merge_processes)
        agents: list[subprocess.Popen[bytes]] = []
        try:
            token, db_id, agents, tokens = setup(ctl, work, args.rows, args.nodes)
            print(
                f"{args.rows} rows in 2 SQLite shards on 2 real agents; controller pid {ctl.proc.pid}, "
                f"merge processes {args.merge_processes}"
            )
            stream_once(ctl.address, token, db_id, ctl.proc.pid)  # warm-up
            rates = []
            for run in range(args.runs):
                rows, elapsed, before, peak = stream_once(ctl.address, token, db_id, ctl.proc.pid)
                assert rows == args.rows, rows
                rates.append(rows / elapsed)
                print(
                    f"  stream run {run + 1}: {rows / elapsed:,.0f} rows/s ({elapsed:.2f} s), controller RSS "
                    f"{before / 2**20:.0f} MiB, +{(peak - before) / 2**20:.1f} MiB at peak"
                )
            print(f"  stream median: {percentile(rates, 50):,.0f} rows/s")
            if args.nodes:
                heartbeats_under_load(args, ctl, work, token, db_id, tokens)
        finally:
            for agent in agents:
                agent.send_signal(signal.SIGTERM)
            for agent in agents:
                agent.wait(timeout=30)
            if ctl.proc.stdin is not None:
                ctl.proc.stdin.close()
            ctl.stop()


def heartbeats_under_load(
    args: argparse.Namespace, ctl: BenchController, work: Path, token: str, db_id: str, tokens: list[str]
) -> None:
    """Heartbeat → ack latency of ``--nodes`` nodes under each load, one after the other."""
    distribution = Distribution(ctl, work, tokens[-1], args.package_mib) if args.package_mib else None
    per_load = len(tokens[:-1]) // 4  # fresh nodes (enrollment tokens) for each load
    loads = ["none", "package", "query", "both"] if distribution else ["none", "query"]
    print(f"  {args.nodes} nodes, 1 heartbeat/s, {args.seconds:g} s per load; uptime: {os.getloadavg()}")
    for index, name in enumerate(loads):
        load = threading.Event()
        done = threading.Event()
        streamed = [0]
        fetchers = distribution.start(args.seconds) if distribution and name in ("package", "both") else []

        def keep_streaming(
            load: threading.Event = load, done: threading.Event = done, streamed: list[int] = streamed
        ) -> None:
            load.wait()
            while not done.is_set():
                streamed[0] += stream_once(ctl.address, token, db_id, ctl.proc.pid)[0]

        def start_fetchers(
            load: threading.Event = load, fetchers: list[subprocess.Popen[bytes]] = fetchers
        ) -> None:
            load.wait()
            Distribution.go(fetchers)

        runners = []
        if name in ("query", "both"):
            runners.append(threading.Thread(target=keep_streaming, daemon=True))
        if fetchers:
            runners.append(threading.Thread(target=start_fetchers, daemon=True))
        for runner in runners:
            runner.start()
        nodes_tokens = tokens[index * per_load : (index + 1) * per_load]
        latencies = heartbeats(ctl, nodes_tokens, args.nodes, args.seconds, load if runners else None)
        done.set()
        for runner in runners:
            runner.join()
        served = Distribution.finish(fetchers) if fetchers else 0
        label, value = tail(latencies)
        print(
            f"  load {name:8s}: p50 {percentile(latencies, 50):6.1f} ms, {label} {value:6.1f} ms "
            f"({len(latencies)} acks; {streamed[0]:,} rows streamed, {served / 2**30:.1f} GiB of package served)"
        )


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
