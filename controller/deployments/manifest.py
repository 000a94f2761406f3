"""Manifest validation: a ``DeploymentManifest`` proto in, a parsed :class:`ValidManifest` out.

:func:`validate_manifest` checks every field at once and raises one
``InvalidArgument`` carrying a field violation for each problem (paths like
``manifest.resources.memory``), or returns the parsed values with defaults
filled in. The rules:

========================  =================================================================
field                     rule
========================  =================================================================
name                      required; a DNS label: ``[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?``
app_type                  required: backend or worker (cron needs a schedule the manifest
                          cannot express yet, so it is refused)
runtime                   required; a key of :data:`RUNTIMES` (``python``, ``command``)
entrypoint                required, one line, at most 1024 characters; what it may be
                          depends on the runtime (see :data:`RUNTIMES`)
resources.memory          required; ``512MB``, ``1GB``, ``256Mi``, ``1Gi``, ``512m``
                          (case-insensitive, decimals allowed); > 0 and at most 64 GB
resources.cpu             required; cores ``0.5``, ``2`` or millicores ``500m``; at least
                          0.001 (1m), at most 64
resources.storage         optional (default ``1GB``); same format and limits as memory
replicas                  1 to 20 (0, the proto default, is "is required")
env                       at most 64 entries; names ``[A-Z_][A-Z0-9_]*`` of at most 128
                          characters, not starting with ``A67_`` (reserved for the
                          platform); values at most 4 KiB (UTF-8), no NUL; names and
                          values together at most 64 KiB
health_check.path         backend: default ``/health``; worker: default empty (no HTTP
                          check: the replica is healthy while its process runs). A path
                          starts with ``/``, at most 256 characters, URL characters only
health_check.interval     seconds, 2 to 300, default 10 (2 at least, because the timeout
                          is at least 1 s and must be shorter)
health_check.timeout      seconds, 1 to 60 and less than the interval, default 2
health_check.retries      failures in a row before unhealthy, 1 to 10, default 3
source_tar_gz             required (not empty), at most :data:`MAX_SOURCE_BYTES` (10 MiB)
========================  =================================================================

Sizes: 1 MB = 1 MiB = 2^20 bytes, as container runtimes count memory (see
:mod:`controller.scheduling.snapshot`); ``MB``, ``M``, ``Mi`` and ``MiB`` are
the same unit, and so are ``GB``, ``G``, ``Gi`` and ``GiB`` (1024 MB). A value
that is not a whole number of MB is rounded up.

Messages never contain env values (they are secrets).

>>> from automator67.v1 import deployment_pb2 as pb
>>> valid = validate_manifest(pb.DeploymentManifest(
...     name="hello", app_type=pb.APP_TYPE_BACKEND, runtime="python", entrypoint="app.py",
...     resources=pb.Resources(memory="512MB", cpu="500m"), replicas=2), source_size=1000)
>>> valid.memory_mb, valid.cpu_cores, valid.disk_mb, valid.argv
(512, 0.5, 1024, ('python3', 'app.py'))
>>> valid.health_check
HealthCheckSpec(path='/health', interval_seconds=10, timeout_seconds=2, retries=3)
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from automator67.v1 import deployment_pb2

from controller.deployments.manifest_health import (
    DEFAULT_HEALTH_PATH,
    DEFAULT_INTERVAL_SECONDS,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT_SECONDS,
    HealthCheckSpec,
    _validate_health,
)
from controller.deployments.manifest_units import parse_cpu, parse_size_mb
from controller.errors import FieldViolation, require_fields
from controller.scheduling.snapshot import ReplicaRequest

REQUIRED = "is required"

MAX_SOURCE_BYTES = 10 * 1024 * 1024
"""Largest accepted ``source_tar_gz`` (compressed), in bytes: 10 MiB."""

NAME_PATTERN = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
"""An app name: a DNS label (RFC 1123), so it can become a host name."""

MAX_ENTRYPOINT_CHARS = 1024
"""Longest entrypoint, in characters."""

DEFAULT_STORAGE = "1GB"
"""Disk a replica gets when ``resources.storage`` is empty."""

MIN_REPLICAS = 1
MAX_REPLICAS = 20
"""Bounds of ``replicas``: one replica per node, and a deployment is not a fleet."""

MAX_ENV_ENTRIES = 64
"""Most env entries per manifest."""

MAX_ENV_NAME_CHARS = 128
"""Longest env name."""

MAX_ENV_VALUE_BYTES = 4 * 1024
"""Largest env value, in UTF-8 bytes."""

MAX_ENV_TOTAL_BYTES = 64 * 1024
"""Largest sum of all env names and values, in UTF-8 bytes."""

RESERVED_ENV_PREFIX = "A67_"
"""Env names the platform sets itself (``A67_PORT``, ``A67_DEPLOYMENT_ID``…)."""

ENV_NAME_PATTERN = re.compile(r"[A-Z_][A-Z0-9_]*")

APP_TYPES: Mapping[int, str] = MappingProxyType(
    {deployment_pb2.APP_TYPE_BACKEND: "backend", deployment_pb2.APP_TYPE_WORKER: "worker"}
)
"""Supported app types by proto value. ``backend`` serves HTTP on the port the agent
gives it (env ``PORT``) and is health-checked over HTTP; ``worker`` runs without a
port. ``cron`` is refused until the manifest can carry a schedule."""

_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Runtime:
    """What a runtime runs and what it needs from the app."""

    name: str
    """The manifest's ``runtime`` value."""

    needs: str
    """What the app must provide, for people (shown in docs and errors)."""

    interpreter: tuple[str, ...]
    """Put before the entrypoint's words to make the command; the agent may replace
    ``python3`` with its own interpreter."""

    base_image: str
    """The image the generated Dockerfile starts from."""


RUNTIMES: Mapping[str, Runtime] = MappingProxyType(
    {
        "python": Runtime(
            name="python",
            needs=(
                "entrypoint: a .py file inside the source, by relative path ('app.py', 'src/main.py'), "
                "or '-m module'; optional arguments after it. Dependencies in requirements.txt at the "
                "source root are installed with pip. A backend listens on the port in env PORT."
            ),
            interpreter=("python3",),
            base_image="python:3.11-slim",
        ),
        "command": Runtime(
            name="command",
            needs=(
                "entrypoint: a command line split like a shell would (shlex) but run without a shell "
                "(no pipes, globs or $VARS); the program is a path inside the source ('./run.sh', "
                "'bin/server') or a program on the node's PATH. A backend listens on the port in env PORT."
            ),
            interpreter=(),
            base_image="debian:bookworm-slim",
        ),
    }
)
"""The supported runtimes by name."""


@dataclass(frozen=True)
class ValidManifest:
    """A manifest that passed :func:`validate_manifest`, parsed, with defaults filled in."""

    name: str
    app_type: str
    """``backend`` or ``worker`` (see :data:`APP_TYPES`)."""
    runtime: str
    entrypoint: str
    """As given (stripped of surrounding spaces)."""
    argv: tuple[str, ...]
    """The command the agent runs in the app directory: the runtime's interpreter and
    the entrypoint's words."""
    entrypoint_file: str | None
    """The file inside the source the entrypoint names, normalised (``src/app.py``);
    ``None`` for ``-m module`` or a program on PATH. Packaging checks it exists."""
    cpu_cores: float
    memory_mb: int
    disk_mb: int
    replicas: int
    env: Mapping[str, str] = field(repr=False)
    """Env names and values (secret: not in repr, never in messages or manifest.json)."""
    health_check: HealthCheckSpec
    atomic: bool

    def replica_request(self) -> ReplicaRequest:
        """What one replica needs from a node, for placement."""
        return ReplicaRequest(cpu_cores=self.cpu_cores, memory_mb=self.memory_mb, disk_mb=self.disk_mb)

    def public_dict(self) -> dict[str, Any]:
        """The manifest without env values (names only): what ``manifest.json`` holds."""
        return {
            "name": self.name,
            "app_type": self.app_type,
            "runtime": self.runtime,
            "entrypoint": self.entrypoint,
            "argv": list(self.argv),
            "resources": {"cpu_cores": self.cpu_cores, "memory_mb": self.memory_mb, "disk_mb": self.disk_mb},
            "replicas": self.replicas,
            "env_names": sorted(self.env),
            "health_check": {
                "path": self.health_check.path,
                "interval_seconds": self.health_check.interval_seconds,
                "timeout_seconds": self.health_check.timeout_seconds,
                "retries": self.health_check.retries,
            },
            "atomic": self.atomic,
        }

    def public_json(self) -> str:
        """:meth:`public_dict` as canonical JSON (sorted keys, two-space indent, newline)."""
        return json.dumps(self.public_dict(), sort_keys=True, indent=2) + "\n"


def _relative_path_problem(path: str) -> str | None:
    if path.startswith("/"):
        return "must be a path relative to the source root, not absolute"
    if "\\" in path:
        return "must use '/' between directories"
    if ".." in path.split("/"):
        return "must stay inside the source (no '..')"
    return None


def _normalise(path: str) -> str:
    return "/".join(part for part in path.split("/") if part not in ("", "."))


def _entrypoint(runtime: Runtime, entrypoint: str) -> tuple[tuple[str, ...], str | None] | str:
    """(argv, file inside the source or None) for a valid entrypoint, else what is wrong."""
    if runtime.name == "python" and "\\" in entrypoint:
        return "must not contain backslashes: use '/' between directories"
    try:
        words = shlex.split(entrypoint)
    except ValueError as exc:
        return f"is not a valid command line: {exc}"
    if not words:
        return REQUIRED
    program = words[0]
    if runtime.name == "python":
        if program in ("python", "python3") or program.startswith("python3."):
            return f"must not include the interpreter: write {shlex.join(words[1:]) or 'app.py'!r}"
        if program == "-m":
            if len(words) < 2 or not _MODULE.fullmatch(words[1]):
                return "must name a module after -m, like '-m myapp'"
            return (*runtime.interpreter, *words), None
        if not program.endswith(".py"):
            return "must be a .py file inside the source (like 'app.py') or '-m module'"
        problem = _relative_path_problem(program)
        if problem:
            return problem
        file = _normalise(program)
        if not file.endswith(".py") or file == ".py":
            return "must be a .py file inside the source (like 'app.py') or '-m module'"
        return (*runtime.interpreter, file, *words[1:]), file
    # the generic command runtime
    if "/" in program and not program.startswith("/"):
        problem = _relative_path_problem(program)
        if problem:
            return problem
        file = _normalise(program)
        if not file:
            return "must name a program"
        return (*runtime.interpreter, f"./{file}", *words[1:]), file
    return (*runtime.interpreter, *words), None


def _env_field(name: str) -> str:
    shown = name if len(name) <= MAX_ENV_NAME_CHARS else name[:MAX_ENV_NAME_CHARS] + "…"
    return f"manifest.env[{json.dumps(shown, ensure_ascii=False)}]"


def _validate_env(env: Mapping[str, str], violations: list[FieldViolation]) -> None:
    if len(env) > MAX_ENV_ENTRIES:
        violations.append(
            FieldViolation("manifest.env", f"must have at most {MAX_ENV_ENTRIES} entries (got {len(env)})")
        )
    total = 0
    for name in sorted(env):
        value = env[name]
        size = len(value.encode("utf-8", "surrogatepass"))
        total += len(name.encode("utf-8", "surrogatepass")) + size
        where = _env_field(name)
        if len(name) > MAX_ENV_NAME_CHARS:
            violations.append(FieldViolation(where, f"name must be at most {MAX_ENV_NAME_CHARS} characters"))
        elif not ENV_NAME_PATTERN.fullmatch(name):
            violations.append(
                FieldViolation(
                    where, "name must be upper-case letters, digits and '_', not starting with a digit"
                )
            )
        elif name.startswith(RESERVED_ENV_PREFIX):
            violations.append(
                FieldViolation(where, f"names starting with {RESERVED_ENV_PREFIX} are reserved")
            )
        if size > MAX_ENV_VALUE_BYTES:
            violations.append(
                FieldViolation(where, f"value must be at most {MAX_ENV_VALUE_BYTES} bytes (got {size})")
            )
        if "\x00" in value:
            violations.append(FieldViolation(where, "value must not contain NUL characters"))
    if total > MAX_ENV_TOTAL_BYTES:
        violations.append(
            FieldViolation(
                "manifest.env",
                f"names and values must total at most {MAX_ENV_TOTAL_BYTES} bytes (got {total})",
            )
        )


def validate_manifest(manifest: deployment_pb2.DeploymentManifest, *, source_size: int) -> ValidManifest:
    """Check every field of ``manifest`` (and the source's size) and return the parsed values.

    Raises ``InvalidArgument`` with one field violation per problem, all at once.
    ``source_size`` is ``len(source_tar_gz)``.
    """
    violations: list[FieldViolation] = []

    name = manifest.name
    if not name:
        violations.append(FieldViolation("manifest.name", REQUIRED))
    elif not NAME_PATTERN.fullmatch(name):
        violations.append(
            FieldViolation(
                "manifest.name",
                "must be 1 to 63 lower-case letters, digits and '-', starting and ending with a letter or digit",
            )
        )

    app_type = APP_TYPES.get(manifest.app_type)
    if manifest.app_type == deployment_pb2.APP_TYPE_UNSPECIFIED:
        violations.append(FieldViolation("manifest.app_type", REQUIRED))
    elif manifest.app_type == deployment_pb2.APP_TYPE_CRON:
        violations.append(
            FieldViolation("manifest.app_type", "cron is not supported yet: the manifest has no schedule")
        )
    elif app_type is None:
        violations.append(FieldViolation("manifest.app_type", "must be APP_TYPE_BACKEND or APP_TYPE_WORKER"))

    runtime = RUNTIMES.get(manifest.runtime)
    if not manifest.runtime:
        violations.append(FieldViolation("manifest.runtime", REQUIRED))
    elif runtime is None:
        violations.append(
            FieldViolation("manifest.runtime", f"must be one of: {', '.join(sorted(RUNTIMES))}")
        )

    entrypoint = manifest.entrypoint.strip()
    argv: tuple[str, ...] = ()
    entrypoint_file: str | None = None
    if not entrypoint:
        violations.append(FieldViolation("manifest.entrypoint", REQUIRED))
    elif len(entrypoint) > MAX_ENTRYPOINT_CHARS:
        violations.append(
            FieldViolation("manifest.entrypoint", f"must be at most {MAX_ENTRYPOINT_CHARS} characters")
        )
    elif _CONTROL.search(entrypoint):
        violations.append(
            FieldViolation("manifest.entrypoint", "must be one line without control characters")
        )
    elif runtime is not None:
        parsed = _entrypoint(runtime, entrypoint)
        if isinstance(parsed, str):
            violations.append(FieldViolation("manifest.entrypoint", parsed))
        else:
            argv, entrypoint_file = parsed

    resources = manifest.resources
    memory_mb = 0
    if not resources.memory.strip():
        violations.append(FieldViolation("manifest.resources.memory", REQUIRED))
    else:
        memory = parse_size_mb(resources.memory)
        if isinstance(memory, str):
            violations.append(FieldViolation("manifest.resources.memory", memory))
        else:
            memory_mb = memory
    cpu_cores = 0.0
    if not resources.cpu.strip():
        violations.append(FieldViolation("manifest.resources.cpu", REQUIRED))
    else:
        cpu = parse_cpu(resources.cpu)
        if isinstance(cpu, str):
            violations.append(FieldViolation("manifest.resources.cpu", cpu))
        else:
            cpu_cores = cpu
    disk = parse_size_mb(resources.storage if resources.storage.strip() else DEFAULT_STORAGE)
    disk_mb = 0
    if isinstance(disk, str):
        violations.append(FieldViolation("manifest.resources.storage", disk))
    else:
        disk_mb = disk

    replicas = manifest.replicas
    if replicas == 0:
        violations.append(FieldViolation("manifest.replicas", REQUIRED))
    elif not MIN_REPLICAS <= replicas <= MAX_REPLICAS:
        violations.append(
            FieldViolation(
                "manifest.replicas", f"must be between {MIN_REPLICAS} and {MAX_REPLICAS} (got {replicas})"
            )
        )

    env = dict(manifest.env)
    _validate_env(env, violations)
    health_check = _validate_health(manifest.health_check, app_type, violations)

    if source_size <= 0:
        violations.append(FieldViolation("source_tar_gz", REQUIRED))
    elif source_size > MAX_SOURCE_BYTES:
        violations.append(
            FieldViolation(
                "source_tar_gz", f"must be at most {MAX_SOURCE_BYTES} bytes (10 MiB), got {source_size}"
            )
        )

    require_fields(violations, "Invalid deployment manifest")
    assert app_type is not None
    assert runtime is not None
    return ValidManifest(
        name=name,
        app_type=app_type,
        runtime=runtime.name,
        entrypoint=entrypoint,
        argv=argv,
        entrypoint_file=entrypoint_file,
        cpu_cores=cpu_cores,
        memory_mb=memory_mb,
        disk_mb=disk_mb,
        replicas=replicas,
        env=MappingProxyType(env),
        health_check=health_check,
        atomic=manifest.atomic,
    )


def with_effective_values(manifest: deployment_pb2.DeploymentManifest) -> deployment_pb2.DeploymentManifest:
    """``manifest`` (changed in place and returned) with the defaults that apply filled in,
    so that what ``GetDeployment`` shows is what runs: the health check's path (a backend's
    ``/health``), interval, timeout and retries, and the storage request (``1GB``).

    >>> m = with_effective_values(deployment_pb2.DeploymentManifest(app_type=deployment_pb2.APP_TYPE_BACKEND))
    >>> (m.health_check.path, m.health_check.interval_seconds, m.health_check.timeout_seconds,
    ...  m.health_check.retries, m.resources.storage)
    ('/health', 10, 2, 3, '1GB')
    """
    check = manifest.health_check
    if not check.path.strip() and APP_TYPES.get(manifest.app_type) != "worker":
        check.path = DEFAULT_HEALTH_PATH
    if check.interval_seconds == 0:
        check.interval_seconds = DEFAULT_INTERVAL_SECONDS
    if check.timeout_seconds == 0:
        check.timeout_seconds = DEFAULT_TIMEOUT_SECONDS
    if check.retries == 0:
        check.retries = DEFAULT_RETRIES
    if not manifest.resources.storage.strip():
        manifest.resources.storage = DEFAULT_STORAGE
    return manifest
