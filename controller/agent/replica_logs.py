"""Replicas' logs on the data path: the ``read_replica_logs`` command and its push.

The controller asks for a deployment's logs with a small ``read_replica_logs`` command on
the node stream; the lines themselves go back on ``NodeService.PushReplicaLogs``, a call
of their own the agent opens on the node port (mutual TLS), keyed by the command id —
the pattern of shard results (:mod:`controller.agent.shard_results`). Nothing bulky rides
the node stream.

What is read: each replica's ``replica.log`` and ``replica.log.1`` (written by
:class:`~controller.agent.replica_process._ReplicaLog`: ``<RFC 3339 time> <line>`` per
line, rotated at :data:`~controller.agent.replica_process.LOG_MAX_BYTES`). The last
``tail_lines`` lines (at or after ``since``) are sent first, in batches of at most
:data:`BATCH_LINES` lines or :data:`BATCH_BYTES` bytes, one replica per batch; with
``follow`` the files are then polled every :data:`FOLLOW_POLL_SECONDS` for new lines (a
rotation and a new generation of the same replica are followed too) until the controller
ends the call, which it does when its client cancels.

Scrubbing: before a line leaves the agent, the values of the replica's env that look
secret (:func:`secret_values`) are replaced by ``***`` and the line goes through
:func:`controller.redact.redact`, as error messages do. The controller redacts again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import grpc
from automator67.v1 import node_pb2

from controller.agent.replica_process import LOG_LINE_MAX_BYTES, LOG_STAMP_BYTES, ReplicaInfo
from controller.redact import MASK, redact

log = logging.getLogger("controller.agent.replicas")

BATCH_LINES = 500
"""Lines per pushed message, at most."""

BATCH_BYTES = 128 * 1024
"""Text bytes per pushed message, about (well under the node port's 256 KiB)."""

FOLLOW_POLL_SECONDS = 0.25
"""How often a followed log is checked for new lines."""

DEFAULT_TAIL_LINES = 100
"""Lines per replica when the request names no ``tail_lines``."""

MAX_TAIL_LINES = 10_000
"""The most lines per replica one request may ask for."""

SECRET_NAME = re.compile(r"(?i)(key|token|secret|passw(or)?d|pwd|credential|auth|private|dsn)")
"""An env name whose value is masked in logs when it has :data:`MIN_NAMED_SECRET_CHARS`."""

MIN_NAMED_SECRET_CHARS = 4
MIN_SECRET_CHARS = 16
"""Any env value at least this long is masked in logs whatever its name (keys, DSNs)."""

LINE_CHARS = LOG_LINE_MAX_BYTES + 64
"""The longest line text after scrubbing (a line is at most 4096 bytes in the file)."""


def secret_values(env: Mapping[str, str]) -> tuple[str, ...]:
    """The values of a replica's (user-given) env to mask in its log: those of names that
    look secret (``…KEY``, ``…TOKEN``, ``…PASSWORD``, ``…SECRET`` …) with at least
    :data:`MIN_NAMED_SECRET_CHARS` characters, and any of at least :data:`MIN_SECRET_CHARS`;
    longest first (so that a value containing another is masked whole)."""
    values = {
        value
        for name, value in env.items()
        if len(value) >= MIN_SECRET_CHARS
        or (len(value) >= MIN_NAMED_SECRET_CHARS and SECRET_NAME.search(name))
    }
    return tuple(sorted(values, key=len, reverse=True))


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """``text`` with the replica's secret env values and credential-shaped strings masked."""
    for value in secrets:
        if value in text:
            text = text.replace(value, MASK)
    return redact(text, LINE_CHARS)


def parse_line(raw: bytes) -> tuple[datetime | None, str]:
    """A line of ``replica.log`` (without its ``\\n``): its time (None if it has none) and text."""
    if len(raw) > LOG_STAMP_BYTES and raw[LOG_STAMP_BYTES : LOG_STAMP_BYTES + 1] == b" ":
        with contextlib.suppress(ValueError):
            moment = datetime.fromisoformat(raw[:LOG_STAMP_BYTES].decode("ascii"))
            return moment, raw[LOG_STAMP_BYTES + 1 :].decode("utf-8", "replace").rstrip("\r")
    return None, raw.decode("utf-8", "replace").rstrip("\r")


class Replicas(Protocol):
    """What the reader needs of the supervisor."""

    def get(self, deployment_id: str, replica_index: int) -> ReplicaInfo | None: ...

    def replicas(self) -> list[ReplicaInfo]: ...


@dataclass
class _Followed:
    """One replica's log being read: the open file and how far it was read."""

    info: ReplicaInfo
    fd: int = -1
    inode: int = 0
    offset: int = 0
    rest: bytes = b""
    pending: list[tuple[datetime | None, str]] = field(default_factory=list)

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def _open(path: Path) -> tuple[int, int]:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    return fd, os.fstat(fd).st_ino


def _read_more(f: _Followed) -> list[bytes]:
    """Complete lines written to ``f``'s file since the last read."""
    chunks: list[bytes] = []
    while True:
        chunk = os.pread(f.fd, 1 << 20, f.offset)
        if not chunk:
            break
        f.offset += len(chunk)
        chunks.append(chunk)
    if not chunks:
        return []
    lines = (f.rest + b"".join(chunks)).split(b"\n")
    f.rest = lines.pop()
    return lines


def initial_lines(f: _Followed, since: datetime | None, tail: int) -> list[tuple[datetime | None, str]]:
    """The last ``tail`` lines of ``f``'s log (both files) at or after ``since``; leaves
    ``f`` open at the end of ``replica.log`` for following. Blocking (run in a thread)."""
    path = f.info.log_path
    raw: list[bytes] = []
    rotated = path.with_name(path.name + ".1")
    with contextlib.suppress(OSError):
        fd, _ = _open(rotated)
        try:
            data = b""
            while chunk := os.pread(fd, 1 << 20, len(data)):
                data += chunk
        finally:
            os.close(fd)
        raw += data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n")
    try:
        f.fd, f.inode = _open(path)
        raw += _read_more(f)
    except OSError:
        f.fd = -1
    out: list[tuple[datetime | None, str]] = []
    for line in raw[-tail:] if since is None else raw:
        moment, text = parse_line(line)
        if since is not None and (moment is None or moment < since):
            continue
        out.append((moment, text))
    return out[-tail:]


def follow_lines(f: _Followed, replicas: Replicas) -> list[tuple[datetime | None, str]]:
    """New lines of ``f``'s log since the last read, across a rotation or a new generation
    of the replica. Blocking (run in a thread)."""
    out: list[bytes] = []
    if f.fd >= 0:
        out += _read_more(f)
    current = replicas.get(f.info.deployment_id, f.info.replica_index)
    if current is not None and current.generation != f.info.generation:
        f.close()  # a new generation of the replica: its own, new log
        f.info, f.rest, f.offset = current, b"", 0
    path = f.info.log_path
    try:
        inode = os.stat(path, follow_symlinks=False).st_ino
    except OSError:
        return [parse_line(line) for line in out]
    if f.fd < 0 or inode != f.inode:  # rotated (or not opened yet): the new file from its start
        f.close()
        with contextlib.suppress(OSError):
            f.fd, f.inode = _open(path)
            f.offset, f.rest = 0, b""
            out += _read_more(f)
    return [parse_line(line) for line in out]


class ReplicaLogReader:
    """Answers ``read_replica_logs`` commands from ``replicas`` (the supervisor)."""

    def __init__(self, replicas: Replicas, open_push: Callable[[], Any] | None = None) -> None:
        self.replicas = replicas
        self.open_push = open_push
        """Opens ``NodeService.PushReplicaLogs`` (the agent's data path); set by the agent."""
        self.poll_seconds = FOLLOW_POLL_SECONDS

    def _select(self, request: node_pb2.ReadReplicaLogs) -> tuple[list[_Followed], list[int]]:
        if request.replica_indexes:
            found: list[_Followed] = []
            missing: list[int] = []
            for index in sorted(set(request.replica_indexes)):
                info = self.replicas.get(request.deployment_id, index)
                if info is None:
                    missing.append(index)
                else:
                    found.append(_Followed(info))
            return found, missing
        infos = [r for r in self.replicas.replicas() if r.deployment_id == request.deployment_id]
        return [_Followed(info) for info in sorted(infos, key=lambda r: r.replica_index)], []

    async def read_replica_logs(self, command: node_pb2.NodeCommand) -> node_pb2.CommandResult:
        """The ``read_replica_logs`` handler: push the lines, then answer with how many."""
        request = command.read_replica_logs
        if self.open_push is None:
            raise RuntimeError("this agent has no data path for logs")
        since = request.since.ToDatetime(UTC) if request.HasField("since") else None
        tail = min(request.tail_lines or DEFAULT_TAIL_LINES, MAX_TAIL_LINES)
        followed, missing = self._select(request)
        call = self.open_push()
        ended: asyncio.Future[Any] = asyncio.ensure_future(_await(call))
        sent = 0
        try:
            await call.write(node_pb2.PushReplicaLogsRequest(command_id=command.command_id))
            for index in missing:
                await call.write(
                    node_pb2.PushReplicaLogsRequest(
                        replica_index=index,
                        error_message=f"this node has no replica {index} of the deployment",
                    )
                )
            for f in followed:
                lines = await asyncio.to_thread(initial_lines, f, since, tail)
                sent += await _send(call, f.info, lines)
            if not request.follow:
                await call.write(node_pb2.PushReplicaLogsRequest(done=True))
                await call.done_writing()
                await ended
            else:
                sent += await self._follow(call, ended, followed, request)
                log.info("logs of %s: the controller ended the push (%d lines)", request.deployment_id, sent)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
            log.info("logs of %s: the controller ended the push (%s)", request.deployment_id, _rpc_text(exc))
        finally:
            for f in followed:
                f.close()
            if not ended.done():
                call.cancel()
            with contextlib.suppress(BaseException):
                await ended
        return node_pb2.CommandResult(
            command_id=command.command_id, ok=True, payload=json.dumps({"lines": sent}).encode()
        )

    async def _follow(
        self,
        call: Any,
        ended: asyncio.Future[Any],
        followed: list[_Followed],
        request: node_pb2.ReadReplicaLogs,
    ) -> int:
        sent = 0
        known = {f.info.replica_index for f in followed}
        while not ended.done():
            await asyncio.wait({ended}, timeout=self.poll_seconds)
            if ended.done():
                break
            if not request.replica_indexes:  # every replica of the deployment: new ones too
                for info in self.replicas.replicas():
                    if info.deployment_id == request.deployment_id and info.replica_index not in known:
                        known.add(info.replica_index)
                        followed.append(_Followed(info))
            for f in followed:
                lines = await asyncio.to_thread(follow_lines, f, self.replicas)
                sent += await _send(call, f.info, lines)
        return sent


async def _send(call: Any, info: ReplicaInfo, lines: list[tuple[datetime | None, str]]) -> int:
    """Write ``lines`` of one replica in batches; how many."""
    batch = node_pb2.PushReplicaLogsRequest(replica_index=info.replica_index, generation=info.generation)
    size = 0
    for moment, text in lines:
        line = batch.lines.add(text=scrub(text, info.secrets))
        if moment is not None:
            line.time.FromDatetime(moment)
        size += len(line.text) + 16
        if len(batch.lines) >= BATCH_LINES or size >= BATCH_BYTES:
            await call.write(batch)
            batch = node_pb2.PushReplicaLogsRequest(
                replica_index=info.replica_index, generation=info.generation
            )
            size = 0
    if batch.lines:
        await call.write(batch)
    return len(lines)


async def _await(call: Any) -> Any:
    return await call


def _rpc_text(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


def register_log_handlers(handlers: Any, reader: ReplicaLogReader) -> None:
    """Answer ``read_replica_logs`` commands with ``reader``."""
    handlers.register("read_replica_logs", reader.read_replica_logs)
