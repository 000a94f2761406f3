#!/usr/bin/env python3
"""Storage federation: upload/download of one file with 3 replicas on local agents, vs ``cp``.

    .venv/bin/python tests/bench/bench_storage.py --mib 256 --repair-mib 1024 --rounds 5

Starts a real controller in this process (SQLite) and real storage agents (``a67 agent
--node-types storage`` subprocesses) with data directories on one disk; the client is a
process of its own (as a real one is: in the controller's process it would share its GIL).
``--rounds`` rounds, each: ``cp`` x3, upload, download, so that the three are measured side
by side under the same machine load; the ratios are the medians of the per-round ratios.

* ``cp`` of the file three times into a fresh directory, then ``sync`` (the same 3 copies
  without the controller): MB/s = size / wall time;
* upload: ``UploadFile`` of ``--mib`` MiB of random bytes read from a file in 256 KiB pieces
  (encrypted, 3 verified copies, fsynced on each agent; from round 2 on it replaces the
  file); MB/s = size / wall time of the call in the client; CPU seconds (user/system) of
  the controller, the client and the agents during it;
* download: ``DownloadFile`` of the whole file (read, verified, decrypted), discarding the
  bytes; MB/s = size / wall time;
* the controller process's peak RSS growth during upload and download (sampled every
  10 ms from /proc/self/status); round 1 is the one that counts (later rounds reuse
  memory the first one took from the system);
* repair: a 4th agent joins, a ``--repair-mib`` file is uploaded, one holder is killed
  with SIGKILL; the time until every chunk has 3 verified copies on the survivors
  (failure detection — 3.1 heartbeat intervals + the 1.5-interval mass-failure window at
  a 1 s heartbeat — plus the copying, at an unlimited repair rate).

Not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from automator67.v1 import storage_pb2, storage_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.integration.test_deployments_real import Client, processes  # noqa: E402
from tests.integration.test_node_api import _user  # noqa: E402
from tests.support import bearer, controller_settings, running_controller  # noqa: E402

PIECE = 256 * 1024


def cpu_seconds(pid: int | str = "self") -> tuple[float, float]:
    """User and system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_of(pids: list[int | str]) -> tuple[float, float]:
    times = [cpu_seconds(p) for p in pids]
    return sum(t[0] for t in times), sum(t[1] for t in times)


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


def client_main(address: str, token: str) -> None:
    """``--client``: the measured uploads and downloads run in a process of their own (a
    real client is one; in the controller's process it would share its GIL). Reads
    ``upload <path> <source>`` / ``download <file id>`` lines, answers one JSON line each."""

    async def run() -> None:
        async with grpc.aio.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        ) as channel:
            stub = storage_pb2_grpc.StorageServiceStub(channel)
            while line := await asyncio.to_thread(sys.stdin.readline):
                command, *args = line.split()
                start = time.perf_counter()
                if command == "upload":
                    stored = await upload(stub, token, args[0], Path(args[1]))
                    answer: dict[str, object] = {"id": stored.id, "size": stored.size}
                else:
                    answer = {"size": await download(stub, token, args[0])}
                answer["seconds"] = time.perf_counter() - start
                print(json.dumps(answer), flush=True)

    asyncio.run(run())


class ClientProcess:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.pid = process.pid

    @classmethod
    async def start(cls, address: str, token: str) -> ClientProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--client", address, token, stdin=PIPE, stdout=PIPE
        )
        return cls(process)

    async def ask(self, *words: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write((" ".join(words) + "\n").encode())
        await self.process.stdin.drain()
        answer: dict[str, Any] = json.loads(await self.process.stdout.readline())
        return answer

    async def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        await self.process.wait()


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


async def main(mib: int, repair_mib: int, work: Path, rounds: int) -> None:
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

            pids = [a.pid for a in agents.values()]
            remote = await ClientProcess.start(controller.address, token)
            mb = size / 1e6
            print(
                f"file {mib} MiB, 3 replicas, 3 local agents, chunk {settings.storage_chunk_bytes // 2**20} MiB;"
                f" {rounds} rounds of cp x3 / upload / download (the upload replaces the file)"
            )
            ups: list[float] = []
            downs: list[float] = []
            cps: list[float] = []
            up_growth: list[float] = []
            down_growth: list[float] = []
            for round_no in range(1, rounds + 1):
                cp_s = cp_three(source, work)
                cpu_before = cpu_of(["self"]), cpu_of([remote.pid]), cpu_of(pids)
                with PeakRss() as up_rss:
                    answer = await remote.ask("upload", "bench/file.bin", str(source))
                up_s = float(answer["seconds"])
                cpu_after = cpu_of(["self"]), cpu_of([remote.pid]), cpu_of(pids)
                up_cpu = [(a[0] - b[0], a[1] - b[1]) for a, b in zip(cpu_after, cpu_before, strict=True)]
                assert answer["size"] == size
                with PeakRss() as down_rss:
                    got = await remote.ask("download", str(answer["id"]))
                down_s = float(got["seconds"])
                assert got["size"] == size
                cps.append(cp_s)
                ups.append(up_s)
                downs.append(down_s)
                up_growth.append(up_rss.peak - up_rss.base)
                down_growth.append(down_rss.peak - down_rss.base)
                print(
                    f"round {round_no}: cp x3 {mb / cp_s:6.1f} MB/s ({cp_s:.2f} s)"
                    f" | upload {mb / up_s:6.1f} MB/s ({up_s:.2f} s, ratio {cp_s / up_s:.2f},"
                    f" peak RSS +{up_growth[-1]:.1f} MiB; CPU user/sys: controller"
                    f" {up_cpu[0][0]:.2f}/{up_cpu[0][1]:.2f} s, client {up_cpu[1][0]:.2f}/{up_cpu[1][1]:.2f} s,"
                    f" 3 agents {up_cpu[2][0]:.2f}/{up_cpu[2][1]:.2f} s)"
                    f" | download {mb / down_s:6.1f} MB/s ({down_s:.2f} s, ratio {cp_s / down_s:.2f},"
                    f" peak RSS +{down_growth[-1]:.1f} MiB)"
                )
            up_ratio = statistics.median(c / u for c, u in zip(cps, ups, strict=True))
            down_ratio = statistics.median(c / d for c, d in zip(cps, downs, strict=True))
            print(
                f"median    upload {mb / statistics.median(ups):6.1f} MB/s, download {mb / statistics.median(downs):6.1f} MB/s,"
                f" cp x3 {mb / statistics.median(cps):6.1f} MB/s"
            )
            print(
                f"ratio     upload {up_ratio:.2f} (goal >= 0.5), download {down_ratio:.2f} (goal >= 0.8)"
                f" — medians of the per-round ratios"
            )
            print(
                f"peak RSS  growth, largest of the rounds: upload {max(up_growth):.1f} MiB, download"
                f" {max(down_growth):.1f} MiB (goal < 64)"
            )

            await remote.close()

            if repair_mib:
                agents["r4"] = start_agent(procs, controller.address, enrollment, "r4")
                await client.wait_ready(4, within=60)
                big = work / "repair.bin"
                with big.open("wb") as handle:
                    for _ in range(repair_mib):
                        handle.write(os.urandom(1024 * 1024))
                source.unlink()
                await stub.DeleteFile(
                    storage_pb2.DeleteFileRequest(file_id=str(answer["id"])), metadata=bearer(token)
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
    parser.add_argument("--rounds", type=int, default=3, help="rounds of cp x3 / upload / download")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--client", nargs=2, metavar=("ADDRESS", "TOKEN"), help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.client:
        client_main(*ns.client)
        sys.exit(0)
    with tempfile.TemporaryDirectory(dir=ns.dir) as tmp:
        asyncio.run(main(ns.mib, ns.repair_mib, Path(tmp), ns.rounds))
