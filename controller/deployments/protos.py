"""Deployments as the API returns them: a replica's assignment and a whole deployment.

A deployment's proto is built from its row once per stored version of the row
(``updated_at``) and kept, :data:`PROTO_CACHE_SIZE` of them: ListDeployments and
GetDeployment of an unchanged deployment parse no JSON.
"""

from __future__ import annotations

from datetime import datetime

from automator67.v1 import deployment_pb2
from google.protobuf import json_format

from controller.deployments.manifest import with_effective_values
from controller.deployments.records import STATUS_ENUM, Replica
from controller.store.models import Deployment
from controller.timestamps import timestamp

PROTO_CACHE_SIZE = 10_000
"""Deployment protos kept, by (id, updated_at) (see :func:`deployment_proto`)."""

_PROTOS: dict[tuple[str, datetime], deployment_pb2.Deployment] = {}


def assignment_proto(r: Replica) -> deployment_pb2.NodeAssignment:
    return deployment_pb2.NodeAssignment(
        node_id=r.node_id,
        replica_index=r.replica_index,
        status=r.status.value,
        started_at=timestamp(datetime.fromisoformat(r.started_at)) if r.started_at else None,
        error_message=r.error_message,
        generation=r.generation,
        endpoint=r.endpoint,
    )


def deployment_proto(row: Deployment) -> deployment_pb2.Deployment:
    """The deployment as the API returns it (a copy: the caller may add to it). Built once
    per stored version of the row (``updated_at``) and kept: ListDeployments and
    GetDeployment of an unchanged deployment parse no JSON."""
    if row.updated_at is None:  # not a stored row: nothing identifies its version
        return _build_proto(row)
    key = (row.id, row.updated_at)
    built = _PROTOS.get(key)
    if built is None:
        built = _build_proto(row)
        if len(_PROTOS) >= PROTO_CACHE_SIZE:
            _PROTOS.pop(next(iter(_PROTOS)))
        _PROTOS[key] = built
    copy = deployment_pb2.Deployment()
    copy.CopyFrom(built)
    return copy


def _build_proto(row: Deployment) -> deployment_pb2.Deployment:
    meta = row.manifest
    manifest = json_format.ParseDict(meta.get("spec", {}), deployment_pb2.DeploymentManifest())
    manifest.replicas = row.desired_replicas  # scaling changes it after the manifest was given
    with_effective_values(manifest)  # what runs: defaults filled in, not zeros
    return deployment_pb2.Deployment(
        id=row.id,
        user_id=row.user_id,
        name=row.name,
        app_type=manifest.app_type,
        status=STATUS_ENUM.get(row.status, deployment_pb2.DEPLOYMENT_STATUS_UNSPECIFIED),
        manifest=manifest,
        node_assignments=[assignment_proto(Replica.from_dict(a)) for a in row.node_assignments],
        current_replicas=row.current_replicas,
        desired_replicas=row.desired_replicas,
        endpoints=list(row.endpoints),
        placement=[
            json_format.ParseDict(e, deployment_pb2.PlacementExplanation()) for e in meta.get("placement", [])
        ],
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
        deployed_at=timestamp(row.deployed_at),
        last_scaled_at=timestamp(row.last_scaled_at),
        package_sha256=str(meta.get("package_sha256", "")),
        version=int(meta.get("version", 1)),
    )
