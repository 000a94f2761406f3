"""UpdateDeployment with an update mask (AIP-134) over gRPC, with the simulated agents of
test_deployments.py: a new source alone, one manifest field alone, a scale, bad masks."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from automator67.v1 import deployment_pb2
from google.protobuf import field_mask_pb2

from tests.integration.test_deployments import (
    World,
    _async,
    _until,
    _violations,
    controller,  # noqa: F401 - the fixture
    manifest,
    source_tar_gz,
    world,  # noqa: F401 - the fixture
)
from tests.support import bearer


async def _upload(w: World, data: bytes) -> str:
    async def messages() -> AsyncIterator[deployment_pb2.UploadSourceRequest]:
        yield deployment_pb2.UploadSourceRequest(metadata=deployment_pb2.UploadSourceMetadata(size=len(data)))
        yield deployment_pb2.UploadSourceRequest(chunk=data)

    response = await w.stub.UploadSource(messages(), metadata=bearer(w.token))
    return response.sha256


async def _update(w: World, request: deployment_pb2.UpdateDeploymentRequest) -> deployment_pb2.Deployment:
    return (await w.stub.UpdateDeployment(request, metadata=bearer(w.token))).deployment


def _mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


async def test_partial_updates_change_only_the_masked_fields(world: World) -> None:  # noqa: F811
    agents = await world.add_agents("eu-west", "us-east", "ap-south")
    deployment_id = await world.create(manifest(replicas=2))
    await world.wait_status(deployment_id, deployment_pb2.DEPLOYMENT_STATUS_RUNNING, 2)

    async def settled(version: int) -> deployment_pb2.Deployment:
        async def check() -> bool:
            d = await world.get(deployment_id)
            return d.status == deployment_pb2.DEPLOYMENT_STATUS_RUNNING and d.version == version

        await _until(check, f"running at version {version}")
        return await world.get(deployment_id)

    def envs_since(counts: list[int]) -> list[dict[str, str]]:
        return [dict(d.env) for a, n in zip(agents, counts, strict=True) for d in a.deploys()[n:]]

    # One manifest field alone: the env, without restating the manifest (which would not validate).
    before = [len(a.deploys()) for a in agents]
    updated = await _update(
        world,
        deployment_pb2.UpdateDeploymentRequest(
            deployment_id=deployment_id,
            manifest=deployment_pb2.DeploymentManifest(env={"MODE": "blue"}),
            update_mask=_mask("manifest.env"),
        ),
    )
    assert updated.version == 2
    v2 = await settled(2)
    assert v2.manifest.runtime == "python"
    assert v2.manifest.entrypoint == "app.py"
    assert v2.manifest.resources.memory == "256MB"
    new_envs = envs_since(before)
    assert new_envs
    assert all(e.get("MODE") == "blue" and "SECRET_TOKEN" not in e for e in new_envs)

    # A new source alone (by digest): the manifest and env stay as they are.
    digest = await _upload(world, source_tar_gz({"app.py": "print('v3')\n"}))
    before = [len(a.deploys()) for a in agents]
    await _update(
        world,
        deployment_pb2.UpdateDeploymentRequest(
            deployment_id=deployment_id, source_sha256=digest, update_mask=_mask("source_sha256")
        ),
    )
    v3 = await settled(3)
    assert v3.package_sha256 != v2.package_sha256
    assert v3.manifest.entrypoint == "app.py"
    assert all(e.get("MODE") == "blue" for e in envs_since(before))
    assert envs_since(before)

    # One nested field: the health check's path; the rest of the manifest (and the source) stay.
    await _update(
        world,
        deployment_pb2.UpdateDeploymentRequest(
            deployment_id=deployment_id,
            manifest=deployment_pb2.DeploymentManifest(
                health_check=deployment_pb2.HealthCheck(path="/ready")
            ),
            update_mask=_mask("manifest.health_check.path"),
        ),
    )
    v4 = await settled(4)
    assert v4.manifest.health_check.path == "/ready"
    assert v4.manifest.resources.memory == "256MB"
    assert v4.package_sha256 != v3.package_sha256  # its manifest.json changed: rebuilt from v3's source

    # manifest.replicas alone is a scale.
    scaled = await _update(
        world,
        deployment_pb2.UpdateDeploymentRequest(
            deployment_id=deployment_id,
            manifest=deployment_pb2.DeploymentManifest(replicas=3),
            update_mask=_mask("manifest.replicas"),
        ),
    )
    assert scaled.desired_replicas == 3
    await world.wait_status(deployment_id, deployment_pb2.DEPLOYMENT_STATUS_RUNNING, 3)
    await _until(lambda: _async(sum(len(a.running) for a in agents) == 3), "three replicas")
    assert (await world.get(deployment_id)).version == 4


@pytest.mark.parametrize(
    ("paths", "needle"),
    [
        (("manifest.bogus",), "manifest.bogus"),
        (("manifest.env", "replicas"), "replicas"),
        (("manifest.replicas", "manifest.env"), "scale"),
        (("source_sha256",), "required"),
    ],
)
async def test_bad_update_masks_are_invalid_argument_with_a_field_violation(
    world: World,  # noqa: F811
    paths: tuple[str, ...],
    needle: str,
) -> None:
    await world.add_agents("eu-west", "us-east")
    deployment_id = await world.create(manifest(replicas=1))
    await world.wait_status(deployment_id, deployment_pb2.DEPLOYMENT_STATUS_RUNNING, 1)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _update(
            world,
            deployment_pb2.UpdateDeploymentRequest(
                deployment_id=deployment_id,
                manifest=deployment_pb2.DeploymentManifest(replicas=2, env={"A": "1"}),
                update_mask=_mask(*paths),
            ),
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = _violations(info.value)
    assert any(needle in f"{field} {text}" for field, text in violations.items()), violations
    assert (await world.get(deployment_id)).version == 1
