"""Pure decisions of rolling updates and reverts: versions, surges, switches.

A deployment's versions are kept in ``meta["versions"]`` (one record of
:data:`VERSION_KEYS` per version) so that a revert or a rollback can go back to
any of them. A rolling update replaces one replica at a time (max surge 1): the
new version's replica starts beside the old one (its generation reserved by
:func:`reserve_generation`), and once healthy :func:`switch_replica` makes it the
replica's assignment and hands the old one to the drain. If one fails, the
harness switches back to the previous version (:func:`switch_version`) and
replaces the replicas already updated again.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from controller.deployments.plans import Plan
from controller.deployments.records import (
    ACTIVE,
    DeploymentStatus,
    DeploymentView,
    Replica,
    ReplicaStatus,
    put,
    surging_of,
    with_surge,
    without_surge,
)
from controller.errors import FailedPrecondition

VERSION_KEYS = (
    "spec",
    "env_sealed",
    "package_sha256",
    "resources",
    "startup_seconds",
    "atomic",
    "source_sha256",
)
"""What one version of a deployment is (kept in ``manifest["versions"]`` for rollbacks)."""


def begin(
    view: DeploymentView, *, rolling: bool, record: Mapping[str, Any] | None, target: int | None
) -> tuple[Plan, int, int, int]:
    """Start a rolling update to a new version ``record``, or a rollback to version ``target``
    (0: the previous one). Returns the plan and (goal, current, earlier) versions, where
    ``earlier`` is the current version's own previous one (what a revert restores).

    ``FAILED_PRECONDITION`` unless the deployment is running or failing with no rollout in
    progress, or if the version to roll back to does not exist.
    """
    if view.status not in (DeploymentStatus.RUNNING, DeploymentStatus.FAILING) or rolling:
        raise FailedPrecondition(
            f"The deployment is {view.status}: wait until it is running",
            reason="DEPLOYMENT_BUSY",
            metadata={"status": str(view.status)},
        )
    meta = dict(view.meta)
    versions = {str(k): dict(v) for k, v in meta.get("versions", {}).items()}
    current = int(meta.get("version", 1))
    versions.setdefault(str(current), {key: meta[key] for key in VERSION_KEYS if key in meta})
    if record is not None:
        goal = max(int(v) for v in versions) + 1
        versions[str(goal)] = dict(record)
        verb = "updating"
    else:
        goal = target or int(meta.get("previous_version", 0))
        if str(goal) not in versions or goal == current:
            raise FailedPrecondition(
                f"There is no version {goal} to roll back to (current version {current})",
                reason="VERSION_NOT_FOUND",
                metadata={"versions": ",".join(sorted(versions, key=int))},
            )
        verb = "rolling back"
    meta["versions"] = versions
    meta.update(versions[str(goal)])
    earlier = int(meta.get("previous_version", 0))
    meta["previous_version"] = current
    meta["version"] = goal
    meta["message"] = f"{verb} from version {current} to version {goal}"
    plan = Plan(reason=str(meta["message"]), status=DeploymentStatus.DEPLOYING, meta=meta)
    return plan, goal, current, earlier


def switch_version(view: DeploymentView, version: int, previous: int) -> Plan:
    """Make ``version`` the deployment's current one again (a revert), ``previous`` before it."""
    meta = dict(view.meta)
    meta.update(meta["versions"][str(version)])
    meta["version"] = version
    meta["previous_version"] = previous
    return Plan(meta=meta)


def end(view: DeploymentView, message: str) -> Plan:
    """A rolling update (or its revert) ended: running if any replica runs, else failing."""
    meta = dict(view.meta)
    meta["message"] = message
    status = DeploymentStatus.RUNNING if view.current_replicas > 0 else DeploymentStatus.FAILING
    return Plan(reason=message, status=status, meta=meta)


def to_replace(view: DeploymentView, index: int, version: int) -> Replica | None:
    """Replica ``index`` if it must be replaced to be at ``version`` (it is not running at it)."""
    old = view.replica(index)
    if old is None or (old.at_version == version and old.status == ReplicaStatus.RUNNING):
        return None
    return old


def version_record(view: DeploymentView, version: int) -> Mapping[str, Any]:
    return dict(view.meta["versions"][str(version)])


def reserve_generation(view: DeploymentView, index: int, node_id: str) -> tuple[Plan, int]:
    """The generation of a surge replica of ``index`` on ``node_id`` (the deployment's next
    one), recorded with the surge itself (``meta["surging"]``): every controller's fence
    leaves it running while it starts beside the replica it will replace."""
    generation = int(view.meta["generation"]) + 1
    meta = with_surge(view.meta, index, node_id, generation)
    meta["generation"] = generation
    return Plan(meta=meta), generation


def drop_surge(view: DeploymentView, index: int) -> Plan | None:
    """The surge replica of ``index`` did not become it (failed, or the replica is gone)."""
    if index not in surging_of(view.meta):
        return None
    return Plan(meta=without_surge(view.meta, index))


def switch_replica(
    view: DeploymentView,
    index: int,
    node_id: str,
    generation: int,
    endpoint: str,
    version: int,
    now: datetime,
) -> Plan | None:
    """The surge replica (node, generation) at ``version`` is healthy: it becomes replica
    ``index``, and the replica it replaces is drained then stopped (unless it was on the same
    node: the agent replaced it in place). None if the replica is gone (scaled down meanwhile)."""
    old = view.replica(index)
    if old is None:
        return None
    new = old.with_(
        node_id=node_id,
        generation=generation,
        status=ReplicaStatus.RUNNING,
        endpoint=endpoint,
        error_message="",
        version=version,
        started_at=now.isoformat(),
    )
    drains = (old,) if old.node_id != node_id and old.status in ACTIVE else ()
    return Plan(
        reason=f"replica {index} at version {version} on node {node_id}",
        replicas=put(view.replicas, new),
        meta=without_surge(view.meta, index),
        drains=drains,
    )
