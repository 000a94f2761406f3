"""Creating a deployment (CreateDeployment): validate, package, place and persist.

The new deployment is stored ``pending`` with its replicas placed and the lease of
its initial rollout, which then runs in the background
(:class:`~controller.deployments.rollout.Rollouts`). A create with a
``request_id`` already used by the caller answers what the first call got.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any

from automator67.v1 import deployment_pb2

from controller.deployments.harness import ENV_PURPOSE, Harness, set_replicas
from controller.deployments.manifest import validate_manifest
from controller.deployments.records import DeploymentStatus, Replica, ReplicaStatus
from controller.deployments.repository import NAME_TAKEN, RequestIdTaken
from controller.deployments.rollout import Rollouts
from controller.deployments.updates import version_record
from controller.errors import AlreadyExists, FieldViolation, InvalidArgument
from controller.store.models import Deployment, new_id

log = logging.getLogger("a67.deployments")

MAX_STORED_REJECTED = 50
"""Rejected nodes kept in a deployment's placement explanations."""


class Creates:
    """CreateDeployment, for :class:`~controller.deployments.service.DeploymentService`."""

    def __init__(self, harness: Harness, rollouts: Rollouts) -> None:
        self.h = harness
        self.rollouts = rollouts

    async def create(self, user_id: str, request: deployment_pb2.CreateDeploymentRequest) -> tuple[str, str]:
        """Validate, package, place and persist; the rollout runs in the background."""
        h = self.h
        if len(request.request_id) > 255:
            raise InvalidArgument(
                "Invalid request",
                field_violations=[FieldViolation("request_id", "must be at most 255 characters")],
            )
        valid = validate_manifest(request.manifest, source_size=self._source_size(request))
        if request.request_id:
            existing = await h.repo.get_by_request_id(user_id, request.request_id)
            if existing is not None:  # a retried create: the answer the first call got (AIP-155)
                return existing.id, DeploymentStatus.PENDING.value
        # a name this controller knows is taken is refused before packaging; any other is
        # settled by the store's unique constraint when the row is inserted
        if (user_id, valid.name) in h.names:
            raise AlreadyExists(
                f"A deployment named {valid.name!r} already exists",
                reason=NAME_TAKEN,
                metadata={"name": valid.name},
            )
        package, source_sha256 = await h.sources.build_with_source(
            user_id, valid, request.source_tar_gz, request.source_sha256
        )
        deployment_id = new_id()
        placement = await h.place(user_id, valid.replica_request(), valid.replicas, seed=deployment_id)
        spec = deployment_pb2.DeploymentManifest()
        spec.CopyFrom(request.manifest)
        spec.ClearField("env")
        now = h.wall()
        meta: dict[str, Any] = {
            **version_record(valid, spec),
            "env_sealed": h.vault.encrypt_str(
                json.dumps(dict(valid.env)), owner=deployment_id, purpose=ENV_PURPOSE
            ),
            "package_sha256": package.sha256,
            "source_sha256": source_sha256,
            "placement": placement.explanation_dicts(max_rejected=MAX_STORED_REJECTED),
            "version": 1,
            "generation": len(placement.selected),
            "message": "placed",
        }
        row = Deployment(
            id=deployment_id,
            user_id=user_id,
            name=valid.name,
            app_type=valid.app_type,
            status=DeploymentStatus.PENDING.value,
            manifest=meta,
            node_assignments=[],
            current_replicas=0,
            desired_replicas=valid.replicas,
            endpoints=[],
            request_id=request.request_id or None,
            created_at=now,
            updated_at=now,
            # the initial rollout's lease, taken with the insert
            lease_owner=h.leases.me,
            lease_until=now + timedelta(seconds=h.leases.seconds),
        )
        set_replicas(
            row,
            [
                Replica(index, choice.node_id, index + 1, ReplicaStatus.PENDING)
                for index, choice in enumerate(placement.selected)
            ],
        )
        try:
            await h.repo.create(row, await h.package_row(package, now))
        except RequestIdTaken:
            existing = await h.repo.get_by_request_id(user_id, request.request_id)
            assert existing is not None
            return existing.id, DeploymentStatus.PENDING.value
        h.rows[row.id] = row
        h.remember(row)
        log.info("deployment %s (%s) placed on %s", deployment_id, valid.name, ", ".join(placement.node_ids))
        self.rollouts.start(deployment_id, list(range(valid.replicas)), initial=True)
        return deployment_id, DeploymentStatus.PENDING.value

    @staticmethod
    def _source_size(
        request: deployment_pb2.CreateDeploymentRequest | deployment_pb2.UpdateDeploymentRequest,
    ) -> int:
        """What the manifest validator checks as the source's size: the inline bytes' length
        (at most 10 MiB), or 1 for an uploaded source (its own limit was checked at upload)."""
        if request.source_sha256 and not request.source_tar_gz:
            return 1
        return len(request.source_tar_gz)
