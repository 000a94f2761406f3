"""What keeps a node's replicas away from their agent's secrets (see docs/security.md).

The agent holds secrets a deployed app must never see: its private key (``node.key``),
its enrollment token, its provider OAuth token and its shard PostgreSQL URL (with a
password).
This module holds the process-level measures the agent applies at start:

* secrets come from the environment or from files, never from the command line
  (``/proc/<pid>/cmdline`` is readable by every process on the machine):
  :func:`read_secret_file`, :func:`url_has_password`;
* the provider OAuth token can come from standard input instead (:func:`read_secret_stdin`),
  which touches neither the environment nor the command line;
* secrets read from the environment are removed from it for good (:func:`wipe_environment`):
  from ``os.environ``, so that nothing the agent starts inherits them (replicas get a clean
  environment anyway), and from the original environment block that
  ``/proc/<pid>/environ`` shows for the life of the process, overwritten in place;
* the agent makes itself non-dumpable (:func:`make_undumpable`): ``/proc/<agent>/environ``,
  ``mem``, ``fd/`` … become root-owned and ptrace is refused, even to processes of the
  agent's own user;
* when the agent runs as root, every replica runs as its own unprivileged user
  (:data:`DEFAULT_REPLICA_UIDS`, no passwd entry needed; see
  :class:`controller.agent.replicas.ReplicaSupervisor`) under a replica root that
  those users can traverse (:func:`default_replica_root`, :func:`unreachable_ancestor`),
  while the data directory stays 0700 root (:func:`secure_data_dir`).
"""

from __future__ import annotations

import contextlib
import ctypes
import getpass
import hashlib
import logging
import os
import shutil
import stat
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4
"""``prctl`` option (linux/prctl.h)."""

DEFAULT_REPLICA_UIDS = (200000, 265535)
"""The user (and group) ids replicas run as when the agent runs as root (inclusive)."""

SYSTEM_REPLICA_BASE = Path("/var/lib/automator67-agent/replicas")
"""Where replica directories live when the agent runs as root (one sub-directory per data dir)."""


def make_undumpable() -> bool:
    """``prctl(PR_SET_DUMPABLE, 0)`` on Linux: True when it took effect."""
    if not sys.platform.startswith("linux"):
        log.info("not Linux: the agent cannot make itself non-dumpable (its /proc entries stay readable)")
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_DUMPABLE, 0) failed: %s", os.strerror(ctypes.get_errno()))
        return False
    return True


def scrub_environment(names: Iterable[str]) -> list[str]:
    """Remove ``names`` from ``os.environ``; the names that were there."""
    removed = [name for name in names if name in os.environ]
    for name in removed:
        del os.environ[name]
    return removed


ENVIRONMENT_FILLER = b"-"
"""What a wiped entry of the original environment block is overwritten with, byte for byte:
an entry that is no assignment, which parsers of ``/proc/<pid>/environ`` (psutil…) skip
(NULs would end the block early for them)."""

MAX_STDIN_SECRET_BYTES = 64 * 1024
"""The longest secret line :func:`read_secret_stdin` accepts."""


def _environment_block() -> tuple[int, int] | None:
    """The addresses ``[start, end)`` of this process's original environment block, which
    ``/proc/self/environ`` shows: fields 50 and 51 of ``/proc/self/stat`` (Linux 3.5 and later)."""
    try:
        with open("/proc/self/stat", "rb") as stat_file:
            data = stat_file.read()
        fields = data[data.rindex(b")") + 2 :].split()  # from field 3 (the command may hold spaces)
        start, end = int(fields[47]), int(fields[48])
    except (OSError, ValueError, IndexError):
        return None
    return (start, end) if 0 < start < end else None


def _block_entries(data: bytes) -> Iterable[tuple[int, int]]:
    """``(offset, length)`` of each NUL-terminated entry of an environment block."""
    position = 0
    while position < len(data):
        end = data.find(b"\0", position)
        end = len(data) if end < 0 else end
        yield position, end - position
        position = end + 1


def _shown_in_proc_environ(prefixes: tuple[bytes, ...]) -> list[str]:
    """The names among ``prefixes`` (``NAME=``) that ``/proc/self/environ`` still shows."""
    with open("/proc/self/environ", "rb") as environ:
        data = environ.read()
    return sorted(
        {
            data[o : o + n].split(b"=", 1)[0].decode(errors="replace")
            for o, n in _block_entries(data)
            if data.startswith(prefixes, o)
        }
    )


def wipe_environment(names: Iterable[str]) -> list[str]:
    """Remove ``names`` from the process's environment for good; the names that were set.

    They leave ``os.environ`` and the C library's environment (:func:`scrub_environment`),
    so nothing the agent starts inherits them. On Linux the kernel also keeps the
    *original* environment block the process was started with, and shows it in
    ``/proc/<pid>/environ`` for the life of the process whatever ``os.environ`` says: their
    entries there are overwritten in place (with :data:`ENVIRONMENT_FILLER`, same length),
    then ``/proc/self/environ`` is read back to check. Every other variable, the pid and
    the command line stay as they were. Nothing references those bytes any more (the C
    library's ``environ`` array dropped them on ``unsetenv``; Python holds copies).
    """
    wanted = list(dict.fromkeys(names))
    removed = scrub_environment(wanted)
    for name in wanted:
        os.unsetenv(name)  # also when os.environ had already lost it
    if not sys.platform.startswith("linux") or not wanted:
        return removed
    prefixes = tuple(name.encode() + b"=" for name in wanted)
    block = _environment_block()
    if block is None:
        log.warning("cannot locate the environment block: /proc/<pid>/environ may still show %s", wanted)
        return removed
    start, end = block
    data = ctypes.string_at(start, end - start)
    found = set(removed)
    for offset, length in _block_entries(data):
        if data.startswith(prefixes, offset):
            found.add(data[offset : offset + length].split(b"=", 1)[0].decode(errors="replace"))
            ctypes.memset(start + offset, ENVIRONMENT_FILLER[0], length)
    try:
        left = _shown_in_proc_environ(prefixes)
    except OSError as exc:
        log.warning("cannot check /proc/self/environ: %s", exc)
    else:
        if left:
            log.warning("/proc/<pid>/environ still shows %s: pass secrets another way", ", ".join(left))
    return [name for name in wanted if name in found]


def read_secret_stdin(stream: BinaryIO | None = None, prompt: str = "secret: ") -> str:
    """One line of standard input (``stream``), stripped: how a secret reaches the agent
    without the environment or the command line (``… | a67 agent --oauth-token-stdin``).
    From a terminal it is asked for without echo (``prompt``). ``ValueError`` for a line
    longer than :data:`MAX_STDIN_SECRET_BYTES` or not UTF-8; "" at end of input."""
    if stream is None:
        if sys.stdin is not None and sys.stdin.isatty():
            return getpass.getpass(prompt).strip()
        stream = sys.stdin.buffer if sys.stdin is not None else None
    if stream is None:
        raise ValueError("there is no standard input")
    line = stream.readline(MAX_STDIN_SECRET_BYTES + 1)
    if len(line.rstrip(b"\r\n")) > MAX_STDIN_SECRET_BYTES:
        raise ValueError(f"the line is longer than {MAX_STDIN_SECRET_BYTES} bytes")
    try:
        return line.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError("the line is not UTF-8") from None


def detach_stdin() -> None:
    """Point standard input (fd 0) at ``/dev/null``: nothing the agent starts later inherits
    the pipe its secret came through."""
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_RDONLY)
        if null != 0:
            os.dup2(null, 0)
            os.close(null)


def read_secret_file(path: Path) -> str:
    """The first line of ``path``, stripped; warns when the file is readable by others."""
    with contextlib.suppress(OSError):
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            log.warning("%s is readable by other users: make it 0600", path)
    text = path.read_text(encoding="utf-8")
    return text.strip().splitlines()[0].strip() if text.strip() else ""


def url_has_password(url: str) -> bool:
    """Whether ``url`` carries a password in its userinfo (``scheme://user:pass@host``)."""
    try:
        return bool(urlsplit(url).password)
    except ValueError:
        return "@" in url


def unreachable_ancestor(path: Path) -> Path | None:
    """The first existing directory from ``/`` down to ``path`` that other users cannot
    traverse (no ``o+x``), or None when they can reach ``path``."""
    current = Path(path.root or "/")
    for part in path.parts[1:]:
        with contextlib.suppress(FileNotFoundError):
            if not os.stat(current).st_mode & stat.S_IXOTH:
                return current
        current = current / part
    return None


def default_replica_root(data_dir: Path, separate_users: bool) -> Path:
    """``<data dir>/replicas``; for separated users (the agent runs as root) a directory of
    :data:`SYSTEM_REPLICA_BASE` named after the data directory, since the data directory
    (0700, maybe under ``/root``) must stay closed to replicas."""
    if not separate_users:
        return data_dir / "replicas"
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]
    return SYSTEM_REPLICA_BASE / digest


def ensure_traversable(directory: Path) -> None:
    """Create ``directory`` and any missing parents 0711 (others may pass, not list)."""
    missing = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o711)
        os.chmod(path, 0o711)  # noqa: S103 - traversable by replica users, not listable
    os.chmod(directory, 0o711)  # noqa: S103 - as above


def secure_data_dir(data_dir: Path) -> None:
    """Make the data directory 0700 (it holds the key and, for SQLite shards, the data)."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(data_dir.stat().st_mode) != 0o700:
        log.warning("tightening %s to 0700", data_dir)
        os.chmod(data_dir, 0o700)


def reachable_python(preferred: str) -> str | None:
    """An interpreter other users can run: ``preferred`` (the agent's own) if they can reach
    it, else the first reachable ``python3.X`` (same version) or ``python3`` on the system
    path; None if there is none."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system_path = "/usr/local/bin:/usr/bin:/bin"
    candidates = [
        preferred,
        getattr(sys, "_base_executable", ""),
        shutil.which(version, path=system_path) or "",
        shutil.which("python3", path=system_path) or "",
    ]
    for candidate in candidates:
        if not candidate:
            continue
        real = Path(os.path.realpath(candidate))
        if not real.is_file() or not real.stat().st_mode & stat.S_IXOTH:
            continue
        if unreachable_ancestor(Path(candidate)) is None and unreachable_ancestor(real) is None:
            return candidate
    return None
