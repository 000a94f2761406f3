"""What keeps a node's replicas away from their agent's secrets (see docs/security.md).

The agent holds three secrets a deployed app must never see: its private key
(``node.key``), its enrollment token and its shard PostgreSQL URL (with a password).
This module holds the process-level measures the agent applies at start:

* secrets come from the environment or from files, never from the command line
  (``/proc/<pid>/cmdline`` is readable by every process on the machine):
  :func:`read_secret_file`, :func:`url_has_password`;
* they are removed from ``os.environ`` once read (:func:`scrub_environment`), so that
  nothing the agent starts inherits them (replicas get a clean environment anyway);
* the agent makes itself non-dumpable (:func:`make_undumpable`): ``/proc/<agent>/environ``,
  ``mem``, ``fd/`` … become root-owned and ptrace is refused, even to processes of the
  agent's own user — the kernel keeps the *original* environment block readable there
  otherwise, whatever ``os.environ`` says later;
* when the agent runs as root, every replica runs as its own unprivileged user
  (:data:`DEFAULT_REPLICA_UIDS`, no passwd entry needed; see
  :class:`controller.agent.replicas.ReplicaSupervisor`) under a replica root that
  those users can traverse (:func:`default_replica_root`, :func:`unreachable_ancestor`),
  while the data directory stays 0700 root (:func:`secure_data_dir`).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import stat
import sys
from collections.abc import Iterable
from pathlib import Path
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
