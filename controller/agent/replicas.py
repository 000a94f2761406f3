"""Replicas on the agent: run deployed apps as real processes, health-check them, stop them.

The controller sends ``deploy_replica``, ``stop_replica`` and ``remove_deployment``
commands; a :class:`ReplicaSupervisor` answers them (:func:`register_replica_handlers`)
and reports what runs in every hello and heartbeat (:meth:`ReplicaSupervisor.states`).

The supervisor is spread over modules along its seams:

* :mod:`~controller.agent.replica_spec` — ids, statuses, error kinds, the package's
  manifest (:class:`AppSpec`), a replica's argv and environment;
* :mod:`~controller.agent.replica_fencing` — fencing with generations;
* :mod:`~controller.agent.replica_health` — health timing and checks;
* :mod:`~controller.agent.replica_process` — process supervision: the launcher, logs,
  exit watching, stopping, directories and users, orphans;
* :mod:`~controller.agent.replica_start` — starting a replica (package, replace, port,
  process; steps 2 to 5 below) and stopping one;
* this module — the supervisor and its command handlers, which tie them together.

Deploying a replica (``deploy_replica``)
========================================

1. **Fencing** (see below): a stale generation is refused at once.
2. **Package**: the command names the package by SHA-256 and size; the
   :class:`~controller.agent.packages.PackageCache` fetches it over
   ``NodeService.FetchPackage`` unless it is cached already (once per digest, however
   many replicas wait for it), the SHA-256 is verified and the package is unpacked safely
   (:func:`controller.deployments.unpack_package`) into a fresh directory
   ``<data dir>/replicas/<deployment id>/<replica index>-g<generation>/`` (``app/``,
   ``Dockerfile``, ``manifest.json``, and the replica's log ``replica.log``). A bad
   package leaves the running generation alone.
3. **Replace**: a running lower generation of the same replica is stopped first.
4. **Port** (backends with an HTTP health check only; workers get none): the
   command's ``port`` if it is not 0, else the next free port of the agent's range
   (``--replica-port-range``, default 20000-29999), going round the range from a
   random start so that a port just freed is not handed out again at once. "Free"
   means it can be bound on all interfaces now; a port in use → ``ok=False``.
5. **Process**: the manifest's ``argv`` in the unpacked ``app/`` directory, as a
   real process in its own session (process group), with the environment of
   :mod:`~controller.agent.replica_spec` (argv by runtime, env), stdin ``/dev/null`` and
   its output in ``replica.log`` (:mod:`~controller.agent.replica_process`).
6. **Health** (:mod:`~controller.agent.replica_health`): the handler answers when the
   replica is healthy (``ok=True``, payload ``{"endpoint", "pid", "port",
   "generation", "status"}``) or when it failed (``ok=False``, payload
   ``{"error_kind": …}``, see :data:`ERROR_KINDS`).

"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from automator67.v1 import node_pb2

from controller.agent.handlers import CommandHandlers, error_result, ok_result
from controller.agent.packages import PackageCache
from controller.agent.replica_fencing import stale_reason
from controller.agent.replica_health import (
    http_health_check,
    startup_deadline_seconds,
)
from controller.agent.replica_process import (
    MAX_ERROR_CHARS,
    ReplicaInfo,
    _remove_dir,
    _Replica,
    launcher_prefix,
    port_is_free,
    reap_orphans,
    secure_leftovers,
)
from controller.agent.replica_spec import (
    _ID,
    ERROR_KINDS,
    FAILED,
    RUNNING,
    STARTING,
    STATUSES,
    STOPPED,
    UNHEALTHY,
    _check_ids,
    _Key,
    replica_env,
)
from controller.agent.replica_start import _ReplicaStarter
from controller.redact import redact

__all__ = [
    "DEFAULT_PORT_RANGE",
    "ERROR_KINDS",
    "FAILED",
    "RUNNING",
    "STATUSES",
    "STOPPED",
    "STOPPED_RETENTION_SECONDS",
    "STOP_GRACE_SECONDS",
    "UNHEALTHY",
    "ReplicaInfo",
    "ReplicaSupervisor",
    "http_health_check",
    "launcher_prefix",
    "port_is_free",
    "register_replica_handlers",
    "replica_env",
    "startup_deadline_seconds",
]

log = logging.getLogger(__name__)

DEFAULT_PORT_RANGE = (20000, 29999)
"""Ports handed to replicas when the command names none (inclusive)."""

STOP_GRACE_SECONDS = 5.0
"""How long a stopped replica gets between SIGTERM and SIGKILL."""

STOPPED_RETENTION_SECONDS = 600.0
"""How long a stopped replica stays in ``states()`` (and its directory on disk)."""


class ReplicaSupervisor(_ReplicaStarter):
    """Starts, health-checks, fences and stops this agent's replicas (see the module docstring).

    ``clock`` (monotonic seconds) measures the startup deadline and the retention of
    stopped replicas; ``python`` is the interpreter of the ``python`` runtime.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        advertise_host: str = "127.0.0.1",
        port_range: tuple[int, int] = DEFAULT_PORT_RANGE,
        clock: Callable[[], float] = time.monotonic,
        python: str = sys.executable,
        stop_grace_seconds: float = STOP_GRACE_SECONDS,
        stopped_retention_seconds: float = STOPPED_RETENTION_SECONDS,
        rng: random.Random | None = None,
        root: str | os.PathLike[str] | None = None,
        uid_range: tuple[int, int] | None = None,
        packages: PackageCache | None = None,
    ) -> None:
        low, high = port_range
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"bad port range {low}-{high}")
        if uid_range is not None and not 1 <= uid_range[0] <= uid_range[1] < 2**32 - 1:
            raise ValueError(f"bad replica uid range {uid_range[0]}-{uid_range[1]}")
        self.root = Path(data_dir) / "replicas" if root is None else Path(root)
        self.packages = packages if packages is not None else PackageCache(Path(data_dir) / "packages")
        """Where packages come from (its ``fetch`` is the agent's, set once connected)."""
        self.uid_range = uid_range
        """Replicas run as users of this range (one per replica), or as the agent's user if None."""
        self._uids: dict[_Key, int] = {}
        self._next_uid = uid_range[0] if uid_range else 0
        self.advertise_host = advertise_host
        self.port_range = (low, high)
        self._clock = clock
        self._python = python
        self._stop_grace = stop_grace_seconds
        self._retention = stopped_retention_seconds
        self._replicas: dict[_Key, _Replica] = {}
        self._fences: dict[_Key, tuple[int, bool]] = {}
        self._locks: dict[_Key, asyncio.Lock] = {}
        self._next_port = (rng or random.Random()).randint(low, high)  # noqa: S311 - not security
        self._closed = False

    # ----------------------------------------------------------------- observing

    def states(self) -> list[node_pb2.ReplicaState]:
        """One ``ReplicaState`` per replica, for the hello and every heartbeat (stopped
        replicas are left out once their retention has passed)."""
        now = self._clock()
        return [
            node_pb2.ReplicaState(
                deployment_id=r.deployment_id,
                replica_index=r.replica_index,
                generation=r.generation,
                status=r.status,
                endpoint=r.endpoint,
                error_message=redact(r.error_message, MAX_ERROR_CHARS),
            )
            for r in self._replicas.values()
            if not self._expired(r, now)
        ]

    def get(self, deployment_id: str, replica_index: int) -> ReplicaInfo | None:
        """The replica ``(deployment_id, replica_index)``, if this agent has it."""
        replica = self._replicas.get((deployment_id, replica_index))
        return None if replica is None else self._info(replica)

    def replicas(self) -> list[ReplicaInfo]:
        """Every replica this agent knows of (running or not)."""
        return [self._info(r) for r in self._replicas.values()]

    def _info(self, r: _Replica) -> ReplicaInfo:
        return ReplicaInfo(
            deployment_id=r.deployment_id,
            replica_index=r.replica_index,
            generation=r.generation,
            status=r.status,
            endpoint=r.endpoint,
            error_message=r.error_message,
            pid=r.pid,
            port=r.port,
            directory=r.directory,
            log_path=r.log.path,
            secrets=r.secrets,
        )

    def _expired(self, r: _Replica, now: float) -> bool:
        return r.status == STOPPED and r.stopped_at is not None and now - r.stopped_at >= self._retention

    # ----------------------------------------------------------------- handlers

    async def deploy_replica(self, command: node_pb2.NodeCommand) -> node_pb2.CommandResult:
        """The ``deploy_replica`` handler (see the module docstring)."""
        request = command.deploy_replica
        problem = _check_ids(request.deployment_id, request.replica_index, request.generation)
        if problem:
            return _failure(command, problem, "invalid")
        if self._closed:
            return _failure(command, "the agent is shutting down", "shutting_down")
        await self._housekeep()
        key = (request.deployment_id, request.replica_index)
        async with self._lock(key):
            stale = self._stale(key, request.generation, deploy=True)
            if stale:
                return _failure(command, stale, "stale_generation")
            current = self._replicas.get(key)
            if (
                current is not None
                and current.generation == request.generation
                and current.status in (STARTING, RUNNING, UNHEALTHY)
                and not current.stopping
            ):
                replica = current  # a retried command: the same replica, no second process
            else:
                started = await self._start(request, current)
                if isinstance(started, tuple):
                    message, kind = started
                    return _failure(command, message, kind)
                replica = started
                if self._closed:  # close() ran while this one was being started
                    await self._terminate(replica, STOPPED, "the agent is shutting down", "shutting_down")
        healthy, message, kind = await asyncio.shield(replica.ready)
        if healthy and replica.status == RUNNING:
            return ok_result(
                command,
                {
                    "endpoint": replica.endpoint,
                    "pid": replica.pid,
                    "port": replica.port,
                    "generation": replica.generation,
                    "status": replica.status,
                },
            )
        if healthy:  # healthy at first, but not any more (a retried command)
            kind = {FAILED: "exited", UNHEALTHY: "unhealthy"}.get(replica.status, "stopped")
            return _failure(command, replica.error_message or f"the replica is {replica.status}", kind)
        return _failure(command, message, kind)

    async def stop_replica(self, command: node_pb2.NodeCommand) -> node_pb2.CommandResult:
        """The ``stop_replica`` handler: idempotent, fenced (see the module docstring)."""
        request = command.stop_replica
        problem = _check_ids(request.deployment_id, request.replica_index, request.generation)
        if problem:
            return _failure(command, problem, "invalid")
        await self._housekeep()
        key = (request.deployment_id, request.replica_index)
        async with self._lock(key):
            stale = self._stale(key, request.generation, deploy=False)
            if stale:
                return _failure(command, stale, "stale_generation")
            self._fences[key] = (request.generation, True)
            current = self._replicas.get(key)
            was_running = current is not None and current.process.returncode is None
            if current is not None and current.status != STOPPED:
                await self._terminate(current, STOPPED, "", "stopped")
        return ok_result(command, {"stopped": was_running, "generation": request.generation})

    async def remove_deployment(self, command: node_pb2.NodeCommand) -> node_pb2.CommandResult:
        """The ``remove_deployment`` handler: the deployment was deleted. Stop each of its
        replicas here (fenced at its generation, so a late deploy cannot start it again),
        forget them, and remove ``<root>/<deployment id>/`` with every generation's
        directory and log. Idempotent."""
        deployment_id = command.remove_deployment.deployment_id
        if not _ID.fullmatch(deployment_id):
            return _failure(
                command, "invalid deployment_id (1 to 128 letters, digits, '_', '.', '-')", "invalid"
            )
        await self._housekeep()
        stopped = 0
        for key in [k for k in self._replicas if k[0] == deployment_id]:
            async with self._lock(key):
                current = self._replicas.get(key)
                if current is None:
                    continue
                fenced = self._fences.get(key, (0, False))[0]
                self._fences[key] = (max(fenced, current.generation), True)
                if current.status != STOPPED:
                    await self._terminate(current, STOPPED, "the deployment was deleted", "stopped")
                    stopped += 1
                del self._replicas[key]
                current.log.close()
        directory = self.root / deployment_id
        existed = directory.exists()
        await asyncio.to_thread(shutil.rmtree, directory, True)
        if directory.exists():
            return _failure(
                command, f"could not remove the directory of deployment {deployment_id}", "invalid"
            )
        log.info("deployment %s removed: %d replicas stopped", deployment_id, stopped)
        return ok_result(command, {"stopped": stopped, "removed": existed})

    # ----------------------------------------------------------------- lifecycle

    async def close(self) -> None:
        """Stop every replica (the agent is shutting down); later deploys are refused."""
        self._closed = True
        await asyncio.gather(
            *(
                self._terminate(r, STOPPED, "the agent is shutting down", "shutting_down")
                for r in list(self._replicas.values())
                if r.status != STOPPED
            )
        )
        tasks = [t for r in self._replicas.values() for t in r.tasks if not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for r in self._replicas.values():
            r.log.close()

    def reap_orphans(self) -> int:
        """Kill processes left by an earlier run of this agent (Linux ``/proc``; best effort).

        A replica's own process dies with the agent (PR_SET_PDEATHSIG), but processes
        it started itself may survive a kill -9 of the agent: they still carry
        ``A67_REPLICA_DIR=<this agent's replica dir>/…`` in their environment. Call this
        before deploying anything; replicas this supervisor runs are spared. Returns
        how many processes were killed.
        """
        own_groups = {r.pid for r in self._replicas.values() if r.process.returncode is None}
        return reap_orphans(self.root, own_groups)

    def secure_leftovers(self) -> int:
        """Give every replica directory left by an earlier run back to root (0700), so that
        a user id handed out again cannot read another replica's old files. Only when
        replicas run as their own users; returns how many directories were taken back."""
        if self.uid_range is None:
            return 0
        return secure_leftovers(self.root)

    # ----------------------------------------------------------------- internals

    def _lock(self, key: _Key) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def _stale(self, key: _Key, generation: int, *, deploy: bool) -> str:
        return stale_reason(self._fences.get(key), key, generation, deploy=deploy)

    async def _housekeep(self) -> None:
        """Forget stopped replicas past their retention and remove their directories."""
        now = self._clock()
        expired = [r for r in self._replicas.values() if self._expired(r, now)]
        for r in expired:
            if self._replicas.get(r.key) is r:
                del self._replicas[r.key]
            await asyncio.to_thread(_remove_dir, r.directory)


def _failure(command: node_pb2.NodeCommand, message: str, kind: str) -> node_pb2.CommandResult:
    result = error_result(command, message)
    result.payload = json.dumps({"error_kind": kind}).encode()
    return result


def register_replica_handlers(handlers: CommandHandlers, supervisor: ReplicaSupervisor) -> None:
    """Answer ``deploy_replica``, ``stop_replica`` and ``remove_deployment`` commands with ``supervisor``."""
    handlers.register("deploy_replica", supervisor.deploy_replica)
    handlers.register("stop_replica", supervisor.stop_replica)
    handlers.register("remove_deployment", supervisor.remove_deployment)
