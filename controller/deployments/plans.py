"""What a decision returns: a plan of store changes and node commands, with its reason.

A decision (``decide.py``, ``versions.py``, ``fencing.py``) reads a
:class:`~controller.deployments.records.DeploymentView` and returns a
:class:`Plan`; the harness (``harness.py``) applies a plan's store changes to
the deployment's row in one transaction, publishes its reason to the watchers,
and sends its commands to the nodes. A decision never reads the store, the
fleet or the clock: what it needs of them is passed in (``now`` included).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from controller.deployments.records import DeploymentStatus, Replica


@dataclass(frozen=True)
class Stop:
    """StopReplica ``(deployment, index, generation)`` on ``node_id``."""

    node_id: str
    deployment_id: str
    replica_index: int
    generation: int

    @classmethod
    def of(cls, deployment_id: str, replica: Replica) -> Stop:
        return cls(replica.node_id, deployment_id, replica.replica_index, replica.generation)


@dataclass(frozen=True)
class Plan:
    """One decision's outcome for one deployment.

    The store changes (any field not None replaces the row's), then what is sent:
    ``stops`` at once, ``drains`` once their endpoints had the drain time to empty
    (they left the ingress when the row was stored without them), and ``rollout``
    (replica indexes to deploy, in a rollout that is not the initial one).
    """

    reason: str = ""
    """Published to the deployment's watchers (and logged) when not empty."""
    status: DeploymentStatus | None = None
    replicas: tuple[Replica, ...] | None = None
    meta: Mapping[str, Any] | None = None
    deployed_at: datetime | None = None
    desired_replicas: int | None = None
    last_scaled_at: datetime | None = None
    stops: tuple[Stop, ...] = ()
    drains: tuple[Replica, ...] = ()
    rollout: tuple[int, ...] = ()
    event_replica: Replica | None = None
    """The replica the published event is about (WatchDeployment's ``assignment``)."""
    alert: str = ""
    """An alert kind to store with ``reason`` (``rollout_failed``, …), or none."""

    @property
    def changes_store(self) -> bool:
        return any(
            value is not None
            for value in (
                self.status,
                self.replicas,
                self.meta,
                self.deployed_at,
                self.desired_replicas,
                self.last_scaled_at,
            )
        )
