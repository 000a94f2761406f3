"""Typed deployment records: statuses, one replica's assignment, a deployment's snapshot.

What the store keeps is unchanged: a deployment row's ``status`` is one of
:class:`DeploymentStatus`'s strings and its ``node_assignments`` JSON holds one
dict per replica, exactly as :meth:`Replica.to_dict` writes it::

    {"replica_index": 0, "node_id": "…", "generation": 7, "status": "running",
     "endpoint": "http://10.0.0.5:8001", "error_message": "", "started_at": "…",
     "version": 2}

(``version`` is written once the replica was deployed at a known version.) The
statuses are :class:`~enum.StrEnum` members, so they compare equal to, and are
stored as, the same strings as before.

Replica status: ``pending`` (placed, not sent yet), ``starting`` (DeployReplica
sent), ``running`` (healthy, gets traffic), ``unhealthy`` (the agent reports its
health check failing: no traffic), ``failed`` (the attempt failed; the reconciler
retries it), ``lost`` (its node failed; being re-placed), ``stopped`` (rolled back).

Pure: nothing here reads the store, the fleet or the clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from automator67.v1 import deployment_pb2

from controller.scheduling import ReplicaRequest, Resources


class DeploymentStatus(StrEnum):
    """A deployment's status (the ``deployments.status`` column)."""

    PENDING = "pending"
    DEPLOYING = "deploying"
    RUNNING = "running"
    FAILING = "failing"
    FAILED = "failed"
    SCALING = "scaling"
    STOPPED = "stopped"


class ReplicaStatus(StrEnum):
    """One replica assignment's status (``node_assignments[*].status``)."""

    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    UNHEALTHY = "unhealthy"
    FAILED = "failed"
    LOST = "lost"
    STOPPED = "stopped"


ACTIVE = frozenset(
    {ReplicaStatus.PENDING, ReplicaStatus.STARTING, ReplicaStatus.RUNNING, ReplicaStatus.UNHEALTHY}
)
"""Assignments that hold resources on their node."""
SERVING = frozenset({ReplicaStatus.RUNNING, ReplicaStatus.UNHEALTHY})
"""Assignments whose replica was started and is (as far as we know) still there."""
ENDED = frozenset({DeploymentStatus.FAILED, DeploymentStatus.STOPPED})
"""Deployment statuses nothing is deployed for any more."""

STATUS_ENUM: Mapping[str, deployment_pb2.DeploymentStatus.ValueType] = {
    DeploymentStatus.PENDING: deployment_pb2.DEPLOYMENT_STATUS_PENDING,
    DeploymentStatus.DEPLOYING: deployment_pb2.DEPLOYMENT_STATUS_DEPLOYING,
    DeploymentStatus.RUNNING: deployment_pb2.DEPLOYMENT_STATUS_RUNNING,
    DeploymentStatus.FAILING: deployment_pb2.DEPLOYMENT_STATUS_FAILING,
    DeploymentStatus.FAILED: deployment_pb2.DEPLOYMENT_STATUS_FAILED,
    DeploymentStatus.SCALING: deployment_pb2.DEPLOYMENT_STATUS_SCALING,
    DeploymentStatus.STOPPED: deployment_pb2.DEPLOYMENT_STATUS_STOPPED,
}


@dataclass(frozen=True)
class Replica:
    """One replica's assignment: where it runs, under which generation, in which state."""

    replica_index: int
    node_id: str
    generation: int
    status: ReplicaStatus
    endpoint: str = ""
    error_message: str = ""
    started_at: str | None = None
    """ISO 8601 time the replica last became running (as stored)."""
    version: int | None = None
    """The deployment version it was deployed at (None: not recorded, i.e. version 1)."""
    retry_at: str | None = None
    """ISO 8601 time before which the reconciler does not try it again (after a rollout's
    every attempt failed), as stored, so that every controller sharing the store waits."""
    retry_delay: float = 0.0
    """The backoff that set ``retry_at`` (it doubles per failure: see ``decide.backoff``)."""

    @classmethod
    def from_dict(cls, a: Mapping[str, Any]) -> Replica:
        version = a.get("version")
        return cls(
            replica_index=int(a["replica_index"]),
            node_id=str(a.get("node_id") or ""),
            generation=int(a["generation"]),
            status=ReplicaStatus(str(a["status"])),
            endpoint=str(a.get("endpoint") or ""),
            error_message=str(a.get("error_message") or ""),
            started_at=str(a["started_at"]) if a.get("started_at") else None,
            version=int(version) if version is not None else None,
            retry_at=str(a["retry_at"]) if a.get("retry_at") else None,
            retry_delay=float(a.get("retry_delay") or 0.0),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "replica_index": self.replica_index,
            "node_id": self.node_id,
            "generation": self.generation,
            "status": self.status.value,
            "endpoint": self.endpoint,
            "error_message": self.error_message,
            "started_at": self.started_at,
        }
        if self.version is not None:
            out["version"] = self.version
        if self.retry_at is not None:
            out["retry_at"] = self.retry_at
            out["retry_delay"] = self.retry_delay
        return out

    @property
    def at_version(self) -> int:
        return self.version if self.version is not None else 1

    @property
    def fence_key(self) -> tuple[str, int, int]:
        """(node, index, generation): what a node reports of this replica."""
        return (self.node_id, self.replica_index, self.generation)

    def is_(self, node_id: str, generation: int) -> bool:
        """Whether this assignment is still the attempt (node, generation): the fence of every write."""
        return self.node_id == node_id and self.generation == generation

    def with_(self, **changes: Any) -> Replica:
        return replace(self, **changes)


def ordered(replicas: Iterable[Replica]) -> tuple[Replica, ...]:
    return tuple(sorted(replicas, key=lambda r: r.replica_index))


def running(replicas: Iterable[Replica]) -> list[Replica]:
    return [r for r in replicas if r.status == ReplicaStatus.RUNNING]


def endpoints(replicas: Iterable[Replica]) -> list[str]:
    """The endpoints that get traffic: running replicas', in index order."""
    return [r.endpoint for r in ordered(replicas) if r.status == ReplicaStatus.RUNNING and r.endpoint]


def find(replicas: Iterable[Replica], index: int) -> Replica | None:
    return next((r for r in replicas if r.replica_index == index), None)


def put(replicas: Iterable[Replica], replica: Replica) -> tuple[Replica, ...]:
    """``replicas`` with ``replica`` in place of the one with its index."""
    return ordered([r for r in replicas if r.replica_index != replica.replica_index] + [replica])


def failure_summary(replicas: Iterable[Replica]) -> str:
    """Why each replica that is not running is not: ``replica 1: <error>; replica 2: lost``."""
    return "; ".join(
        f"replica {r.replica_index}: {r.error_message or r.status.value}"
        for r in replicas
        if r.status != ReplicaStatus.RUNNING
    )


def request_of(meta: Mapping[str, Any]) -> ReplicaRequest:
    """One replica's resource request, from a deployment's (or a version's) metadata."""
    r = meta["resources"]
    return ReplicaRequest(
        cpu_cores=float(r["cpu_cores"]), memory_mb=int(r["memory_mb"]), disk_mb=int(r["disk_mb"])
    )


def resources_of(meta: Mapping[str, Any]) -> Resources:
    r = meta["resources"]
    return Resources(
        cpu_cores=float(r["cpu_cores"]), memory_mb=int(r["memory_mb"]), disk_mb=int(r["disk_mb"])
    )


@dataclass(frozen=True)
class DeploymentView:
    """A deployment as a decision sees it: a copy of its row (decisions never touch rows)."""

    id: str
    user_id: str
    name: str
    status: DeploymentStatus
    desired_replicas: int
    replicas: tuple[Replica, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)
    """The row's ``manifest`` JSON: spec, sealed env, package, resources, versions, generation…"""
    deployed_at: datetime | None = None

    @property
    def current_replicas(self) -> int:
        return len(running(self.replicas))

    @property
    def generation(self) -> int:
        """The highest generation handed out (every new attempt takes the next one)."""
        return int(self.meta.get("generation", 0))

    @property
    def version(self) -> int:
        return int(self.meta.get("version", 1))

    def replica(self, index: int) -> Replica | None:
        return find(self.replicas, index)

    def packages(self) -> frozenset[str]:
        """The package digests of every version (what its nodes may fetch)."""
        return frozenset(
            {str(self.meta.get("package_sha256", ""))}
            | {str(v.get("package_sha256", "")) for v in dict(self.meta.get("versions") or {}).values()}
        )


# -- work in progress kept in the row's metadata (every controller sharing the store sees it) --

SURGING = "surging"
"""``meta["surging"]``: ``{"<index>": [node, generation]}``, the surge replicas of a rolling
update started beside the replica they will replace (the fence leaves them running)."""
DRAINING = "draining"
"""``meta["draining"]``: ``[[node, index, generation, until], ...]``, replicas taken out of the
ingress and waiting out the drain time (ISO 8601 ``until``) before their StopReplica."""


def surging_of(meta: Mapping[str, Any]) -> dict[int, tuple[str, int]]:
    """The surge replicas recorded in ``meta``: index -> (node, generation)."""
    return {int(i): (str(v[0]), int(v[1])) for i, v in dict(meta.get(SURGING) or {}).items()}


def with_surge(meta: Mapping[str, Any], index: int, node_id: str, generation: int) -> dict[str, Any]:
    out = dict(meta)
    out[SURGING] = dict(meta.get(SURGING) or {}) | {str(index): [node_id, generation]}
    return out


def without_surge(meta: Mapping[str, Any], index: int) -> dict[str, Any]:
    out = dict(meta)
    left = {i: v for i, v in dict(meta.get(SURGING) or {}).items() if i != str(index)}
    if left:
        out[SURGING] = left
    else:
        out.pop(SURGING, None)
    return out


def draining_of(meta: Mapping[str, Any]) -> dict[tuple[str, int, int], datetime]:
    """The draining replicas recorded in ``meta``: (node, index, generation) -> until."""
    return {
        (str(n), int(i), int(g)): datetime.fromisoformat(str(until))
        for n, i, g, until in list(meta.get(DRAINING) or [])
    }


def with_draining(
    meta: Mapping[str, Any], replicas: Iterable[Replica], until: datetime, now: datetime
) -> dict[str, Any]:
    """``meta`` with ``replicas`` draining until ``until`` (entries past ``now`` dropped)."""
    kept = {k: u for k, u in draining_of(meta).items() if u > now}
    for r in replicas:
        kept[(r.node_id, r.replica_index, r.generation)] = until
    return _put_draining(meta, kept)


def without_draining(
    meta: Mapping[str, Any], keys: Iterable[tuple[str, int, int]], now: datetime
) -> dict[str, Any]:
    """``meta`` without the draining entries ``keys`` (nor any past ``now``)."""
    gone = set(keys)
    kept = {k: u for k, u in draining_of(meta).items() if u > now and k not in gone}
    return _put_draining(meta, kept)


def _put_draining(
    meta: Mapping[str, Any], entries: Mapping[tuple[str, int, int], datetime]
) -> dict[str, Any]:
    out = dict(meta)
    if entries:
        out[DRAINING] = [[n, i, g, until.isoformat()] for (n, i, g), until in sorted(entries.items())]
    else:
        out.pop(DRAINING, None)
    return out
