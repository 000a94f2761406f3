"""Scale-out with real processes (scripts/scale_out.py): two ``a67 serve`` with
``A67_SCALE_OUT=1`` on PostgreSQL and Redis, two agents. The controller holding the
nodes' streams is killed with SIGKILL: every node reconnects to the other controller,
none is ever reported failed, and the user's CLI, pointed at the survivor, lists them
ready (or busy).
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path

import psycopg
import pytest

from tests.support import scale_out_script

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.postgres

SERVING = ("NODE_STATUS_READY", "NODE_STATUS_BUSY")
"""Ready, or busy (real agents report the machine's CPU, above 90 % on a loaded machine)."""


def _connected_after(log: Path, node_address: str, after: float) -> bool:
    marker = f"connected to {node_address} as node"
    for line in log.read_text(errors="replace").splitlines():
        if marker in line and datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp() > after:
            return True
    return False


async def test_nodes_survive_the_sigkill_of_their_controller(
    tmp_path: Path, postgres_admin_url: str, redis_server_url: str
) -> None:
    scale_out = scale_out_script()
    topology = scale_out.Topology(
        tmp_path, controllers=2, postgres_admin_url=postgres_admin_url, redis_url=redis_server_url
    )
    try:
        await topology.start()
        token = await topology.enrollment(2)
        topology.add_agent(token)
        topology.add_agent(token)

        async def nodes() -> list[dict[str, str]]:
            listed = await asyncio.to_thread(topology.cli, "nodes", "--json")
            assert listed.returncode == 0, listed.stderr
            return list(json.loads(listed.stdout).get("nodes", []))

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while sum(n.get("status") in SERVING for n in await nodes()) < 2:
            assert loop.time() < deadline, "the agents never became ready"
            await asyncio.sleep(0.2)
        first, second = topology.controllers
        # both controllers know each other and the nodes were told (each refreshes every 5 s)
        told = f"controllers: {first.node_address}, {second.node_address}"
        logs = [tmp_path / f"agent-{i}.log" for i in range(2)]
        while not all(told in log.read_text() for log in logs):
            assert loop.time() < deadline, "the nodes never heard of the second controller"
            await asyncio.sleep(0.2)

        killed_at = datetime.now().timestamp()
        first.kill()  # SIGKILL: no drain, its row stays behind
        topology.controllers.reverse()  # the CLI talks to the survivor from now on
        statuses: list[str] = []
        deadline = loop.time() + 120
        while not all(_connected_after(log, second.node_address, killed_at) for log in logs):
            statuses.extend(n.get("status", "") for n in await nodes())
            assert loop.time() < deadline, "the nodes did not reconnect to the survivor"
            await asyncio.sleep(0.2)
        listed = await nodes()
        statuses.extend(n.get("status", "") for n in listed)
        assert [n.get("status") in SERVING for n in listed] == [True, True]
        assert "NODE_STATUS_FAILED" not in statuses
        with psycopg.connect(topology.plain_url) as db:
            holders = db.execute("SELECT DISTINCT stream_holder FROM nodes").fetchall()
        assert holders == [(second.controller_id,)]
    finally:
        topology.stop()
