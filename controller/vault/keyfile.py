"""The keyring file: where ``a67 vault rotate`` adds master keys and a running controller
reads them from (issue 16).

The keyring comes from ``A67_MASTER_KEYS`` (fixed for the life of the process), else
from ``A67_MASTER_KEYS_FILE``, else from the development file ``<data dir>/keys/master.keys``.
A file is re-read by the controller's rewrapper every few seconds, so adding a key with
``a67 vault rotate`` takes effect without a restart; with ``A67_MASTER_KEYS`` the
operator adds the entry to the variable and restarts the controllers one by one.

Writes are atomic (a temporary file renamed over the old one) and keep mode 0600.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

from controller.vault.keyring import Keyring

MASTER_KEYS_FILE = "master.keys"


def keyring_file(master_keys: str, master_keys_file: str, keys_dir: Path) -> Path | None:
    """The file the keyring lives in, or None when it comes from ``A67_MASTER_KEYS``."""
    if master_keys.strip():
        return None
    if master_keys_file:
        return Path(master_keys_file).expanduser()
    return keys_dir / MASTER_KEYS_FILE


def read_keyring(path: Path) -> Keyring:
    """Parse the keyring file (``ValueError`` naming the problem, never key bytes)."""
    try:
        text = path.read_text("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the keyring file {str(path)!r}: {exc}") from None
    return Keyring.parse(text.strip())


def write_keyring(path: Path, ring: Keyring) -> None:
    """Replace the keyring file atomically (mode 0600)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (ring.to_spec() + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def file_source(path: Path) -> Callable[[], Keyring | None]:
    """A keyring source for :class:`~controller.vault.rewrap.Rewrapper` that re-reads
    ``path`` when its modification time or size changes."""
    seen: tuple[int, int] | None = None

    def load() -> Keyring | None:
        nonlocal seen
        try:
            stat = path.stat()
        except OSError:
            return None
        mark = (stat.st_mtime_ns, stat.st_size)
        if mark == seen:
            return None
        ring = read_keyring(path)
        seen = mark
        return ring

    return load


__all__ = ["file_source", "keyring_file", "read_keyring", "write_keyring"]
