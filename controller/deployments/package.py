"""Application packages: the user's source tarball in, a deterministic package out.

:func:`build_package` reads the user's ``source_tar_gz`` defensively and builds
the package that agents receive::

    Dockerfile        generated for the runtime (see RUNTIMES in manifest.py)
    app/...           the source, as regular files and directories only
    manifest.json     the validated manifest without env values (names only)

as a gzipped tar whose bytes depend only on the content: members sorted by
name, mtime 0, uid/gid 0, no user or group names, modes 0644 (0755 for
executables and directories), gzip header mtime 0. The same source and
manifest always give the same SHA-256 (with the same zlib), so the checksum
identifies a version.

What the source may hold (anything else → ``InvalidArgument`` on field
``source_tar_gz`` with a description naming the member):

* at most :data:`~controller.deployments.package_unpack.MAX_MEMBERS` members and
  :data:`~controller.deployments.package_unpack.MAX_UNPACKED_BYTES` of file
  data (the zip-bomb guard: sizes are checked from the headers before any data
  is read, and the decompressed stream itself is capped, so huge headers cannot
  get round it);
* regular files and directories, with relative names that stay inside the
  archive (no absolute paths, no ``..``, no backslashes, no control characters,
  valid UTF-8), each name once;
* symbolic and hard links whose targets resolve, inside the archive, to a
  regular file: they become copies of that file (the package holds no links).
  Links pointing outside, to nothing, to a directory, or in a loop are refused;
* no device files, FIFOs or sparse files.

The file the entrypoint names (``app.py``, ``./bin/server``) must be a file of
the source; the ``command`` runtime's program is made executable.

:func:`verify_package` (checks a package against its checksum) and
:func:`unpack_package` (extracts one safely, what agents do, accepting only
regular files and directories) are in :mod:`controller.deployments.package_unpack`,
with the limits and the checked archive reader that building uses too.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, cast

from controller.deployments.manifest import RUNTIMES, ValidManifest
from controller.deployments.package_unpack import (
    DEFAULT_LIMITS,
    PackageLimits,
    _invalid,
    _read_archive,
    _shown,
)
from controller.errors import InvalidArgument

PACKAGE_APP_DIR = "app"
"""Where the source goes inside the package."""

SOURCE_FIELD = "source_tar_gz"

_MAX_LINK_HOPS = 40


@dataclass(frozen=True)
class Package:
    """A built package: the gzipped tarball, its SHA-256 (hex) and its size in bytes."""

    data: bytes = field(repr=False)
    sha256: str
    size: int


def _resolve_link(name: str, links: dict[str, str]) -> str | None:
    """Where the symlink ``name`` leads inside the archive, following links in every
    component; ``None`` if it leaves the archive. Raises ``RecursionError`` on a loop."""
    pending = list(reversed(name.split("/")))
    resolved: list[str] = []
    hops = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not resolved:
                return None
            resolved.pop()
            continue
        candidate = "/".join([*resolved, part])
        target = links.get(candidate)
        if target is None:
            resolved.append(part)
            continue
        hops += 1
        if hops > _MAX_LINK_HOPS:
            raise RecursionError(name)
        if target.startswith("/"):
            return None
        pending.extend(reversed(target.split("/")))
    return "/".join(resolved)


def _load_source(
    source: bytes | Path, limits: PackageLimits
) -> tuple[dict[str, tuple[bytes, bool]], set[str]]:
    """The source's regular files (name → (data, executable)) with links replaced by
    copies, and its directories."""
    where = SOURCE_FIELD
    files: dict[str, tuple[bytes, bool]] = {}
    dirs: set[str] = set()
    symlinks: dict[str, str] = {}
    hardlinks: dict[str, str] = {}
    seen: set[str] = set()
    with closing(_read_archive(source, limits, where)) as entries:
        for entry in entries:
            if not entry.name:
                if entry.kind == "dir":
                    continue  # the archive root, "./"
                raise _invalid(where, "has a member without a name")
            if entry.name in seen:
                raise _invalid(where, f"holds {_shown(entry.name)} twice")
            seen.add(entry.name)
            if entry.kind == "file":
                files[entry.name] = (entry.data, entry.executable)
            elif entry.kind == "dir":
                dirs.add(entry.name)
            elif entry.kind == "symlink":
                symlinks[entry.name] = entry.link
            else:
                hardlinks[entry.name] = entry.link

    not_dirs = files.keys() | symlinks.keys() | hardlinks.keys()
    for name in seen:
        parts = name.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in not_dirs:
                raise _invalid(where, f"{_shown(name)} is inside {_shown(parent)}, which is not a directory")

    total = sum(len(data) for data, _ in files.values())

    def copy(name: str, target: str) -> None:
        nonlocal total
        content, executable = files[target]
        total += len(content)
        if total > limits.max_unpacked_bytes:
            raise _invalid(
                where, f"expands to more than {limits.max_unpacked_bytes} bytes once links are copied"
            )
        files[name] = (content, executable)

    for name, target in hardlinks.items():
        if target not in files:
            raise _invalid(where, f"hard link {_shown(name)} must point to a regular file in the archive")
    for name, target in hardlinks.items():
        copy(name, target)
    plain_files = set(files)
    for name in sorted(symlinks):
        try:
            final = _resolve_link(name, symlinks)
        except RecursionError:
            raise _invalid(where, f"symlink {_shown(name)} is part of a loop") from None
        if final is None:
            raise _invalid(where, f"symlink {_shown(name)} points outside the archive")
        if final in plain_files:
            copy(name, final)
        elif final in dirs or any(path.startswith(final + "/") for path in plain_files) or final == "":
            raise _invalid(
                where, f"symlink {_shown(name)} points to a directory (not supported: copy it instead)"
            )
        else:
            raise _invalid(where, f"symlink {_shown(name)} points to nothing in the archive")
    return files, dirs


def render_dockerfile(manifest: ValidManifest, *, has_requirements: bool) -> str:
    """The Dockerfile of the package for ``manifest``'s runtime (env values never appear)."""
    runtime = RUNTIMES[manifest.runtime]
    lines = [
        f"# Generated by Automator67 for app {manifest.name} (runtime {runtime.name}). Do not edit.",
        f"FROM {runtime.base_image}",
        "WORKDIR /app",
        "COPY app/ /app/",
    ]
    if runtime.name == "python":
        if has_requirements:
            lines.append("RUN pip install --no-cache-dir -r requirements.txt")
        lines.append("ENV PYTHONUNBUFFERED=1")
    if manifest.app_type == "backend":
        lines += ["ENV PORT=8080", "EXPOSE 8080"]
    lines.append(f"CMD {json.dumps(list(manifest.argv))}")
    return "\n".join(lines) + "\n"


def _missing_entrypoint(file: str, files: dict[str, tuple[bytes, bool]]) -> InvalidArgument:
    description = f"{file!r} is not a file in source_tar_gz"
    nested = sorted(name for name in files if name.endswith("/" + file))
    if nested:
        top = nested[0][: -len(file) - 1]
        description += (
            f"; it is at {nested[0]!r}: make the archive from inside the directory "
            f"(tar -czf app.tar.gz -C {top} .) so that the app's files are at its root"
        )
    return _invalid("manifest.entrypoint", description)


def _tar_member(
    name: str, *, data: bytes = b"", directory: bool = False, executable: bool = False
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if directory:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.type = tarfile.REGTYPE
        info.mode = 0o755 if executable else 0o644
        info.size = len(data)
    return info


def _write_tar_gz(files: dict[str, tuple[bytes, bool]], dirs: set[str], out: IO[bytes]) -> None:
    """Write the deterministic gzipped tar of ``files`` and ``dirs`` to ``out``, streaming."""
    entries = sorted([(name, True) for name in dirs] + [(name, False) for name in files])
    with (
        gzip.GzipFile(filename="", fileobj=out, mode="wb", compresslevel=9, mtime=0) as compressed,
        tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as archive,
    ):
        for name, directory in entries:
            if directory:
                archive.addfile(_tar_member(name, directory=True))
            else:
                data, executable = files[name]
                archive.addfile(_tar_member(name, data=data, executable=executable), io.BytesIO(data))


def _deterministic_tar_gz(files: dict[str, tuple[bytes, bool]], dirs: set[str]) -> bytes:
    buffer = io.BytesIO()
    _write_tar_gz(files, dirs, buffer)
    return buffer.getvalue()


def _package_members(
    manifest: ValidManifest, source: bytes | Path, size: int, limits: PackageLimits
) -> tuple[dict[str, tuple[bytes, bool]], set[str]]:
    if not size:
        raise _invalid(SOURCE_FIELD, "is required")
    if size > limits.max_compressed_bytes:
        raise _invalid(SOURCE_FIELD, f"must be at most {limits.max_compressed_bytes} bytes")
    files, dirs = _load_source(source, limits)
    file = manifest.entrypoint_file
    if file is not None:
        if file not in files:
            raise _missing_entrypoint(file, files)
        if manifest.runtime == "command":
            files[file] = (files[file][0], True)

    package_files = {f"{PACKAGE_APP_DIR}/{name}": entry for name, entry in files.items()}
    package_dirs = {PACKAGE_APP_DIR} | {f"{PACKAGE_APP_DIR}/{name}" for name in dirs}
    for name in package_files:
        parts = name.split("/")
        package_dirs.update("/".join(parts[:depth]) for depth in range(1, len(parts)))
    dockerfile = render_dockerfile(manifest, has_requirements="requirements.txt" in files)
    package_files["Dockerfile"] = (dockerfile.encode(), False)
    package_files["manifest.json"] = (manifest.public_json().encode(), False)
    return package_files, package_dirs


def build_package(
    manifest: ValidManifest, source_tar_gz: bytes, *, limits: PackageLimits = DEFAULT_LIMITS
) -> Package:
    """Check the source, and build the deterministic package for ``manifest`` (see the module doc).

    Raises ``InvalidArgument`` on field ``source_tar_gz`` for an unacceptable
    archive, and on ``manifest.entrypoint`` if the file it names is missing.
    """
    files, dirs = _package_members(manifest, source_tar_gz, len(source_tar_gz), limits)
    data = _deterministic_tar_gz(files, dirs)
    return Package(data=data, sha256=hashlib.sha256(data).hexdigest(), size=len(data))


class _PackageSink(Protocol):
    hasher: Any
    size: int

    def write(self, data: bytes) -> int: ...
    def commit(self, target: Path) -> None: ...
    def discard(self) -> None: ...


def build_package_file(
    manifest: ValidManifest,
    source: Path,
    sink: _PackageSink,
    packages_dir: Path,
    *,
    limits: PackageLimits = DEFAULT_LIMITS,
) -> tuple[str, int, Path]:
    """:func:`build_package` from the source file ``source``, written (and hashed) straight
    into ``sink`` and committed to ``packages_dir/<sha256>``: (SHA-256, size, path).

    Blocking and CPU-heavy (decompression, compression, hashing): run it in a worker
    thread. The sink is discarded on any failure, so nothing is half-stored."""
    try:
        files, dirs = _package_members(manifest, source, source.stat().st_size, limits)
        _write_tar_gz(files, dirs, cast(IO[bytes], sink))
        digest = str(sink.hasher.hexdigest())
        target = packages_dir / digest
        sink.commit(target)
        return digest, sink.size, target
    except BaseException:
        sink.discard()
        raise
