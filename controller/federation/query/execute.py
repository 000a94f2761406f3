"""Stage 4: run a plan on its shards in parallel, under a deadline, and merge.

The shards are reached through a :class:`ShardExecutor`, the one narrow interface to
I/O (the controller implements it over the agents' streams, with retries on the primary
and then the replicas; tests implement it over SQLite files or PostgreSQL schemas, or
with a plain function). This module adds the deadline, the error mapping and partial
results:

* every shard answers → the merged :class:`QueryResult`;
* a shard fails with a non-retryable error (a constraint violation, an unknown column)
  → ``InvalidArgument`` (SQLSTATE classes 22 and 42) or ``FailedPrecondition``,
  carrying the shard's message and naming the shard;
* every shard fails → ``Unavailable`` ("every shard failed");
* some shards fail → ``Unavailable`` naming them, or with ``allow_partial`` (reads
  only) the merged rows of the shards that answered, ``partial=True`` and a status per
  shard;
* the deadline passes → ``DeadlineExceeded`` naming the shards still running, or with
  ``allow_partial`` the partial result with ``timed_out=True``.

A write is never partial: if any shard fails, the error says which shards applied it
(there are no cross-shard transactions).

>>> import asyncio
>>> from controller.federation.query.layout import ShardLayout
>>> from controller.federation.query.plan import plan_sql
>>> plan = plan_sql("SELECT COUNT(*) FROM t", "sqlite", ShardLayout("hash", 2, "k"), {"t": ["k"]})
>>> async def run(shard: int, sql: str, deadline: float) -> ShardResult:
...     return ShardResult([("_a67_p0", "")], [(10 + shard,)])
>>> asyncio.run(execute(plan, FunctionExecutor(run))).rows
[(21,)]
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from controller.errors import (
    ControllerError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
)

from .merge import GroupedMerge, RowsMerge, WriteMerge, grouped_columns, iter_rows, merge_groups
from .plan import Plan

DEFAULT_DEADLINE_SECONDS = 30.0
"""The spec's query timeout (§4.5)."""
THREAD_MERGE_ROWS = 20_000
"""Merges of more shard rows than this run in a worker thread, so the event loop (and
every node's heartbeats) keeps running while they do."""


@dataclass(frozen=True)
class ShardResult:
    """What one shard returned."""

    columns: Sequence[tuple[str, str]]
    """(name, type) of each column."""
    rows: Sequence[tuple[Any, ...]]
    """The rows, in the shard's order."""
    rows_affected: int | None = None
    """For writes: the rows inserted, updated or deleted."""


class ShardError(Exception):
    """A shard could not run its statement."""

    def __init__(self, shard: int, message: str, *, retryable: bool, sqlstate: str | None = None) -> None:
        super().__init__(f"shard {shard}: {message}")
        self.shard = shard
        self.message = message
        self.retryable = retryable
        """True for transport and availability failures; False for the statement's own errors."""
        self.sqlstate = sqlstate
        """The SQLSTATE of the database error, when known (``23505``: unique violation)."""


class ShardExecutor(Protocol):
    """Runs SQL on one shard. ``deadline`` is an absolute ``loop.time()`` (use
    ``asyncio.timeout_at(deadline)``); raise :class:`ShardError` on failure."""

    async def run(self, shard: int, sql: str, deadline: float) -> ShardResult: ...


@dataclass(frozen=True)
class FunctionExecutor:
    """A :class:`ShardExecutor` from a plain async function (for tests and adapters)."""

    function: Callable[[int, str, float], Awaitable[ShardResult]]

    async def run(self, shard: int, sql: str, deadline: float) -> ShardResult:
        return await self.function(shard, sql, deadline)


@dataclass(frozen=True)
class ShardStatus:
    """How one shard fared."""

    shard: int
    status: Literal["ok", "failed", "timeout"]
    error: str = ""


@dataclass(frozen=True)
class QueryResult:
    """The merged answer (spec §4.5 step 8)."""

    columns: list[tuple[str, str]]
    rows: list[tuple[Any, ...]]
    shards_queried: int
    shard_statuses: list[ShardStatus] = field(default_factory=list)
    partial: bool = False
    """Some shards did not answer; ``rows`` are those of the shards that did."""
    rows_affected: int | None = None
    timed_out: bool = False
    """The deadline passed before every shard answered (only with ``allow_partial``)."""


async def execute(
    plan: Plan,
    executor: ShardExecutor,
    *,
    deadline_seconds: float = DEFAULT_DEADLINE_SECONDS,
    allow_partial: bool = False,
) -> QueryResult:
    """Run ``plan`` on its shards in parallel and merge the answers (see the module docstring)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_seconds
    tasks = {
        shard: asyncio.ensure_future(executor.run(shard, plan.shard_sql[shard], deadline))
        for shard in plan.shards
    }
    pending: set[asyncio.Future[ShardResult]] = set()
    try:
        _, pending = await asyncio.wait(tasks.values(), timeout=max(0.0, deadline_seconds))
    finally:
        # On the deadline, or if the caller is cancelled, stop every shard still running.
        leftovers = [task for task in tasks.values() if not task.done()]
        for task in leftovers:
            task.cancel()
        if leftovers:
            await asyncio.gather(*leftovers, return_exceptions=True)

    results: dict[int, ShardResult] = {}
    statuses: list[ShardStatus] = []
    errors: dict[int, BaseException] = {}
    for shard, task in tasks.items():
        if task in pending or task.cancelled():
            statuses.append(ShardStatus(shard, "timeout", f"no answer within {deadline_seconds:g} s"))
            continue
        error = task.exception()
        if error is None:
            results[shard] = task.result()
            statuses.append(ShardStatus(shard, "ok"))
        elif isinstance(error, TimeoutError):  # the executor gave up at the deadline itself
            statuses.append(ShardStatus(shard, "timeout", f"no answer within {deadline_seconds:g} s"))
        else:
            errors[shard] = error
            statuses.append(ShardStatus(shard, "failed", _describe(error)))

    if len(results) < len(tasks):
        _raise_for_failures(
            plan, statuses, errors, deadline_seconds, allow_partial and not plan.is_write, results
        )
    answered = [results[s] for s in plan.shards if s in results]
    total_rows = sum(len(r.rows) for r in answered)
    if total_rows > THREAD_MERGE_ROWS:
        columns, rows = await asyncio.to_thread(_merge, plan, answered)
    else:
        columns, rows = _merge(plan, answered)
    affected = _affected(plan, answered)
    partial = len(results) < len(tasks)
    return QueryResult(
        columns=columns,
        rows=rows,
        shards_queried=len(plan.shards),
        shard_statuses=statuses,
        partial=partial,
        rows_affected=affected,
        timed_out=any(s.status == "timeout" for s in statuses),
    )


def _describe(error: BaseException) -> str:
    if isinstance(error, ShardError):
        return error.message
    if isinstance(error, ControllerError):
        return error.message
    return f"{type(error).__name__}: {error}"


def _raise_for_failures(
    plan: Plan,
    statuses: list[ShardStatus],
    errors: dict[int, BaseException],
    deadline_seconds: float,
    partial_allowed: bool,
    results: dict[int, ShardResult],
) -> None:
    failed = [s for s in statuses if s.status != "ok"]
    names = ", ".join(str(s.shard) for s in failed)
    applied = ", ".join(str(s) for s in sorted(results))
    write_note = (
        f"; the statement was applied on shard(s) {applied} (there are no cross-shard transactions)"
        if plan.is_write and results
        else ""
    )
    metadata = {"shards": names}
    for shard, error in errors.items():
        if isinstance(error, ShardError) and not error.retryable:
            kind = InvalidArgument if (error.sqlstate or "")[:2] in ("22", "42") else FailedPrecondition
            raise kind(
                f"shard {shard} rejected the statement: {error.message}{write_note}",
                reason="SHARD_STATEMENT_FAILED",
                metadata={"shard": str(shard), **({"sqlstate": error.sqlstate} if error.sqlstate else {})},
            )
    if partial_allowed and results:
        return
    timeouts = [s for s in failed if s.status == "timeout"]
    if not results and not timeouts:
        detail = "; ".join(f"shard {s.shard}: {s.error}" for s in failed)
        raise Unavailable(
            f"every shard failed ({detail}){write_note}", reason="ALL_SHARDS_FAILED", metadata=metadata
        )
    if timeouts:
        raise DeadlineExceeded(
            f"the query did not finish within {deadline_seconds:g} s on shard(s) "
            f"{', '.join(str(s.shard) for s in timeouts)}{write_note}",
            reason="QUERY_TIMEOUT",
            metadata=metadata,
        )
    detail = "; ".join(f"shard {s.shard}: {s.error}" for s in failed)
    raise Unavailable(
        f"shard(s) {names} unavailable ({detail}){write_note}", reason="SHARD_UNAVAILABLE", metadata=metadata
    )


def _merge(plan: Plan, answered: list[ShardResult]) -> tuple[list[tuple[str, str]], list[tuple[Any, ...]]]:
    spec = plan.merge
    rules = plan.rules
    first_columns = list(answered[0].columns) if answered else []
    if spec is None:
        return first_columns, list(answered[0].rows) if answered else []
    if isinstance(spec, RowsMerge):
        width = len(first_columns) - spec.hidden
        return first_columns[:width], list(iter_rows(spec, [r.rows for r in answered], rules))
    if isinstance(spec, GroupedMerge):
        rows = merge_groups(spec, [r.rows for r in answered], rules)
        return grouped_columns(spec, first_columns, rows, rules), rows
    assert isinstance(spec, WriteMerge)
    if spec.counts == "first":
        return first_columns, list(answered[0].rows) if answered else []
    return first_columns, [row for r in answered for row in r.rows]


def _affected(plan: Plan, answered: list[ShardResult]) -> int | None:
    counts = [r.rows_affected for r in answered if r.rows_affected is not None]
    if not counts:
        return None
    if isinstance(plan.merge, WriteMerge) and plan.merge.counts == "first":
        return counts[0]
    return sum(counts)
