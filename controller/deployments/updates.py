"""Rolling updates and rollbacks: UpdateDeployment (whole or with an update mask) and RollbackDeployment.

One replica at a time (max surge 1): the new version's replica starts on another
node where one is feasible (else in place), must be healthy within its deadline,
and only then replaces the old one. If a new replica fails, the deployment
reverts by itself to the last good version. The decisions are ``versions.py``'s.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from automator67.v1 import deployment_pb2
from google.protobuf import json_format

from controller.deployments import versions
from controller.deployments.alerts import UPDATE_REVERTED
from controller.deployments.blobs import Stored
from controller.deployments.harness import ENV_PURPOSE, Harness
from controller.deployments.harness_index import view_of
from controller.deployments.manifest import validate_manifest
from controller.deployments.plans import Plan
from controller.deployments.records import ACTIVE, DeploymentView, request_of
from controller.deployments.rollout import Rollouts
from controller.errors import ControllerError, FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from controller.store.models import Deployment

log = logging.getLogger("a67.deployments")

# The paths UpdateDeployment's update_mask may name (AIP-134; relative to the request).
# "manifest.replicas" is a scale and must be alone; "*" (or no mask) replaces everything.
UPDATE_MASK_PATHS = frozenset(
    {
        "source_sha256",
        "source_tar_gz",
        "manifest",
        "manifest.name",
        "manifest.app_type",
        "manifest.runtime",
        "manifest.entrypoint",
        "manifest.resources",
        "manifest.resources.memory",
        "manifest.resources.cpu",
        "manifest.resources.storage",
        "manifest.replicas",
        "manifest.env",
        "manifest.health_check",
        "manifest.health_check.path",
        "manifest.health_check.interval_seconds",
        "manifest.health_check.timeout_seconds",
        "manifest.health_check.retries",
        "manifest.atomic",
    }
)


def apply_mask_path(
    target: deployment_pb2.DeploymentManifest, given: deployment_pb2.DeploymentManifest, parts: list[str]
) -> None:
    """Set the manifest field ``parts`` (below ``manifest``) of ``target`` to ``given``'s."""
    if not parts:
        target.CopyFrom(given)
        return
    dest: Any = target
    src: Any = given
    for part in parts[:-1]:
        dest, src = getattr(dest, part), getattr(src, part)
    name = parts[-1]
    field = dest.DESCRIPTOR.fields_by_name[name]
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        getattr(dest, name).clear()
        getattr(dest, name).update(getattr(src, name))
    elif field.message_type is not None:
        if src.HasField(name):
            getattr(dest, name).CopyFrom(getattr(src, name))
        else:
            dest.ClearField(name)
    else:
        setattr(dest, name, getattr(src, name))


def version_record(valid: Any, spec: deployment_pb2.DeploymentManifest) -> dict[str, Any]:
    """The parts of a version that do not depend on the vault or the package."""
    health = valid.health_check
    return {
        "spec": json_format.MessageToDict(spec, preserving_proto_field_name=True),
        "resources": {"cpu_cores": valid.cpu_cores, "memory_mb": valid.memory_mb, "disk_mb": valid.disk_mb},
        "startup_seconds": health.interval_seconds * health.retries + health.timeout_seconds,
        "atomic": valid.atomic,
    }


class Updates:
    """UpdateDeployment and RollbackDeployment, and the rolling update they start."""

    def __init__(self, harness: Harness, rollouts: Rollouts) -> None:
        self.h = harness
        self.rollouts = rollouts

    async def masked(
        self, row: Deployment, request: deployment_pb2.UpdateDeploymentRequest, paths: list[str]
    ) -> Deployment | None:
        """A partial update (AIP-134): the current manifest, env and source with the fields
        ``paths`` names taken from ``request``. None: the mask is a scale (the caller scales)."""
        unknown = [p for p in paths if p not in UPDATE_MASK_PATHS]
        if unknown:
            raise InvalidArgument(
                "The update mask names unknown fields",
                reason="INVALID_UPDATE_MASK",
                field_violations=[
                    FieldViolation(
                        "update_mask",
                        f"unknown path {p!r}: use source_sha256, source_tar_gz, manifest or manifest.<field>",
                    )
                    for p in unknown
                ],
            )
        if "manifest.replicas" in paths:
            if set(paths) != {"manifest.replicas"}:
                raise InvalidArgument(
                    "manifest.replicas cannot change together with other fields",
                    reason="INVALID_UPDATE_MASK",
                    field_violations=[
                        FieldViolation("update_mask", "manifest.replicas is a scale: give it alone")
                    ],
                )
            return None
        meta = dict(row.manifest)
        manifest = json_format.ParseDict(
            dict(meta.get("spec") or {}), deployment_pb2.DeploymentManifest(), ignore_unknown_fields=True
        )
        manifest.env.update(
            json.loads(self.h.vault.decrypt_str(str(meta["env_sealed"]), owner=row.id, purpose=ENV_PURPOSE))
        )
        for path in paths:
            if path.startswith("manifest"):
                apply_mask_path(manifest, request.manifest, path.split(".")[1:])
        inline = request.source_tar_gz if "source_tar_gz" in paths else b""
        digest = request.source_sha256 if "source_sha256" in paths else ""
        if {"source_tar_gz", "source_sha256"} & set(paths):
            if not inline and not digest:
                raise InvalidArgument(
                    "The update mask names the source but none was given",
                    field_violations=[FieldViolation("source_sha256", "is required by the update mask")],
                )
            return await self.update_to(row, manifest, inline, digest)
        if meta.get("source_sha256"):
            return await self.update_to(row, manifest, b"", str(meta["source_sha256"]))
        if set(paths) == {"manifest.env"}:  # the package holds no env: the current one serves
            return await self.update_to(row, manifest, b"", "", package_sha256=str(meta["package_sha256"]))
        raise FailedPrecondition(
            "This deployment's source is not recorded (it predates partial updates): "
            "give the source with the change (update_mask source_sha256)",
            reason="SOURCE_REQUIRED",
        )

    async def update_to(
        self,
        row: Deployment,
        manifest: deployment_pb2.DeploymentManifest,
        inline: bytes,
        source_sha256: str,
        *,
        package_sha256: str = "",
    ) -> Deployment:
        """Validate ``manifest``, build its package (or keep ``package_sha256``) and start the
        rolling update to it."""
        if not manifest.name:
            manifest.name = row.name
        if manifest.name != row.name:
            raise InvalidArgument(
                "A deployment cannot be renamed",
                field_violations=[FieldViolation("manifest.name", f"must be {row.name!r} (or empty)")],
            )
        source_size = len(inline) if inline else (1 if source_sha256 or package_sha256 else 0)
        valid = validate_manifest(manifest, source_size=source_size)
        if package_sha256:
            package: Stored | None = None
            source_digest = ""
        else:
            package, source_digest = await self.h.sources.build_with_source(
                row.user_id, valid, inline, source_sha256
            )
            package_sha256 = package.sha256
        spec = deployment_pb2.DeploymentManifest()
        spec.CopyFrom(manifest)
        spec.ClearField("env")
        spec.replicas = row.desired_replicas
        record = version_record(valid, spec)
        record["env_sealed"] = self.h.vault.encrypt_str(
            json.dumps(dict(valid.env)), owner=row.id, purpose=ENV_PURPOSE
        )
        record["package_sha256"] = package_sha256
        record["source_sha256"] = source_digest
        if package is not None:
            await self.h.repo.add_package(await self.h.package_row(package, self.h.wall()))
        return await self.begin(row.id, record=record, target=None)

    async def begin(
        self, deployment_id: str, *, record: dict[str, Any] | None, target: int | None
    ) -> Deployment:
        """Record the new current version and start the rolling update to it."""
        h = self.h

        async def attempt() -> tuple[Deployment, Plan, int, int, int]:
            async with h.locks[deployment_id]:
                fresh = await h.row(deployment_id)
                if fresh is None:
                    raise NotFound(
                        f"Deployment {deployment_id!r} was not found", reason="DEPLOYMENT_NOT_FOUND"
                    )
                plan, goal, current, earlier = versions.begin(
                    view_of(fresh), rolling=deployment_id in h.rolling, record=record, target=target
                )
                await h.commit(fresh, plan)
                h.rolling.add(deployment_id)
                return fresh, plan, goal, current, earlier

        fresh, plan, goal, current, earlier = await h.fresh_on_conflict(attempt)
        h.carry_out(fresh, plan)
        log.info("deployment %s: %s", deployment_id, plan.reason)
        h.spawn(self._rolling_update(deployment_id, goal, current, earlier))
        return fresh

    async def _rolling_update(self, deployment_id: str, goal: int, previous: int, earlier: int) -> None:
        """Replace every replica with version ``goal``; on a failure, go back to ``previous``
        (whose own previous version was ``earlier``)."""
        h = self.h
        try:
            async with h.leases.working_on(deployment_id, wait=True) as leased:
                if not leased:
                    log.warning(
                        "deployment %s: another controller works on it; its update waits", deployment_id
                    )
                    return
                await self._update_replicas(deployment_id, goal, previous, earlier)
        finally:
            h.rolling.discard(deployment_id)

    async def _update_replicas(self, deployment_id: str, goal: int, previous: int, earlier: int) -> None:
        h = self.h
        row = await h.row(deployment_id)
        if row is None:
            return
        done: list[int] = []
        for index in sorted(int(a["replica_index"]) for a in row.node_assignments):
            error = await self._replace_replica(deployment_id, index, goal)
            if error is None:
                done.append(index)
                continue
            message = (
                f"version {goal}: replica {index} was not healthy ({error}); reverted to version {previous}"
            )
            await h.mutate(deployment_id, lambda v: versions.switch_version(v, previous, earlier))
            for undo in done:
                await self._replace_replica(deployment_id, undo, previous)
            await self._end(deployment_id, message)
            await h.alerts.add(
                row.user_id,
                UPDATE_REVERTED,
                f"deployment {row.name}: {message}",
                deployment_id=deployment_id,
            )
            return
        await self._end(deployment_id, f"now at version {goal}")

    async def _end(self, deployment_id: str, message: str) -> None:
        row, plan = await self.h.mutate(deployment_id, lambda v: versions.end(v, message))
        if row is not None and plan is not None:
            log.info("deployment %s: %s", deployment_id, message)
            self.h.carry_out(row, plan)

    async def _replace_replica(self, deployment_id: str, index: int, version: int) -> str | None:
        """Start replica ``index`` at ``version`` beside the old one, then switch; None or the error."""
        h = self.h
        async with h.locks[deployment_id]:
            row = await h.row(deployment_id)
            if row is None:
                return None
            view = view_of(row)
            old = versions.to_replace(view, index, version)
            if old is None:
                return None
            record = versions.version_record(view, version)
            others = [r for r in view.replicas if r.replica_index != index and r.status in ACTIVE]
            try:
                node_id = (
                    await h.place(
                        row.user_id,
                        request_of(record),
                        1,
                        seed=f"{deployment_id}|{index}|{view.generation}",
                        hosting=[r.node_id for r in others],
                        exclude={old.node_id},
                    )
                ).node_ids[0]
            except ControllerError:
                node_id = old.node_id  # no room beside it: replace in place
            plan, generation = versions.reserve_generation(view, index, node_id)
            await h.commit(row, plan)  # the surge is recorded: every controller's fence sees it
            made = await h.deploy_command(deployment_id, index, generation, node_id, dict(record))
        if made is None:
            await h.mutate(deployment_id, lambda v: versions.drop_surge(v, index))
            return f"package {record['package_sha256']} is missing"
        h.publish(row, f"replica {index}: starting version {version} on node {node_id}")
        command, deadline = made
        endpoint, error = await h.nodes.deploy(node_id, command, deadline)
        if error:
            await h.mutate(deployment_id, lambda v: versions.drop_surge(v, index))
            h.stop_later(node_id, deployment_id, index, generation)
            if old.node_id == node_id:
                # In place, the agent stopped the old replica before starting the new one:
                # the old one is gone too, so the reconciler must start it again.
                await self.rollouts.mark_failed(
                    deployment_id, index, node_id, old.generation, f"replaced by a failed version: {error}"
                )
            return f"node {node_id}: {error}"
        now = h.wall()

        def switch(view: DeploymentView) -> Plan | None:
            return versions.switch_replica(view, index, node_id, generation, endpoint, version, now)

        updated, switched = await h.mutate(deployment_id, switch)
        if switched is None:
            await h.mutate(deployment_id, lambda v: versions.drop_surge(v, index))
            h.stop_later(node_id, deployment_id, index, generation)
            return None
        if updated is not None:
            h.carry_out(updated, switched)
        return None
