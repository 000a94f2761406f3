"""An app directory: its ``a67.toml`` manifest and the source tarball made from it.

``a67.toml`` (docs/cli.md has the full description)::

    name = "hello"              # a DNS label, unique among your apps
    type = "backend"            # backend (serves HTTP on $PORT) or worker
    runtime = "python"          # python or command
    entrypoint = "app.py"
    replicas = 2
    atomic = false              # roll back the whole rollout if any replica fails

    [resources]
    memory = "128MB"
    cpu = "0.25"
    storage = "1GB"             # optional

    [health_check]              # optional; backend default path is /health
    path = "/health"
    interval_seconds = 10
    timeout_seconds = 2
    retries = 3

    [env]                       # stored encrypted by the controller, never shown again
    GREETING = "hello"

Packing: every regular file and link under the directory except ``.git/``,
``__pycache__/``, ``.venv/``, ``*.pyc`` and what ``.a67ignore`` names (gitignore syntax),
in a deterministic gzipped tar (sorted, times and owners zeroed), so the same tree gives
the same SHA-256.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pathspec
from automator67.v1 import deployment_pb2

from controller.client.errors import USAGE, CliError

MANIFEST_FILE = "a67.toml"
IGNORE_FILE = ".a67ignore"
DEFAULT_IGNORES = (".git/", "__pycache__/", ".venv/", "*.pyc")

APP_TYPES = {
    "backend": deployment_pb2.APP_TYPE_BACKEND,
    "worker": deployment_pb2.APP_TYPE_WORKER,
    "cron": deployment_pb2.APP_TYPE_CRON,
}

_TOP_KEYS = {"name", "type", "app_type", "runtime", "entrypoint", "replicas", "atomic", "resources",
             "health_check", "env"}  # fmt: skip
_RESOURCE_KEYS = {"memory", "cpu", "storage"}
_HEALTH_KEYS = {"path", "interval_seconds", "timeout_seconds", "retries"}


def _bad(path: Path, problem: str) -> CliError:
    return CliError(f"{path}: {problem}.", exit_code=USAGE, reason="BAD_MANIFEST_FILE")


def app_type_value(text: str, where: Path | str = "--type") -> int:
    key = text.strip().lower().removeprefix("app_type_")
    if key not in APP_TYPES:
        raise _bad(Path(str(where)), f"type must be one of {', '.join(APP_TYPES)} (got {text!r})")
    return APP_TYPES[key]


def _table(data: Mapping[str, Any], key: str, allowed: set[str], path: Path) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise _bad(path, f"[{key}] must be a table")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise _bad(path, f"unknown key {unknown[0]!r} in [{key}] (known: {', '.join(sorted(allowed))})")
    return value


def _int(value: Any, name: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(path, f"{name} must be an integer")
    return value


def load_manifest(directory: Path) -> deployment_pb2.DeploymentManifest:
    """The manifest in ``directory/a67.toml`` (an empty one if the file is absent)."""
    path = directory / MANIFEST_FILE
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return deployment_pb2.DeploymentManifest()
    except tomllib.TOMLDecodeError as exc:
        raise _bad(path, f"not valid TOML ({exc})") from None
    except OSError as exc:
        raise _bad(path, f"cannot be read ({exc.strerror})") from None
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise _bad(path, f"unknown key {unknown[0]!r} (known: {', '.join(sorted(_TOP_KEYS))})")
    manifest = deployment_pb2.DeploymentManifest()
    for key in ("name", "runtime", "entrypoint"):
        if key in data:
            if not isinstance(data[key], str):
                raise _bad(path, f"{key} must be a string")
            setattr(manifest, key, data[key])
    kind = data.get("type", data.get("app_type"))
    if kind is not None:
        manifest.app_type = app_type_value(str(kind), path)  # type: ignore[assignment]
    if "replicas" in data:
        manifest.replicas = _int(data["replicas"], "replicas", path)
    if "atomic" in data:
        if not isinstance(data["atomic"], bool):
            raise _bad(path, "atomic must be true or false")
        manifest.atomic = data["atomic"]
    resources = _table(data, "resources", _RESOURCE_KEYS, path)
    for key, value in resources.items():
        setattr(manifest.resources, key, str(value))
    health = _table(data, "health_check", _HEALTH_KEYS, path)
    for key, value in health.items():
        if key == "path":
            manifest.health_check.path = str(value)
        else:
            setattr(manifest.health_check, key, _int(value, f"health_check.{key}", path))
    env = data.get("env", {})
    if not isinstance(env, dict):
        raise _bad(path, "[env] must be a table")
    for key, value in env.items():
        if not isinstance(value, str | int | float | bool):
            raise _bad(path, f"env.{key} must be a string")
        manifest.env[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return manifest


def parse_env_flags(values: tuple[str, ...], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``--env NAME=VALUE`` or ``--env NAME`` (the value of NAME in your environment)."""
    env = os.environ if environ is None else environ
    result: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep:
            if name not in env:
                raise CliError(
                    f"--env {name}: {name} is not set in your environment.",
                    exit_code=USAGE,
                    reason="ENV_NOT_SET",
                )
            value = env[name]
        result[name] = value
    return result


# -- packing ---------------------------------------------------------------------------------


def ignore_spec(directory: Path) -> pathspec.GitIgnoreSpec:
    lines = list(DEFAULT_IGNORES)
    ignore = directory / IGNORE_FILE
    if ignore.is_file():
        lines += ignore.read_text(encoding="utf-8").splitlines()
    return pathspec.GitIgnoreSpec.from_lines(lines)


def source_files(directory: Path) -> list[str]:
    """Relative paths (POSIX) of what goes into the package, sorted."""
    spec = ignore_spec(directory)
    chosen: list[str] = []
    for root, dirs, files in os.walk(directory):
        rel_root = Path(root).relative_to(directory)
        kept_dirs = []
        for name in sorted(dirs):
            rel = (rel_root / name).as_posix()
            if (Path(root) / name).is_symlink():
                if not spec.match_file(rel):
                    chosen.append(rel)
            elif not spec.match_file(rel + "/"):
                kept_dirs.append(name)
        dirs[:] = kept_dirs
        for name in sorted(files):
            rel = (rel_root / name).as_posix()
            if not spec.match_file(rel):
                chosen.append(rel)
    return sorted(chosen)


@dataclass
class PackedSource:
    file: IO[bytes]
    size: int
    sha256: str
    files: int

    def close(self) -> None:
        self.file.close()


class _Hashing(io.RawIOBase):
    def __init__(self, target: IO[bytes]) -> None:
        self.target = target
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self.digest.update(chunk)
        self.size += len(chunk)
        self.target.write(chunk)
        return len(chunk)


def pack(directory: Path) -> PackedSource:
    """A deterministic ``tar.gz`` of ``directory`` (see the module doc) in a temporary file."""
    if not directory.is_dir():
        raise CliError(f"{directory} is not a directory.", exit_code=USAGE, reason="NOT_A_DIRECTORY")
    files = source_files(directory)
    if not files:
        raise CliError(f"{directory} has nothing to deploy.", exit_code=USAGE, reason="EMPTY_SOURCE")
    spool = tempfile.TemporaryFile()  # noqa: SIM115 - returned to the caller, who closes it
    hashing = _Hashing(spool)
    with (
        gzip.GzipFile(fileobj=hashing, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as archive,
    ):
        for rel in files:
            info = archive.gettarinfo(str(directory / rel), arcname=rel)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if info.isreg():
                info.mode = 0o755 if info.mode & 0o111 else 0o644
                with open(directory / rel, "rb") as handle:
                    archive.addfile(info, handle)
            else:
                archive.addfile(info)
    spool.seek(0)
    return PackedSource(spool, hashing.size, hashing.digest.hexdigest(), len(files))
