"""REST through Envoy to a real controller: spec §5 status codes and bodies, CORS, limits, streams."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from automator67.v1 import auth_pb2, auth_pb2_grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controller.gateway.config import REPO_ROOT as ROOT
from tests.e2e.conftest import (
    DASHBOARD_ORIGIN,
    E2E_MAX_BODY,
    STREAM_INTERVAL,
    STREAM_MESSAGES,
    Reply,
    Rest,
    RunningController,
    RunningGateway,
    free_port,
    start_gateway,
)
from tests.integration.test_deployments import Agent, source_tar_gz
from tests.support import PASSWORD

ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"


def new_email() -> str:
    return f"user-{uuid.uuid4().hex[:12]}@example.com"


def register(rest: Rest, email: str | None = None) -> tuple[str, dict[str, Any]]:
    email = email or new_email()
    reply = rest.post("/api/v1/auth/register", {"email": email, "password_hash": PASSWORD})
    assert reply.status == 201, reply.body
    return email, reply.json


def details_of(reply: Reply, type_url: str) -> dict[str, Any]:
    found = [d for d in reply.json["details"] if d["@type"] == type_url]
    assert len(found) == 1, reply.json
    return found[0]


@pytest.fixture(scope="module")
def account(rest: Rest) -> dict[str, Any]:
    email, body = register(rest)
    return {"email": email, **body}


# -- the auth flow -------------------------------------------------------------


def test_register_answers_201_with_snake_case_tokens(rest: Rest) -> None:
    reply = rest.post("/api/v1/auth/register", {"email": new_email(), "password_hash": PASSWORD})
    assert reply.status == 201
    assert reply.headers["content-type"] == "application/json"
    body = reply.json
    assert set(body) == {"user_id", "access_token", "refresh_token", "expires_in"}
    assert len(body["user_id"]) == 36
    assert body["access_token"].count(".") == 2
    assert body["refresh_token"].count(".") == 2
    assert int(body["expires_in"]) == 3600
    # The Lua filter consumed the servicer's status header; gRPC transport headers stay behind.
    assert not {"x-a67-http-status", "grpc-status", "grpc-message"} & set(reply.headers)


def test_expires_in_is_a_json_number(rest: Rest) -> None:
    _, body = register(rest)
    assert body["expires_in"] == 3600


def test_duplicate_email_is_409_with_a_google_rpc_status_body(rest: Rest) -> None:
    email, _ = register(rest)
    reply = rest.post("/api/v1/auth/register", {"email": email.upper(), "password_hash": PASSWORD})
    assert reply.status == 409
    assert reply.headers["content-type"] == "application/json"
    assert reply.json["code"] == 6  # ALREADY_EXISTS
    assert reply.json["message"]
    info = details_of(reply, ERROR_INFO)
    assert info["reason"] == "EMAIL_TAKEN"
    assert info["domain"] == "automator67.dev"


@pytest.mark.parametrize(
    ("body", "bad_field"),
    [
        ({"email": "not-an-email", "password_hash": PASSWORD}, "email"),
        ({"email": "", "password_hash": PASSWORD}, "email"),
        ({"email": "ada@example.com", "password_hash": "short"}, "password_hash"),
    ],
    ids=["malformed-email", "missing-email", "short-password-hash"],
)
def test_bad_registration_is_400_with_field_violations(
    rest: Rest, body: dict[str, str], bad_field: str
) -> None:
    reply = rest.post("/api/v1/auth/register", body)
    assert reply.status == 400
    assert reply.json["code"] == 3  # INVALID_ARGUMENT
    violations = details_of(reply, BAD_REQUEST)["field_violations"]
    assert bad_field in {v["field"] for v in violations}
    assert all(v["description"] for v in violations)


def test_login_is_200_with_expires_in(rest: Rest, account: dict[str, Any]) -> None:
    reply = rest.post("/api/v1/auth/login", {"email": account["email"], "password_hash": PASSWORD})
    assert reply.status == 200
    assert set(reply.json) == {"access_token", "refresh_token", "expires_in", "mfa_required", "mfa_challenge"}
    assert int(reply.json["expires_in"]) == 3600
    assert reply.json["mfa_required"] is False  # no second factor on this account
    assert reply.json["mfa_challenge"] == ""


def test_wrong_password_is_401(rest: Rest, account: dict[str, Any]) -> None:
    reply = rest.post("/api/v1/auth/login", {"email": account["email"], "password_hash": PASSWORD + "x"})
    assert reply.status == 401
    assert reply.json["code"] == 16  # UNAUTHENTICATED
    assert details_of(reply, ERROR_INFO)["reason"]


def test_refresh_rotates_and_a_reused_refresh_token_is_401(rest: Rest) -> None:
    _, session = register(rest)
    first = rest.post("/api/v1/auth/refresh", token=session["refresh_token"])
    assert first.status == 200
    assert set(first.json) == {"access_token", "refresh_token", "expires_in"}
    assert first.json["refresh_token"] != session["refresh_token"]
    assert rest.get("/api/v1/auth/me", token=first.json["access_token"]).status == 200

    reused = rest.post("/api/v1/auth/refresh", token=session["refresh_token"])
    assert reused.status == 401
    assert reused.json["code"] == 16


def test_me_needs_a_token(rest: Rest) -> None:
    reply = rest.get("/api/v1/auth/me")
    assert reply.status == 401
    assert reply.json["code"] == 16
    assert rest.get("/api/v1/auth/me", token="not.a.token").status == 401


def test_me_with_the_access_token_passed_through(rest: Rest, account: dict[str, Any]) -> None:
    reply = rest.get("/api/v1/auth/me", token=account["access_token"])
    assert reply.status == 200
    user = reply.json["user"]
    assert user["id"] == account["user_id"]
    assert user["email"] == account["email"]
    assert user["active"] is True
    assert user["mfa_enabled"] is False  # always_print_primitive_fields: false is printed too
    assert user["created_at"].endswith("Z")  # Timestamp → RFC 3339


def test_logout_ends_the_session(rest: Rest) -> None:
    _, session = register(rest)
    assert rest.post("/api/v1/auth/logout", token=session["access_token"]).status == 200
    assert rest.get("/api/v1/auth/me", token=session["access_token"]).status == 401
    assert rest.post("/api/v1/auth/refresh", token=session["refresh_token"]).status == 401


def test_files_of_a_new_user_are_an_empty_list(rest: Rest, account: dict[str, Any]) -> None:
    reply = rest.request("GET", "/api/v1/files", token=account["access_token"])
    assert reply.status == 200, reply.body
    assert reply.json.get("files", []) == []


def test_transaction_routes_reach_the_controller(rest: Rest, account: dict[str, Any]) -> None:
    """Begin, commit and rollback are routed (an unknown route would be 404 from Envoy itself):
    on a database that is not the caller's, each is 403 like every other database call."""
    token = account["access_token"]
    database, transaction = uuid.uuid4(), uuid.uuid4()
    for path in (
        f"/api/v1/databases/{database}/transactions",
        f"/api/v1/databases/{database}/transactions/{transaction}:commit",
        f"/api/v1/databases/{database}/transactions/{transaction}:rollback",
    ):
        reply = rest.post(path, {}, token=token)
        assert reply.status == 403, (path, reply.status, reply.body)
        assert reply.json["code"] == 7  # PERMISSION_DENIED


async def test_create_deployment_is_202_through_the_gateway(
    rest: Rest, controller: RunningController
) -> None:
    _, user = await asyncio.to_thread(register, rest)  # its own user: other tests list deployments
    token = user["access_token"]
    async with grpc.aio.insecure_channel(controller.address) as channel:
        # A fake node holding its mutual-TLS stream, so the deployment can be placed.
        node = Agent(controller, channel, token, "eu-west")  # type: ignore[arg-type]
        await node.register()
        await node.connect()
        await node.ready()
        try:
            body = {
                "manifest": {
                    "name": f"web-{uuid.uuid4().hex[:8]}",
                    "app_type": "APP_TYPE_BACKEND",
                    "runtime": "python",
                    "entrypoint": "app.py",
                    "resources": {"memory": "64MB", "cpu": "0.1"},
                    "replicas": 1,
                },
                "source_tar_gz": base64.b64encode(source_tar_gz()).decode(),
            }
            reply = await asyncio.to_thread(rest.post, "/api/v1/deployments", body, token=token)
            assert reply.status == 202, reply.body
            assert reply.json["status"] == "DEPLOYMENT_STATUS_PENDING"
            deployment_id = reply.json["deployment_id"]
            for _ in range(200):
                got = await asyncio.to_thread(rest.get, f"/api/v1/deployments/{deployment_id}", token=token)
                if got.json["deployment"]["status"] == "DEPLOYMENT_STATUS_RUNNING":
                    break
                await asyncio.sleep(0.05)
            assert got.status == 200
            assert got.json["deployment"]["status"] == "DEPLOYMENT_STATUS_RUNNING"
            assert got.json["deployment"]["placement"][0]["selected"] is True
        finally:
            await node.kill()


def test_databases_list_and_a_database_not_yours_is_403(rest: Rest, account: dict[str, Any]) -> None:
    reply = rest.request("GET", "/api/v1/databases", token=account["access_token"])
    assert reply.status == 200
    assert reply.json["databases"] == []
    reply = rest.request("GET", f"/api/v1/databases/{uuid.uuid4()}", token=account["access_token"])
    assert reply.status == 403
    reply = rest.post(
        f"/api/v1/databases/{uuid.uuid4()}/query", {"query": "SELECT 1"}, token=account["access_token"]
    )
    assert reply.status == 403
    reply = rest.post("/api/v1/databases", {"name": "Bad Name!"}, token=account["access_token"])
    assert reply.status == 400
    fields = {v["field"] for v in details_of(reply, BAD_REQUEST)["field_violations"]}
    assert {"name", "sharding.shard_count", "sharding.sharding_key"} <= fields


# -- nodes and metrics: resources and ownership ------------------------------------


def make_csr() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "e2e-agent")]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(scope="module")
def node_of_account(rest: Rest, account: dict[str, Any]) -> str:
    """A node registered over REST by ``account`` with an enrollment token."""
    enrollment = rest.post("/api/v1/nodes/enrollment-tokens", {}, token=account["access_token"])
    assert enrollment.status == 201, enrollment.body
    registered = rest.post(
        "/api/v1/nodes/register",
        {
            "enrollment_token": enrollment.json["token"],
            "provider": "PROVIDER_RENDER",
            "endpoint": "https://e2e-node.onrender.com",
            "region": "oregon",
            "capabilities": {"cpu_cores": 1, "memory_gb": 0.5, "disk_gb": 1, "network_bandwidth_mbps": 100},
            "csr_pem": make_csr(),
            "fingerprint": uuid.uuid4().hex,
        },
    )
    assert registered.status == 201, registered.body  # RegisterNode: 201 through the Lua filter
    assert "BEGIN CERTIFICATE" in registered.json["certificate_pem"]
    return str(registered.json["node_id"])


OPENAPI = ROOT / "docs" / "openapi.json"


def documented_success(verb: str, path: str) -> int:
    """The success status docs/openapi.json gives for ``verb path``."""
    operation = json.loads(OPENAPI.read_text())["paths"][path][verb.lower()]
    (status,) = (code for code in operation["responses"] if code != "default")
    return int(status)


def test_success_statuses_are_the_documented_ones(rest: Rest) -> None:
    email, session = register(rest)
    token = session["access_token"]
    calls = [
        (
            "POST",
            "/api/v1/auth/register",
            rest.post("/api/v1/auth/register", {"email": new_email(), "password_hash": PASSWORD}),
        ),
        (
            "POST",
            "/api/v1/auth/login",
            rest.post("/api/v1/auth/login", {"email": email, "password_hash": PASSWORD}),
        ),
        ("GET", "/api/v1/auth/me", rest.get("/api/v1/auth/me", token=token)),
        ("GET", "/api/v1/nodes", rest.get("/api/v1/nodes", token=token)),
        ("GET", "/api/v1/metrics/system", rest.get("/api/v1/metrics/system", token=token)),
        (
            "POST",
            "/api/v1/nodes/enrollment-tokens",
            rest.post("/api/v1/nodes/enrollment-tokens", {}, token=token),
        ),
    ]
    got = {(verb, path): reply.status for verb, path, reply in calls}
    assert got == {(verb, path): documented_success(verb, path) for verb, path, _ in calls}


def test_list_nodes_prints_empty_fields(rest: Rest) -> None:
    _, session = register(rest)
    reply = rest.get("/api/v1/nodes", token=session["access_token"])
    assert reply.status == 200
    assert reply.json == {"nodes": [], "next_page_token": ""}


def test_own_node_is_200_with_enum_names(rest: Rest, account: dict[str, Any], node_of_account: str) -> None:
    reply = rest.get(f"/api/v1/nodes/{node_of_account}", token=account["access_token"])
    assert reply.status == 200
    node = reply.json["node"]
    assert node["id"] == node_of_account
    assert node["provider"] == "PROVIDER_RENDER"  # enums print as names
    assert node["status"].startswith("NODE_STATUS_")


def test_another_users_node_is_404_like_a_missing_one(rest: Rest, node_of_account: str) -> None:
    _, stranger = register(rest)
    theirs = rest.get(f"/api/v1/nodes/{node_of_account}", token=stranger["access_token"])
    missing = rest.get(f"/api/v1/nodes/{uuid.uuid4()}", token=stranger["access_token"])
    assert theirs.status == missing.status == 404
    assert theirs.json["code"] == missing.json["code"] == 5
    assert details_of(theirs, ERROR_INFO)["reason"] == details_of(missing, ERROR_INFO)["reason"]
    drained = rest.post(f"/api/v1/nodes/{node_of_account}:drain", {}, token=stranger["access_token"])
    assert drained.status == 404


def test_deployments_list_and_a_missing_one(rest: Rest, account: dict[str, Any]) -> None:
    token = account["access_token"]
    listing = rest.get("/api/v1/deployments?page_size=10", token=token)
    assert listing.status == 200
    assert listing.json == {"deployments": [], "next_page_token": ""}
    for path in (f"/api/v1/deployments/{uuid.uuid4()}", f"/api/v1/deployments/{uuid.uuid4()}:watch"):
        missing = rest.get(path, token=token)
        assert missing.status == 404, path
        assert missing.json["code"] == 5


def test_a_deployment_without_nodes_is_503(rest: Rest, account: dict[str, Any]) -> None:
    source = io.BytesIO()
    with tarfile.open(fileobj=source, mode="w:gz") as archive:
        script = b'print("hello")\n'
        member = tarfile.TarInfo("main.py")
        member.size = len(script)
        archive.addfile(member, io.BytesIO(script))
    manifest = {
        "name": f"hello-{uuid.uuid4().hex[:8]}",
        "app_type": "APP_TYPE_BACKEND",
        "runtime": "python",
        "entrypoint": "main.py",
        "resources": {"memory": "128MB", "cpu": "0.1", "storage": "100MB"},
        "replicas": 1,
    }
    body = {"manifest": manifest, "source_tar_gz": base64.b64encode(source.getvalue()).decode()}
    reply = rest.post("/api/v1/deployments", body, token=account["access_token"])
    assert reply.status == 503
    assert reply.json["code"] == 14  # UNAVAILABLE: no capacity


def test_system_metrics_is_200(rest: Rest, account: dict[str, Any]) -> None:
    reply = rest.get("/api/v1/metrics/system", token=account["access_token"])
    assert reply.status == 200
    assert reply.json["metrics"]["healthy_nodes"] == 0


def test_watch_system_metrics_streams_from_the_controller(rest: Rest, account: dict[str, Any]) -> None:
    started = time.monotonic()
    reply, lines = rest.stream_lines("/api/v1/metrics/system:watch", token=account["access_token"], limit=1)
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/x-ndjson"
    first = json.loads(lines[0][1])
    assert set(first["metrics"]) >= {"time", "total_nodes", "healthy_nodes", "cpu_percent"}
    assert lines[0][0] - started < 5  # pushed at once, not when the stream ends


def test_watch_with_a_bad_argument_is_400_before_streaming(rest: Rest, account: dict[str, Any]) -> None:
    reply = rest.get("/api/v1/metrics/system:watch?min_interval_ms=50", token=account["access_token"])
    assert reply.status == 400
    violations = details_of(reply, BAD_REQUEST)["field_violations"]
    assert [v["field"] for v in violations] == ["min_interval_ms"]


def test_watch_without_a_token_is_401(rest: Rest) -> None:
    assert rest.get("/api/v1/metrics/system:watch").status == 401


# -- what Envoy answers itself ---------------------------------------------------


def test_unknown_path_is_404_json(rest: Rest) -> None:
    reply = rest.get("/api/v1/no-such-thing")
    assert reply.status == 404
    assert reply.headers["content-type"] == "application/json"
    assert reply.json["code"] == 5  # NOT_FOUND
    assert "/api/v1/no-such-thing" in reply.json["message"]


def test_known_path_with_unknown_method_is_404(rest: Rest) -> None:
    assert rest.request("DELETE", "/api/v1/auth/me").status == 404


def test_unknown_query_parameter_is_400(rest: Rest, account: dict[str, Any]) -> None:
    reply = rest.get("/api/v1/auth/me?colour=blue", token=account["access_token"])
    assert reply.status == 400
    assert reply.json["code"] == 3
    assert "colour" in reply.json["message"]


def test_malformed_json_is_400(rest: Rest) -> None:
    reply = rest.request("POST", "/api/v1/auth/login", raw=b'{"email": ')
    assert reply.status == 400
    assert reply.json["code"] == 3


def test_oversized_body_is_413(rest: Rest) -> None:
    body = {"email": new_email(), "password_hash": "x" * (E2E_MAX_BODY + 1)}
    reply = rest.post("/api/v1/auth/register", body)
    assert reply.status == 413
    assert reply.json["code"] == 8  # RESOURCE_EXHAUSTED


def test_healthz_is_answered_by_envoy(rest: Rest) -> None:
    reply = rest.get("/healthz")
    assert (reply.status, reply.body) == (200, b"ok\n")


@pytest.fixture(scope="module")
def orphan_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """A gateway whose controller is not running."""
    yield from start_gateway(f"127.0.0.1:{free_port()}", tmp_path_factory.mktemp("orphan"))


def test_unreachable_controller_is_503_json(orphan_gateway: RunningGateway) -> None:
    reply = orphan_gateway.rest.get("/api/v1/auth/me")
    assert reply.status == 503
    assert reply.json["code"] == 14  # UNAVAILABLE


# -- CORS -----------------------------------------------------------------------


def preflight(rest: Rest, origin: str) -> Reply:
    return rest.request(
        "OPTIONS",
        "/api/v1/auth/register",
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization,content-type",
        },
    )


def test_cors_preflight_from_the_dashboard_is_allowed(rest: Rest) -> None:
    reply = preflight(rest, DASHBOARD_ORIGIN)
    assert reply.status == 200
    assert reply.headers["access-control-allow-origin"] == DASHBOARD_ORIGIN
    allowed = {h.strip() for h in reply.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    assert "POST" in reply.headers["access-control-allow-methods"]


def test_cors_preflight_from_another_origin_gets_no_allow_headers(rest: Rest) -> None:
    reply = preflight(rest, "https://evil.example")
    assert not any(h.startswith("access-control-allow-") for h in reply.headers)


def test_cors_actual_request_from_the_dashboard_carries_allow_origin(rest: Rest) -> None:
    reply = rest.post(
        "/api/v1/auth/register",
        {"email": new_email(), "password_hash": PASSWORD},
        headers={"origin": DASHBOARD_ORIGIN},
    )
    assert reply.status == 201
    assert reply.headers["access-control-allow-origin"] == DASHBOARD_ORIGIN
    other = rest.get("/api/v1/auth/me", headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


# -- server streams, message by message (a slow servicer of our own; see conftest) --


def test_server_stream_pushes_each_message_as_it_is_sent(stream_gateway: RunningGateway) -> None:
    reply, lines = stream_gateway.rest.stream_lines("/api/v1/metrics/system:watch", token="any")
    assert reply.status == 200
    if stream_gateway.settings.stream_format == "sse":
        assert reply.headers["content-type"] == "text/event-stream"
        assert all(line.startswith(b"data: ") for _, line in lines)
        payloads = [json.loads(line.removeprefix(b"data: ")) for _, line in lines]
    else:
        assert reply.headers["content-type"] == "application/x-ndjson"
        payloads = [json.loads(line) for _, line in lines]
    assert [p["metrics"]["total_nodes"] for p in payloads] == list(range(1, STREAM_MESSAGES + 1))
    assert payloads[0]["metrics"]["cpu_percent"] == 12.5
    assert payloads[0]["metrics"]["healthy_nodes"] == 0  # primitives always printed
    # Live pushes: the first message arrived well before the stream ended.
    spread = lines[-1][0] - lines[0][0]
    assert spread >= (STREAM_MESSAGES - 1) * STREAM_INTERVAL * 0.8


def test_server_stream_error_before_the_first_message_is_an_http_error(
    stream_gateway: RunningGateway,
) -> None:
    reply, lines = stream_gateway.rest.stream_lines("/api/v1/metrics/system:watch")
    assert reply.status == 401
    assert json.loads(b"".join(line for _, line in lines))["code"] == 16


# -- a67 up -------------------------------------------------------------------------

A67 = [sys.executable, "-m", "controller.cli"]


def wait_for_output(process: subprocess.Popen[bytes], stdout: Path, stderr: Path, marker: str) -> str:
    """``stdout`` once it holds ``marker``; fails if the process exits or 90 s pass first."""
    deadline = time.monotonic() + 90
    while marker not in (text := stdout.read_text()):
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no {marker!r} in the output {text!r}; stderr: {stderr.read_text()}")
        time.sleep(0.05)
    return text


def test_a67_up_serves_rest_and_grpc_then_stops_both_on_sigterm(tmp_path: Path) -> None:
    http_port, grpc_port = free_port(), free_port()
    grpc_address = f"127.0.0.1:{grpc_port}"
    argv = [
        *A67,
        "up",
        "--grpc-listen",
        grpc_address,
        "--node-listen",
        f"127.0.0.1:{free_port()}",
        "--http-listen",
        f"127.0.0.1:{http_port}",
        "--ingress-listen",
        f"127.0.0.1:{free_port()}",
        "--xds-listen",
        f"127.0.0.1:{free_port()}",
        "--data-dir",
        str(tmp_path / "data"),
        "--log-level",
        "WARNING",
    ]
    stdout, stderr = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        up = subprocess.Popen(argv, stdout=out, stderr=err, start_new_session=True)
    children: list[psutil.Process] = []
    try:
        banner = wait_for_output(up, stdout, stderr, "Press Ctrl-C to stop.")
        assert f"http://127.0.0.1:{http_port}" in banner
        assert grpc_address in banner
        children = psutil.Process(up.pid).children()
        assert len(children) == 3  # the controller, the gateway and the ingress Envoy

        _, session = register(Rest("127.0.0.1", http_port))
        with grpc.insecure_channel(grpc_address) as channel:
            me = auth_pb2_grpc.AuthServiceStub(channel).GetCurrentUser(
                auth_pb2.GetCurrentUserRequest(),
                metadata=(("authorization", f"Bearer {session['access_token']}"),),
                timeout=10,
            )
        assert me.user.id == session["user_id"]

        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=30) == 0
        assert not [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    finally:
        for process in [*children, psutil.Process(up.pid)] if up.poll() is None else children:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        up.wait(timeout=10)
