"""Credential validation: table-driven cases for email and password_hash."""

from __future__ import annotations

import pytest

from controller.auth.validation import (
    PASSWORD_HASH_MAX_LENGTH,
    normalize_email,
    validate_credentials,
)
from controller.errors import FieldViolation

GOOD_HASH = "a" * 64  # e.g. hex SHA-256
GOOD_EMAIL = "alice@example.com"


@pytest.mark.parametrize(
    "email",
    [
        "alice@example.com",
        "  Alice.Smith@Example.COM  ",
        "a+tag@sub.example.co.uk",
        "o'brien@example.ie",
        "x@a-b.io",
        "user_name-1@xn--bcher-kva.example",
        "jörg@bücher.example",
        f"{'a' * 64}@example.com",
        f"a@{'b' * 63}.com",
        f"{'a' * 64}@{'b' * 63}.{'c' * 63}.{'d' * 57}.com",  # exactly 254
    ],
)
def test_valid_emails(email: str) -> None:
    assert validate_credentials(email, GOOD_HASH) == []


@pytest.mark.parametrize(
    ("email", "description"),
    [
        (None, "is required"),
        ("", "is required"),
        ("   ", "is required"),
        ("alice", "exactly one '@'"),
        ("alice@@example.com", "exactly one '@'"),
        ("a@b@example.com", "exactly one '@'"),
        ("@example.com", "needs a name before the '@'"),
        ("alice@", "needs a domain after the '@'"),
        ("alice@localhost", "needs a dot"),
        ("al ice@example.com", "spaces or control characters"),
        ("alice@exa mple.com", "spaces or control characters"),
        ("alice\x00@example.com", "spaces or control characters"),
        ("alice\t@example.com", "spaces or control characters"),
        ("alice\u200b@example.com", "spaces or control characters"),
        (".alice@example.com", "must not start or end with a dot"),
        ("alice.@example.com", "must not start or end with a dot"),
        ("al..ice@example.com", "two dots in a row"),
        ('"alice"@example.com', "not allowed"),
        ("ali(ce)@example.com", "not allowed"),
        ("alice@example..com", "empty labels"),
        ("alice@.example.com", "empty labels"),
        ("alice@example.com.", "empty labels"),
        ("alice@-example.com", "letters, digits and hyphens"),
        ("alice@example-.com", "letters, digits and hyphens"),
        ("alice@exa_mple.com", "letters, digits and hyphens"),
        ("alice@[127.0.0.1]", "letters, digits and hyphens"),
        ("alice@127.0.0.1", "must end in a name"),
        (f"{'a' * 65}@example.com", "at most 64 characters"),
        (f"alice@{'b' * 64}.com", "at most 63 characters"),
        (f"{'a' * 64}@{'b' * 63}.{'c' * 63}.{'d' * 58}.com", "at most 254 characters (got 255)"),
    ],
)
def test_invalid_emails(email: str | None, description: str) -> None:
    violations = validate_credentials(email, GOOD_HASH)
    assert len(violations) == 1
    assert violations[0].field == "email"
    assert description in violations[0].description


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Alice@Example.com", "alice@example.com"),
        ("  bob@example.com\n", "bob@example.com"),
        ("CAROL@EXAMPLE.ORG", "carol@example.org"),
    ],
)
def test_normalize_email(raw: str, normalised: str) -> None:
    assert normalize_email(raw) == normalised


@pytest.mark.parametrize(
    "password_hash",
    [
        "a" * 32,
        "0123456789abcdef" * 4,
        "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
        "q1w2e3r4+/==" * 3,
        "~" * PASSWORD_HASH_MAX_LENGTH,
    ],
)
def test_valid_password_hashes(password_hash: str) -> None:
    assert validate_credentials(GOOD_EMAIL, password_hash) == []


@pytest.mark.parametrize(
    ("password_hash", "description"),
    [
        (None, "is required"),
        ("", "is required"),
        ("a" * 31, "at least 32 characters"),
        ("hunter2", "at least 32 characters"),
        ("a" * (PASSWORD_HASH_MAX_LENGTH + 1), "at most 1024 characters (got 1025)"),
        ("a" * 100_000, "at most 1024 characters (got 100000)"),
        (" " + "a" * 40, "printable ASCII without spaces"),
        ("a" * 40 + "\n", "printable ASCII without spaces"),
        ("a" * 20 + " " + "a" * 20, "printable ASCII without spaces"),
        ("a" * 40 + "\x00", "printable ASCII without spaces"),
        ("é" * 40, "printable ASCII without spaces"),
    ],
)
def test_invalid_password_hashes(password_hash: str | None, description: str) -> None:
    violations = validate_credentials(GOOD_EMAIL, password_hash)
    assert len(violations) == 1
    assert violations[0].field == "password_hash"
    assert description in violations[0].description


def test_both_fields_missing_reports_both() -> None:
    assert validate_credentials("", "") == [
        FieldViolation("email", "is required"),
        FieldViolation("password_hash", "is required"),
    ]


def test_descriptions_never_echo_the_password_hash() -> None:
    secret = "s3cr3t-client-hash-value"
    for value in (secret, secret * 100, secret + " " + secret):
        for violation in validate_credentials(GOOD_EMAIL, value):
            assert secret not in violation.description


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("jos\u00e9@example.com", "jos\u00e9@example.com"),  # NFC stays
        ("jose\u0301@example.com", "jos\u00e9@example.com"),  # NFD becomes NFC
        ("JOS\u00c9@EXAMPLE.COM", "jos\u00e9@example.com"),
        ("\uff41dm@example.com", "adm@example.com"),  # full-width a
        ("\uff21\uff24\uff2d\uff20\uff45xample\uff0ecom", "adm@example.com"),  # full-width everything
        ("Stra\u00dfe@example.com", "strasse@example.com"),  # case folding, not lower()
        ("\u212aelvin@example.com", "kelvin@example.com"),  # KELVIN SIGN
        ("ops@b\u00fccher.example", "ops@xn--bcher-kva.example"),
        ("ops@B\u00dcCHER.example", "ops@xn--bcher-kva.example"),
        ("ops@bu\u0308cher.example", "ops@xn--bcher-kva.example"),
        ("ops@XN--BCHER-KVA.example", "ops@xn--bcher-kva.example"),
        ("ops@b\u00fccher\u3002example", "ops@xn--bcher-kva.example"),  # ideographic full stop
        ("ops@fa\u00df.de", "ops@xn--fa-hia.de"),  # IDNA 2008: ß is kept in domains
        ("\u00a0ada@example.com\u3000", "ada@example.com"),  # Unicode spaces around
    ],
)
def test_normalize_email_makes_lookalikes_one(raw: str, normalised: str) -> None:
    assert normalize_email(raw) == normalised
    assert normalize_email(normalised) == normalised  # idempotent
    assert validate_credentials(raw, GOOD_HASH) == []


@pytest.mark.parametrize(
    "email",
    [
        "ops@xn--zz.example",  # not valid punycode
        "ops@xn--bucher-xyd.example",  # the A-label of an NFD string: a lookalike of bücher
        "ops@b\u00fccher..example",
        "ops@\U0001f600.example",  # not allowed by IDNA 2008
    ],
)
def test_invalid_international_domains(email: str) -> None:
    violations = validate_credentials(email, GOOD_HASH)
    assert [v.field for v in violations] == ["email"]
    assert "domain" in violations[0].description
