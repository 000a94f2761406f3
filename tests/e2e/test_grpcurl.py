"""grpcurl against a real controller, through server reflection, as an engineer would use it."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from controller.gateway.config import DEFAULT_DESCRIPTOR
from controller.gateway.render import api_services
from tests.e2e.conftest import RunningController, grpcurl_binary
from tests.support import PASSWORD


def grpcurl(
    controller: RunningController, *words: str, flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """``grpcurl -plaintext FLAGS… ADDRESS WORDS…`` (WORDS: ``list``, ``describe X`` or a method)."""
    return subprocess.run(
        [grpcurl_binary(), "-plaintext", *flags, controller.address, *words],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def call(
    controller: RunningController, method: str, data: str, *headers: str
) -> subprocess.CompletedProcess[str]:
    """``grpcurl -plaintext [-H header]… -d DATA ADDRESS METHOD``."""
    flags = tuple(arg for header in headers for arg in ("-H", header))
    return grpcurl(controller, method, flags=(*flags, "-d", data))


@pytest.fixture(scope="module")
def session(controller: RunningController) -> dict[str, str]:
    email = f"eng-{uuid.uuid4().hex[:12]}@example.com"
    result = call(
        controller,
        "automator67.v1.AuthService/Register",
        json.dumps({"email": email, "password_hash": PASSWORD}),
    )
    assert result.returncode == 0, result.stderr
    return {"email": email, **json.loads(result.stdout)}


def test_list_shows_every_service_health_and_reflection(controller: RunningController) -> None:
    result = grpcurl(controller, "list")
    assert result.returncode == 0, result.stderr
    listed = set(result.stdout.split())
    assert set(api_services(DEFAULT_DESCRIPTOR)) <= listed
    assert "grpc.health.v1.Health" in listed
    assert any(name.startswith("grpc.reflection.") for name in listed), listed


def test_describe_auth_service(controller: RunningController) -> None:
    result = grpcurl(controller, "describe", "automator67.v1.AuthService")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "automator67.v1.AuthService is a service:" in out
    for rpc in ("Register", "Login", "Refresh", "Logout", "GetCurrentUser"):
        assert f"rpc {rpc} (" in out


def test_register_with_a_json_body(session: dict[str, str]) -> None:
    # grpcurl prints proto JSON with the proto's own (snake_case) field names.
    assert len(session["user_id"]) == 36
    assert session["access_token"].count(".") == 2
    assert session["refresh_token"].count(".") == 2


def test_get_current_user_with_a_bearer_token(controller: RunningController, session: dict[str, str]) -> None:
    result = call(
        controller,
        "automator67.v1.AuthService/GetCurrentUser",
        "{}",
        f"authorization: Bearer {session['access_token']}",
    )
    assert result.returncode == 0, result.stderr
    user = json.loads(result.stdout)["user"]
    assert user["id"] == session["user_id"]
    assert user["email"] == session["email"]


def test_get_current_user_without_a_token_is_unauthenticated(controller: RunningController) -> None:
    result = call(controller, "automator67.v1.AuthService/GetCurrentUser", "{}")
    assert result.returncode != 0
    assert "Unauthenticated" in result.stdout + result.stderr


def test_health_check_is_serving(controller: RunningController) -> None:
    result = call(controller, "grpc.health.v1.Health/Check", "{}")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "SERVING"
