"""Federated databases: registry, schema management and query execution (spec §4.5).

Transport-free logic behind ``QueryService``. The controller never executes user
SQL itself: statements are planned by :mod:`controller.federation.query` and run on
agents by :class:`~controller.federation.shards.NodeShardExecutor`.

Ownership: a database the caller does not own and a database that does not exist
give the same ``PERMISSION_DENIED`` (spec §4.5: 403), so ids reveal nothing.

Schema: after every DDL statement the schema is read back from shard 0's primary
and recorded in ``schema_info`` (with a version that invalidates cached plans); it is
cached as ``db:schema:{db_id}`` for 24 hours (spec §7).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from automator67.v1 import query_pb2
from google.protobuf import json_format

from controller.cache.base import Cache
from controller.errors import (
    ControllerError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    require_fields,
)
from controller.federation.cleanup import ShardDrops, shard_nodes
from controller.federation.query import (
    Plan,
    PlanCache,
    QueryResult,
    ShardError,
    ShardLayout,
    StatementKind,
    declared_collations,
    execute,
    is_binary,
    key_type_from_sql,
    layout_from_proto,
)
from controller.federation.query.execute import execute_stream
from controller.federation.query.merge import GroupedMerge, RowsMerge
from controller.federation.query.workers import MergeWorkers
from controller.federation.repository import DatabaseRepository
from controller.federation.results import ShardResults
from controller.federation.shards import (
    MemoryWriteLog,
    NodeShardExecutor,
    ReplicationState,
    ResultCaps,
    StoreWriteLog,
    WriteLog,
    log_write,
)
from controller.federation.transactions import Transaction, TransactionManager
from controller.nodes.repository import NodeRepository
from controller.nodes.sessions import StreamRegistry
from controller.store.db import Store
from controller.store.models import DatabaseInstance
from controller.timestamps import timestamp
from controller.vault import Vault
from controller.wire import api_row as _json_row
from controller.wire import encode_stream_batch as _encode_batch

log = logging.getLogger("a67.federation")

DIALECTS = ("sqlite", "postgres")
PROVIDERS = ("sqlite", "postgresql", "supabase", "mongodb", "firebase")
NAME = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$")
MAX_SHARDS = 64
MAX_CREDENTIALS_BYTES = 8192
# Default and largest per-request deadline (spec §4.5: 30 s).
DEFAULT_TIMEOUT_MS = 30_000
MAX_TIMEOUT_MS = 300_000
# The largest result one ExecuteQuery response carries; larger ones stream (StreamQuery).
MAX_RESULT_ROWS = 100_000
# What one shard statement of an ExecuteQuery may return when the merge may shrink it
# (GROUP BY, DISTINCT): rows, and encoded bytes.
COLLECT_SHARD_ROWS = 10 * MAX_RESULT_ROWS
COLLECT_SHARD_BYTES = 256 * 1024 * 1024
# What one shard statement of a StreamQuery may return (the agent's cap).
STREAM_SHARD_ROWS = 1_000_000_000
STREAM_SHARD_BYTES = 64 * 1024**3
STREAM_CAPS = ResultCaps(STREAM_SHARD_ROWS, STREAM_SHARD_BYTES)
# The longest SQL text accepted (refused before parsing).
DEFAULT_MAX_QUERY_BYTES = 1024 * 1024
# Results of more rows than this are turned into the response in a worker thread.
THREAD_ENCODE_ROWS = 2_000
# Encoded bytes aimed at per StreamQuery message.
STREAM_MESSAGE_BYTES = 256 * 1024
# TTL of db:schema:{db_id} (spec §7: 24 hours).
SCHEMA_CACHE_SECONDS = 24 * 3600.0
# How long a statement's ownership check (the database row) is remembered, and for how many.
OWNED_ROW_SECONDS = 2.0
OWNED_ROWS_MAX = 10_000

_SCHEMA_SQL = {
    "sqlite": (
        'SELECT m.name, p.name, p.type, p."notnull", CASE WHEN p.cid = 0 THEN m.sql END '
        "FROM sqlite_master m, pragma_table_info(m.name) p "
        "WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' AND m.name NOT LIKE '\\_a67\\_%' ESCAPE '\\' "
        "ORDER BY m.name, p.cid"
    ),
    "postgres": (
        "SELECT table_name, column_name, data_type, CASE WHEN is_nullable = 'NO' THEN 1 ELSE 0 END, "
        "collation_name FROM information_schema.columns WHERE table_schema = current_schema() "
        "ORDER BY table_name, ordinal_position"
    ),
}


@dataclass
class _Loaded:
    row: DatabaseInstance
    layout: ShardLayout
    replication: ReplicationState
    tables: dict[str, list[str]]
    schema_version: int
    collations: dict[str, dict[str, str]]


def _derive(
    row: DatabaseInstance, schema_info: dict[str, Any]
) -> tuple[ShardLayout, dict[str, list[str]], int, dict[str, dict[str, str]]]:
    """The layout, tables' columns, schema version and collations of a database."""
    tables = {t["name"]: [c["name"] for c in t["columns"]] for t in schema_info.get("tables", [])}
    collations = {
        t["name"]: {c["name"]: c["collation"] for c in t["columns"] if c.get("collation")}
        for t in schema_info.get("tables", [])
    }
    sharding = json_format.ParseDict(row.sharding or {}, query_pb2.Sharding())
    key_type = _key_type(schema_info.get("tables", []), sharding.sharding_key)
    layout = layout_from_proto(sharding, key_type=key_type)
    return layout, tables, int(schema_info.get("version", 0)), collations


class DatabaseService:
    def __init__(
        self,
        *,
        databases: DatabaseRepository,
        nodes: NodeRepository,
        streams: StreamRegistry,
        vault: Vault,
        cache: Cache,
        transactions: TransactionManager | None = None,
        shard_results: ShardResults | None = None,
        max_query_bytes: int = DEFAULT_MAX_QUERY_BYTES,
        stream_caps: ResultCaps = STREAM_CAPS,
        max_result_rows: int = MAX_RESULT_ROWS,
        collect_shard_bytes: int = COLLECT_SHARD_BYTES,
        merge_workers: MergeWorkers | None = None,
        write_log: WriteLog | None = None,
        shared_write_order: bool = False,
    ) -> None:
        self._databases = databases
        self._shared_write_order = shared_write_order
        """Several controllers serve the store: writes to a database with replicas are
        ordered across them (:meth:`DatabaseRepository.write_order`)."""
        self.write_log: WriteLog = write_log if write_log is not None else _write_log_of(databases)
        """The shards' write logs replayed to stale replicas: in the store, beside the databases."""
        self.shard_results = shard_results if shard_results is not None else ShardResults()
        """Where shard statements' rows arrive (fed by ``NodeService.PushShardResult``)."""
        self._max_query_bytes = max_query_bytes
        self._stream_caps = stream_caps
        self._max_result_rows = max_result_rows
        self._collect_shard_bytes = collect_shard_bytes
        self._merge_workers = merge_workers
        """Processes that merge StreamQuery rows off this process's GIL (None: a thread)."""
        self._plan_lock = threading.Lock()
        self.transactions = transactions
        self._nodes = nodes
        self._streams = streams
        self._vault = vault
        self._cache = cache
        self._plans = PlanCache()
        self._replication: dict[str, ReplicationState] = {}
        # (user, database) -> (until, row): the ownership check of _load, a store read per
        # statement otherwise (issue 12). Forgotten on delete; another controller's delete
        # is seen within OWNED_ROW_SECONDS.
        self._owned_rows: dict[tuple[str, str], tuple[float, DatabaseInstance]] = {}
        # What each query needs of a database's row and schema (layout, columns, collations),
        # worked out once per row read and schema text rather than on every query.
        self._derived: dict[
            str,
            tuple[DatabaseInstance, bytes, ShardLayout, dict[str, list[str]], int, dict[str, dict[str, str]]],
        ] = {}
        self.shard_drops = ShardDrops(streams)
        """Drops a deleted database's shards on its nodes (controller/federation/cleanup.py)."""

    # -- registry -----------------------------------------------------------------------

    async def create(self, user_id: str, request: query_pb2.CreateDatabaseRequest) -> DatabaseInstance:
        violations: list[FieldViolation] = []
        if not NAME.match(request.name):
            violations.append(
                FieldViolation(
                    "name", "must be 1-63 of a-z, 0-9, '_' and '-', starting with a letter or digit"
                )
            )
        provider = request.provider or "sqlite"
        if provider not in PROVIDERS:
            violations.append(FieldViolation("provider", f"must be one of {', '.join(PROVIDERS)}"))
        dialect = request.dialect or "sqlite"
        if dialect not in DIALECTS:
            violations.append(FieldViolation("dialect", "must be sqlite or postgres"))
        if len(request.credentials.encode()) > MAX_CREDENTIALS_BYTES:
            violations.append(FieldViolation("credentials", f"must be at most {MAX_CREDENTIALS_BYTES} bytes"))
        count = request.sharding.shard_count
        if not 1 <= count <= MAX_SHARDS:
            violations.append(FieldViolation("sharding.shard_count", f"must be between 1 and {MAX_SHARDS}"))
        if not request.sharding.sharding_key:
            violations.append(FieldViolation("sharding.sharding_key", "is required"))
        placements = {p.shard_index: p for p in request.shards}
        if (count and sorted(placements) != list(range(count))) or len(placements) != len(request.shards):
            violations.append(
                FieldViolation(
                    "shards", f"must give exactly one placement for each shard 0..{max(count - 1, 0)}"
                )
            )
        owned = {n.id for n in await self._owned_nodes(user_id)}
        for i, placement in enumerate(request.shards):
            nodes = [placement.primary_node_id, *placement.replica_node_ids]
            if placement.primary_node_id not in owned:
                violations.append(FieldViolation(f"shards[{i}].primary_node_id", "must be one of your nodes"))
            for j, replica in enumerate(placement.replica_node_ids):
                if replica not in owned:
                    violations.append(
                        FieldViolation(f"shards[{i}].replica_node_ids[{j}]", "must be one of your nodes")
                    )
            if len(set(nodes)) != len(nodes):
                violations.append(
                    FieldViolation(f"shards[{i}]", "the primary and replicas must be distinct nodes")
                )
        require_fields(violations, "The database definition is invalid")
        layout_from_proto(request.sharding)  # raises InvalidArgument with field violations
        database_id = str(uuid.uuid4())
        connection: dict[str, Any] = {"dialect": dialect}
        if request.credentials:
            connection["credentials_encrypted"] = self._vault.encrypt_str(
                request.credentials, owner=database_id, purpose="database-credentials"
            )
        row = await self._databases.create(
            database_id=database_id,
            user_id=user_id,
            name=request.name,
            provider=provider,
            connection=connection,
            sharding=json_format.MessageToDict(request.sharding, preserving_proto_field_name=True),
            replication={
                "shards": [
                    {
                        "shard_index": p.shard_index,
                        "primary_node_id": p.primary_node_id,
                        "replica_node_ids": list(p.replica_node_ids),
                    }
                    for p in sorted(request.shards, key=lambda p: p.shard_index)
                ],
                "stale": {},
            },
        )
        log.info("database %s created: %d shards (%s)", row.id, count, dialect)
        return row

    async def get(self, user_id: str, database_id: str) -> DatabaseInstance:
        row = await self._databases.get_for_user(user_id, database_id) if database_id else None
        if row is None:
            raise PermissionDenied(f"You have no database {database_id!r}", reason="DATABASE_NOT_ACCESSIBLE")
        return row

    async def list_databases(
        self, user_id: str, page_size: int, page_token: str
    ) -> tuple[list[DatabaseInstance], str]:
        return await self._databases.list_for_user(user_id, page_size, page_token)

    async def delete(self, user_id: str, database_id: str) -> None:
        row = await self.get(user_id, database_id)
        await self._databases.delete(row.id)
        self._owned_rows.pop((user_id, row.id), None)
        self._replication.pop(row.id, None)
        self._derived.pop(row.id, None)
        try:
            await self.write_log.drop(row.id)
        except Exception:  # the database is gone; its log rows only take room
            log.exception("the write log of deleted database %s was not deleted", row.id)
        await self._cache.delete(f"db:schema:{row.id}")
        # its shards on the nodes (files; schemas and roles): now, or retried until each confirms
        await self.shard_drops.drop(row.id, shard_nodes(row.replication))

    # -- statements ---------------------------------------------------------------------

    async def apply_schema(self, user_id: str, database_id: str, ddl: str) -> DatabaseInstance:
        self._check_length(ddl, "ddl")
        loaded = await self._load(user_id, database_id)
        plan = await self._plan(loaded, ddl)
        if plan.kind is not StatementKind.DDL:
            raise InvalidArgument(
                "ApplySchema takes DDL (CREATE/ALTER/DROP TABLE, CREATE INDEX); use ExecuteQuery for other statements",
                field_violations=[FieldViolation("ddl", "must be a DDL statement")],
            )
        await self._run(loaded, plan, DEFAULT_TIMEOUT_MS / 1000, allow_partial=False)
        return await self._refresh_schema(loaded)

    def _check_length(self, text: str, field: str) -> None:
        """Refuse SQL text over the bound before anything parses it."""
        bound = self._max_query_bytes
        if len(text) > bound or (len(text) * 4 > bound and len(text.encode()) > bound):
            raise InvalidArgument(
                f"The SQL text is longer than {bound} bytes",
                reason="QUERY_TOO_LONG",
                field_violations=[FieldViolation(field, f"must be at most {bound} bytes")],
            )

    def _check_request(self, query: str, timeout_ms: int) -> None:
        if timeout_ms < 0 or timeout_ms > MAX_TIMEOUT_MS:
            raise InvalidArgument(
                "timeout_ms is out of range",
                field_violations=[
                    FieldViolation("timeout_ms", f"must be between 0 (default 30000) and {MAX_TIMEOUT_MS}")
                ],
            )
        self._check_length(query, "query")
        if not query.strip():
            raise InvalidArgument(
                "query is required", field_violations=[FieldViolation("query", "is required")]
            )

    async def _plan(self, loaded: _Loaded, sql: str) -> Plan:
        """The statement's plan; parsing and planning (a cache miss) run in a worker thread."""
        if self._plan_lock.acquire(blocking=False):  # a hit costs no thread hop (issue 12)
            try:
                dialect, version = loaded.row.connection["dialect"], loaded.schema_version
                hit = self._plans.cached(
                    sql, dialect, loaded.layout, schema_version=version, database=loaded.row.id
                )
            finally:
                self._plan_lock.release()
            if hit is not None:
                return hit

        def plan() -> Plan:
            with self._plan_lock:
                return self._plans.plan(
                    sql,
                    loaded.row.connection["dialect"],
                    loaded.layout,
                    loaded.tables,
                    schema_version=loaded.schema_version,
                    database=loaded.row.id,
                    collations=loaded.collations,
                )

        return await asyncio.to_thread(plan)

    async def execute_query(
        self, user_id: str, request: query_pb2.ExecuteQueryRequest
    ) -> query_pb2.ExecuteQueryResponse:
        started = time.perf_counter()
        self._check_request(request.query, request.timeout_ms)
        loaded = await self._load(user_id, request.db_id)
        txn = (
            await self._transaction_manager().get(user_id, loaded.row.id, request.transaction_id)
            if request.transaction_id
            else None
        )
        plan = await self._plan(loaded, request.query)
        try:
            if txn is not None:
                result = await self._run_in_transaction(
                    loaded, plan, txn, (request.timeout_ms or DEFAULT_TIMEOUT_MS) / 1000
                )
            else:
                result = await self._run(
                    loaded,
                    plan,
                    (request.timeout_ms or DEFAULT_TIMEOUT_MS) / 1000,
                    request.allow_partial_results,
                    caps=self._collect_caps(plan),
                )
        except ResourceExhausted as exc:
            if exc.reason != "RESULT_TOO_LARGE":
                raise
            raise _too_large(
                f"a shard returned more rows than ExecuteQuery collects ({exc.message})",
                self._max_result_rows,
            ) from exc
        if plan.kind is StatementKind.DDL:
            await self._refresh_schema(loaded)
        if len(result.rows) > self._max_result_rows:
            raise _too_large(f"the result has {len(result.rows)} rows", self._max_result_rows)
        if len(result.rows) > THREAD_ENCODE_ROWS:
            return await asyncio.to_thread(self._response, request, plan, loaded, result, started)
        return self._response(request, plan, loaded, result, started)

    def _response(
        self,
        request: query_pb2.ExecuteQueryRequest,
        plan: Plan,
        loaded: _Loaded,
        result: QueryResult,
        started: float,
    ) -> query_pb2.ExecuteQueryResponse:
        response = query_pb2.ExecuteQueryResponse(
            query=request.query,
            execution_time_ms=round((time.perf_counter() - started) * 1000),
            rows_returned=len(result.rows) if not plan.is_write else (result.rows_affected or 0),
            shards_queried=result.shards_queried,
            columns=[query_pb2.ResultColumn(name=name, type=kind) for name, kind in result.columns],
            partial=result.partial,
            shard_statuses=[
                query_pb2.ShardStatus(
                    shard_index=s.shard,
                    status=s.status,
                    node_id=s.node_id  # the node that answered: a replica when the read fell back
                    or (
                        loaded.replication.shards[s.shard].primary
                        if s.shard in loaded.replication.shards
                        else ""
                    ),
                    error_message=s.error,
                )
                for s in result.shard_statuses
            ],
        )
        add = response.data.add
        for row in result.rows:
            add().extend(_json_row(row))
        return response

    async def stream_query(self, user_id: str, request: query_pb2.StreamQueryRequest) -> QueryStream:
        """A read's merged rows as ``StreamQueryResponse`` messages (see :class:`QueryStream`)."""
        started = time.perf_counter()
        self._check_request(request.query, request.timeout_ms)
        loaded = await self._load(user_id, request.db_id)
        plan = await self._plan(loaded, request.query)
        if plan.is_write or plan.kind is StatementKind.DDL:
            raise InvalidArgument(
                "StreamQuery takes a read (SELECT); run writes and DDL with ExecuteQuery",
                reason="STREAM_QUERY_READ_ONLY",
                field_violations=[FieldViolation("query", "must be a read")],
            )
        seconds = (request.timeout_ms or DEFAULT_TIMEOUT_MS) / 1000
        executor = self._executor(loaded, plan, caps=self._stream_caps)
        parts = execute_stream(
            plan,
            executor,
            encode=_encode_batch,
            deadline_seconds=seconds,
            workers=self._merge_workers,
            parse=query_pb2.StreamQueryResponse.FromString,
        )
        return QueryStream(
            deadline=asyncio.get_running_loop().time() + seconds,
            seconds=seconds,
            messages=_stream_messages(parts, plan, started),
        )

    # -- transactions (controller/federation/transactions.py) ------------------------------

    def _transaction_manager(self) -> TransactionManager:
        if self.transactions is None:
            raise FailedPrecondition(
                "transactions are not enabled on this controller", reason="NO_TRANSACTIONS"
            )
        return self.transactions

    async def begin_transaction(
        self, user_id: str, request: query_pb2.BeginTransactionRequest
    ) -> Transaction:
        row = await self.get(user_id, request.db_id)
        return await self._transaction_manager().begin(
            user_id,
            row.id,
            distributed=request.distributed,
            idle_timeout_ms=request.idle_timeout_ms,
            timeout_ms=request.timeout_ms,
        )

    async def commit_transaction(self, user_id: str, database_id: str, transaction_id: str) -> Transaction:
        loaded = await self._load(user_id, database_id)
        manager = self._transaction_manager()
        txn = await manager.get(user_id, loaded.row.id, _required_id(transaction_id))
        written = {s: list(w) for s, w in txn_writes(txn).items() if w}
        with_replicas = [
            s for s in written if s in loaded.replication.shards and loaded.replication.shards[s].replicas
        ]
        if not with_replicas:
            return await manager.commit(txn)
        state = loaded.replication
        async with state.hold():  # the replicas' log must follow the primaries' commit order
            marked = await self._mark_stale(loaded, with_replicas)
            await manager.commit(txn)
            executor = self._replica_executor(loaded)
            unlogged = False
            for shard in with_replicas:
                sequence = await log_write(self.write_log, state, loaded.row.id, shard, written[shard], True)
                unlogged = unlogged or sequence is None  # the stale replicas' positions are gone
                # the commit is in the log (or the positions are forgotten): the positions may be kept
                state.pending.difference_update({(shard, r) for r in state.shards[shard].replicas})
        for shard in with_replicas:
            for replica in state.shards[shard].replicas:
                await executor.catch_up(
                    shard, replica, asyncio.get_running_loop().time() + DEFAULT_TIMEOUT_MS / 1000
                )
        if unlogged or any(r in state.stale.get(s, set()) for s, r in marked):
            await self._persist_stale(loaded, state)  # the positions of those still behind
        return txn

    async def rollback_transaction(self, user_id: str, database_id: str, transaction_id: str) -> Transaction:
        row = await self.get(user_id, database_id)
        manager = self._transaction_manager()
        txn = await manager.get(user_id, row.id, _required_id(transaction_id))
        return await manager.rollback(txn, "rolled back by the caller")

    async def _mark_stale(self, loaded: _Loaded, shards: list[int]) -> list[tuple[int, str]]:
        """Before a commit: the replicas of the written shards are stale until they replay it.
        Their positions (the shard's newest logged write) are kept in memory only until the
        commit is in the log: stopped in between, the controller finds them stale with no
        position (they cannot catch up) rather than at a position that hides the commit.
        The replicas it marked."""
        state = loaded.replication
        marked: list[tuple[int, str]] = []
        for shard in shards:
            for replica in state.shards[shard].replicas:
                if replica not in state.stale.get(shard, set()):
                    state.mark_stale(shard, replica, await self.write_log.newest(loaded.row.id, shard))
                    state.pending.add((shard, replica))
                    marked.append((shard, replica))
        if marked:
            await self._persist_stale(loaded, state)
        return marked

    async def _persist_stale(self, loaded: _Loaded, state: ReplicationState) -> None:
        """Keep the stale replicas and their positions in the database's ``replication`` JSON:
        ``"stale": {"<shard>": [node, …]}, "applied": {"<shard>": {"<node>": sequence}}``."""
        replication = dict(loaded.row.replication or {})
        replication["stale"] = state.stale_map()
        replication["applied"] = state.applied_map()
        loaded.row.replication = replication
        await self._databases.set_replication(loaded.row.id, replication)

    def _replica_executor(self, loaded: _Loaded) -> NodeShardExecutor:
        async def persist(state: ReplicationState) -> None:
            await self._persist_stale(loaded, state)

        return NodeShardExecutor(
            database_id=loaded.row.id,
            streams=self._streams,
            replication=loaded.replication,
            is_write=True,
            on_stale_changed=persist,
            results=self.shard_results,
            write_log=self.write_log,
        )

    def _collect_caps(self, plan: Plan) -> ResultCaps:
        return _collect_caps(plan, self._max_result_rows, self._collect_shard_bytes)

    def _executor(self, loaded: _Loaded, plan: Plan, caps: ResultCaps) -> NodeShardExecutor:
        async def persist(state: ReplicationState) -> None:
            await self._persist_stale(loaded, state)

        return NodeShardExecutor(
            database_id=loaded.row.id,
            streams=self._streams,
            replication=loaded.replication,
            is_write=plan.is_write,
            on_stale_changed=persist,
            results=self.shard_results,
            write_log=self.write_log,
            caps=caps,
        )

    async def _run_in_transaction(
        self, loaded: _Loaded, plan: Any, txn: Transaction, deadline_seconds: float
    ) -> QueryResult:
        manager = self._transaction_manager()
        if plan.kind is StatementKind.DDL:
            raise InvalidArgument(
                "DDL cannot run in a transaction: use ApplySchema, or ExecuteQuery without transaction_id",
                reason="TRANSACTION_DDL",
                field_violations=[FieldViolation("query", "must not be DDL inside a transaction")],
            )
        async with txn.lock:
            manager.touch(txn)
            manager.require_active(txn)
            manager.check_shards(txn, plan.shards)
            placements = loaded.replication.shards
            missing = [s for s in plan.shards if s not in placements]
            if missing:
                raise FailedPrecondition(f"shard {missing[0]} has no placement", reason="SHARD_NOT_PLACED")
            await manager.enlist(txn, {s: placements[s].primary for s in plan.shards})
            try:
                result = await execute(
                    plan,
                    manager.executor(txn, deadline_seconds, len(plan.shards), self._collect_caps(plan)),
                    deadline_seconds=deadline_seconds,
                )
            except (ControllerError, ShardError) as exc:
                raise await manager.abort_after_error(txn, exc) from exc
            if plan.is_write:
                writes = txn_writes(txn)
                for shard in plan.shards:
                    writes.setdefault(shard, []).append(plan.shard_sql[shard])
            manager.touch(txn)
            return result

    async def _run(
        self,
        loaded: _Loaded,
        plan: Any,
        deadline_seconds: float,
        allow_partial: bool,
        caps: ResultCaps | None = None,
    ) -> QueryResult:
        return await execute(
            plan,
            self._executor(loaded, plan, caps or ResultCaps()),
            deadline_seconds=deadline_seconds,
            allow_partial=allow_partial and not plan.is_write,
        )

    async def _refresh_schema(self, loaded: _Loaded) -> DatabaseInstance:
        """Read the schema back from shard 0's primary and record it."""
        dialect = loaded.row.connection["dialect"]
        executor = NodeShardExecutor(
            database_id=loaded.row.id,
            streams=self._streams,
            replication=loaded.replication,
            is_write=False,
            on_stale_changed=_nothing,
            results=self.shard_results,
            write_log=self.write_log,
        )
        result = await executor.run(0, _SCHEMA_SQL[dialect], asyncio.get_running_loop().time() + 30)
        tables: dict[str, list[dict[str, Any]]] = {}
        declared: dict[str, dict[str, str]] = {}
        for table, column, kind, notnull, extra in result.rows:
            if dialect == "sqlite" and extra:  # the CREATE TABLE text, on each table's first column
                declared[str(table)] = declared_collations(str(extra), dialect)
            elif dialect != "sqlite" and extra and not is_binary(str(extra)):
                declared.setdefault(str(table), {})[str(column).lower()] = str(extra)
            tables.setdefault(str(table), []).append(
                {"name": str(column), "type": str(kind), "nullable": not bool(notnull)}
            )
        for table, columns in tables.items():
            for column in columns:
                collation = declared.get(table, {}).get(column["name"].lower())
                if collation:
                    column["collation"] = collation
        version = int((loaded.row.schema_info or {}).get("version", 0)) + 1
        schema_info = {
            "version": version,
            "tables": [{"name": t, "columns": c} for t, c in sorted(tables.items())],
        }
        await self._databases.set_schema(loaded.row.id, schema_info)
        loaded.row.schema_info = schema_info
        await self._cache.set(
            f"db:schema:{loaded.row.id}", json.dumps(schema_info).encode(), SCHEMA_CACHE_SECONDS
        )
        return loaded.row

    async def _load(self, user_id: str, database_id: str) -> _Loaded:
        now = time.monotonic()
        owned = self._owned_rows.get((user_id, database_id))
        if owned is not None and owned[0] > now:
            row = owned[1]
        else:
            row = await self.get(user_id, database_id)
            if len(self._owned_rows) >= OWNED_ROWS_MAX:
                del self._owned_rows[next(iter(self._owned_rows))]
            self._owned_rows[(user_id, database_id)] = (now + OWNED_ROW_SECONDS, row)
        cached = await self._cache.get(f"db:schema:{row.id}")
        derived = self._derived.get(row.id)
        if derived is None or derived[0] is not row or derived[1] != cached or not cached:
            schema_info = json.loads(cached) if cached else (row.schema_info or {"version": 0, "tables": []})
            if not cached:
                cached = json.dumps(schema_info).encode()
                await self._cache.set(f"db:schema:{row.id}", cached, SCHEMA_CACHE_SECONDS)
            derived = (row, cached, *_derive(row, schema_info))
            if len(self._derived) >= OWNED_ROWS_MAX:
                del self._derived[next(iter(self._derived))]
            self._derived[row.id] = derived
        layout, tables, version, collations = derived[2:]
        replication = self._replication.get(row.id)
        if replication is None:
            # the stale replicas and their positions in the write log (none in older rows)
            replication = ReplicationState.from_json(row.replication or {})
            if self._shared_write_order:
                replication.shared = functools.partial(self._databases.write_order, row.id)
            self._replication[row.id] = replication
        return _Loaded(row, layout, replication, tables, version, collations)

    async def _owned_nodes(self, user_id: str) -> list[Any]:
        nodes: list[Any] = []
        token = ""
        while True:
            page, token = await self._nodes.list_for_user(user_id, 500, token)
            nodes.extend(page)
            if not token:
                return nodes


async def _nothing(_: ReplicationState) -> None:
    return None


def _write_log_of(databases: DatabaseRepository) -> WriteLog:
    """The write log in the databases' store (a repository without one, as in tests: in memory)."""
    store = getattr(databases, "store", None)
    return StoreWriteLog(store) if isinstance(store, Store) else MemoryWriteLog()


@dataclass
class QueryStream:
    """A StreamQuery in progress: its messages (columns first, then row batches, then
    ``done``) and its deadline (``loop.time()``), which the caller enforces while it writes."""

    deadline: float
    seconds: float
    messages: AsyncGenerator[query_pb2.StreamQueryResponse, None]


def _too_large(detail: str, max_rows: int = MAX_RESULT_ROWS) -> ResourceExhausted:
    return ResourceExhausted(
        f"The result is too large for ExecuteQuery ({detail}; it returns at most {max_rows} rows): "
        "read it with StreamQuery (POST /api/v1/databases/{db_id}/query:stream), or page it with "
        "LIMIT/OFFSET or a condition on the key",
        reason="RESULT_TOO_LARGE",
        metadata={"max_rows": str(max_rows), "use": "StreamQuery"},
    )


def _collect_caps(
    plan: Plan, max_rows: int = MAX_RESULT_ROWS, max_bytes: int = COLLECT_SHARD_BYTES
) -> ResultCaps:
    """What each shard of an ExecuteQuery may return: past the response's cap exactly when
    the merge passes rows through (the agent fetches cap + 1 rows), a bound otherwise (ten
    times the response's rows when the merge may shrink them: GROUP BY, DISTINCT)."""
    spec = plan.merge
    if plan.is_write:
        return ResultCaps()  # a write is never cut short
    if spec is None:
        return ResultCaps(max_rows, max_bytes)
    if isinstance(spec, RowsMerge) and not spec.distinct:
        return ResultCaps(min(spec.offset + max_rows, 2**62), max_bytes)
    if isinstance(spec, RowsMerge | GroupedMerge):
        return ResultCaps(min(10 * max_rows, 2**62), max_bytes)
    return ResultCaps()


async def _stream_messages(
    parts: AsyncGenerator[Any, None], plan: Plan, started: float
) -> AsyncGenerator[query_pb2.StreamQueryResponse, None]:
    rows = 0
    try:
        async for part in parts:
            if part.columns is not None:
                yield query_pb2.StreamQueryResponse(
                    columns=[query_pb2.ResultColumn(name=n, type=t) for n, t in part.columns]
                )
            elif part.batch is not None:
                rows += part.rows
                yield part.batch
            elif part.done:
                yield query_pb2.StreamQueryResponse(
                    done=True,
                    rows_returned=rows,
                    shards_queried=len(plan.shards),
                    execution_time_ms=round((time.perf_counter() - started) * 1000),
                )
    finally:
        await parts.aclose()


def txn_writes(txn: Transaction) -> dict[int, list[str]]:
    """The write statements a transaction sent each shard (replayed to replicas after commit)."""
    return txn.writes


def _required_id(transaction_id: str) -> str:
    if not transaction_id:
        raise InvalidArgument(
            "transaction_id is required", field_violations=[FieldViolation("transaction_id", "is required")]
        )
    return transaction_id


def transaction_to_proto(txn: Transaction) -> query_pb2.Transaction:
    return query_pb2.Transaction(
        id=txn.id,
        db_id=txn.database_id,
        distributed=txn.distributed,
        state=txn.state,
        participants=sorted(txn.participants),
        idle_timeout_ms=round(txn.idle_timeout * 1000),
        timeout_ms=round(txn.timeout * 1000),
        created_at=timestamp(txn.created_at),
        expires_at=timestamp(txn.expires_at),
    )


def _key_type(tables: Sequence[Mapping[str, Any]], key: str) -> Any:
    for table in tables:
        for column in table.get("columns", []):
            if column["name"] == key:
                return key_type_from_sql(column["type"])
    return None


def to_proto(row: DatabaseInstance) -> query_pb2.Database:
    """The API form of a database; credentials are never returned."""
    replication = row.replication or {}
    return query_pb2.Database(
        id=row.id,
        user_id=row.user_id,
        name=row.name,
        provider=row.provider,
        provider_specific_id=row.provider_specific_id or "",
        dialect=(row.connection or {}).get("dialect", "sqlite"),
        sharding=json_format.ParseDict(row.sharding or {}, query_pb2.Sharding()),
        shards=[
            query_pb2.ShardPlacement(
                shard_index=s["shard_index"],
                primary_node_id=s["primary_node_id"],
                replica_node_ids=s.get("replica_node_ids", []),
            )
            for s in replication.get("shards", [])
        ],
        tables=[
            query_pb2.TableInfo(
                name=t["name"],
                columns=[
                    query_pb2.ColumnInfo(name=c["name"], type=c["type"], nullable=c["nullable"])
                    for c in t["columns"]
                ],
            )
            for t in (row.schema_info or {}).get("tables", [])
        ],
        created_at=timestamp(row.created_at),
        last_synced=timestamp(row.last_synced),
    )
