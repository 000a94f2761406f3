"""A real agent process holds its provider token in memory only: it fetches the sealed
token after connecting, opens it, and the token appears nowhere on its disk or in its log
(issue 16's canary, the agent's side). Given through standard input
(``--oauth-token-stdin``) or, for compatibility, ``A67_AGENT_OAUTH_TOKEN``, the token is
never in ``/proc/<pid>/environ`` or ``/proc/<pid>/cmdline`` of any process of the agent's
tree once the agent runs, and the controller holds exactly that token."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import IO

import grpc
import psutil
import pytest
from automator67.v1 import node_pb2

from controller.nodes.registration import decrypt_oauth_token
from tests.integration.test_deployments_real import Client, _clean_env, _until, processes
from tests.integration.test_node_api import _user
from tests.support import bearer, controller_settings, running_controller

MARKER = "gho_canary_7f3c1e9a2b4d6f8a0c1e3a5b"
NEIGHBOUR = ("A67_TEST_NEIGHBOUR", "still-here-7c1d")
"""A variable that is no secret: it stays in the agent's /proc/<pid>/environ."""


def _files_holding(root: Path, marker: bytes) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            try:
                if marker in path.read_bytes():
                    found.append(str(path))
            except OSError:
                pass
    return found


def _proc(pid: int, name: str) -> bytes | None:
    """``/proc/<pid>/<name>``; None if the process is gone (or, not as root, non-dumpable)."""
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


def _tree(pid: int) -> list[int]:
    try:
        root = psutil.Process(pid)
        return [pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def _start(args: list[str], env: dict[str, str], log: IO[bytes], stdin_line: str) -> subprocess.Popen[bytes]:
    """Start the agent, with ``stdin_line`` (if any) as its standard input's only line."""
    agent = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env)
    assert agent.stdin is not None
    if stdin_line:
        agent.stdin.write(stdin_line.encode() + b"\n")
    agent.stdin.close()
    return agent


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("via", ["stdin", "environment"])
async def test_the_agent_fetches_its_sealed_token_and_keeps_it_off_disk(tmp_path: Path, via: str) -> None:
    settings = controller_settings(tmp_path / "controller", heartbeat_interval_seconds=0.3)
    agents_root = tmp_path / "agents"
    agents_root.mkdir()
    log = agents_root / "agent-eu.log"
    with log.open("ab") as log_file, processes(agents_root) as procs:
        async with (
            running_controller(settings) as controller,
            grpc.aio.insecure_channel(controller.address) as channel,
        ):
            client = Client(channel, await _user(channel))
            enrollment = await client.enrollment(uses=1)
            args = [sys.executable, "-m", "controller.cli", "agent", "--data-dir", str(agents_root / "eu")]
            args += ["--region", "eu", "--controller", controller.address, "--node-types", "database"]
            env = {**_clean_env(), "A67_AGENT_TOKEN": enrollment, NEIGHBOUR[0]: NEIGHBOUR[1]}
            if via == "stdin":
                args.append("--oauth-token-stdin")
            else:
                env["A67_AGENT_OAUTH_TOKEN"] = MARKER
            agent = _start(args, env, log_file, MARKER if via == "stdin" else "")
            procs.started.append(agent)  # stopped (SIGTERM) at teardown

            (node,) = await client.wait_ready(1)
            await _until(
                lambda: asyncio.to_thread(lambda: "holding the provider token version 1" in log.read_text()),
                "the agent to hold its provider token",
            )
            # the controller has exactly that token, as an active credential
            reply = await client.nodes.GetNode(
                node_pb2.GetNodeRequest(node_id=node.id), metadata=bearer(client.token)
            )
            assert reply.node.credentials.state == node_pb2.NODE_CREDENTIALS_STATE_ACTIVE
            stored = await controller.fleet.nodes.get(node.id)
            assert stored is not None
            assert controller.vault is not None
            assert decrypt_oauth_token(controller.vault, stored) == MARKER

            # running and enrolled: no process of its tree shows the token (nor the
            # enrollment token) in its environment block or command line
            tree = _tree(agent.pid)
            assert agent.pid in tree
            assert agent.poll() is None
            for pid in tree:
                for name in ("environ", "cmdline"):
                    shown = _proc(pid, name)
                    if shown is None:
                        assert os.geteuid() != 0 or not psutil.pid_exists(pid), (
                            f"/proc/{pid}/{name} unreadable"
                        )
                        continue
                    leaked = MARKER.encode() in shown  # a bool: a failure must not print the block
                    assert not leaked, f"/proc/{pid}/{name} holds the provider token"
                    leaked = enrollment.encode() in shown
                    assert not leaked, f"/proc/{pid}/{name} holds the enrollment token"
            if os.geteuid() == 0:  # the block is still there and well-formed: the rest is intact
                environ = psutil.Process(agent.pid).environ()
                assert environ.get(NEIGHBOUR[0]) == NEIGHBOUR[1]
                assert "A67_AGENT_OAUTH_TOKEN" not in environ
                assert "A67_AGENT_TOKEN" not in environ
    # the agent is stopped: nothing it wrote holds the token (the log and the data directory)
    assert agent.returncode == 0, log.read_text()
    assert _files_holding(agents_root, MARKER.encode()) == []
