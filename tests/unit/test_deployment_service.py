"""Pure pieces of the deployments service: assignment bookkeeping, page tokens, the recovery rate."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

import pytest

from controller.deployments import decide, harness, service
from controller.deployments.records import Replica, failure_summary
from controller.errors import InvalidArgument
from controller.store.models import Deployment
from controller.store.paging import decode_page_token, encode_page_token


def _assignment(index: int, status: str, endpoint: str = "", error: str = "") -> dict[str, Any]:
    return {
        "replica_index": index,
        "node_id": f"n{index}",
        "generation": index + 1,
        "status": status,
        "endpoint": endpoint,
        "error_message": error,
        "started_at": None,
    }


def test_assignments_publish_only_running_endpoints_in_index_order() -> None:
    row = Deployment()
    harness.set_replicas(
        row,
        [
            Replica.from_dict(_assignment(2, "running", "http://c")),
            Replica.from_dict(_assignment(0, "running", "http://a")),
            Replica.from_dict(_assignment(1, "unhealthy", "http://b")),
            Replica.from_dict(_assignment(3, "lost")),
        ],
    )
    assert [a["replica_index"] for a in row.node_assignments] == [0, 1, 2, 3]
    assert row.endpoints == ["http://a", "http://c"]
    assert row.current_replicas == 2
    # stored exactly as before: plain strings, the same keys
    assert row.node_assignments[0] == _assignment(0, "running", "http://a")
    assert type(row.node_assignments[0]["status"]) is str


def test_failure_summary_names_each_replica_that_is_not_running() -> None:
    summary = failure_summary(
        [
            Replica.from_dict(_assignment(0, "running")),
            Replica.from_dict(_assignment(1, "failed", error="node n1: app crashed")),
            Replica.from_dict(_assignment(2, "lost")),
        ]
    )
    assert summary == "replica 1: node n1: app crashed; replica 2: lost"


def test_page_tokens_round_trip_and_reject_garbage() -> None:
    when = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    assert decode_page_token(encode_page_token(when, "d1")) == (when, "d1")
    for bad in ("nope", "x" * 600, encode_page_token(when, "d1")[:-3]):
        with pytest.raises(InvalidArgument):
            decode_page_token(bad)


def test_recovery_is_rate_limited_per_user_after_a_burst() -> None:
    now = 100.0
    waits: list[float] = []
    slots: dict[str, float] = {}
    for user in ["u1"] * (decide.RECOVERY_BURST + 2) + ["u2"]:
        wait, slots[user] = decide.recovery_wait(slots.get(user), now, 5.0)
        waits.append(wait)
    assert waits[: decide.RECOVERY_BURST] == [0.0] * decide.RECOVERY_BURST  # the burst goes at once
    assert waits[decide.RECOVERY_BURST :] == pytest.approx([0.2, 0.4, 0.0])  # then 1/rate; u2 not held up


# --------------------------------------------------------------------------- issue 11


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param({}, ("/health", 10, 2, 3, "1GB"), id="backend-defaults"),
        pytest.param(
            {"app_type": "APP_TYPE_WORKER"}, ("", 10, 2, 3, "1GB"), id="worker-without-path-has-no-http-check"
        ),
        pytest.param(
            {
                "health_check": {"path": "/up", "interval_seconds": 30, "timeout_seconds": 5, "retries": 1},
                "resources": {"storage": "2GB"},
            },
            ("/up", 30, 5, 1, "2GB"),
            id="given-values-are-kept",
        ),
    ],
)
def test_get_deployment_shows_effective_values_not_zeros(
    given: dict[str, Any], expected: tuple[object, ...]
) -> None:
    from automator67.v1 import deployment_pb2
    from google.protobuf import json_format

    spec = {"name": "web", "app_type": "APP_TYPE_BACKEND", **given}
    row = Deployment(
        id="d1",
        user_id="u1",
        name="web",
        status="running",
        manifest={"spec": spec},
        node_assignments=[],
        desired_replicas=1,
        current_replicas=0,
        endpoints=[],
    )
    shown = service.DeploymentService.to_proto(cast(Any, None), row).manifest
    check = shown.health_check
    assert (
        check.path,
        check.interval_seconds,
        check.timeout_seconds,
        check.retries,
        shown.resources.storage,
    ) == expected
    assert json_format.MessageToDict(shown)["healthCheck"]["intervalSeconds"] == expected[1]
    assert isinstance(shown, deployment_pb2.DeploymentManifest)
