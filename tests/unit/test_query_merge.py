"""The merge: NULL ordering per dialect, ties, LIMIT/OFFSET, partial aggregates, evaluation."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import pytest

from controller.errors import InvalidArgument
from controller.federation.query.merge import (
    AggRef,
    Aggregate,
    Apply,
    Const,
    GroupedMerge,
    OrderTerm,
    OutputColumn,
    OutputRef,
    RowsMerge,
    Slot,
    SortKey,
    arithmetic,
    average,
    iter_rows,
    merge_groups,
    merge_rows,
    numeric_divide,
    sql_less,
)
from controller.federation.query.parse import DIALECTS

SQLITE = DIALECTS["sqlite"]
POSTGRES = DIALECTS["postgres"]

SHARDS_WITH_NULLS = [[(None,), (1,), (5,)], [(None,), (2,), (3,)], []]


def rows_merge(
    *order: SortKey, offset: int = 0, limit: int | None = None, distinct: bool = False
) -> RowsMerge:
    return RowsMerge(order=order, distinct=distinct, offset=offset, limit=limit, hidden=0)


@pytest.mark.parametrize(
    ("rules", "descending", "nulls_first", "shards", "expected"),
    [
        pytest.param(
            SQLITE, False, None, SHARDS_WITH_NULLS, [None, None, 1, 2, 3, 5], id="sqlite-asc-nulls-first"
        ),
        pytest.param(
            SQLITE,
            True,
            None,
            [[(5,), (1,), (None,)], [(3,), (2,), (None,)]],
            [5, 3, 2, 1, None, None],
            id="sqlite-desc-nulls-last",
        ),
        pytest.param(
            POSTGRES,
            False,
            None,
            [[(1,), (5,), (None,)], [(2,), (3,), (None,)]],
            [1, 2, 3, 5, None, None],
            id="postgres-asc-nulls-last",
        ),
        pytest.param(
            POSTGRES,
            True,
            None,
            [[(None,), (5,), (1,)], [(None,), (3,), (2,)]],
            [None, None, 5, 3, 2, 1],
            id="postgres-desc-nulls-first",
        ),
        pytest.param(
            POSTGRES,
            False,
            True,
            [[(None,), (1,), (5,)], [(2,), (3,)]],
            [None, 1, 2, 3, 5],
            id="explicit-nulls-first-overrides-postgres",
        ),
        pytest.param(
            SQLITE,
            True,
            True,
            [[(None,), (5,)], [(None,), (2,)]],
            [None, None, 5, 2],
            id="explicit-desc-nulls-first-overrides-sqlite",
        ),
    ],
)
def test_k_way_merge_orders_nulls_as_the_dialect_does(
    rules: object,
    descending: bool,
    nulls_first: bool | None,
    shards: list[list[tuple[object]]],
    expected: list[object],
) -> None:
    spec = rows_merge(SortKey(0, descending, nulls_first))
    assert [r[0] for r in merge_rows(spec, shards, rules)] == expected  # type: ignore[arg-type]


def test_ties_keep_shard_order() -> None:
    shards = [[(1, "a0"), (2, "a1")], [(1, "b0"), (2, "b1")], [(1, "c0")]]
    merged = merge_rows(rows_merge(SortKey(0)), shards, SQLITE)
    assert [r[1] for r in merged] == ["a0", "b0", "c0", "a1", "b1"]


def test_limit_and_offset_apply_after_the_merge() -> None:
    shards = [[(1,), (4,), (7,)], [(2,), (5,), (8,)], [(3,), (6,), (9,)]]
    assert merge_rows(rows_merge(SortKey(0), offset=2, limit=3), shards, SQLITE) == [(3,), (4,), (5,)]
    assert merge_rows(rows_merge(SortKey(0), offset=8, limit=5), shards, SQLITE) == [(9,)]
    assert merge_rows(rows_merge(SortKey(0), limit=0), shards, SQLITE) == []


def test_multi_column_mixed_directions_and_hidden_columns() -> None:
    spec = RowsMerge(order=(SortKey(-1, True), SortKey(0)), distinct=False, offset=0, limit=None, hidden=1)
    shards = [[("b", 2), ("a", 1)], [("a", 2), ("c", 1)]]
    assert merge_rows(spec, shards, POSTGRES) == [("a",), ("b",), ("a",), ("c",)]


def test_distinct_dedupes_across_shards() -> None:
    shards = [[("new",), ("paid",)], [("new",), ("shipped",)]]
    assert merge_rows(rows_merge(SortKey(0), distinct=True), shards, SQLITE) == [
        ("new",),
        ("paid",),
        ("shipped",),
    ]


def test_rows_merge_streams_and_stops_at_the_limit() -> None:
    consumed: list[int] = []

    def shard(start: int) -> Iterator[tuple[int]]:
        for value in range(start, 1_000_000, 2):
            consumed.append(value)
            yield (value,)

    merged = list(iter_rows(rows_merge(SortKey(0), limit=5), [shard(0), shard(1)], SQLITE))
    assert merged == [(0,), (1,), (2,), (3,), (4,)]
    assert len(consumed) < 10


def test_values_compare_as_sql_does() -> None:
    assert sql_less(1, 1.5)
    assert sql_less(Decimal("1.25"), 2)
    assert sql_less(99, "1")  # SQLite: numbers before text
    assert sql_less("B", "a")  # code point order
    assert not sql_less(b"a", "z")  # text before blobs


def grouped(**overrides: object) -> GroupedMerge:
    values: dict[str, object] = {
        "group_columns": (0,),
        "carried_columns": (0,),
        "aggregates": (),
        "outputs": (),
        "having": None,
        "order": (),
        "distinct": False,
        "offset": 0,
        "limit": None,
        "scalar": False,
    }
    values.update(overrides)
    return GroupedMerge(**values)  # type: ignore[arg-type]


def test_avg_over_nulls_is_sum_over_count_and_null_when_no_values() -> None:
    # shard rows: (group, partial SUM(x), partial COUNT(x))
    spec = grouped(
        aggregates=(Aggregate("avg", (1, 2)),),
        outputs=(OutputColumn("g", Slot(0)), OutputColumn("a", AggRef(0))),
        order=(OrderTerm(OutputRef(0)),),
    )
    shards = [[("x", 10, 2), ("y", None, 0)], [("x", 5, 1), ("y", None, 0)], [("z", 3, 2)]]
    assert merge_groups(spec, shards, SQLITE) == [("x", 5.0), ("y", None), ("z", 1.5)]
    assert merge_groups(spec, shards, POSTGRES)[0] == ("x", Decimal("5.0000000000000000"))


def test_count_distinct_counts_values_seen_on_any_shard_once() -> None:
    # shard rows: (group, distinct value, partial COUNT(*))
    spec = grouped(
        aggregates=(Aggregate("count_distinct", (1,)), Aggregate("count", (2,))),
        outputs=(OutputColumn("g", Slot(0)), OutputColumn("d", AggRef(0)), OutputColumn("n", AggRef(1))),
    )
    shards = [[("a", 1, 3), ("a", 2, 1), ("a", None, 4)], [("a", 2, 5), ("a", 3, 1)], [("b", None, 2)]]
    assert sorted(merge_groups(spec, shards, SQLITE)) == [("a", 3, 14), ("b", 0, 2)]


def test_scalar_aggregates_over_nothing_give_one_row() -> None:
    spec = grouped(
        group_columns=(),
        carried_columns=(),
        scalar=True,
        aggregates=(Aggregate("count", (0,)), Aggregate("sum", (1,)), Aggregate("count_distinct", (2,))),
        outputs=(OutputColumn("n", AggRef(0)), OutputColumn("s", AggRef(1)), OutputColumn("d", AggRef(2))),
    )
    assert merge_groups(spec, [[], []], SQLITE) == [(0, None, 0)]
    assert merge_groups(spec, [[(0, None, None)], [(2, None, 7)]], SQLITE) == [(2, None, 1)]


def test_having_order_and_limit_run_after_the_merge() -> None:
    # Each shard alone would keep the wrong groups: the merge sees the totals.
    spec = grouped(
        aggregates=(Aggregate("count", (1,)),),
        outputs=(OutputColumn("g", Slot(0)), OutputColumn("n", AggRef(0))),
        having=Apply(">", (AggRef(0), Const(3))),
        order=(OrderTerm(OutputRef(1), descending=True), OrderTerm(OutputRef(0))),
        limit=2,
    )
    shards = [[("a", 3), ("b", 2), ("c", 1)], [("b", 2), ("c", 3), ("d", 9)], [("a", 1)]]
    assert merge_groups(spec, shards, SQLITE) == [("d", 9), ("a", 4)]


def test_min_max_over_strings_and_sum_of_all_nulls() -> None:
    spec = grouped(
        group_columns=(),
        carried_columns=(),
        scalar=True,
        aggregates=(Aggregate("min", (0,)), Aggregate("max", (0,)), Aggregate("sum", (1,))),
        outputs=(OutputColumn("lo", AggRef(0)), OutputColumn("hi", AggRef(1)), OutputColumn("s", AggRef(2))),
    )
    shards = [[("Margaret", None)], [(None, None)], [("Ada", None)], [("linus", None)]]
    assert merge_groups(spec, shards, POSTGRES) == [("Ada", "linus", None)]


@pytest.mark.parametrize(
    ("op", "a", "b", "rules", "expected"),
    [
        ("/", 7, 2, SQLITE, 3),
        ("/", -7, 2, POSTGRES, -3),
        ("/", 7.0, 2, SQLITE, 3.5),
        ("/", Decimal(10), 3, POSTGRES, Decimal("3.3333333333333333")),
        ("/", 1, 0, SQLITE, None),
        ("%", -7, 3, SQLITE, -1),
        ("+", None, 1, SQLITE, None),
        ("*", Decimal("1.5"), 2.0, POSTGRES, 3.0),
    ],
)
def test_arithmetic_follows_sql(op: str, a: object, b: object, rules: object, expected: object) -> None:
    assert arithmetic(op, a, b, rules) == expected  # type: ignore[arg-type]


def test_division_by_zero_is_an_error_in_postgres() -> None:
    with pytest.raises(InvalidArgument, match="division by zero"):
        arithmetic("/", 1, 0, POSTGRES)


def test_numeric_division_uses_postgres_scale() -> None:
    # Values checked against PostgreSQL 15: SELECT 10::numeric / 3, 123456::numeric / 10, ...
    assert numeric_divide(Decimal(10), Decimal(3)) == Decimal("3.3333333333333333")
    assert str(numeric_divide(Decimal(123456), Decimal(10))) == "12345.600000000000"
    assert str(numeric_divide(Decimal("1.50"), Decimal(4))) == "0.37500000000000000000"
    assert str(average(Decimal("30.10"), 3, POSTGRES)) == "10.0333333333333333"


def test_three_valued_logic_in_having() -> None:
    spec = grouped(
        aggregates=(Aggregate("sum", (1,)),),
        outputs=(OutputColumn("g", Slot(0)),),
        having=Apply("or", (Apply(">", (AggRef(0), Const(5))), Apply("is_null", (AggRef(0),)))),
    )
    shards = [[("a", None), ("b", 9), ("c", 1)]]
    assert sorted(merge_groups(spec, shards, SQLITE)) == [("a",), ("b",)]


def test_round_and_case_evaluate_per_dialect() -> None:
    spec = grouped(
        group_columns=(),
        carried_columns=(),
        scalar=True,
        aggregates=(Aggregate("avg", (0, 1)),),
        outputs=(
            OutputColumn("r", Apply("round", (AggRef(0), Const(1)))),
            OutputColumn(
                "c", Apply("case", (Apply(">", (AggRef(0), Const(2))), Const("big"), Const("small")))
            ),
        ),
    )
    assert merge_groups(spec, [[(5, 2)]], SQLITE) == [(2.5, "big")]
    assert merge_groups(spec, [[(5, 2)]], POSTGRES) == [(Decimal("2.5"), "big")]
