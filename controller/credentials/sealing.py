"""HPKE (RFC 9180) sealing of a node's credentials to the key of its client certificate.

Base mode, DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-256-GCM (``cryptography``'s
``hpke.Suite``): the node's key is the EC P-256 key of its mutual-TLS client
certificate, so only the agent holding ``node.key`` can open what the controller seals,
and a sealed blob copied anywhere (a log, a proxy, the cache) is useless. The ``info``
binds the blob to the node id and the token version, so a blob for one node or version
does not open as another. The output is ``enc`` (65 bytes) followed by the ciphertext.

Shared by the controller (:func:`seal`) and the agent (:func:`open_sealed`).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ec

SUITE_NAME = "DHKEM(P-256, HKDF-SHA256), HKDF-SHA256, AES-256-GCM"
_SUITE = hpke.Suite(hpke.KEM.P256, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_INFO_PREFIX = b"automator67/v1 node-credentials|"


class SealingError(Exception):
    """A key that cannot be sealed to, or a blob that does not open."""


def info(node_id: str, version: int) -> bytes:
    """The HPKE ``info`` of a node's credentials at a version."""
    return _INFO_PREFIX + node_id.encode() + b"|" + str(int(version)).encode()


def certificate_public_key(cert_pem: bytes) -> ec.EllipticCurvePublicKey:
    """The P-256 public key of a PEM certificate (``SealingError`` for any other key)."""
    try:
        key = x509.load_pem_x509_certificate(cert_pem).public_key()
    except ValueError as exc:
        raise SealingError("the client certificate cannot be read") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SealingError("the client certificate's key is not EC P-256")
    return key


def seal(plaintext: bytes, public_key: ec.EllipticCurvePublicKey, node_id: str, version: int) -> bytes:
    return _SUITE.encrypt(plaintext, public_key, info=info(node_id, version))


def open_sealed(sealed: bytes, private_key: ec.EllipticCurvePrivateKey, node_id: str, version: int) -> bytes:
    try:
        return _SUITE.decrypt(sealed, private_key, info=info(node_id, version))
    except Exception as exc:  # InvalidTag, or a malformed encapsulated key
        raise SealingError("the sealed credentials do not open with this node's key") from exc


__all__ = ["SUITE_NAME", "SealingError", "certificate_public_key", "info", "open_sealed", "seal"]
