"""Declared collations end to end: ApplySchema records them, the router refuses merges by them.

Real controller, real agents serving SQLite shards (the fixtures of test_query_api.py).
"""

from __future__ import annotations

import grpc
import pytest
from automator67.v1 import query_pb2

from tests.integration.test_query_api import (  # noqa: F401  (fixtures)
    _query,
    _reason,
    _rows,
    controller,
    fleet,
    setup,
)
from tests.support import bearer


async def test_a_nocase_column_is_recorded_and_merges_by_it_are_refused(setup: tuple) -> None:  # noqa: F811
    stub, token, db_id, _ = setup
    await stub.ApplySchema(
        query_pb2.ApplySchemaRequest(
            db_id=db_id,
            ddl="CREATE TABLE tags (customer_id INTEGER NOT NULL, tag TEXT COLLATE NOCASE, note TEXT)",
        ),
        metadata=bearer(token),
    )
    rows = ", ".join(
        f"({i}, '{t}', '{t}')" for i, t in enumerate(["Red", "red", "RED", "blue", "Blue", "green"])
    )
    await _query(stub, token, db_id, f"INSERT INTO tags (customer_id, tag, note) VALUES {rows}")

    for sql in (
        "SELECT tag, COUNT(*) FROM tags GROUP BY tag",
        "SELECT COUNT(DISTINCT tag) FROM tags",
        "SELECT DISTINCT tag FROM tags",
        "SELECT tag FROM tags ORDER BY tag",
        "SELECT note, COUNT(*) FROM tags GROUP BY note COLLATE NOCASE",
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _query(stub, token, db_id, sql)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, sql
        assert _reason(caught.value) == "CROSS_SHARD_COLLATE", sql
        assert "NOCASE" in (caught.value.details() or ""), sql

    # What the merge does not compare by is answered, exactly.
    answered = await _query(
        stub, token, db_id, "SELECT lower(tag) AS t, COUNT(*) FROM tags GROUP BY lower(tag)"
    )
    assert sorted(_rows(answered)) == [["blue", 2], ["green", 1], ["red", 3]]
    matched = await _query(stub, token, db_id, "SELECT COUNT(*) FROM tags WHERE tag = 'RED'")
    assert _rows(matched) == [[3]]  # each shard compares with NOCASE itself
    ordered = await _query(stub, token, db_id, "SELECT note FROM tags ORDER BY note")
    assert [r[0] for r in _rows(ordered)] == ["Blue", "RED", "Red", "blue", "green", "red"]
