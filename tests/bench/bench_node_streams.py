#!/usr/bin/env python3
"""N simulated nodes, each with its own mTLS stream, heartbeating every interval; the
controller side by side with a bare grpc.aio echo server (the floor of the stack).

    .venv/bin/python tests/bench/bench_node_streams.py --nodes 1000 --seconds 20 --workers 2 --targets controller,bare
    .venv/bin/python tests/bench/bench_node_streams.py --handler-only     # the Python handler alone, in-process

Starts a real controller (``python -m controller.cli serve``, SQLite in a temp
dir, log level WARNING, ``--heartbeat-interval``) as a subprocess, registers
one user, makes ceil(N/100) enrollment tokens (max_uses=100), then starts
``--workers`` load-generator processes. Each worker owns N/W nodes:

1. enrollment: a P-256 key + CSR per node and ``NodeService.RegisterNode``,
   ``--enroll-concurrency`` (default 50 in total) in flight;
2. per target of ``--targets``, one after the other with the same nodes and
   certificates: connect one mTLS channel *per node* (the node identity is its
   client certificate: N streams means N TCP+TLS connections, as in production),
   with the agent's keepalive settings, ``Connect`` + hello -> hello_ack;
3. heartbeats for WARMUP_SECONDS (every node's first heartbeat takes it from
   initializing to ready), then ``--seconds`` measured: every stream sends one
   heartbeat per interval (random phase) and times heartbeat -> heartbeat_ack.

Targets: ``controller``; ``bare``, a grpc.aio echo of the same stream (same
messages, protobuf, mutual TLS with a certificate of the controller's CA, same
keepalive options) in its own process; ``bare-plain`` (plaintext), ``bare-raw``
(no protobuf), ``bare-split`` (the controller's reader task + context.write shape),
``bare-split-icpt`` (that, behind the controller's interceptor): the differences
between them break the cost per heartbeat down.

Reported per target: streams held, acks per second, ack latency p50/p99/max
(tests/bench/stats.py), server CPU per heartbeat (psutil CPU time of the server
process over the window / acks) and per thread, RSS, loopback packets per
heartbeat (all of the machine's loopback traffic: only indicative on a shared
machine), the load generators' CPU, errors by status code.

Experiments: ``BENCH_CONTROLLER_CPROFILE=<file>`` runs the controller under
cProfile; ``BENCH_CLIENT_KEEPALIVE_MS`` / ``BENCH_SERVER_KEEPALIVE_MS`` override the
nodes' / the bare server's ping period.

Loopback only. Not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import gc
import hashlib
import json
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
from typing import Any

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

from controller import keepalive  # noqa: E402
from controller.nodes.collector import FreezingCollector  # noqa: E402
from tests.bench.stats import percentile, tail  # noqa: E402

SERVER_NAME = "automator67-controller"
# Heartbeats flow this long before the measured window (every node's first heartbeat
# moves it from initializing to ready, with its one-off store and cache writes).
WARMUP_SECONDS = 3.0


def warmup_seconds(interval: float) -> float:
    """Heartbeats before the window: every node's first one falls in it (random phase)."""
    return WARMUP_SECONDS + interval


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


# ``python -c`` launcher of ``controller.cli`` that logs every garbage collection of
# generation 2 (or any taking over 5 ms): wall time, generation, duration (and the
# thread's CPU time in it: on a loaded machine the wall time includes waiting for a core),
# objects collected (BENCH_CONTROLLER_GC_LOG=<file>).
GC_LOGGING_LAUNCHER = """
import gc, runpy, sys, time
out = open(sys.argv[1], "a", buffering=1)
sys.argv = ["controller.cli", *sys.argv[2:]]
started = [0.0, 0.0]
census_at = [0.0]
def census(generation):
    # what a large young generation holds (at most every 10 s): the 8 commonest types
    if generation == 2 or time.monotonic() - census_at[0] < 10:
        return
    objects = gc.get_objects(generation)
    if len(objects) > 5000:
        census_at[0] = time.monotonic()
        counts = {}
        for o in objects:
            name = type(o).__qualname__
            counts[name] = counts.get(name, 0) + 1
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:8]
        out.write(f"{time.time():.3f} census gen{generation} {len(objects)} objects: {top}\\n")
    del objects
def timing(phase, info):
    if phase == "start":
        census(info["generation"])
        started[:] = time.perf_counter(), time.thread_time()
        return
    took = (time.perf_counter() - started[0]) * 1000
    cpu = (time.thread_time() - started[1]) * 1000
    if info["generation"] == 2 or took > 5:
        out.write(f"{time.time():.3f} gen{info['generation']} {took:.1f} ms (cpu {cpu:.1f} ms) "
                  f"collected={info['collected']}\\n")
gc.callbacks.append(timing)
runpy.run_module("controller.cli", run_name="__main__")
"""


def start_controller(
    data_dir: Path,
    interval: float = 1.0,
    timeout: float = 30.0,
    store_url: str | None = None,
    *,
    log_level: str = "WARNING",
    extra_args: tuple[str, ...] = (),
    env_overrides: dict[str, str] | None = None,
) -> ControllerProc:
    """``controller.cli serve`` on free ports (SQLite in ``data_dir`` unless ``store_url``)."""
    port, node_port = free_port(), free_port()
    log_path = data_dir / "controller.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("A67_")}
    # any further port the controller may open (xDS), free too (ignored where unknown)
    env["A67_XDS_LISTEN_ADDRESS"] = f"127.0.0.1:{free_port()}"
    env.update(env_overrides or {})
    profile = os.environ.get("BENCH_CONTROLLER_CPROFILE")  # experiments: cProfile output path
    gc_log = os.environ.get("BENCH_CONTROLLER_GC_LOG")  # experiments: one line per slow collection
    launcher = ["-m", "controller.cli"]
    if gc_log:
        launcher = ["-c", GC_LOGGING_LAUNCHER, gc_log]
    args = [
        sys.executable, *(["-m", "cProfile", "-o", profile] if profile else []), *launcher, "serve",
        "--listen", f"127.0.0.1:{port}",
        "--node-listen", f"127.0.0.1:{node_port}",
        "--data-dir", str(data_dir),
        "--heartbeat-interval", str(interval),
        "--log-level", log_level,
        *extra_args,
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

    def channel(self, node_address: str, tls: bool = True, interval_ms: int = 1000) -> grpc.aio.Channel:
        assert self.reply is not None
        # the agent's own channel settings (controller/keepalive.py), one connection per node
        options = [*keepalive.client_options(interval_ms), ("grpc.use_local_subchannel_pool", 1)]
        if os.environ.get("BENCH_CLIENT_KEEPALIVE_MS"):  # experiments: the agent's ping period
            options.append(("grpc.keepalive_time_ms", int(os.environ["BENCH_CLIENT_KEEPALIVE_MS"])))
        if not tls:
            return grpc.aio.insecure_channel(node_address, options=options)
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
            options=[("grpc.ssl_target_name_override", SERVER_NAME), *options],
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
    target: str = ""
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
    targets: list[tuple[str, str, bool]],
    seconds: float,
    interval: float,
    enroll_concurrency: int,
    connect_concurrency: int,
    ready: multiprocessing.synchronize.Barrier,
    go: multiprocessing.synchronize.Barrier,
    queue: multiprocessing.Queue,  # type: ignore[type-arg]
) -> None:
    errors: collections.Counter[str] = collections.Counter()
    # The load generator's own full collections (millions of objects at 5,000 streams per
    # worker) would stall its timing: the controller's policy, here too.
    FreezingCollector.install()

    # 1. enrollment (once, with the controller: its CA signs every node's certificate)
    t0 = time.monotonic()
    nodes = [SimNode() for _ in range(count)]
    if tokens and tokens[0].startswith(FAST_ENROLL):
        # --fast-enroll: sign here with the controller's CA; the main process inserts the rows
        queue.put(("rows", _sign_locally(nodes, Path(tokens[0][len(FAST_ENROLL) :]))))
        await asyncio.get_running_loop().run_in_executor(None, ready.wait)
        tokens = []
    sem = asyncio.Semaphore(enroll_concurrency)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = node_pb2_grpc.NodeServiceStub(channel)

        async def enroll(i: int, node: SimNode) -> None:
            async with sem:
                try:
                    node.reply = await stub.RegisterNode(node.request(tokens[i], i), timeout=60)
                except Exception as err:
                    errors["enroll " + _code(err)] += 1

        await asyncio.gather(*(enroll(i, n) for i, n in enumerate(nodes) if n.reply is None))
    nodes = [n for n in nodes if n.reply is not None]
    enrolled, enroll_seconds = len(nodes), time.monotonic() - t0

    # 2. per target (the controller, the bare echo server, ...), one after the other
    for name, node_address, tls in targets:
        result = WorkerResult(
            worker=index, nodes=count, target=name, enrolled=enrolled, enroll_seconds=enroll_seconds
        )
        result.errors = dict(errors)
        await _measure(result, nodes, node_address, tls, seconds, interval, connect_concurrency, ready, go)
        queue.put(result)


async def _measure(
    result: WorkerResult,
    nodes: list[SimNode],
    node_address: str,
    tls: bool,
    seconds: float,
    interval: float,
    connect_concurrency: int,
    ready: multiprocessing.synchronize.Barrier,
    go: multiprocessing.synchronize.Barrier,
) -> None:
    errors: collections.Counter[str] = collections.Counter(result.errors)
    interval_ms = round(interval * 1000)
    t0 = time.monotonic()
    sem = asyncio.Semaphore(connect_concurrency)
    streams: list[tuple[grpc.aio.Channel, grpc.aio.StreamStreamCall]] = []

    # Every stream heartbeats from its hello_ack on, as an agent does (a node silent
    # until all N are connected would be failed by the controller before the window).
    # The window is known once all workers pass the barrier: measured from go +
    # warmup_seconds, for --seconds; until then nothing is counted.
    latencies: list[float] = []
    slow_log = _diagnostics_log(f"worker{result.worker}")
    held = [0]
    counts = {"sent": 0, "acks": 0}
    window = {"from": math.inf, "end": math.inf}
    tasks: list[asyncio.Task[None]] = []

    async def heartbeats(call: grpc.aio.StreamStreamCall) -> None:
        await asyncio.sleep(random.random() * interval)
        seq = 0
        try:
            while True:
                now = time.monotonic()
                if now >= window["end"]:
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
                measured = now >= window["from"]
                counts["sent"] += measured
                while True:
                    msg = await call.read()
                    if msg is grpc.aio.EOF:
                        raise RuntimeError("stream ended (EOF)")
                    if msg.WhichOneof("message") == "heartbeat_ack":
                        break
                if measured:
                    took_ms = (time.perf_counter() - sent) * 1000
                    latencies.append(took_ms)
                    counts["acks"] += 1
                    if slow_log is not None and took_ms > 200:
                        slow_log.write(f"{time.time():.3f} ack {took_ms:.0f} ms\n")
                # next tick on the grid of this stream
                next_at = now + interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        except Exception as err:
            errors["stream " + _code(err)] += 1

    async def connect(node: SimNode) -> None:
        async with sem:
            channel = node.channel(node_address, tls, interval_ms)
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
                tasks.append(asyncio.create_task(heartbeats(call)))
            except Exception as err:
                errors["connect " + _code(err)] += 1
                await channel.close()

    await asyncio.gather(*(connect(n) for n in nodes))
    result.connected = len(streams)
    result.connect_seconds = time.monotonic() - t0
    # The load generator's own heap (its channels, calls and tasks: tens of thousands of
    # objects per worker at 20,000 nodes) is long-lived from here on: frozen, so the
    # worker's collections scan only what each heartbeat allocates. Without it, a worker's
    # collection stalls its streams and the stall is counted as the server's ack latency.
    gc.collect()
    gc.freeze()

    await asyncio.get_running_loop().run_in_executor(None, ready.wait)
    await asyncio.get_running_loop().run_in_executor(None, go.wait)
    window["from"] = time.monotonic() + warmup_seconds(interval)
    window["end"] = window["from"] + seconds

    cpu0 = psutil.Process().cpu_times()
    await asyncio.gather(*tasks)
    cpu1 = psutil.Process().cpu_times()
    result.held_at_end = held[0]
    result.sent = counts["sent"]
    result.acks = counts["acks"]
    result.latencies_ms = latencies
    for _, call in streams:
        call.cancel()
    await asyncio.gather(*(channel.close() for channel, _ in streams), return_exceptions=True)
    result.errors = dict(errors)
    result.cpu_seconds = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)


def _diagnostics_log(name: str) -> Any:
    """With BENCH_CONTROLLER_GC_LOG=<file>: ``<file>.<name>``, where this load generator logs
    its slow acks (over 200 ms) and its own slow garbage collections, with wall times to
    line up with the controller's; else None."""

    path = os.environ.get("BENCH_CONTROLLER_GC_LOG")
    if not path:
        return None
    if name in _DIAGNOSTICS:
        return _DIAGNOSTICS[name]
    out = open(f"{path}.{name}", "a", buffering=1)  # noqa: SIM115 - lives as long as the worker
    started = [0.0]

    started_cpu = [0.0]

    def timing(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            started_cpu[0] = time.thread_time()
            return
        took = (time.perf_counter() - started[0]) * 1000
        cpu = (time.thread_time() - started_cpu[0]) * 1000
        if info["generation"] == 2 or took > 5:
            out.write(f"{time.time():.3f} gen{info['generation']} {took:.1f} ms (cpu {cpu:.1f} ms)\n")

    gc.callbacks.append(timing)
    _DIAGNOSTICS[name] = out
    return out


_DIAGNOSTICS: dict[str, Any] = {}

FAST_ENROLL = "fast-enroll:"


def _sign_locally(nodes: list[SimNode], keys_dir: Path) -> list[tuple[str, str, str]]:
    """Certificates from the controller's CA without RegisterNode: ``(node id, serial, fingerprint)``."""
    import uuid

    from controller.nodes.ca import CertificateAuthority

    ca = CertificateAuthority.load_or_create(keys_dir)
    rows = []
    for node in nodes:
        node_id = str(uuid.uuid4())
        signed = ca.sign_node_csr(node.csr_pem, node_id)
        node.reply = node_pb2.RegisterNodeResponse(
            node_id=node_id, certificate_pem=signed.cert_pem, ca_certificate_pem=ca.ca_cert_pem
        )
        rows.append((node_id, signed.serial_hex, node.fingerprint))
    return rows


async def _insert_nodes(store_url: str, user_id: str, rows: list[tuple[str, str, str]]) -> None:
    """The node rows RegisterNode would have written, 1,000 per transaction."""
    from controller.nodes.repository import NodeRepository
    from controller.store.db import Store

    store = await Store.open(store_url)
    try:
        repository = NodeRepository(store)
        for start in range(0, len(rows), 1000):
            async with store.session() as session:
                for node_id, serial, fingerprint in rows[start : start + 1000]:
                    await repository.create(
                        node_id=node_id,
                        user_id=user_id,
                        provider="render",
                        endpoint=f"https://{node_id}.onrender.com",
                        region="eu-west",
                        capabilities={"cpu_cores": 2, "memory_gb": 4, "disk_gb": 20},
                        fingerprint=fingerprint,
                        cert_serial=serial,
                        session=session,
                    )
    finally:
        await store.close()


def _worker(index: int, count: int, tokens: list[str], *args: object) -> None:
    queue = args[-1]
    try:
        asyncio.run(_worker_main(index, count, tokens, *args))  # type: ignore[arg-type]
    except Exception as err:
        queue.put(WorkerResult(worker=index, nodes=count, errors={"worker " + _code(err): 1}))  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- the bare server


def serve_bare(
    port: int,
    keys_dir: Path | None,
    proto: bool,
    split: bool = False,
    interceptor: bool = False,
    interval_ms: int = 1000,
) -> None:
    """A bare grpc.aio echo of the node stream: the floor of the stack the controller runs on.

    The same transport as the controller's node port (mutual TLS with a certificate from
    the controller's CA, or plaintext when ``keys_dir`` is None), the same keepalive
    options, the same messages: hello -> hello_ack, heartbeat -> heartbeat_ack with the
    sequence. ``proto=False`` skips protobuf: requests stay bytes and every ack is one
    pre-serialised message (to measure what protobuf costs).
    """

    from controller.nodes.ca import CertificateAuthority

    hello_ack = node_pb2.ConnectResponse(
        hello_ack=node_pb2.HelloAck(generation=1, heartbeat_interval_ms=1000)
    )
    ready_ack = common_pb2.NODE_STATUS_READY

    async def connect_proto(requests: object, context: object) -> object:
        async for request in requests:  # type: ignore[attr-defined]
            if request.WhichOneof("message") == "heartbeat":
                yield node_pb2.ConnectResponse(
                    heartbeat_ack=node_pb2.HeartbeatAck(sequence=request.heartbeat.sequence, status=ready_ack)
                )
            else:
                yield hello_ack

    async def connect_split(requests: object, context: grpc.aio.ServicerContext) -> object:
        """The controller's shape: a reader task acks with context.write under a lock,
        the generator waits for commands (none come)."""
        lock = asyncio.Lock()
        outbound: asyncio.Queue[object] = asyncio.Queue()
        iterator = requests.__aiter__()  # type: ignore[attr-defined]
        await iterator.__anext__()  # the hello
        yield hello_ack

        async def read() -> None:
            async for request in iterator:
                ack = node_pb2.ConnectResponse(
                    heartbeat_ack=node_pb2.HeartbeatAck(sequence=request.heartbeat.sequence, status=ready_ack)
                )
                async with lock:
                    await context.write(ack)
            await outbound.put(None)

        reader = asyncio.create_task(read())
        try:
            while (message := await outbound.get()) is not None:
                async with lock:
                    yield message
        finally:
            reader.cancel()

    hello_bytes = hello_ack.SerializeToString()
    ack_bytes = node_pb2.ConnectResponse(
        heartbeat_ack=node_pb2.HeartbeatAck(sequence=1, status=ready_ack)
    ).SerializeToString()

    async def connect_raw(requests: object, context: object) -> object:
        first = True
        async for _ in requests:  # type: ignore[attr-defined]
            yield hello_bytes if first else ack_bytes
            first = False

    handler = (
        grpc.stream_stream_rpc_method_handler(
            connect_split if split else connect_proto,
            request_deserializer=node_pb2.ConnectRequest.FromString,
            response_serializer=node_pb2.ConnectResponse.SerializeToString,
        )
        if proto
        else grpc.stream_stream_rpc_method_handler(connect_raw)
    )

    async def main() -> None:
        FreezingCollector.install()  # the controller's collector policy, for a like-for-like floor
        options = keepalive.server_options(interval_ms)
        if os.environ.get("BENCH_SERVER_KEEPALIVE_MS"):  # experiments: the bare server's ping period
            options.append(("grpc.keepalive_time_ms", int(os.environ["BENCH_SERVER_KEEPALIVE_MS"])))
        interceptors = []
        if interceptor:  # the controller's interceptor (Connect needs no token: no verifier call)
            from controller.api.interceptors import ControllerInterceptor

            interceptors.append(ControllerInterceptor(None))  # type: ignore[arg-type]
        server = grpc.aio.server(options=options, interceptors=interceptors)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("automator67.v1.NodeService", {"Connect": handler}),)
        )
        if keys_dir is None:
            server.add_insecure_port(f"127.0.0.1:{port}")
        else:
            ca = CertificateAuthority.load_or_create(keys_dir)
            key_pem, cert_pem = ca.server_certificate(["127.0.0.1", "localhost"])
            credentials = grpc.ssl_server_credentials(
                [(key_pem, cert_pem)], root_certificates=ca.ca_cert_pem, require_client_auth=True
            )
            server.add_secure_port(f"127.0.0.1:{port}", credentials)
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def start_bare(data_dir: Path, interval: float, tls: bool, mode: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = [
        sys.executable, str(Path(__file__).resolve()), "--serve-bare", str(port),
        "--interval", str(interval), "--bare-proto", mode,
    ]  # fmt: skip
    if tls:
        args += ["--bare-keys", str(data_dir / "keys")]
    proc = subprocess.Popen(args, cwd=ROOT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return proc, f"127.0.0.1:{port}"
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("bare server did not start")


# --------------------------------------------------------------------------- the handler alone


def handler_cost(nodes: int = 1000, rounds: int = 50) -> None:
    """The controller's Python work per heartbeat, in-process, without gRPC: parse the
    request, :meth:`Fleet.heartbeat`, build and serialise the ack (1,000 nodes, steady state)."""
    from controller.cache.memory import MemoryCache
    from controller.nodes.fleet import STATUS_ENUM, Fleet
    from controller.nodes.health import HealthConfig

    class NoStore:  # the store is written on state changes only: none in the timed rounds
        async def update_status(self, *args: object, **kwargs: object) -> None:
            return None

        async def record_heartbeat(self, *args: object, **kwargs: object) -> None:
            return None

    async def main() -> None:
        clock = [1000.0]
        fleet = Fleet(
            nodes=NoStore(),  # type: ignore[arg-type]
            cache=MemoryCache(),
            health_config=HealthConfig(1.0),
            clock=lambda: clock[0],
        )
        ids = [f"node-{i}" for i in range(nodes)]
        for node_id in ids:
            fleet.track(node_id, "user")
        wire = node_pb2.ConnectRequest(
            heartbeat=node_pb2.Heartbeat(
                sequence=1, metrics=common_pb2.NodeMetrics(cpu_percent=10, memory_percent=20, disk_percent=30)
            )
        ).SerializeToString()
        timings = {"parse": 0.0, "fleet": 0.0, "ack": 0.0}
        for round_no in range(rounds + 1):
            clock[0] += 1.0
            for node_id in ids:
                t0 = time.perf_counter()
                request = node_pb2.ConnectRequest.FromString(wire)
                t1 = time.perf_counter()
                state = fleet.heartbeat(node_id, request.heartbeat.metrics)
                t2 = time.perf_counter()
                node_pb2.ConnectResponse(
                    heartbeat_ack=node_pb2.HeartbeatAck(
                        sequence=request.heartbeat.sequence, status=STATUS_ENUM[state]
                    )
                ).SerializeToString()
                t3 = time.perf_counter()
                if round_no:  # the first round takes every node from initializing to ready
                    timings["parse"] += t1 - t0
                    timings["fleet"] += t2 - t1
                    timings["ack"] += t3 - t2
            await asyncio.sleep(0)
        count = nodes * rounds
        for name, total in timings.items():
            print(f"  {name:<6} {total / count * 1e6:6.1f} µs per heartbeat")
        fleet.monitor.stop()

    print(f"The Python handler alone ({nodes} nodes, {rounds} rounds, in-process):")
    asyncio.run(main())


# --------------------------------------------------------------------------- main


pct = percentile  # the one helper of tests/bench/stats.py (other benchmarks import it from here)


def loopback_packets() -> int:
    """Packets through the loopback interface so far (received side)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--enroll-concurrency", type=int, default=50, help="in total")
    parser.add_argument("--connect-concurrency", type=int, default=100, help="in total")
    parser.add_argument(
        "--targets",
        default="controller",
        help="comma-separated, measured one after the other with the same nodes: controller, "
        "bare (grpc.aio echo, mutual TLS), bare-plain (plaintext), bare-raw (mutual TLS, no protobuf), "
        "bare-split (mutual TLS, the controller's reader task + context.write shape), "
        "bare-split-icpt (the same behind the controller's interceptor)",
    )
    parser.add_argument(
        "--fast-enroll",
        action="store_true",
        help="sign node certificates with the controller's CA in the load generator and insert the "
        "node rows directly (what RegisterNode writes) instead of N RegisterNode calls",
    )
    parser.add_argument(
        "--handler-only", action="store_true", help="only time the Python handler in-process (no gRPC)"
    )
    parser.add_argument("--serve-bare", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bare-keys", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--bare-proto", default="1", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.handler_only:
        handler_cost()
        return
    if args.serve_bare:
        serve_bare(
            args.serve_bare,
            args.bare_keys,
            args.bare_proto != "0",
            split=args.bare_proto in ("split", "split-icpt"),
            interceptor=args.bare_proto == "split-icpt",
            interval_ms=round(args.interval * 1000),
        )
        return

    with tempfile.TemporaryDirectory(prefix="a67-bench-streams-") as tmp:
        ctl = start_controller(
            Path(tmp),
            args.interval,
        )
        try:
            run(args, ctl)
        finally:
            ctl.stop()


def run(args: argparse.Namespace, ctl: ControllerProc) -> None:
    t0 = time.monotonic()
    access, tokens = make_user_and_tokens(ctl.address, 1 if args.fast_enroll else math.ceil(args.nodes / 100))
    if args.fast_enroll:
        payload = access.split(".")[1]
        user_id = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sub"]
        tokens = [FAST_ENROLL + str(ctl.data_dir / "keys")] * (args.nodes // 100 + 1)
        args.user_id = user_id
    print(f"controller pid {ctl.proc.pid}; {len(tokens)} enrollment tokens in {time.monotonic() - t0:.1f} s")
    names = [name.strip() for name in args.targets.split(",") if name.strip()]
    servers: dict[str, tuple[psutil.Process, str, bool]] = {}
    bare_procs: list[subprocess.Popen[bytes]] = []
    for name in names:
        if name == "controller":
            servers[name] = (psutil.Process(ctl.proc.pid), ctl.node_address, True)
        elif name in ("bare", "bare-plain", "bare-raw", "bare-split", "bare-split-icpt"):
            tls = name != "bare-plain"
            mode = {"bare-raw": "0", "bare-split": "split", "bare-split-icpt": "split-icpt"}.get(name, "1")
            proc, address = start_bare(ctl.data_dir, args.interval, tls, mode)
            bare_procs.append(proc)
            servers[name] = (psutil.Process(proc.pid), address, tls)
        else:
            raise SystemExit(f"unknown target {name!r}")
    try:
        _run(args, ctl, tokens, names, servers)
    finally:
        for proc in bare_procs:
            proc.kill()
            proc.wait()


def _run(
    args: argparse.Namespace,
    ctl: ControllerProc,
    tokens: list[str],
    names: list[str],
    servers: dict[str, tuple[psutil.Process, str, bool]],
) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Barrier(args.workers + 1)
    go = ctx.Barrier(args.workers + 1)
    queue = ctx.Queue()
    per = [
        args.nodes // args.workers + (1 if i < args.nodes % args.workers else 0) for i in range(args.workers)
    ]
    targets = [(name, servers[name][1], servers[name][2]) for name in names]
    procs = []
    offset = 0
    for i, count in enumerate(per):
        worker_tokens = [tokens[(offset + j) // 100] for j in range(count)]  # one per node
        procs.append(
            ctx.Process(
                target=_worker,
                args=(i, count, worker_tokens, ctl.address, targets, args.seconds,
                      args.interval, max(1, args.enroll_concurrency // args.workers),
                      max(1, args.connect_concurrency // args.workers), ready, go, queue),
            )
        )  # fmt: skip
        offset += count
    for p in procs:
        p.start()
    if args.fast_enroll:
        t0 = time.monotonic()
        rows = [row for _ in procs for row in queue.get(timeout=600)[1]]
        asyncio.run(_insert_nodes(f"sqlite:///{ctl.data_dir / 'controller.db'}", args.user_id, rows))
        print(f"fast enrolment: {len(rows)} certificates and node rows in {time.monotonic() - t0:.1f} s")
        ready.wait()
    summary = []
    for name in names:
        summary.append(_phase(args, name, servers[name][0], procs, ready, go, queue))
    for p in procs:
        p.join(30)
    if len(summary) > 1:
        base = next((row for row in summary if row["name"] == "bare"), summary[0])
        print("\nside by side (server CPU per heartbeat, ms; loopback packets per heartbeat):")
        for row in summary:
            print(f"  {row['name']:<11} {row['cpu_ms']:.3f} ms ({row['cpu_ms'] / base['cpu_ms']:.2f}x of {base['name']}), "
                  f"{row['packets']:.1f} packets, ack {row['latency']}")  # fmt: skip
    if ctl.proc.poll() is not None:
        print(f"CONTROLLER EXITED rc={ctl.proc.returncode}")


def _phase(
    args: argparse.Namespace,
    name: str,
    server: psutil.Process,
    procs: list[multiprocessing.process.BaseProcess],
    ready: multiprocessing.synchronize.Barrier,
    go: multiprocessing.synchronize.Barrier,
    queue: multiprocessing.Queue,  # type: ignore[type-arg]
) -> dict[str, object]:
    t_setup = time.monotonic()
    try:
        ready.wait(timeout=max(300.0, args.nodes / 20))
    except Exception:
        print("workers did not become ready in time")
        for p in procs:
            p.kill()
        raise
    print(
        f"\n[{name}] setup {time.monotonic() - t_setup:.1f} s; server RSS {server.memory_info().rss / 2**20:.0f} MiB"
    )
    go.wait()
    time.sleep(warmup_seconds(args.interval))
    t_start = time.monotonic()
    cpu_start = server.cpu_times()
    packets_start = loopback_packets()
    server.cpu_percent(None)
    gens = [psutil.Process(p.pid) for p in procs]
    for g in gens:
        g.cpu_percent(None)
    cpu, rss, gen_cpu, busiest, machine = [], [], [], [], []
    psutil.cpu_percent(None)

    def thread_times() -> dict[int, float]:
        return {t.id: t.user_time + t.system_time for t in server.threads()}

    before, t_prev = thread_times(), time.monotonic()
    first = dict(before)
    while time.monotonic() - t_start < args.seconds:
        time.sleep(min(1.0, max(0.05, args.seconds - (time.monotonic() - t_start))))
        cpu.append(server.cpu_percent(None))
        rss.append(server.memory_info().rss / 2**20)
        after, t_now = thread_times(), time.monotonic()
        busiest.append(max(after[k] - before.get(k, 0.0) for k in after) / (t_now - t_prev) * 100)
        before, t_prev = after, t_now
        machine.append(psutil.cpu_percent(None) * (os.cpu_count() or 1))
        with contextlib.suppress(psutil.Error):
            gen_cpu.append(sum(g.cpu_percent(None) for g in gens))
    cpu_end = server.cpu_times()
    last = thread_times()

    def thread_name(tid: int) -> str:
        try:
            return Path(f"/proc/{server.pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            return "?"

    per_thread = sorted(((last[k] - first.get(k, 0.0), k) for k in last), reverse=True)[:6]
    packets = loopback_packets() - packets_start
    window = time.monotonic() - t_start
    results: list[WorkerResult] = [queue.get(timeout=300) for _ in procs]
    latencies = [x for r in results for x in r.latencies_ms]
    errors: collections.Counter[str] = collections.Counter()
    for r in results:
        errors.update(r.errors)
    connected = sum(r.connected for r in results)
    held = sum(r.held_at_end for r in results)
    acks = sum(r.acks for r in results)
    sent = sum(r.sent for r in results)
    server_cpu = (cpu_end.user - cpu_start.user) + (cpu_end.system - cpu_start.system)
    steady_cpu = cpu[1:] if len(cpu) > 2 else cpu
    tail_name, tail_value = tail(latencies) if latencies else ("p99", float("nan"))
    print(f"nodes={args.nodes} workers={args.workers} interval={args.interval}s window={args.seconds:.0f}s "
          f"cores={os.cpu_count()} grpcio={grpc.__version__} load={os.getloadavg()[0]:.2f}")  # fmt: skip
    print(
        f"enrolled           {sum(r.enrolled for r in results)}/{args.nodes} (max {max(r.enroll_seconds for r in results):.1f} s)"
    )
    print(f"streams connected  {connected} (max {max(r.connect_seconds for r in results):.1f} s)")
    print(f"streams held @end  {held}")
    print(f"heartbeats sent    {sent}  acked {acks}  -> {acks / args.seconds:.0f} acks/s "
          f"(offered {connected / args.interval:.0f}/s)")  # fmt: skip
    print(f"ack latency ms     p50 {pct(latencies, 50):.1f}  {tail_name} {tail_value:.1f}  "
          f"max {max(latencies) if latencies else float('nan'):.1f}")  # fmt: skip
    print(f"server CPU         {server_cpu / max(acks, 1) * 1000:.3f} ms per heartbeat; mean {statistics.fmean(steady_cpu) if steady_cpu else 0:.0f} %  "
          f"max {max(cpu) if cpu else 0:.0f} % (100 = one core)")  # fmt: skip
    print(f"server RSS MiB     end {rss[-1] if rss else 0:.0f}  max {max(rss) if rss else 0:.0f}")
    print(f"busiest thread CPU mean {statistics.fmean(busiest[1:] or busiest) if busiest else 0:.0f} %  "
          f"max {max(busiest) if busiest else 0:.0f} % (threads: {server.num_threads()})")  # fmt: skip
    window_acks = max(sum(r.acks for r in results), 1)
    print(
        "server threads     "
        + ", ".join(f"{thread_name(k)} {cpu_s / window_acks * 1000:.3f}" for cpu_s, k in per_thread)
        + " ms per heartbeat"
    )
    print(f"loopback packets   {packets / max(acks, 1):.1f} per heartbeat ({packets / window:.0f}/s)")
    print(f"load gen CPU       {sum(r.cpu_seconds for r in results) / max(acks, 1) * 1000:.3f} ms per heartbeat, "
          f"mean {statistics.fmean(gen_cpu) if gen_cpu else 0:.0f} % (all workers)")  # fmt: skip
    print(
        f"machine CPU %      mean {statistics.fmean(machine) if machine else 0:.0f} (of {os.cpu_count()} cores x 100)"
    )
    print(f"errors             {dict(errors) if errors else 'none'}")
    return {
        "name": name,
        "cpu_ms": server_cpu / max(acks, 1) * 1000,
        "packets": packets / max(acks, 1),
        "latency": f"p50 {pct(latencies, 50):.1f} ms, {tail_name} {tail_value:.1f} ms",
    }


if __name__ == "__main__":
    main()
