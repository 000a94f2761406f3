"""Parsing: syntax errors with line and column, one statement, classification, tables.

Also runs the ``>>>`` examples in every module of ``controller.federation.query``.
"""

from __future__ import annotations

import doctest
import importlib
from decimal import Decimal

import pytest
import sqlglot

from controller.errors import InvalidArgument, NotFound
from controller.federation import query
from controller.federation.query.layout import ShardLayout
from controller.federation.query.parse import (
    DIALECTS,
    StatementKind,
    dialect_rules,
    literal_value,
    parse,
    resolve_tables,
)
from controller.federation.query.plan import plan_sql

SCHEMA = {"orders": ["id", "customer_id", "amount"], "customers": ["customer_id", "name"]}
MODULES = ["layout", "parse", "route", "rewrite", "merge", "plan", "execute", "safety", "collation"]


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module: str) -> None:
    loaded = importlib.import_module(f"controller.federation.query.{module}")
    result = doctest.testmod(loaded, optionflags=doctest.ELLIPSIS | doctest.IGNORE_EXCEPTION_DETAIL)
    assert result.failed == 0
    assert result.attempted > 0


def test_public_names_are_exactly_the_api() -> None:
    assert set(query.__all__) == {
        "Collations",
        "DEFAULT_DEADLINE_SECONDS",
        "DIALECTS",
        "ROUTING_RULES",
        "STAGES",
        "DialectRules",
        "FunctionExecutor",
        "KeyRange",
        "KeyType",
        "MergeSpec",
        "Plan",
        "PlanCache",
        "QueryResult",
        "Route",
        "Schema",
        "ShardError",
        "ShardExecutor",
        "ShardLayout",
        "ShardResult",
        "ShardStatus",
        "Statement",
        "StatementKind",
        "Strategy",
        "canonical_key",
        "declared_collations",
        "execute",
        "is_binary",
        "key_type_from_sql",
        "layout_from_proto",
        "parse",
        "plan",
        "plan_sql",
        "route",
        "validate_layout",
    }


@pytest.mark.parametrize(
    ("sql", "line", "column"),
    [
        pytest.param("SELECT * FROM", 1, 10, id="missing-table"),
        pytest.param("SELECT a FROM t WHERE (", 1, 23, id="open-paren"),
        pytest.param("select\n  a,\n  b frm t where", 3, 9, id="third-line"),
        pytest.param("SELECT 1,\n  'abc", 2, 3, id="unterminated-string"),
    ],
)
def test_syntax_error_reports_line_and_column(sql: str, line: int, column: int) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse(sql, "sqlite")
    error = caught.value
    assert error.reason == "SQL_SYNTAX_ERROR"
    assert f"line {line}, column {column}" in error.message
    assert error.metadata == {"line": str(line), "column": str(column)}
    assert [v.field for v in error.field_violations] == ["query"]


def test_several_statements_are_refused() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse("SELECT 1; SELECT 2;", "postgres")
    assert caught.value.reason == "MULTIPLE_STATEMENTS"
    assert "one statement per request" in caught.value.message


def test_trailing_semicolon_is_one_statement() -> None:
    assert parse("SELECT 1;", "sqlite").kind is StatementKind.SELECT


@pytest.mark.parametrize("sql", ["", "   ", ";", "-- nothing"])
def test_empty_query_is_refused(sql: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse(sql, "sqlite")
    assert caught.value.reason == "EMPTY_QUERY"


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        ("SELECT 1", StatementKind.SELECT),
        ("WITH x AS (SELECT 1) SELECT * FROM x", StatementKind.SELECT),
        ("SELECT 1 UNION SELECT 2", StatementKind.SELECT),
        ("INSERT INTO orders (id) VALUES (1)", StatementKind.INSERT),
        ("UPDATE orders SET amount = 1", StatementKind.UPDATE),
        ("DELETE FROM orders", StatementKind.DELETE),
        ("CREATE TABLE t (a INT)", StatementKind.DDL),
        ("CREATE INDEX i ON orders (amount)", StatementKind.DDL),
        ("ALTER TABLE orders ADD COLUMN note TEXT", StatementKind.DDL),
        ("DROP TABLE orders", StatementKind.DDL),
        ("DROP INDEX i", StatementKind.DDL),
    ],
)
def test_statements_are_classified(sql: str, kind: StatementKind) -> None:
    assert parse(sql, "postgres").kind is kind


@pytest.mark.parametrize(
    ("sql", "dialect", "reason"),
    [
        ("BEGIN", "postgres", "TRANSACTION_CONTROL_UNSUPPORTED"),
        ("COMMIT", "sqlite", "TRANSACTION_CONTROL_UNSUPPORTED"),
        ("ROLLBACK", "postgres", "TRANSACTION_CONTROL_UNSUPPORTED"),
        ("PRAGMA foreign_keys = ON", "sqlite", "UNSUPPORTED_STATEMENT"),
        ("VACUUM", "sqlite", "UNSUPPORTED_STATEMENT"),
        ("SET search_path TO other", "postgres", "UNSUPPORTED_STATEMENT"),
        ("CREATE VIEW v AS SELECT 1", "postgres", "UNSUPPORTED_STATEMENT"),
        ("SELECT 1 INTO copy", "postgres", "UNSUPPORTED_STATEMENT"),
    ],
)
def test_statements_this_api_does_not_run_are_refused(sql: str, dialect: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse(sql, dialect)
    assert caught.value.reason == reason


def test_transaction_control_refusal_explains_atomicity() -> None:
    with pytest.raises(InvalidArgument, match="atomically on each shard"):
        parse("BEGIN", "sqlite")


def test_unknown_dialect_is_a_field_violation() -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse("SELECT 1", "mysql")
    assert [v.field for v in caught.value.field_violations] == ["dialect"]
    assert dialect_rules("postgresql") is DIALECTS["postgres"]


def test_tables_are_found_in_order_without_cte_names() -> None:
    statement = parse(
        "WITH recent AS (SELECT * FROM orders) SELECT * FROM customers c JOIN recent r USING (customer_id)",
        "postgres",
    )
    assert statement.tables == ("orders", "customers")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM ghosts",
        "SELECT * FROM orders o JOIN ghosts g ON g.customer_id = o.customer_id",
        "SELECT * FROM orders WHERE id IN (SELECT id FROM ghosts)",
        "INSERT INTO ghosts (customer_id) VALUES (1)",
        "DROP TABLE ghosts",
    ],
)
def test_unknown_table_is_not_found_naming_it(sql: str) -> None:
    with pytest.raises(NotFound) as caught:
        resolve_tables(parse(sql, "sqlite"), SCHEMA)
    assert "ghosts" in caught.value.message
    assert caught.value.metadata == {"table": "ghosts"}


def test_unknown_table_is_not_found_through_the_planner() -> None:
    with pytest.raises(NotFound, match="table ghosts does not exist"):
        plan_sql("SELECT * FROM ghosts", "postgres", ShardLayout("hash", 2, "customer_id"), SCHEMA)


@pytest.mark.parametrize("sql", ["CREATE TABLE ghosts (customer_id INT)", "DROP TABLE IF EXISTS ghosts"])
def test_ddl_may_name_new_or_missing_tables(sql: str) -> None:
    resolve_tables(parse(sql, "sqlite"), SCHEMA)


def test_a_schema_prefix_is_refused_even_public() -> None:
    # A shard's tables live in its own schema: public.orders would be another schema's table.
    with pytest.raises(InvalidArgument, match=r"schema-qualified table name public\.orders"):
        parse("SELECT * FROM public.orders", "postgres")


@pytest.mark.parametrize(
    ("text", "dialect", "value"),
    [
        ("42", "sqlite", 42),
        ("-42", "postgres", -42),
        ("1.5", "sqlite", 1.5),
        ("1.5", "postgres", Decimal("1.5")),
        ("'x'", "sqlite", "x"),
        ("NULL", "sqlite", None),
        ("TRUE", "postgres", True),
        ("(((7)))", "sqlite", 7),
    ],
)
def test_literal_values(text: str, dialect: str, value: object) -> None:
    rules = DIALECTS[dialect]
    assert literal_value(sqlglot.parse_one(text, read=rules.sqlglot_dialect), rules) == value


@pytest.mark.parametrize(
    ("sql", "plain"),
    [
        ("SELECT * FROM t WHERE", "WHERE needs a condition"),
        ("SELECT 1 *", "the operator * needs a value on each side"),
        ("SELECT a FROM", "expected table name, found the end of the statement"),
        ("SELECT (1", "a closing parenthesis ) is missing"),
        ("SELECT a FROM t ORDER BY", "ORDER BY needs at least one expression"),
        ("SELECT a FROM t WHERE a = = 1", "the operator = needs a value on each side"),
        ("SELECT a FROM t LIMIT", "LIMIT needs a number"),
    ],
)
def test_syntax_errors_say_what_is_wrong_without_the_parsers_internals(sql: str, plain: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse(sql, "postgres")
    message = str(caught.value)
    assert plain in message
    for internal in ("<class", "Token", "sqlglot"):
        assert internal not in message
