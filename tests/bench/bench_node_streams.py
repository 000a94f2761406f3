#!/usr/bin/env python3
"""N simulated nodes, each with its own mTLS stream, heartbeating once per second.

    .venv/bin/python tests/bench/bench_node_streams.py --nodes 1000 --seconds 30 --workers 3

Starts a real controller (``python -m controller.cli serve``, SQLite in a temp
dir, log level WARNING, ``--heartbeat-interval 1``) as a subprocess, registers
one user, makes ceil(N/100) enrollment tokens (max_uses=100), then starts
``--workers`` load-generator processes. Each worker owns N/W nodes:

1. enrollment: a P-256 key + CSR per node and ``NodeService.RegisterNode``,
   ``--enroll-concurrency`` (default 50 in total) in flight;
2. connect: one mTLS channel *per node* (the node identity is its client
   certificate, so two nodes can never share a TLS connection: N streams means
   N TCP+TLS connections, exactly as in production), ``Connect`` + hello ->
   hello_ack, a bounded number of handshakes in flight;
3. measure: every stream sends one heartbeat per second (random phase) for
   ``--seconds`` and times heartbeat -> heartbeat_ack.

Reported: streams held (at start and end of the window), heartbeats acked per
second, ack latency p50/p99/max, controller RSS and CPU (psutil on the
controller pid, sampled each second; 100 % = one core), errors by status code,
and the load generators' own CPU (they share the 2 cores with the controller).

Loopback only. Not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import math
import multiprocessing
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import psutil  # noqa: E402
from automator67.v1 import (  # noqa: E402
    auth_pb2,
    auth_pb2_grpc,
    common_pb2,
    node_pb2,
    node_pb2_grpc,
)
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

SERVER_NAME = "automator67-controller"
PASSWORD_HASH = "YmVuY2htYXJrLWNsaWVudC1zYWx0ZWQtaGFzaA=="


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- controller


@dataclass
class ControllerProc:
    proc: subprocess.Popen[bytes]
    address: str
    node_address: str
    data_dir: Path
    log_path: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_controller(
    data_dir: Path, interval: float = 1.0, timeout: float = 30.0, store_url: str | None = None
) -> ControllerProc:
    """``controller.cli serve`` on free ports (SQLite in ``data_dir`` unless ``store_url``)."""
    port, node_port = free_port(), free_port()
    log_path = data_dir / "controller.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("A67_")}
    args = [
        sys.executable, "-m", "controller.cli", "serve",
        "--listen", f"127.0.0.1:{port}",
        "--node-listen", f"127.0.0.1:{node_port}",
        "--data-dir", str(data_dir),
        "--heartbeat-interval", str(interval),
        "--log-level", "WARNING",
    ]  # fmt: skip
    if store_url:
        args += ["--store-url", store_url]
    log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"controller exited: {log_path.read_text()[-2000:]}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), 0.2),
            socket.create_connection(("127.0.0.1", node_port), 0.2),
        ):
            return ControllerProc(proc, f"127.0.0.1:{port}", f"127.0.0.1:{node_port}", data_dir, log_path)
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("controller did not start")


def make_user_and_tokens(address: str, count: int, max_uses: int = 100) -> tuple[str, list[str]]:
    with grpc.insecure_channel(address) as channel:
        auth = auth_pb2_grpc.AuthServiceStub(channel)
        access = auth.Register(
            auth_pb2.RegisterRequest(email="bench@example.com", password_hash=PASSWORD_HASH)
        ).access_token
        stub = node_pb2_grpc.NodeServiceStub(channel)
        md = (("authorization", f"Bearer {access}"),)
        tokens = [
            stub.CreateEnrollmentToken(
                node_pb2.CreateEnrollmentTokenRequest(max_uses=max_uses), metadata=md
            ).token
            for _ in range(count)
        ]
    return access, tokens


# --------------------------------------------------------------------------- node side


class SimNode:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        spki = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.fingerprint = hashlib.sha256(spki).hexdigest()
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node")]))
            .sign(self.key, hashes.SHA256())
        )
        self.csr_pem = csr.public_bytes(serialization.Encoding.PEM).decode()
        self.reply: node_pb2.RegisterNodeResponse | None = None

    def request(self, token: str, index: int) -> node_pb2.RegisterNodeRequest:
        return node_pb2.RegisterNodeRequest(
            enrollment_token=token,
            provider=common_pb2.PROVIDER_RENDER,
            endpoint=f"https://bench-{index}.onrender.com",
            region="eu-west",
            capabilities=common_pb2.NodeCapabilities(cpu_cores=2, memory_gb=4, disk_gb=20),
            csr_pem=self.csr_pem,
            fingerprint=self.fingerprint,
        )

    def channel(self, node_address: str) -> grpc.aio.Channel:
        assert self.reply is not None
        key_pem = self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.reply.ca_certificate_pem.encode(),
            private_key=key_pem,
            certificate_chain=self.reply.certificate_pem.encode(),
        )
        return grpc.aio.secure_channel(
            node_address,
            credentials,
            options=[
                ("grpc.ssl_target_name_override", SERVER_NAME),
                # one connection per node, never pooled with another node's
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )


def _code(err: BaseException) -> str:
    if isinstance(err, grpc.aio.AioRpcError):
        details = (err.details() or "")[:80]
        return f"{err.code().name}: {details}"
    return f"{type(err).__name__}: {str(err)[:80]}"


@dataclass
class WorkerResult:
    worker: int
    nodes: int
    enrolled: int = 0
    enroll_seconds: float = 0.0
    connected: int = 0
    connect_seconds: float = 0.0
    held_at_end: int = 0
    acks: int = 0
    sent: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    cpu_seconds: float = 0.0


async def _worker_main(
    index: int,
    count: int,
    tokens: list[str],
    address: str,
    node_address: str,
    seconds: float,
    interval: float,
    enroll_concurrency: int,
    connect_concurrency: int,
    ready: multiprocessing.synchronize.Barrier,
    go: multiprocessing.synchronize.Barrier,
) -> WorkerResult:
    result = WorkerResult(worker=index, nodes=count)
    errors: collections.Counter[str] = collections.Counter()

    # 1. enrollment
    t0 = time.monotonic()
    nodes = [SimNode() for _ in range(count)]
    sem = asyncio.Semaphore(enroll_concurrency)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = node_pb2_grpc.NodeServiceStub(channel)

        async def enroll(i: int, node: SimNode) -> None:
            async with sem:
                try:
                    node.reply = await stub.RegisterNode(node.request(tokens[i], i), timeout=60)
                except Exception as err:
                    errors["enroll " + _code(err)] += 1

        await asyncio.gather(*(enroll(i, n) for i, n in enumerate(nodes)))
    nodes = [n for n in nodes if n.reply is not None]
    result.enrolled = len(nodes)
    result.enroll_seconds = time.monotonic() - t0

    # 2. connect
    t0 = time.monotonic()
    sem = asyncio.Semaphore(connect_concurrency)
    streams: list[tuple[grpc.aio.Channel, grpc.aio.StreamStreamCall]] = []

    async def connect(node: SimNode) -> None:
        async with sem:
            channel = node.channel(node_address)
            try:
                call = node_pb2_grpc.NodeServiceStub(channel).Connect()
                await call.write(node_pb2.ConnectRequest(hello=node_pb2.NodeHello(agent_version="bench")))
                while True:
                    msg = await asyncio.wait_for(call.read(), 30)
                    if msg is grpc.aio.EOF:
                        raise RuntimeError("EOF before hello_ack")
                    if msg.WhichOneof("message") == "hello_ack":
                        break
                streams.append((channel, call))
            except Exception as err:
                errors["connect " + _code(err)] += 1
                await channel.close()

    await asyncio.gather(*(connect(n) for n in nodes))
    result.connected = len(streams)
    result.connect_seconds = time.monotonic() - t0

    await asyncio.get_running_loop().run_in_executor(None, ready.wait)
    await asyncio.get_running_loop().run_in_executor(None, go.wait)

    # 3. measure
    latencies: list[float] = []
    held = [0]
    counts = {"sent": 0, "acks": 0}
    start = time.monotonic()
    end = start + seconds

    async def heartbeats(call: grpc.aio.StreamStreamCall) -> None:
        await asyncio.sleep(random.random() * interval)
        seq = 0
        try:
            while True:
                now = time.monotonic()
                if now >= end:
                    held[0] += 1
                    return
                seq += 1
                sent = time.perf_counter()
                await call.write(
                    node_pb2.ConnectRequest(
                        heartbeat=node_pb2.Heartbeat(
                            sequence=seq,
                            metrics=common_pb2.NodeMetrics(
                                cpu_percent=10, memory_percent=20, disk_percent=30
                            ),
                        )
                    )
                )
                counts["sent"] += 1
                while True:
                    msg = await call.read()
                    if msg is grpc.aio.EOF:
                        raise RuntimeError("stream ended (EOF)")
                    if msg.WhichOneof("message") == "heartbeat_ack":
                        break
                latencies.append((time.perf_counter() - sent) * 1000)
                counts["acks"] += 1
                # next tick on the 1 s grid of this stream
                next_at = now + interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        except Exception as err:
            errors["stream " + _code(err)] += 1

    await asyncio.gather(*(heartbeats(call) for _, call in streams))
    result.held_at_end = held[0]
    result.sent = counts["sent"]
    result.acks = counts["acks"]
    result.latencies_ms = latencies
    for _, call in streams:
        call.cancel()
    await asyncio.gather(*(channel.close() for channel, _ in streams), return_exceptions=True)
    result.errors = dict(errors)
    usage = psutil.Process().cpu_times()
    result.cpu_seconds = usage.user + usage.system
    return result


def _worker(index: int, count: int, tokens: list[str], *args: object) -> None:
    queue = args[-1]
    try:
        result = asyncio.run(_worker_main(index, count, tokens, *args[:-1]))  # type: ignore[arg-type]
    except Exception as err:
        result = WorkerResult(worker=index, nodes=count, errors={"worker " + _code(err): 1})
    queue.put(result)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- main


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(p / 100 * len(values)) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--enroll-concurrency", type=int, default=50, help="in total")
    parser.add_argument("--connect-concurrency", type=int, default=100, help="in total")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="a67-bench-streams-") as tmp:
        ctl = start_controller(Path(tmp), args.interval)
        try:
            run(args, ctl)
        finally:
            ctl.stop()


def run(args: argparse.Namespace, ctl: ControllerProc) -> None:
    t0 = time.monotonic()
    _, tokens = make_user_and_tokens(ctl.address, math.ceil(args.nodes / 100))
    print(f"controller pid {ctl.proc.pid}; {len(tokens)} enrollment tokens in {time.monotonic() - t0:.1f} s")
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Barrier(args.workers + 1)
    go = ctx.Barrier(args.workers + 1)
    queue = ctx.Queue()
    per = [
        args.nodes // args.workers + (1 if i < args.nodes % args.workers else 0) for i in range(args.workers)
    ]
    procs = []
    offset = 0
    for i, count in enumerate(per):
        worker_tokens = [tokens[(offset + j) // 100] for j in range(count)]  # one per node
        procs.append(
            ctx.Process(
                target=_worker,
                args=(i, count, worker_tokens, ctl.address, ctl.node_address, args.seconds,
                      args.interval, max(1, args.enroll_concurrency // args.workers),
                      max(1, args.connect_concurrency // args.workers), ready, go, queue),
            )
        )  # fmt: skip
        offset += count
    t_setup = time.monotonic()
    for p in procs:
        p.start()
    controller = psutil.Process(ctl.proc.pid)
    try:
        ready.wait(timeout=max(120.0, args.nodes / 20))
    except Exception:
        print("workers did not become ready in time")
        for p in procs:
            p.kill()
        raise
    print(f"setup (enroll + connect) {time.monotonic() - t_setup:.1f} s; "
          f"controller RSS {controller.memory_info().rss / 2**20:.0f} MiB")  # fmt: skip
    go.wait()
    t_start = time.monotonic()
    controller.cpu_percent(None)
    gens = [psutil.Process(p.pid) for p in procs]
    for g in gens:
        g.cpu_percent(None)
    cpu, rss, gen_cpu, gen_max, busiest, machine = [], [], [], [], [], []
    psutil.cpu_percent(None)

    def thread_times() -> dict[int, float]:
        return {t.id: t.user_time + t.system_time for t in controller.threads()}

    before, t_prev = thread_times(), time.monotonic()
    while time.monotonic() - t_start < args.seconds + 0.5:
        time.sleep(1.0)
        cpu.append(controller.cpu_percent(None))
        rss.append(controller.memory_info().rss / 2**20)
        after, t_now = thread_times(), time.monotonic()
        # the busiest controller thread (the asyncio/Python thread is capped at 100 %)
        busiest.append(max(after[k] - before.get(k, 0.0) for k in after) / (t_now - t_prev) * 100)
        before, t_prev = after, t_now
        machine.append(psutil.cpu_percent(None) * (os.cpu_count() or 1))
        with contextlib.suppress(psutil.Error):
            per = [g.cpu_percent(None) for g in gens]
            gen_cpu.append(sum(per))
            gen_max.append(max(per))
    results: list[WorkerResult] = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(10)
    elapsed = args.seconds

    latencies = [x for r in results for x in r.latencies_ms]
    errors: collections.Counter[str] = collections.Counter()
    for r in results:
        errors.update(r.errors)
    enrolled = sum(r.enrolled for r in results)
    connected = sum(r.connected for r in results)
    held = sum(r.held_at_end for r in results)
    acks = sum(r.acks for r in results)
    sent = sum(r.sent for r in results)
    steady_cpu = cpu[1:] if len(cpu) > 2 else cpu
    print()
    print(f"nodes={args.nodes} workers={args.workers} interval={args.interval}s window={elapsed:.0f}s "
          f"cores={os.cpu_count()} grpcio={grpc.__version__}")  # fmt: skip
    print(f"enrolled           {enrolled}/{args.nodes} (max {max(r.enroll_seconds for r in results):.1f} s)")
    print(f"streams connected  {connected} (max {max(r.connect_seconds for r in results):.1f} s)")
    print(f"streams held @end  {held}")
    print(f"heartbeats sent    {sent}  acked {acks}  -> {acks / elapsed:.0f} acks/s "
          f"(offered {connected / args.interval:.0f}/s)")  # fmt: skip
    print(f"ack latency ms     p50 {pct(latencies, 50):.1f}  p99 {pct(latencies, 99):.1f}  "
          f"max {max(latencies) if latencies else float('nan'):.1f}")  # fmt: skip
    print(f"controller CPU %   mean {statistics.fmean(steady_cpu) if steady_cpu else 0:.0f}  "
          f"max {max(cpu) if cpu else 0:.0f}  (100 = one core)")  # fmt: skip
    print(f"controller RSS MiB end {rss[-1] if rss else 0:.0f}  max {max(rss) if rss else 0:.0f}")
    print(f"controller busiest thread CPU %  mean {statistics.fmean(busiest[1:] or busiest) if busiest else 0:.0f}  "
          f"max {max(busiest) if busiest else 0:.0f}  (threads: {controller.num_threads()})")  # fmt: skip
    print(f"load gen CPU %     mean {statistics.fmean(gen_cpu) if gen_cpu else 0:.0f} (all workers), "
          f"busiest worker mean {statistics.fmean(gen_max) if gen_max else 0:.0f}")  # fmt: skip
    print(
        f"machine CPU %      mean {statistics.fmean(machine) if machine else 0:.0f} (of {os.cpu_count()} cores x 100)"
    )
    print(f"errors             {dict(errors) if errors else 'none'}")
    if ctl.proc.poll() is not None:
        print(f"CONTROLLER EXITED rc={ctl.proc.returncode}")


if __name__ == "__main__":
    main()
