"""Dropping the shards of a deleted database (the ``drop_database_shards`` command).

When a database is deleted the controller tells every node that held one of its
shards (primaries and replicas) to drop them; this module answers on the agent:

* **SQLite**: ``<data dir>/shards/<database id>/`` is removed with everything in it
  (each shard's ``.sqlite3`` file, its WAL and shared-memory files, and the redo logs of
  prepared transactions).
* **PostgreSQL** (``--shard-postgres-url``): every schema and LOGIN role of *this
  agent* (its tag, see :mod:`controller.agent.pg_shards`) that belongs to the database
  — found in the catalogue by name and comment, so no shard index needs to be known —
  is dropped: the role's sessions are ended (best effort), its prepared transactions
  rolled back, ``DROP SCHEMA … CASCADE``, ``DROP OWNED BY`` and ``DROP ROLE``. Shards of
  the same database kept by other agents on the same server have other tags and are
  left to those agents.

Dropping what is not there is no error, so the command is idempotent and the
controller may send it again (it retries until the node answers ``ok``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import psycopg
from automator67.v1 import node_pb2
from psycopg import sql

from controller.agent.handlers import CommandHandlers, error_result, ok_result
from controller.agent.pg_shards import ROLE_PREFIX, _redacted, _same_database, agent_tag, load_secret
from controller.agent.shards import ShardError

log = logging.getLogger(__name__)

_DATABASE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
LOCK_TIMEOUT = "10s"
"""How long a DROP may wait for a lock (an open transaction on the shard) before failing."""


def drop_sqlite_shards(data_dir: Path, database_id: str) -> bool:
    """Remove the database's SQLite shard directory; whether there was one."""
    directory = data_dir / "shards" / database_id
    existed = directory.exists()
    shutil.rmtree(directory, ignore_errors=True)
    if directory.exists():
        raise OSError(f"could not remove the shard files of database {database_id}")
    return existed


async def drop_postgres_shards(url: str, data_dir: Path, database_id: str) -> list[str]:
    """Drop this agent's schemas and roles of ``database_id``; the names dropped."""
    prefix = f"{ROLE_PREFIX}{agent_tag(load_secret(data_dir))}_"
    try:
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    except psycopg.Error as exc:
        raise OSError(f"cannot connect to the shard PostgreSQL: {_redacted(str(exc).strip(), url)}") from exc
    try:
        await conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
        like = prefix.replace("_", "\\_") + "%"
        schemas = await (
            await conn.execute(
                "SELECT nspname, obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname LIKE %s",
                (like,),
            )
        ).fetchall()
        roles = await (
            await conn.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (like,))
        ).fetchall()
        names = sorted(
            {str(name) for name, comment in schemas if _same_database(str(name), comment, database_id)}
            | {str(name) for (name,) in roles if _same_database(str(name), None, database_id)}
        )
        role_names = {str(name) for (name,) in roles}
        for name in names:
            await _drop_one(conn, name, is_role=name in role_names)
        return names
    except psycopg.Error as exc:
        raise OSError(f"dropping the shards failed: {_redacted(str(exc).strip(), url)}") from exc
    finally:
        await conn.close()


async def _drop_one(conn: psycopg.AsyncConnection[Any], name: str, *, is_role: bool) -> None:
    ident = sql.Identifier(name)
    if is_role:
        # end the role's sessions (the agent's own pooled connections as the shard) and its
        # prepared transactions, which would otherwise hold locks on the schema's tables
        try:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE usename = %s AND pid <> pg_backend_pid()",
                (name,),
            )
        except psycopg.Error as exc:
            log.info("could not end the sessions of %s: %s", name, type(exc).__name__)
        prepared = await (
            await conn.execute(
                "SELECT gid FROM pg_prepared_xacts WHERE owner = %s AND database = current_database()",
                (name,),
            )
        ).fetchall()
        for (gid,) in prepared:
            try:
                await conn.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))
            except psycopg.Error as exc:
                log.info("could not roll back prepared transaction of %s: %s", name, type(exc).__name__)
    await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(ident))
    if is_role:
        await conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(ident))
        await conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident))
    log.info("dropped PostgreSQL shard %s", name)


class ShardCleanup:
    """Answers ``drop_database_shards`` for the agent's shard backend (see the module docstring)."""

    def __init__(self, data_dir: Path, postgres_url: str = "") -> None:
        self._data_dir = Path(data_dir)
        self._postgres_url = postgres_url

    async def drop_database_shards(self, command: node_pb2.NodeCommand) -> node_pb2.CommandResult:
        database_id = command.drop_database_shards.database_id
        if not _DATABASE_ID.fullmatch(database_id):
            result = error_result(command, "invalid database_id")
            result.payload = json.dumps({"error_kind": "invalid"}).encode()
            return result
        try:
            removed = await asyncio.to_thread(drop_sqlite_shards, self._data_dir, database_id)
            dropped: list[str] = []
            if self._postgres_url:
                dropped = await drop_postgres_shards(self._postgres_url, self._data_dir, database_id)
        except (OSError, ShardError) as exc:
            log.warning("dropping the shards of database %s: %s", database_id, exc)
            result = error_result(command, str(exc))
            result.payload = json.dumps({"error_kind": "unavailable"}).encode()
            return result
        log.info("database %s: shards dropped (files: %s, schemas: %d)", database_id, removed, len(dropped))
        return ok_result(command, {"files_removed": removed, "schemas_dropped": len(dropped)})


def register_cleanup_handlers(
    handlers: CommandHandlers, data_dir: Path, postgres_url: str = ""
) -> ShardCleanup:
    """Answer ``drop_database_shards`` commands."""
    cleanup = ShardCleanup(data_dir, postgres_url)
    handlers.register("drop_database_shards", cleanup.drop_database_shards)
    return cleanup
