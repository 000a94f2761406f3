"""The harness's in-memory index of every deployment's replicas, kept from the rows.

:class:`HarnessIndex` is mixed into :class:`~controller.deployments.harness.Harness`,
which sets its attributes. :meth:`~HarnessIndex.remember` and
:meth:`~HarnessIndex.forget` keep, for each row this controller read or wrote, its
replica assignments (:class:`Known`), its name, the live view's reservations and
the work in progress its metadata records (surge and draining replicas), and tell
the ingress when what it routes by changed. :func:`view_of` reads a row as the
core's :class:`~controller.deployments.records.DeploymentView`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from controller.deployments.fencing import SentKey
from controller.deployments.records import (
    ACTIVE,
    DRAINING,
    SURGING,
    DeploymentStatus,
    DeploymentView,
    Replica,
    draining_of,
    ordered,
    resources_of,
    surging_of,
)
from controller.deployments.snapshot import LiveFleetView
from controller.scheduling import Resources
from controller.store.models import Deployment


@dataclass
class Known:
    """A deployment as the in-memory index holds it."""

    user_id: str
    request: Resources
    assignments: dict[int, Replica] = field(default_factory=dict)
    name: str = ""
    packages: frozenset[str] = frozenset()
    """The package digests of every version (what its nodes may fetch)."""
    surging: frozenset[int] = frozenset()
    """Indexes with a surge replica recorded (``meta["surging"]``)."""
    draining: frozenset[tuple[str, int, int]] = frozenset()
    """(node, index, generation) of replicas recorded draining (``meta["draining"]``)."""


def view_of(row: Deployment) -> DeploymentView:
    return DeploymentView(
        id=row.id,
        user_id=row.user_id,
        name=row.name,
        status=DeploymentStatus(row.status),
        desired_replicas=int(row.desired_replicas),
        replicas=ordered(Replica.from_dict(a) for a in row.node_assignments),
        meta=dict(row.manifest),
        deployed_at=row.deployed_at,
    )


def _routed(row: Deployment) -> tuple[Any, ...]:
    """What the ingress reads of a row (IngressService.deployment_changed)."""
    return (
        row.name,
        row.user_id,
        row.status,
        tuple(
            (a["replica_index"], a["node_id"], a["status"], a.get("endpoint") or "")
            for a in row.node_assignments
        ),
    )


class HarnessIndex:
    """The deployments' in-memory index: a mixin of :class:`~controller.deployments.harness.Harness`,
    which sets these attributes."""

    live: LiveFleetView
    wall: Callable[[], datetime]
    index: dict[str, Known]
    names: dict[tuple[str, str], str]
    surging: dict[tuple[str, int], tuple[str, int]]
    draining: dict[SentKey, datetime]
    on_change: Callable[[str, Deployment | None], None] | None
    _routed: dict[str, tuple[Any, ...]]

    def remember(self, row: Deployment) -> None:
        view = view_of(row)
        known = Known(
            user_id=row.user_id,
            request=resources_of(row.manifest),
            assignments={r.replica_index: r for r in view.replicas},
            packages=view.packages(),
            name=row.name,
        )
        old = self.index.get(row.id)
        self._reservations(row.id, old, known)
        self._work_in_progress(row.id, old, known, view.meta)
        self.index[row.id] = known
        self.names[(row.user_id, row.name)] = row.id
        routed = _routed(row)
        if self.on_change is not None and self._routed.get(row.id) != routed:
            # only when what the ingress routes by changed: it rebuilds its routes each time
            self._routed[row.id] = routed
            self.on_change(row.id, row)

    def forget(self, deployment_id: str) -> None:
        old = self.index.pop(deployment_id, None)
        self._reservations(deployment_id, old, None)
        self._work_in_progress(deployment_id, old, None, None)
        if old is not None and self.names.get((old.user_id, old.name)) == deployment_id:
            del self.names[(old.user_id, old.name)]
        self._routed.pop(deployment_id, None)
        if self.on_change is not None:
            self.on_change(deployment_id, None)

    def _work_in_progress(
        self, deployment_id: str, old: Known | None, known: Known | None, meta: Mapping[str, Any] | None
    ) -> None:
        """Keep :attr:`surging` and :attr:`draining` equal to what the row's metadata records."""
        if old is not None and (old.surging or old.draining):
            for index in old.surging:
                self.surging.pop((deployment_id, index), None)
            for node_id, index, generation in old.draining:
                self.draining.pop((node_id, deployment_id, index, generation), None)
        if known is not None and meta is not None and (SURGING in meta or DRAINING in meta):
            surging, draining = surging_of(meta), draining_of(meta)
            for index, target in surging.items():
                self.surging[(deployment_id, index)] = target
            for (node_id, index, generation), until in draining.items():
                self.draining[(node_id, deployment_id, index, generation)] = until
            known.surging, known.draining = frozenset(surging), frozenset(draining)

    def draining_now(self) -> set[SentKey]:
        """The replicas still within their drain time (the fence leaves them running)."""
        now = self.wall()
        return {key for key, until in self.draining.items() if until > now}

    def _reservations(self, deployment_id: str, old: Known | None, new: Known | None) -> None:
        """Tell the live view which nodes the deployment's active replicas hold resources on."""
        before = {i: r.node_id for i, r in old.assignments.items() if r.status in ACTIVE} if old else {}
        after = {i: r.node_id for i, r in new.assignments.items() if r.status in ACTIVE} if new else {}
        for index, node_id in before.items():
            if after.get(index) != node_id:
                self.live.release(node_id, (deployment_id, index))
        if new is not None:
            for index, node_id in after.items():
                self.live.reserve(node_id, (deployment_id, index), new.request)

    def reserved(self, user_id: str, skip: tuple[str, int] | None = None) -> dict[str, Resources]:
        """What the active replicas of ``user_id``'s deployments reserve, per node (without
        replica ``skip``): the sums the live view keeps, recomputed from the index."""
        reserved: dict[str, Resources] = {}
        for dep_id, known in self.index.items():
            if known.user_id != user_id:
                continue
            for index, r in known.assignments.items():
                if r.status in ACTIVE and (dep_id, index) != skip:
                    reserved[r.node_id] = reserved.get(r.node_id, Resources()) + known.request
        return reserved
