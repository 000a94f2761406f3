"""Results on the data path: batching a statement's rows (:class:`_Batcher`) and pushing
them over ``NodeService.PushShardResult`` (:func:`push_parts`), or, for a small result that
is ready at once, on the command's result itself.

Rows are written in batches (:func:`controller.wire.encode_rows`) of about
:data:`BATCH_TARGET_BYTES` each while they are fetched; the first batch is small
(:data:`FIRST_BATCH_ROWS`) so that the first rows leave quickly, and the batch size then
adapts to the rows' width. At most ``max_rows + 1`` rows are fetched, so "more than
the cap" is known exactly, and fetching stops past ``max_bytes`` (``too_large``). When
the controller ends the call the statement is interrupted through its :class:`Stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from automator67.v1 import node_pb2

from controller.agent.shard_state import ShardError
from controller.limits import CONTROL_MESSAGE_MAX_BYTES
from controller.wire import encode_rows

log = logging.getLogger("controller.agent.shards")

# Encoded bytes aimed at per batch of a result (the batch size adapts to the rows' width).
BATCH_TARGET_BYTES = 128 * 1024
# Rows of the first batch (the first rows leave quickly), and at most per batch.
FIRST_BATCH_ROWS = 64
MAX_BATCH_ROWS = 16_384
# Largest batch message: what the node port accepts on one message, less framing.
MAX_BATCH_BYTES = CONTROL_MESSAGE_MAX_BYTES - 2048
# A whole result this small, ready this soon, rides on the command's result (no push call):
# a point query costs one message each way instead of a call of its own. A slower
# statement gets its call (and so its cancellation) as before.
INLINE_RESULT_MAX_BYTES = 32 * 1024
INLINE_WAIT_SECONDS = 0.02


class Stop:
    """Interrupts a running statement: a flag its worker thread polls (SQLite's progress
    handler) and callbacks run on the event loop when it is set (PostgreSQL's cancel)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason = ""
        self._callbacks: list[Callable[[], object]] = []

    def is_set(self) -> bool:
        return self.event.is_set()

    def set(self, reason: str) -> None:
        if self.event.is_set():
            return
        self.reason = reason
        self.event.set()
        for callback in self._callbacks:
            with contextlib.suppress(Exception):
                callback()

    def on_set(self, callback: Callable[[], object]) -> Callable[[], None]:
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None


@dataclass
class ResultPart:
    """One batch of a statement's result (:func:`controller.wire.encode_rows`)."""

    rows: bytes = b"[]"
    count: int = 0
    columns: list[tuple[str, str]] | None = None
    """Set on the first part only."""
    done: bool = False
    rowcount: int = -1


class _Batcher:
    """Cuts a result into :class:`ResultPart` s of about :data:`BATCH_TARGET_BYTES`, enforcing
    the statement's caps (it asks for at most ``max_rows + 1`` rows in all)."""

    def __init__(self, max_rows: int, max_bytes: int) -> None:
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.size = FIRST_BATCH_ROWS
        self.rows = 0
        self.bytes = 0
        self.columns_sent = False

    def want(self) -> int:
        """How many rows to fetch next (never more than the cap plus one in all)."""
        return self.size if not self.max_rows else min(self.size, self.max_rows + 1 - self.rows)

    def parts(
        self,
        rows: list[Any],
        asked: int,
        columns: Callable[[list[Any]], list[tuple[str, str]]],
        rowcount: int,
    ) -> list[ResultPart]:
        self.rows += len(rows)
        if self.max_rows and self.rows > self.max_rows:
            raise ShardError(
                "too_large", f"the result has more than {self.max_rows} rows (the statement's cap)"
            )
        done = len(rows) < asked
        pieces = _encode_pieces(rows)
        out: list[ResultPart] = []
        for data, count in pieces:
            self.bytes += len(data)
            if self.max_bytes and self.bytes > self.max_bytes:
                raise ShardError(
                    "too_large", f"the result has more than {self.max_bytes} bytes (the statement's cap)"
                )
            out.append(ResultPart(rows=data, count=count))
        if not out:
            out.append(ResultPart())
        if rows:
            per_row = max(1, sum(len(d) for d, _ in pieces) // len(rows))
            self.size = max(1, min(MAX_BATCH_ROWS, BATCH_TARGET_BYTES // per_row))
        if not self.columns_sent:
            out[0].columns = columns(rows)
            self.columns_sent = True
        if done:
            out[-1].done = True
            out[-1].rowcount = rowcount
        return out


def _encode_pieces(rows: list[Any]) -> list[tuple[bytes, int]]:
    """``rows`` encoded, split so that every piece fits one message."""
    if not rows:
        return []
    data = encode_rows(rows)
    if len(data) <= MAX_BATCH_BYTES:
        return [(data, len(rows))]
    if len(rows) == 1:
        raise ShardError(
            "too_large",
            f"a row of {len(data)} bytes is over the data path's message limit ({MAX_BATCH_BYTES})",
        )
    half = len(rows) // 2
    return _encode_pieces(rows[:half]) + _encode_pieces(rows[half:])


async def push_parts(
    command_id: str,
    shard_index: int,
    open_push: Callable[[], Any],
    inline_ok: bool,
    start: Callable[[Stop], AsyncGenerator[ResultPart, None]],
) -> node_pb2.CommandResult:
    """Run ``start``; when the controller takes it (``inline_ok``), a whole result that comes
    within :data:`INLINE_WAIT_SECONDS` and fits :data:`INLINE_RESULT_MAX_BYTES` rides on the
    command's result itself (no call opened);
    any other is pushed on a call that ``open_push`` opens, and the command's result is
    then a small summary. A failure is the command's result (and, once a call is open,
    also sent on the call)."""
    stop = Stop()
    parts = start(stop)
    first: asyncio.Future[ResultPart | None] = asyncio.ensure_future(_next_part(parts))
    try:
        if inline_ok:
            await asyncio.wait({first}, timeout=INLINE_WAIT_SECONDS)
        if inline_ok and first.done():
            try:
                part = first.result()
            except ShardError as exc:
                return _failed(command_id, shard_index, exc, stop, 0)
            if part is not None and part.done and len(part.rows) <= INLINE_RESULT_MAX_BYTES:
                # Run the statement's generator to its end: what follows its last part
                # (a transaction kept open, a connection returned) must happen, and closing
                # it early would undo it.
                try:
                    extra = await _next_part(parts)
                except ShardError as exc:
                    return _failed(command_id, shard_index, exc, stop, part.count)
                if extra is None:
                    return _inline(command_id, part)
                raise RuntimeError("a shard statement yielded a part after its last one")
        return await _push(command_id, shard_index, open_push, parts, first, stop)
    finally:
        if not first.done():
            first.cancel()
        with contextlib.suppress(BaseException):
            await first
        await parts.aclose()


async def _next_part(parts: AsyncGenerator[ResultPart, None]) -> ResultPart | None:
    try:
        return await parts.__anext__()
    except StopAsyncIteration:
        return None


def _inline(command_id: str, part: ResultPart) -> node_pb2.CommandResult:
    """A whole (small) result on the command's result: ``payload`` says how many rows and
    which columns, ``inline_rows`` holds them (:func:`controller.wire.encode_rows`)."""
    return node_pb2.CommandResult(
        command_id=command_id,
        ok=True,
        payload=json.dumps(
            {
                "rows": part.count,
                "rowcount": part.rowcount,
                "columns": [list(c) for c in part.columns or []],
                "inline": True,
            },
            separators=(",", ":"),
        ).encode(),
        inline_rows=part.rows if part.count else b"",
    )


def _failed(
    command_id: str, shard_index: int, exc: ShardError, stop: Stop, rows: int
) -> node_pb2.CommandResult:
    if exc.kind == "cancelled" or stop.is_set():
        log.info(
            "shard statement %s on shard %d interrupted after %d rows: %s",
            command_id,
            shard_index,
            rows,
            stop.reason or exc,
        )
        exc = ShardError("cancelled", f"the statement was interrupted: {stop.reason or exc}")
    return node_pb2.CommandResult(
        command_id=command_id,
        ok=False,
        error_message=str(exc),
        payload=json.dumps({"error_kind": exc.kind}).encode(),
    )


async def _push(
    command_id: str,
    shard_index: int,
    open_push: Callable[[], Any],
    parts: AsyncGenerator[ResultPart, None],
    first: asyncio.Future[ResultPart | None],
    stop: Stop,
) -> node_pb2.CommandResult:
    """Open the push call and write the result's parts on it (``first``, then the rest)."""
    call = open_push()
    rows = 0
    columns: list[tuple[str, str]] = []
    rowcount = -1

    def ended(_: object) -> None:
        stop.set("the controller ended the result stream")

    watcher: asyncio.Future[Any] = asyncio.ensure_future(_await(call))
    watcher.add_done_callback(ended)
    try:
        try:
            await call.write(node_pb2.PushShardResultRequest(command_id=command_id))
            part = await first
            while part is not None:
                message = node_pb2.PushShardResultRequest(
                    rows=part.rows, row_count=part.count, done=part.done, rowcount=part.rowcount
                )
                if part.columns is not None:
                    columns = part.columns
                    message.columns_known = True
                    message.columns.extend(
                        node_pb2.ShardResultColumn(name=n, type=t) for n, t in part.columns
                    )
                rows += part.count
                rowcount = part.rowcount if part.done else rowcount
                await call.write(message)
                part = await _next_part(parts)
            await call.done_writing()
            await watcher
        except ShardError as exc:
            if not stop.is_set():  # tell the controller on the data path too
                with contextlib.suppress(Exception):
                    await call.write(
                        node_pb2.PushShardResultRequest(
                            done=True, error_kind=exc.kind, error_message=str(exc)
                        )
                    )
                    await call.done_writing()
            raise
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
            stop.set("the controller ended the result stream")
            raise ShardError("cancelled", f"the result stream ended: {_rpc_text(exc)}") from exc
    except ShardError as exc:
        return _failed(command_id, shard_index, exc, stop, rows)
    finally:
        watcher.remove_done_callback(ended)
        if not watcher.done():
            call.cancel()
        with contextlib.suppress(BaseException):
            await watcher
    return node_pb2.CommandResult(
        command_id=command_id,
        ok=True,
        payload=json.dumps(
            {"rows": rows, "rowcount": rowcount, "columns": [list(c) for c in columns]},
            separators=(",", ":"),
        ).encode(),
    )


async def _await(call: Any) -> Any:
    return await call


def _rpc_text(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"
