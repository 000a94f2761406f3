"""Replicas on the agent: run deployed apps as real processes, health-check them, stop them.

The controller sends ``deploy_replica`` and ``stop_replica`` commands; a
:class:`ReplicaSupervisor` answers them (:func:`register_replica_handlers`) and
reports what runs in every hello and heartbeat (:meth:`ReplicaSupervisor.states`).

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
   real process in its own session (process group):

   * runtime ``python``: ``[<the agent's python>, <entrypoint file or -m module>, args…]``
     (the manifest's ``python3`` is replaced by the agent's interpreter);
     ``PYTHONUNBUFFERED=1``. The agent does not install ``requirements.txt``: the app
     runs with what the agent's interpreter has (the generated Dockerfile does install it);
   * runtime ``command``: the manifest's argv as is, without a shell (``./bin/server``
     is relative to ``app/``; a bare name is looked up on ``PATH``).

   Environment: only ``PATH`` and ``LANG`` from the agent and ``HOME`` = the replica's
   directory, then the command's env map (the user's env, secret: never logged),
   then the platform's ``PORT`` and ``A67_PORT`` (backends), ``A67_DEPLOYMENT_ID``,
   ``A67_REPLICA_INDEX``, ``A67_GENERATION`` and ``A67_REPLICA_DIR``. stdin is
   ``/dev/null``; stdout and stderr go through a pipe into ``replica.log``, which
   is rotated to ``replica.log.1`` at :data:`LOG_MAX_BYTES` (so at most twice that on
   disk); the last :data:`LOG_TAIL_LINES` lines are kept in memory for error messages.
   No resource limits are enforced on the process (the manifest's cpu/memory are for
   placement).
6. **Health** (:func:`startup_deadline_seconds`): the handler answers when the
   replica is healthy (``ok=True``, payload ``{"endpoint", "pid", "port",
   "generation", "status"}``) or when it failed (``ok=False``, payload
   ``{"error_kind": …}``, see :data:`ERROR_KINDS`).

Health timing
=============

With the manifest's ``health_check`` (``path``, ``interval``, ``timeout``, ``retries``):

* **Startup**: ``GET http://127.0.0.1:<port><path>`` every :data:`STARTUP_POLL_SECONDS`
  (0.2 s), each attempt bounded by ``timeout``, from the moment the process starts.
  The replica is healthy at the first answer with status 2xx or 3xx. It has failed
  when no attempt succeeded within the **startup deadline = interval * retries +
  timeout** seconds (the time a running replica may go without a successful check
  before it counts as unhealthy, plus one check), or when the process exits first.
  A replica that fails its startup is stopped (status ``failed``), so it holds no port.
* **Afterwards**: one check every ``interval`` seconds; ``retries`` failed checks in a
  row → ``unhealthy`` (the process keeps running and gets no traffic); the next
  successful check → ``running`` again.
* **No path** (workers): healthy once the process has been alive for
  :data:`WORKER_GRACE_SECONDS` (1 s); afterwards healthy while it runs.
* A process that exits at any time → ``failed``, with its exit code (or signal) and
  the last lines of its log in ``error_message``.

Restart policy: **none on the agent**. A failed or unhealthy replica is reported
(``states()``) and left as it is; the controller decides whether to start it again
(with a new deploy, here or elsewhere). Restarting locally would hide a crash loop
from the controller and race with its re-placement.

Fencing with generations
========================

A replica (deployment id, replica index) runs at most once per agent. Each carries
the generation of its assignment; the agent remembers, per replica, the highest
generation it accepted (its *fence*) and whether it was stopped at that generation:

* deploy with a generation above the fence → replaces whatever runs (stopped first);
* deploy with the same generation as a starting or running replica → the same
  replica (a retried command; no second process);
* deploy with the same generation as a failed one → started again (fresh directory);
* deploy below the fence, or at the generation a stop was received for →
  ``ok=False`` ``"stale generation …"`` (``error_kind`` ``stale_generation``);
* stop below the fence → ``ok=False`` ``"stale generation …"``; a stop at or above the
  fence stops the replica and raises the fence to it, so that a node coming back
  after its replica moved can be told to stop it, and a late deploy of the old
  assignment cannot start it again. Stopping what is not running is ``ok``.

Fences live in memory: after an agent restart nothing runs (see below), and the
controller's new stream carries new commands.

Stopping, directories and shutdown
==================================

Stop: SIGTERM to the replica's process group, up to ``stop_grace_seconds`` (5 s)
for it to exit, then SIGKILL to the group; whatever else is left in the group is
killed too. The replica stays in ``states()`` as ``stopped`` for
``stopped_retention_seconds`` (10 min). Its directory (with its log) is kept for
post-mortems and removed when that retention ends (at the next command), or when a
later generation of the same replica is deployed (only the previous generation's
directory is kept). ``remove_deployment`` (the deployment was deleted) stops every
replica of the deployment and removes ``<data dir>/replicas/<deployment id>/`` at once.

:meth:`ReplicaSupervisor.close` (the agent's SIGTERM/SIGINT) stops every replica.
If the agent dies without that (kill -9), its replicas die with it: each replica
process gets ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` before it runs (set by a tiny
launcher, :data:`LAUNCHER`, that then execs the app), so no replica keeps running
(and holding its port) while the controller places it elsewhere. This is **Linux
only** (elsewhere replicas would outlive a killed agent); it covers the replica's own
process (the signal fires when the agent's event-loop thread, which starts every
replica, dies), not processes the app starts itself. Those are found
and killed by :meth:`ReplicaSupervisor.reap_orphans` when the agent starts again
(every replica process carries ``A67_REPLICA_DIR`` in its environment).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from automator67.v1 import node_pb2

from controller.agent.handlers import CommandHandlers, error_result, ok_result
from controller.agent.hardening import ensure_traversable
from controller.agent.packages import PackageCache, PackageFetchError
from controller.deployments.manifest import HealthCheckSpec
from controller.deployments.package import unpack_package
from controller.errors import InvalidArgument
from controller.redact import redact

log = logging.getLogger(__name__)

STARTING = "starting"
RUNNING = "running"
UNHEALTHY = "unhealthy"
FAILED = "failed"
STOPPED = "stopped"
STATUSES = (STARTING, RUNNING, UNHEALTHY, FAILED, STOPPED)
"""The ``ReplicaState.status`` values the agent reports."""

ERROR_KINDS = (
    "invalid",  # the command itself is malformed (ids)
    "stale_generation",  # fenced: an older generation than the agent already has
    "checksum_mismatch",  # the package is not the one its SHA-256 names
    "fetch_failed",  # the package could not be downloaded from the controller
    "invalid_package",  # the package cannot be unpacked, or its manifest.json is unusable
    "no_port",  # the requested port is in use, or the range has none free
    "spawn_failed",  # the program could not be started at all
    "exited",  # the process exited before it was healthy
    "unhealthy",  # the health check did not succeed within the startup deadline
    "replaced",  # a newer generation replaced it before it was healthy
    "stopped",  # a stop_replica arrived before it was healthy
    "shutting_down",  # the agent is stopping
)
"""The ``error_kind`` values of a failed ``deploy_replica`` result payload."""

DEFAULT_PORT_RANGE = (20000, 29999)
"""Ports handed to replicas when the command names none (inclusive)."""

STARTUP_POLL_SECONDS = 0.2
"""How often the health check is tried while a replica starts."""

WORKER_GRACE_SECONDS = 1.0
"""How long a replica without an HTTP check must stay alive to count as healthy."""

STOP_GRACE_SECONDS = 5.0
"""How long a stopped replica gets between SIGTERM and SIGKILL."""

STOPPED_RETENTION_SECONDS = 600.0
"""How long a stopped replica stays in ``states()`` (and its directory on disk)."""

LOG_FILE = "replica.log"
LOG_MAX_BYTES = 1024 * 1024
"""``replica.log`` is rotated to ``replica.log.1`` when it reaches this size."""

LOG_TAIL_LINES = 20
"""How many of the last log lines an error message quotes."""

MAX_ERROR_CHARS = 2048
"""Longest ``error_message`` (the log tail is cut from the front; credentials in it are
masked by :func:`controller.redact.redact`)."""

PIPE_DRAIN_SECONDS = 1.0
"""How long to wait for the rest of a dead process's output."""

PR_SET_PDEATHSIG = 1
"""``prctl`` option (linux/prctl.h): the signal a process gets when its parent dies."""

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_MAX_REPLICA_INDEX = 9999
_GENERATION_DIR = re.compile(r"(\d+)-g(\d+)")

_Key = tuple[str, int]


# --------------------------------------------------------------------------- pure helpers


def startup_deadline_seconds(check: HealthCheckSpec) -> float:
    """How long a starting replica has for its first successful health check:
    ``interval * retries + timeout`` seconds (see the module docstring)."""
    return float(check.interval_seconds * check.retries + check.timeout_seconds)


@dataclass(frozen=True)
class AppSpec:
    """What the agent needs from a package's ``manifest.json``."""

    name: str
    runtime: str
    """``python`` or ``command``."""
    app_type: str
    """``backend`` or ``worker``."""
    argv: tuple[str, ...]
    health_check: HealthCheckSpec


def read_app_spec(package_dir: Path) -> AppSpec:
    """Parse ``package_dir / "manifest.json"``; ``ValueError`` saying what is wrong."""
    try:
        raw: Any = json.loads((package_dir / "manifest.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError("the package has no manifest.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"manifest.json cannot be read: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError("manifest.json is not an object")
    argv = raw.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and a for a in argv):
        raise ValueError("manifest.json has no argv (a list of strings)")
    runtime = raw.get("runtime")
    if runtime not in ("python", "command"):
        raise ValueError(f"manifest.json has an unsupported runtime {runtime!r}")
    app_type = raw.get("app_type", "backend")
    if app_type not in ("backend", "worker"):
        raise ValueError(f"manifest.json has an unsupported app_type {app_type!r}")
    check = raw.get("health_check") or {}
    if not isinstance(check, dict):
        raise ValueError("manifest.json health_check is not an object")
    path = check.get("path", "")
    if not isinstance(path, str) or (
        path and (not path.startswith("/") or re.search(r"[\s\x00-\x1f\x7f]", path))
    ):
        raise ValueError("manifest.json health_check.path is not a URL path")
    numbers: list[int] = []
    for name in ("interval_seconds", "timeout_seconds", "retries"):
        value = check.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"manifest.json health_check.{name} is not a positive integer")
        numbers.append(value)
    interval, timeout, retries = numbers
    app_name = raw.get("name", "")
    return AppSpec(
        name=app_name if isinstance(app_name, str) else "",
        runtime=runtime,
        app_type=app_type,
        argv=tuple(argv),
        health_check=HealthCheckSpec(
            path=path, interval_seconds=interval, timeout_seconds=timeout, retries=retries
        ),
    )


def replica_argv(spec: AppSpec, python: str) -> list[str]:
    """The command line of a replica of ``spec``, with ``python`` as the interpreter."""
    words = list(spec.argv)
    if spec.runtime == "python":
        if words and (words[0] in ("python", "python3") or words[0].startswith("python3.")):
            words = words[1:]
        return [python, *words]
    return words


def replica_env(
    env: Mapping[str, str],
    *,
    deployment_id: str,
    replica_index: int,
    generation: int,
    port: int,
    replica_dir: Path,
    runtime: str,
    base: Mapping[str, str] | None = None,
    home: Path | None = None,
) -> dict[str, str]:
    """A replica's whole environment (see the module docstring); ``base`` defaults to
    the agent's own environment, of which only ``PATH`` and ``LANG`` are used; ``home``
    defaults to ``replica_dir``."""
    source = os.environ if base is None else base
    result = {
        "PATH": source.get("PATH") or os.defpath,
        "HOME": str(replica_dir if home is None else home),
        "LANG": source.get("LANG") or "C.UTF-8",
    }
    if runtime == "python":
        result["PYTHONUNBUFFERED"] = "1"
    result.update(env)
    if port:
        result["PORT"] = str(port)
        result["A67_PORT"] = str(port)
    result["A67_DEPLOYMENT_ID"] = deployment_id
    result["A67_REPLICA_INDEX"] = str(replica_index)
    result["A67_GENERATION"] = str(generation)
    result["A67_REPLICA_DIR"] = str(replica_dir)
    return result


def port_is_free(port: int) -> bool:
    """Whether a TCP listener could bind ``port`` on all interfaces right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))  # noqa: S104 - the app may listen on every interface
        except OSError:
            return False
    return True


async def http_health_check(
    port: int, path: str, timeout_seconds: float, host: str = "127.0.0.1"
) -> str | None:
    """``GET http://host:port/path`` once: ``None`` when the answer is 2xx or 3xx, else
    why the check failed (``"HTTP 500"``, ``"timed out after 1 s"``, ``"connection refused"``)."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_seconds):
            reader, writer = await asyncio.open_connection(host, port)
            request = (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: a67-agent\r\n"
                "Accept: */*\r\nConnection: close\r\n\r\n"
            )
            writer.write(request.encode("ascii", "replace"))
            await writer.drain()
            status_line = await reader.readline()
    except TimeoutError:
        return f"timed out after {timeout_seconds:g} s"
    except ConnectionRefusedError:
        return "connection refused"
    except OSError as exc:
        return f"connection failed ({exc.strerror or type(exc).__name__})"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(0.5):
                    await writer.wait_closed()
    parts = status_line.decode("latin-1").split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return "not an HTTP answer"
    code = int(parts[1])
    return None if 200 <= code < 400 else f"HTTP {code}"


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _with_tail(message: str, tail: str) -> str:
    """``message`` and the (untrusted) log tail: credentials masked, at most
    :data:`MAX_ERROR_CHARS` in all."""
    if not tail:
        return f"{message} (its log is empty)"
    head = f"{message}; last lines of its log:\n"
    return head + redact(tail, max(MAX_ERROR_CHARS - len(head), 64))


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


LAUNCHER = (
    "import ctypes, os, sys, warnings  # everything, before the interpreter's files may be out of reach\n"
    "uid = int(sys.argv[2])\n"
    "if uid >= 0:\n"
    "    os.setgroups([])\n"
    "    os.setresgid(uid, uid, uid)\n"
    "    os.setresuid(uid, uid, uid)\n"
    "    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != uid:\n"
    "        sys.exit(71)\n"
    f"ctypes.CDLL(None, use_errno=True).prctl({PR_SET_PDEATHSIG}, {int(signal.SIGKILL)}, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(70)\n"
    "try:\n"
    "    os.execvp(sys.argv[3], sys.argv[3:])\n"
    "except OSError as exc:\n"
    "    print(f'cannot start {sys.argv[3]!r}: {exc.strerror}', file=sys.stderr, flush=True)\n"
    "    sys.exit(127)\n"
)
"""The program that starts a replica on Linux (``python -I -S -c LAUNCHER <agent pid> <uid>
argv…``): when ``uid`` is not -1 (the agent runs as root) it drops to that user and the
group of the same id with no supplementary groups, for good (real, effective and saved
ids); it then asks the kernel for SIGKILL when its parent (the agent) dies (after the
user change, which would clear it), checks that the agent did not die already, and execs
the replica's argv in its place (same pid, same process group; the death signal survives
``execve`` except for set-user-ID programs). ``-I`` keeps the app's own files (the
launcher starts in ``app/``) off its ``sys.path``.

Why not ``preexec_fn``: it makes Python run its at-fork hooks in the child, and gRPC's
(the agent holds a gRPC stream) abort the child (``ev_epoll1_linux.cc: Check failed``).
The launcher costs one short interpreter start (``-I -S``: no site, no user env)."""


def launcher_prefix(python: str, parent_pid: int | None = None, uid: int | None = None) -> list[str]:
    """What goes before a replica's argv so that it dies with the agent (and runs as
    ``uid``, if given): the launcher on Linux, nothing elsewhere (where replicas would
    outlive a killed agent, and run as the agent's user)."""
    if not sys.platform.startswith("linux"):
        return []
    pid = os.getpid() if parent_pid is None else parent_pid
    return [python, "-I", "-S", "-c", LAUNCHER, str(pid), str(-1 if uid is None else uid)]


def _find_program(program: str, cwd: Path, path: str) -> str | None:
    """Why ``program`` cannot be run from ``cwd`` with ``PATH=path``, or None if it can."""
    if "/" in program:
        target = cwd / program
        if not target.is_file():
            return f"program {program!r} is not a file in the app"
        if not os.access(target, os.X_OK):
            return f"program {program!r} is not executable"
        return None
    if shutil.which(program, path=path) is None:
        return f"program {program!r} is not on the node's PATH"
    return None


def _open_log(path: Path) -> BinaryIO:
    """``path`` for appending: created 0600, never through a symbolic link."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    return os.fdopen(fd, "ab")


class _ReplicaLog:
    """``replica.log`` with rotation, and the last lines in memory."""

    def __init__(
        self, path: Path, *, max_bytes: int = LOG_MAX_BYTES, tail_lines: int = LOG_TAIL_LINES
    ) -> None:
        self.path = path
        self._max = max_bytes
        self._file: BinaryIO | None = _open_log(path)
        self._size = path.stat().st_size
        self._lines: deque[bytes] = deque(maxlen=tail_lines)
        self._partial = b""

    def write(self, data: bytes) -> None:
        if self._file is not None:
            try:
                self._file.write(data)
                self._file.flush()
                self._size += len(data)
                if self._size >= self._max:
                    self._file.close()
                    os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                    self._file = _open_log(self.path)
                    self._size = 0
            except OSError as exc:  # a full disk must not kill the supervisor
                log.warning("cannot write %s: %s", self.path, exc)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[-4096:]
        self._lines.extend(line[-500:] for line in lines)

    def tail(self) -> str:
        lines = list(self._lines)
        if self._partial:
            lines = [*lines, self._partial][-(self._lines.maxlen or LOG_TAIL_LINES) :]
        return "\n".join(line.decode("utf-8", "replace").rstrip("\r") for line in lines)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# --------------------------------------------------------------------------- the supervisor


@dataclass(frozen=True)
class ReplicaInfo:
    """A read-only view of one replica on this agent."""

    deployment_id: str
    replica_index: int
    generation: int
    status: str
    endpoint: str
    error_message: str
    pid: int
    """The process id (also its process group id); 0 if it never started."""
    port: int
    """0 for a replica without a port (workers)."""
    directory: Path
    log_path: Path


@dataclass(eq=False)
class _Replica:
    deployment_id: str
    replica_index: int
    generation: int
    directory: Path
    spec: AppSpec
    port: int
    endpoint: str
    process: asyncio.subprocess.Process
    log: _ReplicaLog
    ready: asyncio.Future[tuple[bool, str, str]]
    """(healthy, failure message, error kind), set once."""
    status: str = STARTING
    error_message: str = ""
    stopping: bool = False
    stopped_at: float | None = None
    pump: asyncio.Task[None] | None = None
    watcher: asyncio.Task[None] | None = None
    health: asyncio.Task[None] | None = None
    termination: asyncio.Task[None] | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def key(self) -> _Key:
        return (self.deployment_id, self.replica_index)

    @property
    def pid(self) -> int:
        return self.process.pid

    def settle(self, healthy: bool, message: str = "", kind: str = "") -> None:
        if not self.ready.done():
            self.ready.set_result((healthy, message, kind))


class ReplicaSupervisor:
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
        proc = Path("/proc")
        if not proc.is_dir():
            return 0
        marker = f"A67_REPLICA_DIR={self.root}{os.sep}".encode()
        own_groups = {r.pid for r in self._replicas.values() if r.process.returncode is None}
        killed = 0
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
                if own_groups and os.getpgid(pid) in own_groups:
                    continue
            except OSError:
                continue
            if any(item.startswith(marker) for item in environ.split(b"\0")):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                    log.warning("killed process %d left over from an earlier run of the agent", pid)
        return killed

    def secure_leftovers(self) -> int:
        """Give every replica directory left by an earlier run back to root (0700), so that
        a user id handed out again cannot read another replica's old files. Only when
        replicas run as their own users; returns how many directories were taken back."""
        if self.uid_range is None or not self.root.is_dir():
            return 0
        taken = 0
        for app in self.root.glob("*/*/app"):
            with contextlib.suppress(OSError):
                _chown_tree(app, 0, 0o700)
                taken += 1
        return taken

    # ----------------------------------------------------------------- internals

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

    def _lock(self, key: _Key) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def _stale(self, key: _Key, generation: int, *, deploy: bool) -> str:
        fence = self._fences.get(key)
        if fence is None:
            return ""
        fenced, stopped = fence
        name = f"{key[0]}/{key[1]}"
        if generation < fenced:
            return f"stale generation: replica {name} is at generation {fenced}, got {generation}"
        if deploy and stopped and generation == fenced:
            return f"stale generation: replica {name} was stopped at generation {fenced}"
        return ""

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
                    spec = await asyncio.to_thread(_prepare, directory, package, sha256, uid)
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
        )
        self._replicas[key] = replica
        name = f"{request.deployment_id}/{request.replica_index}-g{request.generation}"
        replica.pump = asyncio.create_task(self._pump(replica), name=f"replica-log-{name}")
        replica.watcher = asyncio.create_task(self._watch(replica), name=f"replica-exit-{name}")
        replica.health = asyncio.create_task(self._check_health(replica), name=f"replica-health-{name}")
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

    async def _pump(self, r: _Replica) -> None:
        """Copy the process's output into its log until EOF."""
        stream = r.process.stdout
        if stream is None:  # pragma: no cover - always a pipe
            return
        try:
            while chunk := await stream.read(65536):
                r.log.write(chunk)
        finally:
            r.log.close()

    async def _drain(self, r: _Replica) -> None:
        if r.pump is not None and not r.pump.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(r.pump), PIPE_DRAIN_SECONDS)
            if not r.pump.done():
                r.pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await r.pump

    async def _watch(self, r: _Replica) -> None:
        """Notice the process's exit: unless it is being stopped, the replica failed."""
        code = await r.process.wait()
        if r.stopping:
            return
        _killpg(r.pid, signal.SIGKILL)  # whatever it left behind in its group
        if r.health is not None and not r.health.done():
            r.health.cancel()
        await self._drain(r)
        if r.stopping:
            return
        phase = " before it became healthy" if r.status == STARTING else ""
        message = _with_tail(f"process {_describe_exit(code)}{phase}", r.log.tail())
        r.status = FAILED
        r.error_message = message
        r.stopped_at = self._clock()
        log.warning("replica %s/%d-g%d failed: process %s", *r.key, r.generation, _describe_exit(code))
        r.settle(False, message, "exited")

    async def _check_health(self, r: _Replica) -> None:
        check = r.spec.health_check
        if not check.path or not r.port:
            await asyncio.sleep(WORKER_GRACE_SECONDS)
            if r.process.returncode is None and not r.stopping:
                r.status = RUNNING
                r.settle(True)
            return
        deadline_s = startup_deadline_seconds(check)
        deadline = self._clock() + deadline_s
        attempts = 0
        while True:
            remaining = deadline - self._clock()
            reason = await http_health_check(
                r.port, check.path, max(0.05, min(check.timeout_seconds, remaining))
            )
            attempts += 1
            if reason is None:
                break
            remaining = deadline - self._clock()
            if remaining <= 0:
                message = _with_tail(
                    f"health check failed {attempts} times: GET {check.path} did not succeed within "
                    f"{deadline_s:g} s (last: {reason})",
                    r.log.tail(),
                )
                await self._terminate(r, FAILED, message, "unhealthy")
                return
            await asyncio.sleep(min(STARTUP_POLL_SECONDS, remaining))
        r.status = RUNNING
        r.settle(True)
        log.info("replica %s/%d-g%d healthy at %s", *r.key, r.generation, r.endpoint)
        failures = 0
        while True:
            await asyncio.sleep(check.interval_seconds)
            reason = await http_health_check(r.port, check.path, check.timeout_seconds)
            if r.stopping or r.process.returncode is not None:
                return
            if reason is None:
                if r.status == UNHEALTHY:
                    log.info("replica %s/%d-g%d is healthy again", *r.key, r.generation)
                failures = 0
                r.status = RUNNING
                r.error_message = ""
                continue
            failures += 1
            if failures >= check.retries:
                if r.status == RUNNING:
                    log.warning("replica %s/%d-g%d is unhealthy: %s", *r.key, r.generation, reason)
                r.status = UNHEALTHY
                r.error_message = f"health check failed {failures} times in a row (last: {reason})"

    async def _terminate(self, r: _Replica, status: str, message: str, kind: str) -> None:
        """Stop ``r`` (once: concurrent callers wait for the same stop). Stopping a
        replica that already ended (failed) marks it ``stopped``."""
        if r.termination is None:
            r.termination = asyncio.create_task(
                self._stop_process(r, status, message, kind), name=f"replica-stop-{r.pid}"
            )
            r.tasks.append(r.termination)
        await asyncio.shield(r.termination)
        if status == STOPPED and r.status != STOPPED:
            r.status = STOPPED
            r.error_message = message
            r.stopped_at = self._clock()

    async def _stop_process(self, r: _Replica, status: str, message: str, kind: str) -> None:
        r.stopping = True
        if r.health is not None and not r.health.done() and r.health is not asyncio.current_task():
            r.health.cancel()
        if r.process.returncode is None:
            _killpg(r.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(r.process.wait(), self._stop_grace)
            except TimeoutError:
                log.warning("replica %s/%d-g%d ignored SIGTERM: killing it", *r.key, r.generation)
                _killpg(r.pid, signal.SIGKILL)
                await r.process.wait()
        _killpg(r.pid, signal.SIGKILL)  # whatever is left in its group
        await self._drain(r)
        if r.watcher is not None:
            await asyncio.gather(r.watcher, return_exceptions=True)
        r.status = status
        r.error_message = message
        r.stopped_at = self._clock()
        log.info("replica %s/%d-g%d %s%s", *r.key, r.generation, status, f": {message}" if message else "")
        r.settle(False, message or f"the replica was {status} before it became healthy", kind)

    async def _housekeep(self) -> None:
        """Forget stopped replicas past their retention and remove their directories."""
        now = self._clock()
        expired = [r for r in self._replicas.values() if self._expired(r, now)]
        for r in expired:
            if self._replicas.get(r.key) is r:
                del self._replicas[r.key]
            await asyncio.to_thread(_remove_dir, r.directory)


def _check_ids(deployment_id: str, replica_index: int, generation: int) -> str:
    if not _ID.fullmatch(deployment_id):
        return "invalid deployment_id (1 to 128 letters, digits, '_', '.', '-')"
    if not 0 <= replica_index <= _MAX_REPLICA_INDEX:
        return f"invalid replica_index {replica_index} (0 to {_MAX_REPLICA_INDEX})"
    if generation < 0:
        return f"invalid generation {generation}"
    return ""


def _failure(command: node_pb2.NodeCommand, message: str, kind: str) -> node_pb2.CommandResult:
    result = error_result(command, message)
    result.payload = json.dumps({"error_kind": kind}).encode()
    return result


def _prepare(directory: Path, package: bytes | Path, sha256: str, owner: int | None = None) -> AppSpec:
    """Verify and unpack ``package`` into a fresh ``directory``; its :class:`AppSpec`.

    With an ``owner`` (replicas run as their own users): the replica root, the
    deployment's directory and ``directory`` are root's, 0711 (passable, not listable);
    ``manifest.json`` and ``Dockerfile`` 0600; only ``app/`` (0700) and what it holds
    belong to ``owner``."""
    if directory.exists():
        shutil.rmtree(directory)
    if owner is not None:
        ensure_traversable(directory.parent)
    try:
        unpack_package(package, directory, sha256=sha256)
        spec = read_app_spec(directory)
        if owner is not None:
            os.chmod(directory, 0o711)  # noqa: S103 - the replica passes through to app/
            for entry in directory.iterdir():
                if entry.name != "app" and entry.is_file() and not entry.is_symlink():
                    os.chmod(entry, 0o600)
            _chown_tree(directory / "app", owner, 0o700)
        return spec
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def _chown_tree(top: Path, uid: int, mode: int) -> None:
    """Give ``top`` and everything under it (links themselves, never their targets) to
    ``uid`` (user and group), with ``top`` at ``mode``."""
    os.lchown(top, uid, uid)
    os.chmod(top, mode)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in (*dirnames, *filenames):
            os.lchown(os.path.join(dirpath, name), uid, uid)


def _remove_dir(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    with contextlib.suppress(OSError):
        directory.parent.rmdir()  # the deployment's directory, once empty


def _prune_generations(directory: Path, keep_previous: int = 1) -> None:
    """Remove the directories of older generations of the replica in ``directory``,
    keeping the ``keep_previous`` most recent ones (for their logs)."""
    match = _GENERATION_DIR.fullmatch(directory.name)
    if match is None:
        return
    index, generation = match.group(1), int(match.group(2))
    older: list[tuple[int, Path]] = []
    for sibling in directory.parent.iterdir():
        found = _GENERATION_DIR.fullmatch(sibling.name)
        if found and found.group(1) == index and int(found.group(2)) < generation:
            older.append((int(found.group(2)), sibling))
    older.sort(reverse=True)
    for _, path in older[keep_previous:]:
        shutil.rmtree(path, ignore_errors=True)


def register_replica_handlers(handlers: CommandHandlers, supervisor: ReplicaSupervisor) -> None:
    """Answer ``deploy_replica``, ``stop_replica`` and ``remove_deployment`` commands with ``supervisor``."""
    handlers.register("deploy_replica", supervisor.deploy_replica)
    handlers.register("stop_replica", supervisor.stop_replica)
    handlers.register("remove_deployment", supervisor.remove_deployment)
