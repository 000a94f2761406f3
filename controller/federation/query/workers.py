"""Streaming merges in worker processes, off the controller's GIL.

A ``StreamQuery`` of a million rows spends most of its CPU decoding the shards' batches,
merging them and building the response messages. In a thread of the controller that work
holds the GIL three quarters of the time, and every heartbeat the event loop acknowledges
waits for it (with 200 nodes, a p99 of 150 to 300 ms). So the merge runs in a process of its
own: the event loop passes each shard's batches through as bytes (the encoded rows, as
they came over ``PushShardResult``) and gets back serialized response messages; it
decodes nothing, merges nothing, and holds the GIL only to copy bytes and parse each
outgoing message (upb, about 0.3 ms for 256 KiB). The processes run at a lower priority
(:data:`NICE`): on a busy machine bulk work waits for control work, not the other way.

Protocol, one job at a time per process over a Unix socket pair (frames of a type byte,
a 4-byte length and the payload):

* controller → worker: ``JOB`` (pickled merge spec, dialect rules, each input's columns,
  the encode function), then ``BATCH``/``END``/``ABORT`` answering each ``WANT``;
* worker → controller: ``WANT <input>`` (it needs that input's next batch: a k-way merge
  pulls from the input it is short of), ``COLUMNS``, ``OUT <rows> <message>``, and last
  ``DONE``, ``ERROR`` (a pickled exception) or ``ABORTED``.

The controller reads the next frame only when it has room for its output, so a client that
stops reading stops the worker (its socket fills), which stops asking for batches, which
stops the agents. A job that ends early (the client went away, a shard failed) is aborted:
the next ``WANT`` is answered ``ABORT`` and the process is ready for another job; one that
does not answer within :data:`RECOVER_SECONDS` is killed and replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any

from .merge import GroupedMerge, RowsMerge, grouped_columns, iter_rows, merge_groups

log = logging.getLogger("a67.federation")

NICE = 10
"""How much lower the workers' CPU priority is than the controller's."""
RECOVER_SECONDS = 10.0
"""How long an aborted job may take to stop before its process is killed."""
FIRST_ROWS = 100
"""Rows of the first output batch (it leaves as soon as they are merged)."""
BATCH_ROWS = 4096
"""Most rows of one output batch."""

JOB, WANT, BATCH, END, ABORT, COLUMNS, OUT, DONE, ERROR, ABORTED = range(1, 11)
_HEADER = struct.Struct("!BI")
_COUNT = struct.Struct("!I")


class _Aborted(Exception):
    """The controller gave up the job."""


def merged(
    spec: Any, rules: Any, first_columns: list[tuple[str, str]], streams: Sequence[Iterator[tuple[Any, ...]]]
) -> tuple[list[tuple[str, str]], Iterable[tuple[Any, ...]]]:
    """The output columns and the merged rows of lazy per-input row streams (the pure merge:
    a k-way merge for ORDER BY, partial aggregates for GROUP BY, arrival order otherwise)."""
    if spec is None:
        return first_columns, streams[0]
    if isinstance(spec, RowsMerge):
        width = len(first_columns) - spec.hidden
        return first_columns[:width], iter_rows(spec, streams, rules)
    if isinstance(spec, GroupedMerge):  # memory holds the groups, not the rows
        rows = merge_groups(spec, streams, rules)
        return grouped_columns(spec, first_columns, rows, rules), rows
    from controller.errors import InvalidArgument

    raise InvalidArgument("a write's rows are not streamed: use ExecuteQuery")


# -- the worker process -------------------------------------------------------------------


def _send(sock: socket.socket, kind: int, *payload: bytes) -> None:
    size = sum(len(p) for p in payload)
    sock.sendmsg([_HEADER.pack(kind, size), *payload])


def _recv(stream: Any) -> tuple[int, bytes]:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    kind, size = _HEADER.unpack(header)
    payload = stream.read(size) if size else b""
    if len(payload) < size:
        raise EOFError
    return kind, payload


def _serve(sock: socket.socket, nice: int) -> None:  # pragma: no cover - runs in the worker process
    """The worker's loop: one job after another until the controller closes the socket."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the controller decides when this ends
    with contextlib.suppress(OSError):
        os.nice(nice)
    from controller.wire import decode_rows

    stream = sock.makefile("rb")
    try:
        while True:
            kind, payload = _recv(stream)
            if kind != JOB:
                continue
            try:
                _job(sock, stream, pickle.loads(payload), decode_rows)  # noqa: S301 - our own process
                _send(sock, DONE)
            except _Aborted:
                _send(sock, ABORTED)
            except (EOFError, OSError):
                raise
            except BaseException as exc:
                try:
                    data = pickle.dumps(exc)
                    pickle.loads(data)  # noqa: S301 - made just above
                except Exception:
                    data = pickle.dumps(RuntimeError(f"the merge failed: {type(exc).__name__}: {exc}"))
                _send(sock, ERROR, data)
    except (EOFError, OSError):
        return


def _job(sock: socket.socket, stream: Any, job: Any, decode: Callable[[bytes], list[Any]]) -> None:
    spec, rules, columns, encode = job

    def rows_of(index: int) -> Iterator[tuple[Any, ...]]:
        ask = _COUNT.pack(index)
        while True:
            _send(sock, WANT, ask)
            kind, payload = _recv(stream)
            if kind == END:
                return
            if kind != BATCH:
                raise _Aborted
            yield from decode(payload)

    out_columns, rows = merged(spec, rules, columns[0], [rows_of(i) for i in range(len(columns))])
    _send(sock, COLUMNS, pickle.dumps(out_columns))
    iterator = iter(rows)
    size = FIRST_ROWS
    while True:
        chunk = list(itertools.islice(iterator, size))
        if not chunk:
            return
        message, size = encode(chunk, size)
        data = message if isinstance(message, bytes) else message.SerializeToString()
        _send(sock, OUT, _COUNT.pack(len(chunk)), data)
        size = max(1, min(size, BATCH_ROWS))


# -- the controller's side -------------------------------------------------------------------


class MergeWorker:
    """One worker process and the controller's end of its socket."""

    def __init__(self, nice: int) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.process = multiprocessing.get_context("spawn").Process(
            target=_serve, args=(child, nice), name="a67-merge", daemon=True
        )
        self.process.start()
        child.close()
        self._socket = parent
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[tuple[int, bytes]] | None = None
        self._owes_answer = False
        self.in_job = False

    async def _connect(self) -> None:
        if self._reader is None:
            self._reader, self._writer = await asyncio.open_unix_connection(sock=self._socket)

    async def _read(self) -> tuple[int, bytes]:
        """The next frame; a read interrupted by cancellation is resumed by the next call."""
        if self._reading is None:
            self._reading = asyncio.ensure_future(self._read_frame())
        try:
            frame = await asyncio.shield(self._reading)
        except asyncio.CancelledError:
            raise
        except BaseException:
            self._reading = None
            raise
        self._reading = None
        return frame

    async def _read_frame(self) -> tuple[int, bytes]:
        assert self._reader is not None
        kind, size = _HEADER.unpack(await self._reader.readexactly(_HEADER.size))
        return kind, (await self._reader.readexactly(size) if size else b"")

    async def _write(self, kind: int, payload: bytes = b"") -> None:
        assert self._writer is not None
        self._writer.write(_HEADER.pack(kind, len(payload)))
        if payload:
            self._writer.write(payload)
        await self._writer.drain()

    async def merge(
        self,
        spec: Any,
        rules: Any,
        inputs: Sequence[Callable[[], Awaitable[bytes | None]]],
        columns: Sequence[list[tuple[str, str]]],
        encode: Callable[..., Any],
        on_columns: Callable[[list[tuple[str, str]]], Awaitable[None]],
        on_batch: Callable[[bytes, int], Awaitable[None]],
    ) -> None:
        """Run one merge: ``inputs[i]()`` gives input ``i``'s next encoded batch (None after
        its last); the merged output goes to ``on_columns`` then ``on_batch``."""
        await self._connect()
        self.in_job = True
        await self._write(JOB, pickle.dumps((spec, rules, [list(c) for c in columns], encode)))
        while True:
            kind, payload = await self._read()
            if kind == WANT:
                self._owes_answer = True
                batch = await inputs[_COUNT.unpack(payload)[0]]()
                self._owes_answer = False
                await self._write(END if batch is None else BATCH, b"" if batch is None else batch)
            elif kind == COLUMNS:
                await on_columns(pickle.loads(payload))  # noqa: S301 - our own worker
            elif kind == OUT:
                await on_batch(payload[_COUNT.size :], _COUNT.unpack_from(payload)[0])
            elif kind == DONE:
                self.in_job = False
                return
            elif kind == ERROR:
                self.in_job = False
                raise pickle.loads(payload)  # noqa: S301 - our own worker
            else:
                raise RuntimeError(f"unexpected frame {kind} from a merge worker")

    async def abort(self) -> bool:
        """End the job in progress; whether the process is ready for another."""
        try:
            async with asyncio.timeout(RECOVER_SECONDS):
                if self._owes_answer:
                    self._owes_answer = False
                    await self._write(ABORT)
                while self.in_job:
                    kind, _ = await self._read()
                    if kind == WANT:
                        await self._write(ABORT)
                    elif kind in (DONE, ERROR, ABORTED):
                        self.in_job = False
            return True
        except (TimeoutError, OSError, EOFError, asyncio.IncompleteReadError):
            return False

    def kill(self) -> None:
        if self._writer is not None:
            self._writer.close()
        else:
            self._socket.close()
        if self.process.is_alive():
            self.process.kill()
        with contextlib.suppress(Exception):
            self.process.join(timeout=1)


class MergeWorkers:
    """A pool of at most ``processes`` merge workers, started on first use."""

    def __init__(self, processes: int, *, nice: int = NICE) -> None:
        self._size = processes
        self._nice = nice
        self._idle: list[MergeWorker] = []
        self._leased: set[MergeWorker] = set()
        self._tasks: set[asyncio.Future[bool]] = set()

    def lease(self) -> MergeWorker | None:
        """An idle worker (a new one while the pool is not full), or None: merge in a thread."""
        while self._idle:
            worker = self._idle.pop()
            if worker.process.is_alive():
                self._leased.add(worker)
                return worker
            worker.kill()
        if len(self._leased) >= self._size:
            return None
        worker = MergeWorker(self._nice)
        self._leased.add(worker)
        return worker

    def release(self, worker: MergeWorker) -> None:
        """Take ``worker`` back; a job it has not finished is aborted first (in the background)."""
        if not worker.in_job:
            self._back(worker, True)
            return
        task = asyncio.ensure_future(worker.abort())
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._aborted(worker, t))

    def _aborted(self, worker: MergeWorker, task: asyncio.Future[bool]) -> None:
        self._tasks.discard(task)
        self._back(worker, not task.cancelled() and task.exception() is None and task.result())

    def _back(self, worker: MergeWorker, healthy: bool) -> None:
        self._leased.discard(worker)
        if healthy and worker.process.is_alive():
            self._idle.append(worker)
        else:
            log.info("a merge worker did not stop its job in time: replaced")
            worker.kill()

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for worker in [*self._idle, *self._leased]:
            worker.kill()
        self._idle.clear()
        self._leased.clear()

    @property
    def idle(self) -> list[int]:
        """The pids of the idle workers."""
        return [w.process.pid for w in self._idle if w.process.pid is not None]

    @property
    def pids(self) -> list[int]:
        """The pids of every worker, idle or merging."""
        return [w.process.pid for w in [*self._idle, *self._leased] if w.process.pid is not None]
