"""The router's second line against cross-tenant SQL: a function allow-list and no schema names.

The first line is the database itself (one role per shard, see test_shard_isolation.py);
these tests show the router refuses, before any shard sees it, every statement of the
attack run (issue 9) and the admin, file, session and catalogue functions by name.
"""

from __future__ import annotations

import re

import pytest

from controller.errors import InvalidArgument
from controller.federation.query.layout import ShardLayout
from controller.federation.query.parse import parse
from controller.federation.query.plan import plan_sql
from controller.federation.query.safety import allowed_function_names

SCHEMA = {"t": ["id", "customer_id", "name"], "orders": ["id", "customer_id", "amount"]}
LAYOUT = ShardLayout("hash", 2, "customer_id")
VICTIM = "a67_victimdb_0"

ATTACKS = [
    # the attack run, verbatim in shape
    "SELECT query_to_xml('SELECT nspname FROM pg_namespace', true, false, '')",
    f"SELECT query_to_xml('SELECT * FROM {VICTIM}.t', true, false, '')",
    f"SELECT set_config('search_path', '{VICTIM}', false)",
    f"DROP TABLE IF EXISTS {VICTIM}.t",
    f"CREATE TABLE {VICTIM}.t (id INT, customer_id INT)",
    "SELECT pg_read_file('PG_VERSION')",
    "SELECT current_setting('data_directory')",
    # more of the same families
    "SELECT * FROM pg_ls_dir('.')",
    "SELECT table_to_xml('t', true, false, '')",
    "SELECT cursor_to_xml('c', 1, true, false, '')",
    "SELECT dblink('host=x', 'SELECT 1')",
    "SELECT dblink_exec('DROP TABLE t')",
    "SELECT lo_import('/etc/passwd')",
    "SELECT lo_export(1, '/tmp/x')",
    "SELECT pg_terminate_backend(1)",
    "SELECT pg_cancel_backend(1)",
    "SELECT pg_sleep(10)",
    "SELECT txid_current()",
    "SELECT has_table_privilege('t', 'SELECT')",
    "SELECT current_user",
    "SELECT session_user",
    "SELECT current_schema()",
    "SELECT current_database()",
    "SELECT version()",
    "SELECT pg_catalog.upper('x')",
    "SELECT 't'::regclass",
    f"SELECT CAST('{VICTIM}' AS regnamespace)",
    f"SELECT * FROM {VICTIM}.t",
    f"SELECT {VICTIM}.t.id FROM t",
    "SELECT * FROM pg_catalog.pg_namespace",
    "SELECT * FROM information_schema.tables",
    f"INSERT INTO {VICTIM}.t (id, customer_id) VALUES (1, 1)",
    f"UPDATE {VICTIM}.t SET id = 1",
    f"DELETE FROM {VICTIM}.t",
    f"CREATE INDEX i ON {VICTIM}.t (id)",
    f"ALTER TABLE {VICTIM}.t ADD COLUMN x INT",
    "SELECT * FROM public.t",
    "SELECT id FROM t WHERE id IN (SELECT pg_backend_pid())",
    "SELECT COUNT(*) FROM t GROUP BY current_setting('x')",
]

SQLITE_ATTACKS = [
    "SELECT load_extension('/tmp/evil.so')",
    "SELECT readfile('/etc/passwd')",
    "SELECT writefile('/tmp/x', 'y')",
    "SELECT fts3_tokenizer('simple')",
    "SELECT sqlite_version()",
    "SELECT sqlite_compileoption_get(0)",
    "SELECT * FROM main.t",
    "SELECT * FROM other.t",
    "CREATE TABLE other.t (id INT, customer_id INT)",
]


@pytest.mark.parametrize("sql", ATTACKS)
def test_postgres_attacks_are_refused_before_any_shard(sql: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        plan_sql(sql, "postgres", LAYOUT, SCHEMA)
    assert caught.value.reason in {"FUNCTION_NOT_ALLOWED", "SCHEMA_QUALIFIED_NAME", "TYPE_NOT_ALLOWED"}


@pytest.mark.parametrize("sql", SQLITE_ATTACKS)
def test_sqlite_escapes_are_refused_before_any_shard(sql: str) -> None:
    with pytest.raises(InvalidArgument):
        plan_sql(sql, "sqlite", LAYOUT, SCHEMA)


@pytest.mark.parametrize(
    ("sql", "name"),
    [
        ("SELECT pg_read_file('PG_VERSION')", "pg_read_file"),
        ("SELECT upper(query_to_xml('x', true, false, ''))", "query_to_xml"),
        ("SELECT current_user", "current_user"),
        ("SELECT * FROM pg_ls_dir('.')", "pg_ls_dir"),
    ],
)
def test_the_refusal_names_the_function(sql: str, name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse(sql, "postgres")
    assert f"function {name} is not allowed" in str(caught.value)
    assert caught.value.metadata["function"] == name


def test_the_refusal_names_the_schema_qualified_table() -> None:
    with pytest.raises(InvalidArgument, match=f"schema-qualified table name {VICTIM}.t"):
        parse(f"DROP TABLE IF EXISTS {VICTIM}.t", "postgres")


@pytest.mark.parametrize(
    ("sql", "dialect"),
    [
        ("SELECT upper(name), lower(name), length(name), COUNT(*) FROM t GROUP BY 1, 2, 3", "sqlite"),
        ("SELECT COALESCE(name, 'x'), NULLIF(id, 0), ABS(id), ROUND(id / 3.0, 2) FROM t", "postgres"),
        ("SELECT julianday('now'), strftime('%Y', 'now'), printf('%d', id), total(id) FROM t", "sqlite"),
        ("SELECT split_part(name, ' ', 1), string_agg(name, ',') FROM t GROUP BY 1", "postgres"),
        ("SELECT id, row_number() OVER (PARTITION BY customer_id ORDER BY id) FROM t", "postgres"),
        ("SELECT now(), CURRENT_TIMESTAMP, CAST(id AS TEXT), id::bigint FROM t", "postgres"),
        ("SELECT t.id FROM t JOIN orders AS o ON o.customer_id = t.customer_id", "postgres"),
        ("SELECT * FROM generate_series(1, 3)", "postgres"),
    ],
)
def test_ordinary_sql_still_parses(sql: str, dialect: str) -> None:
    parse(sql, dialect)


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_no_allowed_name_is_an_admin_file_session_or_catalogue_function(dialect: str) -> None:
    names = allowed_function_names(dialect)
    assert {"count", "sum", "upper", "coalesce"} <= names
    forbidden = re.compile(
        r"^(pg_|lo_|dblink|set_config$|current_setting$|.*_to_xml|load_extension$|readfile$|writefile$"
        r"|fts3_|sqlite_|current_(user|role|schema|schemas|database|catalog)$|session_user$|version$"
        r"|has_.*_privilege$|txid_|inet_|read_csv|to_file)"
    )
    assert sorted(n for n in names if forbidden.match(n)) == []


def test_a_function_with_arguments_sqlglot_cannot_build_is_a_syntax_error_not_a_crash() -> None:
    with pytest.raises(InvalidArgument, match="SQL syntax error"):
        parse("SELECT var_map(1)", "postgres")
