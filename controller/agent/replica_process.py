"""Process supervision for replicas: spawn helpers, logs, exit watching, stopping,
directories and users.

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

:meth:`~controller.agent.replicas.ReplicaSupervisor.close` (the agent's SIGTERM/SIGINT) stops every replica.
If the agent dies without that (kill -9), its replicas die with it: each replica
process gets ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` before it runs (set by a tiny
launcher, :data:`LAUNCHER`, that then execs the app), so no replica keeps running
(and holding its port) while the controller places it elsewhere. This is **Linux
only** (elsewhere replicas would outlive a killed agent); it covers the replica's own
process (the signal fires when the agent's event-loop thread, which starts every
replica, dies), not processes the app starts itself. Those are found
and killed by :func:`reap_orphans` when the agent starts again
(every replica process carries ``A67_REPLICA_DIR`` in its environment).

Replicas run as users of their own when the agent runs as root (``--replica-uids``):
one user id per replica, kept across its generations; :func:`prepare_directory` gives
that user only the replica's ``app/`` and :func:`secure_leftovers` takes directories of
an earlier run back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from controller.agent.hardening import ensure_traversable
from controller.agent.replica_spec import FAILED, STARTING, STOPPED, AppSpec, _Key, read_app_spec
from controller.deployments.package_unpack import unpack_package
from controller.redact import redact

log = logging.getLogger("controller.agent.replicas")

LOG_FILE = "replica.log"
LOG_MAX_BYTES = 1024 * 1024
"""``replica.log`` is rotated to ``replica.log.1`` when it reaches this size (one rotated
file is kept: at most about twice this on disk per replica)."""

LOG_LINE_MAX_BYTES = 4096
"""A longer line of output is written to ``replica.log`` in pieces of this size."""

LOG_STAMP_BYTES = 27
"""Length of a line's time prefix in ``replica.log`` (``2024-05-01T12:00:00.000000Z``)."""

LOG_TAIL_LINES = 20
"""How many of the last log lines an error message quotes."""

MAX_ERROR_CHARS = 2048
"""Longest ``error_message`` (the log tail is cut from the front; credentials in it are
masked by :func:`controller.redact.redact`)."""

PIPE_DRAIN_SECONDS = 1.0
"""How long to wait for the rest of a dead process's output."""

PR_SET_PDEATHSIG = 1
"""``prctl`` option (linux/prctl.h): the signal a process gets when its parent dies."""

_GENERATION_DIR = re.compile(r"(\d+)-g(\d+)")


def port_is_free(port: int) -> bool:
    """Whether a TCP listener could bind ``port`` on all interfaces right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))  # noqa: S104 - the app may listen on every interface
        except OSError:
            return False
    return True


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


def log_stamp(moment: datetime | None = None) -> bytes:
    """The prefix of a line in ``replica.log``: the UTC time, RFC 3339 with microseconds
    (:data:`LOG_STAMP_BYTES` bytes), and a space."""
    return (moment or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ ").encode()


class _ReplicaLog:
    """``replica.log`` with rotation, and the last lines in memory.

    Every line of the replica's output is written as ``<time> <line>\n`` (the time the
    agent read it, :func:`log_stamp`), so that logs can be read "since" a time; a line
    longer than :data:`LOG_LINE_MAX_BYTES` is written in pieces, and the last line is
    written when it ends (or when the log is closed). At :data:`LOG_MAX_BYTES` the file
    is renamed ``replica.log.1`` (replacing the previous one) and a new one is begun: at
    most about twice the cap on disk per replica."""

    def __init__(
        self, path: Path, *, max_bytes: int = LOG_MAX_BYTES, tail_lines: int = LOG_TAIL_LINES
    ) -> None:
        self.path = path
        self._max = max_bytes
        self._file: BinaryIO | None = _open_log(path)
        self._size = path.stat().st_size
        self._lines: deque[bytes] = deque(maxlen=tail_lines)
        self._partial = b""
        self._pending = b""
        """The start of the line being written (not in the file yet)."""

    def _append(self, lines: list[bytes]) -> None:
        if self._file is None or not lines:
            return
        stamp = log_stamp()
        data = b"".join(stamp + line + b"\n" for line in lines)
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

    def write(self, data: bytes) -> None:
        pieces = (self._pending + data).split(b"\n")
        self._pending = pieces.pop()
        while len(self._pending) > LOG_LINE_MAX_BYTES:
            pieces.append(self._pending[:LOG_LINE_MAX_BYTES])
            self._pending = self._pending[LOG_LINE_MAX_BYTES:]
        out: list[bytes] = []
        for piece in pieces:
            while len(piece) > LOG_LINE_MAX_BYTES:
                out.append(piece[:LOG_LINE_MAX_BYTES])
                piece = piece[LOG_LINE_MAX_BYTES:]
            out.append(piece)
        self._append(out)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[-4096:]
        self._lines.extend(line[-500:] for line in lines)

    def tail(self) -> str:
        lines = list(self._lines)
        if self._partial:
            lines = [*lines, self._partial][-(self._lines.maxlen or LOG_TAIL_LINES) :]
        return "\n".join(line.decode("utf-8", "replace").rstrip("\r") for line in lines)

    def close(self) -> None:
        if self._pending:
            self._append([self._pending])
            self._pending = b""
        if self._file is not None:
            self._file.close()
            self._file = None


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
    secrets: tuple[str, ...] = ()
    """Values of its env to mask in its log (:func:`controller.agent.replica_logs.secret_values`)."""


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
    secrets: tuple[str, ...] = ()
    """Values of its env that are masked when its log is read."""
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


async def pump(r: _Replica) -> None:
    """Copy the process's output into its log until EOF."""
    stream = r.process.stdout
    if stream is None:  # pragma: no cover - always a pipe
        return
    try:
        while chunk := await stream.read(65536):
            r.log.write(chunk)
    finally:
        r.log.close()


async def drain(r: _Replica) -> None:
    """Wait (a little) for the rest of a dead process's output."""
    if r.pump is not None and not r.pump.done():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(r.pump), PIPE_DRAIN_SECONDS)
        if not r.pump.done():
            r.pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await r.pump


async def watch_exit(r: _Replica, clock: Callable[[], float]) -> None:
    """Notice the process's exit: unless it is being stopped, the replica failed."""
    code = await r.process.wait()
    if r.stopping:
        return
    _killpg(r.pid, signal.SIGKILL)  # whatever it left behind in its group
    if r.health is not None and not r.health.done():
        r.health.cancel()
    await drain(r)
    if r.stopping:
        return
    phase = " before it became healthy" if r.status == STARTING else ""
    message = _with_tail(f"process {_describe_exit(code)}{phase}", r.log.tail())
    r.status = FAILED
    r.error_message = message
    r.stopped_at = clock()
    log.warning("replica %s/%d-g%d failed: process %s", *r.key, r.generation, _describe_exit(code))
    r.settle(False, message, "exited")


async def terminate(
    r: _Replica, status: str, message: str, kind: str, *, clock: Callable[[], float], grace: float
) -> None:
    """Stop ``r`` (once: concurrent callers wait for the same stop). Stopping a
    replica that already ended (failed) marks it ``stopped``."""
    if r.termination is None:
        r.termination = asyncio.create_task(
            _stop_process(r, status, message, kind, clock=clock, grace=grace), name=f"replica-stop-{r.pid}"
        )
        r.tasks.append(r.termination)
    await asyncio.shield(r.termination)
    if status == STOPPED and r.status != STOPPED:
        r.status = STOPPED
        r.error_message = message
        r.stopped_at = clock()


async def _stop_process(
    r: _Replica, status: str, message: str, kind: str, *, clock: Callable[[], float], grace: float
) -> None:
    r.stopping = True
    if r.health is not None and not r.health.done() and r.health is not asyncio.current_task():
        r.health.cancel()
    if r.process.returncode is None:
        _killpg(r.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(r.process.wait(), grace)
        except TimeoutError:
            log.warning("replica %s/%d-g%d ignored SIGTERM: killing it", *r.key, r.generation)
            _killpg(r.pid, signal.SIGKILL)
            await r.process.wait()
    _killpg(r.pid, signal.SIGKILL)  # whatever is left in its group
    await drain(r)
    if r.watcher is not None:
        await asyncio.gather(r.watcher, return_exceptions=True)
    r.status = status
    r.error_message = message
    r.stopped_at = clock()
    log.info("replica %s/%d-g%d %s%s", *r.key, r.generation, status, f": {message}" if message else "")
    r.settle(False, message or f"the replica was {status} before it became healthy", kind)


def reap_orphans(root: Path, own_groups: set[int]) -> int:
    """Kill processes left by an earlier run of the agent whose replicas live under
    ``root`` (Linux ``/proc``; best effort), sparing the process groups ``own_groups``;
    how many were killed (see :meth:`~controller.agent.replicas.ReplicaSupervisor.reap_orphans`)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return 0
    marker = f"A67_REPLICA_DIR={root}{os.sep}".encode()
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


def secure_leftovers(root: Path) -> int:
    """Give every replica directory under ``root`` back to root (0700); how many."""
    if not root.is_dir():
        return 0
    taken = 0
    for app in root.glob("*/*/app"):
        with contextlib.suppress(OSError):
            _chown_tree(app, 0, 0o700)
            taken += 1
    return taken


def prepare_directory(
    directory: Path, package: bytes | Path, sha256: str, owner: int | None = None
) -> AppSpec:
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
