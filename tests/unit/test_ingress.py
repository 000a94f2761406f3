"""The pure parts of the ingress: the snapshot builder and the traffic statistics."""

from __future__ import annotations

from automator67.v1 import common_pb2  # noqa: F401  (the generated package must import first)
from google.protobuf import duration_pb2

from controller.ingress.envoy_types import accesslog_pb2
from controller.ingress.snapshot import (
    CLUSTER,
    ENDPOINT,
    ROUTE,
    AppRoute,
    Endpoint,
    IngressOptions,
    app_urls,
    build_snapshot,
    user_handle,
    weight_of_score,
)
from controller.ingress.traffic import MIN_SAMPLES_FOR_ERROR_RATE, Replica, TrafficStats


def _app(deployment_id: str = "d1", weights: tuple[int, ...] = (50,)) -> AppRoute:
    return AppRoute(
        deployment_id,
        "web",
        "ada-12345678",
        tuple(Endpoint("127.0.0.1", 20000 + i, w, f"n{i}", i) for i, w in enumerate(weights)),
    )


def test_user_handles_are_dns_labels_and_distinct_per_user() -> None:
    a = user_handle("ada@example.com", "3f2a1c9e-0000-0000-0000-000000000000")
    b = user_handle("ada@example.org", "9b0c7d11-0000-0000-0000-000000000000")
    assert a == "ada-3f2a1c9e"
    assert b == "ada-9b0c7d11"
    assert user_handle("Ünïcode.Name+tag_x@example.com", "abcdef12-3") == "unicode-name-tag-x-abcdef12"
    assert user_handle("a" * 80 + "@x.y", "00000000") == "a" * 20 + "-00000000"


def test_weights_follow_the_score_in_steps() -> None:
    assert [weight_of_score(s) for s in (0.0, 0.024, 0.026, 0.5, 0.81, 1.0, float("nan"))] == [
        1,
        1,
        5,
        50,
        80,
        100,
        50,
    ]


def test_snapshot_has_a_cluster_endpoints_and_routes_per_app() -> None:
    snapshot = build_snapshot([_app("d2", (10, 90)), _app("d1")], IngressOptions(apps_domain="apps.test"))
    assert list(snapshot.of(CLUSTER)) == ["d1", "d2"]
    d2 = snapshot.of(ENDPOINT)["d2"]
    assert [lb.load_balancing_weight.value for lb in d2.endpoints[0].lb_endpoints] == [10, 90]  # type: ignore[attr-defined]
    routes = snapshot.of(ROUTE)["a67_apps"]
    hosts = {vh.name: list(vh.domains) for vh in routes.virtual_hosts}  # type: ignore[attr-defined]
    assert hosts == {
        "app_d1": ["web.ada-12345678.apps.test"],
        "app_d2": ["web.ada-12345678.apps.test"],
        "default": ["*"],
    } or hosts["default"] == ["*"]
    default = next(vh for vh in routes.virtual_hosts if vh.name == "default")  # type: ignore[attr-defined]
    prefixes = [r.match.prefix or r.match.path for r in default.routes]
    assert "/apps/d1/" in prefixes
    assert "/apps/d1" in prefixes
    assert prefixes[-1] == "/"
    assert default.routes[-1].direct_response.status == 404
    get_route = next(r for r in default.routes if r.name == "path_d1_idempotent")
    assert "5xx" in get_route.route.retry_policy.retry_on
    assert get_route.route.prefix_rewrite == "/"
    other = next(r for r in default.routes if r.name == "path_d1")
    assert other.route.retry_policy.retry_on == "connect-failure,refused-stream"


def test_an_app_without_replicas_keeps_its_routes_and_an_empty_cluster() -> None:
    snapshot = build_snapshot([AppRoute("d1", "web", "h")], IngressOptions())
    assert list(snapshot.of(CLUSTER)) == ["d1"]
    assert len(snapshot.of(ENDPOINT)["d1"].endpoints) == 0  # type: ignore[attr-defined]


def test_urls() -> None:
    urls = app_urls(_app(), IngressOptions(), "http://127.0.0.1:8081")
    assert urls == ["http://web.ada-12345678.apps.localhost:8081/", "http://127.0.0.1:8081/apps/d1/"]


def _entry(
    code: int, address: str = "127.0.0.1:20000", ms: int = 10, cluster: str = "d1"
) -> accesslog_pb2.HTTPAccessLogEntry:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.response.response_code.value = code
    props = entry.common_properties
    host, port = address.split(":")
    props.upstream_remote_address.socket_address.address = host
    props.upstream_remote_address.socket_address.port_value = int(port)
    props.upstream_cluster = cluster
    props.time_to_first_upstream_tx_byte.CopyFrom(duration_pb2.Duration(nanos=1_000_000))
    props.time_to_last_upstream_rx_byte.CopyFrom(duration_pb2.Duration(nanos=(1 + ms) * 1_000_000))
    props.time_to_last_downstream_tx_byte.CopyFrom(duration_pb2.Duration(nanos=(2 + ms) * 1_000_000))
    return entry


def test_traffic_per_replica_node_and_deployment_over_a_window() -> None:
    now = [1000.0]
    stats = TrafficStats(clock=lambda: now[0])
    stats.set_replicas({"127.0.0.1:20000": Replica("d1", 0, "n0"), "127.0.0.1:20001": Replica("d1", 1, "n1")})
    for i in range(100):
        stats.record_attempt(_entry(500 if i < 10 else 200, ms=i + 1))
        stats.record_attempt(_entry(200, "127.0.0.1:20001"))
        stats.record_request(_entry(200, ms=i + 1))
    stats.record_attempt(_entry(200, "127.0.0.1:29999"))  # nobody's: not counted
    assert stats.unattributed == 1
    n0 = stats.node("n0")
    assert (n0.requests, n0.errors, n0.error_rate_percent) == (100, 10, 10.0)
    assert n0.p50_ms == 50.0
    assert n0.p99_ms == 99.0
    assert stats.node_health("n1") == (0.0, 10.0)
    d1 = stats.deployment("d1")
    assert d1.requests == 100
    assert d1.requests_per_second == 10.0
    assert d1.p50_ms == 52.0
    now[0] += 61.0
    assert stats.node("n0").requests == 0
    assert stats.node_health("n0") is None


def test_a_node_needs_a_few_attempts_before_its_error_rate_counts() -> None:
    stats = TrafficStats(clock=lambda: 0.0)
    stats.set_replicas({"127.0.0.1:20000": Replica("d1", 0, "n0")})
    for _ in range(MIN_SAMPLES_FOR_ERROR_RATE - 1):
        stats.record_attempt(_entry(500))
    assert stats.node_health("n0") is None
    stats.record_attempt(_entry(500))
    assert stats.node_health("n0") == (100.0, 10.0)
