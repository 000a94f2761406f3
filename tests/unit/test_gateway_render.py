"""The gateway settings and the rendered Envoy configuration (checked by Envoy itself)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

from controller.config import TRANSCODING_OVERHEAD_BYTES
from controller.gateway.cli import add_gateway_parser, add_up_parser
from controller.gateway.config import (
    DEFAULT_DESCRIPTOR,
    GatewaySettings,
    controller_receive_limit,
    split_host_port,
)
from controller.gateway.process import connect_host, grpc_target
from controller.gateway.render import GatewayConfigError, api_services, render, validate, write_config
from tests.selfsigned import CertPair, self_signed


def settings(**overrides: Any) -> GatewaySettings:
    return GatewaySettings.from_env({}, **overrides)


@pytest.fixture(scope="module")
def default_yaml() -> str:
    return render(settings())


# -- settings ----------------------------------------------------------------


def test_defaults_are_loopback_rest_on_8080_in_front_of_50051() -> None:
    s = settings()
    assert s.listen == ("127.0.0.1", 8080)
    assert s.upstream == ("127.0.0.1", 50051)
    assert s.admin is None
    assert s.stream_format == "ndjson"
    assert s.descriptor_path == DEFAULT_DESCRIPTOR


def test_environment_sets_fields_and_overrides_win() -> None:
    s = GatewaySettings.from_env(
        {
            "A67_GATEWAY_LISTEN_ADDRESS": "0.0.0.0:9000",
            "A67_GATEWAY_CORS_ALLOWED_ORIGINS": "https://a.example, https://b.example:8443",
            "A67_GATEWAY_MAX_REQUEST_BODY_SIZE": "2048",
            "A67_GATEWAY_REQUEST_TIMEOUT_SECONDS": "2.5",
            "A67_GATEWAY_DESCRIPTOR_PATH": "~/x.binpb",
        },
        listen_address="127.0.0.1:9001",
    )
    assert s.listen_address == "127.0.0.1:9001"
    assert s.cors_allowed_origins == ("https://a.example", "https://b.example:8443")
    assert s.max_request_body_size == 2048
    assert s.request_timeout_seconds == 2.5
    assert s.descriptor_path == Path("~/x.binpb").expanduser()


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"listen_address": "8080"}, "LISTEN_ADDRESS"),
        ({"listen_address": "host:http"}, "LISTEN_ADDRESS"),
        ({"upstream_address": "127.0.0.1:70000"}, "UPSTREAM_ADDRESS"),
        ({"admin_address": "0.0.0.0:9901"}, "loopback"),
        ({"admin_address": "10.0.0.1:9901"}, "loopback"),
        ({"cors_allowed_origins": ()}, "at least one"),
        ({"cors_allowed_origins": ("dashboard.example",)}, "not an origin"),
        ({"cors_allowed_origins": ("https://dash.example/",)}, "not an origin"),
        ({"cors_allowed_origins": ('https://x"y',)}, "not an origin"),
        ({"stream_format": "websocket"}, "STREAM_FORMAT"),
        ({"max_request_body_size": 0}, "MAX_REQUEST_BODY_SIZE"),
        ({"max_connections": 0}, "MAX_CONNECTIONS"),
        ({"request_timeout_seconds": 0}, "timeouts"),
        ({"concurrency": -1}, "CONCURRENCY"),
        ({"log_level": "loud"}, "LOG_LEVEL"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else None,
)
def test_bad_settings_are_refused_with_the_setting_named(overrides: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        settings(**overrides)


@pytest.mark.parametrize(
    ("address", "expected"),
    [("127.0.0.1:8080", ("127.0.0.1", 8080)), ("[::1]:80", ("::1", 80)), ("localhost:0", ("localhost", 0))],
)
def test_split_host_port(address: str, expected: tuple[str, int]) -> None:
    assert split_host_port(address) == expected


@pytest.mark.parametrize(
    ("address", "target"),
    [("0.0.0.0:50051", "127.0.0.1:50051"), ("[::]:50051", "[::1]:50051"), ("10.1.2.3:1", "10.1.2.3:1")],
)
def test_wildcard_listen_addresses_are_reached_over_loopback(address: str, target: str) -> None:
    assert grpc_target(address) == target
    assert connect_host("localhost") == "localhost"


# -- the rendered configuration ----------------------------------------------


def test_every_placeholder_is_filled(default_yaml: str) -> None:
    assert "${" not in default_yaml
    assert re.search(r"\$[a-z_]", default_yaml) is None


def test_filters_run_cors_lua_buffer_transcoder_router_in_that_order(default_yaml: str) -> None:
    names = re.findall(r"- name: (envoy\.filters\.http\.\w+)", default_yaml)
    assert names == [
        "envoy.filters.http.cors",
        "envoy.filters.http.lua",  # before the transcoder: sees its response after it
        "envoy.filters.http.buffer",  # the body limit, before the transcoder streams the body on
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.router",
    ]


def test_the_buffer_filter_enforces_the_body_limit() -> None:
    text = render(settings(max_request_body_size=70000))
    assert "max_request_bytes: 70000" in text
    assert f"max_request_body_size: {70000 + TRANSCODING_OVERHEAD_BYTES}" in text
    assert "the gateway's limit of 70000 bytes" in text  # the 413 message


def test_a_second_gateway_cannot_share_the_port(default_yaml: str) -> None:
    assert "enable_reuse_port: false" in default_yaml


def test_body_limit_above_a_gib_is_refused() -> None:
    with pytest.raises(ValueError, match="MAX_REQUEST_BODY_SIZE must be between 1 and 1073741824"):
        settings(max_request_body_size=2**30 + 1)


def test_the_controller_receive_limit_covers_the_default_body_limit() -> None:
    from controller.config import Settings

    assert Settings().max_receive_message_bytes >= controller_receive_limit(settings().max_request_body_size)
    assert controller_receive_limit(1000) == 1000 + TRANSCODING_OVERHEAD_BYTES


def test_help_states_the_real_default_body_limit(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("gateway", "up"):
        with pytest.raises(SystemExit):
            parse(command, "--help")
        text = " ".join(capsys.readouterr().out.split())
        assert "default 16 MiB = 16777216" in text
        assert "1 MiB" not in text


@pytest.mark.parametrize(
    "line",
    [
        "always_print_primitive_fields: true",
        "preserve_proto_field_names: true",
        "always_print_enums_as_ints: false",
        "convert_grpc_status: true",
        "reject_unknown_method: true",
        "reject_unknown_query_parameters: true",
        "max_request_bytes: 16777216",  # the buffer filter: the limit itself
        "max_request_body_size: 17825792",  # the transcoder: room for the path's fields too
        "stream_newline_delimited: true",
        "http2_protocol_options: {}",
    ],
)
def test_transcoder_and_upstream_options(default_yaml: str, line: str) -> None:
    assert line in default_yaml


def test_transcoder_knows_every_api_service(default_yaml: str) -> None:
    services = api_services(DEFAULT_DESCRIPTOR)
    assert {
        "automator67.v1.AuthService",
        "automator67.v1.NodeService",
        "automator67.v1.MetricsService",
    } <= set(services)
    listed = re.search(r"services: \[(.*)\]", default_yaml)
    assert listed is not None
    assert tuple(name.strip(' "') for name in listed.group(1).split(",")) == services


def test_lua_filter_turns_the_status_header_into_the_status(default_yaml: str) -> None:
    assert 'headers:get("x-a67-http-status")' in default_yaml
    assert 'headers:remove("x-a67-http-status")' in default_yaml
    assert 'headers:replace(":status", wanted)' in default_yaml
    assert 'headers:replace("content-type", "application/x-ndjson")' in default_yaml
    assert '"^2%d%d$")' in default_yaml  # only 2xx, and the template's $$ became $


def test_settings_reach_the_configuration() -> None:
    text = render(
        settings(
            listen_address="127.0.0.1:18080",
            upstream_address="controller.internal:6000",
            cors_allowed_origins=("https://dash.example", "*"),
            max_request_body_size=4096,
            request_timeout_seconds=1.5,
            stream_format="sse",
            admin_address="127.0.0.1:9901",
        )
    )
    assert 'socket_address: {address: "127.0.0.1", port_value: 18080}' in text
    assert 'socket_address: {address: "controller.internal", port_value: 6000}' in text
    assert '{"exact": "https://dash.example"}, {"safe_regex": {"regex": ".*"}}' in text
    assert "max_request_bytes: 4096" in text
    assert 'timeout: "1.500s"' in text
    assert "stream_sse_style_delimited: true" in text
    assert "stream_newline_delimited" not in text
    assert 'admin:\n  address:\n    socket_address: {address: "127.0.0.1", port_value: 9901}' in text


def test_admin_is_off_by_default(default_yaml: str) -> None:
    assert "\nadmin:" not in default_yaml


@pytest.mark.parametrize("stream_format", ["ndjson", "sse"])
def test_envoy_accepts_the_rendered_configuration(tmp_path: Path, stream_format: str) -> None:
    config = write_config(
        settings(stream_format=stream_format, admin_address="127.0.0.1:9901", cors_allowed_origins=("*",)),
        tmp_path / "gateway" / "envoy.yaml",
    )
    validate(config)


def test_the_access_log_is_off_by_default_and_a_file_when_set(tmp_path: Path, default_yaml: str) -> None:
    assert "access_log:" not in default_yaml
    path = tmp_path / "logs" / "access.log"
    config = write_config(settings(access_log_path=str(path)), tmp_path / "envoy.yaml")
    text = config.read_text()
    assert "envoy.access_loggers.file" in text
    assert f"path: {json.dumps(str(path))}" in text
    assert "log_format" not in text  # Envoy's default format: no headers, no bodies
    validate(config)


@pytest.mark.parametrize("path", ["a\nb", 'a"b'], ids=["newline", "quote"])
def test_an_access_log_path_that_breaks_the_yaml_is_refused(path: str) -> None:
    with pytest.raises(ValueError, match="A67_GATEWAY_ACCESS_LOG_PATH"):
        settings(access_log_path=path)


def test_envoy_rejects_a_broken_configuration(tmp_path: Path) -> None:
    config = write_config(settings(), tmp_path / "envoy.yaml")
    config.write_text(config.read_text().replace("reject_unknown_method", "reject_unknown_methods"))
    with pytest.raises(GatewayConfigError, match="envoy rejected"):
        validate(config)


def test_a_missing_descriptor_set_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(GatewayConfigError, match="gen_protos"):
        render(settings(descriptor_path=tmp_path / "missing.binpb"))


def test_a_descriptor_set_without_api_services_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.binpb"
    empty.write_bytes(descriptor_pb2.FileDescriptorSet().SerializeToString())
    with pytest.raises(GatewayConfigError, match=r"no automator67\.v1 services"):
        render(settings(descriptor_path=empty))


def test_a_bad_template_placeholder_is_reported(tmp_path: Path) -> None:
    template = tmp_path / "t.tmpl"
    template.write_text("listen: ${nope}\n")
    with pytest.raises(GatewayConfigError, match="placeholder"):
        render(settings(template_path=template))


# -- a67 gateway / a67 up argument handling ----------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="a67")
    sub = parser.add_subparsers(dest="command", required=True)
    add_gateway_parser(sub)
    add_up_parser(sub)
    return parser.parse_args(argv)


def test_gateway_print_config_applies_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(
        "gateway",
        "--print-config",
        "--listen",
        "127.0.0.1:9999",
        "--upstream",
        "127.0.0.1:6000",
        "--cors-origin",
        "https://a.example",
        "--cors-origin",
        "https://b.example",
        "--stream-format",
        "sse",
    )
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "port_value: 9999" in text
    assert "port_value: 6000" in text
    assert '{"exact": "https://a.example"}, {"exact": "https://b.example"}' in text
    assert "stream_sse_style_delimited: true" in text


def test_gateway_check_has_envoy_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "envoy.yaml"
    args = parse("gateway", "--check", "--config-out", str(out))
    assert args.func(args) == 0
    assert "valid" in capsys.readouterr().out
    assert out.read_text().startswith("# Envoy configuration")


def test_gateway_bad_flag_value_is_exit_1_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("gateway", "--print-config", "--admin", "0.0.0.0:9901")
    assert args.func(args) == 1
    assert "loopback" in capsys.readouterr().err


def test_up_takes_controller_and_gateway_flags() -> None:
    args = parse(
        "up", "--grpc-listen", "127.0.0.1:7001", "--http-listen", "127.0.0.1:7002", "--data-dir", "/tmp/x"
    )
    assert (args.grpc_listen, args.http_listen, args.data_dir) == (
        "127.0.0.1:7001",
        "127.0.0.1:7002",
        Path("/tmp/x"),
    )
    assert callable(args.func)


# -- TLS -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> CertPair:
    return self_signed(tmp_path_factory.mktemp("tls"))


def test_plaintext_by_default(default_yaml: str) -> None:
    assert "transport_socket" not in default_yaml


def test_tls_settings_render_https_only_and_a_verified_upstream(tmp_path: Path, pair: CertPair) -> None:
    tls = settings(
        tls_cert=str(pair.cert),
        tls_key=str(pair.key),
        upstream_tls_ca=str(pair.cert),
        upstream_address="localhost:6000",
    )
    text = render(tls)
    assert "DownstreamTlsContext" in text
    assert f'certificate_chain: {{filename: "{pair.cert}"}}' in text
    assert f'private_key: {{filename: "{pair.key}"}}' in text
    assert '["h2", "http/1.1"]' in text
    assert "UpstreamTlsContext" in text
    assert 'sni: "localhost"' in text
    assert f'trusted_ca: {{filename: "{pair.cert}"}}' in text
    assert '{san_type: DNS, matcher: {exact: "localhost"}}' in text
    validate(write_config(tls, tmp_path / "envoy.yaml"))


def test_an_ip_upstream_is_matched_as_an_ip_san_without_sni(pair: CertPair) -> None:
    text = render(settings(upstream_tls_ca=str(pair.cert), upstream_address="127.0.0.1:6000"))
    assert '{san_type: IP_ADDRESS, matcher: {exact: "127.0.0.1"}}' in text
    assert "sni:" not in text
    assert "DownstreamTlsContext" not in text


def test_the_gateway_reads_the_shared_tls_and_environment_variables(pair: CertPair) -> None:
    s = GatewaySettings.from_env(
        {"A67_TLS_CERT": str(pair.cert), "A67_TLS_KEY": str(pair.key), "A67_ENVIRONMENT": "production"}
    )
    assert (s.tls_cert, s.tls_key, s.environment, s.tls) == (
        str(pair.cert),
        str(pair.key),
        "production",
        True,
    )


@pytest.mark.parametrize("listen", ["0.0.0.0:8080", "[::]:8080", "10.0.0.5:8080"])
def test_production_refuses_a_plaintext_listener_off_loopback(listen: str) -> None:
    with pytest.raises(
        ValueError, match=r"A67_GATEWAY_LISTEN_ADDRESS .* has no TLS: in production"
    ) as refused:
        GatewaySettings.from_env({"A67_ENVIRONMENT": "production"}, listen_address=listen)
    assert "--tls-cert and --tls-key" in str(refused.value)


def test_production_allows_loopback_plaintext_and_tls_anywhere(pair: CertPair) -> None:
    assert not GatewaySettings.from_env({"A67_ENVIRONMENT": "production"}).tls
    s = GatewaySettings.from_env(
        {"A67_ENVIRONMENT": "production"},
        listen_address="0.0.0.0:8443",
        tls_cert=str(pair.cert),
        tls_key=str(pair.key),
    )
    assert s.tls


def test_production_refuses_a_plaintext_upstream_off_loopback(pair: CertPair) -> None:
    with pytest.raises(ValueError, match=r"A67_GATEWAY_UPSTREAM_ADDRESS .* has no TLS"):
        GatewaySettings.from_env({"A67_ENVIRONMENT": "production"}, upstream_address="10.0.0.7:50051")
    s = GatewaySettings.from_env(
        {"A67_ENVIRONMENT": "production"}, upstream_address="10.0.0.7:50051", upstream_tls_ca=str(pair.cert)
    )
    assert s.upstream_server_name == "10.0.0.7"


def test_a_certificate_without_a_key_is_refused(pair: CertPair, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="A67_GATEWAY_TLS_KEY is not set"):
        settings(tls_cert=str(pair.cert))
    with pytest.raises(ValueError, match="cannot read"):
        settings(tls_cert=str(pair.cert), tls_key=str(tmp_path / "missing.key"))


def test_up_expects_the_name_the_certificate_carries(tmp_path: Path) -> None:
    from controller.gateway.cli import certificate_name

    both = self_signed(tmp_path / "both", dns_names=("api.example.com",), ips=("127.0.0.1",))
    dns_only = self_signed(tmp_path / "dns", dns_names=("api.example.com",), ips=())
    ip_only = self_signed(tmp_path / "ip", dns_names=(), ips=("10.0.0.9",))
    assert certificate_name(both.cert, "127.0.0.1") == "127.0.0.1"
    assert certificate_name(dns_only.cert, "127.0.0.1") == "api.example.com"
    with pytest.raises(ValueError, match=r"names neither 127\.0\.0\.1 nor any DNS name"):
        certificate_name(ip_only.cert, "127.0.0.1")
