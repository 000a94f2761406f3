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
import concurrent.futures
import contextlib
import itertools
import re
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

import sqlglot
from sqlglot import exp

from controller.errors import (
    ControllerError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)

from .merge import GroupedMerge, RowsMerge, WriteMerge, grouped_columns, iter_rows, merge_groups
from .plan import Plan
from .workers import MergeWorker, MergeWorkers, merged

T = TypeVar("T")

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
    node_id: str = ""
    """The node that answered (the primary, or the replica a read fell back to)."""


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
    node_id: str = ""
    """The node that answered ("" when none did)."""


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
            statuses.append(ShardStatus(shard, "ok", node_id=results[shard].node_id))
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
    for error in errors.values():
        if isinstance(error, ResourceExhausted):  # over a statement's cap: no other shard changes that
            raise error
    for shard, error in errors.items():
        if isinstance(error, ShardError) and not error.retryable:
            kind = InvalidArgument if (error.sqlstate or "")[:2] in ("22", "42") else FailedPrecondition
            raise kind(
                f"shard {shard} rejected the statement: {explain(plan, error.message)}{write_note}",
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


# -- streaming --------------------------------------------------------------------------

STREAM_QUEUE_BATCHES = 4
"""Output batches queued between the merge thread and the caller (and shard batches queued
by the fan-in of an unordered merge): what a slow reader lets the controller hold."""
STREAM_FIRST_ROWS = 100
"""Rows of the first output batch (it leaves as soon as they are merged)."""
STREAM_BATCH_ROWS = 4096
"""Most rows of one output batch."""
_MERGE_THREADS = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="a67-merge")
"""Where streaming merges run (one thread per stream while it runs)."""
_POLL_SECONDS = 0.25


class ShardSource(Protocol):
    """The rows of one shard as they arrive: ``columns`` once opened, then batches."""

    @property
    def columns(self) -> Sequence[tuple[str, str]]: ...

    async def next_batch(self) -> Any | None:
        """The next batch (any form :meth:`decode` reads), or None after the last."""
        ...

    def decode(self, batch: Any) -> Sequence[tuple[Any, ...]]:
        """A batch's rows; called from the merge thread."""
        ...

    async def close(self) -> None: ...


class StreamingShardExecutor(Protocol):
    """Opens a shard's rows as a stream (``deadline`` as in :class:`ShardExecutor`)."""

    async def open(self, shard: int, sql: str, deadline: float) -> ShardSource: ...


@dataclass(frozen=True)
class StreamPart(Generic[T]):
    """One item of :func:`execute_stream`: the columns first, then batches, then the end."""

    columns: list[tuple[str, str]] | None = None
    batch: T | None = None
    rows: int = 0
    done: bool = False


class _Stopped(Exception):
    """The stream's consumer went away: the merge thread ends."""


class _Bridge:
    """Lets the merge thread await coroutines on the event loop, and stop when told."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.stopped = threading.Event()

    def call(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
        if self.stopped.is_set():
            raise _Stopped
        future = asyncio.run_coroutine_threadsafe(factory(), self.loop)
        while True:
            try:
                return future.result(timeout=_POLL_SECONDS)
            except concurrent.futures.TimeoutError:
                if self.stopped.is_set():
                    future.cancel()
                    raise _Stopped from None


class _FanIn:
    """Several shards' batches in arrival order (an unordered merge: any order is the
    answer), read by one task per shard into a bounded queue."""

    def __init__(self, sources: Sequence[ShardSource], size: int) -> None:
        self.columns = sources[0].columns
        self._queue: asyncio.Queue[tuple[ShardSource, Any] | BaseException | None] = asyncio.Queue(size)
        self._open = len(sources)
        self._tasks = [asyncio.ensure_future(self._pump(source)) for source in sources]

    async def _pump(self, source: ShardSource) -> None:
        try:
            while (batch := await source.next_batch()) is not None:
                await self._queue.put((source, batch))
            await self._queue.put(None)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await self._queue.put(exc)

    async def next_batch(self) -> tuple[ShardSource, Any] | None:
        while self._open:
            item = await self._queue.get()
            if item is None:
                self._open -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            return item
        return None

    @staticmethod
    def decode(item: tuple[ShardSource, Any]) -> Sequence[tuple[Any, ...]]:
        return item[0].decode(item[1])

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _rows_of(source: ShardSource | _FanIn, bridge: _Bridge) -> Iterator[tuple[Any, ...]]:
    while (batch := bridge.call(source.next_batch)) is not None:
        yield from source.decode(batch)


def _merge_thread(
    plan: Plan,
    sources: Sequence[ShardSource | _FanIn],
    bridge: _Bridge,
    put: Callable[[StreamPart[T]], Coroutine[Any, Any, None]],
    encode: Callable[[Sequence[tuple[Any, ...]], int], tuple[T, int]],
) -> None:
    """Merge the shards' rows batch by batch (the pure merge over lazy streams) and hand
    encoded batches to the loop; runs in a worker thread."""
    streams = [_rows_of(source, bridge) for source in sources]
    columns, rows = merged(plan.merge, plan.rules, list(sources[0].columns), streams)
    bridge.call(lambda: put(StreamPart(columns=columns)))
    iterator = iter(rows)
    size = STREAM_FIRST_ROWS
    while True:
        chunk = list(itertools.islice(iterator, size))
        if not chunk:
            break
        encoded, size = encode(chunk, size)
        part: StreamPart[T] = StreamPart(batch=encoded, rows=len(chunk))
        bridge.call(lambda part=part: put(part))  # type: ignore[misc]
        size = max(1, min(size, STREAM_BATCH_ROWS))
    bridge.call(lambda: put(StreamPart(done=True)))


async def execute_stream(
    plan: Plan,
    executor: StreamingShardExecutor,
    *,
    encode: Callable[[Sequence[tuple[Any, ...]], int], tuple[T, int]],
    deadline_seconds: float = DEFAULT_DEADLINE_SECONDS,
    workers: MergeWorkers | None = None,
    parse: Callable[[bytes], T] | None = None,
) -> AsyncGenerator[StreamPart[T], None]:
    """Run a read on its shards and yield the merged rows batch by batch.

    Every shard is opened in parallel (retries and replicas are the executor's); once each
    has started answering, the merge runs in a worker thread over the shards' batches as
    they arrive: an ORDER BY as a k-way merge (one batch per shard in memory), GROUP BY by
    partial aggregates (memory holds the groups), an unordered merge in arrival order. The
    first batch leaves before the last shard finishes whenever the merge allows it.
    ``encode(rows, size)`` turns a batch into what is yielded and says how many rows the
    next batch should have (it runs in the merge thread). Queues are bounded: a caller that
    stops reading stops the merge, which stops reading the shards. Leaving the generator
    early (or cancelling its caller) stops everything, the shards' statements included.
    The deadline is the caller's to enforce while it is not reading.

    With ``workers`` (and ``parse``, which reads what the worker made of ``encode``'s
    message, serialized), sources whose batches are encoded rows (``encoded_batches``) are
    merged in a worker process instead (:mod:`.workers`): decoding, merging and encoding
    then hold another process's GIL, not the event loop's.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_seconds
    sources = await _open_all(plan, executor, deadline, deadline_seconds)
    ordered = [sources[s] for s in plan.shards]
    inputs: list[ShardSource | _FanIn] = list(ordered)
    fan_in: _FanIn | None = None
    if isinstance(plan.merge, RowsMerge) and not plan.merge.order and len(ordered) > 1:
        fan_in = _FanIn(ordered, STREAM_QUEUE_BATCHES)
        inputs = [fan_in]
    out: asyncio.Queue[StreamPart[T]] = asyncio.Queue(STREAM_QUEUE_BATCHES)
    bridge = _Bridge(loop)
    worker: MergeWorker | None = None
    if (
        workers is not None
        and parse is not None
        and all(getattr(s, "encoded_batches", False) for s in ordered)
    ):
        worker = workers.lease()
    work: asyncio.Future[None]
    if worker is not None:
        assert parse is not None
        work = asyncio.ensure_future(_process_merge(worker, plan, inputs, out, encode, parse))
    else:
        work = loop.run_in_executor(_MERGE_THREADS, _merge_thread, plan, inputs, bridge, out.put, encode)
    try:
        while True:
            getter = asyncio.ensure_future(out.get())
            waiters: set[asyncio.Future[Any]] = {getter, work}
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                work.result()  # the merge failed: its error
                raise RuntimeError("the merge ended without its last batch")
            part = getter.result()
            yield part
            if part.done:
                return
    except ShardError as exc:
        raise _stream_failure(plan, exc) from exc
    except TimeoutError as exc:
        raise DeadlineExceeded(
            f"the query did not finish within {deadline_seconds:g} s", reason="QUERY_TIMEOUT"
        ) from exc
    finally:
        bridge.stopped.set()
        if worker is not None and not work.done():
            work.cancel()
        while not out.empty():  # a put the thread waits for completes, then it sees the stop
            out.get_nowait()
        if fan_in is not None:
            await fan_in.close()
        for source in ordered:
            await source.close()
        with contextlib.suppress(BaseException):  # its error was raised above, or nobody waits for it
            await asyncio.shield(work)
        if worker is not None and workers is not None:
            workers.release(worker)


async def _process_merge(
    worker: MergeWorker,
    plan: Plan,
    inputs: Sequence[ShardSource | _FanIn],
    out: asyncio.Queue[StreamPart[T]],
    encode: Callable[[Sequence[tuple[Any, ...]], int], tuple[T, int]],
    parse: Callable[[bytes], T],
) -> None:
    """The merge of :func:`_merge_thread`, run by a worker process: the inputs' batches go
    to it as bytes, its output messages come back serialized."""

    def reader(source: ShardSource | _FanIn) -> Callable[[], Coroutine[Any, Any, bytes | None]]:
        async def next_bytes() -> bytes | None:
            batch = await source.next_batch()
            if batch is None:
                return None
            data = batch[1] if isinstance(source, _FanIn) else batch
            assert isinstance(data, bytes)
            return data

        return next_bytes

    async def on_columns(columns: list[tuple[str, str]]) -> None:
        await out.put(StreamPart(columns=columns))

    async def on_batch(data: bytes, rows: int) -> None:
        await out.put(StreamPart(batch=parse(data), rows=rows))

    await worker.merge(
        plan.merge,
        plan.rules,
        [reader(source) for source in inputs],
        [list(source.columns) for source in inputs],
        encode,
        on_columns,
        on_batch,
    )
    await out.put(StreamPart(done=True))


_UNKNOWN_COLUMN = (
    re.compile(r"^no such column: (?P<column>\S+)$"),  # SQLite
    re.compile(r'^column "?(?P<column>[^"\s]+)"? does not exist'),  # PostgreSQL
)


def explain(plan: Plan, message: str) -> str:
    """A shard's own words, made plain where they are terse: an unknown column is named
    with the tables the statement reads (the shard's text names only the column).

    >>> from types import SimpleNamespace
    >>> p = SimpleNamespace(sql="SELECT totl FROM orders o JOIN lines l ON l.o = o.id", rules=SimpleNamespace(sqlglot_dialect="sqlite"))
    >>> explain(p, "no such column: totl")  # type: ignore[arg-type]
    'column totl does not exist in table lines or orders'
    >>> explain(p, 'column "totl" does not exist')  # type: ignore[arg-type]
    'column totl does not exist in table lines or orders'
    >>> explain(p, "UNIQUE constraint failed: orders.id")  # type: ignore[arg-type]
    'UNIQUE constraint failed: orders.id'
    """
    for pattern in _UNKNOWN_COLUMN:
        found = pattern.match(message)
        if found is None:
            continue
        column = found.group("column")
        try:
            tree = sqlglot.parse_one(plan.sql, read=plan.rules.sqlglot_dialect)
        except sqlglot.errors.SqlglotError:
            return f"column {column} does not exist"
        tables = sorted({t.name for t in tree.find_all(exp.Table) if t.name})
        where = f" in table {' or '.join(tables)}" if tables else ""
        return f"column {column} does not exist{where}"
    return message


def _stream_failure(plan: Plan, error: ShardError) -> ControllerError:
    if not error.retryable:
        kind = InvalidArgument if (error.sqlstate or "")[:2] in ("22", "42") else FailedPrecondition
        return kind(
            f"shard {error.shard} rejected the statement: {explain(plan, error.message)}",
            reason="SHARD_STATEMENT_FAILED",
            metadata={"shard": str(error.shard), **({"sqlstate": error.sqlstate} if error.sqlstate else {})},
        )
    return Unavailable(
        f"shard {error.shard} failed while its rows streamed ({error.message})",
        reason="SHARD_UNAVAILABLE",
        metadata={"shards": str(error.shard)},
    )


async def _open_all(
    plan: Plan, executor: StreamingShardExecutor, deadline: float, deadline_seconds: float
) -> dict[int, ShardSource]:
    """Every shard's source, once each has started answering; on any failure none."""
    loop = asyncio.get_running_loop()
    tasks = {
        shard: asyncio.ensure_future(executor.open(shard, plan.shard_sql[shard], deadline))
        for shard in plan.shards
    }
    try:
        await asyncio.wait(
            tasks.values(), timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_EXCEPTION
        )
    finally:
        leftovers = [task for task in tasks.values() if not task.done()]
        for task in leftovers:
            task.cancel()
        if leftovers:
            await asyncio.gather(*leftovers, return_exceptions=True)
    opened = {s: t.result() for s, t in tasks.items() if not t.cancelled() and t.exception() is None}
    if len(opened) == len(tasks):
        return opened
    for source in opened.values():
        await source.close()
    statuses: list[ShardStatus] = []
    errors: dict[int, BaseException] = {}
    late = loop.time() >= deadline
    for shard, task in tasks.items():
        error = None if task.cancelled() else task.exception()
        if shard in opened:
            statuses.append(ShardStatus(shard, "ok"))
        elif isinstance(error, TimeoutError) or (task.cancelled() and late):
            statuses.append(ShardStatus(shard, "timeout", f"no answer within {deadline_seconds:g} s"))
        elif task.cancelled():
            statuses.append(ShardStatus(shard, "failed", "stopped: another shard failed"))
        elif error is not None:
            errors[shard] = error
            statuses.append(ShardStatus(shard, "failed", _describe(error)))
    _raise_for_failures(plan, statuses, errors, deadline_seconds, False, {})
    raise Unavailable("a shard could not be opened", reason="SHARD_UNAVAILABLE")
