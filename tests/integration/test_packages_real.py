"""Packages by digest with REAL agent processes and a real controller (mutual TLS node port).

1. A 50 MiB incompressible source, uploaded once (client-streaming UploadSource), deploys to
   3 agents: the deploy command carries the digest, each agent fetches the package over
   FetchPackage and caches it by digest; a cached package corrupted on disk is detected and
   fetched again when the replica starts again.
2. An agent killed (SIGKILL) in the middle of a download resumes it after its restart and runs
   the replica; a node fetching a package of replicas it does not hold gets PERMISSION_DENIED;
   an upload over the limit gets RESOURCE_EXHAUSTED and nothing is stored.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from automator67.v1 import deployment_pb2, node_pb2, node_pb2_grpc

from controller.agent.client import TARGET_NAME_OVERRIDE
from controller.limits import CHUNK_BYTES, node_channel_options
from tests.integration.test_deployments_real import APP, Client, _until, app_manifest, processes
from tests.integration.test_node_api import _user
from tests.support import bearer, controller_settings, running_controller

HEARTBEAT = 0.3
BIG = 50 * 1024 * 1024


def big_source(version: str) -> bytes:
    """A tar.gz of the test app plus 50 MiB of random bytes (gzip cannot shrink them)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as archive:
        for name, data in (
            ("app.py", APP.format(version=version, healthy_after=0.0).encode()),
            ("blob.bin", os.urandom(BIG)),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


async def upload(client: Client, source: bytes) -> deployment_pb2.UploadSourceResponse:
    async def messages() -> AsyncIterator[deployment_pb2.UploadSourceRequest]:
        yield deployment_pb2.UploadSourceRequest(
            metadata=deployment_pb2.UploadSourceMetadata(
                size=len(source), sha256=hashlib.sha256(source).hexdigest()
            )
        )
        for start in range(0, len(source), CHUNK_BYTES):
            yield deployment_pb2.UploadSourceRequest(chunk=source[start : start + CHUNK_BYTES])

    reply: deployment_pb2.UploadSourceResponse = await client.deployments.UploadSource(
        messages(), metadata=bearer(client.token)
    )
    return reply


def manifest(replicas: int, cpu_cores: float) -> deployment_pb2.DeploymentManifest:
    """The app with 60 % of a node's CPUs per replica: a node holds at most one replica."""
    m = app_manifest(replicas)
    m.resources.cpu = f"{cpu_cores * 0.6:.2f}"
    return m


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while piece := handle.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()


def node_channel(agent_dir: Path, node_port_address: str) -> grpc.aio.Channel:
    """A channel to the node port with an agent's own certificate (as that node)."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(agent_dir / "ca.crt").read_bytes(),
        private_key=(agent_dir / "node.key").read_bytes(),
        certificate_chain=(agent_dir / "node.crt").read_bytes(),
    )
    options = [("grpc.ssl_target_name_override", TARGET_NAME_OVERRIDE), *node_channel_options()]
    return grpc.aio.secure_channel(node_port_address, credentials, options=options)


async def fetch_all(channel: grpc.aio.Channel, sha256: str) -> bytes:
    stub = node_pb2_grpc.NodeServiceStub(channel)
    parts = [c.data async for c in stub.FetchPackage(node_pb2.FetchPackageRequest(sha256=sha256))]
    return b"".join(parts)


async def test_a_50_mib_source_deploys_to_3_real_agents_and_a_corrupted_cache_is_fetched_again(
    tmp_path: Path,
) -> None:
    settings = controller_settings(tmp_path / "controller", heartbeat_interval_seconds=HEARTBEAT)
    with processes(tmp_path) as procs:
        async with (
            running_controller(settings) as controller,
            grpc.aio.insecure_channel(controller.address) as channel,
        ):
            client = Client(channel, await _user(channel))
            enrollment = await client.enrollment(uses=4)
            base = 23000 + (os.getpid() % 50) * 60
            regions = ["eu-west", "us-east", "ap-south"]
            agent = {
                r: procs.agent(controller.address, enrollment, r, (base + i * 20, base + i * 20 + 19))
                for i, r in enumerate(regions)
            }
            nodes = await client.wait_ready(3)
            region_of = {n.id: n.region for n in nodes}
            cores = min(n.capabilities.cpu_cores for n in nodes)

            source = big_source("v1")
            uploaded = await upload(client, source)
            assert uploaded.sha256 == hashlib.sha256(source).hexdigest()
            assert uploaded.size == len(source)
            created = await client.deployments.CreateDeployment(
                deployment_pb2.CreateDeploymentRequest(
                    manifest=manifest(3, cores), source_sha256=uploaded.sha256
                ),
                metadata=bearer(client.token),
            )
            d = await client.wait_answering(created.deployment_id, 3, "v1", within=180)
            package = d.package_sha256
            for region in regions:  # each agent cached the package by digest, verified
                cached = tmp_path / region / "packages" / package
                assert sha256_of(cached) == package
                assert cached.stat().st_size > BIG

            # Stop one agent, corrupt its cached package (same size), start it again: the
            # replica comes back on it (no other node has room), and the agent notices.
            victim = next(a for a in d.node_assignments if a.replica_index == 0)
            region = region_of[victim.node_id]
            agent[region].send_signal(signal.SIGTERM)
            agent[region].wait(timeout=30)
            cached = tmp_path / region / "packages" / package
            with cached.open("r+b") as handle:
                handle.seek(BIG // 2)
                handle.write(b"\0" * 4096)
            assert sha256_of(cached) != package
            procs.agent(
                controller.address,
                enrollment,
                region,
                (base + regions.index(region) * 20, base + regions.index(region) * 20 + 19),
            )

            async def back() -> bool:
                latest = await client.get(created.deployment_id)
                a = next(a for a in latest.node_assignments if a.replica_index == 0)
                return a.status == "running" and a.generation > victim.generation

            await _until(back, "replica 0 running again on its node", within=120)
            await client.wait_answering(created.deployment_id, 3, "v1", within=60)
            assert sha256_of(cached) == package
            assert "is corrupt" in (tmp_path / f"agent-{region}.log").read_text()


async def test_a_killed_download_resumes_a_stranger_is_denied_and_oversized_uploads_are_refused(
    tmp_path: Path,
) -> None:
    limit = BIG + 1024 * 1024
    settings = controller_settings(
        tmp_path / "controller", heartbeat_interval_seconds=HEARTBEAT, max_package_bytes=limit
    )
    with processes(tmp_path) as procs:
        async with (
            running_controller(settings) as controller,
            grpc.aio.insecure_channel(controller.address) as channel,
        ):
            client = Client(channel, await _user(channel))
            enrollment = await client.enrollment(uses=3)
            base = 26000 + (os.getpid() % 50) * 40
            ports = {"eu-west": (base, base + 19), "us-east": (base + 20, base + 39)}
            procs.agent(controller.address, enrollment, "eu-west", ports["eu-west"])
            nodes = await client.wait_ready(1)
            cores = nodes[0].capabilities.cpu_cores

            # Over the limit: RESOURCE_EXHAUSTED, and nothing kept (not even a temporary file).
            store = settings.data_dir / "packages"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await upload(client, os.urandom(limit + 1))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
            assert f"larger than the limit of {limit} bytes" in (refused.value.details() or "")
            assert [p for p in store.rglob("*") if p.is_file()] == []

            source = big_source("v1")
            uploaded = await upload(client, source)
            created = await client.deployments.CreateDeployment(
                deployment_pb2.CreateDeploymentRequest(
                    manifest=manifest(1, cores), source_sha256=uploaded.sha256
                ),
                metadata=bearer(client.token),
            )
            d = await client.wait_answering(created.deployment_id, 1, "v1", within=180)
            package = d.package_sha256

            # A second node, holding no replica of it, may not fetch the package; the first may.
            second = procs.agent(controller.address, enrollment, "us-east", ports["us-east"])
            await client.wait_ready(2)
            node_port = f"127.0.0.1:{controller.node_port}"
            async with node_channel(tmp_path / "us-east", node_port) as stranger:
                with pytest.raises(grpc.aio.AioRpcError) as denied:
                    await fetch_all(stranger, package)
                assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED, denied.value
                assert "has no replica of package" in (denied.value.details() or "")
            async with node_channel(tmp_path / "eu-west", node_port) as holder:
                assert hashlib.sha256(await fetch_all(holder, package)).hexdigest() == package

            # Scale to 2: replica 1 can only go to the second node. Kill it mid-download.
            await client.deployments.ScaleDeployment(
                deployment_pb2.ScaleDeploymentRequest(deployment_id=created.deployment_id, replicas=2),
                metadata=bearer(client.token),
            )
            part = tmp_path / "us-east" / "packages" / f"{package}.part"

            async def downloading() -> bool:
                return part.exists() and part.stat().st_size > 0

            await _until(downloading, "the second agent downloading", within=60)
            second.send_signal(signal.SIGKILL)
            second.wait(timeout=10)
            left = part.stat().st_size
            assert 0 < left < (tmp_path / "eu-west" / "packages" / package).stat().st_size
            assert not (tmp_path / "us-east" / "packages" / package).exists()

            procs.agent(controller.address, enrollment, "us-east", ports["us-east"])
            d = await client.wait_answering(created.deployment_id, 2, "v1", within=180)
            assert sha256_of(tmp_path / "us-east" / "packages" / package) == package
            log = (tmp_path / "agent-us-east.log").read_text()
            assert "resuming a download left at" in log
