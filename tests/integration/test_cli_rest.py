"""The CLI's password derivation is the one docs/auth.md gives the dashboard: an account the
CLI made signs in over REST (through the real Envoy gateway) with a hash computed here
independently, and an account made over REST signs in with ``a67 login``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import unicodedata
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from controller.server import Controller
from tests.e2e.conftest import Rest, start_gateway
from tests.integration.test_cli import A67
from tests.support import controller_settings, running_controller

PASSWORD = "Tr0ub4dor & 3, with ümlauts"


def dashboard_hash(email: str, password: str) -> str:
    """What docs/auth.md tells the dashboard to compute (ASCII email: lower case is its normal form)."""
    kdf = PBKDF2HMAC(
        algorithm=hashes.SHA256(),
        length=32,
        salt=b"automator67/password/v1:" + email.strip().lower().encode(),
        iterations=600_000,
    )
    return base64.b64encode(kdf.derive(unicodedata.normalize("NFC", password).encode())).decode()


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    async with running_controller(controller_settings(tmp_path / "controller")) as running:
        yield running


@pytest.fixture
def rest(controller: Controller, tmp_path: Path) -> Iterator[Rest]:
    workdir = tmp_path / "gateway"
    workdir.mkdir()
    with contextlib.contextmanager(start_gateway)(controller.address, workdir) as gateway:
        yield gateway.rest


async def test_cli_and_rest_derive_the_same_password_hash(
    controller: Controller, rest: Rest, tmp_path: Path
) -> None:
    a67 = A67(controller.address, tmp_path / "config")
    made = await a67("register", "--email", "Cli.User@Example.com", "--password-stdin", stdin=PASSWORD + "\n")
    assert made.code == 0, made.err

    body = {
        "email": "cli.user@example.com",
        "password_hash": dashboard_hash("Cli.User@Example.com", PASSWORD),
    }
    login = await asyncio.to_thread(rest.post, "/api/v1/auth/login", body)
    assert login.status == 200, login.body
    wrong = {**body, "password_hash": dashboard_hash("cli.user@example.com", PASSWORD + "!")}
    assert (await asyncio.to_thread(rest.post, "/api/v1/auth/login", wrong)).status == 401

    # The other way: an account made over REST, signed in with the CLI.
    body = {
        "email": "rest.user@example.com",
        "password_hash": dashboard_hash("rest.user@example.com", PASSWORD),
    }
    registered = await asyncio.to_thread(rest.post, "/api/v1/auth/register", body)
    assert registered.status == 201, registered.body
    signed_in = await a67(
        "login", "--email", "REST.user@example.com", "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert signed_in.code == 0, signed_in.err
    me = await a67("whoami", "--json")
    assert me.json()["user"]["email"] == "rest.user@example.com"
