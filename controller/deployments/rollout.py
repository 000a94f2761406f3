"""Rollouts: deploying replicas, each tried on up to three nodes, then settling the deployment.

The decisions are ``decide.py``'s (start and finish a rollout, the attempt's node
and generation, running / failed, the retry backoff, settle); this module
sequences them: it awaits the nodes (DeployReplica waits for the replica to be
healthy), applies each decision's plan through the :class:`Harness`, and keeps
the live bookkeeping (rollouts and attempts in flight, retry backoffs).
"""

from __future__ import annotations

import asyncio
import logging

from automator67.v1 import node_pb2

from controller.deployments import decide
from controller.deployments.harness import Harness
from controller.deployments.harness_index import view_of
from controller.deployments.plans import Plan
from controller.deployments.records import ACTIVE, ENDED, DeploymentView, ReplicaStatus, request_of
from controller.errors import ControllerError
from controller.nodes.health import NodeState
from controller.redact import redact

log = logging.getLogger("a67.deployments")

ROLLOUT_DEADLINE_SECONDS = 300.0
"""A rollout's overall deadline; replicas not healthy by then are reported as failed."""
MAX_ATTEMPTS_PER_REPLICA = 3
"""Nodes one replica is tried on within one rollout before it counts as failed."""


class Rollouts:
    """Rollouts and the attempts of single replicas (retries, recoveries)."""

    def __init__(
        self, harness: Harness, *, rollout_deadline_seconds: float = ROLLOUT_DEADLINE_SECONDS
    ) -> None:
        self.h = harness
        self._deadline = rollout_deadline_seconds

    def start(self, deployment_id: str, indexes: list[int], *, initial: bool, wait: bool = True) -> None:
        """Roll out ``indexes`` under the deployment's lease (waiting for it if ``wait``: a
        user's call; the reconciler leaves a deployment another controller works on)."""
        self.h.rolling.add(deployment_id)
        self.h.spawn(self._leased_rollout(deployment_id, indexes, initial=initial, wait=wait))

    async def _leased_rollout(
        self, deployment_id: str, indexes: list[int], *, initial: bool, wait: bool
    ) -> None:
        try:
            async with self.h.leases.working_on(deployment_id, wait=wait) as leased:
                if leased:
                    await self._rollout(deployment_id, indexes, initial=initial)
                else:
                    log.info("deployment %s: another controller works on it", deployment_id)
        finally:
            self.h.rolling.discard(deployment_id)

    async def _rollout(self, deployment_id: str, indexes: list[int], *, initial: bool) -> None:
        """Deploy ``indexes`` in parallel; then running, or failed and rolled back."""
        row, _ = await self.h.mutate(deployment_id, lambda v: decide.start_rollout(v, initial=initial))
        if row is None or row.status in ENDED:
            return
        self.h.publish(row, f"deploying {len(indexes)} replica(s)")
        tasks = [asyncio.create_task(self.deploy_replica(deployment_id, i, exclude=set())) for i in indexes]
        timed_out: list[int] = []
        try:
            _, pending = await asyncio.wait(tasks, timeout=self._deadline) if tasks else (set(), set())
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        if tasks:
            for index, task in zip(indexes, tasks, strict=True):
                if task in pending:
                    task.cancel()
                    timed_out.append(index)
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._finish(deployment_id, indexes, timed_out, initial=initial)

    async def _finish(
        self, deployment_id: str, indexes: list[int], timed_out: list[int], *, initial: bool
    ) -> None:
        now = self.h.wall()
        row, plan = await self.h.mutate(
            deployment_id, lambda v: decide.finish_rollout(v, indexes, timed_out, initial=initial, now=now)
        )
        if row is None or plan is None:
            return
        log.info("deployment %s: %s", deployment_id, plan.reason)
        self.h.publish(row, plan.reason)
        if plan.alert:
            await self.h.alerts.add(
                row.user_id, plan.alert, f"deployment {row.name}: {plan.reason}", deployment_id=row.id
            )
        await self.h.stop_all(plan.stops)

    async def deploy_replica(
        self, deployment_id: str, index: int, *, exclude: set[str], reuse: bool = True
    ) -> bool:
        """Try replica ``index`` on up to :data:`MAX_ATTEMPTS_PER_REPLICA` nodes; True once healthy."""
        key = (deployment_id, index)
        self.h.inflight.add(key)
        try:
            for attempt in range(MAX_ATTEMPTS_PER_REPLICA):
                if self.h.closing:
                    return False
                prepared = await self._prepare_attempt(
                    deployment_id, index, exclude, reuse=reuse and attempt == 0
                )
                if prepared is None:
                    return False
                node_id, generation, command, deadline = prepared
                endpoint, error = await self.h.nodes.deploy(node_id, command, deadline)
                if not error:
                    if await self.mark_running(deployment_id, index, node_id, generation, endpoint):
                        return True
                    # Moved or deleted meanwhile: the replica just started must not run.
                    self.h.stop_later(node_id, deployment_id, index, generation)
                    return False
                await self.mark_failed(deployment_id, index, node_id, generation, f"node {node_id}: {error}")
                self.h.stop_later(node_id, deployment_id, index, generation)
                exclude.add(node_id)
            now = self.h.wall()
            await self.h.mutate(deployment_id, lambda v: decide.backoff(v, index, now))
            return False
        finally:
            self.h.inflight.discard(key)

    def _usable(self, node_id: str) -> bool:
        return self.h.fleet.streams.get(node_id) is not None and self.h.fleet.state_of(node_id) in (
            NodeState.READY,
            NodeState.BUSY,
        )

    async def _prepare_attempt(
        self, deployment_id: str, index: int, exclude: set[str], *, reuse: bool
    ) -> tuple[str, int, node_pb2.NodeCommand, float] | None:
        """Choose the node and generation of the next attempt and record them (status starting)."""
        h = self.h
        async with h.locks[deployment_id]:
            row = await h.row(deployment_id)
            if row is None:
                return None
            view = view_of(row)
            current = decide.to_attempt(view, index)
            if current is None:
                return None
            node_id = current.node_id
            if not (reuse and node_id not in exclude and self._usable(node_id)):
                others = [r for r in view.replicas if r.replica_index != index and r.status in ACTIVE]
                try:
                    placement = await h.place(
                        row.user_id,
                        request_of(view.meta),
                        1,
                        seed=f"{deployment_id}|{index}|{view.generation}",
                        hosting=[r.node_id for r in others],
                        exclude=exclude,
                        skip=(deployment_id, index),
                    )
                except ControllerError as exc:
                    failed = decide.cannot_place(view, index, exc.message)
                    if failed is not None:
                        await h.commit(row, failed)
                        h.carry_out(row, failed)
                    return None
                node_id = placement.node_ids[0]
            plan, generation = decide.start_attempt(view, index, node_id)
            await h.commit(row, plan)
            made = await h.deploy_command(deployment_id, index, generation, node_id, dict(row.manifest))
            if made is None:  # cannot happen: packages are never deleted
                raise RuntimeError(
                    f"package {row.manifest['package_sha256']} of deployment {deployment_id} is missing"
                )
        h.carry_out(row, plan)
        command, deadline = made
        return node_id, generation, command, deadline

    async def mark_running(
        self, deployment_id: str, index: int, node_id: str, generation: int, endpoint: str
    ) -> bool:
        now = self.h.wall()
        row, plan = await self.h.mutate(
            deployment_id, lambda v: decide.mark_running(v, index, node_id, generation, endpoint, now)
        )
        if row is None or plan is None:
            return False
        self.h.carry_out(row, plan)
        return True

    async def mark_failed(
        self, deployment_id: str, index: int, node_id: str, generation: int, error: str
    ) -> None:
        error = redact(error)  # a replica's output: untrusted
        row, plan = await self.h.mutate(
            deployment_id, lambda v: decide.mark_failed(v, index, node_id, generation, error)
        )
        log.warning("deployment %s replica %d failed: %s", deployment_id, index, error)
        if row is not None and plan is not None:
            self.h.carry_out(row, plan)

    async def set_health(
        self,
        deployment_id: str,
        index: int,
        node_id: str,
        generation: int,
        status: ReplicaStatus,
        endpoint: str,
    ) -> None:
        row, plan = await self.h.mutate(
            deployment_id, lambda v: decide.set_health(v, index, node_id, generation, status, endpoint)
        )
        if row is not None and plan is not None:
            self.h.carry_out(row, plan)

    async def settle(self, deployment_id: str) -> None:
        """After recovery or a reconciler retry: running if any replica is, else failing."""

        def settle(view: DeploymentView) -> Plan | None:
            return decide.settle(view, rolling=deployment_id in self.h.rolling)

        row, plan = await self.h.mutate(deployment_id, settle)
        if row is not None and plan is not None:
            self.h.carry_out(row, plan)

    async def retry_replica(self, deployment_id: str, index: int) -> None:
        try:
            async with self.h.leases.working_on(deployment_id) as leased:
                if not leased:
                    return  # another controller works on it: its reconciler retries
                await self.deploy_replica(deployment_id, index, exclude=set())
                await self.settle(deployment_id)
        finally:
            self.h.inflight.discard((deployment_id, index))
