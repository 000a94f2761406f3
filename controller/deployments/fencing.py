"""Pure fencing of the replicas a node reports (in its hello or a heartbeat).

Generations fence replicas: every DeployReplica attempt carries a new,
deployment-wide increasing generation. A node that reports a replica whose
(deployment, index) is now assigned to another node, or with a lower
generation, or that is no longer active, is told to stop it (StopReplica with the
reported generation), so no replica runs twice. A replica of a deployment that
no longer exists is removed from the node with its directory (RemoveDeployment).
Two kinds of replicas are left running although they are not the assignment: a
rolling update's new replica not switched to yet (*surging*) and a replica taken
out of the ingress waiting out the drain time before its StopReplica (*draining*).

A stale replica reported again within :data:`STOP_RESEND_SECONDS` is not sent
another StopReplica. The same pass syncs health (running ↔ unhealthy), fails
replicas the node reports failed, and — when the report is ``complete`` (a
hello) — fails serving replicas the node no longer has.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from controller.deployments.plans import Stop
from controller.deployments.records import ACTIVE, SERVING, Replica, ReplicaStatus

STOP_RESEND_SECONDS = 10.0
"""A stale replica reported again within this time is not sent another StopReplica."""

SentKey = tuple[str, str, int, int]
"""(node, deployment, index, generation) of a StopReplica sent; index and generation are -1
for a RemoveDeployment."""


@dataclass(frozen=True)
class Reported:
    """One replica as a node reports it."""

    deployment_id: str
    replica_index: int
    generation: int
    status: str
    """``running``, ``unhealthy``, ``starting``, ``failed``, ``stopped`` (the agent's words)."""
    endpoint: str = ""
    error_message: str = ""


@dataclass(frozen=True)
class HealthChange:
    deployment_id: str
    replica_index: int
    generation: int
    status: ReplicaStatus
    endpoint: str


@dataclass(frozen=True)
class Failure:
    deployment_id: str
    replica_index: int
    generation: int
    error: str


@dataclass(frozen=True)
class FencePlan:
    """What to do about one node's report, in this order: remove, stop, health, failures."""

    remove: tuple[str, ...] = ()
    """Deleted deployments whose replicas and directories the node must remove."""
    stops: tuple[Stop, ...] = ()
    health: tuple[HealthChange, ...] = ()
    failures: tuple[Failure, ...] = ()
    sent: Mapping[SentKey, float] = field(default_factory=dict)
    """Stop and remove commands sent now (for the resend rule)."""


def may_send(sent: Mapping[SentKey, float], key: SentKey, now: float) -> bool:
    return now - sent.get(key, -STOP_RESEND_SECONDS) >= STOP_RESEND_SECONDS


def prune_sent(sent: Mapping[SentKey, float], now: float) -> dict[SentKey, float]:
    """The entries still within the resend time."""
    return {key: at for key, at in sent.items() if now - at < STOP_RESEND_SECONDS}


def fence(
    node_id: str,
    reported: Sequence[Reported],
    *,
    complete: bool,
    assignments: Mapping[str, Mapping[int, Replica]],
    surging: Mapping[tuple[str, int], tuple[str, int]],
    draining: Collection[SentKey],
    sent: Mapping[SentKey, float],
    now: float,
) -> FencePlan:
    """Decide what ``node_id``'s report calls for.

    ``assignments`` maps every known deployment to its replicas by index;
    ``surging`` maps (deployment, index) to the (node, generation) of a rolling update's
    replica not switched to yet; ``draining`` holds the (node, deployment, index,
    generation) of replicas out of the ingress waiting for their stop; ``sent`` the
    StopReplica / RemoveDeployment commands sent recently.
    """
    sent_now: dict[SentKey, float] = {}

    def first_send(key: SentKey) -> bool:
        if key in sent_now or not may_send(sent, key, now):
            return False
        sent_now[key] = now
        return True

    remove: list[str] = []
    stops: list[Stop] = []
    health: list[HealthChange] = []
    seen: set[tuple[str, int, int]] = set()
    for state in reported:
        seen.add((state.deployment_id, state.replica_index, state.generation))
        known = assignments.get(state.deployment_id)
        if known is None:
            # a deleted deployment (the node was away when it was deleted)
            if first_send((node_id, state.deployment_id, -1, -1)):
                remove.append(state.deployment_id)
            continue
        if state.status in ("stopped", "failed"):
            continue
        key = (node_id, state.deployment_id, state.replica_index, state.generation)
        if surging.get((state.deployment_id, state.replica_index)) == (node_id, state.generation):
            continue  # the new version's replica of a rolling update, not yet switched to
        if key in draining:
            continue  # out of the ingress, stopped once the drain time is over
        current = known.get(state.replica_index)
        if (
            current is None
            or current.node_id != node_id
            or state.generation < current.generation
            or current.status not in ACTIVE
        ):
            if first_send(key):
                stops.append(Stop(node_id, state.deployment_id, state.replica_index, state.generation))
            continue
        if state.generation != current.generation:
            continue
        if state.status == "running" and current.status == ReplicaStatus.UNHEALTHY:
            health.append(
                HealthChange(
                    state.deployment_id,
                    state.replica_index,
                    state.generation,
                    ReplicaStatus.RUNNING,
                    state.endpoint,
                )
            )
        elif state.status == "unhealthy" and current.status == ReplicaStatus.RUNNING:
            health.append(
                HealthChange(
                    state.deployment_id,
                    state.replica_index,
                    state.generation,
                    ReplicaStatus.UNHEALTHY,
                    state.endpoint,
                )
            )
    failures: list[Failure] = []
    if complete:
        for deployment_id, known in assignments.items():
            for index, a in known.items():
                if (
                    a.node_id == node_id
                    and a.status in SERVING
                    and (deployment_id, index, a.generation) not in seen
                ):
                    failures.append(
                        Failure(
                            deployment_id,
                            index,
                            a.generation,
                            f"node {node_id} reconnected without the replica",
                        )
                    )
    for state in reported:
        if state.status != "failed":
            continue
        current = assignments.get(state.deployment_id, {}).get(state.replica_index)
        if current is not None and current.is_(node_id, state.generation) and current.status in SERVING:
            failures.append(
                Failure(
                    state.deployment_id,
                    state.replica_index,
                    state.generation,
                    state.error_message or "the replica failed on its node",
                )
            )
    return FencePlan(
        remove=tuple(remove),
        stops=tuple(stops),
        health=tuple(health),
        failures=tuple(failures),
        sent=sent_now,
    )
