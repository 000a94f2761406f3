"""Starting a replica: steps 2 to 5 of ``deploy_replica`` (see :mod:`controller.agent.replicas`),
the package unpacked into the replica's directory, the running generation replaced, a port
chosen and the process spawned with its log pump, exit watcher and health check; and
stopping a replica (:meth:`_ReplicaStarter._terminate`), which replacing needs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from automator67.v1 import node_pb2

from controller.agent.packages import PackageCache, PackageFetchError
from controller.agent.replica_health import check_health
from controller.agent.replica_logs import secret_values
from controller.agent.replica_process import (
    LOG_FILE,
    _find_program,
    _prune_generations,
    _Replica,
    _ReplicaLog,
    launcher_prefix,
    port_is_free,
    prepare_directory,
    pump,
    terminate,
    watch_exit,
)
from controller.agent.replica_spec import STOPPED, _Key, replica_argv, replica_env
from controller.errors import InvalidArgument

log = logging.getLogger("controller.agent.replicas")


class _ReplicaStarter:
    """The attributes of a :class:`~controller.agent.replicas.ReplicaSupervisor` (set in its
    ``__init__``) that starting and stopping a replica use, and those steps."""

    root: Path
    packages: PackageCache
    uid_range: tuple[int, int] | None
    advertise_host: str
    port_range: tuple[int, int]
    _uids: dict[_Key, int]
    _next_uid: int
    _clock: Callable[[], float]
    _python: str
    _stop_grace: float
    _replicas: dict[_Key, _Replica]
    _fences: dict[_Key, tuple[int, bool]]
    _next_port: int

    def _uid(self, key: _Key) -> int | None:
        """The user id replica ``key`` runs as: one per replica, kept across its generations
        and never given to another replica while this agent runs."""
        if self.uid_range is None:
            return None
        uid = self._uids.get(key)
        if uid is None:
            if self._next_uid > self.uid_range[1]:
                raise OSError("no replica user id left in the range")
            uid = self._uids[key] = self._next_uid
            self._next_uid += 1
        return uid

    async def _start(
        self, request: node_pb2.DeployReplica, current: _Replica | None
    ) -> _Replica | tuple[str, str]:
        """Unpack, replace ``current``, pick a port and spawn; a replica or (message, kind)."""
        directory = self.root / request.deployment_id / f"{request.replica_index}-g{request.generation}"
        key = (request.deployment_id, request.replica_index)
        try:
            uid = self._uid(key)
        except OSError as exc:
            return f"cannot start the app: {exc}", "spawn_failed"
        sha256 = request.package_sha256
        try:
            for attempt in (1, 2):
                package = await self.packages.get(sha256, request.package_size)
                try:
                    spec = await asyncio.to_thread(prepare_directory, directory, package, sha256, uid)
                    break
                except InvalidArgument as exc:
                    if exc.reason != "PACKAGE_CHECKSUM_MISMATCH":
                        return exc.message, "invalid_package"
                    if attempt == 2:
                        return exc.message, "checksum_mismatch"
                    await self.packages.evict(sha256)  # corrupted on disk: fetch it again
        except PackageFetchError as exc:
            kind = "checksum_mismatch" if "checksum mismatch" in str(exc) else "fetch_failed"
            return f"cannot fetch the package: {exc}", kind
        except (ValueError, OSError) as exc:
            return f"invalid package: {exc}", "invalid_package"
        if current is not None and current.status != STOPPED:
            await self._terminate(
                current, STOPPED, f"replaced by generation {request.generation}", "replaced"
            )
        self._fences[key] = (request.generation, False)

        port = 0
        if spec.health_check.path:
            chosen = self._choose_port(request.port)
            if isinstance(chosen, str):
                return chosen, "no_port"
            port = chosen
        argv = replica_argv(spec, self._python)
        env = replica_env(
            request.env,
            deployment_id=request.deployment_id,
            replica_index=request.replica_index,
            generation=request.generation,
            port=port,
            replica_dir=directory,
            runtime=spec.runtime,
            home=None if uid is None else directory / "app",
        )
        missing = _find_program(argv[0], directory / "app", env["PATH"])
        if missing:
            return f"cannot start the app: {missing}", "spawn_failed"
        replica_log = _ReplicaLog(directory / LOG_FILE)
        try:
            process = await asyncio.create_subprocess_exec(
                *launcher_prefix(self._python, uid=uid),
                *argv,
                cwd=directory / "app",
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            replica_log.close()
            return f"cannot start {argv[0]!r}: {exc.strerror or exc}", "spawn_failed"
        replica = _Replica(
            deployment_id=request.deployment_id,
            replica_index=request.replica_index,
            generation=request.generation,
            directory=directory,
            spec=spec,
            port=port,
            endpoint=f"http://{self.advertise_host}:{port}" if port else "",
            process=process,
            log=replica_log,
            ready=asyncio.get_running_loop().create_future(),
            secrets=secret_values(request.env),  # masked when its log is read (replica_logs.py)
        )
        self._replicas[key] = replica
        name = f"{request.deployment_id}/{request.replica_index}-g{request.generation}"
        replica.pump = asyncio.create_task(pump(replica), name=f"replica-log-{name}")
        replica.watcher = asyncio.create_task(watch_exit(replica, self._clock), name=f"replica-exit-{name}")
        replica.health = asyncio.create_task(
            check_health(replica, self._clock, self._terminate), name=f"replica-health-{name}"
        )
        replica.tasks += [replica.pump, replica.watcher, replica.health]
        log.info("replica %s started: pid %d, %s, port %s", name, process.pid, spec.runtime, port or "none")
        await asyncio.to_thread(_prune_generations, directory)
        return replica

    def _choose_port(self, requested: int) -> int | str:
        in_use = {r.port for r in self._replicas.values() if r.port and r.status != STOPPED}
        if requested:
            if not 1 <= requested <= 65535:
                return f"port {requested} is not a TCP port"
            if requested in in_use or not port_is_free(requested):
                return f"port {requested} is in use"
            return requested
        low, high = self.port_range
        size = high - low + 1
        for step in range(size):
            port = low + (self._next_port - low + step) % size
            if port not in in_use and port_is_free(port):
                self._next_port = low + (port - low + 1) % size
                return port
        return f"no free port in {low}-{high}"

    async def _terminate(self, r: _Replica, status: str, message: str, kind: str) -> None:
        """Stop ``r`` (once: concurrent callers wait for the same stop)."""
        await terminate(r, status, message, kind, clock=self._clock, grace=self._stop_grace)
