"""A followed log goes after its replica when the replica moves: a real controller, two real
agent processes, a real app.

The replica's agent is killed (``kill -9``: the app dies with it) while ``GetReplicaLogs``
follows over gRPC and ``a67 logs -f`` follows in a subprocess; recovery starts the replica
on the other agent, and both followers receive the new replica's output — its start-up
line and a line it prints on request — from the new node, without being started again.
The gRPC follower is told that the old node's read ended and that the follow goes on; the
CLI says on stderr that the replica moved, and exits 0 on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
from automator67.v1 import deployment_pb2

from controller.deployments.logs import AGAIN
from tests.integration.test_app_logs_real import ROOT, _cli, _cli_env, deploy_running
from tests.integration.test_deployments_real import HEARTBEAT, Client, _body, _until, processes
from tests.support import bearer, controller_settings, running_controller


async def _async(value: bool) -> bool:
    return value


async def test_a_followed_log_goes_after_a_replica_that_moved(tmp_path: Path) -> None:
    settings = controller_settings(tmp_path / "controller", heartbeat_interval_seconds=HEARTBEAT)
    config = tmp_path / "config"
    with processes(tmp_path) as procs:
        async with (
            running_controller(settings) as controller,
            grpc.aio.insecure_channel(controller.address) as channel,
        ):
            address = controller.address
            made = await asyncio.to_thread(
                _cli, address, config, "register", "--email", "ada@example.com", "--password-stdin",
                stdin="correct horse battery staple\n",
            )  # fmt: skip
            assert made.returncode == 0, made.stderr
            token = json.loads((config / "credentials.json").read_text())[address]["access_token"]
            client = Client(channel, token)
            enrollment = await client.enrollment(uses=2)
            base = 40000 + (os.getpid() % 50) * 40
            agents = {
                region: procs.agent(address, enrollment, region, (base + i * 20, base + i * 20 + 19))
                for i, region in enumerate(("eu-west", "us-east"))
            }
            nodes = await client.wait_ready(2)
            region_of = {n.id: n.region for n in nodes}
            d = await deploy_running(client)
            before = d.node_assignments[0]

            # Two followers: the RPC itself, and the CLI.
            follow = client.deployments.GetReplicaLogs(
                deployment_pb2.GetReplicaLogsRequest(deployment_id=d.id, follow=True, tail_lines=5),
                metadata=bearer(client.token),
            )
            batches: list[deployment_pb2.GetReplicaLogsResponse] = []

            async def read_follow() -> None:
                async for batch in follow:
                    batches.append(batch)

            def lines_from(node_id: str) -> list[str]:
                return [line.text for b in batches if b.node_id == node_id for line in b.lines]

            reader = asyncio.create_task(read_follow())
            out_path, err_path = tmp_path / "follow.out", tmp_path / "follow.err"
            with out_path.open("wb") as out, err_path.open("wb") as err:
                cli = subprocess.Popen(  # noqa: ASYNC220 - it runs while the test reads its output
                    [sys.executable, "-m", "controller.cli", "logs", "logs", "-f", "--tail", "5"],
                    stdout=out,
                    stderr=err,
                    env=_cli_env(address, config),
                    cwd=ROOT,
                )
            try:
                await _until(
                    lambda: _async("hello from the logs app" in lines_from(before.node_id)),
                    "the followed log's first lines",
                    within=60,
                )
                await _until(
                    lambda: _async("hello from the logs app" in out_path.read_text()),
                    "a67 logs -f to print the first lines",
                    within=60,
                )

                # kill -9 the replica's agent: recovery starts the replica on the other one.
                killed = agents[region_of[before.node_id]]
                killed.send_signal(signal.SIGKILL)
                await asyncio.to_thread(killed.wait)
                d = await client.wait(
                    d.id,
                    lambda d: any(
                        a.replica_index == 0 and a.node_id != before.node_id and a.status == "running"
                        for a in d.node_assignments
                    ),
                    "replica 0 running on the other node",
                    within=60,
                )
                after = d.node_assignments[0]
                assert after.generation > before.generation

                # The same follow now carries the new replica's output, from its new node.
                await _until(
                    lambda: _async("hello from the logs app" in lines_from(after.node_id)),
                    "the moved replica's first line on the same follow",
                    within=60,
                )
                assert await _body(f"{after.endpoint}/say/after-the-move") == "ok"
                await _until(
                    lambda: _async("said after-the-move" in lines_from(after.node_id)),
                    "a line the moved replica printed, on the same follow",
                )
                assert all(b.generation == after.generation for b in batches if b.node_id == after.node_id)

                def old_read_ended() -> list[str]:
                    return [
                        b.error_message for b in batches if b.node_id == before.node_id and b.error_message
                    ]

                # the old node's read ends when the controller sees its push call break: not
                # necessarily before the new replica's lines (a loaded machine reorders them)
                await _until(lambda: _async(bool(old_read_ended())), "the old node's read to end", within=60)
                ended = old_read_ended()
                assert all(message.endswith(AGAIN) for message in ended), ended
                assert not reader.done()

                # The CLI: the new lines, and a note that the replica moved.
                await _until(
                    lambda: _async("[0] said after-the-move" in out_path.read_text()),
                    "a67 logs -f to print the moved replica's line",
                    within=60,
                )
                assert f"moved from node {before.node_id} to node {after.node_id}" in err_path.read_text()
                cli.send_signal(signal.SIGINT)
                code = await asyncio.to_thread(cli.wait, 60)
                assert code == 0, err_path.read_text()
            finally:
                if cli.poll() is None:
                    cli.kill()
                    cli.wait()
                follow.cancel()
                await asyncio.gather(reader, return_exceptions=True)
            assert controller.replica_logs is not None
            await _until(lambda: _async(len(controller.replica_logs.slots) == 0), "the followed reads to end")
