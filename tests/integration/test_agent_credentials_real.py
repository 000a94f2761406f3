"""A real agent process holds its provider token in memory only: it fetches the sealed
token after connecting, opens it, and the token appears nowhere on its disk or in its log
(issue 16's canary, the agent's side)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc

from tests.integration.test_deployments_real import Client, _until, processes
from tests.integration.test_node_api import _user
from tests.support import controller_settings, running_controller

MARKER = "gho_canary_7f3c1e9a2b4d6f8a0c1e3a5b"


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


async def test_the_agent_fetches_its_sealed_token_and_keeps_it_off_disk(tmp_path: Path) -> None:
    settings = controller_settings(tmp_path / "controller", heartbeat_interval_seconds=0.3)
    agents_root = tmp_path / "agents"
    agents_root.mkdir()
    with processes(agents_root) as procs:
        async with (
            running_controller(settings) as controller,
            grpc.aio.insecure_channel(controller.address) as channel,
        ):
            client = Client(channel, await _user(channel))
            enrollment = await client.enrollment(uses=1)
            args = [sys.executable, "-m", "controller.cli", "agent", "--data-dir", str(agents_root / "eu")]
            args += ["--region", "eu", "--controller", controller.address, "--node-types", "database"]
            procs.start(
                args, "agent-eu.log", {"A67_AGENT_TOKEN": enrollment, "A67_AGENT_OAUTH_TOKEN": MARKER}
            )
            await client.wait_ready(1)
            log = agents_root / "agent-eu.log"
            await _until(
                lambda: asyncio.to_thread(lambda: "holding the provider token version 1" in log.read_text()),
                "the agent to hold its provider token",
            )
    # the agent is stopped: nothing it wrote holds the token (its enrollment environment
    # variable is not a file; the log and the data directory are)
    assert _files_holding(agents_root, MARKER.encode()) == []
