"""controller.redact: credentials in untrusted text are masked, and the text is capped."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controller.redact import MASK, MAX_CHARS, redact


@pytest.mark.parametrize(
    ("text", "secret", "kept"),
    [
        (
            "db postgresql://postgres:hunter2pw@10.0.0.1:5432/x",
            "hunter2pw",
            "postgresql://postgres:***@10.0.0.1",
        ),
        ("A67_AGENT_TOKEN=a67e_abcdef", "a67e_abcdef", "A67_AGENT_TOKEN=***"),
        ("export API_KEY='k 1 2'", "k 1 2", "API_KEY='***'"),
        ('{"password": "pw-value"}', "pw-value", '"password": "***"'),
        ("DB_PASSWORD: letmein", "letmein", "DB_PASSWORD: ***"),
        ("MY_SECRET=xyz", "xyz", "MY_SECRET=***"),
        ("jwt eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl end", "eyJzdWIiOiIxIn0", "jwt *** end"),
        ("Authorization: Bearer abc.def-ghi_jkl", "abc.def-ghi_jkl", "Bearer ***"),
        ("token a67e_Zx8Qm3LrT0vB9pK2sW7yN4cH6jF1dG5aE0uI", "Zx8Qm3LrT0vB9pK2sW7yN4cH6jF1dG5aE0uI", "token "),
    ],
)
def test_credentials_are_masked(text: str, secret: str, kept: str) -> None:
    out = redact(text)
    assert secret not in out
    assert kept in out


def test_a_pem_private_key_is_masked_whole_or_cut() -> None:
    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        .decode()
    )
    body = pem.splitlines()[1:-1]
    out = redact(f"before\n{pem}after")
    assert out.startswith("before\n")
    assert out.endswith("after")
    assert MASK in out
    assert not any(line in out for line in body)
    cut = redact("x " + pem[: len(pem) // 2])  # the END line never came
    assert not any(line in cut for line in body if len(line) > 20)


def test_ordinary_output_is_left_alone() -> None:
    text = (
        'Traceback (most recent call last):\n  File "/srv/app/main.py", line 3, in <module>\n'
        "KeyError: 'PORT'\nlistening on http://127.0.0.1:8080/health\n"
        "/usr/lib/python3.11/site-packages/somepackage/submodule/deeply_nested_module.py"
    )
    assert redact(text) == text


def test_the_text_is_capped_keeping_its_end() -> None:
    text = "".join(f"line {i}\n" for i in range(5000))
    out = redact(text)
    assert len(out) == MAX_CHARS
    assert out.startswith("…")
    assert out.endswith("line 4999\n")
    assert len(redact("short", limit=100)) == 5
