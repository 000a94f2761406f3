"""The narrow interface through which the deployments harness talks to nodes.

Three commands over the node streams (:class:`~controller.nodes.streams`):
DeployReplica (waits for the replica to be healthy), StopReplica and
RemoveDeployment. A node that cannot be reached or refuses is reported, never
raised: the reconciler and the fence catch up with whatever did not happen.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Protocol

from automator67.v1 import node_pb2

from controller.deployments.plans import Stop
from controller.errors import ControllerError
from controller.redact import redact

log = logging.getLogger("a67.deployments")

STOP_TIMEOUT_SECONDS = 10.0
"""How long a StopReplica may take before it is given up (the fence catches stragglers)."""


class CommandSender(Protocol):
    """What the fleet's stream registry offers: one command to one node, answered."""

    async def send_command(
        self, node_id: str, command: node_pb2.NodeCommand, wait_seconds: float
    ) -> node_pb2.CommandResult: ...


class NodeCommands:
    """DeployReplica, StopReplica and RemoveDeployment to one node each."""

    def __init__(self, sender: Callable[[], CommandSender]) -> None:
        self._get_sender = sender

    @property
    def _sender(self) -> CommandSender:
        return self._get_sender()

    async def deploy(
        self, node_id: str, command: node_pb2.NodeCommand, wait_seconds: float
    ) -> tuple[str, str]:
        """Send a DeployReplica and wait: (endpoint, "") or ("", the reason it failed)."""
        try:
            result = await self._sender.send_command(node_id, command, wait_seconds)
        except ControllerError as exc:
            return "", exc.message
        if not result.ok:
            return "", redact(result.error_message) or "the node refused the replica"
        try:
            payload = json.loads(result.payload or b"{}")
        except ValueError:
            return "", "the node answered with a malformed payload"
        return (str(payload.get("endpoint", "")) if isinstance(payload, dict) else ""), ""

    async def stop(self, stop: Stop) -> bool:
        """StopReplica; False if the node could not be told."""
        command = node_pb2.NodeCommand(
            stop_replica=node_pb2.StopReplica(
                deployment_id=stop.deployment_id, replica_index=stop.replica_index, generation=stop.generation
            )
        )
        try:
            result = await self._sender.send_command(stop.node_id, command, STOP_TIMEOUT_SECONDS)
        except ControllerError as exc:
            log.info(
                "could not stop replica %s/%d on node %s: %s",
                stop.deployment_id,
                stop.replica_index,
                stop.node_id,
                exc.message,
            )
            return False
        if not result.ok:
            log.info(
                "node %s refused to stop %s/%d: %s",
                stop.node_id,
                stop.deployment_id,
                stop.replica_index,
                result.error_message,
            )
        return bool(result.ok)

    async def remove(self, node_id: str, deployment_id: str) -> bool:
        """RemoveDeployment: the node's replicas of the deleted deployment stopped and their
        directories removed; False if the node could not be told or failed."""
        command = node_pb2.NodeCommand(
            remove_deployment=node_pb2.RemoveDeployment(deployment_id=deployment_id)
        )
        try:
            result = await self._sender.send_command(node_id, command, STOP_TIMEOUT_SECONDS)
        except ControllerError as exc:
            log.info("could not remove deployment %s from node %s: %s", deployment_id, node_id, exc.message)
            return False
        if not result.ok:
            log.warning(
                "node %s could not remove deployment %s: %s", node_id, deployment_id, result.error_message
            )
        return bool(result.ok)
