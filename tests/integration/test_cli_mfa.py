"""``a67 auth mfa …`` and ``a67 login`` with a second factor, as real processes (issue 16)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pyotp
import pytest

from controller.server import Controller
from tests.integration.test_cli import A67, PASSWORD
from tests.support import controller_settings, running_controller


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    async with running_controller(controller_settings(tmp_path / "controller")) as running:
        yield running


async def test_mfa_commands_and_two_step_login(controller: Controller, tmp_path: Path) -> None:
    a67 = A67(controller.address, tmp_path / "config")
    made = await a67("register", "--email", "ada@example.com", "--password-stdin", stdin=PASSWORD + "\n")
    assert made.code == 0, made.err
    enrolled = await a67("auth", "mfa", "enroll", "--json")
    assert enrolled.code == 0, enrolled.err
    secret = enrolled.json()["secret"]
    assert enrolled.json()["otpauth_uri"].startswith("otpauth://totp/")
    confirmed = await a67("auth", "mfa", "confirm", pyotp.TOTP(secret).now(), "--json")
    assert confirmed.code == 0, confirmed.err
    codes = confirmed.json()["recovery_codes"]
    assert len(codes) == 10
    status = await a67("auth", "mfa", "status", "--json")
    assert status.json() == {"mfa_enabled": True}

    await a67("logout")
    # Without a code (and no terminal) the CLI says what to give.
    missing = await a67("login", "--email", "ada@example.com", "--password-stdin", stdin=PASSWORD + "\n")
    assert missing.code != 0
    assert "--code" in missing.err
    wrong = await a67(
        "login",
        "--email",
        "ada@example.com",
        "--password-stdin",
        "--recovery-code",
        "aaaaa-bbbbb",
        stdin=PASSWORD + "\n",
    )
    assert wrong.code != 0
    assert "Wrong or already used code" in wrong.err
    ok = await a67(
        "login",
        "--email",
        "ada@example.com",
        "--password-stdin",
        "--recovery-code",
        codes[0],
        stdin=PASSWORD + "\n",
    )
    assert ok.code == 0, ok.err
    off = await a67("auth", "mfa", "disable", "--recovery-code", codes[1])
    assert off.code == 0, off.err
    assert (await a67("auth", "mfa", "status", "--json")).json() == {"mfa_enabled": False}
    audit = await a67("auth", "audit", "--json")
    assert audit.code == 0, audit.err
    purposes = {e["secret_purpose"] for e in audit.json()["events"]}
    assert purposes == {"mfa-totp"}
