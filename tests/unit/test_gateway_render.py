"""The gateway settings and the rendered Envoy configuration (checked by Envoy itself)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

from controller.gateway.cli import add_gateway_parser, add_up_parser
from controller.gateway.config import DEFAULT_DESCRIPTOR, GatewaySettings, split_host_port
from controller.gateway.process import connect_host, grpc_target
from controller.gateway.render import GatewayConfigError, api_services, render, validate, write_config


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


def test_filters_run_cors_lua_transcoder_router_in_that_order(default_yaml: str) -> None:
    names = re.findall(r"- name: (envoy\.filters\.http\.\w+)", default_yaml)
    assert names == [
        "envoy.filters.http.cors",
        "envoy.filters.http.lua",  # before the transcoder: sees its response after it
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.router",
    ]


@pytest.mark.parametrize(
    "line",
    [
        "always_print_primitive_fields: true",
        "preserve_proto_field_names: true",
        "always_print_enums_as_ints: false",
        "convert_grpc_status: true",
        "reject_unknown_method: true",
        "reject_unknown_query_parameters: true",
        "max_request_body_size: 16777216",
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
    assert "max_request_body_size: 4096" in text
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
