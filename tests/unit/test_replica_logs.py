"""App logs in pieces: the log file's format and rotation, reading and following it,
scrubbing, ``since`` parsing, and the controller's pairing of pushes with reads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from automator67.v1 import node_pb2

from controller.agent.replica_logs import (
    _Followed,
    follow_lines,
    initial_lines,
    parse_line,
    scrub,
    secret_values,
)
from controller.agent.replica_process import ReplicaInfo, _ReplicaLog
from controller.deployments.logs import ReplicaLogSlots, parse_since
from controller.errors import InvalidArgument, NotFound


def info(path: Path, generation: int = 1) -> ReplicaInfo:
    return ReplicaInfo("d1", 0, generation, "running", "", "", 1, 0, path.parent, path)


class OneReplica:
    def __init__(self, replica: ReplicaInfo) -> None:
        self.replica = replica

    def get(self, deployment_id: str, replica_index: int) -> ReplicaInfo | None:
        return self.replica

    def replicas(self) -> list[ReplicaInfo]:
        return [self.replica]


def test_lines_are_stamped_split_and_rotated(tmp_path: Path) -> None:
    path = tmp_path / "replica.log"
    log = _ReplicaLog(path, max_bytes=10_000)
    log.write(b"first\nsecond\npart")
    moment, text = parse_line(path.read_bytes().split(b"\n")[0])
    assert text == "first"
    assert moment is not None
    assert abs(moment - datetime.now(UTC)) < timedelta(minutes=5)
    log.write(b"ial\n" + b"x" * 5000 + b"\n")  # a long line arrives in pieces of 4096
    for i in range(10):
        log.write(f"line {i}\n".encode())
    log.write(b"x" * 6000 + b"\n")  # over the cap: rotated
    log.write(b"no newline at the end")
    log.close()
    assert (tmp_path / "replica.log.1").exists()
    f = _Followed(info(path))
    lines = [t for _, t in initial_lines(f, None, 10_000)]
    f.close()
    assert lines[:4] == ["first", "second", "partial", "x" * 4096]
    assert lines[-1] == "no newline at the end"
    assert lines[-4] == "line 9"
    assert log.tail().endswith("no newline at the end")


def test_tail_since_and_follow_across_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "replica.log"
    log = _ReplicaLog(path, max_bytes=600)
    for i in range(5):
        log.write(f"old {i}\n".encode())
    f = _Followed(info(path))
    assert [t for _, t in initial_lines(f, None, 2)] == ["old 3", "old 4"]
    assert initial_lines(_Followed(info(path)), datetime.now(UTC) + timedelta(hours=1), 10) == []
    for i in range(20):  # rotates once
        log.write(f"new {i}\n".encode())
    replicas = OneReplica(info(path))
    seen = [t for _, t in follow_lines(f, replicas)]
    seen += [t for _, t in follow_lines(f, replicas)]
    assert seen == [f"new {i}" for i in range(20)]
    log.close()
    f.close()


def test_secret_env_values_and_credentials_are_masked() -> None:
    secrets = secret_values(
        {
            "API_TOKEN": "tok-1234",
            "GREETING": "hi",
            "MODE": "production",
            "DSN_URL": "x" * 20,
            "PIN_KEY": "abc",
        }
    )
    assert set(secrets) == {"tok-1234", "x" * 20}
    assert scrub("using tok-1234 and hi in production", secrets) == "using *** and hi in production"
    assert "hunter2" not in scrub("postgres://app:hunter2@db/x", ())


def test_since_is_a_duration_or_a_time() -> None:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert parse_since("", now) is None
    assert parse_since("10m", now) == now - timedelta(minutes=10)
    assert parse_since("1h30m", now) == now - timedelta(minutes=90)
    assert parse_since("2024-05-01T11:00:00Z", now) == now - timedelta(hours=1)
    for bad in ("10", "yesterday", "2024-05-01T11:00:00"):
        with pytest.raises(InvalidArgument):
            parse_since(bad, now)


async def _messages(
    *items: node_pb2.PushReplicaLogsRequest,
) -> AsyncIterator[node_pb2.PushReplicaLogsRequest]:
    for item in items:
        yield item


async def test_a_push_is_paired_with_its_read_from_its_own_node_only() -> None:
    slots = ReplicaLogSlots()
    slot = slots.open("c1", "node-a")
    with pytest.raises(NotFound):
        await slots.receive("node-b", _messages(node_pb2.PushReplicaLogsRequest(command_id="c1")))
    with pytest.raises(NotFound):
        await slots.receive("node-a", _messages(node_pb2.PushReplicaLogsRequest(command_id="other")))
    line = node_pb2.PushReplicaLogsRequest(replica_index=0, lines=[node_pb2.ReplicaLogLine(text="hello")])
    done = node_pb2.PushReplicaLogsRequest(done=True)
    assert await slots.receive(
        "node-a", _messages(node_pb2.PushReplicaLogsRequest(command_id="c1"), line, done)
    )
    assert (await slot.next()) == line
    assert (await slot.next()) == done
    slots.close(slot)
    assert len(slots) == 0
    assert await slot.next() is None


async def test_a_push_call_cancelled_under_its_reader_ends_the_read() -> None:
    """gRPC cancels the push handler when the node goes away mid-call: the read that waits
    for the call's lines (with no deadline) gets the failure instead of waiting for ever."""
    slots = ReplicaLogSlots()
    slot = slots.open("c1", "node-a")
    line = node_pb2.PushReplicaLogsRequest(replica_index=0, lines=[node_pb2.ReplicaLogLine(text="hello")])
    arrived = asyncio.Event()

    async def follow() -> AsyncIterator[node_pb2.PushReplicaLogsRequest]:
        yield node_pb2.PushReplicaLogsRequest(command_id="c1")
        yield line
        arrived.set()
        await asyncio.Event().wait()  # the node follows its log: the call stays open
        yield line  # never reached

    call = asyncio.ensure_future(slots.receive("node-a", follow()))
    await arrived.wait()
    call.cancel()  # the node was killed
    with pytest.raises(asyncio.CancelledError):
        await call
    assert slot.queue.qsize() == 2  # the line, then the end
    assert (await slot.next()) == line
    ended = await slot.next()
    assert ended is not None
    assert ended.done
    assert ended.error_message == "the node's log stream broke (CancelledError)"


async def test_a_reader_cancelled_as_the_end_arrives_loses_nothing() -> None:
    """A reader waits on a slot and on its command at once, and cancels its wait on the slot
    when the command ends first. When the agent dies both end in the same turn of the loop:
    the failure taken off the queue by the cancelled wait must reach the next one (it was
    lost, and the followed log's read on the dead node never ended)."""
    slots = ReplicaLogSlots()
    slot = slots.open("c1", "node-a")
    waiting = asyncio.ensure_future(slot.next())
    await asyncio.sleep(0)  # it waits on the queue
    end = node_pb2.PushReplicaLogsRequest(
        done=True, error_message="the node's log stream broke (AioRpcError)"
    )
    slot.queue.put_nowait(end)
    for _ in range(10):  # until the slot's own queue read has taken it, not yet the reader
        if slot.queue.empty():
            break
        await asyncio.sleep(0)
    assert slot.queue.empty()
    assert not waiting.done()
    waiting.cancel()  # the command ended first: the reader cancels its wait on the slot
    with pytest.raises(asyncio.CancelledError):
        await waiting
    slots.close(slot)  # so that a lost message reads as the end instead of a wait for ever
    assert (await slot.next()) == end
    assert await slot.next() is None


async def test_a_call_that_breaks_while_its_reader_is_behind_ends_after_the_queue() -> None:
    """The queue is full when gRPC cancels the push call: the reader gets every queued
    batch, then the failure (not a silent end that reads as a finished read)."""
    slots = ReplicaLogSlots(queue_batches=2)
    slot = slots.open("c1", "node-a")
    line = node_pb2.PushReplicaLogsRequest(replica_index=0, lines=[node_pb2.ReplicaLogLine(text="hello")])
    full = asyncio.Event()

    async def follow() -> AsyncIterator[node_pb2.PushReplicaLogsRequest]:
        yield node_pb2.PushReplicaLogsRequest(command_id="c1")
        yield line
        yield line
        full.set()
        yield line  # waits for room in the queue: the reader is behind
        await asyncio.Event().wait()

    call = asyncio.ensure_future(slots.receive("node-a", follow()))
    await full.wait()
    for _ in range(10):
        if slot.queue.full():
            break
        await asyncio.sleep(0)
    assert slot.queue.full()
    call.cancel()  # the node was killed
    with pytest.raises(asyncio.CancelledError):
        await call
    assert (await slot.next()) == line
    assert (await slot.next()) == line
    ended = await slot.next()
    assert ended is not None
    assert ended.done
    assert ended.error_message == "the node's log stream broke (CancelledError)"
    assert await slot.next() is None
