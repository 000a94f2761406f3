"""The client-side password derivation against docs/auth.md's test vectors."""

from __future__ import annotations

import base64
import json
import re
import unicodedata
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from controller.auth.validation import normalize_email, password_hash_problem
from controller.client.kdf import ITERATIONS, derive_password_hash

DOC = Path(__file__).resolve().parents[2] / "docs" / "auth.md"
ROW = re.compile(r'^\| (".*?") \| (".*?") \| (\S+) \| `([A-Za-z0-9+/=]+)` \|$')


def vectors() -> list[tuple[str, str, str, str]]:
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match:
            email, password = json.loads(match[1]), json.loads(match[2])
            rows.append((email, password, match[3], match[4]))
    return rows


def independent(email_n: str, password: str) -> str:
    """The derivation as docs/auth.md states it, with another library's PBKDF2."""
    kdf = PBKDF2HMAC(
        algorithm=hashes.SHA256(),
        length=32,
        salt=("automator67/password/v1:" + email_n).encode(),
        iterations=600_000,
    )
    return base64.b64encode(kdf.derive(unicodedata.normalize("NFC", password).encode())).decode()


def test_the_doc_has_vectors() -> None:
    assert len(vectors()) >= 4
    assert ITERATIONS >= 600_000


@pytest.mark.parametrize(("email", "password", "normalised", "expected"), vectors())
def test_vector(email: str, password: str, normalised: str, expected: str) -> None:
    assert normalize_email(email) == normalised
    assert derive_password_hash(email, password) == expected
    assert independent(normalised, password) == expected
    assert password_hash_problem(expected) is None  # the server accepts its shape


def test_nfc_and_email_forms_agree_and_passwords_differ() -> None:
    composed = derive_password_hash("grace@example.org", "p\u00e4sswort")
    assert derive_password_hash("GRACE@example.ORG", "pa\u0308sswort") == composed
    assert derive_password_hash("grace@example.org", "passwort") != composed
    assert derive_password_hash("other@example.org", "p\u00e4sswort") != composed
