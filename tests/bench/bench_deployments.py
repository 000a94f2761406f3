#!/usr/bin/env python3
"""Deployments: a burst of CreateDeployment on N simulated nodes, and recovery after kill -9.

    .venv/bin/python tests/bench/bench_deployments.py burst --nodes 1000 --deployments 1000 --replicas 1
    .venv/bin/python tests/bench/bench_deployments.py burst --replicas 3 --postgres
    .venv/bin/python tests/bench/bench_deployments.py recovery --runs 20

Both start a real controller (``python -m controller.cli serve``, log level
WARNING, ``--heartbeat-interval 1`` by default) as a subprocess; SQLite in a
temp dir unless ``--postgres`` (a fresh database ``a67_bench_<pid>`` on
``postgresql+psycopg://postgres@127.0.0.1:5432``, created before and dropped
after) or ``--store-url``.

``burst``: one user, ``--nodes`` simulated nodes in ``--workers`` separate
processes (as in bench_node_streams.py: a P-256 key + CSR per node,
RegisterNode, one mTLS channel per node, Connect + hello (2 cores, 4 GB) ->
hello_ack, one heartbeat per interval, no replicas reported). Every node
answers each DeployReplica at once with ok=True and the payload
``{"endpoint": "http://127.0.0.1:<20000+i>", "pid": 1}`` (StopReplica: ok).
Once ListNodes shows all nodes READY, the main process fires ``--deployments``
CreateDeployment calls at once (over ``--channels`` grpc.aio connections, each with its own
tiny source tar.gz and a unique name, ``--replicas`` per deployment, 64MB /
0.1 CPU), then polls ListDeployments (pages of 500) every ``--poll`` s until
all are ``running`` with all replicas. Reported: CreateDeployment latency
p50/p99/max, accepted per second (accepted / time from first call to last
answer), time from the first call until all are running, placements/s =
replicas running / that time, errors by code, and the DeployReplica commands
the nodes answered; then (``--rest``, default 10 s) the controller's CPU at rest with
every deployment running and the nodes heartbeating.

``recovery``: 3 real agents (``python -m controller.cli agent``) in 3 regions,
one deployment with 1 replica of a real tiny HTTP app (health check ``/``,
interval 2 s, timeout 1 s, retries 1: the manifest minimum). Each of
``--runs`` runs: find the node that hosts the replica, wait a random 0-1 s,
kill -9 its agent, then poll GetDeployment every ``--poll`` s until the
replica's assignment is on another node with status ``running`` and a GET on
its endpoint answers 200; recovery = that time - kill time. Then restart the
killed agent (same data dir, no token) and wait until 3 nodes are READY and the
deployment is running before the next run. Goal (issue 4): p99 <= 10 s.
By design, the controller marks a node failed ~3.1-3.35 intervals after its last
heartbeat and holds recovery one more interval (the mass-failure window).

Loopback only. Not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import io
import json
import math
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import psutil  # noqa: E402
from automator67.v1 import (  # noqa: E402
    common_pb2,
    deployment_pb2,
    deployment_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
)

from tests.bench.bench_node_streams import (  # noqa: E402
    SimNode,
    _code,
    make_user_and_tokens,
    start_controller,
)
from tests.bench.stats import describe  # noqa: E402

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


# --------------------------------------------------------------------------- controller / store


@contextlib.contextmanager
def store(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The store URL to use (None = SQLite default); a fresh PostgreSQL database with --postgres."""
    if not args.postgres:
        yield args.store_url
        return
    import psycopg

    name = f"a67_bench_{os.getpid()}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def source_tar_gz(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def md_of(access: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {access}"),)


def list_nodes(stub: node_pb2_grpc.NodeServiceStub, md: tuple[tuple[str, str], ...]) -> list[node_pb2.Node]:
    nodes: list[node_pb2.Node] = []
    token = ""
    while True:
        page = stub.ListNodes(
            node_pb2.ListNodesRequest(page_size=500, page_token=token), metadata=md, timeout=30
        )
        nodes.extend(page.nodes)
        token = page.next_page_token
        if not token:
            return nodes


# --------------------------------------------------------------------------- burst: node side


@dataclass
class NodeWorkerResult:
    worker: int
    nodes: int
    enrolled: int = 0
    connected: int = 0
    deploys: int = 0
    stops: int = 0
    other_commands: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    cpu_seconds: float = 0.0


async def _node_worker_main(
    index: int,
    first: int,
    tokens: list[str],
    address: str,
    node_address: str,
    interval: float,
    enroll_concurrency: int,
    connect_concurrency: int,
    ready: multiprocessing.synchronize.Barrier,
    stop: multiprocessing.synchronize.Event,
) -> NodeWorkerResult:
    count = len(tokens)
    result = NodeWorkerResult(worker=index, nodes=count)
    errors: collections.Counter[str] = collections.Counter()
    nodes = [SimNode() for _ in range(count)]
    sem = asyncio.Semaphore(enroll_concurrency)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = node_pb2_grpc.NodeServiceStub(channel)

        async def enroll(i: int, node: SimNode) -> None:
            async with sem:
                try:
                    node.reply = await stub.RegisterNode(node.request(tokens[i], first + i), timeout=60)
                except Exception as err:
                    errors["enroll " + _code(err)] += 1

        await asyncio.gather(*(enroll(i, n) for i, n in enumerate(nodes)))
    enrolled = [(first + i, n) for i, n in enumerate(nodes) if n.reply is not None]
    result.enrolled = len(enrolled)

    counts = collections.Counter[str]()
    sem = asyncio.Semaphore(connect_concurrency)
    channels: list[grpc.aio.Channel] = []
    tasks: list[asyncio.Task[None]] = []

    async def requests(outbox: asyncio.Queue[node_pb2.ConnectRequest | None]):  # type: ignore[no-untyped-def]
        while (message := await outbox.get()) is not None:
            yield message

    async def beat(outbox: asyncio.Queue[node_pb2.ConnectRequest | None]) -> None:
        await asyncio.sleep(random.random() * interval)
        seq = 0
        metrics = common_pb2.NodeMetrics(cpu_percent=10, memory_percent=20, disk_percent=30)
        while True:
            seq += 1
            await outbox.put(
                node_pb2.ConnectRequest(heartbeat=node_pb2.Heartbeat(sequence=seq, metrics=metrics))
            )
            await asyncio.sleep(interval)

    async def read(call: grpc.aio.StreamStreamCall, outbox: asyncio.Queue, port: int) -> None:  # type: ignore[type-arg]
        payload = json.dumps({"endpoint": f"http://127.0.0.1:{port}", "pid": 1}).encode()
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                if message.WhichOneof("message") != "command":
                    continue
                command = message.command
                reply = node_pb2.CommandResult(command_id=command.command_id, ok=True)
                if command.HasField("deploy_replica"):
                    counts["deploys"] += 1
                    reply.payload = payload
                elif command.HasField("stop_replica"):
                    counts["stops"] += 1
                else:
                    counts["other"] += 1
                await outbox.put(node_pb2.ConnectRequest(result=reply))
        except asyncio.CancelledError:
            raise
        except Exception as err:
            errors["stream " + _code(err)] += 1

    async def connect(i: int, node: SimNode) -> None:
        async with sem:
            channel = node.channel(node_address)
            outbox: asyncio.Queue[node_pb2.ConnectRequest | None] = asyncio.Queue()
            try:
                call = node_pb2_grpc.NodeServiceStub(channel).Connect(requests(outbox))
                await outbox.put(
                    node_pb2.ConnectRequest(
                        hello=node_pb2.NodeHello(
                            agent_version="bench",
                            capabilities=common_pb2.NodeCapabilities(cpu_cores=2, memory_gb=4, disk_gb=20),
                        )
                    )
                )
                while True:
                    msg = await asyncio.wait_for(call.read(), 30)
                    if msg is grpc.aio.EOF:
                        raise RuntimeError("EOF before hello_ack")
                    if msg.WhichOneof("message") == "hello_ack":
                        break
                channels.append(channel)
                tasks.append(asyncio.create_task(read(call, outbox, 20000 + i)))
                tasks.append(asyncio.create_task(beat(outbox)))
            except Exception as err:
                errors["connect " + _code(err)] += 1
                await channel.close()

    await asyncio.gather(*(connect(i, n) for i, n in enrolled))
    result.connected = len(channels)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, ready.wait)
    await loop.run_in_executor(None, stop.wait)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
    result.deploys = counts["deploys"]
    result.stops = counts["stops"]
    result.other_commands = counts["other"]
    result.errors = dict(errors)
    usage = psutil.Process().cpu_times()
    result.cpu_seconds = usage.user + usage.system
    return result


def _node_worker(index: int, first: int, tokens: list[str], *args: object) -> None:
    queue = args[-1]
    try:
        result = asyncio.run(_node_worker_main(index, first, tokens, *args[:-1]))  # type: ignore[arg-type]
    except Exception as err:
        result = NodeWorkerResult(worker=index, nodes=len(tokens), errors={"worker " + _code(err): 1})
    queue.put(result)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- burst: main


async def _burst_client(
    address: str,
    access: str,
    count: int,
    replicas: int,
    poll: float,
    limit_seconds: float,
    channels_n: int,
    in_flight: int,
) -> dict[str, object]:
    md = md_of(access)
    # A grpc.aio client holding ~1,000 calls at once cancels some of them itself (they never
    # reach the server), so the burst keeps at most ``in_flight`` calls outstanding.
    gate = asyncio.Semaphore(in_flight)
    sources = [source_tar_gz({"app.py": f"print('hello {i}')\n"}) for i in range(count)]
    requests = [
        deployment_pb2.CreateDeploymentRequest(
            manifest=deployment_pb2.DeploymentManifest(
                name=f"bench-{i}",
                app_type=deployment_pb2.APP_TYPE_BACKEND,
                runtime="python",
                entrypoint="app.py",
                resources=deployment_pb2.Resources(memory="64MB", cpu="0.1"),
                replicas=replicas,
            ),
            source_tar_gz=sources[i],
        )
        for i in range(count)
    ]
    errors: collections.Counter[str] = collections.Counter()
    first_debug: dict[str, str] = {}
    latencies: list[float] = []
    accepted: list[str] = []
    # a few client connections (distinct channel args: no shared subchannel)
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1), ("bench.ch", i)])
        for i in range(channels_n)
    ]
    async with contextlib.AsyncExitStack() as stack:
        for ch in channels:
            await stack.enter_async_context(ch)
        stubs = [deployment_pb2_grpc.DeploymentServiceStub(ch) for ch in channels]
        stub = stubs[0]

        async def create(req: deployment_pb2.CreateDeploymentRequest, i: int) -> None:
            async with gate:
                sent = time.perf_counter()
                try:
                    response = await stubs[i % channels_n].CreateDeployment(
                        req, metadata=md, timeout=limit_seconds
                    )
                except Exception as err:
                    errors["create " + _code(err)] += 1
                    if isinstance(err, grpc.aio.AioRpcError):  # the transport's own account, once per code
                        first_debug.setdefault(err.code().name, f"{err.debug_error_string()}"[:300])
                    return
            latencies.append((time.perf_counter() - sent) * 1000)
            accepted.append(response.deployment_id)

        t0 = time.perf_counter()
        await asyncio.gather(*(create(r, i) for i, r in enumerate(requests)))
        t_answered = time.perf_counter() - t0

        # poll until every accepted deployment is running with all replicas
        done_at = None
        last_counts: dict[str, int] = {}
        deadline = time.perf_counter() + limit_seconds
        polls = 0
        while time.perf_counter() < deadline:
            statuses: collections.Counter[str] = collections.Counter()
            placed = 0
            token = ""
            try:
                while True:
                    page = await stub.ListDeployments(
                        deployment_pb2.ListDeploymentsRequest(page_size=500, page_token=token),
                        metadata=md,
                        timeout=30,
                    )
                    for d in page.deployments:
                        statuses[deployment_pb2.DeploymentStatus.Name(d.status)] += 1
                        placed += sum(1 for a in d.node_assignments if a.status == "running")
                    token = page.next_page_token
                    if not token:
                        break
            except Exception as err:
                errors["list " + _code(err)] += 1
                await asyncio.sleep(poll)
                continue
            polls += 1
            last_counts = dict(statuses)
            running = statuses.get("DEPLOYMENT_STATUS_RUNNING", 0)
            if accepted and running >= len(accepted) and placed >= len(accepted) * replicas:
                done_at = time.perf_counter() - t0
                break
            await asyncio.sleep(poll)
    return {
        "latencies": latencies,
        "accepted": len(accepted),
        "answered_s": t_answered,
        "done_s": done_at,
        "placed": placed,
        "statuses": last_counts,
        "errors": dict(errors),
        "first_debug": first_debug,
        "polls": polls,
    }


def burst(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="a67-bench-deploy-") as tmp, store(args) as store_url:
        ctl = start_controller(Path(tmp), args.interval, timeout=60.0, store_url=store_url)
        procs: list[multiprocessing.process.BaseProcess] = []
        ctx = multiprocessing.get_context("spawn")
        stop = ctx.Event()
        try:
            t0 = time.monotonic()
            access, tokens = make_user_and_tokens(ctl.address, math.ceil(args.nodes / 100))
            print(f"store {store_url or 'sqlite (default)'}; controller pid {ctl.proc.pid}", flush=True)
            ready = ctx.Barrier(args.workers + 1)
            queue = ctx.Queue()
            per = [args.nodes // args.workers + (1 if i < args.nodes % args.workers else 0)
                   for i in range(args.workers)]  # fmt: skip
            first = 0
            for i, count in enumerate(per):
                worker_tokens = [tokens[(first + j) // 100] for j in range(count)]
                p = ctx.Process(
                    target=_node_worker,
                    args=(i, first, worker_tokens, ctl.address, ctl.node_address, args.interval,
                          max(1, 50 // args.workers), max(1, 100 // args.workers), ready, stop, queue),
                )  # fmt: skip
                p.start()
                procs.append(p)
                first += count
            ready.wait(timeout=600)
            print(f"{args.nodes} nodes enrolled and connected in {time.monotonic() - t0:.1f} s", flush=True)
            md = md_of(access)
            with grpc.insecure_channel(ctl.address) as channel:
                nstub = node_pb2_grpc.NodeServiceStub(channel)
                deadline = time.monotonic() + 120
                while True:
                    nodes = list_nodes(nstub, md)
                    n_ready = sum(1 for n in nodes if n.status == common_pb2.NODE_STATUS_READY)
                    if n_ready >= args.nodes:
                        break
                    if time.monotonic() > deadline:
                        print(f"only {n_ready}/{args.nodes} nodes READY; going on", flush=True)
                        break
                    time.sleep(1)
            print(f"{n_ready} nodes READY; settling {args.settle:g} s", flush=True)
            time.sleep(args.settle)
            ctl_ps = psutil.Process(ctl.proc.pid)
            cpu0 = ctl_ps.cpu_times()
            rss_peak = [ctl_ps.memory_info().rss]
            sampling = [True]

            def sample() -> None:
                while sampling[0]:
                    with contextlib.suppress(psutil.Error):
                        rss_peak[0] = max(rss_peak[0], ctl_ps.memory_info().rss)
                    time.sleep(0.5)

            import threading

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            spy = None
            if args.pyspy:  # sample the controller for the whole burst (stopped with SIGINT)
                spy = subprocess.Popen(
                    [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(ctl.proc.pid), "-r",
                     str(args.pyspy_rate), "--nonblocking", "-f", "raw", "-o", args.pyspy,
                     *(["--gil"] if args.pyspy_gil else [])],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
            wall0 = time.monotonic()
            out = asyncio.run(
                _burst_client(
                    ctl.address,
                    access,
                    args.deployments,
                    args.replicas,
                    args.poll,
                    args.timeout,
                    args.channels,
                    args.in_flight,
                )
            )
            wall = time.monotonic() - wall0
            sampling[0] = False
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
            cpu1 = ctl_ps.cpu_times()
            ctl_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
            rest_cpu = None
            if args.rest > 0:  # the controller with every deployment running and nothing changing
                time.sleep(1.0)
                before = ctl_ps.cpu_times()
                time.sleep(args.rest)
                after = ctl_ps.cpu_times()
                rest_cpu = (after.user + after.system) - (before.user + before.system)
            stop.set()
            results = [queue.get(timeout=120) for _ in procs]
        finally:
            stop.set()
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
            ctl.stop()
            with contextlib.suppress(OSError):
                Path("/tmp/bench_deployments_controller.log").write_bytes(
                    ctl.log_path.read_bytes()[-200_000:]
                )

    lat = out["latencies"]  # type: ignore[assignment]
    assert isinstance(lat, list)
    node_errors: collections.Counter[str] = collections.Counter()
    for r in results:
        node_errors.update(r.errors)
    deploys = sum(r.deploys for r in results)
    print()
    print(f"nodes={args.nodes} (enrolled {sum(r.enrolled for r in results)}, connected "
          f"{sum(r.connected for r in results)}, workers={args.workers}) deployments={args.deployments} "
          f"replicas={args.replicas} interval={args.interval:g}s store={store_url or 'sqlite'}")  # fmt: skip
    if lat:
        print(f"CreateDeployment latency: {describe(lat, 'ms', 1)}")
    accepted = int(out["accepted"])  # type: ignore[call-overload]
    print(f"accepted {accepted}/{args.deployments} in {out['answered_s']:.2f} s "
          f"-> {accepted / out['answered_s']:.1f} accepted/s")  # type: ignore[operator]  # fmt: skip
    done = out["done_s"]
    if done is not None:
        print(f"all {accepted} running after {done:.2f} s (from the first call; poll {args.poll:g} s, "
              f"{out['polls']} polls) -> placements/s = {out['placed']} / {done:.2f} = "
              f"{int(out['placed']) / done:.1f}")  # type: ignore[call-overload, operator]  # fmt: skip
    else:
        print(
            f"NOT all running within {args.timeout:g} s: {out['statuses']}, replicas running {out['placed']}"
        )
    print(f"last poll statuses: {out['statuses']}")
    print(f"DeployReplica answered by nodes: {deploys}; StopReplica: {sum(r.stops for r in results)}; "
          f"other commands: {sum(r.other_commands for r in results)}")  # fmt: skip
    print(f"controller CPU during burst+poll: {ctl_cpu:.1f} s over {wall:.1f} s "
          f"({100 * ctl_cpu / wall:.0f} % of one core); peak RSS {rss_peak[0] / 2**20:.0f} MiB")  # fmt: skip
    if rest_cpu is not None:
        print(f"controller CPU at rest afterwards ({accepted} deployments running, nodes heartbeating): "
              f"{100 * rest_cpu / args.rest:.1f} % of one core over {args.rest:g} s")  # fmt: skip
    print(f"node workers CPU (whole life): {sum(r.cpu_seconds for r in results):.1f} s")
    print(f"errors (client): {out['errors'] or 'none'}")
    for code, debug in dict(out["first_debug"]).items():  # type: ignore[call-overload]
        print(f"  first {code} as the client's transport saw it: {debug}")
    print(f"errors (nodes): {dict(node_errors) or 'none'}")


# --------------------------------------------------------------------------- recovery

APP = """\
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""

REGIONS = ("eu-west", "us-east", "ap-south")


def start_agent(address: str, data_dir: Path, token: str | None, region: str) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "controller.cli", "agent", "--data-dir", str(data_dir), "--region", region,
            "--advertise-host", "127.0.0.1"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("A67_")}
    if token is not None:
        args += ["--controller", address]
        env["A67_AGENT_TOKEN"] = token
    log = open(data_dir.parent / f"agent-{region}.log", "ab")  # noqa: SIM115
    return subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # fmt: skip


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 (loopback)
            return response.status == 200
    except OSError:
        return False


def recovery(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="a67-bench-recovery-") as tmp, store(args) as store_url:
        base = Path(tmp)
        (base / "controller").mkdir()
        ctl = start_controller(base / "controller", args.interval, timeout=60.0, store_url=store_url)
        agents: dict[str, subprocess.Popen[bytes]] = {}
        try:
            access, tokens = make_user_and_tokens(ctl.address, 1, max_uses=3)
            md = md_of(access)
            channel = grpc.insecure_channel(ctl.address)
            nstub = node_pb2_grpc.NodeServiceStub(channel)
            dstub = deployment_pb2_grpc.DeploymentServiceStub(channel)
            for region in REGIONS:
                (base / region).mkdir()
                agents[region] = start_agent(ctl.address, base / region, tokens[0], region)

            def wait_for(check, what: str, within: float):  # type: ignore[no-untyped-def]
                deadline = time.monotonic() + within
                while True:
                    value = check()
                    if value:
                        return value
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"timed out waiting for {what}")
                    time.sleep(args.poll)

            def three_ready() -> list[node_pb2.Node] | None:
                nodes = list_nodes(nstub, md)
                ok = len(nodes) == 3 and all(n.status == common_pb2.NODE_STATUS_READY for n in nodes)
                return nodes if ok else None

            nodes = wait_for(three_ready, "3 READY agents", 90)
            region_of = {n.id: n.region for n in nodes}
            response = dstub.CreateDeployment(
                deployment_pb2.CreateDeploymentRequest(
                    manifest=deployment_pb2.DeploymentManifest(
                        name="hello",
                        app_type=deployment_pb2.APP_TYPE_BACKEND,
                        runtime="python",
                        entrypoint="app.py",
                        resources=deployment_pb2.Resources(memory="64MB", cpu="0.1"),
                        replicas=1,
                        health_check=deployment_pb2.HealthCheck(
                            path="/", interval_seconds=2, timeout_seconds=1, retries=1
                        ),
                    ),
                    source_tar_gz=source_tar_gz({"app.py": APP}),
                ),
                metadata=md,
                timeout=30,
            )
            dep_id = response.deployment_id

            def get() -> deployment_pb2.Deployment:
                return dstub.GetDeployment(
                    deployment_pb2.GetDeploymentRequest(deployment_id=dep_id), metadata=md, timeout=10
                ).deployment

            def healthy() -> deployment_pb2.NodeAssignment | None:
                d = get()
                if d.status != deployment_pb2.DEPLOYMENT_STATUS_RUNNING or not d.node_assignments:
                    return None
                a = d.node_assignments[0]
                return a if a.status == "running" and answers(a.endpoint) else None

            wait_for(healthy, "the deployment running", 90)
            recoveries: list[float] = []
            seen_running: list[float] = []
            from_hb: list[float] = []
            to_failed: list[float] = []
            for run in range(args.runs):
                victim = wait_for(healthy, "the replica healthy before the run", 60)
                region = region_of[victim.node_id]
                time.sleep(1.0 + random.random() * args.interval)
                agents[region].send_signal(signal.SIGKILL)
                killed = time.monotonic()
                agents[region].wait()
                running_at = None
                failed_at = None
                while True:
                    now = time.monotonic()
                    if failed_at is None:
                        victim_node = nstub.GetNode(
                            node_pb2.GetNodeRequest(node_id=victim.node_id), metadata=md, timeout=10
                        ).node
                        if victim_node.status == common_pb2.NODE_STATUS_FAILED:
                            failed_at = time.monotonic() - killed
                    if now - killed > args.timeout:
                        raise RuntimeError(f"run {run + 1}: not recovered within {args.timeout:g} s: {get()}")
                    d = get()
                    a = d.node_assignments[0] if d.node_assignments else None
                    if a is not None and a.node_id != victim.node_id and a.status == "running":
                        if running_at is None:
                            running_at = time.monotonic() - killed
                        if answers(a.endpoint):
                            break
                    time.sleep(args.poll)
                took = time.monotonic() - killed
                healthy_wall = time.time()
                recoveries.append(took)
                victim_node = nstub.GetNode(
                    node_pb2.GetNodeRequest(node_id=victim.node_id), metadata=md, timeout=10
                ).node
                last_hb = victim_node.last_heartbeat.ToDatetime(tzinfo=UTC).timestamp()
                from_hb.append(healthy_wall - last_hb)
                if failed_at is not None:
                    to_failed.append(failed_at)
                seen_running.append(running_at if running_at is not None else took)
                print(f"run {run + 1:3d}: {region} killed; replica healthy on "
                      f"{region_of.get(a.node_id, a.node_id)} after {took:.3f} s "
                      f"(running in GetDeployment after {seen_running[-1]:.3f} s; node FAILED seen after "
                      f"{failed_at if failed_at is not None else float('nan'):.3f} s; "
                      f"last heartbeat -> healthy {from_hb[-1]:.3f} s)", flush=True)  # fmt: skip
                # kill -9 leaves the app child of the killed agent: it is fenced when the agent returns.
                agents[region] = start_agent(ctl.address, base / region, None, region)
                wait_for(three_ready, "3 READY agents again", 60)
            print()
            print(f"runs={len(recoveries)} interval={args.interval:g}s poll={args.poll * 1000:.0f}ms "
                  f"store={store_url or 'sqlite'} health check / every 2 s, timeout 1 s, retries 1")  # fmt: skip
            print(f"kill -9 -> replica healthy elsewhere (GET answers)  {describe(recoveries, 's')}")
            print(f"kill -9 -> assignment running in GetDeployment     {describe(seen_running, 's')}")
            print(f"last heartbeat -> replica healthy elsewhere       {describe(from_hb, 's')}")
            if to_failed:
                print(f"kill -9 -> node FAILED (seen)                    {describe(to_failed, 's')}")
            print("goal: p99 <= 10 s")
            channel.close()
        finally:
            for proc in agents.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in agents.values():
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            ctl.stop()
            # app processes orphaned by kill -9 (their agent died before stopping them)
            for p in psutil.process_iter(["cmdline"]):
                with contextlib.suppress(psutil.Error):
                    if any(tmp in part for part in (p.info["cmdline"] or [])):
                        p.kill()


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("burst", "recovery"):
        p = sub.add_parser(name)
        p.add_argument("--interval", type=float, default=1.0, help="heartbeat interval, s")
        p.add_argument("--store-url", default=None, help="SQLAlchemy URL (default: SQLite in the temp dir)")
        p.add_argument("--postgres", action="store_true", help="a fresh database on 127.0.0.1:5432")
    b = sub.choices["burst"]
    b.add_argument("--nodes", type=int, default=1000)
    b.add_argument("--deployments", type=int, default=1000)
    b.add_argument("--replicas", type=int, default=1)
    b.add_argument("--workers", type=int, default=3)
    b.add_argument("--poll", type=float, default=0.25)
    b.add_argument("--channels", type=int, default=4, help="client connections for the burst")
    b.add_argument(
        "--in-flight", type=int, default=100, help="most CreateDeployment calls outstanding at once"
    )
    b.add_argument("--pyspy", default=None, help="py-spy raw profile of the controller during the burst")
    b.add_argument("--pyspy-rate", type=int, default=100, help="py-spy samples per second")
    b.add_argument(
        "--pyspy-gil", action="store_true", help="sample only the thread holding the GIL (Python's CPU)"
    )
    b.add_argument("--settle", type=float, default=3.0)
    b.add_argument(
        "--rest",
        type=float,
        default=10.0,
        help="then the controller's CPU with nothing changing, over this many s",
    )
    b.add_argument("--timeout", type=float, default=180.0)
    r = sub.choices["recovery"]
    r.add_argument("--runs", type=int, default=20)
    r.add_argument("--poll", type=float, default=0.05)
    r.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    (burst if args.command == "burst" else recovery)(args)


if __name__ == "__main__":
    main()
