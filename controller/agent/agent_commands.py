"""The agent's commands and their results: commands run as tasks owned by the agent, not
by one connection; results go through the stream's outbox, or wait for the next
connection (see :mod:`controller.agent.client`).
"""

from __future__ import annotations

import asyncio
import logging

from automator67.v1 import node_pb2

from controller.agent.agent_config import _AgentState
from controller.agent.agent_node_port import REPLY_TO

log = logging.getLogger("controller.agent")

_PRIORITY_HEARTBEAT = 0
_PRIORITY_RESULT = 1
_MAX_UNDELIVERED_RESULTS = 1000
_MAX_REMEMBERED_RESULTS = 256


class _Commands(_AgentState):
    """Running the controller's commands and delivering their results."""

    def _start_command(self, command: node_pb2.NodeCommand) -> None:
        command_id = command.command_id
        if command_id in self._running:
            log.info("command %s is already running; not starting it twice", command_id)
            return
        if command_id in self._recent:
            log.info("command %s already ran; sending its result again", command_id)
            self._deliver(self._recent[command_id])
            return
        key = command_id or f"<anonymous {next(self._tiebreak)}>"
        task = asyncio.create_task(self._run_command(command), name=f"agent-command-{key}")
        self._running[key] = task
        task.add_done_callback(lambda _: self._running.pop(key, None))

    async def _run_command(self, command: node_pb2.NodeCommand) -> None:
        REPLY_TO.set(command.reply_to)  # this task's (and its children's) calls go there
        result = await self.handlers.dispatch(command, self.metrics.counters)
        if command.command_id:
            self._recent[command.command_id] = result
            while len(self._recent) > _MAX_REMEMBERED_RESULTS:
                self._recent.popitem(last=False)
        self._deliver(result)

    def _deliver(self, result: node_pb2.CommandResult) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(
                (_PRIORITY_RESULT, next(self._tiebreak), node_pb2.ConnectRequest(result=result))
            )
        else:
            self._undelivered.append(result)

    async def _cancel_commands(self) -> None:
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
