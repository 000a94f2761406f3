"""Where the controller is, and the signed-in session, in the user's config directory.

Files (XDG Base Directory: ``$XDG_CONFIG_HOME/a67``, by default ``~/.config/a67``; the
directory is made 0700, the files 0600 and written atomically):

* ``config.toml`` - settings: ``controller = "host:port"`` (and ``ca_cert = "path"`` for TLS);
* ``credentials.json`` - per controller address: email, user id, access and refresh token and
  when the access token expires. Refreshing rotates the refresh token (it is single-use), so
  refreshes are serialised across processes by ``flock`` on ``credentials.lock``.

The controller address comes from ``--controller``, then ``A67_CONTROLLER``, then
``config.toml``, then ``127.0.0.1:50051`` (what ``a67 up`` listens on).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from controller.client.errors import USAGE, CliError

DEFAULT_CONTROLLER = "127.0.0.1:50051"
CONTROLLER_ENV = "A67_CONTROLLER"
CA_CERT_ENV = "A67_CA_CERT"
CONFIG_DIR_ENV = "A67_CONFIG_DIR"
"""Overrides the whole directory (tests, several identities side by side)."""


def config_dir(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get(CONFIG_DIR_ENV):
        return Path(env[CONFIG_DIR_ENV])
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "a67"


def _ensure_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, mode 0600, in a 0700 directory."""
    _ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class ClientConfig:
    controller: str = ""
    ca_cert: str = ""

    @classmethod
    def load(cls, directory: Path) -> ClientConfig:
        path = directory / "config.toml"
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls()
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise CliError(f"Cannot read {path}: {exc}", exit_code=USAGE, reason="BAD_CONFIG") from None
        return cls(controller=str(data.get("controller", "")), ca_cert=str(data.get("ca_cert", "")))

    def save(self, directory: Path) -> None:
        lines = [f"{key} = {json.dumps(value)}\n" for key, value in asdict(self).items() if value]
        write_private(directory / "config.toml", "".join(lines))


def resolve_controller(flag: str | None, directory: Path, environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return flag or env.get(CONTROLLER_ENV) or ClientConfig.load(directory).controller or DEFAULT_CONTROLLER


@dataclass
class StoredSession:
    email: str
    user_id: str
    access_token: str
    refresh_token: str
    access_expires_at: float
    """Unix time (local clock) when the access token expires."""

    def expires_within(self, seconds: float) -> bool:
        return time.time() + seconds >= self.access_expires_at


class CredentialStore:
    """``credentials.json``: one session per controller address."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "credentials.json"

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, controller: str) -> StoredSession | None:
        entry = self._read().get(controller)
        if not isinstance(entry, dict):
            return None
        try:
            return StoredSession(**entry)
        except TypeError:
            return None

    def put(self, controller: str, session: StoredSession) -> None:
        data = self._read()
        data[controller] = asdict(session)
        write_private(self.path, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def remove(self, controller: str) -> None:
        data = self._read()
        if data.pop(controller, None) is not None:
            write_private(self.path, json.dumps(data, indent=2, sort_keys=True) + "\n")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock across processes (a refresh must not run twice)."""
        _ensure_dir(self.directory)
        fd = os.open(self.directory / "credentials.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
