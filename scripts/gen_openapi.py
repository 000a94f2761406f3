#!/usr/bin/env python3
"""Generate ``docs/openapi.json`` (OpenAPI 3.0) from the descriptor set's ``google.api.http`` rules.

It documents the REST API exactly as the gateway serves it: Envoy's
``grpc_json_transcoder`` with ``preserve_proto_field_names`` (snake_case),
``always_print_primitive_fields``, enums as their names, 64-bit integers as
strings, ``google.protobuf.Timestamp`` as RFC 3339 strings, ``Struct``/``Value``/
``ListValue`` as free-form JSON, errors as a JSON ``google.rpc.Status``, and
server streams as newline-delimited JSON. Descriptions come from the protos'
comments; a method whose comment says ``HTTP 201`` (or 202) is documented with
that success status, as its servicer sends it.

Usage::

    .venv/bin/python scripts/gen_openapi.py            # write docs/openapi.json
    .venv/bin/python scripts/gen_openapi.py --check    # exit 1 if it is stale (CI)

The output depends only on the descriptor set (``scripts/gen_protos.py``
writes it), so it is the same on every run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.api import annotations_pb2, http_pb2  # registers the google.api.http extension
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controller.api.interceptors import PUBLIC_METHODS  # noqa: E402  (after the sys.path fix)

DESCRIPTOR = ROOT / "generated" / "automator67.binpb"
OUTPUT = ROOT / "docs" / "openapi.json"
API_PACKAGE = "automator67.v1"
SERVER_URL = "http://127.0.0.1:8080"

FieldProto = descriptor_pb2.FieldDescriptorProto
T = FieldProto

# Proto3 JSON mapping of scalar types (https://protobuf.dev/programming-guides/json/).
SCALARS: dict[int, dict[str, Any]] = {
    T.TYPE_DOUBLE: {"type": "number", "format": "double"},
    T.TYPE_FLOAT: {"type": "number", "format": "float"},
    T.TYPE_INT32: {"type": "integer", "format": "int32"},
    T.TYPE_SINT32: {"type": "integer", "format": "int32"},
    T.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    T.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 4294967295},
    T.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0, "maximum": 4294967295},
    T.TYPE_INT64: {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"},
    T.TYPE_SINT64: {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"},
    T.TYPE_SFIXED64: {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"},
    T.TYPE_UINT64: {"type": "string", "format": "uint64", "pattern": "^[0-9]+$"},
    T.TYPE_FIXED64: {"type": "string", "format": "uint64", "pattern": "^[0-9]+$"},
    T.TYPE_BOOL: {"type": "boolean"},
    T.TYPE_STRING: {"type": "string"},
    T.TYPE_BYTES: {"type": "string", "format": "byte", "description": "base64"},
}

# Well-known types in their special JSON forms.
WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time", "example": "2026-01-31T12:00:00Z"},
    "google.protobuf.Duration": {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?s$", "example": "1.5s"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {"description": "Any JSON value."},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.FieldMask": {"type": "string", "description": "Comma-separated field paths."},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
    "google.protobuf.DoubleValue": {"type": "number", "format": "double", "nullable": True},
    "google.protobuf.FloatValue": {"type": "number", "format": "float", "nullable": True},
    "google.protobuf.Int32Value": {"type": "integer", "format": "int32", "nullable": True},
    "google.protobuf.UInt32Value": {"type": "integer", "format": "int64", "nullable": True},
    "google.protobuf.Int64Value": {"type": "string", "format": "int64", "nullable": True},
    "google.protobuf.UInt64Value": {"type": "string", "format": "uint64", "nullable": True},
    "google.protobuf.BoolValue": {"type": "boolean", "nullable": True},
    "google.protobuf.StringValue": {"type": "string", "nullable": True},
    "google.protobuf.BytesValue": {"type": "string", "format": "byte", "nullable": True},
}

# Public methods (no access token) that take the refresh token as their bearer token instead.
REFRESH_TOKEN_METHODS = frozenset({"/automator67.v1.AuthService/Refresh"})

# Error detail types the controller sends (controller/errors.py).
ERROR_DETAILS = ("google.rpc.ErrorInfo", "google.rpc.BadRequest", "google.rpc.RetryInfo")

STATUS_IN_COMMENT = re.compile(r"\bHTTP (20[0-9])\b")
PATH_PARAM = re.compile(r"\{([^}=]+)(=[^}]*)?\}")

DESCRIPTION = """\
REST/JSON API of the Automator67 controller, served by the Envoy gateway (`a67 gateway`, `a67 up`),
which transcodes each call to the controller's gRPC API (`proto/automator67/v1`).

* Authentication: `Authorization: Bearer <access_token>` on every call except register and login;
  refresh takes the refresh token the same way.
* JSON: field names are snake_case; fields with default values are always present (`false`, `0`,
  `""`, `[]`); enums are their names; 64-bit integers are strings; timestamps are RFC 3339 strings.
* Errors: a JSON `google.rpc.Status` (`code` is the gRPC code, `details` carry
  `google.rpc.ErrorInfo` with a stable `reason`, `google.rpc.BadRequest` field violations and
  `google.rpc.RetryInfo`). HTTP status by gRPC code: INVALID_ARGUMENT, FAILED_PRECONDITION,
  OUT_OF_RANGE 400; UNAUTHENTICATED 401; PERMISSION_DENIED 403; NOT_FOUND 404 (also unknown paths);
  ALREADY_EXISTS, ABORTED 409; RESOURCE_EXHAUSTED 429 (413 for a body over the gateway's limit);
  CANCELLED 499; UNKNOWN, INTERNAL, DATA_LOSS 500; UNIMPLEMENTED 501; UNAVAILABLE 503;
  DEADLINE_EXCEEDED 504. Unknown query parameters are 400.
* Streams (`...:watch`): one JSON object per line (`application/x-ndjson`), each sent as the
  controller pushes it; read them with `fetch` and a stream reader. An error before the first
  message is an ordinary error response; a stream that ends later should be reopened.
"""


@dataclass(frozen=True)
class Located:
    """A descriptor with its full name and the comment written above it."""

    proto: Any
    full_name: str
    comment: str


def _comments(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    return {
        tuple(loc.path): _clean(loc.leading_comments)
        for loc in file.source_code_info.location
        if loc.leading_comments.strip()
    }


def _clean(comment: str) -> str:
    return "\n".join(line.strip() for line in comment.strip().splitlines()).strip()


class Catalog:
    """Messages, enums and services of a descriptor set, by full name, with their comments."""

    def __init__(self, descriptors: descriptor_pb2.FileDescriptorSet) -> None:
        self.messages: dict[str, Located] = {}
        self.enums: dict[str, Located] = {}
        self.fields: dict[tuple[str, str], str] = {}
        self.services: list[tuple[Located, list[Located]]] = []
        for file in descriptors.file:
            comments = _comments(file)
            prefix = file.package
            for i, message in enumerate(file.message_type):
                self._add_message(message, prefix, (4, i), comments)
            for i, enum in enumerate(file.enum_type):
                self._add_enum(enum, prefix, (5, i), comments)
            if file.package != API_PACKAGE:
                continue
            for i, service in enumerate(file.service):
                full = f"{prefix}.{service.name}"
                methods = [
                    Located(method, f"{full}.{method.name}", comments.get((6, i, 2, j), ""))
                    for j, method in enumerate(service.method)
                ]
                self.services.append((Located(service, full, comments.get((6, i), "")), methods))

    def _add_message(
        self,
        message: descriptor_pb2.DescriptorProto,
        prefix: str,
        path: tuple[int, ...],
        comments: dict[tuple[int, ...], str],
    ) -> None:
        full = f"{prefix}.{message.name}"
        self.messages[full] = Located(message, full, comments.get(path, ""))
        for j, field in enumerate(message.field):
            self.fields[(full, field.name)] = comments.get((*path, 2, j), "")
        for k, nested in enumerate(message.nested_type):
            self._add_message(nested, full, (*path, 3, k), comments)
        for k, enum in enumerate(message.enum_type):
            self._add_enum(enum, full, (*path, 4, k), comments)

    def _add_enum(
        self,
        enum: descriptor_pb2.EnumDescriptorProto,
        prefix: str,
        path: tuple[int, ...],
        comments: dict[tuple[int, ...], str],
    ) -> None:
        full = f"{prefix}.{enum.name}"
        self.enums[full] = Located(enum, full, comments.get(path, ""))


class OpenApiBuilder:
    """Builds the document; ``schemas`` collects every message and enum it references."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.schemas: dict[str, dict[str, Any]] = {}

    # -- schemas ------------------------------------------------------------

    def ref(self, full_name: str) -> dict[str, Any]:
        """A ``$ref`` to a message or enum, generating its component on first use."""
        if full_name in WELL_KNOWN:
            return dict(WELL_KNOWN[full_name])
        if full_name not in self.schemas:
            self.schemas[full_name] = {}  # placeholder: breaks recursion
            if full_name in self.catalog.enums:
                self.schemas[full_name] = self._enum_schema(self.catalog.enums[full_name])
            elif full_name in self.catalog.messages:
                self.schemas[full_name] = self._message_schema(self.catalog.messages[full_name])
            else:
                raise KeyError(f"{full_name} is not in the descriptor set")
        return {"$ref": f"#/components/schemas/{full_name}"}

    def _enum_schema(self, enum: Located) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "string", "enum": [v.name for v in enum.proto.value]}
        if enum.comment:
            schema["description"] = enum.comment
        return schema

    def _message_schema(self, message: Located) -> dict[str, Any]:
        properties = {
            field.name: self.field_schema(message.full_name, field) for field in message.proto.field
        }
        schema: dict[str, Any] = {"type": "object", "properties": properties}
        oneofs = self._oneof_note(message.proto)
        description = "\n\n".join(part for part in (message.comment, oneofs) if part)
        if description:
            schema["description"] = description
        return schema

    @staticmethod
    def _oneof_note(message: descriptor_pb2.DescriptorProto) -> str:
        groups: dict[int, list[str]] = {}
        for field in message.field:
            if field.HasField("oneof_index") and not field.proto3_optional:
                groups.setdefault(field.oneof_index, []).append(f"`{field.name}`")
        return " ".join(
            f"At most one of {', '.join(names)} is set ({message.oneof_decl[index].name})."
            for index, names in sorted(groups.items())
        )

    def field_schema(self, message_name: str, field: FieldProto) -> dict[str, Any]:
        entry = self._map_entry(field)
        if entry is not None:
            value_field = entry.proto.field[1]
            schema: dict[str, Any] = {"type": "object", "additionalProperties": self._single(value_field)}
        elif field.label == T.LABEL_REPEATED:
            schema = {"type": "array", "items": self._single(field)}
        else:
            schema = self._single(field)
        comment = self.catalog.fields.get((message_name, field.name), "")
        if comment:
            schema = (
                {"allOf": [schema], "description": comment}
                if "$ref" in schema
                else {
                    **schema,
                    "description": comment,
                }
            )
        return schema

    def _map_entry(self, field: FieldProto) -> Located | None:
        if field.type != T.TYPE_MESSAGE or field.label != T.LABEL_REPEATED:
            return None
        entry = self.catalog.messages.get(field.type_name.lstrip("."))
        return entry if entry is not None and entry.proto.options.map_entry else None

    def _single(self, field: FieldProto) -> dict[str, Any]:
        if field.type in (T.TYPE_MESSAGE, T.TYPE_ENUM):
            return self.ref(field.type_name.lstrip("."))
        return dict(SCALARS[field.type])

    # -- operations ---------------------------------------------------------

    def operation(
        self, service: Located, method: Located, http_method: str, template: str, rule: http_pb2.HttpRule
    ) -> dict[str, Any]:
        request_name = method.proto.input_type.lstrip(".")
        request = self.catalog.messages[request_name]
        path_fields = [m.group(1) for m in PATH_PARAM.finditer(template)]
        summary, _, details = method.comment.partition("\n")
        op: dict[str, Any] = {
            "tags": [service.proto.name],
            "operationId": f"{service.proto.name}_{method.proto.name}",
            "summary": summary.strip() or method.proto.name,
        }
        description = " ".join(details.split())
        if description:
            op["description"] = description
        parameters = [self._path_parameter(request, name) for name in path_fields]
        if rule.body == "*":
            op["requestBody"] = self._body(request, exclude=set(path_fields))
        else:
            if rule.body:
                body_field = self._field(request, rule.body)
                op["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": self.field_schema(request_name, body_field)}},
                }
            excluded = {*path_fields, rule.body}
            parameters += list(self._query_parameters(request, "", excluded, depth=0))
        if parameters:
            op["parameters"] = parameters
        grpc_path = f"/{service.full_name}/{method.proto.name}"
        if grpc_path in REFRESH_TOKEN_METHODS:
            op["security"] = [{"refresh": []}]
        elif grpc_path in PUBLIC_METHODS:
            op["security"] = []
        op["responses"] = {
            self._success_status(method): self._success(method, rule),
            "default": {
                "description": "An error, as a google.rpc.Status.",
                "content": {"application/json": {"schema": self.ref("google.rpc.Status")}},
            },
        }
        return op

    @staticmethod
    def _success_status(method: Located) -> str:
        found = STATUS_IN_COMMENT.search(method.comment)
        return found.group(1) if found else "200"

    def _success(self, method: Located, rule: http_pb2.HttpRule) -> dict[str, Any]:
        response = self.catalog.messages[method.proto.output_type.lstrip(".")]
        schema = (
            self.field_schema(response.full_name, self._field(response, rule.response_body))
            if rule.response_body
            else self.ref(response.full_name)
        )
        if method.proto.server_streaming:
            return {
                "description": "A stream: one JSON object per line, each sent as the controller pushes it.",
                "content": {"application/x-ndjson": {"schema": schema}},
            }
        return {"description": "OK", "content": {"application/json": {"schema": schema}}}

    def _body(self, request: Located, exclude: set[str]) -> dict[str, Any]:
        if not exclude:
            schema = self.ref(request.full_name)
        else:
            full = self.ref(request.full_name)["$ref"].rsplit("/", 1)[1]
            properties = {
                name: value for name, value in self.schemas[full]["properties"].items() if name not in exclude
            }
            schema = {"type": "object", "properties": properties}
        has_fields = any(f.name not in exclude for f in request.proto.field)
        return {"required": has_fields, "content": {"application/json": {"schema": schema}}}

    def _field(self, message: Located, dotted: str) -> FieldProto:
        head, _, rest = dotted.partition(".")
        field: FieldProto
        for field in message.proto.field:
            if field.name == head:
                if not rest:
                    return field
                return self._field(self.catalog.messages[field.type_name.lstrip(".")], rest)
        raise KeyError(f"{message.full_name} has no field {dotted!r}")

    def _path_parameter(self, request: Located, dotted: str) -> dict[str, Any]:
        field = self._field(request, dotted)
        parameter: dict[str, Any] = {
            "name": dotted,
            "in": "path",
            "required": True,
            "schema": self._single(field),
        }
        comment = self.catalog.fields.get((request.full_name, dotted), "")
        if comment:
            parameter["description"] = comment
        return parameter

    def _query_parameters(
        self, message: Located, prefix: str, excluded: set[str], depth: int
    ) -> Iterator[dict[str, Any]]:
        """Every field the transcoder accepts as ``?name=value`` (nested messages as ``a.b``)."""
        for field in message.proto.field:
            name = f"{prefix}{field.name}"
            if name in excluded:
                continue
            type_name = field.type_name.lstrip(".")
            if field.type == T.TYPE_MESSAGE and type_name not in WELL_KNOWN:
                if self._map_entry(field) is None and field.label != T.LABEL_REPEATED and depth < 3:
                    yield from self._query_parameters(
                        self.catalog.messages[type_name], f"{name}.", excluded, depth + 1
                    )
                continue
            schema = self._single(field)
            if field.label == T.LABEL_REPEATED:
                schema = {"type": "array", "items": schema}
            parameter: dict[str, Any] = {"name": name, "in": "query", "required": False, "schema": schema}
            if field.label == T.LABEL_REPEATED:
                parameter.update(style="form", explode=True)
            comment = self.catalog.fields.get((message.full_name, field.name), "")
            if comment:
                parameter["description"] = comment
            yield parameter

    # -- the document -------------------------------------------------------

    def document(self) -> dict[str, Any]:
        paths: dict[str, dict[str, Any]] = {}
        tags = []
        for service, methods in self.catalog.services:
            tag: dict[str, Any] = {"name": service.proto.name}
            if service.comment:
                tag["description"] = service.comment
            tags.append(tag)
            for method in methods:
                if not method.proto.options.HasExtension(annotations_pb2.http):
                    continue  # gRPC only (client and bidi streams)
                top = method.proto.options.Extensions[annotations_pb2.http]
                for rule in (top, *top.additional_bindings):
                    kind = rule.WhichOneof("pattern")
                    if kind is None:
                        continue
                    http_method, template = (
                        (rule.custom.kind.lower(), rule.custom.path)
                        if kind == "custom"
                        else (kind, getattr(rule, kind))
                    )
                    path = PATH_PARAM.sub(lambda m: "{" + m.group(1) + "}", template)
                    item = paths.setdefault(path, {})
                    if http_method in item:
                        raise ValueError(f"{http_method.upper()} {path} is bound twice")
                    item[http_method] = self.operation(service, method, http_method, template, rule)
        for detail in ERROR_DETAILS:
            self.ref(detail)
        self.ref("google.rpc.Status")
        status = self.schemas["google.rpc.Status"]
        status["properties"]["details"] = {
            "type": "array",
            "items": self.ref("google.protobuf.Any"),
            "description": "Each detail has an `@type` naming its message, one of "
            + ", ".join(f"`type.googleapis.com/{d}`" for d in ERROR_DETAILS)
            + ", and that message's fields.",
        }
        return {
            "openapi": "3.0.3",
            "info": {"title": "Automator67 controller API", "version": "v1", "description": DESCRIPTION},
            "servers": [{"url": SERVER_URL, "description": "a67 up on this machine"}],
            "security": [{"bearer": []}],
            "tags": tags,
            "paths": dict(sorted(paths.items())),
            "components": {
                "securitySchemes": {
                    "bearer": {
                        "type": "http",
                        "scheme": "bearer",
                        "bearerFormat": "JWT",
                        "description": "The access token from register, login or refresh.",
                    },
                    "refresh": {
                        "type": "http",
                        "scheme": "bearer",
                        "bearerFormat": "JWT",
                        "description": "The refresh token from register, login or the previous refresh.",
                    },
                },
                "schemas": dict(sorted(self.schemas.items())),
            },
        }


def build(descriptor_path: Path = DESCRIPTOR) -> dict[str, Any]:
    """The OpenAPI document for the descriptor set at ``descriptor_path``."""
    descriptors = descriptor_pb2.FileDescriptorSet.FromString(descriptor_path.read_bytes())
    return OpenApiBuilder(Catalog(descriptors)).document()


def dumps(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--descriptor", type=Path, default=DESCRIPTOR, help="descriptor set to read")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where to write the document")
    parser.add_argument("--check", action="store_true", help="exit 1 if the output file is not up to date")
    args = parser.parse_args(argv)
    text = dumps(build(args.descriptor))
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run scripts/gen_openapi.py", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output.relative_to(ROOT) if args.output.is_relative_to(ROOT) else args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
