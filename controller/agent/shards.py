"""Database shards served by the agent: real SQLite files by default, PostgreSQL when configured.

The controller never executes user SQL itself: it sends each shard its statement
as an ``execute_shard_statement`` command, and the agent runs it here.

* **SQLite** (default): one file per shard,
  ``<data dir>/shards/<database id>/<shard index>.sqlite3``, WAL mode, one
  connection per shard used from one worker thread at a time. A statement is
  interrupted when its deadline passes (SQLite's progress handler).
* **PostgreSQL** (``--shard-postgres-url``): one schema per shard,
  ``a67s<agent tag>_<database id>_<shard index>`` (created on first use). With a
  privileged URL every shard has a LOGIN role of its own that owns exactly that
  schema, and statements run on a connection made *as* that role; with an
  unprivileged URL the agent serves the shards of one database only (see
  :mod:`controller.agent.pg_shards`). ``statement_timeout`` enforces the deadline.

The result payload is :func:`controller.wire.encode_result`. A failure is a
``CommandResult`` with ``ok=False``, the database's own message, and a payload
``{"error_kind": …}`` — ``constraint`` (a constraint was violated: not
retryable), ``invalid`` (the statement is wrong for this shard: not retryable),
``timeout`` (the deadline passed) or ``unavailable`` (the shard's database could
not be reached: retryable on a replica).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from automator67.v1 import node_pb2

from controller.agent.handlers import CommandHandlers
from controller.wire import encode_result

log = logging.getLogger(__name__)

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Deadline used when a command gives none.
DEFAULT_TIMEOUT_MS = 30_000


class ShardError(Exception):
    """A statement failed on its shard."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _type_of(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "BOOLEAN"
    if isinstance(value, int):
        return "INTEGER"
    if isinstance(value, float):
        return "REAL"
    if isinstance(value, bytes):
        return "BLOB"
    return "TEXT"


class _SqliteShard:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA foreign_keys=ON")

    def run(self, sql: str, deadline: float) -> tuple[list[tuple[str, str]], list[tuple[Any, ...]], int]:
        with self.lock:
            self.conn.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 1000)
            try:
                cursor = self.conn.execute(sql)
                rows = cursor.fetchall()
                names = [d[0] for d in cursor.description or ()]
                types = ["NULL"] * len(names)
                for row in rows:  # the first non-NULL value of each column gives its type
                    for i, value in enumerate(row):
                        if types[i] == "NULL" and value is not None:
                            types[i] = _type_of(value)
                return list(zip(names, types, strict=True)), rows, cursor.rowcount
            except sqlite3.IntegrityError as exc:
                raise ShardError("constraint", str(exc)) from exc
            except sqlite3.OperationalError as exc:
                if "interrupted" in str(exc):
                    raise ShardError("timeout", "the statement passed its deadline") from exc
                raise ShardError("invalid", str(exc)) from exc
            except (sqlite3.ProgrammingError, sqlite3.DataError, sqlite3.Warning) as exc:
                raise ShardError("invalid", str(exc)) from exc
            finally:
                self.conn.set_progress_handler(None, 0)

    def close(self) -> None:
        self.conn.close()


class ShardStore:
    """The shards this agent serves."""

    def __init__(self, data_dir: Path, postgres_url: str = "") -> None:
        self._root = data_dir / "shards"
        self._postgres_url = postgres_url
        self._sqlite: dict[tuple[str, int], _SqliteShard] = {}
        self._pg: dict[tuple[str, int], Any] = {}
        self._pg_lock = asyncio.Lock()
        self._pg_shards: Any = None  # a pg_shards.PostgresShards, made on first use

    @property
    def backend(self) -> str:
        return "postgres" if self._postgres_url else "sqlite"

    async def execute(
        self, database_id: str, shard_index: int, sql: str, timeout_ms: int
    ) -> tuple[list[tuple[str, str]], list[tuple[Any, ...]], int]:
        if not _ID.match(database_id) or not 0 <= shard_index < 4096:
            raise ShardError("invalid", "bad database id or shard index")
        timeout = (timeout_ms or DEFAULT_TIMEOUT_MS) / 1000
        if self._postgres_url:
            return await self._execute_pg(database_id, shard_index, sql, timeout)
        key = (database_id, shard_index)
        shard = self._sqlite.get(key)
        if shard is None:
            shard = self._sqlite[key] = _SqliteShard(self._root / database_id / f"{shard_index}.sqlite3")
        return await asyncio.to_thread(shard.run, sql, time.monotonic() + timeout)

    async def _execute_pg(
        self, database_id: str, shard_index: int, sql: str, limit_seconds: float
    ) -> tuple[list[tuple[str, str]], list[tuple[Any, ...]], int]:
        import psycopg
        from psycopg import errors as pg_errors

        from controller.agent.pg_shards import PostgresShards

        key = (database_id, shard_index)
        async with self._pg_lock:
            conn = self._pg.get(key)
            if conn is None or conn.closed:
                if self._pg_shards is None:
                    self._pg_shards = PostgresShards(self._postgres_url, self._root.parent)
                conn = await self._pg_shards.open(database_id, shard_index)
                self._pg[key] = conn
        try:
            async with conn.cursor() as cursor:
                await cursor.execute(f"SET statement_timeout = {max(1, int(limit_seconds * 1000))}")
                await cursor.execute(sql.encode())
                rows = [tuple(r) for r in await cursor.fetchall()] if cursor.description else []
                columns = []
                for d in cursor.description or ():
                    info = psycopg.adapters.types.get(d.type_code)
                    columns.append((d.name, info.name if info else str(d.type_code)))
                return columns, rows, cursor.rowcount
        except pg_errors.QueryCanceled as exc:
            raise ShardError("timeout", "the statement passed its deadline") from exc
        except psycopg.errors.IntegrityError as exc:
            raise ShardError("constraint", str(exc).strip()) from exc
        except psycopg.OperationalError as exc:
            raise ShardError("unavailable", str(exc).strip()) from exc
        except psycopg.Error as exc:
            raise ShardError("invalid", str(exc).strip()) from exc

    async def close(self) -> None:
        for shard in self._sqlite.values():
            shard.close()
        self._sqlite.clear()
        for conn in self._pg.values():
            await conn.close()
        self._pg.clear()
        if self._pg_shards is not None:
            await self._pg_shards.close()
            self._pg_shards = None


def register_shard_handlers(handlers: CommandHandlers, store: ShardStore) -> None:
    """Answer ``execute_shard_statement`` commands from ``store``."""

    async def execute_shard_statement(command: node_pb2.NodeCommand) -> node_pb2.CommandResult:
        request = command.execute_shard_statement
        try:
            columns, rows, rowcount = await store.execute(
                request.database_id, request.shard_index, request.sql, request.timeout_ms
            )
        except ShardError as exc:
            return node_pb2.CommandResult(
                command_id=command.command_id,
                ok=False,
                error_message=str(exc),
                payload=json.dumps({"error_kind": exc.kind}).encode(),
            )
        return node_pb2.CommandResult(
            command_id=command.command_id, ok=True, payload=encode_result(columns, rows, rowcount)
        )

    handlers.register("execute_shard_statement", execute_shard_statement)
