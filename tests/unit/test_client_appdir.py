"""a67.toml parsing, flag overrides and the packed source."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from automator67.v1 import deployment_pb2

from controller.client.app import cli
from controller.client.appdir import load_manifest, pack, parse_env_flags, source_files
from controller.client.cmd_apps import build_manifest
from controller.client.errors import USAGE, CliError
from controller.client.main import main
from controller.client.names import CLIENT_COMMANDS
from controller.deployments.manifest import validate_manifest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hello"


def test_the_example_manifest_is_valid_for_the_controller() -> None:
    manifest = load_manifest(EXAMPLE)
    assert manifest.name == "hello"
    assert manifest.app_type == deployment_pb2.APP_TYPE_BACKEND
    valid = validate_manifest(manifest, source_size=1000)
    assert valid.replicas == 2
    assert valid.health_check.path == "/health"
    assert dict(valid.env) == {"GREETING": "hello"}


def test_flags_override_the_file(tmp_path: Path) -> None:
    (tmp_path / "a67.toml").write_text('name = "a"\ntype = "worker"\nreplicas = 1\n[env]\nX = "1"\n')
    manifest = build_manifest(
        tmp_path,
        {
            "name": "b",
            "app_type": "backend",
            "replicas": 3,
            "memory": "1GB",
            "env": {"Y": "2"},
            "atomic": True,
        },
    )
    assert (manifest.name, manifest.app_type, manifest.replicas) == ("b", deployment_pb2.APP_TYPE_BACKEND, 3)
    assert manifest.resources.memory == "1GB"
    assert manifest.atomic
    assert dict(manifest.env) == {"X": "1", "Y": "2"}


def test_the_name_defaults_to_the_directory(tmp_path: Path) -> None:
    app = tmp_path / "My_App"
    app.mkdir()
    assert build_manifest(app, {}).name == "my-app"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('nmae = "x"\n', "unknown key 'nmae'"),
        ("replicas = 'two'\n", "replicas must be an integer"),
        ('type = "daemon"\n', "type must be one of"),
        ("[resources]\nram = '1GB'\n", "unknown key 'ram' in [resources]"),
        ("name = \n", "not valid TOML"),
    ],
)
def test_bad_manifest_files_are_usage_errors(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / "a67.toml").write_text(text)
    with pytest.raises(CliError) as caught:
        load_manifest(tmp_path)
    assert caught.value.exit_code == USAGE
    assert problem in caught.value.message


def test_env_flags_take_values_from_the_environment() -> None:
    assert parse_env_flags(("A=1", "B=x=y", "TOKEN"), {"TOKEN": "secret"}) == {
        "A": "1",
        "B": "x=y",
        "TOKEN": "secret",
    }
    with pytest.raises(CliError, match="not set in your environment"):
        parse_env_flags(("MISSING",), {})


def test_pack_honours_a67ignore_and_is_deterministic(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("print('hi')\n")
    (tmp_path / "run.sh").write_text("#!/bin/sh\n")
    (tmp_path / "run.sh").chmod(0o755)
    (tmp_path / "debug.log").write_text("noise\n")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("private\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "lib.py").write_text("X = 1\n")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref\n")
    (tmp_path / ".a67ignore").write_text("*.log\nnotes/\n")
    assert source_files(tmp_path) == [".a67ignore", "app.py", "run.sh", "src/lib.py"]
    first = pack(tmp_path)
    data = first.file.read()
    first.close()
    assert len(data) == first.size
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        members = {m.name: m for m in archive.getmembers()}
        assert sorted(members) == [".a67ignore", "app.py", "run.sh", "src/lib.py"]
        assert members["run.sh"].mode == 0o755
        assert members["app.py"].mode == 0o644
        assert {m.mtime for m in members.values()} == {0}
    (tmp_path / "app.py").touch()  # a newer mtime changes nothing
    second = pack(tmp_path)
    second.close()
    assert second.sha256 == first.sha256


def test_pack_refuses_an_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(CliError, match="nothing to deploy"):
        pack(tmp_path)


def test_the_routed_names_are_the_click_commands() -> None:
    assert set(CLIENT_COMMANDS) == set(cli.commands)


def test_usage_errors_exit_2_and_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nodes", "show"]) == 2
    assert "Missing argument" in capsys.readouterr().err
    for args in (["deploy", "--help"], ["db", "query", "--help"], ["nodes", "enroll", "--help"]):
        assert main(args) == 0
        assert "Example" in capsys.readouterr().out


def test_completion_script() -> None:
    # Click generates it; this checks the wiring (program name and variable).
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "controller.cli", "completion", "bash"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "_A67_COMPLETE" in out
    assert "a67" in out
