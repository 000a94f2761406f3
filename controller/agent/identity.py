"""The agent's identity on disk: its key, its certificate and its enrollment record.

The data directory (``--data-dir``, default ``~/.local/share/automator67-agent``,
created 0700) holds::

    node.key    the agent's EC P-256 private key (PKCS#8 PEM, 0600), created once and
                never replaced: it *is* the installation's identity
    node.crt    the client certificate the controller issued for the node id (CN=<node_id>)
    ca.crt      the controller CA, which signed node.crt and the controller's server certificate
    node.json   {"node_id", "controller_endpoint", "heartbeat_interval_ms"}

Every file is written atomically (temporary file, fsync, rename, fsync of the
directory); ``node.json`` is written last, so an enrollment is on disk either whole
or not at all. When all of ``node.json``, ``node.crt`` and ``ca.crt`` are present the
agent does not enroll again: it resumes as the same node.

The installation's **fingerprint** is the hex SHA-256 of the DER
SubjectPublicKeyInfo of ``node.key``: stable for as long as the key file lives,
which is how the controller recognises the same installation registering twice.

Key material is never logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = Path("~/.local/share/automator67-agent")
KEY_FILE = "node.key"
CERT_FILE = "node.crt"
CA_FILE = "ca.crt"
STATE_FILE = "node.json"
CSR_COMMON_NAME = "automator67-agent"
"""The CSR's subject; the controller ignores it and issues CN=<node_id>."""


class IdentityError(Exception):
    """The data directory holds something unusable (a corrupt key, a certificate for another key)."""


@dataclass(frozen=True)
class Enrollment:
    """What the controller gave this node when it registered."""

    node_id: str
    """The node's id; also the CN of its certificate."""
    controller_endpoint: str
    """host:port of the controller's node-facing (mutual TLS) port."""
    heartbeat_interval_ms: int
    """The heartbeat interval given at enrollment (each hello_ack may change it)."""
    certificate_pem: bytes = field(repr=False)
    """The node's client certificate (PEM)."""
    ca_certificate_pem: bytes = field(repr=False)
    """The controller CA certificate (PEM)."""


# --------------------------------------------------------------------------- files


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_temp(directory: Path, name: str, data: bytes, mode: int) -> Path:
    """Write ``data`` to a new temporary file beside ``name`` and fsync it."""
    tmp = directory / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return tmp


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically (readers see the old or the new file, whole)."""
    tmp = _write_temp(path.parent, path.name, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _write_new(path: Path, data: bytes, mode: int) -> bool:
    """Create ``path`` with ``data`` atomically unless it exists; True if this call created it."""
    tmp = _write_temp(path.parent, path.name, data, mode)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return True


# --------------------------------------------------------------------------- identity


def public_key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """Hex SHA-256 of the DER SubjectPublicKeyInfo of ``key``."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


class Identity:
    """The agent's key, certificate and enrollment record in its data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.expanduser()
        self._key: ec.EllipticCurvePrivateKey | None = None

    @property
    def key_path(self) -> Path:
        return self.data_dir / KEY_FILE

    @property
    def cert_path(self) -> Path:
        return self.data_dir / CERT_FILE

    @property
    def ca_path(self) -> Path:
        return self.data_dir / CA_FILE

    @property
    def state_path(self) -> Path:
        return self.data_dir / STATE_FILE

    def ensure_dir(self) -> None:
        """Create the data directory (0700) if it does not exist."""
        if not self.data_dir.is_dir():
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            log.info("created agent data directory %s", self.data_dir)

    def key(self) -> ec.EllipticCurvePrivateKey:
        """The installation's private key, generated into ``node.key`` (0600) on first use."""
        if self._key is not None:
            return self._key
        self.ensure_dir()
        if not self.key_path.exists():
            fresh = ec.generate_private_key(ec.SECP256R1())
            pem = fresh.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            if _write_new(self.key_path, pem, 0o600):
                log.info("generated the agent key %s", self.key_path)
        self._key = self._load_key()
        return self._key

    def _load_key(self) -> ec.EllipticCurvePrivateKey:
        path = self.key_path
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("%s was readable by others (mode %o); tightening it to 0600", path, mode)
            path.chmod(0o600)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"{path} is not a usable unencrypted PEM private key") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
            raise IdentityError(f"{path} is not an EC P-256 private key")
        return key

    def private_key_pem(self) -> bytes:
        """The private key as PKCS#8 PEM (for ``grpc.ssl_channel_credentials``)."""
        return self.key().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def fingerprint(self) -> str:
        """The installation's stable identity: hex SHA-256 of the key's DER SubjectPublicKeyInfo."""
        return public_key_fingerprint(self.key().public_key())

    def build_csr(self) -> str:
        """A PEM certificate signing request for the agent's key."""
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CSR_COMMON_NAME)]))
            .sign(self.key(), hashes.SHA256())
        )
        return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")

    # ----------------------------------------------------------------- enrollment

    def recorded_node_id(self) -> str | None:
        """The node id in ``node.json``, if the file exists and is readable (even when the
        certificates are missing)."""
        try:
            record = json.loads(self.state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        node_id = record.get("node_id") if isinstance(record, dict) else None
        return node_id if isinstance(node_id, str) and node_id else None

    def load(self) -> Enrollment | None:
        """The saved enrollment, or None when this installation has not enrolled (fully).

        Raises :class:`IdentityError` when the files are there but unusable.
        """
        if not (self.state_path.exists() and self.cert_path.exists() and self.ca_path.exists()):
            return None
        try:
            record: Any = json.loads(self.state_path.read_text(encoding="utf-8"))
            node_id = record["node_id"]
            endpoint = record["controller_endpoint"]
            interval = int(record["heartbeat_interval_ms"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IdentityError(f"{self.state_path} is unreadable or incomplete") from exc
        if not (isinstance(node_id, str) and node_id and isinstance(endpoint, str) and endpoint):
            raise IdentityError(f"{self.state_path} lacks node_id or controller_endpoint")
        enrollment = Enrollment(
            node_id=node_id,
            controller_endpoint=endpoint,
            heartbeat_interval_ms=interval,
            certificate_pem=self.cert_path.read_bytes(),
            ca_certificate_pem=self.ca_path.read_bytes(),
        )
        self.check_certificates(enrollment)
        return enrollment

    def check_certificates(self, enrollment: Enrollment) -> None:
        """Raise :class:`IdentityError` unless both certificates parse and the node
        certificate is for this installation's key."""
        try:
            cert = x509.load_pem_x509_certificate(enrollment.certificate_pem)
            x509.load_pem_x509_certificate(enrollment.ca_certificate_pem)
        except ValueError as exc:
            raise IdentityError("the node or CA certificate is not a valid PEM certificate") from exc
        cert_key = cert.public_key()
        if (
            not isinstance(cert_key, ec.EllipticCurvePublicKey)
            or public_key_fingerprint(cert_key) != self.fingerprint()
        ):
            raise IdentityError("the node certificate was not issued for this installation's key")

    def save(self, enrollment: Enrollment) -> None:
        """Write the certificates, then ``node.json`` (the commit point), atomically."""
        self.check_certificates(enrollment)
        self.ensure_dir()
        atomic_write(self.cert_path, enrollment.certificate_pem, 0o644)
        atomic_write(self.ca_path, enrollment.ca_certificate_pem, 0o644)
        record = {
            "node_id": enrollment.node_id,
            "controller_endpoint": enrollment.controller_endpoint,
            "heartbeat_interval_ms": enrollment.heartbeat_interval_ms,
        }
        atomic_write(self.state_path, (json.dumps(record, indent=2) + "\n").encode(), 0o600)
