"""Deployments at run time: create, rollout, scale, delete, routing, recovery, reconcile.

State lives in the store (one ``deployments`` row per deployment; the package
in ``deployment_packages``); this service keeps an in-memory index of every
replica assignment (deployment, replica index → node, generation, status) so
that heartbeats can be checked against it without a store read.

Replica assignments (``node_assignments`` JSON, one dict per replica)::

    {"replica_index": 0, "node_id": "…", "generation": 7, "status": "running",
     "endpoint": "http://10.0.0.5:8001", "error_message": "", "started_at": "…"}

Assignment status: ``pending`` (placed, not sent yet), ``starting`` (DeployReplica
sent), ``running`` (healthy, gets traffic), ``unhealthy`` (the agent reports its
health check failing: no traffic), ``failed`` (the attempt failed; the
reconciler retries it), ``lost`` (its node failed; being re-placed),
``stopped`` (rolled back).

Generations fence replicas: every DeployReplica attempt carries a new,
deployment-wide increasing generation. A node that reports a replica whose
(deployment, index) is now assigned to another node, or with a lower
generation, or of a deployment that no longer exists, is told to stop it
(StopReplica with the reported generation), so no replica runs twice.

Decision 3 (DESIGN.md): best-effort by default — a rollout that starts some
replicas ends ``running`` (degraded) and the reconciler keeps trying to reach
``desired_replicas``; ``atomic: true`` rolls everything back if any replica fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from automator67.v1 import deployment_pb2, node_pb2
from google.protobuf import json_format

from controller.deployments.alerts import ROLLOUT_FAILED, UPDATE_REVERTED, Alerts
from controller.deployments.blobs import PackageStore, Stored, is_sha256
from controller.deployments.manifest import MAX_REPLICAS, validate_manifest, with_effective_values
from controller.deployments.package import PackageLimits, build_package_file
from controller.deployments.plan import plan
from controller.deployments.repository import NAME_TAKEN, DeploymentRepository, RequestIdTaken
from controller.deployments.snapshot import NodeRows, build_snapshot
from controller.errors import (
    AlreadyExists,
    ControllerError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from controller.nodes.fleet import Fleet
from controller.nodes.health import NodeState, is_routable
from controller.nodes.monitor import StateChange
from controller.redact import redact
from controller.scheduling import (
    NodeHistory,
    Placement,
    ReplicaRequest,
    ReplicaTarget,
    Resources,
    pick_endpoint,
)
from controller.store.db import Store
from controller.store.models import Deployment, DeploymentPackage, new_id, utcnow
from controller.timestamps import timestamp
from controller.vault import Vault

log = logging.getLogger("a67.deployments")

ROLLOUT_DEADLINE_SECONDS = 300.0
"""A rollout's overall deadline; replicas not healthy by then are reported as failed."""
DEPLOY_MARGIN_SECONDS = 15.0
"""Added to a manifest's startup window (health interval * retries + timeout) to get the
deadline of one DeployReplica (unpacking, starting the interpreter, the network)."""
PACKAGE_BYTES_PER_SECOND = 20e6
"""A DeployReplica's deadline grows by the package's size at this rate (the node fetches it)."""
MAX_ATTEMPTS_PER_REPLICA = 3
"""Nodes one replica is tried on within one rollout before it counts as failed."""
STOP_TIMEOUT_SECONDS = 10.0
"""How long a StopReplica may take before it is given up (the fence catches stragglers)."""
RECOVERY_PER_SECOND = 5.0
"""Replica recoveries started per second per user (a flapping node causes no storm)."""
RECOVERY_BURST = 10
"""Recoveries a user may start at once before the rate applies."""
RETRY_BACKOFF_MIN_SECONDS = 1.0
RETRY_BACKOFF_MAX_SECONDS = 60.0
"""The reconciler retries a failed replica after this backoff, doubling per failure."""
STOP_RESEND_SECONDS = 10.0
"""A stale replica reported again within this time is not sent another StopReplica."""
MAX_STORED_REJECTED = 50
"""Rejected nodes kept in a deployment's placement explanations."""
WATCH_QUEUE_SIZE = 1000
VERSION_KEYS = (
    "spec",
    "env_sealed",
    "package_sha256",
    "resources",
    "startup_seconds",
    "atomic",
    "source_sha256",
)
# The paths UpdateDeployment's update_mask may name (AIP-134; relative to the request).
# "manifest.replicas" is a scale and must be alone; "*" (or no mask) replaces everything.
UPDATE_MASK_PATHS = frozenset(
    {
        "source_sha256",
        "source_tar_gz",
        "manifest",
        "manifest.name",
        "manifest.app_type",
        "manifest.runtime",
        "manifest.entrypoint",
        "manifest.resources",
        "manifest.resources.memory",
        "manifest.resources.cpu",
        "manifest.resources.storage",
        "manifest.replicas",
        "manifest.env",
        "manifest.health_check",
        "manifest.health_check.path",
        "manifest.health_check.interval_seconds",
        "manifest.health_check.timeout_seconds",
        "manifest.health_check.retries",
        "manifest.atomic",
    }
)
"""What one version of a deployment is (kept in ``manifest["versions"]`` for rollbacks)."""
ENV_PURPOSE = "deployment-env"

PENDING, DEPLOYING, RUNNING, FAILING, FAILED, SCALING, STOPPED = (
    "pending",
    "deploying",
    "running",
    "failing",
    "failed",
    "scaling",
    "stopped",
)
STATUS_ENUM = {
    PENDING: deployment_pb2.DEPLOYMENT_STATUS_PENDING,
    DEPLOYING: deployment_pb2.DEPLOYMENT_STATUS_DEPLOYING,
    RUNNING: deployment_pb2.DEPLOYMENT_STATUS_RUNNING,
    FAILING: deployment_pb2.DEPLOYMENT_STATUS_FAILING,
    FAILED: deployment_pb2.DEPLOYMENT_STATUS_FAILED,
    SCALING: deployment_pb2.DEPLOYMENT_STATUS_SCALING,
    STOPPED: deployment_pb2.DEPLOYMENT_STATUS_STOPPED,
}

# Assignment statuses.
R_PENDING, R_STARTING, R_RUNNING, R_UNHEALTHY, R_FAILED, R_LOST, R_STOPPED = (
    "pending",
    "starting",
    "running",
    "unhealthy",
    "failed",
    "lost",
    "stopped",
)
ACTIVE = frozenset({R_PENDING, R_STARTING, R_RUNNING, R_UNHEALTHY})
"""Assignments that hold resources on their node."""

Assignment = dict[str, Any]


@dataclass
class _Known:
    """A deployment as the in-memory index holds it."""

    user_id: str
    request: Resources
    assignments: dict[int, Assignment] = field(default_factory=dict)
    packages: frozenset[str] = frozenset()
    """The package digests of every version (what its nodes may fetch)."""


def _assignments(row: Deployment) -> list[Assignment]:
    return [dict(a) for a in row.node_assignments]


def _set_assignments(row: Deployment, assignments: Iterable[Assignment]) -> None:
    ordered = sorted((dict(a) for a in assignments), key=lambda a: int(a["replica_index"]))
    row.node_assignments = ordered
    running = [a for a in ordered if a["status"] == R_RUNNING]
    row.endpoints = [a["endpoint"] for a in running if a.get("endpoint")]
    row.current_replicas = len(running)


def _meta(row: Deployment) -> dict[str, Any]:
    return dict(row.manifest)


def _find(assignments: list[Assignment], index: int) -> Assignment | None:
    return next((a for a in assignments if int(a["replica_index"]) == index), None)


def _request_of(meta: dict[str, Any]) -> ReplicaRequest:
    r = meta["resources"]
    return ReplicaRequest(
        cpu_cores=float(r["cpu_cores"]), memory_mb=int(r["memory_mb"]), disk_mb=int(r["disk_mb"])
    )


def _apply_mask_path(
    target: deployment_pb2.DeploymentManifest, given: deployment_pb2.DeploymentManifest, parts: list[str]
) -> None:
    """Set the manifest field ``parts`` (below ``manifest``) of ``target`` to ``given``'s."""
    if not parts:
        target.CopyFrom(given)
        return
    dest: Any = target
    src: Any = given
    for part in parts[:-1]:
        dest, src = getattr(dest, part), getattr(src, part)
    name = parts[-1]
    field = dest.DESCRIPTOR.fields_by_name[name]
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        getattr(dest, name).clear()
        getattr(dest, name).update(getattr(src, name))
    elif field.message_type is not None:
        if src.HasField(name):
            getattr(dest, name).CopyFrom(getattr(src, name))
        else:
            dest.ClearField(name)
    else:
        setattr(dest, name, getattr(src, name))


def _failure_summary(assignments: Iterable[Assignment]) -> str:
    parts = [
        f"replica {a['replica_index']}: {a.get('error_message') or a['status']}"
        for a in assignments
        if a["status"] != R_RUNNING
    ]
    return "; ".join(parts)


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
        packages: PackageStore | None = None,
    ) -> None:
        self._store = store
        self.packages = packages or PackageStore(tempfile.mkdtemp(prefix="a67-packages-"))
        self._package_limits = PackageLimits(max_compressed_bytes=self.packages.max_bytes)
        self._granted: set[tuple[str, str]] = set()
        self.repo = DeploymentRepository(store)
        self._fleet = fleet
        self._node_rows = NodeRows(store, fleet)
        self.history = NodeHistory()
        """Every node's liveness over the last 24 h: the reliability factor of placement."""
        fleet.monitor.add_listener(self._on_state_change)
        self.alerts = Alerts(store, fleet)
        """Stored alerts: mass-failure freezes (the fleet's hook) and failed rollouts."""
        fleet.alert_handler = self.alerts.on_fleet_alert
        self._vault = vault
        self._interval = reconcile_interval_seconds
        self._rollout_deadline = rollout_deadline_seconds
        self._deploy_margin = deploy_margin_seconds
        self._recovery_rate = recovery_per_second
        self._clock = clock
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._index: dict[str, _Known] = {}
        self._inflight: set[tuple[str, int]] = set()
        self._rolling: set[str] = set()
        self._surging: dict[tuple[str, int], tuple[str, int]] = {}
        # replicas taken out of the ingress and waiting out the drain time before their
        # StopReplica: (node, deployment, index, generation); the fence leaves them running
        self._draining: set[tuple[str, str, int, int]] = set()
        self._retry: dict[tuple[str, int], tuple[float, float]] = {}
        self._stop_sent: dict[tuple[str, str, int, int], float] = {}
        self._recovery_next: dict[str, float] = {}
        self._watchers: defaultdict[
            str, set[asyncio.Queue[deployment_pb2.WatchDeploymentResponse | None]]
        ] = defaultdict(set)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._loaded = False
        self._closing = False
        self._rng = random.Random()  # noqa: S311 (load spreading, not security)
        self.on_change: Callable[[str, Deployment | None], None] | None = None
        """Called with every deployment stored (None: deleted): the ingress routes follow it."""
        self.drain_seconds = 0.0
        """A replica leaving on a scale-down or rolling update is stopped this long after
        its endpoint left the ingress, so that requests in flight finish."""

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Load every deployment into the index, reconcile once, and keep reconciling."""
        for row in await self.repo.list_all():
            self._remember(row)
        self._loaded = True
        log.info("deployments: %d known", len(self._index))
        await self.reconcile()
        self._loop_task = asyncio.create_task(self._reconcile_loop())

    async def stop(self) -> None:
        """Stop background work and end every watch stream (the server is draining)."""
        self._closing = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for queues in self._watchers.values():
            for queue in queues:
                self._offer(queue, None)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        if self._closing:
            if asyncio.iscoroutine(coro):
                coro.close()
            return
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("deployment task failed", exc_info=task.exception())

    async def _on_state_change(self, change: StateChange) -> None:
        self.history.record(change.node_id, change.new, change.at)

    # -- placement ------------------------------------------------------------------------

    async def _place(
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
        nodes = await self._node_rows.get(user_id)
        snapshot = build_snapshot(
            user_id, nodes, self._fleet, self._reserved(user_id, skip=skip), self.history
        )
        return plan(
            snapshot,
            {n.id: n.region or "" for n in nodes},
            request,
            count,
            seed=seed,
            hosting=hosting,
            exclude=frozenset(exclude),
        )

    # -- index ----------------------------------------------------------------------------

    def _remember(self, row: Deployment) -> None:
        self._index[row.id] = _Known(
            user_id=row.user_id,
            request=Resources(
                cpu_cores=float(row.manifest["resources"]["cpu_cores"]),
                memory_mb=int(row.manifest["resources"]["memory_mb"]),
                disk_mb=int(row.manifest["resources"]["disk_mb"]),
            ),
            assignments={int(a["replica_index"]): dict(a) for a in row.node_assignments},
            packages=frozenset(
                {str(row.manifest.get("package_sha256", ""))}
                | {
                    str(v.get("package_sha256", ""))
                    for v in dict(row.manifest.get("versions") or {}).values()
                }
            ),
        )
        if self.on_change is not None:
            self.on_change(row.id, row)

    def _reserved(self, user_id: str, skip: tuple[str, int] | None = None) -> dict[str, Resources]:
        reserved: dict[str, Resources] = {}
        for dep_id, known in self._index.items():
            if known.user_id != user_id:
                continue
            for index, a in known.assignments.items():
                if a["status"] in ACTIVE and (dep_id, index) != skip:
                    node = a["node_id"]
                    reserved[node] = reserved.get(node, Resources()) + known.request
        return reserved

    def deployments_on(self, node_id: str) -> int:
        """How many deployments have an active replica on ``node_id`` (ListNodes' count)."""
        return sum(
            1
            for known in self._index.values()
            if any(a["node_id"] == node_id and a["status"] in ACTIVE for a in known.assignments.values())
        )

    async def deployments_on_async(self, node_id: str) -> int:
        return self.deployments_on(node_id)

    # -- events ---------------------------------------------------------------------------

    @staticmethod
    def _offer(
        queue: asyncio.Queue[deployment_pb2.WatchDeploymentResponse | None],
        event: deployment_pb2.WatchDeploymentResponse | None,
    ) -> None:
        if queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                queue.get_nowait()
        queue.put_nowait(event)

    def _publish(self, row: Deployment, message: str, assignment: Assignment | None = None) -> None:
        queues = self._watchers.get(row.id)
        if not queues:
            return
        event = deployment_pb2.WatchDeploymentResponse(
            time=timestamp(utcnow()),
            status=STATUS_ENUM.get(row.status, deployment_pb2.DEPLOYMENT_STATUS_UNSPECIFIED),
            message=message,
            assignment=self._assignment_proto(assignment) if assignment else None,
        )
        for queue in queues:
            self._offer(queue, event)

    def _end_watch(self, deployment_id: str) -> None:
        for queue in self._watchers.pop(deployment_id, set()):
            self._offer(queue, None)

    # -- store helpers ----------------------------------------------------------------------

    async def _mutate(
        self, deployment_id: str, change: Callable[[Deployment], bool | None]
    ) -> Deployment | None:
        """Load, change (``change`` returns False to skip saving) and save one deployment."""
        async with self._locks[deployment_id]:
            row = await self.repo.get(deployment_id)
            if row is None:
                return None
            if change(row) is False:
                return row
            await self.repo.save(row)
            self._remember(row)
            return row

    async def owned(self, user_id: str, deployment_id: str) -> Deployment:
        """The caller's deployment; another user's looks exactly like a missing one."""
        row = await self.repo.get_for_user(user_id, deployment_id) if deployment_id else None
        if row is None:
            raise NotFound(f"Deployment {deployment_id!r} was not found", reason="DEPLOYMENT_NOT_FOUND")
        return row

    # -- create -----------------------------------------------------------------------------

    async def create(self, user_id: str, request: deployment_pb2.CreateDeploymentRequest) -> tuple[str, str]:
        """Validate, package, place and persist; the rollout runs in the background."""
        if len(request.request_id) > 255:
            raise InvalidArgument(
                "Invalid request",
                field_violations=[FieldViolation("request_id", "must be at most 255 characters")],
            )
        valid = validate_manifest(request.manifest, source_size=self._source_size(request))
        if request.request_id:
            existing = await self.repo.get_by_request_id(user_id, request.request_id)
            if existing is not None:
                return existing.id, existing.status
        if await self.repo.get_by_name(user_id, valid.name) is not None:
            raise AlreadyExists(
                f"A deployment named {valid.name!r} already exists",
                reason=NAME_TAKEN,
                metadata={"name": valid.name},
            )
        package, source_sha256 = await self._build_with_source(
            user_id, valid, request.source_tar_gz, request.source_sha256
        )
        deployment_id = new_id()
        placement = await self._place(user_id, valid.replica_request(), valid.replicas, seed=deployment_id)
        spec = deployment_pb2.DeploymentManifest()
        spec.CopyFrom(request.manifest)
        spec.ClearField("env")
        now = utcnow()
        health = valid.health_check
        meta: dict[str, Any] = {
            "spec": json_format.MessageToDict(spec, preserving_proto_field_name=True),
            "env_sealed": self._vault.encrypt_str(
                json.dumps(dict(valid.env)), owner=deployment_id, purpose=ENV_PURPOSE
            ),
            "package_sha256": package.sha256,
            "source_sha256": source_sha256,
            "placement": [
                json_format.MessageToDict(e, preserving_proto_field_name=True)
                for e in placement.explanations(max_rejected=MAX_STORED_REJECTED)
            ],
            "resources": {
                "cpu_cores": valid.cpu_cores,
                "memory_mb": valid.memory_mb,
                "disk_mb": valid.disk_mb,
            },
            "atomic": valid.atomic,
            "startup_seconds": health.interval_seconds * health.retries + health.timeout_seconds,
            "version": 1,
            "generation": len(placement.selected),
            "message": "placed",
        }
        row = Deployment(
            id=deployment_id,
            user_id=user_id,
            name=valid.name,
            app_type=valid.app_type,
            status=PENDING,
            manifest=meta,
            node_assignments=[],
            current_replicas=0,
            desired_replicas=valid.replicas,
            endpoints=[],
            request_id=request.request_id or None,
            created_at=now,
            updated_at=now,
        )
        _set_assignments(
            row,
            [
                {
                    "replica_index": index,
                    "node_id": choice.node_id,
                    "generation": index + 1,
                    "status": R_PENDING,
                    "endpoint": "",
                    "error_message": "",
                    "started_at": None,
                }
                for index, choice in enumerate(placement.selected)
            ],
        )
        try:
            await self.repo.create(
                row, DeploymentPackage(sha256=package.sha256, data=b"", size=package.size, created_at=now)
            )
        except RequestIdTaken:
            existing = await self.repo.get_by_request_id(user_id, request.request_id)
            assert existing is not None
            return existing.id, existing.status
        self._remember(row)
        log.info("deployment %s (%s) placed on %s", deployment_id, valid.name, ", ".join(placement.node_ids))
        self._start_rollout(deployment_id, list(range(valid.replicas)), initial=True)
        return deployment_id, PENDING

    # -- packages ---------------------------------------------------------------------------

    @staticmethod
    def _source_size(
        request: deployment_pb2.CreateDeploymentRequest | deployment_pb2.UpdateDeploymentRequest,
    ) -> int:
        """What the manifest validator checks as the source's size: the inline bytes' length
        (at most 10 MiB), or 1 for an uploaded source (its own limit was checked at upload)."""
        if request.source_sha256 and not request.source_tar_gz:
            return 1
        return len(request.source_tar_gz)

    async def _build(self, user_id: str, valid: Any, inline: bytes, source_sha256: str) -> Stored:
        """The package of ``valid`` from the inline source or the user's uploaded one, built in a
        worker thread straight to disk (by digest); the inline source is kept as an upload too."""
        package, _ = await self._build_with_source(user_id, valid, inline, source_sha256)
        return package

    async def _build_with_source(
        self, user_id: str, valid: Any, inline: bytes, source_sha256: str
    ) -> tuple[Stored, str]:
        """:meth:`_build`, and the digest of the source it was built from."""
        if inline and source_sha256:
            raise InvalidArgument(
                "Give the source either inline or by digest, not both",
                field_violations=[
                    FieldViolation("source_sha256", "must be empty when source_tar_gz is given")
                ],
            )
        if inline:
            source = await self.packages.receive_bytes(user_id, inline)
        else:
            digest = source_sha256.strip().lower()
            if not is_sha256(digest):
                raise InvalidArgument(
                    "Invalid source digest",
                    field_violations=[FieldViolation("source_sha256", "must be 64 hexadecimal characters")],
                )
            found = self.packages.source(user_id, digest)
            if found is None:
                raise NotFound(
                    f"Source {digest} was not found: upload it first (UploadSource)",
                    reason="SOURCE_NOT_FOUND",
                )
            source = found
        sha256, size, path = await asyncio.to_thread(
            build_package_file,
            valid,
            source.path,
            self.packages.new_sink(),
            self.packages.packages_dir,
            limits=self._package_limits,
        )
        return Stored(sha256, size, path), source.sha256

    async def _package_file(self, sha256: str) -> Stored | None:
        """The package ``sha256`` on disk (written out from the store if an older version kept
        its bytes in the row); None if it is unknown."""
        found = self.packages.package(sha256)
        if found is not None:
            return found
        row = await self.repo.get_package(sha256)
        if row is None or not row.data:
            return None
        return await self.packages.put_package_bytes(sha256, bytes(row.data))

    def may_fetch(self, node_id: str, sha256: str) -> bool:
        """Whether ``node_id`` may download package ``sha256``: it was sent a replica of it, or
        holds (or is being given) a replica of a deployment that has it as a version."""
        if (node_id, sha256) in self._granted:
            return True
        for deployment_id, known in self._index.items():
            if sha256 not in known.packages:
                continue
            if any(a["node_id"] == node_id and a["status"] in ACTIVE for a in known.assignments.values()):
                return True
            if any(key[0] == deployment_id and target[0] == node_id for key, target in self._surging.items()):
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

    # -- rollout ------------------------------------------------------------------------------

    def _start_rollout(self, deployment_id: str, indexes: list[int], *, initial: bool) -> None:
        self._rolling.add(deployment_id)
        self._spawn(self._rollout(deployment_id, indexes, initial=initial))

    async def _rollout(self, deployment_id: str, indexes: list[int], *, initial: bool) -> None:
        """Deploy ``indexes`` in parallel; then running, or failed and rolled back."""
        try:

            def deploying(row: Deployment) -> bool:
                if initial and row.status == PENDING:
                    row.status = DEPLOYING
                    return True
                return False

            row = await self._mutate(deployment_id, deploying)
            if row is None or row.status in (FAILED, STOPPED):
                return
            self._publish(row, f"deploying {len(indexes)} replica(s)")
            tasks = [
                asyncio.create_task(self._deploy_replica(deployment_id, i, exclude=set())) for i in indexes
            ]
            timed_out: list[int] = []
            try:
                _, pending = (
                    await asyncio.wait(tasks, timeout=self._rollout_deadline) if tasks else (set(), set())
                )
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
            await self._finish_rollout(deployment_id, indexes, timed_out, initial=initial)
        finally:
            self._rolling.discard(deployment_id)

    async def _finish_rollout(
        self, deployment_id: str, indexes: list[int], timed_out: list[int], *, initial: bool
    ) -> None:
        to_stop: list[Assignment] = []
        message = ""

        def finish(row: Deployment) -> None:
            nonlocal message
            meta = _meta(row)
            assignments = _assignments(row)
            for a in assignments:
                if int(a["replica_index"]) in timed_out and a["status"] in (R_PENDING, R_STARTING):
                    a["status"] = R_FAILED
                    a["error_message"] = "rollout deadline passed before the replica was healthy"
                    to_stop.append(dict(a))
            targeted = [a for a in assignments if int(a["replica_index"]) in indexes]
            running = [a for a in assignments if a["status"] == R_RUNNING]
            failed_any = any(a["status"] != R_RUNNING for a in targeted)
            if initial and (not running or (meta.get("atomic") and failed_any)):
                reasons = _failure_summary(targeted)
                for a in assignments:
                    if a["status"] in ACTIVE:
                        to_stop.append(dict(a))
                        a["status"] = R_STOPPED
                        a["endpoint"] = ""
                row.status = FAILED
                message = "rollout failed, rolled back: " + reasons
            else:
                row.status = RUNNING if running else FAILING
                if row.deployed_at is None and running:
                    row.deployed_at = utcnow()
                missing = row.desired_replicas - len(running)
                message = f"{len(running)} of {row.desired_replicas} replicas running" + (
                    f" (the reconciler keeps trying: {_failure_summary(targeted)})" if missing > 0 else ""
                )
            meta["message"] = message
            row.manifest = meta
            _set_assignments(row, assignments)

        row = await self._mutate(deployment_id, finish)
        if row is None:
            return
        log.info("deployment %s: %s", deployment_id, message)
        self._publish(row, message)
        if row.status == FAILED:
            await self.alerts.add(
                row.user_id, ROLLOUT_FAILED, f"deployment {row.name}: {message}", deployment_id=row.id
            )
        await self._stop_all(deployment_id, to_stop)

    async def _send_deploy(
        self, node_id: str, command: node_pb2.NodeCommand, wait_seconds: float
    ) -> tuple[str, str]:
        """Send a DeployReplica and wait for the node: (endpoint, "") or ("", the reason it failed)."""
        try:
            result = await self._fleet.streams.send_command(node_id, command, wait_seconds)
        except ControllerError as exc:
            return "", exc.message
        if not result.ok:
            return "", redact(result.error_message) or "the node refused the replica"
        try:
            payload = json.loads(result.payload or b"{}")
        except ValueError:
            return "", "the node answered with a malformed payload"
        return (str(payload.get("endpoint", "")) if isinstance(payload, dict) else ""), ""

    def _deploy_deadline(self, meta: dict[str, Any]) -> float:
        return float(meta.get("startup_seconds", 30)) + self._deploy_margin

    async def _deploy_replica(
        self, deployment_id: str, index: int, *, exclude: set[str], reuse: bool = True
    ) -> bool:
        """Try replica ``index`` on up to :data:`MAX_ATTEMPTS_PER_REPLICA` nodes; True once healthy."""
        key = (deployment_id, index)
        self._inflight.add(key)
        try:
            for attempt in range(MAX_ATTEMPTS_PER_REPLICA):
                if self._closing:
                    return False
                prepared = await self._prepare_attempt(
                    deployment_id, index, exclude, reuse=reuse and attempt == 0
                )
                if prepared is None:
                    return False
                node_id, generation, command, deadline = prepared
                endpoint, error = await self._send_deploy(node_id, command, deadline)
                if not error:
                    if await self._mark_running(deployment_id, index, node_id, generation, endpoint):
                        self._retry.pop(key, None)
                        return True
                    # Moved or deleted meanwhile: the replica just started must not run.
                    self._spawn(self._stop(node_id, deployment_id, index, generation))
                    return False
                await self._mark_failed(deployment_id, index, node_id, generation, f"node {node_id}: {error}")
                self._spawn(self._stop(node_id, deployment_id, index, generation))
                exclude.add(node_id)
            self._note_retry(key)
            return False
        finally:
            self._inflight.discard(key)

    def _note_retry(self, key: tuple[str, int]) -> None:
        _, delay = self._retry.get(key, (0.0, RETRY_BACKOFF_MIN_SECONDS / 2))
        delay = min(RETRY_BACKOFF_MAX_SECONDS, delay * 2)
        self._retry[key] = (self._clock() + delay, delay)

    async def _prepare_attempt(
        self, deployment_id: str, index: int, exclude: set[str], *, reuse: bool
    ) -> tuple[str, int, node_pb2.NodeCommand, float] | None:
        """Choose the node and generation of the next attempt and record them (status starting)."""
        async with self._locks[deployment_id]:
            row = await self.repo.get(deployment_id)
            if row is None:
                return None
            meta = _meta(row)
            assignments = _assignments(row)
            current = _find(assignments, index)
            if current is None or row.status in (FAILED, STOPPED):
                return None
            if current["status"] in (R_RUNNING, R_UNHEALTHY):
                return None  # already there (another path deployed it meanwhile)
            node_id = str(current["node_id"])
            usable = (
                node_id not in exclude
                and self._fleet.streams.get(node_id) is not None
                and self._fleet.state_of(node_id) in (NodeState.READY, NodeState.BUSY)
            )
            if not (reuse and usable):
                others = [a for a in assignments if a is not current and a["status"] in ACTIVE]
                try:
                    placement = await self._place(
                        row.user_id,
                        _request_of(meta),
                        1,
                        seed=f"{deployment_id}|{index}|{meta['generation']}",
                        hosting=[str(a["node_id"]) for a in others],
                        exclude=exclude,
                        skip=(deployment_id, index),
                    )
                except ControllerError as exc:
                    previous = str(current.get("error_message") or "")
                    error = f"{previous}; no other node: {exc.message}" if previous else exc.message
                    current.update(status=R_FAILED, endpoint="", error_message=error)
                    _set_assignments(row, assignments)
                    await self.repo.save(row)
                    self._remember(row)
                    self._publish(row, f"replica {index} cannot be placed", current)
                    return None
                node_id = placement.node_ids[0]
            if current["status"] == R_PENDING and current["node_id"] == node_id:
                generation = int(current["generation"])
            else:
                generation = int(meta["generation"]) + 1
                meta["generation"] = generation
            current.update(
                node_id=node_id,
                generation=generation,
                status=R_STARTING,
                endpoint="",
                error_message="",
                version=int(meta.get("version", 1)),
            )
            row.manifest = meta
            _set_assignments(row, assignments)
            await self.repo.save(row)
            self._remember(row)
            package = await self._package_file(str(meta["package_sha256"]))
            if package is None:  # cannot happen: packages are never deleted
                raise RuntimeError(
                    f"package {meta['package_sha256']} of deployment {deployment_id} is missing"
                )
            self._granted.add((node_id, package.sha256))
            env = json.loads(
                self._vault.decrypt_str(str(meta["env_sealed"]), owner=deployment_id, purpose=ENV_PURPOSE)
            )
        self._publish(row, f"replica {index} starting on node {node_id}", current)
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
        deadline = self._deploy_deadline(meta) + package.size / PACKAGE_BYTES_PER_SECOND
        return node_id, generation, command, deadline

    async def _mark_running(
        self, deployment_id: str, index: int, node_id: str, generation: int, endpoint: str
    ) -> bool:
        applied = False
        changed: Assignment = {}

        def change(row: Deployment) -> bool:
            nonlocal applied, changed
            assignments = _assignments(row)
            a = _find(assignments, index)
            if a is None or a["node_id"] != node_id or int(a["generation"]) != generation:
                return False
            a.update(status=R_RUNNING, endpoint=endpoint, error_message="", started_at=utcnow().isoformat())
            if row.status in (RUNNING, FAILING):
                row.status = RUNNING
                if row.deployed_at is None:
                    row.deployed_at = utcnow()
            _set_assignments(row, assignments)
            applied, changed = True, a
            return True

        row = await self._mutate(deployment_id, change)
        if row is not None and applied:
            self._publish(row, f"replica {index} running on node {node_id} at {endpoint}", changed)
        return applied

    async def _mark_failed(
        self, deployment_id: str, index: int, node_id: str, generation: int, error: str
    ) -> None:
        changed: Assignment = {}
        error = redact(error)  # a replica's output: untrusted

        def change(row: Deployment) -> bool:
            nonlocal changed
            assignments = _assignments(row)
            a = _find(assignments, index)
            if a is None or a["node_id"] != node_id or int(a["generation"]) != generation:
                return False
            a.update(status=R_FAILED, endpoint="", error_message=error)
            _set_assignments(row, assignments)
            changed = a
            return True

        row = await self._mutate(deployment_id, change)
        log.warning("deployment %s replica %d failed: %s", deployment_id, index, error)
        if row is not None and changed:
            self._publish(row, f"replica {index} failed: {error}", changed)

    async def _stop(self, node_id: str, deployment_id: str, index: int, generation: int) -> bool:
        """StopReplica on ``node_id``; False if the node could not be told."""
        command = node_pb2.NodeCommand(
            stop_replica=node_pb2.StopReplica(
                deployment_id=deployment_id, replica_index=index, generation=generation
            )
        )
        try:
            result = await self._fleet.streams.send_command(node_id, command, STOP_TIMEOUT_SECONDS)
        except ControllerError as exc:
            log.info(
                "could not stop replica %s/%d on node %s: %s", deployment_id, index, node_id, exc.message
            )
            return False
        if not result.ok:
            log.info("node %s refused to stop %s/%d: %s", node_id, deployment_id, index, result.error_message)
        return result.ok

    async def _remove_files(self, node_id: str, deployment_id: str) -> bool:
        """RemoveDeployment on ``node_id``: its replicas of the deleted deployment stopped and
        their directories removed; False if the node could not be told or failed."""
        command = node_pb2.NodeCommand(
            remove_deployment=node_pb2.RemoveDeployment(deployment_id=deployment_id)
        )
        try:
            result = await self._fleet.streams.send_command(node_id, command, STOP_TIMEOUT_SECONDS)
        except ControllerError as exc:
            log.info("could not remove deployment %s from node %s: %s", deployment_id, node_id, exc.message)
            return False
        if not result.ok:
            log.warning(
                "node %s could not remove deployment %s: %s", node_id, deployment_id, result.error_message
            )
        return result.ok

    async def _drain_then_stop(self, deployment_id: str, assignments: list[Assignment]) -> None:
        """Stop replicas that no longer get traffic, after the drain time (their endpoints
        left the ingress when the deployment was stored without them)."""
        keys = {
            (str(a["node_id"]), deployment_id, int(a["replica_index"]), int(a["generation"]))
            for a in assignments
        }
        if assignments and self.drain_seconds > 0:
            self._draining |= keys
            try:
                await asyncio.sleep(self.drain_seconds)
            finally:
                self._draining -= keys
        await self._stop_all(deployment_id, assignments)

    async def _stop_all(self, deployment_id: str, assignments: Iterable[Assignment]) -> None:
        await asyncio.gather(
            *(
                self._stop(str(a["node_id"]), deployment_id, int(a["replica_index"]), int(a["generation"]))
                for a in assignments
            )
        )

    # -- read -----------------------------------------------------------------------------------

    @staticmethod
    def _assignment_proto(a: Assignment) -> deployment_pb2.NodeAssignment:
        started = a.get("started_at")
        return deployment_pb2.NodeAssignment(
            node_id=str(a["node_id"]),
            replica_index=int(a["replica_index"]),
            status=str(a["status"]),
            started_at=timestamp(datetime.fromisoformat(started)) if started else None,
            error_message=str(a.get("error_message") or ""),
            generation=int(a["generation"]),
            endpoint=str(a.get("endpoint") or ""),
        )

    def to_proto(self, row: Deployment) -> deployment_pb2.Deployment:
        meta = row.manifest
        manifest = json_format.ParseDict(meta.get("spec", {}), deployment_pb2.DeploymentManifest())
        manifest.replicas = row.desired_replicas  # scaling changes it after the manifest was given
        with_effective_values(manifest)  # what runs: defaults filled in, not zeros
        return deployment_pb2.Deployment(
            id=row.id,
            user_id=row.user_id,
            name=row.name,
            app_type=manifest.app_type,
            status=STATUS_ENUM.get(row.status, deployment_pb2.DEPLOYMENT_STATUS_UNSPECIFIED),
            manifest=manifest,
            node_assignments=[self._assignment_proto(a) for a in row.node_assignments],
            current_replicas=row.current_replicas,
            desired_replicas=row.desired_replicas,
            endpoints=list(row.endpoints),
            placement=[
                json_format.ParseDict(e, deployment_pb2.PlacementExplanation())
                for e in meta.get("placement", [])
            ],
            created_at=timestamp(row.created_at),
            updated_at=timestamp(row.updated_at),
            deployed_at=timestamp(row.deployed_at),
            last_scaled_at=timestamp(row.last_scaled_at),
            package_sha256=str(meta.get("package_sha256", "")),
            version=int(meta.get("version", 1)),
        )

    def resolve(self, row: Deployment) -> deployment_pb2.ResolveEndpointResponse:
        """The endpoint for the next request: two random choices among healthy replicas."""
        targets = []
        for a in row.node_assignments:
            state = self._fleet.state_of(a["node_id"])
            live = self._fleet.live.get(a["node_id"])
            targets.append(
                ReplicaTarget(
                    node_id=a["node_id"],
                    endpoint=a.get("endpoint") or "",
                    healthy=a["status"] == R_RUNNING
                    and bool(a.get("endpoint"))
                    and (state is None or is_routable(state)),
                    active_requests=live.metrics.active_requests if live else 0,
                    replica_index=int(a["replica_index"]),
                )
            )
        chosen = pick_endpoint(targets, self._rng)
        return deployment_pb2.ResolveEndpointResponse(
            endpoint=chosen.endpoint, node_id=chosen.node_id, replica_index=chosen.replica_index
        )

    async def watch(self, row: Deployment) -> AsyncIterator[deployment_pb2.WatchDeploymentResponse]:
        """Progress events of ``row`` until it is deleted or the server drains."""
        queue: asyncio.Queue[deployment_pb2.WatchDeploymentResponse | None] = asyncio.Queue(WATCH_QUEUE_SIZE)
        self._watchers[row.id].add(queue)
        try:
            yield deployment_pb2.WatchDeploymentResponse(
                time=timestamp(utcnow()),
                status=STATUS_ENUM.get(row.status, deployment_pb2.DEPLOYMENT_STATUS_UNSPECIFIED),
                message=str(row.manifest.get("message", "")),
            )
            if self._closing:
                return
            while (event := await queue.get()) is not None:
                yield event
        finally:
            watchers = self._watchers.get(row.id)
            if watchers is not None:
                watchers.discard(queue)
                if not watchers:
                    self._watchers.pop(row.id, None)

    # -- delete and scale ---------------------------------------------------------------------

    async def delete(self, row: Deployment) -> None:
        """Stop every replica (waiting for the nodes, bounded), remove the replicas' directories
        on their nodes (RemoveDeployment), then delete the deployment."""
        async with self._locks[row.id]:
            fresh = await self.repo.get(row.id)
            if fresh is None:
                return
            assignments = [
                a for a in fresh.node_assignments if a["status"] in ACTIVE or a["status"] == R_FAILED
            ]
            nodes = sorted({str(a["node_id"]) for a in fresh.node_assignments if a.get("node_id")})
            fresh.status = STOPPED
            await self.repo.save(fresh)
            self._index.pop(row.id, None)
            if self.on_change is not None:
                self.on_change(row.id, None)
            self._publish(fresh, "deleting: stopping every replica")
        await self._stop_all(row.id, assignments)
        # then the replicas' directories on every node that held one; a node that is away now
        # is told when it reports the deployment's replicas again (on_replicas_reported)
        await asyncio.gather(*(self._remove_files(node, row.id) for node in nodes))
        async with self._locks[row.id]:
            await self.repo.delete(row.id)
            self._index.pop(row.id, None)
        self._locks.pop(row.id, None)
        self._end_watch(row.id)
        log.info("deployment %s deleted", row.id)

    async def scale(self, row: Deployment, replicas: int) -> Deployment:
        """Scale to ``replicas``: up places new replicas on nodes not hosting it; down stops the highest."""
        if not 1 <= replicas <= MAX_REPLICAS:
            raise InvalidArgument(
                "Invalid replica count",
                field_violations=[FieldViolation("replicas", f"must be between 1 and {MAX_REPLICAS}")],
            )
        added: list[int] = []
        removed: list[Assignment] = []
        async with self._locks[row.id]:
            fresh = await self.repo.get(row.id)
            if fresh is None:
                raise NotFound(f"Deployment {row.id!r} was not found", reason="DEPLOYMENT_NOT_FOUND")
            meta = _meta(fresh)
            assignments = _assignments(fresh)
            have = fresh.desired_replicas
            if replicas > have:
                others = [a for a in assignments if a["status"] in ACTIVE]
                placement = await self._place(
                    fresh.user_id,
                    _request_of(meta),
                    replicas - have,
                    seed=f"{fresh.id}|scale|{meta['generation']}",
                    hosting=[str(a["node_id"]) for a in others],
                )
                for offset, node_id in enumerate(placement.node_ids):
                    meta["generation"] = int(meta["generation"]) + 1
                    index = have + offset
                    added.append(index)
                    assignments.append(
                        {
                            "replica_index": index,
                            "node_id": node_id,
                            "generation": meta["generation"],
                            "status": R_PENDING,
                            "endpoint": "",
                            "error_message": "",
                            "started_at": None,
                        }
                    )
                if fresh.status in (RUNNING, FAILING, FAILED):
                    fresh.status = SCALING
            elif replicas < have:
                removed = [a for a in assignments if int(a["replica_index"]) >= replicas]
                assignments = [a for a in assignments if int(a["replica_index"]) < replicas]
                for index in range(replicas, have):
                    self._retry.pop((fresh.id, index), None)
            meta["message"] = f"scaling from {have} to {replicas} replicas"
            fresh.manifest = meta
            fresh.desired_replicas = replicas
            fresh.last_scaled_at = utcnow()
            _set_assignments(fresh, assignments)
            await self.repo.save(fresh)
            self._remember(fresh)
        self._publish(fresh, str(meta["message"]))
        log.info("deployment %s: %s", fresh.id, meta["message"])
        if added:
            self._start_rollout(fresh.id, added, initial=False)
        if removed:
            self._spawn(self._drain_then_stop(fresh.id, [a for a in removed if a["status"] in ACTIVE]))
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
            return await self._masked_update(row, request, paths)
        manifest = deployment_pb2.DeploymentManifest()
        manifest.CopyFrom(request.manifest)
        return await self._update_to(row, manifest, request.source_tar_gz, request.source_sha256)

    async def _masked_update(
        self, row: Deployment, request: deployment_pb2.UpdateDeploymentRequest, paths: list[str]
    ) -> Deployment:
        """A partial update (AIP-134): the current manifest, env and source with the fields
        ``paths`` names taken from ``request``."""
        unknown = [p for p in paths if p not in UPDATE_MASK_PATHS]
        if unknown:
            raise InvalidArgument(
                "The update mask names unknown fields",
                reason="INVALID_UPDATE_MASK",
                field_violations=[
                    FieldViolation(
                        "update_mask",
                        f"unknown path {p!r}: use source_sha256, source_tar_gz, manifest or manifest.<field>",
                    )
                    for p in unknown
                ],
            )
        if "manifest.replicas" in paths:
            if set(paths) != {"manifest.replicas"}:
                raise InvalidArgument(
                    "manifest.replicas cannot change together with other fields",
                    reason="INVALID_UPDATE_MASK",
                    field_violations=[
                        FieldViolation("update_mask", "manifest.replicas is a scale: give it alone")
                    ],
                )
            return await self.scale(row, request.manifest.replicas)
        meta = _meta(row)
        manifest = json_format.ParseDict(
            dict(meta.get("spec") or {}), deployment_pb2.DeploymentManifest(), ignore_unknown_fields=True
        )
        manifest.env.update(
            json.loads(self._vault.decrypt_str(str(meta["env_sealed"]), owner=row.id, purpose=ENV_PURPOSE))
        )
        for path in paths:
            if path.startswith("manifest"):
                _apply_mask_path(manifest, request.manifest, path.split(".")[1:])
        inline = request.source_tar_gz if "source_tar_gz" in paths else b""
        digest = request.source_sha256 if "source_sha256" in paths else ""
        if {"source_tar_gz", "source_sha256"} & set(paths):
            if not inline and not digest:
                raise InvalidArgument(
                    "The update mask names the source but none was given",
                    field_violations=[FieldViolation("source_sha256", "is required by the update mask")],
                )
            return await self._update_to(row, manifest, inline, digest)
        if meta.get("source_sha256"):
            return await self._update_to(row, manifest, b"", str(meta["source_sha256"]))
        if set(paths) == {"manifest.env"}:  # the package holds no env: the current one serves
            return await self._update_to(row, manifest, b"", "", package_sha256=str(meta["package_sha256"]))
        raise FailedPrecondition(
            "This deployment's source is not recorded (it predates partial updates): "
            "give the source with the change (update_mask source_sha256)",
            reason="SOURCE_REQUIRED",
        )

    async def _update_to(
        self,
        row: Deployment,
        manifest: deployment_pb2.DeploymentManifest,
        inline: bytes,
        source_sha256: str,
        *,
        package_sha256: str = "",
    ) -> Deployment:
        """Validate ``manifest``, build its package (or keep ``package_sha256``) and start the
        rolling update to it."""
        if not manifest.name:
            manifest.name = row.name
        if manifest.name != row.name:
            raise InvalidArgument(
                "A deployment cannot be renamed",
                field_violations=[FieldViolation("manifest.name", f"must be {row.name!r} (or empty)")],
            )
        source_size = len(inline) if inline else (1 if source_sha256 or package_sha256 else 0)
        valid = validate_manifest(manifest, source_size=source_size)
        if package_sha256:
            package: Stored | None = None
            source_digest = ""
        else:
            package, source_digest = await self._build_with_source(row.user_id, valid, inline, source_sha256)
            package_sha256 = package.sha256
        spec = deployment_pb2.DeploymentManifest()
        spec.CopyFrom(manifest)
        spec.ClearField("env")
        spec.replicas = row.desired_replicas
        health = valid.health_check
        record: dict[str, Any] = {
            "spec": json_format.MessageToDict(spec, preserving_proto_field_name=True),
            "env_sealed": self._vault.encrypt_str(
                json.dumps(dict(valid.env)), owner=row.id, purpose=ENV_PURPOSE
            ),
            "package_sha256": package_sha256,
            "source_sha256": source_digest,
            "resources": {
                "cpu_cores": valid.cpu_cores,
                "memory_mb": valid.memory_mb,
                "disk_mb": valid.disk_mb,
            },
            "startup_seconds": health.interval_seconds * health.retries + health.timeout_seconds,
            "atomic": valid.atomic,
        }
        if package is not None:
            await self.repo.add_package(
                DeploymentPackage(sha256=package.sha256, data=b"", size=package.size, created_at=utcnow())
            )
        return await self._begin_versioned_rollout(row.id, record=record, target=None)

    async def rollback(self, row: Deployment, version: int) -> Deployment:
        """Roll back to ``version`` (0: the previous good version), one replica at a time."""
        return await self._begin_versioned_rollout(row.id, record=None, target=version)

    async def _begin_versioned_rollout(
        self, deployment_id: str, *, record: dict[str, Any] | None, target: int | None
    ) -> Deployment:
        async with self._locks[deployment_id]:
            fresh = await self.repo.get(deployment_id)
            if fresh is None:
                raise NotFound(f"Deployment {deployment_id!r} was not found", reason="DEPLOYMENT_NOT_FOUND")
            if fresh.status not in (RUNNING, FAILING) or deployment_id in self._rolling:
                raise FailedPrecondition(
                    f"The deployment is {fresh.status}: wait until it is running",
                    reason="DEPLOYMENT_BUSY",
                    metadata={"status": fresh.status},
                )
            meta = _meta(fresh)
            versions = {str(k): dict(v) for k, v in meta.get("versions", {}).items()}
            current = int(meta.get("version", 1))
            versions.setdefault(str(current), {key: meta[key] for key in VERSION_KEYS if key in meta})
            if record is not None:
                goal = max(int(v) for v in versions) + 1
                versions[str(goal)] = record
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
            fresh.manifest = meta
            fresh.status = DEPLOYING
            await self.repo.save(fresh)
            self._remember(fresh)
            self._rolling.add(deployment_id)
        self._publish(fresh, str(meta["message"]))
        log.info("deployment %s: %s", deployment_id, meta["message"])
        self._spawn(self._rolling_update(deployment_id, goal, current, earlier))
        return fresh

    async def _rolling_update(self, deployment_id: str, goal: int, previous: int, earlier: int) -> None:
        """Replace every replica with version ``goal``; on a failure, go back to ``previous``
        (whose own previous version was ``earlier``)."""
        try:
            row = await self.repo.get(deployment_id)
            if row is None:
                return
            done: list[int] = []
            for index in sorted(int(a["replica_index"]) for a in row.node_assignments):
                error = await self._replace_replica(deployment_id, index, goal)
                if error is None:
                    done.append(index)
                    continue
                message = f"version {goal}: replica {index} was not healthy ({error}); reverted to version {previous}"
                await self._switch_version(deployment_id, previous, earlier)
                for undo in done:
                    await self._replace_replica(deployment_id, undo, previous)
                await self._end_versioned_rollout(deployment_id, message)
                await self.alerts.add(
                    row.user_id,
                    UPDATE_REVERTED,
                    f"deployment {row.name}: {message}",
                    deployment_id=deployment_id,
                )
                return
            await self._end_versioned_rollout(deployment_id, f"now at version {goal}")
        finally:
            self._rolling.discard(deployment_id)

    async def _switch_version(self, deployment_id: str, version: int, previous: int) -> None:
        def switch(row: Deployment) -> None:
            meta = _meta(row)
            meta.update(meta["versions"][str(version)])
            meta["version"] = version
            meta["previous_version"] = previous
            row.manifest = meta

        await self._mutate(deployment_id, switch)

    async def _end_versioned_rollout(self, deployment_id: str, message: str) -> None:
        def end(row: Deployment) -> None:
            meta = _meta(row)
            meta["message"] = message
            row.manifest = meta
            row.status = RUNNING if row.current_replicas > 0 else FAILING

        row = await self._mutate(deployment_id, end)
        if row is not None:
            log.info("deployment %s: %s", deployment_id, message)
            self._publish(row, message)

    async def _replace_replica(self, deployment_id: str, index: int, version: int) -> str | None:
        """Start replica ``index`` at ``version`` beside the old one, then switch; None or the error."""
        async with self._locks[deployment_id]:
            row = await self.repo.get(deployment_id)
            if row is None:
                return None
            meta = _meta(row)
            assignments = _assignments(row)
            old = _find(assignments, index)
            if old is None:
                return None
            if int(old.get("version", 1)) == version and old["status"] == R_RUNNING:
                return None
            record = meta["versions"][str(version)]
            others = [a for a in assignments if a is not old and a["status"] in ACTIVE]
            try:
                node_id = (
                    await self._place(
                        row.user_id,
                        _request_of(record),
                        1,
                        seed=f"{deployment_id}|{index}|{meta['generation']}",
                        hosting=[str(a["node_id"]) for a in others],
                        exclude={str(old["node_id"])},
                    )
                ).node_ids[0]
            except ControllerError:
                node_id = str(old["node_id"])  # no room beside it: replace in place
            generation = int(meta["generation"]) + 1
            meta["generation"] = generation
            row.manifest = meta
            await self.repo.save(row)
            self._remember(row)
            self._surging[(deployment_id, index)] = (node_id, generation)
            package = await self._package_file(str(record["package_sha256"]))
            if package is not None:
                self._granted.add((node_id, package.sha256))
            env = json.loads(
                self._vault.decrypt_str(str(record["env_sealed"]), owner=deployment_id, purpose=ENV_PURPOSE)
            )
        if package is None:
            self._surging.pop((deployment_id, index), None)
            return f"package {record['package_sha256']} is missing"
        self._publish(row, f"replica {index}: starting version {version} on node {node_id}")
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
        endpoint, error = await self._send_deploy(
            node_id, command, self._deploy_deadline(record) + package.size / PACKAGE_BYTES_PER_SECOND
        )
        if error:
            self._surging.pop((deployment_id, index), None)
            self._spawn(self._stop(node_id, deployment_id, index, generation))
            if old["node_id"] == node_id:
                # In place, the agent stopped the old replica before starting the new one:
                # the old one is gone too, so the reconciler must start it again.
                await self._mark_failed(
                    deployment_id,
                    index,
                    node_id,
                    int(old["generation"]),
                    f"replaced by a failed version: {error}",
                )
            return f"node {node_id}: {error}"
        replaced: Assignment = {}

        def switch(row: Deployment) -> bool:
            nonlocal replaced
            assignments = _assignments(row)
            a = _find(assignments, index)
            if a is None:
                return False
            replaced = dict(a)
            a.update(
                node_id=node_id,
                generation=generation,
                status=R_RUNNING,
                endpoint=endpoint,
                error_message="",
                version=version,
                started_at=utcnow().isoformat(),
            )
            _set_assignments(row, assignments)
            return True

        updated = await self._mutate(deployment_id, switch)
        self._surging.pop((deployment_id, index), None)
        if not replaced:
            self._spawn(self._stop(node_id, deployment_id, index, generation))
            return None
        if replaced["node_id"] != node_id and replaced["status"] in ACTIVE:
            # Its endpoint left the ingress at the switch: stop it once its requests drained.
            self._spawn(self._drain_then_stop(deployment_id, [replaced]))
        if updated is not None:
            self._publish(updated, f"replica {index} at version {version} on node {node_id}")
        return None

    # -- recovery -----------------------------------------------------------------------------------

    async def on_node_failed(self, node_id: str, user_id: str) -> None:
        """The fleet's recovery hook: re-place every replica of the failed node elsewhere."""
        for deployment_id, known in list(self._index.items()):
            if known.user_id != user_id:
                continue
            # Replicas being deployed right now are left to their rollout: the send to the
            # failed node fails and the rollout moves them to another node by itself.
            lost = [
                index
                for index, a in known.assignments.items()
                if a["node_id"] == node_id
                and a["status"] in (R_RUNNING, R_UNHEALTHY)
                and (deployment_id, index) not in self._inflight
            ]
            if not lost:
                continue

            def drop(row: Deployment, lost: list[int] = lost) -> bool:
                assignments = _assignments(row)
                for a in assignments:
                    if int(a["replica_index"]) in lost and a["node_id"] == node_id:
                        a.update(status=R_LOST, endpoint="", error_message=f"node {node_id} failed")
                _set_assignments(row, assignments)
                if row.status == RUNNING and row.current_replicas == 0:
                    row.status = FAILING
                return True

            row = await self._mutate(deployment_id, drop)
            if row is None or row.status in (FAILED, STOPPED):
                continue
            self._publish(row, f"node {node_id} failed: re-placing {len(lost)} replica(s)")
            for index in lost:
                self._inflight.add((deployment_id, index))
                self._spawn(self._recover(user_id, deployment_id, index, node_id))

    async def _recovery_slot(self, user_id: str) -> None:
        """Wait for the user's next recovery slot (token bucket: rate and burst)."""
        now = self._clock()
        interval = 1.0 / self._recovery_rate
        earliest = now - (RECOVERY_BURST - 1) * interval
        at = max(self._recovery_next.get(user_id, earliest), earliest)
        self._recovery_next[user_id] = at + interval
        if at - now > 1e-9:
            await asyncio.sleep(at - now)

    async def _recover(self, user_id: str, deployment_id: str, index: int, failed_node: str) -> None:
        try:
            await self._recovery_slot(user_id)
            await self._deploy_replica(deployment_id, index, exclude={failed_node}, reuse=False)
        finally:
            self._inflight.discard((deployment_id, index))
        await self._settle(deployment_id)

    async def _settle(self, deployment_id: str) -> None:
        """After recovery or a reconciler retry: running if any replica is, else failing."""
        message = ""

        def settle(row: Deployment) -> bool:
            nonlocal message
            if row.status not in (RUNNING, FAILING, SCALING) or deployment_id in self._rolling:
                return False
            status = RUNNING if row.current_replicas > 0 else FAILING
            message = f"{row.current_replicas} of {row.desired_replicas} replicas running"
            if status == row.status:
                return False
            row.status = status
            return True

        row = await self._mutate(deployment_id, settle)
        if row is not None and message:
            self._publish(row, message)

    async def on_replicas_reported(
        self, node_id: str, replicas: Sequence[node_pb2.ReplicaState], complete: bool
    ) -> None:
        """A node's hello (``complete``) or heartbeat listed its replicas: fence and sync health."""
        if not self._loaded or self._closing:
            return
        now = self._clock()
        reported: set[tuple[str, int, int]] = set()
        for state in replicas:
            reported.add((state.deployment_id, state.replica_index, state.generation))
            if state.deployment_id not in self._index:
                # a deleted deployment (the node was away when it was deleted): stop its
                # replicas there and remove their directories
                key = (node_id, state.deployment_id, -1, -1)
                if now - self._stop_sent.get(key, -STOP_RESEND_SECONDS) >= STOP_RESEND_SECONDS:
                    self._stop_sent[key] = now
                    log.info("node %s holds deleted deployment %s: removing it", node_id, state.deployment_id)
                    self._spawn(self._remove_files(node_id, state.deployment_id))
                continue
            if state.status in ("stopped", "failed"):
                continue
            known = self._index.get(state.deployment_id)
            current = known.assignments.get(state.replica_index) if known else None
            if self._surging.get((state.deployment_id, state.replica_index)) == (node_id, state.generation):
                continue  # the new version's replica of a rolling update, not yet switched to
            if (node_id, state.deployment_id, state.replica_index, state.generation) in self._draining:
                continue  # out of the ingress, stopped once the drain time is over
            if (
                current is None
                or current["node_id"] != node_id
                or state.generation < int(current["generation"])
                or current["status"] not in ACTIVE
            ):
                key = (node_id, state.deployment_id, state.replica_index, state.generation)
                if now - self._stop_sent.get(key, -STOP_RESEND_SECONDS) >= STOP_RESEND_SECONDS:
                    self._stop_sent[key] = now
                    log.info(
                        "node %s runs stale replica %s/%d (generation %d): stopping it",
                        node_id,
                        state.deployment_id,
                        state.replica_index,
                        state.generation,
                    )
                    self._spawn(
                        self._stop(node_id, state.deployment_id, state.replica_index, state.generation)
                    )
                continue
            if state.generation != int(current["generation"]):
                continue
            if state.status == "running" and current["status"] == R_UNHEALTHY:
                await self._set_health(state.deployment_id, state.replica_index, node_id, state, R_RUNNING)
            elif state.status == "unhealthy" and current["status"] == R_RUNNING:
                await self._set_health(state.deployment_id, state.replica_index, node_id, state, R_UNHEALTHY)
        if complete:
            for deployment_id, known in list(self._index.items()):
                for index, a in known.assignments.items():
                    if (
                        a["node_id"] == node_id
                        and a["status"] in (R_RUNNING, R_UNHEALTHY)
                        and (deployment_id, index, int(a["generation"])) not in reported
                    ):
                        await self._mark_failed(
                            deployment_id,
                            index,
                            node_id,
                            int(a["generation"]),
                            f"node {node_id} reconnected without the replica",
                        )
        for state in replicas:
            if state.status == "failed":
                known = self._index.get(state.deployment_id)
                current = known.assignments.get(state.replica_index) if known else None
                if (
                    current is not None
                    and current["node_id"] == node_id
                    and int(current["generation"]) == state.generation
                    and current["status"] in (R_RUNNING, R_UNHEALTHY)
                ):
                    await self._mark_failed(
                        state.deployment_id,
                        state.replica_index,
                        node_id,
                        state.generation,
                        state.error_message or "the replica failed on its node",
                    )

    async def _set_health(
        self, deployment_id: str, index: int, node_id: str, state: node_pb2.ReplicaState, status: str
    ) -> None:
        changed: Assignment = {}

        def change(row: Deployment) -> bool:
            nonlocal changed
            assignments = _assignments(row)
            a = _find(assignments, index)
            if a is None or a["node_id"] != node_id or int(a["generation"]) != state.generation:
                return False
            a["status"] = status
            if state.endpoint:
                a["endpoint"] = state.endpoint
            _set_assignments(row, assignments)
            changed = a
            return True

        row = await self._mutate(deployment_id, change)
        if row is not None and changed:
            self._publish(row, f"replica {index} is {status}", changed)

    # -- reconcile ------------------------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("reconcile pass failed", exc_info=True)

    def _waiting_for_node(self, node_id: str) -> bool:
        """Whether a replica on ``node_id`` should wait: the node is known, not failed, not connected."""
        state = self._fleet.state_of(node_id)
        if state is None or state in (NodeState.FAILED, NodeState.REMOVED, NodeState.DRAINING):
            return False
        return self._fleet.streams.get(node_id) is None

    async def reconcile(self) -> None:
        """Compare desired and current state; resume rollouts, deploy missing replicas."""
        if self._closing:
            return
        now = self._clock()
        for stale, sent in list(self._stop_sent.items()):
            if now - sent >= STOP_RESEND_SECONDS:
                del self._stop_sent[stale]
        for listed in await self.repo.list_all():
            if listed.status in (FAILED, STOPPED) or listed.id in self._rolling:
                continue
            failed_nodes: set[str] = set()
            # Decide on a fresh row under the deployment's lock: a rollout ends (status
            # written) under this lock before it leaves ``_rolling``, so neither can be stale.
            async with self._locks[listed.id]:
                row = await self.repo.get(listed.id)
                if row is None or row.status in (FAILED, STOPPED) or row.id in self._rolling:
                    continue
                self._remember(row)
                assignments = _assignments(row)
                if row.status in (PENDING, DEPLOYING, SCALING):
                    todo = [a for a in assignments if a["status"] != R_RUNNING]
                    if any(self._waiting_for_node(a["node_id"]) for a in todo):
                        continue
                    log.info("deployment %s was %s: resuming its rollout", row.id, row.status)
                    self._start_rollout(
                        row.id, [int(a["replica_index"]) for a in todo], initial=row.status != SCALING
                    )
                    continue
                for a in assignments:
                    index = int(a["replica_index"])
                    key = (row.id, index)
                    if key in self._inflight:
                        continue
                    state = self._fleet.state_of(a["node_id"])
                    if a["status"] in (R_RUNNING, R_UNHEALTHY):
                        if state == NodeState.REMOVED or (
                            state == NodeState.FAILED and self._fleet.recovery_due(a["node_id"])
                        ):
                            failed_nodes.add(a["node_id"])
                        continue
                    if a["status"] in (R_PENDING, R_STARTING) and self._waiting_for_node(a["node_id"]):
                        continue
                    if self._retry.get(key, (0.0, 0.0))[0] > now:
                        continue
                    self._inflight.add(key)
                    self._spawn(self._retry_replica(row.id, index))
            # Failures the recovery hook missed (e.g. while the controller was down), held
            # and frozen exactly as the hook would be: see Fleet.recovery_due.
            for node_id in failed_nodes:
                await self.on_node_failed(node_id, row.user_id)

    async def _retry_replica(self, deployment_id: str, index: int) -> None:
        try:
            await self._deploy_replica(deployment_id, index, exclude=set())
        finally:
            self._inflight.discard((deployment_id, index))
        await self._settle(deployment_id)
