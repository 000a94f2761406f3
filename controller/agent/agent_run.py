"""Running the agent: :func:`run_agent` wires the command handlers (shards, cleanup of
deleted databases, replicas and their logs, chunks on storage nodes) and the provider
token (:class:`_ProviderCredentials`) to an :class:`~controller.agent.client.Agent`, and
runs it until SIGTERM or SIGINT. ``a67 agent`` (:mod:`controller.agent.cli`) calls it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from automator67.v1 import node_pb2

from controller.agent.chunks import DEFAULT_SCRUB_INTERVAL_SECONDS, StorageAgent, storage_message_options
from controller.agent.cleanup import register_cleanup_handlers
from controller.agent.client import Agent, AgentConfig
from controller.agent.credentials import AgentCredentials, CredentialsError
from controller.agent.handlers import CommandHandlers
from controller.agent.replica_logs import ReplicaLogReader, register_log_handlers
from controller.agent.replicas import DEFAULT_PORT_RANGE, ReplicaSupervisor, register_replica_handlers
from controller.agent.shards import ShardStore, register_shard_handlers

log = logging.getLogger("controller.agent")


class _ProviderCredentials:
    """The node's provider token (:class:`AgentCredentials`), made once the agent knows its
    node id: fetched after each connect (so after a restart too) and when the controller
    announces a new version (``credentials_changed``). Nothing is stored on disk."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self._held: AgentCredentials | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _holder(self) -> AgentCredentials | None:
        node_id = self._agent.node_id
        if self._held is None and node_id:
            self._held = AgentCredentials(
                node_id=node_id,
                private_key=self._agent.identity.key(),
                fetch=self._agent.fetch_node_credentials,
            )
        return self._held

    def connected(self) -> None:
        holder = self._holder()
        if holder is None:
            return

        async def fetch() -> None:
            try:
                await holder.refresh()
            except CredentialsError as exc:  # none registered, revoked, or the controller has none
                log.info("no provider token for this node: %s", exc)
            except Exception:
                log.warning("fetching the provider token failed", exc_info=True)

        task = asyncio.create_task(fetch(), name="agent-credentials")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def changed(self, command: node_pb2.NodeCommand) -> node_pb2.CommandResult:
        holder = self._holder()
        if holder is None:
            return node_pb2.CommandResult(
                command_id=command.command_id, ok=False, error_message="the agent is not enrolled yet"
            )
        return await holder.on_credentials_changed(command)


async def run_agent(
    config: AgentConfig,
    *,
    shard_postgres_url: str = "",
    advertise_host: str = "127.0.0.1",
    replica_port_range: tuple[int, int] = DEFAULT_PORT_RANGE,
    replica_uids: tuple[int, int] | None = None,
    replica_root: Path | None = None,
    replica_python: str = sys.executable,
    scrub_interval_seconds: float = DEFAULT_SCRUB_INTERVAL_SECONDS,
) -> int:
    """Run an :class:`Agent` until SIGTERM or SIGINT; its exit code.

    Replicas (``deploy_replica``/``stop_replica``) are run by a :class:`ReplicaSupervisor`
    whose states ride every hello and heartbeat; on the way out every replica is stopped.
    """
    handlers = CommandHandlers()
    shards = ShardStore(config.data_dir, shard_postgres_url)
    register_shard_handlers(handlers, shards)
    register_cleanup_handlers(handlers, config.data_dir, shard_postgres_url)  # deleted databases
    supervisor = ReplicaSupervisor(
        config.data_dir,
        advertise_host=advertise_host,
        port_range=replica_port_range,
        root=replica_root,
        uid_range=replica_uids,
        python=replica_python,
    )
    await asyncio.to_thread(supervisor.reap_orphans)
    await asyncio.to_thread(supervisor.secure_leftovers)
    register_replica_handlers(handlers, supervisor)
    log_reader = ReplicaLogReader(supervisor)
    register_log_handlers(handlers, log_reader)  # replicas' logs (read_replica_logs)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        agent = Agent(config, handlers=handlers, replicas=supervisor.states)
        supervisor.packages.fetch = agent.fetch_package
        shards.open_push = agent.open_shard_push  # shard results' data path (PushShardResult)
        shards.fetch_statement = agent.fetch_statement  # long SQL texts (FetchStatement)
        log_reader.open_push = agent.open_log_push  # replicas' logs' data path (PushReplicaLogs)
        agent.on_connected.append(shards.stream_replaced)
        credentials = _ProviderCredentials(agent)  # the provider token, in memory only
        handlers.register("credentials_changed", credentials.changed)
        agent.on_connected.append(credentials.connected)
        if "storage" in config.node_types:  # chunks of files (controller/agent/chunks.py)
            storage = StorageAgent(
                config.data_dir,
                lambda: agent.storage_channel(storage_message_options()),
                scrub_interval_seconds=scrub_interval_seconds,
            )
            storage.register(handlers)
            agent.on_connected.append(storage.connected)
        return await agent.run(stop)
    finally:
        await supervisor.close()
        await shards.close()
        for sig in installed:
            loop.remove_signal_handler(sig)
