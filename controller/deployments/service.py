"""Deployments at run time: the DeploymentService RPCs, the fleet's hooks and the reconciler.

A thin façade over the deployments core. Decisions are pure functions over a
snapshot of one deployment (``decide.py``: rollout, retry elsewhere, settle,
scale, recovery, reconcile; ``versions.py``: rolling update and revert;
``fencing.py``: what nodes report), each returning a plan (``plans.py``). The
:class:`~controller.deployments.harness.Harness` applies plans — one store
transaction per plan — and sends commands through
:class:`~controller.deployments.commands.NodeCommands`; ``rollout.py``,
``recovery.py`` and ``updates.py`` sequence the decisions around the nodes'
answers. Records and statuses are typed (``records.py``).

Replica assignments are stored as before (``node_assignments`` JSON, one dict per
replica; see :class:`~controller.deployments.records.Replica`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime

from automator67.v1 import deployment_pb2, node_pb2

from controller.deployments import decide
from controller.deployments.blobs import PackageStore, Stored, is_sha256
from controller.deployments.creates import Creates
from controller.deployments.harness import DEPLOY_MARGIN_SECONDS, WATCH_QUEUE_SIZE, Harness
from controller.deployments.harness_index import view_of
from controller.deployments.manifest import MAX_REPLICAS
from controller.deployments.plans import Plan, Stop
from controller.deployments.protos import deployment_proto
from controller.deployments.records import (
    ACTIVE,
    STATUS_ENUM,
    DeploymentStatus,
    ReplicaStatus,
    request_of,
)
from controller.deployments.recovery import RECOVERY_PER_SECOND, Recovery
from controller.deployments.rollout import ROLLOUT_DEADLINE_SECONDS, Rollouts
from controller.deployments.sources import Sources
from controller.deployments.updates import Updates
from controller.errors import FieldViolation, InvalidArgument, NotFound, PermissionDenied
from controller.leases import LoopLeases, my_turn
from controller.nodes.fleet import Fleet
from controller.nodes.health import is_routable
from controller.scheduling import ReplicaTarget, pick_endpoint
from controller.store.db import Store
from controller.store.models import Deployment, utcnow
from controller.timestamps import timestamp
from controller.vault import Vault

log = logging.getLogger("a67.deployments")

RECONCILE_LEASE = "deployments-reconciler"
"""The reconciler's loop lease: one controller sharing the store reconciles at a time."""

__all__ = ["STATUS_ENUM", "DeploymentService"]


class DeploymentService:
    """Everything the DeploymentService RPCs, the fleet's hooks and the reconciler do."""

    def __init__(
        self,
        *,
        store: Store,
        fleet: Fleet,
        vault: Vault,
        reconcile_interval_seconds: float,
        rollout_deadline_seconds: float = ROLLOUT_DEADLINE_SECONDS,
        deploy_margin_seconds: float = DEPLOY_MARGIN_SECONDS,
        recovery_per_second: float = RECOVERY_PER_SECOND,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = utcnow,
        packages: PackageStore | None = None,
        controller_id: str | None = None,
    ) -> None:
        self._h = Harness(
            store=store,
            fleet=fleet,
            vault=vault,
            clock=clock,
            wall=wall,
            packages=packages,
            deploy_margin_seconds=deploy_margin_seconds,
            controller_id=controller_id,
        )
        self._rollouts = Rollouts(self._h, rollout_deadline_seconds=rollout_deadline_seconds)
        self._recovery = Recovery(self._h, self._rollouts, recovery_per_second=recovery_per_second)
        self._updates = Updates(self._h, self._rollouts)
        self._creates = Creates(self._h, self._rollouts)
        self._interval = reconcile_interval_seconds
        self._loop_task: asyncio.Task[None] | None = None
        self.loop_leases: LoopLeases | None = None
        """Set by the server: the reconciler runs where its lease is (controller/leases.py)."""
        self._rng = random.Random()  # noqa: S311 (load spreading, not security)
        self.repo = self._h.repo
        self.packages = self._h.packages
        self.history = self._h.history
        """Every node's liveness over the last 24 h: the reliability factor of placement."""
        self.alerts = self._h.alerts
        """Stored alerts: mass-failure freezes (the fleet's hook) and failed rollouts."""

    @property
    def on_change(self) -> Callable[[str, Deployment | None], None] | None:
        """Called with every deployment stored (None: deleted): the ingress routes follow it."""
        return self._h.on_change

    @on_change.setter
    def on_change(self, callback: Callable[[str, Deployment | None], None] | None) -> None:
        self._h.on_change = callback

    @property
    def share_packages(self) -> bool:
        """Several controllers: packages' and sources' bytes are kept in the store too
        (Harness.package_row, Sources.receive)."""
        return self._h.share_packages

    @share_packages.setter
    def share_packages(self, share: bool) -> None:
        self._h.share_packages = share
        self._h.sources.share = share

    @property
    def sources(self) -> Sources:
        """Users' sources: uploads received, found by digest (:class:`Sources`)."""
        return self._h.sources

    @property
    def drain_seconds(self) -> float:
        """A replica leaving on a scale-down or rolling update is stopped this long after
        its endpoint left the ingress, so that requests in flight finish."""
        return self._h.drain_seconds

    @drain_seconds.setter
    def drain_seconds(self, seconds: float) -> None:
        self._h.drain_seconds = seconds

    @property
    def _granted(self) -> set[tuple[str, str]]:
        return self._h.granted  # benchmarks grant fetches directly

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every deployment into the index, reconcile once, and keep reconciling."""
        for row in await self.repo.list_all():
            self._h.remember(row)
        self._h.loaded = True
        log.info("deployments: %d known", len(self._h.index))
        await self._pass()
        self._loop_task = asyncio.create_task(self._reconcile_loop())

    async def stop(self) -> None:
        """Stop background work and end every watch stream (the server is draining)."""
        h = self._h
        h.closing = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for task in list(h.tasks):
            task.cancel()
        if h.tasks:
            await asyncio.gather(*h.tasks, return_exceptions=True)
        await h.leases.give_back_all()
        for queues in h.watchers.values():
            for queue in queues:
                h.offer(queue, None)

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self._pass()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("reconcile pass failed", exc_info=True)

    async def _pass(self) -> None:
        """The reconciler where its lease is; elsewhere, the index follows the store."""
        if await my_turn(self.loop_leases, RECONCILE_LEASE, self._interval):
            await self.reconcile()
        else:
            await self._recovery.sync()

    # -- the fleet's hooks and the reconciler -------------------------------------------------

    async def on_node_failed(self, node_id: str, user_id: str) -> None:
        """The fleet's recovery hook: re-place every replica of the failed node elsewhere."""
        await self._recovery.on_node_failed(node_id, user_id)

    async def on_replicas_reported(
        self, node_id: str, replicas: Sequence[node_pb2.ReplicaState], complete: bool
    ) -> None:
        """A node's hello (``complete``) or heartbeat listed its replicas: fence and sync health."""
        await self._recovery.on_replicas_reported(node_id, replicas, complete)

    async def reconcile(self) -> None:
        """Compare desired and current state; resume rollouts, deploy missing replicas."""
        await self._recovery.reconcile()

    def deployments_on(self, node_id: str) -> int:
        """How many deployments have an active replica on ``node_id`` (ListNodes' count)."""
        return sum(
            1
            for known in self._h.index.values()
            if any(r.node_id == node_id and r.status in ACTIVE for r in known.assignments.values())
        )

    async def deployments_on_async(self, node_id: str) -> int:
        return self.deployments_on(node_id)

    async def owned(self, user_id: str, deployment_id: str) -> Deployment:
        """The caller's deployment; another user's looks exactly like a missing one."""
        row = await self.repo.get_for_user(user_id, deployment_id) if deployment_id else None
        if row is None:
            raise NotFound(f"Deployment {deployment_id!r} was not found", reason="DEPLOYMENT_NOT_FOUND")
        return row

    # -- create -----------------------------------------------------------------------------

    async def create(self, user_id: str, request: deployment_pb2.CreateDeploymentRequest) -> tuple[str, str]:
        """Validate, package, place and persist; the rollout runs in the background."""
        return await self._creates.create(user_id, request)

    # -- packages ---------------------------------------------------------------------------

    def may_fetch(self, node_id: str, sha256: str) -> bool:
        """Whether ``node_id`` may download package ``sha256``: it was sent a replica of it, or
        holds (or is being given) a replica of a deployment that has it as a version."""
        h = self._h
        if (node_id, sha256) in h.granted:
            return True
        for deployment_id, known in h.index.items():
            if sha256 not in known.packages:
                continue
            if any(r.node_id == node_id and r.status in ACTIVE for r in known.assignments.values()):
                return True
            if any(key[0] == deployment_id and target[0] == node_id for key, target in h.surging.items()):
                return True
        return False

    def check_fetch(self, node_id: str, sha256: str) -> Stored:
        """The package a node asks for: ``PERMISSION_DENIED`` unless :meth:`may_fetch`."""
        if not is_sha256(sha256):
            raise InvalidArgument(
                "Invalid package digest",
                field_violations=[FieldViolation("sha256", "must be 64 lower-case hexadecimal characters")],
            )
        found = self.packages.package(sha256) if self.may_fetch(node_id, sha256) else None
        if found is None:
            raise PermissionDenied(
                f"Node {node_id} has no replica of package {sha256}", reason="PACKAGE_NOT_ASSIGNED"
            )
        return found

    async def serve_package(
        self, node_id: str, sha256: str, offset: int
    ) -> AsyncIterator[tuple[int, bytes, int]]:
        """``(offset, data, total)`` chunks of a package for ``node_id`` (see :meth:`check_fetch`)."""
        found = self.check_fetch(node_id, sha256)
        if not 0 <= offset <= found.size:
            raise InvalidArgument(
                f"Offset {offset} is outside package {sha256} ({found.size} bytes)",
                field_violations=[FieldViolation("offset", f"must be between 0 and {found.size}")],
            )
        async for piece in self.packages.read_package(found.sha256, offset):
            yield piece

    # -- read -----------------------------------------------------------------------------------

    def to_proto(self, row: Deployment) -> deployment_pb2.Deployment:
        """The deployment as the API returns it (a copy: the caller may add to it), built once
        per stored version of the row (:func:`~controller.deployments.protos.deployment_proto`)."""
        return deployment_proto(row)

    def resolve(self, row: Deployment) -> deployment_pb2.ResolveEndpointResponse:
        """The endpoint for the next request: two random choices among healthy replicas."""
        fleet = self._h.fleet
        targets = []
        for r in view_of(row).replicas:
            state = fleet.state_of(r.node_id)
            live = fleet.live.get(r.node_id)
            targets.append(
                ReplicaTarget(
                    node_id=r.node_id,
                    endpoint=r.endpoint,
                    healthy=r.status == ReplicaStatus.RUNNING
                    and bool(r.endpoint)
                    and (state is None or is_routable(state)),
                    active_requests=live.metrics.active_requests if live else 0,
                    replica_index=r.replica_index,
                )
            )
        chosen = pick_endpoint(targets, self._rng)
        return deployment_pb2.ResolveEndpointResponse(
            endpoint=chosen.endpoint, node_id=chosen.node_id, replica_index=chosen.replica_index
        )

    async def watch(self, row: Deployment) -> AsyncIterator[deployment_pb2.WatchDeploymentResponse]:
        """Progress events of ``row`` until it is deleted or the server drains."""
        h = self._h
        queue: asyncio.Queue[deployment_pb2.WatchDeploymentResponse | None] = asyncio.Queue(WATCH_QUEUE_SIZE)
        h.watchers[row.id].add(queue)
        try:
            yield deployment_pb2.WatchDeploymentResponse(
                time=timestamp(h.wall()),
                status=STATUS_ENUM.get(row.status, deployment_pb2.DEPLOYMENT_STATUS_UNSPECIFIED),
                message=str(row.manifest.get("message", "")),
            )
            if h.closing:
                return
            while (event := await queue.get()) is not None:
                yield event
        finally:
            watchers = h.watchers.get(row.id)
            if watchers is not None:
                watchers.discard(queue)
                if not watchers:
                    h.watchers.pop(row.id, None)

    # -- delete and scale ---------------------------------------------------------------------

    async def delete(self, row: Deployment) -> None:
        """Stop every replica (waiting for the nodes, bounded), remove the replicas' directories
        on their nodes (RemoveDeployment), then delete the deployment."""
        h = self._h

        async def attempt() -> tuple[list[Stop], list[str]] | None:
            async with h.locks[row.id]:
                fresh = await h.row(row.id)
                if fresh is None:
                    return None
                view = view_of(fresh)
                stops = [
                    Stop.of(row.id, r)
                    for r in view.replicas
                    if r.status in ACTIVE or r.status == ReplicaStatus.FAILED
                ]
                nodes = sorted({r.node_id for r in view.replicas if r.node_id})
                fresh.status = DeploymentStatus.STOPPED.value
                await h.save(fresh)
                h.forget(row.id)
                h.publish(fresh, "deleting: stopping every replica")
                return stops, nodes

        stopping = await h.fresh_on_conflict(attempt)
        if stopping is None:
            return
        stops, nodes = stopping
        await h.stop_all(stops)
        # then the replicas' directories on every node that held one; a node that is away now
        # is told when it reports the deployment's replicas again (on_replicas_reported)
        await asyncio.gather(*(h.nodes.remove(node, row.id) for node in nodes))
        async with h.locks[row.id]:
            await self.repo.delete(row.id)
            h.drop_row(row.id)
            h.index.pop(row.id, None)
        h.locks.pop(row.id, None)
        h.end_watch(row.id)
        log.info("deployment %s deleted", row.id)

    async def scale(self, row: Deployment, replicas: int) -> Deployment:
        """Scale to ``replicas``: up places new replicas on nodes not hosting it; down stops the highest."""
        h = self._h
        if not 1 <= replicas <= MAX_REPLICAS:
            raise InvalidArgument(
                "Invalid replica count",
                field_violations=[FieldViolation("replicas", f"must be between 1 and {MAX_REPLICAS}")],
            )

        async def attempt() -> tuple[Deployment, Plan]:
            async with h.locks[row.id]:
                fresh = await h.row(row.id)
                if fresh is None:
                    raise NotFound(f"Deployment {row.id!r} was not found", reason="DEPLOYMENT_NOT_FOUND")
                view = view_of(fresh)
                placed: list[str] = []
                if replicas > view.desired_replicas:
                    placement = await h.place(
                        fresh.user_id,
                        request_of(view.meta),
                        replicas - view.desired_replicas,
                        seed=f"{fresh.id}|scale|{view.generation}",
                        hosting=[r.node_id for r in view.replicas if r.status in ACTIVE],
                    )
                    placed = list(placement.node_ids)
                plan = decide.scale(view, replicas, placed, h.wall())
                await h.commit(fresh, plan)
                return fresh, plan

        fresh, plan = await h.fresh_on_conflict(attempt)
        log.info("deployment %s: %s", fresh.id, plan.reason)
        h.carry_out(fresh, plan)
        if plan.rollout:
            self._rollouts.start(fresh.id, list(plan.rollout), initial=False)
        return fresh

    # -- rolling update and rollback ------------------------------------------------------------

    async def update(self, row: Deployment, request: deployment_pb2.UpdateDeploymentRequest) -> Deployment:
        """Start a rolling update to a new package and manifest (a new version).

        One replica at a time (max surge 1): the new version's replica starts on another
        node where one is feasible (else in place), must be healthy within its deadline,
        and only then replaces the old one. If a new replica fails, the deployment reverts
        by itself to the last good version. The replica count stays as it is (use
        ScaleDeployment); ``max_surge`` / ``max_unavailable`` other than 0 or 1 are refused.
        """
        if (
            request.max_surge > 1
            or request.max_unavailable > 1
            or request.max_surge < 0
            or request.max_unavailable < 0
        ):
            raise InvalidArgument(
                "Unsupported rollout parameters",
                field_violations=[
                    FieldViolation("max_surge", "only 0 or 1 is supported (one replica at a time)")
                ],
            )
        paths = list(request.update_mask.paths)
        if paths and paths != ["*"]:
            updated = await self._updates.masked(row, request, paths)
            return updated if updated is not None else await self.scale(row, request.manifest.replicas)
        manifest = deployment_pb2.DeploymentManifest()
        manifest.CopyFrom(request.manifest)
        return await self._updates.update_to(row, manifest, request.source_tar_gz, request.source_sha256)

    async def rollback(self, row: Deployment, version: int) -> Deployment:
        """Roll back to ``version`` (0: the previous good version), one replica at a time."""
        return await self._updates.begin(row.id, record=None, target=version)
