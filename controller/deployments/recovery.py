"""Recovery, the reconciler and the fence: keeping what runs equal to what is assigned.

* :meth:`Recovery.on_node_failed` (the fleet's recovery hook): a failed node's
  replicas are marked lost and re-placed elsewhere, at a bounded rate per user
  (:func:`~controller.deployments.decide.recovery_wait`).
* :meth:`Recovery.reconcile` (every interval): per deployment, the pure
  :func:`~controller.deployments.decide.reconcile` says which interrupted rollout
  to resume, which replicas to retry (after their backoff) and which failed nodes
  the hook missed.
* :meth:`Recovery.on_replicas_reported` (a node's hello or heartbeat): the pure
  :func:`~controller.deployments.fencing.fence` says which stale replicas to stop,
  which deleted deployments to remove, which health changes and failures to record.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

from automator67.v1 import node_pb2

from controller.deployments import decide, fencing
from controller.deployments.harness import Harness
from controller.deployments.leases import held_elsewhere
from controller.deployments.records import ENDED, SERVING, DeploymentStatus
from controller.deployments.rollout import Rollouts
from controller.nodes.health import NodeState

log = logging.getLogger("a67.deployments")

RECOVERY_PER_SECOND = 5.0
"""Replica recoveries started per second per user (a flapping node causes no storm)."""


class Recovery:
    """The recovery hook, the reconcile pass and the fence of reported replicas."""

    def __init__(
        self, harness: Harness, rollouts: Rollouts, *, recovery_per_second: float = RECOVERY_PER_SECOND
    ) -> None:
        self.h = harness
        self.rollouts = rollouts
        self.rate = recovery_per_second
        self._listed: set[str] = set()
        """The deployments the last :meth:`sync` listed (a row gone since was deleted)."""
        self._remote: dict[str, str] = {}
        """The stored status of replicas' nodes another live controller watches (this pass)."""

    # -- recovery -------------------------------------------------------------------------------

    async def on_node_failed(self, node_id: str, user_id: str) -> None:
        """The fleet's recovery hook: re-place every replica of the failed node elsewhere."""
        h = self.h
        for deployment_id, known in list(h.index.items()):
            if known.user_id != user_id:
                continue
            inflight = {i for d, i in h.inflight if d == deployment_id}
            lost = [
                r.replica_index
                for r in known.assignments.values()
                if r.node_id == node_id and r.status in SERVING and r.replica_index not in inflight
            ]
            if not lost:
                continue
            row, plan = await h.mutate(deployment_id, partial(decide.drop_lost, node_id=node_id, lost=lost))
            if row is None or plan is None or row.status in ENDED:
                continue
            h.carry_out(row, plan)
            for index in lost:
                h.inflight.add((deployment_id, index))
                h.spawn(self._recover(user_id, deployment_id, index, node_id))

    async def recovery_slot(self, user_id: str) -> None:
        """Wait for the user's next recovery slot (token bucket: rate and burst)."""
        wait, self.h.recovery_next[user_id] = decide.recovery_wait(
            self.h.recovery_next.get(user_id), self.h.clock(), self.rate
        )
        if wait > 0:
            await asyncio.sleep(wait)

    async def _recover(self, user_id: str, deployment_id: str, index: int, failed_node: str) -> None:
        try:
            await self.recovery_slot(user_id)
            async with self.h.leases.working_on(deployment_id) as leased:
                if not leased:
                    return  # another controller works on it: its reconciler re-places the replica
                await self.rollouts.deploy_replica(deployment_id, index, exclude={failed_node}, reuse=False)
                await self.rollouts.settle(deployment_id)
        finally:
            self.h.inflight.discard((deployment_id, index))

    # -- reconcile ------------------------------------------------------------------------------

    def _facts(self, node_ids: set[str]) -> dict[str, decide.NodeFact]:
        fleet = self.h.fleet
        facts = {}
        for node_id in node_ids:
            state = fleet.state_of(node_id)
            remote = self._remote.get(node_id) if state is None else None
            if remote is not None:  # watched by another live controller: its stream is there
                facts[node_id] = decide.NodeFact(
                    state=NodeState(remote) if remote in NodeState.__members__.values() else None,
                    connected=True,
                )
                continue
            facts[node_id] = decide.NodeFact(
                state=state,
                connected=fleet.streams.get(node_id) is not None,
                recovery_due=state == NodeState.FAILED and fleet.recovery_due(node_id),
            )
        return facts

    async def sync(self) -> list[Any]:
        """Bring the index up to date with the store — deployments created, changed or
        deleted by another controller sharing it — and return every row's version. Every
        controller does this each pass, whoever runs the reconciler: the index is what
        placement reserves, what the fence recognises on this controller's nodes and what
        its ingress routes. One narrow read of every row's version; whole rows only of
        those that changed since this controller last read or wrote them."""
        h = self.h
        listed = await h.repo.list_versions()
        changed = [
            v.id
            for v in listed
            if v.status not in ENDED
            and ((cached := h.rows.get(v.id)) is None or cached.updated_at != v.updated_at)
        ]
        fresh = {row.id: row for row in await h.repo.get_many(changed)} if changed else {}
        for version in listed:
            if (
                version.status == DeploymentStatus.STOPPED
                and version.id in h.index
                and version.id not in h.rolling
            ):
                h.forget(version.id)  # being deleted (by another controller: this one forgot it already)
            elif version.id in fresh and version.id not in h.rolling:
                async with h.locks[version.id]:  # the cached row is replaced only by a newer one
                    row = await h.row(version.id, fresh[version.id])
                    if row is not None and row.status not in ENDED:
                        h.remember(row)
        present = {v.id for v in listed}
        # deleted by another controller: listed last time, gone now (one created here may be
        # indexed before its row is listed: it was not listed last time either)
        for deployment_id in self._listed - present:
            if deployment_id in h.rolling:
                continue
            if deployment_id in h.index:
                h.forget(deployment_id)
            h.drop_row(deployment_id)
        self._listed = present
        return listed

    async def _load_remote(self) -> None:
        """Before a pass: the status of the replicas' nodes this controller does not watch,
        if another live controller does (one read; none when every node is watched here)."""
        h = self.h
        fleet = h.fleet
        unknown = {
            r.node_id
            for known in h.index.values()
            for r in known.assignments.values()
            if r.node_id and fleet.state_of(r.node_id) is None
        }
        self._remote = {}
        if not unknown or not fleet.live_peers:
            return
        for node_id, (status, holder) in (await fleet.nodes.states_of(sorted(unknown))).items():
            if fleet.watched_elsewhere(holder):
                self._remote[node_id] = status

    async def reconcile(self) -> None:
        """Compare desired and current state; resume rollouts, deploy missing replicas."""
        h = self.h
        if h.closing:
            return
        h.stop_sent = fencing.prune_sent(h.stop_sent, h.clock())
        listed = await self.sync()
        await self._load_remote()
        now = h.wall()
        for version in listed:
            if (
                version.status in ENDED
                or version.id in h.rolling
                or held_elsewhere(version.lease_owner, version.lease_until, h.leases.me, now)
            ):
                continue
            # Decide on a fresh row under the deployment's lock: a rollout ends (status
            # written) under this lock before it leaves ``rolling``, so neither can be stale.
            async with h.locks[version.id]:
                row = await h.row(version.id)
                if row is None or row.status in ENDED or row.id in h.rolling or h.leases.elsewhere(row):
                    continue
                view = h.view(row)
                action = decide.reconcile(
                    view,
                    now=h.wall(),
                    inflight={i for d, i in h.inflight if d == row.id},
                    nodes=self._facts({r.node_id for r in view.replicas}),
                )
                if action.resume is not None:
                    log.info("deployment %s was %s: resuming its rollout", row.id, row.status)
                    self.rollouts.start(row.id, list(action.resume), initial=action.initial, wait=False)
                    continue
                for index in action.retry:
                    h.inflight.add((row.id, index))
                    h.spawn(self.rollouts.retry_replica(row.id, index))
            # Failures the recovery hook missed (e.g. while the controller was down), held
            # and frozen exactly as the hook would be: see Fleet.recovery_due.
            for node_id in sorted(action.failed_nodes):
                await self.on_node_failed(node_id, row.user_id)

    # -- the fence ------------------------------------------------------------------------------

    async def _catch_up_on(self, replicas: Sequence[node_pb2.ReplicaState]) -> None:
        """Before the fence judges a node's replicas by the index: read again from the store
        the deployments it reports that the index does not know, or knows at an older
        generation — made or moved by another controller sharing the store since this one's
        last pass (:meth:`sync`). Without it, a replica another controller just started
        would be taken for a deleted deployment's, or a stale one, and stopped. Alone, a
        controller reads only deployments deleted while their node was away."""
        h = self.h
        behind: set[str] = set()
        for s in replicas:
            known = h.index.get(s.deployment_id)
            assigned = known.assignments.get(s.replica_index) if known is not None else None
            if assigned is None or assigned.generation < s.generation:
                behind.add(s.deployment_id)
        if not behind:
            return
        for row in await h.repo.get_many(sorted(behind)):
            if row.status in ENDED or row.id in h.rolling:
                continue
            async with h.locks[row.id]:
                fresh = await h.row(row.id, row)
                if fresh is not None and fresh.status not in ENDED:
                    h.remember(fresh)

    async def on_replicas_reported(
        self, node_id: str, replicas: Sequence[node_pb2.ReplicaState], complete: bool
    ) -> None:
        """A node's hello (``complete``) or heartbeat listed its replicas: fence and sync health."""
        h = self.h
        if not h.loaded or h.closing:
            return
        await self._catch_up_on(replicas)
        plan = fencing.fence(
            node_id,
            [
                fencing.Reported(
                    s.deployment_id, s.replica_index, s.generation, s.status, s.endpoint, s.error_message
                )
                for s in replicas
            ],
            complete=complete,
            assignments={d: known.assignments for d, known in h.index.items()},
            surging=h.surging,
            draining=h.draining_now(),
            sent=h.stop_sent,
            now=h.clock(),
        )
        h.stop_sent.update(plan.sent)
        for deployment_id in plan.remove:
            # a deleted deployment (the node was away when it was deleted): stop its replicas
            # there and remove their directories
            log.info("node %s holds deleted deployment %s: removing it", node_id, deployment_id)
            h.spawn(h.nodes.remove(node_id, deployment_id))
        for stop in plan.stops:
            log.info(
                "node %s runs stale replica %s/%d (generation %d): stopping it",
                node_id,
                stop.deployment_id,
                stop.replica_index,
                stop.generation,
            )
            h.spawn(h.nodes.stop(stop))
        for change in plan.health:
            await self.rollouts.set_health(
                change.deployment_id,
                change.replica_index,
                node_id,
                change.generation,
                change.status,
                change.endpoint,
            )
        for failure in plan.failures:
            await self.rollouts.mark_failed(
                failure.deployment_id, failure.replica_index, node_id, failure.generation, failure.error
            )
