"""Retired JWT verification keys: rotating the signing key without signing anyone out.

Rotation (docs/credentials.md, "Rotating the JWT signing key"):

1. make a new key (``openssl genpkey -algorithm ed25519 -out jwt-2.pem``);
2. start every controller with ``A67_JWT_PRIVATE_KEY_FILE=jwt-2.pem`` and
   ``A67_JWT_RETIRED_PUBLIC_KEY_FILES=jwt-1.pub.pem`` (the old key's public half,
   ``openssl pkey -in jwt-1.pem -pubout -out jwt-1.pub.pem``; the private file works
   too): new tokens carry the new key's ``kid``, and tokens signed before keep working;
3. after the refresh-token lifetime (7 days by default) no token of the old key is
   still valid: remove it from the list.

Each key's ``kid`` is its RFC 7638 thumbprint (:func:`controller.keys.jwt_key_id`), so
the same file always yields the same ``kid`` on every controller.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from controller.errors import FailedPrecondition

SETTING = "A67_JWT_RETIRED_PUBLIC_KEY_FILES"


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The Ed25519 public key in a PEM file holding a public or a private key."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FailedPrecondition(
            f"{SETTING}: cannot read {str(path)!r}: {exc.strerror}", reason="INVALID_KEY_MATERIAL"
        ) from None
    key: object
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise FailedPrecondition(
                f"{SETTING}: {str(path)!r} is not a PEM public key or unencrypted private key",
                reason="INVALID_KEY_MATERIAL",
            ) from None
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise FailedPrecondition(
            f"{SETTING}: {str(path)!r} holds a {type(key).__name__}, not an Ed25519 key",
            reason="INVALID_KEY_MATERIAL",
        )
    return key


def load_retired_keys(setting: str) -> dict[str, Ed25519PublicKey]:
    """``kid`` → public key for each file of the comma-separated ``setting``."""
    from controller.keys import jwt_key_id

    keys: dict[str, Ed25519PublicKey] = {}
    for entry in setting.split(","):
        name = entry.strip()
        if not name:
            continue
        public = load_public_key(Path(name).expanduser())
        keys[jwt_key_id(public)] = public
    return keys


__all__ = ["load_public_key", "load_retired_keys"]
