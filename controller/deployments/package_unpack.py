"""Reading archives safely, and what agents do with a package: verify it and unpack it.

The limits (:class:`PackageLimits`) and the checked reader of a gzipped tar serve
both sides: building a package from a user's source (``package.py``) and
unpacking a package here. :func:`verify_package` checks a package against its
checksum and :func:`unpack_package` extracts one safely, accepting only regular
files and directories.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import io
import os
import re
import shutil
import tarfile
import zlib
from collections.abc import Generator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

from controller.deployments.manifest import MAX_SOURCE_BYTES
from controller.errors import FieldViolation, InvalidArgument

MAX_MEMBERS = 10_000
"""Most members (files, directories, links) a source archive may have."""

MAX_UNPACKED_BYTES = 100 * 1024 * 1024
"""Most bytes of file data a source (or package) may expand to: 100 MiB."""

HEADER_ALLOWANCE_BYTES = 2048
"""Per member, how many bytes of tar headers (and padding) the decompressed stream may
carry beyond the file data before it counts as a bomb."""

PACKAGE_FIELD = "package"

_GZIP_MAGIC = b"\x1f\x8b"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SHA256 = re.compile(r"[0-9a-f]{64}")
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


def verify_package(data: bytes, sha256: str) -> None:
    """Raise ``InvalidArgument`` (reason ``PACKAGE_CHECKSUM_MISMATCH``) unless ``data``
    has the SHA-256 ``sha256`` (lower-case hex)."""
    expected = sha256.strip().lower()
    if not _SHA256.fullmatch(expected):
        raise _invalid("package_sha256", "must be 64 hexadecimal characters")
    _same_digest(hashlib.sha256(data).hexdigest(), expected)


def verify_package_file(path: Path, sha256: str) -> None:
    """:func:`verify_package` for a file, read in pieces (blocking: run in a worker thread)."""
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        while piece := handle.read(1024 * 1024):
            hasher.update(piece)
    _same_digest(hasher.hexdigest(), sha256.strip().lower())


def _same_digest(actual: str, expected: str) -> None:
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
