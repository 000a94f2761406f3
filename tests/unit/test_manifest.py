"""Manifest validation: each rule as a table of named valid and invalid values."""

from __future__ import annotations

import doctest
from typing import Any

import grpc
import pytest
from automator67.v1 import deployment_pb2 as pb
from google.rpc import error_details_pb2

from controller.deployments import manifest as manifest_module
from controller.deployments import manifest_units
from controller.deployments.manifest import (
    MAX_SOURCE_BYTES,
    RUNTIMES,
    ValidManifest,
    validate_manifest,
)
from controller.deployments.manifest_health import HealthCheckSpec
from controller.errors import InvalidArgument
from controller.scheduling import ReplicaRequest


def manifest(**changes: Any) -> pb.DeploymentManifest:
    """A valid backend manifest with ``changes`` applied (``resources``/``health_check`` as dicts)."""
    fields: dict[str, Any] = {
        "name": "hello",
        "app_type": pb.APP_TYPE_BACKEND,
        "runtime": "python",
        "entrypoint": "app.py",
        "replicas": 2,
    }
    resources = {"memory": "512MB", "cpu": "0.5"}
    resources.update(changes.pop("resources", {}))
    health = changes.pop("health_check", {})
    fields.update(changes)
    return pb.DeploymentManifest(
        **fields, resources=pb.Resources(**resources), health_check=pb.HealthCheck(**health)
    )


def valid(source_size: int = 1000, **changes: Any) -> ValidManifest:
    return validate_manifest(manifest(**changes), source_size=source_size)


def violations(source_size: int = 1000, **changes: Any) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        validate_manifest(manifest(**changes), source_size=source_size)
    return {v.field: v.description for v in caught.value.field_violations}


def test_minimal_backend_gets_every_default() -> None:
    result = valid()
    assert result == ValidManifest(
        name="hello",
        app_type="backend",
        runtime="python",
        entrypoint="app.py",
        argv=("python3", "app.py"),
        entrypoint_file="app.py",
        cpu_cores=0.5,
        memory_mb=512,
        disk_mb=1024,
        replicas=2,
        env={},
        health_check=HealthCheckSpec(path="/health", interval_seconds=10, timeout_seconds=2, retries=3),
        atomic=False,
    )
    assert result.replica_request() == ReplicaRequest(cpu_cores=0.5, memory_mb=512, disk_mb=1024)


# --------------------------------------------------------------------------- valid values


@pytest.mark.parametrize(
    ("changes", "attribute", "expected"),
    [
        pytest.param({"resources": {"memory": "512MB"}}, "memory_mb", 512, id="memory-512MB"),
        pytest.param({"resources": {"memory": "1GB"}}, "memory_mb", 1024, id="memory-1GB-is-1024MB"),
        pytest.param({"resources": {"memory": "256Mi"}}, "memory_mb", 256, id="memory-256Mi"),
        pytest.param({"resources": {"memory": "1Gi"}}, "memory_mb", 1024, id="memory-1Gi"),
        pytest.param({"resources": {"memory": "512mb"}}, "memory_mb", 512, id="memory-case-insensitive"),
        pytest.param({"resources": {"memory": "512m"}}, "memory_mb", 512, id="memory-docker-style-m"),
        pytest.param({"resources": {"memory": " 2 GiB "}}, "memory_mb", 2048, id="memory-spaces-and-GiB"),
        pytest.param({"resources": {"memory": "1.5GB"}}, "memory_mb", 1536, id="memory-decimal"),
        pytest.param(
            {"resources": {"memory": "0.1GB"}}, "memory_mb", 103, id="memory-rounded-up-to-whole-MB"
        ),
        pytest.param({"resources": {"memory": "64GB"}}, "memory_mb", 65536, id="memory-at-the-64GB-limit"),
        pytest.param({"resources": {"cpu": "0.5"}}, "cpu_cores", 0.5, id="cpu-half-core"),
        pytest.param({"resources": {"cpu": "2"}}, "cpu_cores", 2.0, id="cpu-whole-cores"),
        pytest.param({"resources": {"cpu": "500m"}}, "cpu_cores", 0.5, id="cpu-millicores"),
        pytest.param({"resources": {"cpu": "1m"}}, "cpu_cores", 0.001, id="cpu-one-millicore-minimum"),
        pytest.param({"resources": {"cpu": "64"}}, "cpu_cores", 64.0, id="cpu-at-the-limit"),
        pytest.param({"resources": {"cpu": ".25"}}, "cpu_cores", 0.25, id="cpu-leading-dot"),
        pytest.param({"resources": {"storage": ""}}, "disk_mb", 1024, id="storage-defaults-to-1GB"),
        pytest.param({"resources": {"storage": "10GB"}}, "disk_mb", 10240, id="storage-10GB"),
        pytest.param({"replicas": 1}, "replicas", 1, id="one-replica"),
        pytest.param({"replicas": 20}, "replicas", 20, id="twenty-replicas"),
        pytest.param({"atomic": True}, "atomic", True, id="atomic-passes-through"),
        pytest.param({"name": "a"}, "name", "a", id="one-letter-name"),
        pytest.param({"name": "my-app-2"}, "name", "my-app-2", id="name-with-dashes-and-digits"),
        pytest.param({"name": "a" * 63}, "name", "a" * 63, id="name-of-63-characters"),
        pytest.param(
            {"app_type": pb.APP_TYPE_WORKER},
            "health_check",
            HealthCheckSpec(path="", interval_seconds=10, timeout_seconds=2, retries=3),
            id="worker-has-no-http-check-by-default",
        ),
        pytest.param(
            {"app_type": pb.APP_TYPE_WORKER, "health_check": {"path": "/ready"}},
            "health_check",
            HealthCheckSpec(path="/ready", interval_seconds=10, timeout_seconds=2, retries=3),
            id="worker-may-have-an-http-check",
        ),
        pytest.param(
            {
                "health_check": {
                    "path": "/healthz?full=1",
                    "interval_seconds": 300,
                    "timeout_seconds": 60,
                    "retries": 10,
                }
            },
            "health_check",
            HealthCheckSpec(path="/healthz?full=1", interval_seconds=300, timeout_seconds=60, retries=10),
            id="health-check-at-the-upper-limits",
        ),
        pytest.param(
            {"health_check": {"interval_seconds": 2, "timeout_seconds": 1, "retries": 1}},
            "health_check",
            HealthCheckSpec(path="/health", interval_seconds=2, timeout_seconds=1, retries=1),
            id="health-check-at-the-lower-limits",
        ),
        pytest.param(
            {"env": {"DATABASE_URL": "postgres://x", "_PRIVATE": "1", "EMPTY": ""}},
            "env",
            {"DATABASE_URL": "postgres://x", "_PRIVATE": "1", "EMPTY": ""},
            id="env-names-and-values",
        ),
        pytest.param(
            {"env": {f"V{i}": "x" for i in range(64)}}, "replicas", 2, id="env-with-64-entries-is-allowed"
        ),
        pytest.param({"env": {"BIG": "x" * 4096}}, "replicas", 2, id="env-value-of-4KiB-is-allowed"),
    ],
)
def test_valid_value(changes: dict[str, Any], attribute: str, expected: object) -> None:
    result = valid(**changes)
    assert getattr(result, attribute) == expected


@pytest.mark.parametrize(
    ("runtime", "entrypoint", "argv", "file"),
    [
        pytest.param("python", "app.py", ("python3", "app.py"), "app.py", id="python-file"),
        pytest.param(
            "python", "./src/main.py", ("python3", "src/main.py"), "src/main.py", id="python-nested-file"
        ),
        pytest.param(
            "python",
            "app.py --port 8080",
            ("python3", "app.py", "--port", "8080"),
            "app.py",
            id="python-arguments",
        ),
        pytest.param(
            "python",
            "-m myapp.server --x",
            ("python3", "-m", "myapp.server", "--x"),
            None,
            id="python-module",
        ),
        pytest.param("command", "./run.sh", ("./run.sh",), "run.sh", id="command-script-in-source"),
        pytest.param(
            "command",
            "bin/server --flag 'a b'",
            ("./bin/server", "--flag", "a b"),
            "bin/server",
            id="command-split-like-a-shell",
        ),
        pytest.param(
            "command", "gunicorn app:app", ("gunicorn", "app:app"), None, id="command-program-on-path"
        ),
        pytest.param(
            "command", "/usr/bin/env python3 x", ("/usr/bin/env", "python3", "x"), None, id="command-absolute"
        ),
    ],
)
def test_valid_entrypoint(runtime: str, entrypoint: str, argv: tuple[str, ...], file: str | None) -> None:
    result = valid(runtime=runtime, entrypoint=entrypoint)
    assert (result.argv, result.entrypoint_file) == (argv, file)


# --------------------------------------------------------------------------- invalid values


@pytest.mark.parametrize(
    ("changes", "field", "description"),
    [
        pytest.param({"name": ""}, "manifest.name", "is required", id="name-missing"),
        pytest.param({"name": "Hello"}, "manifest.name", "lower-case", id="name-upper-case"),
        pytest.param({"name": "-hello"}, "manifest.name", "starting and ending", id="name-leading-dash"),
        pytest.param({"name": "hello-"}, "manifest.name", "starting and ending", id="name-trailing-dash"),
        pytest.param({"name": "my_app"}, "manifest.name", "lower-case", id="name-underscore"),
        pytest.param({"name": "a" * 64}, "manifest.name", "1 to 63", id="name-too-long"),
        pytest.param({"name": "héllo"}, "manifest.name", "lower-case", id="name-non-ascii"),
        pytest.param(
            {"app_type": pb.APP_TYPE_UNSPECIFIED}, "manifest.app_type", "is required", id="app-type-missing"
        ),
        pytest.param(
            {"app_type": pb.APP_TYPE_CRON}, "manifest.app_type", "no schedule", id="cron-not-supported-yet"
        ),
        pytest.param(
            {"app_type": 99}, "manifest.app_type", "must be APP_TYPE_BACKEND", id="app-type-unknown"
        ),
        pytest.param({"runtime": ""}, "manifest.runtime", "is required", id="runtime-missing"),
        pytest.param(
            {"runtime": "node"}, "manifest.runtime", "must be one of: command, python", id="runtime-unknown"
        ),
        pytest.param({"entrypoint": ""}, "manifest.entrypoint", "is required", id="entrypoint-missing"),
        pytest.param({"entrypoint": "   "}, "manifest.entrypoint", "is required", id="entrypoint-blank"),
        pytest.param(
            {"entrypoint": "a" * 1022 + ".py"},
            "manifest.entrypoint",
            "at most 1024",
            id="entrypoint-too-long",
        ),
        pytest.param(
            {"entrypoint": "app.py\nrm -rf /"}, "manifest.entrypoint", "one line", id="entrypoint-two-lines"
        ),
        pytest.param(
            {"entrypoint": "main.js"}, "manifest.entrypoint", ".py file", id="python-entrypoint-not-py"
        ),
        pytest.param(
            {"entrypoint": "/srv/app.py"}, "manifest.entrypoint", "not absolute", id="python-absolute-path"
        ),
        pytest.param(
            {"entrypoint": "../app.py"}, "manifest.entrypoint", "no '..'", id="python-escapes-source"
        ),
        pytest.param({"entrypoint": "src\\app.py"}, "manifest.entrypoint", "'/'", id="python-backslash"),
        pytest.param(
            {"entrypoint": "python app.py"},
            "manifest.entrypoint",
            "not include the interpreter",
            id="python-interpreter",
        ),
        pytest.param(
            {"entrypoint": "-m"}, "manifest.entrypoint", "module after -m", id="python-m-without-module"
        ),
        pytest.param(
            {"entrypoint": "-m 1bad"}, "manifest.entrypoint", "module after -m", id="python-m-bad-module"
        ),
        pytest.param(
            {"entrypoint": "'app.py"},
            "manifest.entrypoint",
            "not a valid command line",
            id="unbalanced-quote",
        ),
        pytest.param(
            {"runtime": "command", "entrypoint": "../bin/x"},
            "manifest.entrypoint",
            "no '..'",
            id="command-escapes",
        ),
        pytest.param(
            {"resources": {"memory": ""}}, "manifest.resources.memory", "is required", id="memory-missing"
        ),
        pytest.param(
            {"resources": {"memory": "512"}},
            "manifest.resources.memory",
            "must have a unit",
            id="memory-no-unit",
        ),
        pytest.param(
            {"resources": {"memory": "512KB"}},
            "manifest.resources.memory",
            "unknown unit 'kb'",
            id="memory-kb",
        ),
        pytest.param(
            {"resources": {"memory": "0MB"}}, "manifest.resources.memory", "more than 0", id="memory-zero"
        ),
        pytest.param(
            {"resources": {"memory": "65GB"}},
            "manifest.resources.memory",
            "at most 64GB",
            id="memory-too-big",
        ),
        pytest.param(
            {"resources": {"memory": "lots"}},
            "manifest.resources.memory",
            "like 512MB",
            id="memory-not-a-size",
        ),
        pytest.param(
            {"resources": {"memory": "-1GB"}}, "manifest.resources.memory", "like 512MB", id="memory-negative"
        ),
        pytest.param({"resources": {"cpu": ""}}, "manifest.resources.cpu", "is required", id="cpu-missing"),
        pytest.param({"resources": {"cpu": "0"}}, "manifest.resources.cpu", "more than 0", id="cpu-zero"),
        pytest.param(
            {"resources": {"cpu": "0m"}}, "manifest.resources.cpu", "more than 0", id="cpu-zero-millicores"
        ),
        pytest.param(
            {"resources": {"cpu": "0.0001"}}, "manifest.resources.cpu", "at least 0.001", id="cpu-too-small"
        ),
        pytest.param({"resources": {"cpu": "65"}}, "manifest.resources.cpu", "at most 64", id="cpu-too-many"),
        pytest.param(
            {"resources": {"cpu": "two"}}, "manifest.resources.cpu", "like 0.5, 2 or 500m", id="cpu-word"
        ),
        pytest.param(
            {"resources": {"cpu": "-1"}}, "manifest.resources.cpu", "like 0.5, 2 or 500m", id="cpu-negative"
        ),
        pytest.param(
            {"resources": {"storage": "0GB"}}, "manifest.resources.storage", "more than 0", id="storage-zero"
        ),
        pytest.param(
            {"resources": {"storage": "100GB"}},
            "manifest.resources.storage",
            "at most 64GB",
            id="storage-big",
        ),
        pytest.param(
            {"resources": {"storage": "big"}}, "manifest.resources.storage", "like 512MB", id="storage-word"
        ),
        pytest.param({"replicas": 0}, "manifest.replicas", "is required", id="replicas-missing"),
        pytest.param({"replicas": -1}, "manifest.replicas", "between 1 and 20", id="replicas-negative"),
        pytest.param(
            {"replicas": 21}, "manifest.replicas", "between 1 and 20 (got 21)", id="replicas-too-many"
        ),
        pytest.param(
            {"env": {f"V{i}": "x" for i in range(65)}},
            "manifest.env",
            "at most 64 entries",
            id="env-too-many",
        ),
        pytest.param(
            {"env": {"lower": "x"}}, 'manifest.env["lower"]', "upper-case", id="env-name-lower-case"
        ),
        pytest.param(
            {"env": {"1ABC": "x"}}, 'manifest.env["1ABC"]', "not starting with a digit", id="env-name-digit"
        ),
        pytest.param({"env": {"MY-VAR": "x"}}, 'manifest.env["MY-VAR"]', "upper-case", id="env-name-dash"),
        pytest.param(
            {"env": {"A" * 129: "x"}}, f'manifest.env["{"A" * 128}…"]', "at most 128", id="env-name-long"
        ),
        pytest.param(
            {"env": {"A67_PORT": "1"}}, 'manifest.env["A67_PORT"]', "reserved", id="env-name-reserved"
        ),
        pytest.param(
            {"env": {"BIG": "x" * 4097}}, 'manifest.env["BIG"]', "at most 4096 bytes", id="env-value-long"
        ),
        pytest.param(
            {"env": {"BIG": "é" * 2049}}, 'manifest.env["BIG"]', "got 4098", id="env-value-counted-in-utf8"
        ),
        pytest.param({"env": {"NUL": "a\x00b"}}, 'manifest.env["NUL"]', "NUL", id="env-value-nul"),
        pytest.param(
            {"env": {f"V{i}": "x" * 4000 for i in range(17)}},
            "manifest.env",
            "total at most 65536",
            id="env-total",
        ),
        pytest.param(
            {"health_check": {"path": "health"}},
            "manifest.health_check.path",
            "start with '/'",
            id="health-relative",
        ),
        pytest.param(
            {"health_check": {"path": "/" + "a" * 256}},
            "manifest.health_check.path",
            "at most 256",
            id="health-long",
        ),
        pytest.param(
            {"health_check": {"path": "/a b"}},
            "manifest.health_check.path",
            "URL path characters",
            id="health-space",
        ),
        pytest.param(
            {"health_check": {"interval_seconds": 1}},
            "manifest.health_check.interval_seconds",
            "between 2 and 300",
            id="interval-too-short-for-any-timeout",
        ),
        pytest.param(
            {"health_check": {"interval_seconds": 301}},
            "manifest.health_check.interval_seconds",
            "between 2 and 300",
            id="interval-too-long",
        ),
        pytest.param(
            {"health_check": {"interval_seconds": -5}},
            "manifest.health_check.interval_seconds",
            "between 2 and 300",
            id="interval-negative",
        ),
        pytest.param(
            {"health_check": {"timeout_seconds": 61, "interval_seconds": 120}},
            "manifest.health_check.timeout_seconds",
            "between 1 and 60",
            id="timeout-too-long",
        ),
        pytest.param(
            {"health_check": {"timeout_seconds": 10}},
            "manifest.health_check.timeout_seconds",
            "less than interval_seconds (10)",
            id="timeout-not-shorter-than-interval",
        ),
        pytest.param(
            {"health_check": {"retries": 11}},
            "manifest.health_check.retries",
            "between 1 and 10",
            id="retries-many",
        ),
        pytest.param(
            {"health_check": {"retries": -1}},
            "manifest.health_check.retries",
            "between 1 and 10",
            id="retries-negative",
        ),
    ],
)
def test_invalid_value(changes: dict[str, Any], field: str, description: str) -> None:
    found = violations(**changes)
    assert field in found, found
    assert description in found[field]
    assert len(found) == 1, found


@pytest.mark.parametrize(
    ("size", "description"),
    [
        pytest.param(0, "is required", id="source-missing"),
        pytest.param(MAX_SOURCE_BYTES + 1, f"at most {MAX_SOURCE_BYTES} bytes (10 MiB)", id="source-too-big"),
    ],
)
def test_source_size(size: int, description: str) -> None:
    assert description in violations(source_size=size)["source_tar_gz"]


def test_source_at_the_limit_is_accepted() -> None:
    assert valid(source_size=MAX_SOURCE_BYTES).name == "hello"


def test_every_violation_is_reported_at_once() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_manifest(pb.DeploymentManifest(), source_size=0)
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {v.field for v in error.field_violations} == {
        "manifest.name",
        "manifest.app_type",
        "manifest.runtime",
        "manifest.entrypoint",
        "manifest.resources.memory",
        "manifest.resources.cpu",
        "manifest.replicas",
        "source_tar_gz",
    }
    assert error.message.startswith("Invalid deployment manifest: manifest.name: is required")
    details = [
        detail for detail in error.to_status().details if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR)
    ]
    assert len(details) == 1


def test_env_values_never_appear_in_errors_or_repr() -> None:
    secret = "hunter2-" + "s" * 5000
    with pytest.raises(InvalidArgument) as caught:
        validate_manifest(manifest(env={"TOKEN": secret, "bad": "hunter2\x00"}), source_size=1)
    text = caught.value.message + repr(caught.value.field_violations) + str(caught.value.to_status())
    assert "hunter2" not in text
    result = valid(env={"TOKEN": "hunter2"})
    assert "hunter2" not in repr(result)
    assert "hunter2" not in result.public_json()
    assert result.public_dict()["env_names"] == ["TOKEN"]


def test_runtimes_table_documents_each_runtime() -> None:
    assert set(RUNTIMES) == {"python", "command"}
    for name, runtime in RUNTIMES.items():
        assert runtime.name == name
        assert runtime.needs
        assert runtime.base_image


def test_docstring_examples_run() -> None:
    assert doctest.testmod(manifest_module).failed == 0
    assert doctest.testmod(manifest_units).failed == 0
