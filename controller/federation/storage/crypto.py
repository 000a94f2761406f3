"""Chunk encryption: AES-256-GCM under the file's own data key, before bytes leave the controller.

Each file version gets a fresh random 256-bit data key, wrapped by the vault
(:class:`controller.vault.Vault`, bound to the owner and the key id) and kept in the
file's ``encryption`` column; only the wrapped form is ever stored. A chunk is sealed
as ``nonce[12] | ciphertext | tag[16]`` with a random nonce and the associated data
``a67-chunk-v1|<chunk id>|<index>``: a copy moved to another chunk id or index does
not open. Nodes hold and serve these sealed bytes only.

>>> key = new_data_key()
>>> sealed = seal_chunk(key, "c1", 0, b"hello")
>>> open_chunk(key, "c1", 0, sealed)
b'hello'
>>> len(sealed) == len(b"hello") + OVERHEAD_BYTES
True
>>> out = bytearray(len(b"hello") + OVERHEAD_BYTES)
>>> Sealer(key).seal_into("c1", 1, b"hello", memoryview(out))
>>> open_chunk(key, "c1", 1, bytes(out))
b'hello'
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ALGORITHM = "AES-256-GCM"
"""``encryption.algorithm`` of every stored file."""

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD_BYTES = NONCE_BYTES + TAG_BYTES
"""Bytes a sealed chunk has beyond its plaintext."""

KEY_PURPOSE = "storage.file-key"
"""The vault purpose of wrapped file keys (with the key id appended)."""


class ChunkIntegrityError(Exception):
    """A sealed chunk did not authenticate (altered, or another chunk's bytes)."""


def new_data_key() -> bytes:
    return os.urandom(KEY_BYTES)


def _aad(chunk_id: str, index: int) -> bytes:
    return f"a67-chunk-v1|{chunk_id}|{index}".encode()


def seal_chunk(key: bytes, chunk_id: str, index: int, plaintext: bytes) -> bytes:
    """``nonce | ciphertext | tag`` of ``plaintext`` (run it in a worker thread for big chunks)."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _aad(chunk_id, index))


class Sealer:
    """Seals the chunks of one file version into a buffer the caller owns and reuses (no
    allocation per chunk). Thread-safe; AES-GCM releases the GIL, so sealing runs in a
    worker thread — which, allocating nothing, leaves no memory in its own malloc arena."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal_into(self, chunk_id: str, index: int, plaintext: bytes | memoryview, out: memoryview) -> None:
        """Write ``nonce | ciphertext | tag`` of ``plaintext`` into ``out`` (exactly
        ``len(plaintext) + OVERHEAD_BYTES`` long)."""
        if len(out) != len(plaintext) + OVERHEAD_BYTES:
            raise ValueError("the output must be the plaintext's length plus the overhead")
        nonce = os.urandom(NONCE_BYTES)
        out[:NONCE_BYTES] = nonce
        self._aead.encrypt_into(nonce, plaintext, _aad(chunk_id, index), out[NONCE_BYTES:])


def open_chunk(key: bytes, chunk_id: str, index: int, sealed: bytes) -> bytes:
    """The plaintext of a sealed chunk; :class:`ChunkIntegrityError` if it does not authenticate."""
    if len(sealed) < OVERHEAD_BYTES:
        raise ChunkIntegrityError(f"chunk {chunk_id} is too short to be sealed")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], _aad(chunk_id, index))
    except InvalidTag:
        raise ChunkIntegrityError(f"chunk {chunk_id} does not authenticate") from None


def key_owner(user_id: str) -> str:
    """The vault owner of a user's file keys."""
    return f"user:{user_id}"


def key_purpose(key_id: str) -> str:
    """The vault purpose of one file key (binds the wrapped key to its id)."""
    return f"{KEY_PURPOSE}:{key_id}"
