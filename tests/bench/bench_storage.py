#!/usr/bin/env python3
"""Storage federation: upload/download of one file with 3 replicas on local agents, vs ``cp``.

    .venv/bin/python tests/bench/bench_storage.py --mib 256 --repair-mib 1024

Starts a real controller in this process (SQLite) and real storage agents (``a67 agent
--node-types storage`` subprocesses) with data directories on one disk. Measures:

* upload: ``UploadFile`` of ``--mib`` MiB of random bytes read from a file in 256 KiB pieces
  (encrypted, 3 verified copies, fsynced on each agent); MB/s = size / wall time;
* download: ``DownloadFile`` of the whole file (read, verified, decrypted), discarding the
  bytes; MB/s = size / wall time;
* ``cp`` of the same file three times into a fresh directory, then ``sync`` (the same
  3 copies without the controller): MB/s = size / wall time; the ratios use it;
* the controller process's peak RSS growth during upload and download (sampled every
  10 ms from /proc/self/status; the client's pieces are included, they are small);
* repair: a 4th agent joins, a ``--repair-mib`` file is uploaded, one holder is killed
  with SIGKILL; the time until every chunk has 3 verified copies on the survivors
  (failure detection — 3.1 heartbeat intervals + the 1.5-interval mass-failure window at
  a 1 s heartbeat — plus the copying, at an unlimited repair rate).

Not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from automator67.v1 import storage_pb2, storage_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.integration.test_deployments_real import Client, processes  # noqa: E402
from tests.integration.test_node_api import _user  # noqa: E402
from tests.support import bearer, controller_settings, running_controller  # noqa: E402

PIECE = 256 * 1024


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class PeakRss:
    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib())
            time.sleep(0.01)

    def __enter__(self) -> PeakRss:
        self.base = rss_mib()
        self.peak = self.base
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def upload(
    stub: storage_pb2_grpc.StorageServiceStub, token: str, path: str, source: Path
) -> storage_pb2.StorageFile:
    async def messages() -> AsyncIterator[storage_pb2.UploadFileRequest]:
        yield storage_pb2.UploadFileRequest(metadata=storage_pb2.UploadFileMetadata(path=path, replicas=3))
        with source.open("rb") as handle:
            while piece := await asyncio.to_thread(handle.read, PIECE):
                yield storage_pb2.UploadFileRequest(data=piece)

    return (await stub.UploadFile(messages(), metadata=bearer(token))).file


async def download(stub: storage_pb2_grpc.StorageServiceStub, token: str, file_id: str) -> int:
    total = 0
    async for message in stub.DownloadFile(
        storage_pb2.DownloadFileRequest(file_id=file_id), metadata=bearer(token)
    ):
        total += len(message.data)
    return total


def cp_three(source: Path, work: Path) -> float:
    target = work / "cp"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    start = time.perf_counter()
    for i in range(3):
        subprocess.run(["cp", str(source), str(target / f"copy{i}")], check=True)
    subprocess.run(["sync"], check=True)
    elapsed = time.perf_counter() - start
    shutil.rmtree(target)
    return elapsed


def start_agent(procs: object, address: str, token: str, region: str) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "controller.cli", "agent", "--data-dir", str(procs.root / region)]  # type: ignore[attr-defined]
    args += ["--region", region, "--controller", address, "--node-types", "storage", "--log-level", "WARNING"]
    return procs.start(args, f"agent-{region}.log", {"A67_AGENT_TOKEN": token})  # type: ignore[attr-defined]


async def main(mib: int, repair_mib: int, work: Path) -> None:
    source = work / "source.bin"
    with source.open("wb") as handle:
        for _ in range(mib):
            handle.write(os.urandom(1024 * 1024))
    size = mib * 1024 * 1024
    settings = controller_settings(
        work / "controller",
        heartbeat_interval_seconds=1.0,
        node_restart_grace_seconds=3.0,
        storage_repair_interval_seconds=0.5,
        storage_repair_rate_per_second=10_000.0,
    )
    with processes(work) as procs:
        async with (
            running_controller(settings) as controller,
            grpc.aio.insecure_channel(
                controller.address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
            ) as channel,
        ):
            token = await _user(channel)
            client = Client(channel, token)
            stub = storage_pb2_grpc.StorageServiceStub(channel)
            enrollment = await client.enrollment(uses=4)
            agents = {r: start_agent(procs, controller.address, enrollment, r) for r in ("r1", "r2", "r3")}
            await client.wait_ready(3, within=60)

            with PeakRss() as up_rss:
                start = time.perf_counter()
                stored = await upload(stub, token, "bench/file.bin", source)
                up_s = time.perf_counter() - start
            with PeakRss() as down_rss:
                start = time.perf_counter()
                got = await download(stub, token, stored.id)
                down_s = time.perf_counter() - start
            assert got == size
            cp_s = cp_three(source, work)
            mb = size / 1e6
            print(
                f"file {mib} MiB, 3 replicas, 3 local agents, chunk {settings.storage_chunk_bytes // 2**20} MiB"
            )
            print(
                f"upload    {mb / up_s:8.1f} MB/s  ({up_s:.2f} s)   peak RSS growth {up_rss.peak - up_rss.base:6.1f} MiB"
            )
            print(
                f"download  {mb / down_s:8.1f} MB/s  ({down_s:.2f} s)   peak RSS growth {down_rss.peak - down_rss.base:6.1f} MiB"
            )
            print(f"cp x3     {mb / cp_s:8.1f} MB/s  ({cp_s:.2f} s, then sync)")
            print(
                f"ratio     upload {cp_s / up_s:.2f} (goal >= 0.5), download {cp_s / down_s:.2f} (goal >= 0.8)"
            )

            if repair_mib:
                agents["r4"] = start_agent(procs, controller.address, enrollment, "r4")
                await client.wait_ready(4, within=60)
                big = work / "repair.bin"
                with big.open("wb") as handle:
                    for _ in range(repair_mib):
                        handle.write(os.urandom(1024 * 1024))
                source.unlink()
                await stub.DeleteFile(
                    storage_pb2.DeleteFileRequest(file_id=stored.id), metadata=bearer(token)
                )
                f = await upload(stub, token, "bench/repair.bin", big)
                held: dict[str, int] = {}
                for c in f.chunks:
                    for loc in c.locations:
                        held[loc.node_id] = held.get(loc.node_id, 0) + c.size
                victim = max(held, key=lambda n: held[n])
                region = next(n.region for n in await client.list_nodes() if n.id == victim)
                start = time.perf_counter()
                agents[region].send_signal(signal.SIGKILL)
                failed_at = None
                while True:
                    await asyncio.sleep(0.2)
                    if failed_at is None and controller.fleet.recovery_due(victim):
                        failed_at = time.perf_counter() - start
                    latest = (
                        await stub.GetFile(storage_pb2.GetFileRequest(file_id=f.id), metadata=bearer(token))
                    ).file
                    if latest.replication_status == storage_pb2.REPLICATION_STATUS_COMPLETE and all(
                        len(c.locations) == 3 and victim not in {loc.node_id for loc in c.locations}
                        for c in latest.chunks
                    ):
                        break
                total = time.perf_counter() - start
                print(
                    f"repair    kill -9 of a node holding {held[victim] / 2**20:.0f} MiB ({repair_mib} MiB file): "
                    f"every chunk at 3 copies after {total:.1f} s "
                    f"(failure declared + window at {failed_at or 0:.1f} s, copying {total - (failed_at or 0):.1f} s, "
                    f"{held[victim] / 1e6 / max(total - (failed_at or 0), 1e-9):.0f} MB/s)"
                )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repair-mib", type=int, default=1024)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=ns.dir) as tmp:
        asyncio.run(main(ns.mib, ns.repair_mib, Path(tmp)))
