"""Envelope encryption of secrets under the keyring, bound to an owner and a purpose.

Every secret gets a fresh random 32-byte *data key* (DEK). The plaintext is sealed
with AES-256-GCM under the DEK; the DEK is sealed (wrapped) with AES-256-GCM under
the keyring's primary master key (KEK). Both use random 96-bit nonces. The
associated data binds:

* the payload to the format version, the ``owner`` and the ``purpose``;
* the wrapped DEK to the format version, the KEK id, the ``owner`` and the ``purpose``.

So a ciphertext copied to another row (other owner) or another column (other
purpose) does not decrypt, and neither does one whose key id was edited.

The result is one ASCII token, safe in a JSON column or a text field::

    a67v1:<key_id>:<base64url(wrap_nonce[12] | wrapped_dek[48] | nonce[12] | ciphertext | tag[16])>

Example::

    >>> vault = Vault(Keyring.generate("k1"))
    >>> token = vault.encrypt_str("s3cr3t", owner="user:42", purpose="oauth.github")
    >>> token.startswith("a67v1:k1:")
    True
    >>> vault.decrypt_str(token, owner="user:42", purpose="oauth.github")
    's3cr3t'

Rotation: ``Vault(keyring.rotate())`` still decrypts old tokens; :meth:`Vault.rewrap`
moves a token to the newest key by re-wrapping its data key only (the sealed payload
is authenticated but left byte-for-byte unchanged); :meth:`Vault.needs_rewrap` tells
which tokens still use an older key. Once none do, the old key can be removed.

Limits: each KEK should wrap at most 2**32 data keys (NIST SP 800-38D §8.3 for random
nonces); rotate long before that. Each DEK seals exactly one message.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from controller.vault.keyring import KEY_ID_PATTERN, KEY_SIZE, Keyring

FORMAT_VERSION = "a67v1"
"""Prefix of every token this module writes."""

_NONCE_SIZE = 12
_TAG_SIZE = 16
_WRAPPED_DEK_SIZE = KEY_SIZE + _TAG_SIZE
_MIN_BLOB = _NONCE_SIZE + _WRAPPED_DEK_SIZE + _NONCE_SIZE + _TAG_SIZE
_BODY_PATTERN = re.compile(r"[A-Za-z0-9_-]+")
_VERSION_PATTERN = re.compile(r"a67v\d+")


Auditor = Callable[[str, str, str, str], None]
"""``audit(owner, purpose, key_id, operation)``: called after each decryption (see
:mod:`controller.vault.audit`); it may raise to refuse the plaintext."""


class VaultError(Exception):
    """Base of every vault failure. Messages never contain key bytes or plaintext."""


class MalformedCiphertext(VaultError):
    """The value is not a vault token at all (bad prefix, encoding or length)."""


class UnknownKeyError(VaultError):
    """The token names a master key that is not in the keyring."""

    def __init__(self, key_id: str) -> None:
        super().__init__(f"ciphertext was encrypted with key {key_id!r}, which is not in the keyring")
        self.key_id = key_id


class DecryptionError(VaultError):
    """Authentication failed: the token was altered, or owner/purpose do not match.

    Deliberately does not say which.
    """

    def __init__(self) -> None:
        super().__init__(
            "the secret could not be decrypted: it was altered, or it belongs to another owner or purpose"
        )


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d_canonical(text: str) -> bytes:
    if _BODY_PATTERN.fullmatch(text) is None:
        raise MalformedCiphertext("the ciphertext body is not base64url")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise MalformedCiphertext("the ciphertext body is not base64url") from None
    if _b64e(raw) != text:  # non-canonical (stray trailing bits, impossible length)
        raise MalformedCiphertext("the ciphertext body is not canonical base64url")
    return raw


def _field(value: str, name: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    encoded = value.encode("utf-8")
    return len(encoded).to_bytes(4, "big") + encoded


def _context(owner: str, purpose: str) -> bytes:
    return _field(owner, "owner") + _field(purpose, "purpose")


def _data_aad(context: bytes) -> bytes:
    return FORMAT_VERSION.encode("ascii") + b"/data\x00" + context


def _wrap_aad(key_id: str, context: bytes) -> bytes:
    return FORMAT_VERSION.encode("ascii") + b"/dek\x00" + _field(key_id, "key_id") + context


class _Parsed:
    __slots__ = ("ciphertext", "data_nonce", "key_id", "wrap_nonce", "wrapped_dek")

    def __init__(self, key_id: str, blob: bytes) -> None:
        self.key_id = key_id
        offset = 0
        self.wrap_nonce = blob[offset : offset + _NONCE_SIZE]
        offset += _NONCE_SIZE
        self.wrapped_dek = blob[offset : offset + _WRAPPED_DEK_SIZE]
        offset += _WRAPPED_DEK_SIZE
        self.data_nonce = blob[offset : offset + _NONCE_SIZE]
        offset += _NONCE_SIZE
        self.ciphertext = blob[offset:]


def _split_header(token: str) -> tuple[str, str]:
    if not isinstance(token, str):
        raise MalformedCiphertext("a vault ciphertext must be a string")
    version, sep, rest = token.partition(":")
    if not sep or version != FORMAT_VERSION:
        if sep and _VERSION_PATTERN.fullmatch(version):
            raise MalformedCiphertext(f"unsupported vault ciphertext version {version!r}")
        raise MalformedCiphertext(f"not a vault ciphertext (expected the prefix '{FORMAT_VERSION}:')")
    key_id, sep, body = rest.partition(":")
    if not sep or KEY_ID_PATTERN.fullmatch(key_id) is None:
        raise MalformedCiphertext("the vault ciphertext has no valid key id")
    return key_id, body


def _parse(token: str) -> _Parsed:
    key_id, body = _split_header(token)
    blob = _b64d_canonical(body)
    if len(blob) < _MIN_BLOB:
        raise MalformedCiphertext("the vault ciphertext is too short")
    return _Parsed(key_id, blob)


class Vault:
    """Encrypts and decrypts secrets with envelope encryption under a :class:`Keyring`."""

    __slots__ = ("_audit", "_keyring")

    def __init__(self, keyring: Keyring, *, audit: Auditor | None = None) -> None:
        self._keyring = keyring
        self._audit = audit

    @property
    def keyring(self) -> Keyring:
        """The keyring in use."""
        return self._keyring

    def replace_keyring(self, keyring: Keyring) -> None:
        """Use ``keyring`` from now on (a master key added or retired while running).

        Every holder of this vault sees the change. ``ValueError`` if a key of the
        current ring would change its bytes (an id must always name the same key).
        """
        for key_id, key in keyring.items():
            old = self._keyring.get(key_id)
            if old is not None and not secrets.compare_digest(old, key):
                raise ValueError(f"master key {key_id!r} changed its bytes; a key id must never be reused")
        self._keyring = keyring

    def set_auditor(self, audit: Auditor | None) -> None:
        """Record every decryption with ``audit(owner, purpose, key_id, operation)``."""
        self._audit = audit

    # -- bytes --------------------------------------------------------------

    def encrypt(self, plaintext: bytes, *, owner: str, purpose: str) -> str:
        """Seal ``plaintext`` for ``owner``/``purpose`` under the primary key; returns a token."""
        if not isinstance(plaintext, bytes | bytearray | memoryview):
            raise TypeError("plaintext must be bytes (use encrypt_str for text)")
        context = _context(owner, purpose)
        key_id = self._keyring.primary_id
        dek = AESGCM.generate_key(bit_length=KEY_SIZE * 8)
        data_nonce = secrets.token_bytes(_NONCE_SIZE)
        ciphertext = AESGCM(dek).encrypt(data_nonce, bytes(plaintext), _data_aad(context))
        wrap_nonce = secrets.token_bytes(_NONCE_SIZE)
        wrapped = AESGCM(self._keyring.primary_key).encrypt(wrap_nonce, dek, _wrap_aad(key_id, context))
        return self._format(key_id, wrap_nonce + wrapped + data_nonce + ciphertext)

    def decrypt(self, token: str, *, owner: str, purpose: str) -> bytes:
        """Open a token made by :meth:`encrypt` with the same ``owner`` and ``purpose``.

        Raises :class:`MalformedCiphertext`, :class:`UnknownKeyError` or
        :class:`DecryptionError`.
        """
        context = _context(owner, purpose)
        parsed = _parse(token)
        dek = self._unwrap(parsed, context)
        plaintext = self._open(parsed, dek, context)
        if self._audit is not None:
            self._audit(owner, purpose, parsed.key_id, "decrypt")
        return plaintext

    # -- text ---------------------------------------------------------------

    def encrypt_str(self, plaintext: str, *, owner: str, purpose: str) -> str:
        """:meth:`encrypt` for text (UTF-8)."""
        return self.encrypt(plaintext.encode("utf-8"), owner=owner, purpose=purpose)

    def decrypt_str(self, token: str, *, owner: str, purpose: str) -> str:
        """:meth:`decrypt` for text (UTF-8)."""
        raw = self.decrypt(token, owner=owner, purpose=purpose)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedCiphertext("the secret is binary, not UTF-8 text: use decrypt()") from None

    # -- rotation -----------------------------------------------------------

    def rewrap(self, token: str, *, owner: str, purpose: str) -> str:
        """Move ``token`` to the primary key.

        The data key is unwrapped with the old master key and wrapped again with
        the primary one; the sealed payload is authenticated (so a damaged token
        fails here, not later) but kept byte-for-byte. A token already under the
        primary key is returned unchanged.
        """
        context = _context(owner, purpose)
        parsed = _parse(token)
        dek = self._unwrap(parsed, context)
        self._open(parsed, dek, context)
        key_id = self._keyring.primary_id
        if parsed.key_id == key_id:
            return token
        if self._audit is not None:
            self._audit(owner, purpose, parsed.key_id, "rewrap")
        wrap_nonce = secrets.token_bytes(_NONCE_SIZE)
        wrapped = AESGCM(self._keyring.primary_key).encrypt(wrap_nonce, dek, _wrap_aad(key_id, context))
        return self._format(key_id, wrap_nonce + wrapped + parsed.data_nonce + parsed.ciphertext)

    def key_id_of(self, token: str) -> str:
        """The id of the master key that wraps ``token``'s data key (no decryption)."""
        return _split_header(token)[0]

    def needs_rewrap(self, token: str) -> bool:
        """Whether ``token`` is wrapped by a key other than the primary one."""
        return self.key_id_of(token) != self._keyring.primary_id

    # -- internals ----------------------------------------------------------

    @staticmethod
    def _format(key_id: str, blob: bytes) -> str:
        return f"{FORMAT_VERSION}:{key_id}:{_b64e(blob)}"

    def _unwrap(self, parsed: _Parsed, context: bytes) -> bytes:
        kek = self._keyring.get(parsed.key_id)
        if kek is None:
            raise UnknownKeyError(parsed.key_id)
        try:
            return AESGCM(kek).decrypt(
                parsed.wrap_nonce, parsed.wrapped_dek, _wrap_aad(parsed.key_id, context)
            )
        except InvalidTag:
            raise DecryptionError() from None

    @staticmethod
    def _open(parsed: _Parsed, dek: bytes, context: bytes) -> bytes:
        try:
            return AESGCM(dek).decrypt(parsed.data_nonce, parsed.ciphertext, _data_aad(context))
        except InvalidTag:
            raise DecryptionError() from None

    def __repr__(self) -> str:
        return f"Vault({self._keyring!r})"
