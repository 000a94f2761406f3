"""How the agent takes its secrets at start: the provider OAuth token from one line of
standard input (``--oauth-token-stdin``), and secrets in the environment wiped for good,
``/proc/<pid>/environ`` included (:func:`controller.agent.hardening.wipe_environment`)."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from controller.agent import cli
from controller.agent.cli import add_agent_parser, config_from_args, run_agent_command
from controller.agent.hardening import MAX_STDIN_SECRET_BYTES, read_secret_stdin

REPO_ROOT = Path(__file__).resolve().parents[2]
OAUTH = "oauth-s3cret-from-stdin"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="a67")
    add_agent_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["agent", *argv])


# --------------------------------------------------------------------------- standard input


def test_one_line_of_standard_input_is_the_secret() -> None:
    stream = io.BytesIO(f"  {OAUTH}\r\nsomething else\n".encode())
    assert read_secret_stdin(stream) == OAUTH
    assert stream.read() == b"something else\n"  # only the first line is consumed
    assert read_secret_stdin(io.BytesIO(OAUTH.encode())) == OAUTH  # no final newline
    assert read_secret_stdin(io.BytesIO(b"")) == ""


def test_a_bad_line_of_standard_input_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than"):
        read_secret_stdin(io.BytesIO(b"x" * (MAX_STDIN_SECRET_BYTES + 1) + b"\n"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_secret_stdin(io.BytesIO(b"\xff\xfe\n"))


def test_the_flag_overrides_the_environment_in_the_config(tmp_path: Path) -> None:
    args = _parse("--oauth-token-stdin", "--data-dir", str(tmp_path))
    assert args.oauth_token_stdin is True
    secrets = {"A67_AGENT_TOKEN": "enroll", "A67_AGENT_OAUTH_TOKEN": "from-env"}
    assert config_from_args(args, secrets=secrets, oauth_token=OAUTH).oauth_token == OAUTH
    assert config_from_args(args, secrets=secrets).oauth_token == "from-env"
    assert config_from_args(args, secrets=secrets).token == "enroll"
    assert _parse().oauth_token_stdin is False


@pytest.mark.parametrize("given", [b"", b"\n", b"   \n"])
def test_no_token_on_standard_input_exits_2(
    given: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    detached: list[bool] = []
    monkeypatch.setattr(cli, "detach_stdin", lambda: detached.append(True))
    monkeypatch.setattr(cli, "take_secret_environment", dict)  # leave this process's environment be
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(given)))
    monkeypatch.delenv("A67_AGENT_OAUTH_TOKEN", raising=False)
    args = _parse("--oauth-token-stdin", "--data-dir", str(tmp_path), "--controller", "127.0.0.1:1")
    assert run_agent_command(args) == 2
    assert "--oauth-token-stdin: standard input held no token" in caplog.text
    assert detached == [True]  # standard input is let go of, whatever it held


# --------------------------------------------------------------------------- the environment

WIPE = """
import json, os, subprocess, sys
from controller.agent.hardening import wipe_environment
removed = wipe_environment(["A67_AGENT_OAUTH_TOKEN", "A67_AGENT_TOKEN", "A67_NOT_SET"])
with open("/proc/self/environ", "rb") as f:
    block = f.read()
child = subprocess.run(["sh", "-c", "echo ${A67_AGENT_OAUTH_TOKEN:-unset}"], capture_output=True, text=True)
print(json.dumps({
    "removed": removed,
    "in_block": sys.argv[1].encode() in block,
    "in_os_environ": "A67_AGENT_OAUTH_TOKEN" in os.environ,
    "in_c_environ": os.getenv("A67_AGENT_OAUTH_TOKEN") is not None,
    "child": child.stdout.strip(),
    "neighbour": os.environ.get("A67_NEIGHBOUR"),
    "block_names": [e.split(b"=", 1)[0].decode() for e in block.split(b"\\0") if b"=" in e],
}))
"""


@linux_only
def test_wiping_takes_the_secret_out_of_proc_environ_and_keeps_the_rest() -> None:
    secret = "gho_wipe_canary_0123456789"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("A67_")},
        "A67_AGENT_OAUTH_TOKEN": secret,
        "A67_AGENT_TOKEN": "enroll-" + secret,
        "A67_NEIGHBOUR": "kept",
    }
    done = subprocess.run(
        [sys.executable, "-c", WIPE, secret],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout)
    assert sorted(result["removed"]) == ["A67_AGENT_OAUTH_TOKEN", "A67_AGENT_TOKEN"]
    assert result["in_block"] is False
    assert result["in_os_environ"] is False
    assert result["in_c_environ"] is False
    assert result["child"] == "unset"
    assert result["neighbour"] == "kept"
    # the block stays well-formed: the variables after the wiped ones still parse
    assert "A67_NEIGHBOUR" in result["block_names"]
    assert "A67_AGENT_OAUTH_TOKEN" not in result["block_names"]
    assert "/proc/<pid>/environ still shows" not in done.stderr
