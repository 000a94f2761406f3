"""Key material at start-up: the vault keyring and the JWT signing key.

Production (``A67_ENVIRONMENT=production``) needs both configured explicitly:
``A67_MASTER_KEYS`` (the keyring, see :mod:`controller.vault.keyring`) and
``A67_JWT_PRIVATE_KEY_FILE`` (a PEM Ed25519 private key). Without them the
controller refuses to start (``FailedPrecondition``, reason ``MISSING_KEY_MATERIAL``).

Development: whatever is not configured is generated once into
``settings.keys_dir`` (directory 0700) as ``master.keys`` and ``jwt-ed25519.pem``
(files 0600, written atomically and never overwritten), with one WARNING log line;
later starts reuse them and log one INFO line. Explicit settings always win.

Example::

    material = load_key_material(settings)
    vault = Vault(material.keyring)
    tokens = TokenService.from_key_material(material, settings)

To create production key material::

    python -c "from controller.vault import Keyring; print(Keyring.generate('k1').to_spec())"
    openssl genpkey -algorithm ed25519 -out jwt-ed25519.pem && chmod 600 jwt-ed25519.pem

Key bytes are never logged.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from controller.config import Settings
from controller.errors import FailedPrecondition
from controller.vault.keyring import Keyring

log = logging.getLogger(__name__)

MASTER_KEYS_FILE = "master.keys"
JWT_KEY_FILE = "jwt-ed25519.pem"
REASON_MISSING = "MISSING_KEY_MATERIAL"
REASON_INVALID = "INVALID_KEY_MATERIAL"

_THUMBPRINT_CHARS = 16


@dataclass(frozen=True)
class KeyMaterial:
    """Everything the controller signs and encrypts with."""

    keyring: Keyring
    jwt_signing_key: Ed25519PrivateKey = field(repr=False)
    jwt_key_id: str
    verification_keys: dict[str, Ed25519PublicKey] = field(repr=False)
    """Public keys that tokens may be signed with, by ``kid`` (includes the signing key's)."""


def jwt_key_id(public_key: Ed25519PublicKey) -> str:
    """A short RFC 7638 JWK thumbprint (SHA-256, base64url, 16 characters) of ``public_key``."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")[:_THUMBPRINT_CHARS]


def load_key_material(settings: Settings) -> KeyMaterial:
    """Load (or, in development, generate once) the keyring and the JWT signing key.

    Raises ``FailedPrecondition`` (``MISSING_KEY_MATERIAL`` or ``INVALID_KEY_MATERIAL``)
    with a message naming the environment variable to fix.
    """
    production = settings.environment == "production"
    jwt_file = Path(settings.jwt_private_key_file).expanduser() if settings.jwt_private_key_file else None

    if production:
        problems = []
        if not settings.master_keys.strip() and not settings.master_keys_file:
            problems.append("A67_MASTER_KEYS (or A67_MASTER_KEYS_FILE) is not set")
        if jwt_file is None:
            problems.append("A67_JWT_PRIVATE_KEY_FILE is not set")
        elif not jwt_file.is_file():
            problems.append(f"A67_JWT_PRIVATE_KEY_FILE points to {str(jwt_file)!r}, which does not exist")
        if problems:
            raise FailedPrecondition(
                "refusing to start in production without key material: "
                + "; ".join(problems)
                + ". Set A67_MASTER_KEYS (comma-separated key_id:base64 32-byte keys) and "
                "A67_JWT_PRIVATE_KEY_FILE (a PEM Ed25519 private key).",
                reason=REASON_MISSING,
            )

    generated: list[str] = []
    reused: list[str] = []

    if settings.master_keys.strip():
        keyring = _parse_keyring(settings.master_keys, "A67_MASTER_KEYS")
    elif settings.master_keys_file:
        from controller.vault.keyfile import read_keyring

        try:
            keyring = read_keyring(Path(settings.master_keys_file).expanduser())
        except ValueError as exc:
            raise FailedPrecondition(f"A67_MASTER_KEYS_FILE: {exc}", reason=REASON_INVALID) from None
    else:
        keyring = _dev_keyring(settings.keys_dir, generated, reused)

    if jwt_file is not None:
        if not jwt_file.is_file():
            raise FailedPrecondition(
                f"A67_JWT_PRIVATE_KEY_FILE points to {str(jwt_file)!r}, which does not exist",
                reason=REASON_MISSING,
            )
        signing_key = _load_pem(jwt_file, "A67_JWT_PRIVATE_KEY_FILE")
    else:
        signing_key = _dev_jwt_key(settings.keys_dir, generated, reused)

    if generated:
        log.warning(
            "generated development keys in %s (0600); set A67_ENVIRONMENT=production with "
            "A67_MASTER_KEYS and A67_JWT_PRIVATE_KEY_FILE for real deployments",
            settings.keys_dir,
        )
    elif reused:
        log.info("using development keys from %s (%s)", settings.keys_dir, ", ".join(reused))

    public_key = signing_key.public_key()
    kid = jwt_key_id(public_key)
    verification = {kid: public_key}
    from controller.auth.signing_keys import load_retired_keys

    retired = load_retired_keys(settings.jwt_retired_public_key_files)
    for retired_kid, retired_key in retired.items():
        verification.setdefault(retired_kid, retired_key)
    if retired:
        log.info(
            "JWT signing key %s; also accepting tokens of retired keys %s until they expire",
            kid,
            ", ".join(sorted(k for k in retired if k != kid)),
        )
    return KeyMaterial(
        keyring=keyring,
        jwt_signing_key=signing_key,
        jwt_key_id=kid,
        verification_keys=verification,
    )


# -- parsing ---------------------------------------------------------------


def _parse_keyring(spec: str, source: str) -> Keyring:
    try:
        return Keyring.parse(spec)
    except ValueError as exc:  # the message names entries and key ids, never key bytes
        raise FailedPrecondition(f"{source} is not a valid keyring: {exc}", reason=REASON_INVALID) from None


def _load_pem(path: Path, source: str) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FailedPrecondition(
            f"{source}: cannot read {str(path)!r}: {exc.strerror}", reason=REASON_INVALID
        ) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise FailedPrecondition(
            f"{source}: {str(path)!r} is not an unencrypted PEM private key", reason=REASON_INVALID
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise FailedPrecondition(
            f"{source}: {str(path)!r} holds a {type(key).__name__}, but tokens are signed with Ed25519 "
            "(openssl genpkey -algorithm ed25519)",
            reason=REASON_INVALID,
        )
    return key


# -- development keys --------------------------------------------------------


def _dev_keyring(keys_dir: Path, generated: list[str], reused: list[str]) -> Keyring:
    path = keys_dir / MASTER_KEYS_FILE
    if not path.exists():
        spec = Keyring.generate("k1").to_spec()
        if _write_new_secret_file(path, (spec + "\n").encode("ascii")):
            generated.append(MASTER_KEYS_FILE)
            return Keyring.parse(spec)
    _tighten(path)
    reused.append(MASTER_KEYS_FILE)
    try:
        spec = path.read_bytes().decode("ascii")
    except (OSError, UnicodeDecodeError):
        raise FailedPrecondition(
            f"cannot read the development keyring {str(path)!r}: delete it to generate a new one "
            "(secrets encrypted with it become unreadable)",
            reason=REASON_INVALID,
        ) from None
    return _parse_keyring(spec, str(path))


def _dev_jwt_key(keys_dir: Path, generated: list[str], reused: list[str]) -> Ed25519PrivateKey:
    path = keys_dir / JWT_KEY_FILE
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        if _write_new_secret_file(path, pem):
            generated.append(JWT_KEY_FILE)
            return key
    _tighten(path)
    reused.append(JWT_KEY_FILE)
    return _load_pem(path, str(path))


def _ensure_private_dir(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(directory.stat().st_mode)
    if mode & 0o077:
        os.chmod(directory, 0o700)
        log.warning("tightened permissions of %s to 0700", directory)


def _tighten(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, 0o600)
        log.warning("%s was readable by others (mode %o); tightened to 0600", path, mode)


def _write_new_secret_file(path: Path, data: bytes) -> bool:
    """Atomically create ``path`` with mode 0600 holding ``data``; never overwrite.

    Returns False if another process created it first (then the caller reads theirs).
    """
    _ensure_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask can only remove bits, but be explicit
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic and fails if the target exists: no overwrite
        except FileExistsError:
            return False
        except OSError:
            if path.exists():
                return False
            os.rename(tmp, path)  # file systems without hard links
            tmp = path
    finally:
        if tmp != path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    _fsync_dir(path.parent)
    return True


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
