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

* at most :data:`MAX_MEMBERS` members and :data:`MAX_UNPACKED_BYTES` of file
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

:func:`verify_package` checks a package against its checksum and
:func:`unpack_package` extracts one safely (what agents do), accepting only
regular files and directories.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import io
import json
import os
import re
import shutil
import tarfile
import zlib
from collections.abc import Generator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, cast

from controller.deployments.manifest import MAX_SOURCE_BYTES, RUNTIMES, ValidManifest
from controller.errors import FieldViolation, InvalidArgument

MAX_MEMBERS = 10_000
"""Most members (files, directories, links) a source archive may have."""

MAX_UNPACKED_BYTES = 100 * 1024 * 1024
"""Most bytes of file data a source (or package) may expand to: 100 MiB."""

HEADER_ALLOWANCE_BYTES = 2048
"""Per member, how many bytes of tar headers (and padding) the decompressed stream may
carry beyond the file data before it counts as a bomb."""

PACKAGE_APP_DIR = "app"
"""Where the source goes inside the package."""

SOURCE_FIELD = "source_tar_gz"
PACKAGE_FIELD = "package"

_GZIP_MAGIC = b"\x1f\x8b"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_LINK_HOPS = 40
_FILE_TYPES = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE})


@dataclass(frozen=True, slots=True)
class PackageLimits:
    """Bounds on what a source archive or a package may hold (tests shrink them)."""

    max_members: int = MAX_MEMBERS
    """Most members."""

    max_unpacked_bytes: int = MAX_UNPACKED_BYTES
    """Most bytes of file data once decompressed."""

    max_compressed_bytes: int = MAX_SOURCE_BYTES
    """Most bytes of the compressed source (packages are not bounded by this)."""


DEFAULT_LIMITS = PackageLimits()


@dataclass(frozen=True)
class Package:
    """A built package: the gzipped tarball, its SHA-256 (hex) and its size in bytes."""

    data: bytes = field(repr=False)
    sha256: str
    size: int


class _TooLarge(Exception):
    """The decompressed stream went past its cap."""


class _Capped:
    """A reader that refuses to deliver more than ``limit`` bytes in total."""

    def __init__(self, raw: gzip.GzipFile, limit: int) -> None:
        self._raw = raw
        self._limit = limit
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        wanted = self._limit - self.count + 1 if size is None or size < 0 else size
        data = self._raw.read(wanted)
        self.count += len(data)
        if self.count > self._limit:
            raise _TooLarge
        return data


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    """Clean relative name ('' for the archive root)."""
    kind: str
    """file, dir, symlink or hardlink."""
    data: bytes = b""
    executable: bool = False
    link: str = ""
    """Symlink target as written, or hard link target as a clean name."""


def _invalid(where: str, description: str) -> InvalidArgument:
    return InvalidArgument(
        f"Invalid {where}: {description}", field_violations=[FieldViolation(where, description)]
    )


def _shown(name: str) -> str:
    text = name if len(name) <= 200 else name[:200] + "…"
    return repr(text)  # escapes control characters and undecodable bytes


def _clean_name(raw: str) -> str | None:
    """The normalised relative name, or ``None`` if ``raw`` is not acceptable."""
    if raw.startswith("/") or "\\" in raw or _CONTROL.search(raw):
        return None
    parts = [part for part in raw.split("/") if part not in ("", ".")]
    if ".." in parts:
        return None
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return "/".join(parts)


def _name_problem(raw: str) -> str:
    if raw.startswith("/"):
        return f"member {_shown(raw)} has an absolute path"
    if "\\" in raw:
        return f"member {_shown(raw)} contains a backslash"
    if _CONTROL.search(raw):
        return f"member {_shown(raw)} has control characters in its name"
    if ".." in raw.split("/"):
        return f"member {_shown(raw)} leads outside the archive ('..')"
    return f"member {_shown(raw)} has a name that is not valid UTF-8"


def _open_archive(data: bytes | Path, where: str) -> IO[bytes]:
    """A binary reader over ``data`` (bytes, or the path of a file) after checking the gzip magic."""
    handle: IO[bytes] = data.open("rb") if isinstance(data, Path) else io.BytesIO(data)
    if handle.read(2) != _GZIP_MAGIC:
        handle.close()
        raise _invalid(where, "is not gzip-compressed (expected a .tar.gz)")
    handle.seek(0)
    return handle


def _read_archive(data: bytes | Path, limits: PackageLimits, where: str) -> Generator[_Entry, None, None]:
    """The members of a gzipped tar (bytes or a file), checked against ``limits``, in archive order."""
    handle = _open_archive(data, where)
    cap = limits.max_unpacked_bytes + limits.max_members * HEADER_ALLOWANCE_BYTES + 64 * 1024
    count = 0
    total = 0
    try:
        raw = gzip.GzipFile(fileobj=handle, mode="rb")
        capped = cast(IO[bytes], _Capped(raw, cap))
        with (
            raw,
            tarfile.open(fileobj=capped, mode="r|", encoding="utf-8", errors="surrogateescape") as archive,
        ):
            for member in archive:
                count += 1
                if count > limits.max_members:
                    raise _invalid(where, f"has more than {limits.max_members} members")
                name = _clean_name(member.name)
                if name is None:
                    raise _invalid(where, _name_problem(member.name))
                if member.type in _FILE_TYPES and member.sparse is None:
                    total += member.size
                    if total > limits.max_unpacked_bytes:
                        raise _invalid(
                            where,
                            f"expands to more than {limits.max_unpacked_bytes} bytes "
                            f"({limits.max_unpacked_bytes // (1024 * 1024)} MiB)",
                        )
                    reader = archive.extractfile(member)
                    content = reader.read() if reader is not None else b""
                    yield _Entry(name, "file", content, executable=bool(member.mode & 0o111))
                elif member.type == tarfile.DIRTYPE:
                    yield _Entry(name, "dir")
                elif member.type == tarfile.SYMTYPE:
                    yield _Entry(name, "symlink", link=member.linkname)
                elif member.type == tarfile.LNKTYPE:
                    target = _clean_name(member.linkname)
                    if target is None or not target:
                        raise _invalid(where, f"hard link {_shown(member.name)} points outside the archive")
                    yield _Entry(name, "hardlink", link=target)
                elif member.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                    raise _invalid(where, f"member {_shown(member.name)} is a device file")
                elif member.type == tarfile.FIFOTYPE:
                    raise _invalid(where, f"member {_shown(member.name)} is a FIFO")
                elif member.type == tarfile.GNUTYPE_SPARSE or member.sparse is not None:
                    raise _invalid(where, f"member {_shown(member.name)} is a sparse file (not supported)")
                else:
                    raise _invalid(where, f"member {_shown(member.name)} has an unsupported type")
    except _TooLarge:
        raise _invalid(
            where,
            f"expands to more than {limits.max_unpacked_bytes} bytes "
            f"({limits.max_unpacked_bytes // (1024 * 1024)} MiB)",
        ) from None
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise _invalid(where, f"is not a valid gzipped tar archive ({type(exc).__name__})") from None
    finally:
        handle.close()


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


def verify_package(data: bytes, sha256: str) -> None:
    """Raise ``InvalidArgument`` (reason ``PACKAGE_CHECKSUM_MISMATCH``) unless ``data``
    has the SHA-256 ``sha256`` (lower-case hex)."""
    expected = sha256.strip().lower()
    if not _SHA256.fullmatch(expected):
        raise _invalid("package_sha256", "must be 64 hexadecimal characters")
    actual = hashlib.sha256(data).hexdigest()
    if not hmac.compare_digest(actual, expected):
        description = f"SHA-256 is {actual}, expected {expected}"
        raise InvalidArgument(
            f"Package checksum mismatch: {description}",
            reason="PACKAGE_CHECKSUM_MISMATCH",
            field_violations=[FieldViolation(PACKAGE_FIELD, description)],
        )


def verify_package_file(path: Path, sha256: str) -> None:
    """:func:`verify_package` for a file, read in pieces (blocking: run in a worker thread)."""
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        while piece := handle.read(1024 * 1024):
            hasher.update(piece)
    expected = sha256.strip().lower()
    actual = hasher.hexdigest()
    if not hmac.compare_digest(actual, expected):
        description = f"SHA-256 is {actual}, expected {expected}"
        raise InvalidArgument(
            f"Package checksum mismatch: {description}",
            reason="PACKAGE_CHECKSUM_MISMATCH",
            field_violations=[FieldViolation(PACKAGE_FIELD, description)],
        )


def unpack_package(
    data: bytes | Path,
    dest_dir: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    limits: PackageLimits = DEFAULT_LIMITS,
) -> Path:
    """Extract a package into the empty (or new) directory ``dest_dir`` and return it.

    Verifies ``sha256`` first if given. Accepts only regular files and
    directories with clean relative names, within ``limits``, and never
    follows or creates a link; anything else raises ``InvalidArgument`` on field
    ``package`` and removes what was extracted. The app's code is in
    ``dest_dir / "app"``. Raises ``ValueError`` if ``dest_dir`` is not empty.
    """
    if sha256 is not None:
        if isinstance(data, Path):
            verify_package_file(data, sha256)
        else:
            verify_package(data, sha256)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise ValueError(f"{dest} is not empty")
    root = dest.resolve()
    try:
        with closing(_read_archive(data, limits, PACKAGE_FIELD)) as entries:
            for entry in entries:
                if not entry.name:
                    continue
                target = root / entry.name
                if entry.kind == "dir":
                    target.mkdir(parents=True, exist_ok=True)
                elif entry.kind == "file":
                    target.parent.mkdir(parents=True, exist_ok=True)
                    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                    descriptor = os.open(target, flags, 0o755 if entry.executable else 0o644)
                    with os.fdopen(descriptor, "wb") as handle:
                        handle.write(entry.data)
                else:
                    raise _invalid(
                        PACKAGE_FIELD, f"member {_shown(entry.name)} is a link (packages hold none)"
                    )
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
        _empty(root)
        raise _invalid(PACKAGE_FIELD, f"has conflicting members ({type(exc).__name__})") from None
    except BaseException:
        _empty(root)
        raise
    return root


def _empty(directory: Path) -> None:
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
