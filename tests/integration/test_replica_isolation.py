"""A deployed app tries to steal its agent's secrets; nothing reaches its owner.

A real controller, a real agent process (enrollment token and a shard PostgreSQL URL
with a password in its environment, as an operator would start it) and a real
``command`` replica that reads ``/proc/$PPID/cmdline``, ``/proc/$PPID/environ`` and the
agent's ``node.key``, prints all of it and exits 1: its output comes back in
``GetDeployment``'s ``error_message``, and none of the secrets may be in it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
from automator67.v1 import common_pb2, deployment_pb2, deployment_pb2_grpc, node_pb2, node_pb2_grpc

from tests.integration.test_deployments import _until, manifest, source_tar_gz
from tests.integration.test_node_api import _user
from tests.support import bearer, controller_settings, running_controller

DB_PASSWORD = "Pg-Passw0rd-f00d-4242"

ATTACK = """\
echo "ATTACK-BEGIN uid=$(id -u)"
echo "cmdline:"; tr '\\0' ' ' < /proc/$PPID/cmdline 2>&1; echo
echo "environ:"; tr '\\0' '\\n' < /proc/$PPID/environ 2>&1
echo "key:"; cat "$AGENT_KEY" 2>&1
echo "key-by-proc-root:"; cat "/proc/$PPID/root$AGENT_KEY" 2>&1
echo "ATTACK-END"
exit 1
"""


async def test_a_replica_cannot_read_its_agents_secrets(tmp_path: Path) -> None:
    settings = controller_settings(tmp_path / "controller", heartbeat_interval_seconds=0.3)
    data_dir = tmp_path / "agent"
    async with (
        running_controller(settings) as controller,
        grpc.aio.insecure_channel(controller.address) as channel,
    ):
        token = await _user(channel)
        nodes = node_pb2_grpc.NodeServiceStub(channel)
        deployments = deployment_pb2_grpc.DeploymentServiceStub(channel)
        enrollment = (
            await nodes.CreateEnrollmentToken(
                node_pb2.CreateEnrollmentTokenRequest(max_uses=5), metadata=bearer(token)
            )
        ).token
        env = {k: v for k, v in os.environ.items() if not k.startswith("A67_")}
        env["A67_AGENT_TOKEN"] = enrollment
        env["A67_AGENT_SHARD_POSTGRES_URL"] = f"postgresql://postgres:{DB_PASSWORD}@127.0.0.1:5432/test"
        args = [sys.executable, "-m", "controller.cli", "agent", "--data-dir", str(data_dir)]
        args += ["--controller", controller.address, "--region", "eu-west", "--advertise-host", "127.0.0.1"]
        log_path = tmp_path / "agent.log"
        with log_path.open("wb") as agent_log:
            agent = subprocess.Popen(args, stdout=agent_log, stderr=subprocess.STDOUT, env=env)  # noqa: ASYNC220
        try:

            async def ready() -> bool:
                listed = (await nodes.ListNodes(node_pb2.ListNodesRequest(), metadata=bearer(token))).nodes
                return len(listed) == 1 and listed[0].status in (
                    common_pb2.NODE_STATUS_READY,
                    common_pb2.NODE_STATUS_BUSY,  # a real agent on a loaded machine
                )

            await _until(ready, "a ready agent", within=60)
            key_pem = (data_dir / "node.key").read_bytes()
            key_body = b"".join(key_pem.splitlines()[1:-1]).decode()
            m = manifest(
                name="thief",
                replicas=1,
                runtime="command",
                entrypoint="sh attack.sh",
                app_type=deployment_pb2.APP_TYPE_WORKER,
                env={"AGENT_KEY": str(data_dir / "node.key")},
                resources=deployment_pb2.Resources(memory="64MB", cpu="0.1"),
            )
            created = await deployments.CreateDeployment(
                deployment_pb2.CreateDeploymentRequest(
                    manifest=m, source_tar_gz=source_tar_gz({"attack.sh": ATTACK})
                ),
                metadata=bearer(token),
            )
            got: list[deployment_pb2.Deployment] = []

            async def reported() -> bool:
                reply = await deployments.GetDeployment(
                    deployment_pb2.GetDeploymentRequest(deployment_id=created.deployment_id),
                    metadata=bearer(token),
                )
                got[:] = [reply.deployment]
                return any("ATTACK-END" in a.error_message for a in reply.deployment.node_assignments)

            await _until(reported, "the attack's output in GetDeployment", within=60)
            messages = "\n".join(a.error_message for a in got[0].node_assignments)
            assert enrollment not in messages
            assert DB_PASSWORD not in messages
            assert key_body[:40] not in messages
            assert "PRIVATE KEY" not in messages
            for line in key_pem.decode().splitlines()[1:-1]:
                assert line not in messages
            assert "ATTACK-BEGIN uid=" in messages  # the app did run
            assert "cmdline:" in messages
            assert "Permission denied" in messages  # /proc/<agent>/environ is closed
            if os.geteuid() == 0:  # replicas run as their own users
                uid = int(messages.split("ATTACK-BEGIN uid=")[1].split()[0])
                assert uid >= 200000
            agent_log_text = log_path.read_text()
            assert enrollment not in agent_log_text
            assert DB_PASSWORD not in agent_log_text
        finally:
            if agent.poll() is None:
                agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(timeout=10)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
