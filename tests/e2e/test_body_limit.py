"""The gateway's request body limit: every body over it gets 413, whatever its size or framing;
every body up to it reaches the controller (never a gRPC "message larger than max" 429).

Both at a small limit (the e2e gateway's 64 KiB) and at the default (16 MiB), against a real
controller and real Envoy, over raw HTTP/1.1 with a content-length and chunked (no length).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from controller.gateway.config import GatewaySettings
from tests.e2e.conftest import (
    E2E_MAX_BODY,
    Reply,
    Rest,
    RunningController,
    RunningGateway,
    json_body,
    send_body,
    start_gateway,
)
from tests.support import PASSWORD

DEFAULT_LIMIT = GatewaySettings().max_request_body_size
LOGIN = "/api/v1/auth/login"

FRAMINGS = {"content-length": None, "chunked-1k": 1024, "chunked-16k": 16 * 1024, "chunked-1m": 1024 * 1024}


@pytest.fixture(scope="module")
def account(rest: Rest) -> dict[str, str]:
    reply = rest.post(
        "/api/v1/auth/register",
        {"email": f"big-{uuid.uuid4().hex[:8]}@example.com", "password_hash": PASSWORD},
    )
    assert reply.status == 201, reply.body
    return dict(reply.json)


@pytest.fixture(scope="module")
def default_gateway(
    controller: RunningController, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    """A gateway with the default body limit, in front of the same controller."""
    yield from start_gateway(
        controller.address, tmp_path_factory.mktemp("default-limit"), max_request_body_size=DEFAULT_LIMIT
    )


def post(gateway: RunningGateway, body: bytes, framing: str, path: str = LOGIN) -> Reply:
    host, port = gateway.settings.listen
    return send_body(host, port, path, body, chunk_size=FRAMINGS[framing])


def assert_413(reply: Reply, limit: int) -> None:
    assert reply.status == 413, (reply.status, reply.body[:300])
    assert reply.json == {
        "code": 8,  # RESOURCE_EXHAUSTED
        "message": f"The request body is larger than the gateway's limit of {limit} bytes",
    }


def assert_reached_the_controller(reply: Reply) -> None:
    """The controller's own validation answered: the body got through whole."""
    assert reply.status == 400, (reply.status, reply.body[:300])
    assert reply.json["code"] == 3
    violations = [d for d in reply.json["details"] if d["@type"].endswith("google.rpc.BadRequest")]
    assert violations, reply.json
    assert [v["field"] for v in violations[0]["field_violations"]] == ["password_hash"]


def test_the_fixture_gateway_has_the_small_limit(gateway: RunningGateway) -> None:
    assert gateway.settings.max_request_body_size == E2E_MAX_BODY == 64 * 1024


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize(
    "size",
    [E2E_MAX_BODY + 1, E2E_MAX_BODY + 100, 70_000, 100_000, 150_000, 200_000, 1_000_000, 5_000_000],
)
def test_over_a_small_limit_is_413(gateway: RunningGateway, size: int, framing: str) -> None:
    # The attack run saw 70-200 kB get through part of the time: ask several times.
    for _ in range(3):
        assert_413(post(gateway, json_body(size, email="a@example.com"), framing), E2E_MAX_BODY)


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("size", [E2E_MAX_BODY, E2E_MAX_BODY - 1, E2E_MAX_BODY - 1000])
def test_up_to_a_small_limit_reaches_the_controller(gateway: RunningGateway, size: int, framing: str) -> None:
    assert_reached_the_controller(post(gateway, json_body(size, email="a@example.com"), framing))


@pytest.mark.parametrize("framing", ["content-length", "chunked-1m"])
@pytest.mark.parametrize("size", [DEFAULT_LIMIT + 1, 17_000_000, 20_000_000])
def test_over_the_default_limit_is_413(default_gateway: RunningGateway, size: int, framing: str) -> None:
    assert_413(post(default_gateway, json_body(size, email="a@example.com"), framing), DEFAULT_LIMIT)


@pytest.mark.parametrize("framing", ["content-length", "chunked-1m"])
def test_the_default_limit_itself_reaches_the_controller(
    default_gateway: RunningGateway, framing: str
) -> None:
    assert_reached_the_controller(
        post(default_gateway, json_body(DEFAULT_LIMIT, email="a@example.com"), framing)
    )


def test_a_body_at_the_limit_plus_path_fields_is_not_a_429(default_gateway: RunningGateway) -> None:
    """Transcoding adds the path's fields to the body's: the controller takes that much more."""
    rest = default_gateway.rest
    registered = rest.post(
        "/api/v1/auth/register",
        {"email": f"big-{uuid.uuid4().hex[:8]}@example.com", "password_hash": PASSWORD},
    )
    assert registered.status == 201, registered.body
    token = registered.json["access_token"]
    db_id = "d" * 1000  # a path parameter: the gRPC message is the body plus this
    body = b'{"query": "' + b"x" * (DEFAULT_LIMIT - len(b'{"query": ""}')) + b'"}'
    assert len(body) == DEFAULT_LIMIT
    reply = default_gateway.rest.request("POST", f"/api/v1/databases/{db_id}/query", raw=body, token=token)
    # The servicer's answer (not a 429 from gRPC's message limit): the SQL is over the
    # 1 MiB query bound, which is checked before anything else.
    assert reply.status == 400, (reply.status, reply.body[:300])
    assert reply.json["code"] == 3
    assert reply.json["message"].startswith("The SQL text is longer than")


def test_a_long_url_reaches_the_controller(rest: Rest, account: dict[str, str]) -> None:
    """Headers the gateway accepts (up to 60 KiB) are not too large for the controller (no 429)."""
    reply = rest.get(f"/api/v1/databases/{'d' * 20_000}", token=account["access_token"])
    assert reply.status == 403, (reply.status, reply.body[:300])
    assert reply.json["code"] == 7
