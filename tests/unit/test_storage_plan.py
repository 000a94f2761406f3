"""Pure storage decisions (paths, replication status, repair order, inventory, GC grace, rate
limit, ranges) and the data path's building blocks (sealing, shared transfer messages, the
agent's streamed chunk writes — around the page cache — and shared directory fsyncs)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from automator67.v1 import node_pb2

from controller.agent import chunk_store, chunks
from controller.errors import PermissionDenied
from controller.federation.storage import crypto, plan, transfers
from controller.federation.storage.plan import ChunkView, KnownChunk, NodeCondition, ReportedCopy

UP, AWAY, LOST = NodeCondition.UP, NodeCondition.AWAY, NodeCondition.LOST


def cond(**states: NodeCondition):  # type: ignore[no-untyped-def]
    return lambda node: states.get(node, UP)


def chunk(cid: str, copies: dict[str, str], replicas: int = 3, user: str = "u") -> ChunkView:
    return ChunkView(cid, user, replicas, 100, "c" * 64, copies)


@pytest.mark.parametrize("path", ["", "/abs", "a//b", "a/../b", "./a", "a/", "x" * 1025, "a\nb"])
def test_bad_paths_are_refused(path: str) -> None:
    assert plan.path_problem(path) is not None


def test_metadata_violations_name_each_field() -> None:
    fields = {v.field for v in plan.metadata_violations("../x", "not a mime", 9, -1, "XYZ")}
    assert fields == {
        "metadata.path",
        "metadata.mime_type",
        "metadata.replicas",
        "metadata.size",
        "metadata.sha256",
    }
    assert plan.metadata_violations("docs/a.pdf", "application/pdf", 3, 10, "") == []


def test_repair_plan_most_endangered_first_and_respects_away_lost_and_freeze() -> None:
    chunks = [
        chunk("a", {"n1": "ok", "n2": "ok", "n3": "ok"}),  # whole
        chunk("b", {"n1": "ok", "n2": "ok", "dead": "ok"}),  # one lost
        chunk("c", {"n1": "ok", "dead": "ok", "gone": "ok"}),  # two lost: first
        chunk("d", {"n1": "ok", "n2": "ok", "away": "ok"}),  # away still counts: waits
        chunk("e", {"away": "ok", "dead": "ok"}),  # nothing readable: waits
        chunk("f", {"n1": "ok"}, user="frozen"),
    ]
    c = cond(dead=LOST, gone=LOST, away=AWAY)
    tasks = plan.repair_plan(chunks, c, frozenset({"frozen"}))
    assert [t.chunk_id for t in tasks] == ["c", "b"]
    assert tasks[0].missing == 2
    assert tasks[0].sources == ("n1",)
    assert tasks[0].lost == ("dead", "gone")
    assert tasks[0].holders == frozenset({"n1", "dead", "gone"})


def test_replication_status() -> None:
    whole = [chunk("a", {"n1": "ok", "n2": "ok", "n3": "ok"})]
    assert plan.replication_status(whole, cond()) == plan.Replication.COMPLETE
    assert plan.replication_status(whole, cond(n3=AWAY)) == plan.Replication.DEGRADED
    assert plan.replication_status(whole, cond(n3=LOST), repairing=True) == plan.Replication.REPLICATING
    writing = [chunk("a", {"n1": "ok", "n2": "ok", "n3": "writing"})]
    assert plan.replication_status(writing, cond()) == plan.Replication.REPLICATING


def test_inventory_trims_stale_corrupt_and_unknown_reuses_wanted_and_finds_lost() -> None:
    good = "c" * 64
    known = {
        "live-counted": KnownChunk("live-counted", "live", good, 3, "ok", 2),
        "stale": KnownChunk("stale", "live", good, 3, None, 3),
        "wanted": KnownChunk("wanted", "live", good, 3, None, 2),
        "bad": KnownChunk("bad", "live", good, 3, "ok", 2),
        "garbage": KnownChunk("garbage", "garbage", good, 3, None, 0),
        "pending": KnownChunk("pending", "pending", good, 3, "writing", 0),
    }
    reported = [
        ReportedCopy("live-counted", good, 100),
        ReportedCopy("stale", good, 100),
        ReportedCopy("wanted", good, 100),
        ReportedCopy("bad", good, 100, corrupt=True),
        ReportedCopy("garbage", good, 100),
        ReportedCopy("pending", good, 100),
        ReportedCopy("unknown", good, 100),
    ]
    rows = {"live-counted": "ok", "bad": "ok", "pending": "writing", "lost": "ok"}
    decided = plan.reconcile_inventory(reported, known, rows, complete=True)
    assert sorted(decided.delete) == ["bad", "garbage", "stale", "unknown"]
    assert sorted(decided.drop_rows) == ["bad", "lost"]
    assert decided.reuse == ["wanted"]
    assert decided.repair
    partial = plan.reconcile_inventory(reported[:1], known, rows, complete=False)
    assert partial.drop_rows == []
    assert not partial.repair


def test_gc_waits_for_the_grace_period_on_an_injected_clock() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    grace = timedelta(hours=1)
    assert not plan.gc_due(at, at + grace - timedelta(seconds=1), grace)
    assert plan.gc_due(at, at + grace, grace)
    assert not plan.gc_due(None, at + 10 * grace, grace)


def test_token_bucket_limits_the_repair_rate() -> None:
    now = [0.0]
    bucket = plan.TokenBucket(rate=10.0, burst=10.0, clock=lambda: now[0])
    waits = [bucket.take() for _ in range(15)]
    assert waits[:10] == [0.0] * 10
    assert waits[10] == pytest.approx(0.1)
    assert waits[14] == pytest.approx(0.5)
    now[0] = 10.0
    assert bucket.take() == 0.0


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-0", (0, 1)),
        ("bytes=5-", (5, 5)),
        ("bytes=-3", (7, 3)),
        ("bytes=8-100", (8, 2)),
        ("bytes=1-2,4-5", None),
        ("items=1-2", None),
    ],
)
def test_ranges(header: str, expected: tuple[int, int] | None) -> None:
    assert plan.parse_range(header, 10) == expected


def test_unsatisfiable_range() -> None:
    with pytest.raises(ValueError, match="starts at 10"):
        plan.parse_range("bytes=10-", 10)


def test_a_sealed_chunk_opens_only_as_itself() -> None:
    key = crypto.new_data_key()
    sealed = crypto.seal_chunk(key, "c1", 0, b"secret")
    assert b"secret" not in sealed
    for other in (("c2", 0), ("c1", 1)):
        with pytest.raises(crypto.ChunkIntegrityError):
            crypto.open_chunk(key, *other, sealed)
    flipped = bytearray(sealed)
    flipped[-1] ^= 1
    with pytest.raises(crypto.ChunkIntegrityError):
        crypto.open_chunk(key, "c1", 0, bytes(flipped))


# -- the data path's building blocks ---------------------------------------------------------------


def test_a_sealed_chunk_opens_only_as_its_own_chunk_and_index() -> None:
    key = crypto.new_data_key()
    plaintext = os.urandom(3000)
    out = bytearray(len(plaintext) + crypto.OVERHEAD_BYTES)
    crypto.Sealer(key).seal_into("c1", 4, memoryview(plaintext), memoryview(out))
    assert crypto.open_chunk(key, "c1", 4, bytes(out)) == plaintext
    for chunk_id, index in (("c2", 4), ("c1", 5)):
        with pytest.raises(crypto.ChunkIntegrityError):
            crypto.open_chunk(key, chunk_id, index, bytes(out))
    with pytest.raises(ValueError, match="overhead"):
        crypto.Sealer(key).seal_into("c1", 4, plaintext, memoryview(out)[1:])


def test_a_payload_is_cut_into_shared_messages_and_outlives_its_buffer() -> None:
    buffer = bytearray(os.urandom(2 * transfers.PIECE_BYTES + 5))
    original = bytes(buffer)
    payload = transfers.Payload(memoryview(buffer), bytes)
    buffer[:] = b"\0" * len(buffer)  # the upload reuses its buffer at once
    assert payload.size == len(original)
    assert [len(m) for m in payload.messages] == [transfers.PIECE_BYTES, transfers.PIECE_BYTES, 5]
    assert b"".join(payload.messages) == original
    moves = transfers.Transfers()
    first, second = moves.offer("n1", payload), moves.offer("n2", payload)
    assert moves.serve("n1", first) is moves.serve("n2", second)  # made once, served to both
    with pytest.raises(PermissionDenied):
        moves.serve("n2", first)  # bound to its node
    assert transfers.Payload(b"", bytes).messages == [b""]


def test_a_whole_fetch_message_fits_the_agents_storage_channel() -> None:
    framing = 16  # field tag and length of FetchChunkResponse.data
    assert transfers.PIECE_BYTES + framing <= chunks.STORAGE_MESSAGE_BYTES


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16384, 1024 * 1024])
def test_fetch_chunk_data_reads_the_bytes_of_a_serialized_message(size: int) -> None:
    data = os.urandom(size)
    raw = node_pb2.FetchChunkResponse(data=data).SerializeToString()
    assert bytes(chunks.fetch_chunk_data(raw)) == data
    # Anything but the plain layout is parsed by protobuf (here: the field twice, last wins).
    twice = node_pb2.FetchChunkResponse(data=b"old").SerializeToString() + raw
    assert bytes(chunks.fetch_chunk_data(twice)) == (data or b"old")


def test_a_streamed_copy_is_kept_only_when_complete_and_verified(tmp_path: Path) -> None:
    store = chunk_store.ChunkStore(tmp_path / "chunks")
    data = os.urandom(5000)
    sha = hashlib.sha256(data).hexdigest()
    chunk_id = str(uuid.uuid4())

    writer = store.writer(chunk_id, len(data), sha)
    writer.add(memoryview(data)[:1000])
    writer.add(data[1000:])
    writer.commit()
    writer.close()
    assert store.read(chunk_id, sha) == data
    assert store.inventory()[0].sha256 == sha

    for pieces, size, problem in (
        ([data[:4000]], len(data), "got 4000 bytes"),
        ([data[:-1] + b"x"], len(data), "SHA-256"),
    ):
        other = str(uuid.uuid4())
        writer = store.writer(other, size, sha)
        for piece in pieces:
            writer.add(piece)
        with pytest.raises(ValueError, match=problem):
            writer.commit()
        writer.close()
        with pytest.raises(FileNotFoundError):
            store.read(other, sha)
    writer = store.writer(str(uuid.uuid4()), 10, sha)
    with pytest.raises(ValueError, match="more than 10 bytes"):
        writer.add(b"x" * 11)
    writer.close()
    assert [p.name for p in (tmp_path / "chunks").iterdir()] == [chunk_id]  # no temporary files left


def test_concurrent_copies_share_directory_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While one directory fsync runs, every copy renamed meanwhile waits for the next
    one, which covers them all: 1 + 1 fsyncs for 8 copies, and none returns before its
    rename is covered."""
    store = chunk_store.ChunkStore(tmp_path / "chunks")
    real_fsync = os.fsync
    directory_syncs: list[int] = []
    first_may_finish = threading.Event()

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            directory_syncs.append(fd)
            if len(directory_syncs) == 1:
                assert first_may_finish.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(chunk_store.os, "fsync", fsync)
    data = b"abc"
    sha = hashlib.sha256(data).hexdigest()
    finished: list[str] = []

    def put(chunk_id: str) -> None:
        store.write(chunk_id, data, len(data), sha)
        finished.append(chunk_id)

    ids = [str(uuid.uuid4()) for _ in range(8)]
    threads = [threading.Thread(target=put, args=(ids[0],))]
    threads[0].start()
    deadline = time.monotonic() + 10
    while not directory_syncs and time.monotonic() < deadline:
        threading.Event().wait(0.001)
    threads += [threading.Thread(target=put, args=(i,)) for i in ids[1:]]
    for thread in threads[1:]:
        thread.start()
    while store._dir_wanted < len(ids) and time.monotonic() < deadline:
        threading.Event().wait(0.001)
    assert finished == []  # nobody is acknowledged before a directory fsync covers it
    first_may_finish.set()
    for thread in threads:
        thread.join(10)
    assert sorted(finished) == sorted(ids)
    assert len(directory_syncs) == 2


@pytest.mark.parametrize(
    "size",
    [
        0,
        1,
        chunk_store.ALIGN - chunk_store.HEADER_BYTES,  # the file exactly one block
        chunk_store.ALIGN,
        chunk_store.STAGING_BYTES - chunk_store.HEADER_BYTES,  # exactly one staging buffer
        chunk_store.STAGING_BYTES,
        2 * chunk_store.STAGING_BYTES + 12345,
    ],
)
def test_a_copy_written_around_the_page_cache_has_the_usual_layout(tmp_path: Path, size: int) -> None:
    """Whatever its length (the last block padded, then cut), a copy's file is the header
    and the bytes, as read, inventoried and scrubbed; staging buffers are reused."""
    store = chunk_store.ChunkStore(tmp_path / "chunks")
    for _ in range(2):
        data = os.urandom(size)
        sha = hashlib.sha256(data).hexdigest()
        chunk_id = str(uuid.uuid4())
        writer = store.writer(chunk_id, size, sha)
        try:
            third = size // 3
            writer.add_all([data[:third], memoryview(data)[third : 2 * third]])
            writer.finish([data[2 * third :]])
        finally:
            writer.close()
        raw = (tmp_path / "chunks" / chunk_id).read_bytes()
        assert raw == chunk_store.MAGIC + sha.encode() + b"\n" + data
        assert store.read(chunk_id, sha) == data
        assert store.scrub_one(chunk_id) is None
    assert len(store._buffers) == 1  # the second copy reused the first one's buffer
    assert sorted(p.name for p in (tmp_path / "chunks").iterdir() if p.name.startswith(".tmp")) == []


def test_a_file_system_that_refuses_direct_writes_gets_them_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = chunk_store.ChunkStore(tmp_path / "chunks")
    real_write = os.write
    refused: list[int] = []

    def write(fd: int, data: bytes | memoryview) -> int:
        if os.O_DIRECT & fcntl.fcntl(fd, fcntl.F_GETFL):
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(chunk_store.os, "write", write)
    data = os.urandom(chunk_store.STAGING_BYTES + 100)
    sha = hashlib.sha256(data).hexdigest()
    for _ in range(2):
        chunk_id = str(uuid.uuid4())
        writer = store.writer(chunk_id, len(data), sha)
        try:
            writer.finish([data])
        finally:
            writer.close()
        assert store.read(chunk_id, sha) == data
    assert len(refused) == 1  # refused once: the store writes through the page cache since
    assert not store.direct
