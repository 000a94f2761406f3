"""Routing: layouts, shard pruning per strategy, INSERT splitting, refusals, the plan cache.

``golden/query_plans.sql`` holds statements and, under each, the plan the router makes
(shards, shard SQL, merge). Regenerate it after a deliberate change with
``A67_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_query_route.py`` and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from automator67.v1 import query_pb2
from google.protobuf import struct_pb2

from controller.errors import FailedPrecondition, InvalidArgument
from controller.federation.query import (
    PlanCache,
    ShardLayout,
    canonical_key,
    key_type_from_sql,
    layout_from_proto,
    plan_sql,
    validate_layout,
)
from controller.federation.query.layout import AmbiguousKey
from controller.federation.query.merge import GroupedMerge, RowsMerge, WriteMerge

SCHEMA = {
    "orders": ["id", "customer_id", "amount", "status", "created_at"],
    "customers": ["customer_id", "name", "region"],
    "regions": ["name", "label"],
    "items": ["order_id", "sku"],
}
REFERENCE = frozenset({"regions"})
HASH = ShardLayout("hash", 4, "customer_id", reference_tables=REFERENCE, key_type="integer")
RANGE = ShardLayout(
    "range",
    3,
    "customer_id",
    ranges=[(None, 100, 0), (100, 200, 1), (200, None, 2)],
    reference_tables=REFERENCE,
    key_type="integer",
)
DIRECTORY = ShardLayout(
    "directory",
    3,
    "customer_id",
    directory={1: 0, 2: 1, 3: 2, 4: 0, 150: 2},
    reference_tables=REFERENCE,
    key_type="integer",
)
ITEMS_ON_ORDER = ShardLayout(
    "hash", 4, "customer_id", reference_tables=REFERENCE, sharded_tables={"items": "order_id"}
)
GOLDEN = Path(__file__).parent / "golden" / "query_plans.sql"


def shards(sql: str, layout: ShardLayout = HASH, dialect: str = "sqlite") -> tuple[int, ...]:
    return plan_sql(sql, dialect, layout, SCHEMA).shards


# -- layouts -----------------------------------------------------------------------------------


def test_hash_placement_is_stable_across_processes_and_versions() -> None:
    layout = ShardLayout("hash", 4, "k")
    assert [layout.shard_for(k) for k in range(1, 13)] == [0, 2, 3, 2, 0, 2, 3, 3, 0, 1, 2, 0]
    assert [layout.shard_for(name) for name in ("alice", "bob", "carol")] == [3, 1, 3]


@pytest.mark.parametrize(
    ("value", "key_type", "expected"),
    [
        (5, None, 5),
        (5.0, None, 5),
        ("5", None, 5),
        (True, None, 1),
        ("abc", None, "abc"),
        (2.5, None, 2.5),
        ("05", "integer", 5),
        (" 7 ", "numeric", 7),
        (5, "text", "5"),
        ("05", "text", "05"),
        (None, None, None),
    ],
)
def test_canonical_keys(value: object, key_type: str | None, expected: object) -> None:
    assert canonical_key(value, key_type) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "key_type"), [("05", None), ("1e3", None), (2.5, "text"), (float("nan"), None)]
)
def test_ambiguous_keys(value: object, key_type: str | None) -> None:
    with pytest.raises(AmbiguousKey):
        canonical_key(value, key_type)  # type: ignore[arg-type]


def test_key_type_from_declared_types() -> None:
    assert [key_type_from_sql(t) for t in ("INTEGER", "bigint", "TEXT", "uuid", "NUMERIC(10,2)", "blob")] == [
        "integer",
        "integer",
        "text",
        "text",
        "numeric",
        None,
    ]


@pytest.mark.parametrize(
    ("layout", "field", "fragment"),
    [
        (ShardLayout("hash", 0, "k"), "sharding.shard_count", "between 1"),
        (ShardLayout("mod", 2, "k"), "sharding.strategy", "one of"),  # type: ignore[arg-type]
        (ShardLayout("hash", 2, ""), "sharding.sharding_key", "column name"),
        (ShardLayout("range", 2, "k", ranges=[]), "sharding.ranges", "at least one"),
        (
            ShardLayout("range", 2, "k", ranges=[(None, 10, 0), (5, None, 1)]),
            "sharding.ranges[1].lower",
            "overlaps",
        ),
        (
            ShardLayout("range", 2, "k", ranges=[(None, 10, 0), (20, None, 1)]),
            "sharding.ranges[1].lower",
            "no shard",
        ),
        (
            ShardLayout("range", 2, "k", ranges=[(0, 10, 0), (10, None, 1)]),
            "sharding.ranges[0].lower",
            "unbounded",
        ),
        (
            ShardLayout("range", 2, "k", ranges=[(None, 10, 0), (10, 20, 1)]),
            "sharding.ranges[1].upper",
            "unbounded",
        ),
        (
            ShardLayout("range", 2, "k", ranges=[(None, 10, 0), (10, None, 5)]),
            "sharding.ranges[1].shard_index",
            "0 and 1",
        ),
        (
            ShardLayout("range", 2, "k", ranges=[(None, 10, 0), ("x", None, 1)]),
            "sharding.ranges[1].lower",
            "one type",
        ),
        (ShardLayout("directory", 2, "k", directory={}), "sharding.directory", "at least one"),
        (ShardLayout("directory", 2, "k", directory={1: 3}), "sharding.directory[0].shard_index", "0 and 1"),
        (
            ShardLayout("directory", 2, "k", directory={1: 0, "1": 1}),
            "sharding.directory[1].key",
            "also mapped",
        ),
        (ShardLayout("hash", 2, "k", ranges=[(None, None, 0)]), "sharding.ranges", "only range"),
    ],
)
def test_invalid_layouts_are_field_violations(layout: ShardLayout, field: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_layout(layout)
    matching = [v for v in caught.value.field_violations if v.field == field]
    assert matching, caught.value.field_violations
    assert fragment in matching[0].description


@pytest.mark.parametrize("layout", [HASH, RANGE, DIRECTORY])
def test_valid_layouts_pass(layout: ShardLayout) -> None:
    validate_layout(layout)


def test_layout_from_proto_validates_and_converts() -> None:
    message = query_pb2.Sharding(
        strategy=query_pb2.SHARDING_STRATEGY_DIRECTORY,
        shard_count=2,
        sharding_key="customer_id",
        reference_tables=["regions"],
        directory=[
            query_pb2.DirectoryEntry(key=struct_pb2.Value(number_value=7), shard_index=1),
            query_pb2.DirectoryEntry(key=struct_pb2.Value(string_value="vip"), shard_index=0),
        ],
    )
    layout = layout_from_proto(message, key_type="integer", version=3)
    assert (layout.shard_for(7), layout.shard_for("7"), layout.version) == (1, 1, 3)
    assert layout.key_column("regions") is None
    message.directory.append(query_pb2.DirectoryEntry(key=struct_pb2.Value(number_value=7), shard_index=0))
    with pytest.raises(InvalidArgument) as caught:
        layout_from_proto(message)
    assert [v.field for v in caught.value.field_violations] == ["sharding.directory[2].key"]
    with pytest.raises(InvalidArgument) as unspecified:
        layout_from_proto(query_pb2.Sharding(shard_count=2, sharding_key="k"))
    assert "sharding.strategy" in [v.field for v in unspecified.value.field_violations]


def test_directory_key_without_entry_cannot_be_inserted() -> None:
    with pytest.raises(FailedPrecondition, match="no directory entry for key 99"):
        plan_sql("INSERT INTO orders (id, customer_id) VALUES (1, 99)", "sqlite", DIRECTORY, SCHEMA)


# -- pruning -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "where", "expected"),
    [
        pytest.param(HASH, "customer_id = 2", (2,), id="hash-equality"),
        pytest.param(HASH, "2 = customer_id", (2,), id="hash-equality-flipped"),
        pytest.param(HASH, "customer_id = '2'", (2,), id="hash-string-literal"),
        pytest.param(HASH, "customer_id IN (1, 2, 3)", (0, 2, 3), id="hash-in-list"),
        pytest.param(HASH, "customer_id IN (1, 5, 9)", (0,), id="hash-in-list-one-shard"),
        pytest.param(HASH, "customer_id = 1 OR customer_id = 10", (0, 1), id="hash-or"),
        pytest.param(HASH, "customer_id IN (1, 2) AND customer_id = 2", (2,), id="hash-and-intersects"),
        pytest.param(HASH, "customer_id = 2 AND amount > 5", (2,), id="hash-and-other-predicate"),
        pytest.param(HASH, "customer_id = 2 OR amount > 5", (0, 1, 2, 3), id="hash-or-other-predicate"),
        pytest.param(HASH, "customer_id > 2", (0, 1, 2, 3), id="hash-range-is-every-shard"),
        pytest.param(HASH, "customer_id <> 2", (0, 1, 2, 3), id="hash-not-equal"),
        pytest.param(HASH, "NOT customer_id = 2", (0, 1, 2, 3), id="hash-not"),
        pytest.param(HASH, "customer_id = NULL", (0,), id="null-matches-nothing"),
        pytest.param(HASH, "customer_id + 0 = 2", (0, 1, 2, 3), id="expression-on-key"),
        pytest.param(RANGE, "customer_id = 150", (1,), id="range-equality"),
        pytest.param(RANGE, "customer_id < 100", (0,), id="range-less"),
        pytest.param(RANGE, "customer_id <= 100", (0, 1), id="range-less-equal-boundary"),
        pytest.param(RANGE, "customer_id >= 200", (2,), id="range-greater-equal"),
        pytest.param(RANGE, "150 < customer_id", (1, 2), id="range-flipped"),
        pytest.param(RANGE, "customer_id BETWEEN 50 AND 150", (0, 1), id="range-between"),
        pytest.param(RANGE, "customer_id > 120 AND customer_id < 180", (1,), id="range-and"),
        pytest.param(RANGE, "customer_id < 50 OR customer_id > 250", (0, 2), id="range-or"),
        pytest.param(RANGE, "customer_id IN (5, 250)", (0, 2), id="range-in"),
        pytest.param(DIRECTORY, "customer_id = 2", (1,), id="directory-lookup"),
        pytest.param(DIRECTORY, "customer_id IN (1, 3)", (0, 2), id="directory-in"),
        pytest.param(DIRECTORY, "customer_id = 99", (0,), id="directory-unknown-key-runs-once-empty"),
        pytest.param(DIRECTORY, "customer_id BETWEEN 1 AND 2", (0, 1), id="directory-range-enumerates-keys"),
        pytest.param(DIRECTORY, "customer_id > 100", (2,), id="directory-greater"),
    ],
)
def test_pruning(layout: ShardLayout, where: str, expected: tuple[int, ...]) -> None:
    assert shards("SELECT * FROM orders WHERE " + where, layout) == expected


def test_range_inequalities_need_a_key_type() -> None:
    untyped = ShardLayout("range", 2, "customer_id", ranges=[(None, 100, 0), (100, None, 1)])
    assert shards("SELECT * FROM orders WHERE customer_id < 50", untyped) == (0, 1)
    assert shards("SELECT * FROM orders WHERE customer_id = 50", untyped) == (0,)


def test_ambiguous_literal_reads_every_shard_without_a_key_type() -> None:
    untyped = ShardLayout("hash", 4, "customer_id")
    assert shards("SELECT * FROM orders WHERE customer_id = '05'", untyped) == (0, 1, 2, 3)
    with pytest.raises(InvalidArgument) as caught:
        plan_sql("INSERT INTO orders (id, customer_id) VALUES (1, '05')", "sqlite", untyped, SCHEMA)
    assert caught.value.reason == "AMBIGUOUS_SHARDING_KEY"


def test_pruning_through_a_co_located_join_and_using() -> None:
    assert shards(
        "SELECT * FROM orders o JOIN customers c ON c.customer_id = o.customer_id WHERE c.customer_id = 2"
    ) == (2,)
    assert shards("SELECT * FROM orders JOIN customers USING (customer_id) WHERE customer_id = 2") == (2,)


def test_reference_tables_alone_run_on_one_shard() -> None:
    plan = plan_sql("SELECT * FROM regions ORDER BY name", "postgres", HASH, SCHEMA)
    assert plan.shards == (0,)
    assert plan.merge is None


def test_single_shard_statements_pass_through_unchanged() -> None:
    sql = (
        "SELECT  status, count(*)  FROM orders WHERE customer_id = 2 GROUP BY status ORDER BY 2 DESC LIMIT 3"
    )
    plan = plan_sql(sql, "sqlite", HASH, SCHEMA)
    assert plan.shard_sql == {2: sql}
    assert plan.merge is None


# -- writes ------------------------------------------------------------------------------------


def test_multi_row_insert_is_split_by_key() -> None:
    plan = plan_sql(
        "INSERT INTO orders (id, customer_id, amount) VALUES (10, 1, 1.5), (11, 2, NULL), (12, 5, 3), (13, 3, 4)",
        "sqlite",
        HASH,
        SCHEMA,
    )
    assert plan.shards == (0, 2, 3)
    assert plan.shard_sql == {
        0: "INSERT INTO orders (id, customer_id, amount) VALUES (10, 1, 1.5), (12, 5, 3)",
        2: "INSERT INTO orders (id, customer_id, amount) VALUES (11, 2, NULL)",
        3: "INSERT INTO orders (id, customer_id, amount) VALUES (13, 3, 4)",
    }
    assert plan.merge == WriteMerge("sum")


def test_insert_on_one_shard_keeps_the_original_text() -> None:
    sql = "INSERT INTO orders (id, customer_id) VALUES (1, 1), (2, 5)"
    plan = plan_sql(sql, "sqlite", HASH, SCHEMA)
    assert plan.shard_sql == {0: sql}


def test_reference_table_writes_go_to_every_shard_counted_once() -> None:
    plan = plan_sql("INSERT INTO regions (name, label) VALUES ('eu', 'Europe')", "sqlite", HASH, SCHEMA)
    assert plan.shards == (0, 1, 2, 3)
    assert plan.merge == WriteMerge("first")


def test_insert_without_a_column_list_takes_the_schema_order() -> None:
    # sqllogictest loads its data this way: INSERT INTO tab0 VALUES(83,0,38)
    plan = plan_sql(
        "INSERT INTO orders VALUES (1, 7, 3, 'x', 'y'), (2, 8, 4, 'z', 'w')", "postgres", HASH, SCHEMA
    )
    by_key = plan_sql(
        "INSERT INTO orders (id, customer_id, amount, status, created_at) VALUES (1, 7, 3, 'x', 'y'), "
        "(2, 8, 4, 'z', 'w')",
        "postgres",
        HASH,
        SCHEMA,
    )
    assert plan.shards == by_key.shards
    assert [plan.shard_sql[s].split(" VALUES ")[1] for s in plan.shards] == [
        by_key.shard_sql[s].split(" VALUES ")[1] for s in by_key.shards
    ]


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("INSERT INTO orders (id, amount) VALUES (1, 2)", "SHARDING_KEY_MISSING"),
        ("INSERT INTO orders VALUES (1, 2, 3)", "INSERT_ARITY"),
        ("INSERT INTO orders (id, customer_id) VALUES (1, NULL)", "NULL_SHARDING_KEY"),
        ("INSERT INTO orders (id, customer_id) VALUES (1, 1 + 1)", "SHARDING_KEY_NOT_LITERAL"),
        ("INSERT INTO orders (id, customer_id) VALUES (1)", "INSERT_ARITY"),
    ],
)
def test_inserts_without_a_usable_key_are_invalid(sql: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        plan_sql(sql, "postgres", HASH, SCHEMA)
    assert caught.value.reason == reason


def test_update_and_delete_route_by_key_or_scatter() -> None:
    assert shards("UPDATE orders SET amount = 1 WHERE customer_id = 2") == (2,)
    assert shards("DELETE FROM orders WHERE customer_id IN (1, 3)") == (0, 3)
    assert shards("DELETE FROM orders WHERE amount > 5") == (0, 1, 2, 3)
    assert shards("CREATE INDEX orders_amount ON orders (amount)") == (0, 1, 2, 3)


def test_insert_select_on_one_shard_is_allowed() -> None:
    sql = "INSERT INTO orders (id, customer_id, amount) SELECT id + 1000, customer_id, amount FROM orders WHERE customer_id = 2"
    assert shards(sql) == (2,)
    assert shards("INSERT INTO orders (id, customer_id) SELECT 7, 2 FROM regions WHERE name = 'eu'") == (2,)


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "reason", "construct"),
    [
        pytest.param(
            "SELECT * FROM orders o JOIN customers c ON c.name = o.status",
            "CROSS_SHARD_JOIN",
            "join of tables sharded on different keys",
            id="join-on-non-key",
        ),
        pytest.param(
            "SELECT * FROM orders o JOIN customers c ON c.customer_id = o.id",
            "CROSS_SHARD_JOIN",
            "join of tables sharded on different keys",
            id="join-key-to-non-key",
        ),
        pytest.param(
            "SELECT id, ROW_NUMBER() OVER (ORDER BY amount) FROM orders",
            "CROSS_SHARD_WINDOW",
            "window function spanning shards",
            id="window",
        ),
        pytest.param(
            "SELECT * FROM orders WHERE amount > (SELECT AVG(amount) FROM orders)",
            "CROSS_SHARD_SUBQUERY",
            "subquery spanning shards",
            id="uncorrelated-subquery",
        ),
        pytest.param(
            "SELECT * FROM orders o, customers c WHERE NOT EXISTS "
            "(SELECT 1 FROM regions r WHERE o.customer_id = c.customer_id)",
            "CROSS_SHARD_JOIN",
            "join of tables sharded on different keys",
            id="outer-tables-equated-inside-not-exists",
        ),
        pytest.param(
            "SELECT * FROM customers c WHERE EXISTS (SELECT 1 FROM orders o WHERE o.status = c.name)",
            "CROSS_SHARD_SUBQUERY",
            "subquery spanning shards",
            id="correlated-on-non-key",
        ),
        pytest.param(
            "SELECT COUNT(*) FROM (SELECT DISTINCT status FROM orders) s",
            "CROSS_SHARD_SUBQUERY",
            "subquery spanning shards",
            id="derived-table",
        ),
        pytest.param(
            "SELECT * FROM orders WHERE customer_id = 2 AND amount > (SELECT AVG(amount) FROM orders)",
            "CROSS_SHARD_SUBQUERY",
            "subquery spanning shards",
            id="pinned-outer-unpinned-subquery",
        ),
        pytest.param(
            "SELECT status FROM orders INTERSECT SELECT name FROM customers",
            "CROSS_SHARD_SET_OPERATION",
            "INTERSECT spanning shards",
            id="intersect-without-the-key",
        ),
        pytest.param(
            "SELECT status FROM orders EXCEPT SELECT name FROM customers",
            "CROSS_SHARD_SET_OPERATION",
            "EXCEPT spanning shards",
            id="except-without-the-key",
        ),
        pytest.param(
            "SELECT status, COUNT(*) FROM orders GROUP BY status UNION ALL SELECT name, 1 FROM customers",
            "CROSS_SHARD_SET_OPERATION",
            "aggregating branch of a set operation spanning shards",
            id="union-all-aggregating-branch",
        ),
        pytest.param(
            "SELECT name FROM regions UNION ALL SELECT status FROM orders",
            "CROSS_SHARD_SET_OPERATION",
            "UNION ALL branch over reference tables spanning shards",
            id="union-all-reference-branch",
        ),
        pytest.param(
            "SELECT DISTINCT status FROM orders UNION ALL SELECT name FROM customers",
            "CROSS_SHARD_SET_OPERATION",
            "DISTINCT branch of UNION ALL spanning shards",
            id="union-all-distinct-branch",
        ),
        pytest.param(
            "SELECT customer_id FROM orders UNION ALL (SELECT customer_id FROM orders ORDER BY id LIMIT 3)",
            "CROSS_SHARD_SET_OPERATION",
            "LIMIT, ORDER BY or window function in a branch of a set operation spanning shards",
            id="limited-branch",
        ),
        pytest.param(
            "SELECT r.name, c.name FROM regions r LEFT JOIN customers c ON c.region = r.name",
            "CROSS_SHARD_OUTER_JOIN",
            "outer join preserving a reference table spanning shards",
            id="reference-left-join-sharded",
        ),
        pytest.param(
            "UPDATE orders SET customer_id = 3 WHERE id = 1",
            "SHARDING_KEY_UPDATE",
            "update of the sharding key",
            id="update-key",
        ),
        pytest.param(
            "INSERT INTO customers (customer_id, name) VALUES (1, 'a') ON CONFLICT (customer_id) "
            "DO UPDATE SET customer_id = 2",
            "SHARDING_KEY_UPDATE",
            "update of the sharding key",
            id="upsert-key",
        ),
        pytest.param(
            "INSERT INTO orders (id, customer_id) SELECT id, customer_id FROM orders",
            "CROSS_SHARD_INSERT_SELECT",
            "INSERT ... SELECT spanning shards",
            id="insert-select",
        ),
        pytest.param(
            "UPDATE regions SET label = 'x' WHERE name IN (SELECT region FROM customers)",
            "REFERENCE_WRITE_READS_SHARDED",
            "write to a reference table reading sharded tables",
            id="reference-write-reads-sharded",
        ),
        pytest.param(
            "INSERT INTO orders (id, customer_id, amount) VALUES (1, 1, (SELECT MAX(amount) FROM orders))",
            "SUBQUERY_IN_VALUES",
            "subquery in INSERT VALUES",
            id="subquery-in-values",
        ),
        pytest.param(
            "SELECT array_agg(status) FROM orders",
            "CROSS_SHARD_AGGREGATE",
            "aggregate ARRAY_AGG spanning shards",
            id="unsupported-aggregate",
        ),
        pytest.param(
            "SELECT string_agg(status, ',' ORDER BY id) FROM orders",
            "CROSS_SHARD_AGGREGATE",
            "aggregate STRING_AGG with ORDER BY, DISTINCT or a non-constant separator spanning shards",
            id="ordered-string-agg-named-as-written",
        ),
        pytest.param(
            "SELECT COUNT(DISTINCT status) FILTER (WHERE amount > 1) FROM orders",
            "CROSS_SHARD_DISTINCT_AGGREGATE",
            "DISTINCT aggregate with FILTER or several arguments spanning shards",
            id="distinct-aggregate-filter",
        ),
        pytest.param(
            "SELECT * FROM orders GROUP BY status",
            "CROSS_SHARD_STAR_AGGREGATE",
            "SELECT * with aggregates spanning shards",
            id="star-with-group-by",
        ),
        pytest.param(
            "SELECT DISTINCT status FROM orders ORDER BY amount",
            "CROSS_SHARD_DISTINCT_ORDER",
            "DISTINCT with ORDER BY outside the select list",
            id="distinct-order-outside",
        ),
        pytest.param(
            'SELECT name FROM customers ORDER BY name COLLATE "en_US"',
            "CROSS_SHARD_COLLATE",
            "COLLATE en_US spanning shards",
            id="collate",
        ),
        pytest.param(
            "SELECT DISTINCT ON (status) status, id FROM orders",
            "CROSS_SHARD_DISTINCT_ON",
            "DISTINCT ON spanning shards",
            id="distinct-on",
        ),
        pytest.param(
            "SELECT status, COUNT(*) FROM orders GROUP BY ROLLUP (status)",
            "CROSS_SHARD_GROUPING_SETS",
            "GROUPING SETS / ROLLUP / CUBE spanning shards",
            id="rollup",
        ),
        pytest.param(
            "SELECT id FROM orders ORDER BY id FETCH FIRST 3 ROWS WITH TIES",
            "CROSS_SHARD_FETCH",
            "FETCH WITH TIES / PERCENT spanning shards",
            id="fetch-with-ties",
        ),
        pytest.param(
            "SELECT status, string_agg(status, '' ORDER BY id) || '!' FROM orders GROUP BY status",
            "CROSS_SHARD_AGGREGATE",
            "aggregate STRING_AGG with ORDER BY, DISTINCT or a non-constant separator spanning shards",
            id="unsupported-aggregate-in-expression",
        ),
        pytest.param(
            "SELECT status, upper(MAX(status)) FROM orders GROUP BY status",
            "CROSS_SHARD_AGGREGATE_EXPRESSION",
            "expression over aggregates",
            id="function-over-aggregate",
        ),
        pytest.param(
            "CREATE TABLE things (id INT PRIMARY KEY, customer_id INT)",
            "UNIQUE_WITHOUT_SHARDING_KEY",
            "unique constraint without the sharding key",
            id="primary-key-without-key",
        ),
        pytest.param(
            "CREATE TABLE things (id INT)",
            "SHARDING_KEY_COLUMN_MISSING",
            "sharded table without its sharding key",
            id="sharded-table-without-key",
        ),
        pytest.param(
            "CREATE UNIQUE INDEX orders_id ON orders (id)",
            "UNIQUE_WITHOUT_SHARDING_KEY",
            "unique constraint without the sharding key",
            id="unique-index-without-key",
        ),
        pytest.param(
            "ALTER TABLE orders DROP COLUMN customer_id",
            "SHARDING_KEY_ALTERED",
            "dropping or renaming the sharding key",
            id="drop-key-column",
        ),
        pytest.param(
            "CREATE TABLE copy AS SELECT * FROM orders",
            "CREATE_TABLE_AS_SELECT",
            "CREATE TABLE AS SELECT",
            id="create-table-as-select",
        ),
        pytest.param(
            "DELETE FROM orders WHERE amount > 1 ORDER BY id LIMIT 5",
            "CROSS_SHARD_LIMITED_WRITE",
            "UPDATE/DELETE with LIMIT spanning shards",
            id="limited-delete",
        ),
    ],
)
def test_constructs_that_cannot_be_exact_are_refused_by_name(sql: str, reason: str, construct: str) -> None:
    dialect = "sqlite" if "ORDER BY id LIMIT" in sql and sql.startswith("DELETE") else "postgres"
    with pytest.raises(FailedPrecondition) as caught:
        plan_sql(sql, dialect, HASH, SCHEMA)
    assert caught.value.reason == reason
    assert caught.value.metadata["construct"] == construct


def test_bare_column_next_to_min_max_is_refused_in_sqlite_only() -> None:
    sql = "SELECT name, MAX(customer_id) FROM customers"
    with pytest.raises(FailedPrecondition) as caught:
        plan_sql(sql, "sqlite", HASH, SCHEMA)
    assert caught.value.reason == "CROSS_SHARD_BARE_COLUMN"


def test_join_of_differently_keyed_tables_names_both() -> None:
    with pytest.raises(FailedPrecondition) as caught:
        plan_sql("SELECT * FROM orders o JOIN items i ON i.sku = o.status", "sqlite", ITEMS_ON_ORDER, SCHEMA)
    assert "a join of tables sharded on different keys" in caught.value.message
    assert "orders AS o (customer_id)" in caught.value.message
    assert "items AS i (order_id)" in caught.value.message


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        pytest.param(
            "SELECT * FROM orders o JOIN customers c ON c.customer_id = o.customer_id",
            (0, 1, 2, 3),
            id="co-located",
        ),
        pytest.param(
            "SELECT * FROM orders o, customers c WHERE c.customer_id = o.customer_id",
            (0, 1, 2, 3),
            id="comma-join",
        ),
        pytest.param(
            "SELECT * FROM customers c JOIN regions r ON r.name = c.region", (0, 1, 2, 3), id="reference-join"
        ),
        pytest.param(
            "SELECT * FROM customers c LEFT JOIN regions r ON r.name = c.region",
            (0, 1, 2, 3),
            id="left-join-ref",
        ),
        pytest.param(
            "SELECT * FROM customers c WHERE EXISTS (SELECT 1 FROM orders o WHERE o.customer_id = c.customer_id)",
            (0, 1, 2, 3),
            id="correlated-on-key",
        ),
        pytest.param(
            "SELECT * FROM orders WHERE customer_id IN (SELECT customer_id FROM customers WHERE region = 'eu')",
            (0, 1, 2, 3),
            id="in-subquery-on-key",
        ),
        pytest.param(
            "SELECT * FROM orders WHERE status IN (SELECT name FROM regions)",
            (0, 1, 2, 3),
            id="reference-subquery",
        ),
        pytest.param(
            "SELECT id, ROW_NUMBER() OVER (ORDER BY amount) FROM orders WHERE customer_id = 2",
            (2,),
            id="window-one-shard",
        ),
        pytest.param(
            "SELECT * FROM orders WHERE customer_id = 2 AND amount > (SELECT AVG(amount) FROM orders WHERE customer_id = 2)",
            (2,),
            id="subquery-pinned-to-the-same-shard",
        ),
        pytest.param(
            "SELECT * FROM (SELECT * FROM orders WHERE customer_id = 3) x JOIN regions r ON TRUE",
            (3,),
            id="pinned-derived",
        ),
        pytest.param(
            "SELECT * FROM orders o JOIN customers c ON c.name = o.status WHERE o.customer_id = 2 AND c.customer_id = 6",
            (2,),
            id="non-key-join-pinned-to-one-shard",
        ),
        pytest.param(
            "SELECT customer_id FROM orders WHERE customer_id = 1 UNION SELECT customer_id FROM customers WHERE customer_id = 5",
            (0,),
            id="union-on-one-shard",
        ),
        pytest.param(
            "SELECT customer_id FROM orders UNION SELECT customer_id FROM customers",
            (0, 1, 2, 3),
            id="union-spanning-shards",
        ),
        pytest.param(
            "SELECT customer_id FROM orders WHERE customer_id = 1 UNION ALL SELECT customer_id FROM customers "
            "WHERE customer_id = 2",
            (0, 2),
            id="union-all-of-two-pinned-branches",
        ),
    ],
)
def test_exact_constructs_are_allowed(sql: str, expected: tuple[int, ...]) -> None:
    assert shards(sql, HASH, "postgres") == expected


def test_one_shard_layouts_allow_anything_exact_on_one_database() -> None:
    single = ShardLayout("hash", 1, "customer_id")
    assert shards("SELECT * FROM orders o JOIN customers c ON c.name = o.status", single) == (0,)
    assert shards("SELECT id, ROW_NUMBER() OVER (ORDER BY id) FROM orders", single) == (0,)


# -- rewrites ----------------------------------------------------------------------------------


def test_limit_offset_become_limit_n_plus_m_on_shards() -> None:
    plan = plan_sql(
        "SELECT id FROM orders ORDER BY amount DESC, id LIMIT 10 OFFSET 20", "postgres", HASH, SCHEMA
    )
    assert plan.shard_sql[0] == "SELECT id, amount AS _a67_o0 FROM orders ORDER BY amount DESC, id LIMIT 30"
    assert isinstance(plan.merge, RowsMerge)
    assert (plan.merge.offset, plan.merge.limit, plan.merge.hidden) == (20, 10, 1)


def test_aggregates_become_partials() -> None:
    plan = plan_sql(
        "SELECT status, AVG(amount), COUNT(DISTINCT customer_id) FROM orders GROUP BY status HAVING SUM(amount) > 5 "
        "ORDER BY 2 LIMIT 3",
        "postgres",
        HASH,
        SCHEMA,
    )
    assert plan.shard_sql[0] == (
        "SELECT status AS _a67_g0, SUM(amount) AS _a67_p1, COUNT(amount) AS _a67_p2, customer_id AS _a67_d3 "
        "FROM orders GROUP BY status, customer_id"
    )
    assert isinstance(plan.merge, GroupedMerge)
    assert [o.name for o in plan.merge.outputs] == ["status", "avg", "count"]


# -- the plan cache --------------------------------------------------------------------------------


def test_plan_cache_skips_planning_for_repeats_and_honours_versions() -> None:
    cache = PlanCache(maxsize=2)
    sql = "SELECT * FROM orders WHERE customer_id = 2"
    first = cache.plan(sql, "sqlite", HASH, SCHEMA)
    assert cache.plan(sql, "sqlite", HASH, SCHEMA) is first
    assert cache.plan(sql, "postgres", HASH, SCHEMA) is not first
    moved = ShardLayout("hash", 4, "customer_id", reference_tables=REFERENCE, key_type="integer", version=1)
    assert cache.plan(sql, "sqlite", moved, SCHEMA) is not first
    assert cache.plan(sql, "sqlite", HASH, SCHEMA, schema_version=1) is not first
    assert len(cache) == 2
    assert (cache.hits, cache.misses) == (1, 4)


def test_plan_cache_does_not_cache_errors() -> None:
    cache = PlanCache()
    for _ in range(2):
        with pytest.raises(FailedPrecondition):
            cache.plan("SELECT * FROM orders o JOIN customers c ON c.name = o.status", "sqlite", HASH, SCHEMA)
    assert len(cache) == 0


# -- golden plans ----------------------------------------------------------------------------------


def _render(sql: str) -> str:
    plan = plan_sql(sql, "postgres", HASH, SCHEMA)
    lines = [f"-- shards: {list(plan.shards)} ({plan.why})"]
    by_sql: dict[str, list[int]] = {}
    for shard, text in plan.shard_sql.items():
        by_sql.setdefault(text, []).append(shard)
    for text, on in by_sql.items():
        lines.append(f"-- on {on}: {text}")
    lines.append(f"-- merge: {plan.merge!r}")
    return "\n".join(lines)


def _golden_inputs(text: str) -> list[str]:
    statements: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("--") or not line.strip():
            continue
        current.append(line)
        if line.rstrip().endswith(";"):
            statements.append(" ".join(current).rstrip()[:-1])
            current = []
    return statements


def test_golden_plans() -> None:
    text = GOLDEN.read_text()
    rendered = "\n\n".join(f"{sql};\n{_render(sql)}" for sql in _golden_inputs(text)) + "\n"
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("---"))
    if os.environ.get("A67_UPDATE_GOLDEN"):
        GOLDEN.write_text(header + "\n" + rendered)
    assert text == header + "\n" + rendered


# -- collations ----------------------------------------------------------------------------------

NOCASE = {"customers": {"name": "NOCASE"}}


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT name, COUNT(*) FROM customers GROUP BY name",
        "SELECT name COLLATE NOCASE AS n, COUNT(*) FROM customers GROUP BY 1",
        "SELECT region, COUNT(*) FROM customers GROUP BY region COLLATE NOCASE",
        "SELECT COUNT(DISTINCT name) FROM customers",
        "SELECT COUNT(DISTINCT region COLLATE NOCASE) FROM customers",
        "SELECT DISTINCT name FROM customers",
        "SELECT name FROM customers ORDER BY name LIMIT 3",
        "SELECT MIN(name), MAX(name) FROM customers",
        "SELECT region, MAX(name) FROM customers GROUP BY region",
        "SELECT region FROM customers GROUP BY region HAVING MAX(name) > 'b'",
        "SELECT customer_id, name FROM customers GROUP BY customer_id, name ORDER BY name",
    ],
)
def test_a_collation_the_merge_would_compare_by_is_refused_naming_it(sql: str) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        plan_sql(sql, "sqlite", HASH, SCHEMA, NOCASE)
    assert caught.value.reason == "CROSS_SHARD_COLLATE"
    assert "NOCASE" in str(caught.value)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT name FROM customers WHERE name = 'ann'",  # the shards compare: exact
        "SELECT customer_id, name FROM customers WHERE customer_id = 3 ORDER BY name",  # one shard
        "SELECT lower(name) AS n, COUNT(*) FROM customers GROUP BY lower(name)",  # a function's result is BINARY
        "SELECT customer_id, name FROM customers GROUP BY customer_id, name",  # whole groups per shard
        "SELECT COUNT(name), SUM(length(name)) FROM customers",
        "SELECT name FROM customers",
        'SELECT region FROM customers ORDER BY region COLLATE "C"',
        "SELECT region FROM customers ORDER BY region COLLATE BINARY",
    ],
)
def test_a_collation_the_merge_does_not_compare_by_is_answered(sql: str) -> None:
    plan_sql(sql, "sqlite", HASH, SCHEMA, NOCASE)


def test_declared_collations_come_from_the_create_table_text() -> None:
    from controller.federation.query import declared_collations

    sql = 'CREATE TABLE t (a TEXT COLLATE NOCASE, "B" TEXT COLLATE rtrim, c TEXT COLLATE BINARY, d INT)'
    assert declared_collations(sql, "sqlite") == {"a": "NOCASE", "b": "RTRIM"}
