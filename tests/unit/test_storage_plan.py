"""Pure storage decisions: paths, replication status, repair order, inventory, GC grace, rate limit, ranges."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from controller.federation.storage import crypto, plan
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
