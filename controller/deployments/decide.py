"""Pure decisions of a deployment's life: rollout, retry elsewhere, settle, scale, recovery, reconcile.

Each function reads a :class:`~controller.deployments.records.DeploymentView`
(and whatever else it needs, ``now`` included, as arguments) and returns a
:class:`~controller.deployments.plans.Plan` — or None when there is nothing to
do. The harness applies plans; see ``plans.py``. Rolling updates and reverts are
in ``versions.py``, fencing of what nodes report in ``fencing.py``.

Decision 3 (DESIGN.md): best-effort by default — a rollout that starts some
replicas ends ``running`` (degraded) and the reconciler keeps trying to reach
``desired_replicas``; ``atomic: true`` rolls everything back if any replica fails.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from controller.deployments.alerts import ROLLOUT_FAILED
from controller.deployments.plans import Plan, Stop
from controller.deployments.records import (
    ACTIVE,
    DRAINING,
    ENDED,
    SERVING,
    DeploymentStatus,
    DeploymentView,
    Replica,
    ReplicaStatus,
    failure_summary,
    ordered,
    put,
    running,
    without_draining,
)
from controller.nodes.health import NodeState

RETRY_BACKOFF_MIN_SECONDS = 1.0
RETRY_BACKOFF_MAX_SECONDS = 60.0
"""The reconciler retries a failed replica after this backoff, doubling per failure."""
RECOVERY_BURST = 10
"""Recoveries a user may start at once before the rate applies."""
ROLLOUT_DEADLINE_MESSAGE = "rollout deadline passed before the replica was healthy"

D = DeploymentStatus
R = ReplicaStatus


# -- rollout ------------------------------------------------------------------------------------


def start_rollout(view: DeploymentView, *, initial: bool) -> Plan | None:
    """A rollout begins: an initial one takes a pending deployment to deploying."""
    if initial and view.status == D.PENDING:
        return Plan(status=D.DEPLOYING)
    return None


def finish_rollout(
    view: DeploymentView,
    indexes: Collection[int],
    timed_out: Collection[int],
    *,
    initial: bool,
    now: datetime,
) -> Plan:
    """A rollout of ``indexes`` ended (``timed_out`` ones did not finish in time).

    An initial rollout with no replica running, or an atomic one with any replica not
    running, fails and is rolled back (every active replica stopped); otherwise the
    deployment is running (degraded if some are missing: the reconciler keeps trying),
    or failing when none runs.
    """
    stops: list[Stop] = []
    replicas = list(view.replicas)
    for i, r in enumerate(replicas):
        if r.replica_index in timed_out and r.status in (R.PENDING, R.STARTING):
            replicas[i] = r.with_(status=R.FAILED, error_message=ROLLOUT_DEADLINE_MESSAGE)
            stops.append(Stop.of(view.id, replicas[i]))
    targeted = [r for r in replicas if r.replica_index in indexes]
    up = running(replicas)
    failed_any = any(r.status != R.RUNNING for r in targeted)
    meta = dict(view.meta)
    deployed_at = None
    alert = ""
    if initial and (not up or (meta.get("atomic") and failed_any)):
        reasons = failure_summary(targeted)
        for i, r in enumerate(replicas):
            if r.status in ACTIVE:
                stops.append(Stop.of(view.id, r))
                replicas[i] = r.with_(status=R.STOPPED, endpoint="")
        status = D.FAILED
        message = "rollout failed, rolled back: " + reasons
        alert = ROLLOUT_FAILED
    else:
        status = D.RUNNING if up else D.FAILING
        if view.deployed_at is None and up:
            deployed_at = now
        missing = view.desired_replicas - len(up)
        message = f"{len(up)} of {view.desired_replicas} replicas running" + (
            f" (the reconciler keeps trying: {failure_summary(targeted)})" if missing > 0 else ""
        )
    meta["message"] = message
    return Plan(
        reason=message,
        status=status,
        replicas=ordered(replicas),
        meta=meta,
        deployed_at=deployed_at,
        stops=tuple(stops),
        alert=alert,
    )


# -- one replica's attempts --------------------------------------------------------------------


def attempt_target(view: DeploymentView) -> bool:
    """Whether the deployment still wants replicas deployed (it is neither failed nor stopped)."""
    return view.status not in ENDED


def to_attempt(view: DeploymentView, index: int) -> Replica | None:
    """Replica ``index`` if an attempt to deploy it should be made (it is not already there)."""
    current = view.replica(index)
    if current is None or not attempt_target(view) or current.status in SERVING:
        return None
    return current


def start_attempt(view: DeploymentView, index: int, node_id: str) -> tuple[Plan, int]:
    """Record the attempt of replica ``index`` on ``node_id`` (status starting) and its generation.

    A pending replica tried on the node it was placed on keeps the generation it was
    given; any other attempt takes the deployment's next generation (the fence).
    """
    current = view.replica(index)
    assert current is not None
    meta = dict(view.meta)
    if current.status == R.PENDING and current.node_id == node_id:
        generation = current.generation
    else:
        generation = view.generation + 1
        meta["generation"] = generation
    started = current.with_(
        node_id=node_id,
        generation=generation,
        status=R.STARTING,
        endpoint="",
        error_message="",
        version=view.version,
    )
    plan = Plan(
        reason=f"replica {index} starting on node {node_id}",
        replicas=put(view.replicas, started),
        meta=meta,
        event_replica=started,
    )
    return plan, generation


def cannot_place(view: DeploymentView, index: int, error: str) -> Plan | None:
    """No node can take replica ``index``: it is failed, with why (after its last error)."""
    current = view.replica(index)
    if current is None:
        return None
    error = f"{current.error_message}; no other node: {error}" if current.error_message else error
    failed = current.with_(status=R.FAILED, endpoint="", error_message=error)
    return Plan(
        reason=f"replica {index} cannot be placed", replicas=put(view.replicas, failed), event_replica=failed
    )


def mark_running(
    view: DeploymentView, index: int, node_id: str, generation: int, endpoint: str, now: datetime
) -> Plan | None:
    """Attempt (node, generation) of replica ``index`` is healthy; None if it is no longer the
    replica's attempt (moved or deleted meanwhile: what was started must be stopped)."""
    current = view.replica(index)
    if current is None or not current.is_(node_id, generation):
        return None
    up = current.with_(
        status=R.RUNNING,
        endpoint=endpoint,
        error_message="",
        started_at=now.isoformat(),
        retry_at=None,
        retry_delay=0.0,
    )
    status = None
    deployed_at = None
    if view.status in (D.RUNNING, D.FAILING):
        status = D.RUNNING
        if view.deployed_at is None:
            deployed_at = now
    return Plan(
        reason=f"replica {index} running on node {node_id} at {endpoint}",
        status=status,
        replicas=put(view.replicas, up),
        deployed_at=deployed_at,
        event_replica=up,
    )


def mark_failed(view: DeploymentView, index: int, node_id: str, generation: int, error: str) -> Plan | None:
    """Attempt (node, generation) of replica ``index`` failed (None if no longer its attempt)."""
    current = view.replica(index)
    if current is None or not current.is_(node_id, generation):
        return None
    failed = current.with_(status=R.FAILED, endpoint="", error_message=error)
    return Plan(
        reason=f"replica {index} failed: {error}", replicas=put(view.replicas, failed), event_replica=failed
    )


def set_health(
    view: DeploymentView, index: int, node_id: str, generation: int, status: ReplicaStatus, endpoint: str
) -> Plan | None:
    """The node reports replica ``index`` healthy again (running) or failing its check (unhealthy)."""
    current = view.replica(index)
    if current is None or not current.is_(node_id, generation):
        return None
    changed = current.with_(status=status, endpoint=endpoint or current.endpoint)
    return Plan(
        reason=f"replica {index} is {status.value}",
        replicas=put(view.replicas, changed),
        event_replica=changed,
    )


def backoff(view: DeploymentView, index: int, now: datetime) -> Plan | None:
    """Replica ``index`` failed every attempt of a rollout: the reconciler tries it again after
    a backoff that doubles per failure, from 1 s up to 60 s. Stored in the replica's record,
    so every controller sharing the store waits it out (None: the replica is gone)."""
    current = view.replica(index)
    if current is None:
        return None
    delay = min(RETRY_BACKOFF_MAX_SECONDS, (current.retry_delay or RETRY_BACKOFF_MIN_SECONDS / 2) * 2)
    later = current.with_(retry_at=(now + timedelta(seconds=delay)).isoformat(), retry_delay=delay)
    return Plan(replicas=put(view.replicas, later))


def settle(view: DeploymentView, *, rolling: bool) -> Plan | None:
    """After a recovery or a retry: running if any replica is, else failing (a deployment in a
    rollout, or failed or stopped, is left alone)."""
    if view.status not in (D.RUNNING, D.FAILING, D.SCALING) or rolling:
        return None
    status = D.RUNNING if view.current_replicas > 0 else D.FAILING
    message = f"{view.current_replicas} of {view.desired_replicas} replicas running"
    return Plan(reason=message, status=status if status != view.status else None)


# -- scale ---------------------------------------------------------------------------------------


def scale(view: DeploymentView, replicas: int, placed: Sequence[str], now: datetime) -> Plan:
    """Scale to ``replicas``: up adds pending replicas on the ``placed`` nodes (then rolled out),
    down removes the highest indexes (drained, then stopped)."""
    meta = dict(view.meta)
    kept = list(view.replicas)
    have = view.desired_replicas
    added: list[int] = []
    removed: list[Replica] = []
    status = None
    if replicas > have:
        for offset, node_id in enumerate(placed):
            meta["generation"] = int(meta["generation"]) + 1
            index = have + offset
            added.append(index)
            kept.append(Replica(index, node_id, int(meta["generation"]), R.PENDING))
        if view.status in (D.RUNNING, D.FAILING, D.FAILED):
            status = D.SCALING
    elif replicas < have:
        removed = [r for r in kept if r.replica_index >= replicas]
        kept = [r for r in kept if r.replica_index < replicas]
    message = f"scaling from {have} to {replicas} replicas"
    meta["message"] = message
    return Plan(
        reason=message,
        status=status,
        replicas=ordered(kept),
        meta=meta,
        desired_replicas=replicas,
        last_scaled_at=now,
        drains=tuple(r for r in removed if r.status in ACTIVE),
        rollout=tuple(added),
    )


def drained(view: DeploymentView, keys: Collection[tuple[str, int, int]], now: datetime) -> Plan | None:
    """Replicas (node, index, generation) were stopped after their drain time: no longer draining."""
    if DRAINING not in view.meta:
        return None
    return Plan(meta=without_draining(view.meta, keys, now))


# -- recovery ------------------------------------------------------------------------------------


def lost_replicas(view: DeploymentView, node_id: str, inflight: Collection[int]) -> list[int]:
    """The replicas a failed node took down (those being deployed are left to their rollout: the
    send to the failed node fails and the rollout moves them by itself)."""
    return [
        r.replica_index
        for r in view.replicas
        if r.node_id == node_id and r.status in SERVING and r.replica_index not in inflight
    ]


def drop_lost(view: DeploymentView, node_id: str, lost: Collection[int]) -> Plan:
    """Mark ``lost`` replicas of failed ``node_id`` lost (no traffic); failing if none runs now."""
    replicas = tuple(
        r.with_(status=R.LOST, endpoint="", error_message=f"node {node_id} failed")
        if r.replica_index in lost and r.node_id == node_id
        else r
        for r in view.replicas
    )
    status = None
    if view.status == D.RUNNING and not running(replicas):
        status = D.FAILING
    reason = "" if view.status in ENDED else f"node {node_id} failed: re-placing {len(lost)} replica(s)"
    return Plan(reason=reason, status=status, replicas=replicas)


def recovery_wait(
    next_at: float | None, now: float, rate: float, burst: int = RECOVERY_BURST
) -> tuple[float, float]:
    """A token bucket per user: how long the next recovery waits, and the following slot.

    ``burst`` recoveries go at once; then one every ``1 / rate`` seconds.
    """
    interval = 1.0 / rate
    earliest = now - (burst - 1) * interval
    at = max(next_at if next_at is not None else earliest, earliest)
    wait = at - now
    return (wait if wait > 1e-9 else 0.0), at + interval


# -- reconcile -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeFact:
    """What the reconciler needs to know of a node: its health state, whether its stream is
    open, whether its replicas may be re-placed now (Fleet.recovery_due)."""

    state: NodeState | None = None
    connected: bool = False
    recovery_due: bool = False

    @property
    def waiting(self) -> bool:
        """A replica on this node should wait: the node is known, not failed, not connected."""
        if self.state is None or self.state in (NodeState.FAILED, NodeState.REMOVED, NodeState.DRAINING):
            return False
        return not self.connected


@dataclass(frozen=True)
class Reconcile:
    """What one reconcile pass does for one deployment."""

    resume: tuple[int, ...] | None = None
    """Replicas of an interrupted rollout to deploy again (None: no rollout to resume)."""
    initial: bool = False
    """Whether the resumed rollout is the initial one (its failure rolls back)."""
    retry: tuple[int, ...] = ()
    """Replicas to deploy again (failed, lost, or never sent)."""
    failed_nodes: frozenset[str] = frozenset()
    """Failed or removed nodes whose replicas the recovery hook has not re-placed yet."""


def reconcile(
    view: DeploymentView,
    *,
    now: datetime,
    inflight: Collection[int],
    nodes: Mapping[str, NodeFact],
) -> Reconcile:
    """Compare desired and current state: resume an interrupted rollout, retry what is missing
    (after its stored backoff, ``Replica.retry_at``), and find failed nodes whose replicas
    still count as serving."""
    if view.status in ENDED:
        return Reconcile()
    unknown = NodeFact()
    if view.status in (D.PENDING, D.DEPLOYING, D.SCALING):
        todo = [r for r in view.replicas if r.status != R.RUNNING]
        if any(nodes.get(r.node_id, unknown).waiting for r in todo):
            return Reconcile()
        return Reconcile(resume=tuple(r.replica_index for r in todo), initial=view.status != D.SCALING)
    retry: list[int] = []
    failed: set[str] = set()
    for r in view.replicas:
        if r.replica_index in inflight:
            continue
        fact = nodes.get(r.node_id, unknown)
        if r.status in SERVING:
            if fact.state == NodeState.REMOVED or (fact.state == NodeState.FAILED and fact.recovery_due):
                failed.add(r.node_id)
            continue
        if r.status in (R.PENDING, R.STARTING) and fact.waiting:
            continue
        if r.retry_at is not None and datetime.fromisoformat(r.retry_at) > now:
            continue
        retry.append(r.replica_index)
    return Reconcile(retry=tuple(retry), failed_nodes=frozenset(failed))
