"""The vault's keyring: named 256-bit master keys (KEKs); the newest one is primary.

A keyring is immutable. The last key is the *primary*: it wraps the data keys of
new secrets. Every key in the ring can unwrap, so ciphertexts made under an older
key stay readable until they are rewrapped and the old key is retired.

The textual form (``A67_MASTER_KEYS``) is a comma-separated list of
``key_id:base64(32 bytes)`` entries, oldest first::

    >>> ring = Keyring.generate("k1")
    >>> ring = ring.rotate()                  # adds "k2" and makes it primary
    >>> ring.primary_id, ring.key_ids
    ('k2', ('k1', 'k2'))
    >>> Keyring.parse(ring.to_spec()).key_ids
    ('k1', 'k2')

Key bytes never appear in ``repr()`` or in error messages.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from collections.abc import Iterable, Iterator

KEY_SIZE = 32
"""Every master key is exactly 32 bytes (AES-256)."""

KEY_ID_PATTERN = re.compile(r"[a-z0-9_-]{1,32}")
"""What a key id may look like: 1-32 of lower-case letters, digits, ``_`` and ``-``."""

_NUMBERED_ID = re.compile(r"k(\d{1,30})")


def validate_key_id(key_id: str) -> str:
    """Return ``key_id`` if it is a valid key id, else raise ``ValueError``."""
    if isinstance(key_id, str) and KEY_ID_PATTERN.fullmatch(key_id) is not None:
        return key_id
    shown = f" {key_id!r}" if isinstance(key_id, str) and len(key_id) <= 64 and key_id.isprintable() else ""
    raise ValueError(f"invalid key id{shown}: use 1-32 characters of a-z, 0-9, '_' and '-'")


def _validate_key(key_id: str, key: bytes) -> bytes:
    if not isinstance(key, bytes | bytearray):
        raise ValueError(f"key {key_id!r} must be bytes")
    if len(key) != KEY_SIZE:
        raise ValueError(f"key {key_id!r} must be exactly {KEY_SIZE} bytes, not {len(key)}")
    return bytes(key)


def _decode_key(key_id: str, text: str) -> bytes:
    """Decode standard or URL-safe base64 (padding optional) without echoing the input."""
    cleaned = text.strip()
    if not cleaned:
        raise ValueError(f"key {key_id!r} has no key material after ':'")
    if re.fullmatch(r"[A-Za-z0-9+/_-]+={0,2}", cleaned) is None:
        raise ValueError(f"key {key_id!r} is not valid base64")
    normalised = cleaned.rstrip("=").replace("-", "+").replace("_", "/")
    normalised += "=" * (-len(normalised) % 4)
    try:
        raw = base64.b64decode(normalised, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"key {key_id!r} is not valid base64") from None
    if len(raw) != KEY_SIZE:
        raise ValueError(f"key {key_id!r} must decode to exactly {KEY_SIZE} bytes, not {len(raw)}")
    return raw


class Keyring:
    """An ordered, immutable set of named master keys; the last one is primary.

    Build one with :meth:`parse`, :meth:`generate` or the constructor
    (``Keyring([("k1", key_bytes), ...])``, oldest first).
    """

    __slots__ = ("_keys", "_order")

    def __init__(self, keys: Iterable[tuple[str, bytes]]) -> None:
        order: list[str] = []
        table: dict[str, bytes] = {}
        for key_id, key in keys:
            validate_key_id(key_id)
            if key_id in table:
                raise ValueError(f"duplicate key id {key_id!r} in the keyring")
            table[key_id] = _validate_key(key_id, key)
            order.append(key_id)
        if not order:
            raise ValueError("a keyring needs at least one key")
        self._order: tuple[str, ...] = tuple(order)
        self._keys: dict[str, bytes] = table

    # -- construction -------------------------------------------------------

    @classmethod
    def parse(cls, spec: str) -> Keyring:
        """Parse ``"k1:<base64>,k2:<base64>"`` (oldest first; the last is primary).

        Raises ``ValueError`` with a message naming the faulty entry (by position
        and key id, never by its key bytes).
        """
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError("the keyring is empty: expected 'key_id:base64key[,key_id:base64key...]'")
        entries: list[tuple[str, bytes]] = []
        seen: set[str] = set()
        for position, raw_entry in enumerate(spec.split(","), start=1):
            entry = raw_entry.strip()
            if not entry:
                raise ValueError(f"keyring entry {position} is empty (stray comma?)")
            key_id, sep, key_text = entry.partition(":")
            key_id = key_id.strip()
            if not sep:
                raise ValueError(f"keyring entry {position} must look like 'key_id:base64key'")
            if KEY_ID_PATTERN.fullmatch(key_id) is None:
                shown = f" {key_id!r}" if len(key_id) <= 32 and key_id.isprintable() else ""
                raise ValueError(
                    f"keyring entry {position} has an invalid key id{shown}: "
                    "use 1-32 characters of a-z, 0-9, '_' and '-'"
                )
            if key_id in seen:
                raise ValueError(f"keyring entry {position} repeats key id {key_id!r}")
            seen.add(key_id)
            entries.append((key_id, _decode_key(key_id, key_text)))
        return cls(entries)

    @classmethod
    def generate(cls, key_id: str = "k1") -> Keyring:
        """A new keyring holding one fresh random key."""
        return cls([(key_id, secrets.token_bytes(KEY_SIZE))])

    def add(self, key_id: str, key: bytes) -> Keyring:
        """A new keyring with ``key`` appended as the primary key."""
        return Keyring([*self.items(), (key_id, key)])

    def rotate(self, key_id: str | None = None) -> Keyring:
        """A new keyring with a fresh random primary key.

        Without ``key_id`` the new id is ``k<n+1>``, where ``n`` is the highest
        number among ids of the form ``k<n>`` (``k1`` if there are none).
        """
        if key_id is None:
            numbers = [int(m.group(1)) for k in self._order if (m := _NUMBERED_ID.fullmatch(k))]
            key_id = f"k{max(numbers, default=0) + 1}"
        return self.add(key_id, secrets.token_bytes(KEY_SIZE))

    def remove(self, key_id: str) -> Keyring:
        """A new keyring without ``key_id`` (retire a key once nothing uses it)."""
        if key_id not in self._keys:
            raise KeyError(key_id)
        return Keyring([(k, v) for k, v in self.items() if k != key_id])

    # -- inspection ---------------------------------------------------------

    @property
    def primary_id(self) -> str:
        """Id of the key that wraps new secrets (the last one)."""
        return self._order[-1]

    @property
    def primary_key(self) -> bytes:
        """Bytes of the primary key."""
        return self._keys[self._order[-1]]

    @property
    def key_ids(self) -> tuple[str, ...]:
        """All key ids, oldest first."""
        return self._order

    def get(self, key_id: str) -> bytes | None:
        """The key bytes for ``key_id``, or ``None``."""
        return self._keys.get(key_id)

    def items(self) -> Iterator[tuple[str, bytes]]:
        """``(key_id, key)`` pairs, oldest first."""
        return ((k, self._keys[k]) for k in self._order)

    def to_spec(self) -> str:
        """The textual form accepted by :meth:`parse` (contains key bytes: keep it secret)."""
        return ",".join(f"{k}:{base64.b64encode(v).decode('ascii')}" for k, v in self.items())

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __len__(self) -> int:
        return len(self._order)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Keyring):
            return NotImplemented
        return self._order == other._order and all(
            secrets.compare_digest(self._keys[k], other._keys[k]) for k in self._order
        )

    def __hash__(self) -> int:
        return hash(self._order)

    def __repr__(self) -> str:
        return f"Keyring(key_ids={list(self._order)!r}, primary={self.primary_id!r})"
