#!/usr/bin/env python3
"""Package distribution: one package to 3 nodes over FetchPackage, against ``cp`` x3.

    .venv/bin/python tests/bench/bench_packages.py --mib 256

Starts a real controller in this process (SQLite, node port with mutual TLS), enrolls 3
real agents (``a67 agent`` subprocesses, stopped once enrolled: only their certificates
are used), writes a package of ``--mib`` MiB of random bytes into the controller's package
store and lets the 3 nodes fetch it. Each node is a subprocess running the agent's own
:class:`~controller.agent.packages.PackageCache` (chunks over its own mTLS connection,
SHA-256 while writing, fsync, rename), all 3 at once. Reported: MB/s = 3 x size / wall time
from the first request to the last verified file; next to it, ``cp`` of the same file three
times (then ``sync``) on the same disk, and the ratio. Not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from automator67.v1 import node_pb2, node_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.integration.test_node_api import _user  # noqa: E402
from tests.support import bearer, controller_settings, running_controller  # noqa: E402

FETCHER = r"""
import asyncio, json, sys, time
from pathlib import Path
import grpc
from automator67.v1 import node_pb2, node_pb2_grpc
from controller.agent.client import TARGET_NAME_OVERRIDE
from controller.agent.packages import PackageCache
from controller.keepalive import client_options
from controller.limits import node_channel_options

agent_dir, address, sha256, size, out = sys.argv[1:6]

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
        cache = PackageCache(out, fetch)
        print("ready", flush=True)
        sys.stdin.readline()
        start = time.time()
        await cache.get(sha256, int(size))
        print(json.dumps({"start": start, "end": time.time()}), flush=True)

asyncio.run(main())
"""


def agent_args(address: str, data_dir: Path, region: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "controller.cli",
        "agent",
        "--data-dir",
        str(data_dir),
        "--region",
        region,
        "--controller",
        address,
    ]


async def enroll(controller_address: str, work: Path, count: int) -> list[Path]:
    async with grpc.aio.insecure_channel(controller_address) as channel:
        token = await _user(channel)
        issued = await node_pb2_grpc.NodeServiceStub(channel).CreateEnrollmentToken(
            node_pb2.CreateEnrollmentTokenRequest(max_uses=count), metadata=bearer(token)
        )
    dirs = [work / f"agent{i}" for i in range(count)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("A67_")} | {
        "A67_AGENT_TOKEN": issued.token
    }
    procs = [
        subprocess.Popen(  # noqa: ASYNC220 - started once, waited for below
            agent_args(controller_address, d, f"r{i}"),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i, d in enumerate(dirs)
    ]
    try:
        deadline = time.monotonic() + 60
        while not all((d / "node.json").exists() for d in dirs):
            if time.monotonic() > deadline:
                raise SystemExit("agents did not enroll")
            await asyncio.sleep(0.1)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=30)
    return dirs


def cp_three_times(source: Path, work: Path) -> float:
    start = time.perf_counter()
    for i in range(3):
        subprocess.run(["cp", str(source), str(work / f"copy{i}")], check=True)
    subprocess.run(["sync"], check=True)
    elapsed = time.perf_counter() - start
    for i in range(3):
        (work / f"copy{i}").unlink()
    return elapsed


async def run(mib: int) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="a67-bench-packages-"))
    try:
        settings = controller_settings(work / "controller", heartbeat_interval_seconds=1.0)
        async with running_controller(settings) as controller:
            dirs = await enroll(controller.address, work, 3)
            data = os.urandom(mib * 1024 * 1024)
            sha256 = hashlib.sha256(data).hexdigest()
            store = controller.deployments.packages
            await store.put_package_bytes(sha256, data)
            del data
            for d in dirs:  # as if each node had been sent a replica of it
                node_id = json.loads((d / "node.json").read_text())["node_id"]
                controller.deployments._granted.add((node_id, sha256))
            size = store.package(sha256).size  # type: ignore[union-attr]
            node_address = f"127.0.0.1:{controller.node_port}"
            fetchers = [
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    FETCHER,
                    str(d),
                    node_address,
                    sha256,
                    str(size),
                    str(d / "cache"),
                    cwd=ROOT,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
                for d in dirs
            ]
            for f in fetchers:
                assert f.stdout is not None
                assert (await f.stdout.readline()).strip() == b"ready"
            for f in fetchers:
                assert f.stdin is not None
                f.stdin.write(b"go\n")
                await f.stdin.drain()
            times = []
            for f in fetchers:
                assert f.stdout is not None
                times.append(json.loads(await f.stdout.readline()))
                await f.wait()
            wall = max(t["end"] for t in times) - min(t["start"] for t in times)
            for d in dirs:
                assert (d / "cache" / sha256).stat().st_size == size
            cp = await asyncio.to_thread(cp_three_times, store.package_path(sha256), work)
        mb = 3 * size / 1e6
        return {
            "size_mib": mib,
            "fetch_seconds": wall,
            "fetch_mb_s": mb / wall,
            "cp_seconds": cp,
            "cp_mb_s": mb / cp,
            "ratio": (mb / wall) / (mb / cp),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=256, help="package size in MiB (default 256)")
    args = parser.parse_args()
    result = asyncio.run(run(args.mib))
    print(
        f"package {result['size_mib']} MiB to 3 nodes: {result['fetch_seconds']:.2f} s, "
        f"{result['fetch_mb_s']:.0f} MB/s | cp x3 + sync: {result['cp_seconds']:.2f} s, "
        f"{result['cp_mb_s']:.0f} MB/s | ratio {result['ratio']:.2f}"
    )


if __name__ == "__main__":
    main()
