"""The harness that applies the deployments core's plans: one transaction per plan.

State lives in the store (one ``deployments`` row per deployment; packages in
``deployment_packages``). The harness keeps an in-memory index of every replica
assignment (deployment, replica index → :class:`Replica`; see ``harness_index.py``)
so that heartbeats can be checked against it without a store read, and the live
bookkeeping of work in progress in this controller (rollouts, attempts in flight,
surge and draining replicas, retry backoffs, stops sent recently).

:meth:`Harness.mutate` is how every decision is applied: under the deployment's
lock, read the row, build its :class:`DeploymentView`, call the decision, write
the plan's changes back in one transaction, and update the index. Then
:meth:`Harness.carry_out` publishes the plan's reason and sends its commands
through :class:`~controller.deployments.commands.NodeCommands`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from automator67.v1 import deployment_pb2, node_pb2

from controller.deployments.alerts import Alerts
from controller.deployments.blobs import PackageStore, Stored
from controller.deployments.commands import NodeCommands
from controller.deployments.decide import drained
from controller.deployments.fencing import SentKey
from controller.deployments.harness_index import HarnessIndex, Known, view_of
from controller.deployments.leases import LEASE_SECONDS, LeaseLost, Leases, default_controller_id
from controller.deployments.plan import plan as place_replicas
from controller.deployments.plans import Plan, Stop
from controller.deployments.protos import assignment_proto
from controller.deployments.records import (
    ACTIVE,
    STATUS_ENUM,
    DeploymentView,
    Replica,
    endpoints,
    ordered,
    with_draining,
)
from controller.deployments.repository import Conflict, DeploymentRepository
from controller.deployments.snapshot import LiveFleetView
from controller.deployments.sources import Sources
from controller.errors import Aborted
from controller.nodes.fleet import Fleet
from controller.nodes.monitor import StateChange
from controller.scheduling import NodeHistory, Placement, ReplicaRequest
from controller.store.db import Store
from controller.store.models import Deployment, DeploymentPackage, utcnow
from controller.timestamps import timestamp
from controller.vault import Vault

log = logging.getLogger("a67.deployments")

DEPLOY_MARGIN_SECONDS = 15.0
"""Added to a manifest's startup window (health interval * retries + timeout) to get the
deadline of one DeployReplica (unpacking, starting the interpreter, the network)."""
PACKAGE_BYTES_PER_SECOND = 20e6
"""A DeployReplica's deadline grows by the package's size at this rate (the node fetches it)."""
WATCH_QUEUE_SIZE = 1000
ENV_PURPOSE = "deployment-env"
CONFLICT_TRIES = 3
"""Reads of a deployment a user's call decides on before it gives up with ``ABORTED``
(:meth:`Harness.fresh_on_conflict`)."""

T = TypeVar("T")

Watchers = set[asyncio.Queue[deployment_pb2.WatchDeploymentResponse | None]]


def set_replicas(row: Deployment, replicas: Iterable[Replica]) -> None:
    """Store ``replicas`` in index order, with the endpoints and count of the running ones."""
    listed = ordered(replicas)
    row.node_assignments = [r.to_dict() for r in listed]
    row.endpoints = endpoints(listed)
    row.current_replicas = sum(1 for r in listed if r.status == "running")


def apply_plan(row: Deployment, plan: Plan) -> None:
    """Write ``plan``'s store changes into ``row`` (not saved)."""
    if plan.meta is not None:
        row.manifest = dict(plan.meta)
    if plan.replicas is not None:
        set_replicas(row, plan.replicas)
    if plan.status is not None:
        row.status = plan.status.value
    if plan.deployed_at is not None:
        row.deployed_at = plan.deployed_at
    if plan.desired_replicas is not None:
        row.desired_replicas = plan.desired_replicas
    if plan.last_scaled_at is not None:
        row.last_scaled_at = plan.last_scaled_at


class Harness(HarnessIndex):
    """The deployments' shared state and the machinery that applies plans and sends commands."""

    def __init__(
        self,
        *,
        store: Store,
        fleet: Fleet,
        vault: Vault,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = utcnow,
        packages: PackageStore | None = None,
        deploy_margin_seconds: float = DEPLOY_MARGIN_SECONDS,
        controller_id: str | None = None,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        self.store = store
        self.repo = DeploymentRepository(store)
        self.fleet = fleet
        self.vault = vault
        self.clock = clock
        """Monotonic seconds: backoffs, the recovery rate, stop resends."""
        self.wall = wall
        """UTC wall-clock time: what is stored (started_at, deployed_at, last_scaled_at)."""
        self.packages = packages or PackageStore(tempfile.mkdtemp(prefix="a67-packages-"))
        self.sources = Sources(self.packages, self.repo)
        """Builds packages from users' sources and finds them on disk."""
        self.share_packages = False
        """Several controllers (``A67_SCALE_OUT``): a package's bytes are kept in the store
        too, so that any controller can hand it to a node (:meth:`package_row`)."""
        self.deploy_margin = deploy_margin_seconds
        self.nodes = NodeCommands(lambda: fleet.streams)
        self.history = NodeHistory()
        """Every node's liveness over the last 24 h: the reliability factor of placement."""
        self.live = LiveFleetView(store, fleet, self.history)
        """The fleet's live scheduler view: one view per node, updated as nodes change."""
        fleet.monitor.add_listener(self._on_state_change)
        fleet.view_listeners.append(self.live.node_changed)
        self.alerts = Alerts(store, fleet)
        """Stored alerts: mass-failure freezes (the fleet's hook) and failed rollouts."""
        fleet.alert_handler = self.alerts.on_fleet_alert
        self.locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.index: dict[str, Known] = {}
        self._routed: dict[str, tuple[Any, ...]] = {}
        self.names: dict[tuple[str, str], str] = {}
        """(user, name) -> deployment id of every known deployment: CreateDeployment's check
        for a taken name without a store read (the store's unique constraint decides)."""
        self._views: dict[str, tuple[datetime, DeploymentView]] = {}
        self.rows: dict[str, Deployment] = {}
        """The row of each deployment as this controller last read or wrote it (see :meth:`row`)."""
        self.leases = Leases(self, controller_id or default_controller_id(), lease_seconds)
        """Which deployments this controller works on (rollouts, updates, retries, recoveries):
        leases in their rows, so that every controller sharing the store sees them."""
        # Work in progress, as stored in the rows' metadata (kept with the index, from the
        # rows this controller read or wrote; every controller's fence leaves them running):
        self.surging: dict[tuple[str, int], tuple[str, int]] = {}
        """(deployment, index) -> (node, generation) of a rolling update's surge replica."""
        self.draining: dict[SentKey, datetime] = {}
        """(node, deployment, index, generation) -> until: replicas out of the ingress, waiting
        out the drain time before their StopReplica."""
        # This controller's own tasks (another controller sees the lease instead):
        self.inflight: set[tuple[str, int]] = set()
        self.rolling: set[str] = set()
        # Per node stream (what this controller sent on the streams it holds):
        self.granted: set[tuple[str, str]] = set()
        self.stop_sent: dict[SentKey, float] = {}
        self.recovery_next: dict[str, float] = {}
        self.watchers: defaultdict[str, Watchers] = defaultdict(set)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.loaded = False
        self.closing = False
        self.on_change: Callable[[str, Deployment | None], None] | None = None
        self.drain_seconds = 0.0

    async def _on_state_change(self, change: StateChange) -> None:
        self.history.record(change.node_id, change.new, change.at)
        self.live.node_changed(change.node_id)

    # -- tasks ----------------------------------------------------------------------------------

    def spawn(self, coro: Awaitable[Any]) -> None:
        if self.closing:
            if asyncio.iscoroutine(coro):
                coro.close()
            return
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if task.cancelled() or (error := task.exception()) is None:
            return
        if isinstance(error, LeaseLost):
            log.info("%s: this controller's task ends", error)
        else:
            log.error("deployment task failed", exc_info=error)

    # -- packages -------------------------------------------------------------------------------

    async def package_row(self, package: Stored, now: datetime) -> DeploymentPackage:
        """The store's row for a package just built: its bytes too when the packages are
        shared (another controller writes it to its disk before a node needs it:
        :meth:`Sources.package_file`), else only its digest and size (it is on this disk)."""
        data = await asyncio.to_thread(package.path.read_bytes) if self.share_packages else b""
        return DeploymentPackage(sha256=package.sha256, data=data, size=package.size, created_at=now)

    # -- placement ------------------------------------------------------------------------------

    async def place(
        self,
        user_id: str,
        request: ReplicaRequest,
        count: int,
        *,
        seed: str,
        hosting: Sequence[str] = (),
        exclude: Iterable[str] = (),
        skip: tuple[str, int] | None = None,
    ) -> Placement:
        """Where ``count`` replicas go, beside the deployment's replicas on ``hosting``: the
        one placement setup of create, retry, recovery, scale-up and rolling update
        (:func:`controller.deployments.plan.plan`). ``skip`` is a replica whose reserved
        resources do not count (the one being moved)."""
        live = await self.live.snapshot(user_id)
        moving = None
        if skip is not None and (known := self.index.get(skip[0])) is not None:
            current = known.assignments.get(skip[1])
            if current is not None and current.status in ACTIVE:
                moving = current.node_id
        regions = {node_id: view.region for node_id in hosting if (view := live.node(node_id)) is not None}
        # no await from here on: the placement reads the live views as they are now
        with self.live.without(live, skip, moving):
            return place_replicas(
                live, regions, request, count, seed=seed, hosting=hosting, exclude=frozenset(exclude)
            )

    # -- events ---------------------------------------------------------------------------------

    @staticmethod
    def offer(
        queue: asyncio.Queue[deployment_pb2.WatchDeploymentResponse | None],
        event: deployment_pb2.WatchDeploymentResponse | None,
    ) -> None:
        if queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                queue.get_nowait()
        queue.put_nowait(event)

    def publish(self, row: Deployment, message: str, replica: Replica | None = None) -> None:
        queues = self.watchers.get(row.id)
        if not queues:
            return
        event = deployment_pb2.WatchDeploymentResponse(
            time=timestamp(self.wall()),
            status=STATUS_ENUM.get(row.status, deployment_pb2.DEPLOYMENT_STATUS_UNSPECIFIED),
            message=message,
            assignment=assignment_proto(replica) if replica else None,
        )
        for queue in queues:
            self.offer(queue, event)

    def end_watch(self, deployment_id: str) -> None:
        for queue in self.watchers.pop(deployment_id, set()):
            self.offer(queue, None)

    # -- applying plans -------------------------------------------------------------------------

    async def row(self, deployment_id: str, listed: Deployment | None = None) -> Deployment | None:
        """The deployment's row (the caller holds its lock): as this controller last read or
        wrote it, else read from the store; ``listed``, a copy just read from the store,
        replaces it if newer. Every write is conditional on the row's version (``updated_at``,
        :meth:`DeploymentRepository.update`), so a row another writer changed meanwhile is
        never overwritten: the write fails with :class:`Conflict`, the copy is dropped and
        the next read goes to the store."""
        cached = self.rows.get(deployment_id)
        if listed is not None and (cached is None or listed.updated_at > cached.updated_at):
            self.rows[deployment_id] = listed
            return listed
        if cached is not None:
            return cached
        row = await self.repo.get(deployment_id)
        if row is not None:
            self.rows[deployment_id] = row
        return row

    def view(self, row: Deployment) -> DeploymentView:
        """``view_of(row)``, kept per row version (the reconciler reads every row each pass)."""
        kept = self._views.get(row.id)
        if kept is not None and kept[0] == row.updated_at:
            return kept[1]
        view = view_of(row)
        self._views[row.id] = (row.updated_at, view)
        return view

    def drop_row(self, deployment_id: str) -> None:
        """Forget the cached row (deleted, or its write failed): read it from the store next time."""
        self.rows.pop(deployment_id, None)
        self._views.pop(deployment_id, None)

    async def save(self, row: Deployment) -> None:
        """Write ``row``'s changes (the caller holds the deployment's lock; see :meth:`row`)."""
        try:
            await self.repo.update(row)
        except BaseException:
            self.drop_row(row.id)
            raise
        self.rows[row.id] = row

    async def commit(self, row: Deployment, plan: Plan) -> None:
        """Apply ``plan`` to ``row`` and save it (the caller holds the deployment's lock). A task
        working under the deployment's lease renews it, or ends with :class:`LeaseLost`."""
        self.leases.stamp(row)
        apply_plan(row, plan)
        if plan.drains and self.drain_seconds > 0:
            now = self.wall()
            until = now + timedelta(seconds=self.drain_seconds)
            row.manifest = with_draining(row.manifest, plan.drains, until, now)
        await self.save(row)
        self.remember(row)

    async def mutate(
        self, deployment_id: str, decide: Callable[[DeploymentView], Plan | None]
    ) -> tuple[Deployment | None, Plan | None]:
        """Under the deployment's lock: read it, decide, write the plan's store changes (one
        statement, committed with whatever else is being written). The row (None: deleted)
        and the plan (None: nothing to do). If the row changed in the store since it was
        read (another writer), it is read again and decided again, once."""
        async with self.locks[deployment_id]:
            for attempt in range(2):
                row = await self.row(deployment_id)
                if row is None:
                    return None, None
                plan = decide(view_of(row))
                if plan is not None and plan.changes_store:
                    try:
                        await self.commit(row, plan)
                    except Conflict:
                        if attempt == 0:
                            continue
                        raise
                return row, plan
            raise AssertionError("unreachable")

    async def fresh_on_conflict(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt`` — a user's call that reads the deployment's row (:meth:`row`) and
        writes it, under its lock — again on a fresh read when the write finds the row changed
        in the store meanwhile: the copy this controller kept was stale (another controller
        wrote it, or a concurrent call here). Still conflicting after :data:`CONFLICT_TRIES`
        reads: ``ABORTED``, and nothing was written (the caller may try again)."""
        for tries in range(1, CONFLICT_TRIES + 1):
            try:
                return await attempt()
            except Conflict:
                if tries == CONFLICT_TRIES:
                    raise Aborted(
                        "The deployment kept changing while this call was deciding; nothing was "
                        "changed: try again",
                        reason="DEPLOYMENT_CHANGED",
                    ) from None
        raise AssertionError("unreachable")

    def carry_out(self, row: Deployment, plan: Plan) -> None:
        """Publish ``plan``'s reason and send its commands (in the background)."""
        if plan.reason:
            self.publish(row, plan.reason, plan.event_replica)
        if plan.stops:
            self.spawn(self.stop_all(plan.stops))
        if plan.drains:
            self.spawn(self.drain_then_stop(row.id, plan.drains))

    # -- node commands --------------------------------------------------------------------------

    async def stop_all(self, stops: Iterable[Stop]) -> None:
        await asyncio.gather(*(self.nodes.stop(s) for s in stops))

    def stop_later(self, node_id: str, deployment_id: str, index: int, generation: int) -> None:
        self.spawn(self.nodes.stop(Stop(node_id, deployment_id, index, generation)))

    async def drain_then_stop(self, deployment_id: str, replicas: Collection[Replica]) -> None:
        """Stop replicas that no longer get traffic, after the drain time (their endpoints
        left the ingress when the deployment was stored without them)."""
        if replicas and self.drain_seconds > 0:
            await asyncio.sleep(self.drain_seconds)
        await self.stop_all(Stop.of(deployment_id, r) for r in replicas)
        if replicas and self.drain_seconds > 0:
            keys = [(r.node_id, r.replica_index, r.generation) for r in replicas]
            now = self.wall()
            await self.mutate(deployment_id, lambda v: drained(v, keys, now))

    async def deploy_command(
        self, deployment_id: str, index: int, generation: int, node_id: str, record: dict[str, Any]
    ) -> tuple[node_pb2.NodeCommand, float] | None:
        """The DeployReplica of replica ``index`` at version ``record`` and its deadline (None if
        the package is missing); ``node_id`` may fetch the package from now on."""
        package = await self.sources.package_file(str(record["package_sha256"]))
        if package is None:
            return None
        self.granted.add((node_id, package.sha256))
        env = json.loads(
            self.vault.decrypt_str(str(record["env_sealed"]), owner=deployment_id, purpose=ENV_PURPOSE)
        )
        command = node_pb2.NodeCommand(
            deploy_replica=node_pb2.DeployReplica(
                deployment_id=deployment_id,
                replica_index=index,
                generation=generation,
                package_sha256=package.sha256,
                package_size=package.size,
                env=env,
                port=0,
            )
        )
        deadline = float(record.get("startup_seconds", 30)) + self.deploy_margin
        return command, deadline + package.size / PACKAGE_BYTES_PER_SECOND
