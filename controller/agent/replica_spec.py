"""What a replica is made of: its ids, the package's ``manifest.json`` (:class:`AppSpec`),
its command line and environment (:func:`replica_argv`, :func:`replica_env`), and the
statuses and error kinds the agent reports for it.

Pure functions, no processes: :mod:`controller.agent.replicas` (the supervisor) uses
them to start a replica; see its docstring for the whole ``deploy_replica`` flow.

A replica's process runs the manifest's ``argv`` in the unpacked ``app/`` directory:

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
is rotated to ``replica.log.1`` at
:data:`~controller.agent.replica_process.LOG_MAX_BYTES` (so at most twice that on disk);
the last :data:`~controller.agent.replica_process.LOG_TAIL_LINES` lines are kept in
memory for error messages. No resource limits are enforced on the process (the
manifest's cpu/memory are for placement).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.deployments.manifest_health import HealthCheckSpec

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

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_MAX_REPLICA_INDEX = 9999

_Key = tuple[str, int]


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


def _check_ids(deployment_id: str, replica_index: int, generation: int) -> str:
    if not _ID.fullmatch(deployment_id):
        return "invalid deployment_id (1 to 128 letters, digits, '_', '.', '-')"
    if not 0 <= replica_index <= _MAX_REPLICA_INDEX:
        return f"invalid replica_index {replica_index} (0 to {_MAX_REPLICA_INDEX})"
    if generation < 0:
        return f"invalid generation {generation}"
    return ""
