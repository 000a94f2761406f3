"""The controller's own certificate authority for node identity (TLS bootstrapping).

As kubelets do, a node proves who it is with a client certificate that the
controller signed: at registration the agent sends a CSR for a key it generated
itself (the private key never leaves the node), and the controller issues a
certificate for the node id it assigned. Later, on the node-facing port (mutual
TLS only), the certificate's identity *is* the node id.

Files (in ``settings.keys_dir``, directory 0700):

* ``node-ca.key``: the CA's EC P-256 private key (PKCS#8 PEM, mode 0600);
* ``node-ca.crt``: its self-signed certificate, valid 10 years (mode 0600 too,
  though it is public: agents get it in ``RegisterNodeResponse``).

Both are generated once, atomically and never overwritten (see
:mod:`controller.keys`), with one INFO log line; later starts reuse them. Losing
them means every node must enroll again.

Certificates issued:

* **node** (:meth:`CertificateAuthority.sign_node_csr`): subject ``CN=<node_id>``
  and SAN URI ``urn:automator67:node:<node_id>`` whatever the CSR asked for;
  extended key usage ``clientAuth`` only; ``CA:FALSE``; 365 days by default;
  a random 159-bit serial, reported as lower-case hex (``serial_hex``), which the
  node row keeps (``nodes.cert_serial``) so that a certificate of a removed or
  re-enrolled node is no longer accepted;
* **server** (:meth:`CertificateAuthority.server_certificate`): the serving
  certificate of the node-facing port, DNS SAN :data:`SERVER_NAME` (agents dial
  with ``grpc.ssl_target_name_override`` set to it, so the address they dial does
  not matter) plus the configured host names and IP addresses; ``serverAuth``.
  It is made at every start-up with a fresh key and kept **in memory only**:
  agents trust the CA, not this certificate, so nothing needs to persist.

Example::

    ca = CertificateAuthority.load_or_create(settings.keys_dir)
    key_pem, cert_pem = ca.server_certificate(["node-gw.example.com", "10.0.0.5"])
    creds = grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca.ca_cert_pem.encode(), require_client_auth=True
    )
    ...
    identity = ca.node_id_from_auth_context(context.auth_context())  # (node_id, serial_hex) | None

Key bytes are never logged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller.errors import FailedPrecondition, FieldViolation, InvalidArgument
from controller.keys import _tighten, _write_new_secret_file

log = logging.getLogger(__name__)

CA_KEY_FILE = "node-ca.key"
CA_CERT_FILE = "node-ca.crt"

SERVER_NAME = "automator67-controller"
"""DNS name in the node-facing server certificate; agents set ``grpc.ssl_target_name_override`` to it."""

NODE_URI_PREFIX = "urn:automator67:node:"
"""A node certificate's SAN URI is this prefix followed by the node id."""

CA_COMMON_NAME = "Automator67 node CA"
CA_VALIDITY_DAYS = 3650
NODE_CERT_VALIDITY_DAYS = 365
SERVER_CERT_VALIDITY_DAYS = 365
CLOCK_SKEW = dt.timedelta(minutes=5)
"""Certificates are valid from a little before they are issued, for clocks that lag."""

MAX_CSR_PEM_CHARS = 16 * 1024
AUTH_CONTEXT_CERT_KEY = "x509_pem_cert"
VERIFIED_PEERS_MAX = 32_768
"""Peer certificates whose verification :meth:`CertificateAuthority.node_id_from_auth_context`
remembers (by SHA-256 of the PEM, ~0.2 KiB each); the oldest is forgotten beyond this."""

_NODE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SUPPORTED_CURVES: tuple[type[ec.EllipticCurve], ...] = (ec.SECP256R1, ec.SECP384R1)
_RSA_KEY_SIZES = frozenset({2048, 3072, 4096})
_SUPPORTED_KEYS = "EC P-256, EC P-384 or RSA 2048/3072/4096"

Clock = Callable[[], float]


@dataclass(frozen=True)
class SignedCertificate:
    """A certificate issued to a node."""

    cert_pem: str
    serial_hex: str
    """The serial number in lower-case hex without leading zeros (what ``nodes.cert_serial`` holds)."""
    not_after: dt.datetime


def serial_hex(certificate: x509.Certificate) -> str:
    """The serial of ``certificate`` as :class:`SignedCertificate` reports it."""
    return format(certificate.serial_number, "x")


def _csr_error(description: str) -> InvalidArgument:
    return InvalidArgument(
        f"The certificate signing request is invalid: {description}",
        field_violations=[FieldViolation("csr_pem", description)],
    )


def parse_node_csr(csr_pem: str) -> x509.CertificateSigningRequest:
    """Parse and check a node's CSR: PEM, a valid self-signature, a supported key.

    Raises :class:`InvalidArgument` with a field violation on ``csr_pem``.
    """
    if not isinstance(csr_pem, str) or not csr_pem.strip():
        raise _csr_error("a PEM certificate signing request is required")
    if len(csr_pem) > MAX_CSR_PEM_CHARS:
        raise _csr_error(f"must be at most {MAX_CSR_PEM_CHARS} characters")
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode("utf-8"))
    except (ValueError, TypeError, UnicodeError):
        raise _csr_error("not a PEM certificate signing request") from None
    try:
        public_key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise _csr_error(f"unsupported key type (use {_SUPPORTED_KEYS})") from None
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, _SUPPORTED_CURVES):
            raise _csr_error(f"unsupported curve {public_key.curve.name} (use {_SUPPORTED_KEYS})")
    elif isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size not in _RSA_KEY_SIZES:
            raise _csr_error(f"unsupported RSA key size {public_key.key_size} (use {_SUPPORTED_KEYS})")
    else:
        raise _csr_error(f"unsupported key type (use {_SUPPORTED_KEYS})")
    try:
        valid = csr.is_signature_valid
    except (ValueError, TypeError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise _csr_error("its signature does not verify")
    return csr


def _pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_certificate(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _same_public_key(a: ec.EllipticCurvePublicKey, b: object) -> bool:
    if not isinstance(b, ec.EllipticCurvePublicKey):
        return False
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)


def _san_entry(host: str) -> x509.GeneralName | None:
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return x509.DNSName(host.lower())
    if address.is_unspecified:  # 0.0.0.0 / :: are listen addresses, not names to dial
        return None
    return x509.IPAddress(address)


class CertificateAuthority:
    """The node CA: signs node CSRs and the node-facing server certificate, checks peers."""

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        certificate: x509.Certificate,
        *,
        clock: Clock = time.time,
    ) -> None:
        if not _same_public_key(key.public_key(), certificate.public_key()):
            raise ValueError("the CA certificate does not belong to the CA key")
        self._key = key
        self._cert = certificate
        self._clock = clock
        self._cert_pem = _pem_certificate(certificate).decode("ascii")
        self._ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        # SHA-256 of a peer's PEM -> (node id, serial, valid from, valid until: epoch seconds)
        self._verified: dict[bytes, tuple[str, str, float, float]] = {}

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def generate(cls, *, clock: Clock = time.time) -> CertificateAuthority:
        """A fresh CA held in memory only (tests, tools)."""
        key = ec.generate_private_key(ec.SECP256R1())
        return cls(key, cls._self_sign(key, cls._utc(clock)), clock=clock)

    @classmethod
    def load_or_create(cls, keys_dir: Path, *, clock: Clock = time.time) -> CertificateAuthority:
        """The CA kept in ``keys_dir``, generated there on first use.

        Raises :class:`FailedPrecondition` (``INVALID_KEY_MATERIAL``) if the files exist
        but cannot be read or do not belong together.
        """
        key_path = keys_dir / CA_KEY_FILE
        cert_path = keys_dir / CA_CERT_FILE
        generated = False

        if not key_path.exists():
            new_key = ec.generate_private_key(ec.SECP256R1())
            generated = _write_new_secret_file(key_path, _pem_private_key(new_key))
        _tighten(key_path)
        key = cls._read_key(key_path)

        if not cert_path.exists():
            certificate = cls._self_sign(key, cls._utc(clock))
            if _write_new_secret_file(cert_path, _pem_certificate(certificate)):
                generated = True
        certificate = cls._read_cert(cert_path)
        if not _same_public_key(key.public_key(), certificate.public_key()):
            raise FailedPrecondition(
                f"{str(cert_path)!r} does not belong to the key in {str(key_path)!r}: delete both to "
                "generate a new node CA (every node must then enroll again)",
                reason="INVALID_KEY_MATERIAL",
            )
        if generated:
            log.info("generated the node CA in %s (%s, %s; 0600)", keys_dir, CA_KEY_FILE, CA_CERT_FILE)
        else:
            log.info("using the node CA from %s", keys_dir)
        return cls(key, certificate, clock=clock)

    @staticmethod
    def _read_key(path: Path) -> ec.EllipticCurvePrivateKey:
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError):
            raise FailedPrecondition(
                f"cannot read the node CA key {str(path)!r}: it must be an unencrypted PEM EC key",
                reason="INVALID_KEY_MATERIAL",
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise FailedPrecondition(
                f"the node CA key {str(path)!r} is a {type(key).__name__}, not an EC key",
                reason="INVALID_KEY_MATERIAL",
            )
        return key

    @staticmethod
    def _read_cert(path: Path) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            raise FailedPrecondition(
                f"cannot read the node CA certificate {str(path)!r}", reason="INVALID_KEY_MATERIAL"
            ) from None

    @staticmethod
    def _utc(clock: Clock) -> dt.datetime:
        # Whole seconds: X.509 times have no fractions, so what we report is what we sign.
        return dt.datetime.fromtimestamp(clock(), dt.UTC).replace(microsecond=0)

    @staticmethod
    def _self_sign(key: ec.EllipticCurvePrivateKey, now: dt.datetime) -> x509.Certificate:
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Automator67"),
                x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
            ]
        )
        public_key = key.public_key()
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=CA_VALIDITY_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(key, hashes.SHA256())
        )

    # -- properties -----------------------------------------------------------------------------

    @property
    def ca_cert_pem(self) -> str:
        """The CA certificate (PEM), what nodes and the node-facing port trust."""
        return self._cert_pem

    @property
    def certificate(self) -> x509.Certificate:
        """The CA certificate."""
        return self._cert

    # -- issuing --------------------------------------------------------------------------------

    def _leaf_builder(
        self, subject: x509.Name, public_key: CertificatePublicKeyTypes, valid_days: int
    ) -> tuple[x509.CertificateBuilder, dt.datetime]:
        now = self._utc(self._clock)
        not_before = max(now - CLOCK_SKEW, self._cert.not_valid_before_utc)
        not_after = min(now + dt.timedelta(days=valid_days), self._cert.not_valid_after_utc)
        if not_after <= now:
            raise FailedPrecondition(
                "the node CA certificate has expired: delete node-ca.key and node-ca.crt to make a new one",
                reason="NODE_CA_EXPIRED",
            )
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski), critical=False
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )
        return builder, not_after

    def sign_node_csr(
        self,
        csr_pem: str | x509.CertificateSigningRequest,
        node_id: str,
        *,
        valid_days: int = NODE_CERT_VALIDITY_DAYS,
    ) -> SignedCertificate:
        """Issue a client certificate for ``node_id`` for the key in ``csr_pem``.

        The CSR's subject and extensions are ignored: the certificate names
        ``node_id`` (CN and SAN URI) and allows ``clientAuth`` only. A PEM string is
        checked with :func:`parse_node_csr` (``InvalidArgument`` on ``csr_pem``); an
        already parsed CSR is trusted to have been.
        """
        if _NODE_ID_PATTERN.fullmatch(node_id) is None:
            raise ValueError("node ids are 1-64 characters of [A-Za-z0-9._-]")
        if valid_days <= 0:
            raise ValueError("valid_days must be positive")
        csr = parse_node_csr(csr_pem) if isinstance(csr_pem, str) else csr_pem
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)])
        builder, not_after = self._leaf_builder(subject, csr.public_key(), valid_days)
        certificate = (
            builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(NODE_URI_PREFIX + node_id)]),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return SignedCertificate(
            cert_pem=_pem_certificate(certificate).decode("ascii"),
            serial_hex=serial_hex(certificate),
            not_after=not_after,
        )

    def server_certificate(
        self, hostnames: Iterable[str] = (), *, valid_days: int = SERVER_CERT_VALIDITY_DAYS
    ) -> tuple[bytes, bytes]:
        """A fresh key and serving certificate (both PEM) for the node-facing port.

        DNS SAN :data:`SERVER_NAME` plus each of ``hostnames`` (IP literals become
        IP address SANs; ``0.0.0.0``, ``::`` and empty entries are skipped).
        """
        names: list[x509.GeneralName] = [x509.DNSName(SERVER_NAME)]
        for host in hostnames:
            entry = _san_entry(host)
            if entry is not None and entry not in names:
                names.append(entry)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
        builder, _ = self._leaf_builder(subject, key.public_key(), valid_days)
        certificate = (
            builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return _pem_private_key(key), _pem_certificate(certificate)

    # -- checking peers -------------------------------------------------------------------------

    def verify_node_certificate(self, certificate: x509.Certificate) -> tuple[str, str] | None:
        """``(node_id, serial_hex)`` if ``certificate`` is a current node certificate of this CA.

        Checks the issuer name and signature (with the CA's public key), the validity
        period, the ``clientAuth`` usage, and that CN and SAN URI name the same node.
        Whether the serial is still the node's current one is the caller's check
        (against ``nodes.cert_serial``).
        """
        try:
            certificate.verify_directly_issued_by(self._cert)
        except (ValueError, TypeError, InvalidSignature):
            return None
        now = self._utc(self._clock)
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            return None
        try:
            usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (x509.ExtensionNotFound, ValueError):
            return None
        if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
            return None
        uris = [
            u
            for u in sans.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith(NODE_URI_PREFIX)
        ]
        common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(uris) != 1 or len(common_names) != 1:
            return None
        node_id = uris[0][len(NODE_URI_PREFIX) :]
        if common_names[0].value != node_id or _NODE_ID_PATTERN.fullmatch(node_id) is None:
            return None
        return node_id, serial_hex(certificate)

    def node_id_from_auth_context(
        self, auth_context: Mapping[str, Iterable[bytes]]
    ) -> tuple[str, str] | None:
        """``(node_id, serial_hex)`` of the peer of a mutual-TLS call, or None.

        ``auth_context`` is ``context.auth_context()`` of a grpc (aio) servicer; its
        ``x509_pem_cert`` entry is the peer's certificate, checked with
        :meth:`verify_node_certificate`.

        A node's connection presents the same certificate on every call (each chunk a
        node fetches is a call), so a certificate that verified is remembered by the
        SHA-256 of its PEM: later calls cost a hash and a lookup instead of a parse and
        an ECDSA verification, and only the validity period (which depends on the clock)
        is checked again. Everything else verified is a function of those bytes and of
        this CA. Failures are not remembered. Whether the serial is still the node's is,
        as before, the caller's check.
        """
        entries = auth_context.get(AUTH_CONTEXT_CERT_KEY)
        if entries is None:
            return None
        pem = next(iter(entries), None)
        if not pem:
            return None
        pem = bytes(pem)
        digest = hashlib.sha256(pem).digest()
        known = self._verified.get(digest)
        if known is not None:
            node_id, serial, valid_from, valid_until = known
            now = float(int(self._clock()))  # whole seconds, as verify_node_certificate compares
            return (node_id, serial) if valid_from <= now <= valid_until else None
        try:
            certificate = x509.load_pem_x509_certificate(pem)
        except (ValueError, TypeError):
            return None
        identity = self.verify_node_certificate(certificate)
        if identity is not None:
            if len(self._verified) >= VERIFIED_PEERS_MAX:
                del self._verified[next(iter(self._verified))]  # the oldest
            self._verified[digest] = (
                *identity,
                certificate.not_valid_before_utc.timestamp(),
                certificate.not_valid_after_utc.timestamp(),
            )
        return identity

    def __repr__(self) -> str:
        return f"CertificateAuthority(subject={self._cert.subject.rfc4514_string()!r})"


__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "NODE_URI_PREFIX",
    "SERVER_NAME",
    "CertificateAuthority",
    "SignedCertificate",
    "parse_node_csr",
    "serial_hex",
]
