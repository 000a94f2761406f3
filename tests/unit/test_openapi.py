"""scripts/gen_openapi.py: the OpenAPI document matches the protos' HTTP rules and the gateway's JSON."""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_openapi", ROOT / "scripts" / "gen_openapi.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_openapi", module)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return dict(gen.build())


def schema(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return dict(doc["components"]["schemas"][f"automator67.v1.{name}"])


def prop(doc: dict[str, Any], message: str, field: str) -> dict[str, Any]:
    return dict(schema(doc, message)["properties"][field])


def http_rules() -> Iterator[tuple[str, str, str, str]]:
    """(service, method, HTTP verb, path template) for every annotated RPC, read straight from the protos."""
    descriptors = descriptor_pb2.FileDescriptorSet.FromString(gen.DESCRIPTOR.read_bytes())
    for file in descriptors.file:
        if file.package != "automator67.v1":
            continue
        for service in file.service:
            for method in service.method:
                if method.options.HasExtension(annotations_pb2.http):
                    rule = method.options.Extensions[annotations_pb2.http]
                    verb = rule.WhichOneof("pattern")
                    yield service.name, method.name, verb, getattr(rule, verb)


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


# -- freshness and determinism ----------------------------------------------------


def test_the_document_is_the_same_on_every_run() -> None:
    assert gen.dumps(gen.build()) == gen.dumps(gen.build())


def test_docs_openapi_json_is_fresh() -> None:
    committed = (ROOT / "docs" / "openapi.json").read_text(encoding="utf-8")
    assert committed == gen.dumps(gen.build()), "docs/openapi.json is stale: run scripts/gen_openapi.py"


def test_check_flag_reports_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "openapi.json"
    out.write_text("{}\n")
    assert gen.main(["--check", "--output", str(out)]) == 1
    assert "stale" in capsys.readouterr().err
    assert gen.main(["--output", str(out)]) == 0
    assert gen.main(["--check", "--output", str(out)]) == 0


# -- paths and operations ---------------------------------------------------------


def test_every_http_rule_is_a_documented_operation(doc: dict[str, Any]) -> None:
    expected = {
        (verb, re.sub(r"\{([^}=]+)(=[^}]*)?\}", r"{\1}", path), f"{service}_{method}")
        for service, method, verb, path in http_rules()
    }
    documented = {
        (verb, path, op["operationId"]) for path, item in doc["paths"].items() for verb, op in item.items()
    }
    assert documented == expected
    assert ("post", "/api/v1/auth/register", "AuthService_Register") in documented


def test_operation_ids_are_unique(doc: dict[str, Any]) -> None:
    ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))


def test_every_path_parameter_is_declared(doc: dict[str, Any]) -> None:
    for path, item in doc["paths"].items():
        names = set(re.findall(r"\{([^}]+)\}", path))
        for op in item.values():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == names, (path, op["operationId"])


@pytest.mark.parametrize(
    ("verb", "path", "status"),
    [
        ("post", "/api/v1/auth/register", "201"),
        ("post", "/api/v1/deployments", "202"),
        ("post", "/api/v1/nodes/register", "201"),
        ("post", "/api/v1/auth/login", "200"),
        ("get", "/api/v1/auth/me", "200"),
    ],
)
def test_success_status_follows_the_method_comment(
    doc: dict[str, Any], verb: str, path: str, status: str
) -> None:
    responses = doc["paths"][path][verb]["responses"]
    assert set(responses) == {status, "default"}
    assert responses["default"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/google.rpc.Status"
    }


def test_get_takes_the_remaining_fields_as_query_parameters(doc: dict[str, Any]) -> None:
    params = doc["paths"]["/api/v1/nodes/{node_id}/metrics"]["get"]["parameters"]
    assert [(p["name"], p["in"]) for p in params] == [("node_id", "path"), ("hours", "query")]
    listing = doc["paths"]["/api/v1/nodes"]["get"]["parameters"]
    assert {p["name"] for p in listing} >= {"page_size", "page_token"}
    assert "requestBody" not in doc["paths"]["/api/v1/nodes"]["get"]


def test_a_body_star_post_takes_the_fields_not_in_the_path(doc: dict[str, Any]) -> None:
    op = doc["paths"]["/api/v1/deployments/{deployment_id}:scale"]["post"]
    body = op["requestBody"]["content"]["application/json"]["schema"]
    assert "deployment_id" not in body["properties"]
    assert "replicas" in body["properties"]
    register = doc["paths"]["/api/v1/auth/register"]["post"]["requestBody"]
    assert register["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/automator67.v1.RegisterRequest"
    }


def test_server_streams_are_ndjson(doc: dict[str, Any]) -> None:
    for path in ("/api/v1/metrics/system:watch", "/api/v1/deployments/{deployment_id}:watch"):
        ok = doc["paths"][path]["get"]["responses"]["200"]
        assert list(ok["content"]) == ["application/x-ndjson"]


def test_security_follows_the_public_methods(doc: dict[str, Any]) -> None:
    assert doc["security"] == [{"bearer": []}]
    paths = doc["paths"]
    assert paths["/api/v1/auth/register"]["post"]["security"] == []
    assert paths["/api/v1/auth/login"]["post"]["security"] == []
    assert paths["/api/v1/auth/refresh"]["post"]["security"] == [{"refresh": []}]
    assert "security" not in paths["/api/v1/auth/me"]["get"]  # the access token


# -- schemas: proto3 JSON as the transcoder prints it -----------------------------


def test_field_names_are_snake_case(doc: dict[str, Any]) -> None:
    for name, component in doc["components"]["schemas"].items():
        for field in component.get("properties", {}):
            assert re.fullmatch(r"[a-z][a-z0-9_]*", field), (name, field)
    assert set(schema(doc, "RegisterResponse")["properties"]) == {
        "user_id",
        "access_token",
        "refresh_token",
        "expires_in",
    }


def test_scalar_mapping(doc: dict[str, Any]) -> None:
    assert prop(doc, "NodeMetrics", "uptime_seconds")["type"] == "string"  # int64
    assert prop(doc, "NodeMetrics", "uptime_seconds")["format"] == "int64"
    assert prop(doc, "NodeMetrics", "active_requests") == {"type": "integer", "format": "int32"}
    assert prop(doc, "NodeMetrics", "cpu_percent") == {"type": "number", "format": "double"}
    assert prop(doc, "User", "mfa_enabled") == {"type": "boolean"}
    assert prop(doc, "User", "created_at")["format"] == "date-time"
    for response in ("ExecuteQueryResponse", "StreamQueryResponse"):  # durations: JSON numbers
        assert prop(doc, response, "execution_time_ms") == {
            "type": "integer",
            "format": "int32",
            "description": prop(doc, response, "execution_time_ms")["description"],
        }


def test_enums_are_strings_of_their_names(doc: dict[str, Any]) -> None:
    status = schema(doc, "NodeStatus")
    assert status["type"] == "string"
    assert "NODE_STATUS_READY" in status["enum"]


def test_maps_bytes_and_free_form_json(doc: dict[str, Any]) -> None:
    env = prop(doc, "DeploymentManifest", "env")
    assert env["type"] == "object"
    assert env["additionalProperties"] == {"type": "string"}
    data = prop(doc, "ExecuteQueryResponse", "data")
    assert data["type"] == "array"
    assert data["items"] == {"type": "array", "items": {}}  # repeated ListValue
    assert "type" not in prop(doc, "ShardRange", "lower")  # Value: any JSON
    byte_fields = [
        field
        for component in doc["components"]["schemas"].values()
        for field in component.get("properties", {}).values()
        if field.get("format") == "byte"
    ]
    assert byte_fields


def test_errors_are_google_rpc_status_with_known_details(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    for name in (
        "google.rpc.Status",
        "google.rpc.ErrorInfo",
        "google.rpc.BadRequest",
        "google.rpc.RetryInfo",
    ):
        assert name in schemas
    status = schemas["google.rpc.Status"]["properties"]
    assert status["code"]["type"] == "integer"
    assert status["details"]["items"]["required"] == ["@type"]
    assert "field_violations" in schemas["google.rpc.BadRequest"]["properties"]


def test_every_reference_resolves(doc: dict[str, Any]) -> None:
    names = set(doc["components"]["schemas"])
    for ref in set(refs(doc)):
        assert ref.removeprefix("#/components/schemas/") in names, ref


def test_comments_become_descriptions(doc: dict[str, Any]) -> None:
    register = doc["paths"]["/api/v1/auth/register"]["post"]
    assert register["summary"] == "Creates an account and signs it in. HTTP 201."
    assert "salted hash" in prop(doc, "RegisterRequest", "password_hash")["description"]
