"""Dropping a deleted database's shards on its nodes (``DropDatabaseShards``).

:meth:`ShardDrops.drop` tells every node that held a shard of the database (primaries
and replicas) to drop its shards (SQLite files, PostgreSQL schemas and roles; see
:mod:`controller.agent.cleanup`) and waits for the nodes that are connected. A node
that is not connected, or that fails, is retried in the background until it answers
``ok``: while it is away the controller looks every :data:`OFFLINE_POLL_SECONDS` whether
it came back (a dictionary look-up, no message), and after a failed attempt on a
connected node it backs off from :data:`RETRY_MIN_SECONDS` doubling to
:data:`RETRY_MAX_SECONDS`. The pending drops live in the controller's memory: a
controller restart forgets them (the files stay on that node until it is dropped by
hand; see docs/databases.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from automator67.v1 import node_pb2

from controller.errors import ControllerError
from controller.nodes.sessions import StreamRegistry

log = logging.getLogger("a67.federation")

DROP_TIMEOUT_SECONDS = 30.0
OFFLINE_POLL_SECONDS = 1.0
RETRY_MIN_SECONDS = 1.0
RETRY_MAX_SECONDS = 60.0


def shard_nodes(replication: dict[str, Any] | None) -> list[str]:
    """Every node that holds a shard of the database (primary or replica)."""
    nodes: set[str] = set()
    for shard in (replication or {}).get("shards", []):
        nodes.add(str(shard.get("primary_node_id", "")))
        nodes.update(str(n) for n in shard.get("replica_node_ids", []))
    nodes.discard("")
    return sorted(nodes)


class ShardDrops:
    """Sends ``DropDatabaseShards`` and keeps retrying the nodes that did not confirm."""

    def __init__(self, streams: StreamRegistry) -> None:
        self._streams = streams
        self._tasks: set[asyncio.Task[None]] = set()
        self.pending: set[tuple[str, str]] = set()
        """(node id, database id) drops not yet confirmed."""

    async def drop(self, database_id: str, nodes: Iterable[str]) -> list[str]:
        """Tell ``nodes`` to drop the database's shards; the nodes left to retry."""
        nodes = list(nodes)
        done = await asyncio.gather(*(self._send(node, database_id) for node in nodes))
        left = [node for node, ok in zip(nodes, done, strict=True) if not ok]
        for node in left:
            self.pending.add((node, database_id))
            task = asyncio.create_task(self._retry(node, database_id), name=f"drop-{database_id}-{node}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return left

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _send(self, node_id: str, database_id: str) -> bool:
        command = node_pb2.NodeCommand(
            drop_database_shards=node_pb2.DropDatabaseShards(database_id=database_id)
        )
        try:
            result = await self._streams.send_command(node_id, command, DROP_TIMEOUT_SECONDS)
        except ControllerError as exc:
            log.info("database %s: node %s cannot drop its shards now: %s", database_id, node_id, exc.message)
            return False
        if not result.ok:
            log.warning(
                "database %s: node %s failed to drop its shards: %s",
                database_id,
                node_id,
                result.error_message,
            )
            return False
        log.info("database %s: node %s dropped its shards", database_id, node_id)
        return True

    async def _retry(self, node_id: str, database_id: str) -> None:
        delay = RETRY_MIN_SECONDS
        while True:
            if self._streams.get(node_id) is None:
                await asyncio.sleep(OFFLINE_POLL_SECONDS)
                continue
            if await self._send(node_id, database_id):
                self.pending.discard((node_id, database_id))
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_SECONDS)
