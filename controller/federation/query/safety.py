"""What users' SQL may call: an allow-list of functions per dialect, and no schema-qualified names.

Shards of different users may live on one PostgreSQL server (one schema and one role per
shard: see :mod:`controller.agent.shards`). The database's own privileges are the wall
between tenants; this module is the router's second line, so that a statement that
could only be an attempt to look past that wall never reaches a shard at all:

* **Functions.** A call is allowed when it is

  - a function sqlglot knows in the statement's dialect (its typed expressions: standard
    scalar, aggregate and window functions, whose names as written are sqlglot's own
    function table, see :func:`allowed_function_names`), except the session and catalogue
    functions in :data:`_DENIED_TYPED` (``current_user``, ``current_schema``, ``version``,
    ``read_csv``...), or
  - a function sqlglot does not model but that is listed for the dialect in
    :data:`_ANONYMOUS_ALLOWED` (``julianday``, ``printf``, ``split_part``...).

  Everything else is refused naming the function: admin, file, session and catalogue
  functions (``pg_read_file``, ``pg_ls_dir``, ``query_to_xml``, ``set_config``,
  ``current_setting``, ``dblink*``, ``lo_*``, ``pg_terminate_backend``,
  ``load_extension``, ``readfile``...) are in neither list.
* **Names.** A table, column, index or function name may not name a schema (or an
  attached SQLite database), in any statement kind, DDL included: a shard's tables live
  in its own schema, reached through the role's pinned ``search_path``.
* **Casts to PostgreSQL's object-identifier types** (``regclass``, ``regnamespace``...),
  which look catalogue entries up by name, are refused.

>>> check_statement(sqlglot.parse_one("SELECT pg_read_file('PG_VERSION')", read="postgres"), "postgres")
Traceback (most recent call last):
...
controller.errors.InvalidArgument: function pg_read_file is not allowed: admin, file, session and catalogue functions are refused (see docs/databases.md for what may be called)
>>> check_statement(sqlglot.parse_one("SELECT upper(name), COUNT(*) FROM t GROUP BY 1", read="sqlite"), "sqlite")
"""

from __future__ import annotations

import sqlglot
from sqlglot import exp
from sqlglot.dialects.dialect import Dialect

from controller.errors import FieldViolation, InvalidArgument

_DENIED_TYPED: frozenset[type[exp.Expr]] = frozenset(
    getattr(exp, name)
    for name in (
        # who and where: session, role, catalogue and server identity
        "CurrentAccount",
        "CurrentAccountName",
        "CurrentAvailableRoles",
        "CurrentCatalog",
        "CurrentClient",
        "CurrentDatabase",
        "CurrentIpAddress",
        "CurrentOrganizationName",
        "CurrentOrganizationUser",
        "CurrentRegion",
        "CurrentRole",
        "CurrentRoleType",
        "CurrentSchema",
        "CurrentSchemas",
        "CurrentSecondaryRoles",
        "CurrentSession",
        "CurrentStatement",
        "CurrentTransaction",
        "CurrentUser",
        "CurrentUserId",
        "CurrentVersion",
        "CurrentWarehouse",
        "SessionUser",
        # files and the outside world
        "ReadCSV",
        "ReadParquet",
        "ToFile",
        "AIGenerate",
        "GenerateEmbedding",
        "GenerateText",
    )
    if hasattr(exp, name)
)
"""Typed sqlglot functions that are refused although sqlglot knows them."""

_COMMON_ANONYMOUS = frozenset(
    {
        # mathematics
        "acos",
        "asin",
        "atan",
        "atan2",
        "cos",
        "cot",
        "degrees",
        "radians",
        "sin",
        "tan",
        "trunc",
        "mod",
        "pi",
        # strings
        "ltrim",
        "rtrim",
        "instr",
        "format",
        "char",
        # window functions
        "row_number",
        "rank",
        "dense_rank",
        "percent_rank",
        "cume_dist",
        "ntile",
        "lag",
        "lead",
        "first_value",
        "last_value",
        "nth_value",
    }
)

_ANONYMOUS_ALLOWED: dict[str, frozenset[str]] = {
    "sqlite": _COMMON_ANONYMOUS
    | {
        "printf",
        "julianday",
        "date",
        "time",
        "datetime",
        "strftime",
        "unixepoch",
        "timediff",
        "total",
        "quote",
        "randomblob",
        "zeroblob",
        "likely",
        "unlikely",
        "likelihood",
        "glob",
        "soundex",
        "unhex",
        "ifnull",
        "iif",
        "changes",
        "total_changes",
        "last_insert_rowid",
        "log2",
        "log10",
        "json",
        "jsonb",
        "json_array",
        "json_object",
        "json_extract",
        "json_insert",
        "json_replace",
        "json_set",
        "json_remove",
        "json_patch",
        "json_quote",
        "json_type",
        "json_valid",
        "json_array_length",
        "json_group_array",
        "json_group_object",
        "json_each",
        "json_tree",
    },
    "postgres": _COMMON_ANONYMOUS
    | {
        "age",
        "justify_days",
        "justify_hours",
        "justify_interval",
        "make_date",
        "make_time",
        "make_timestamp",
        "make_timestamptz",
        "make_interval",
        "date_bin",
        "isfinite",
        "to_number",
        "to_timestamp",
        "to_date",
        "clock_timestamp",
        "statement_timestamp",
        "transaction_timestamp",
        "timeofday",
        "split_part",
        "strpos",
        "btrim",
        "translate",
        "ascii",
        "chr",
        "quote_literal",
        "quote_nullable",
        "concat_ws",
        "char_length",
        "character_length",
        "octet_length",
        "bit_length",
        "encode",
        "decode",
        "sha224",
        "sha256",
        "sha384",
        "sha512",
        "gen_random_uuid",
        "width_bucket",
        "div",
        "cbrt",
        "log10",
        "factorial",
        "gcd",
        "lcm",
        "scale",
        "bool_and",
        "bool_or",
        "every",
        "regexp_replace",
        "regexp_match",
        "regexp_matches",
        "regexp_split_to_array",
        "regexp_split_to_table",
        "regexp_count",
        "regexp_instr",
        "regexp_substr",
        "regexp_like",
        "starts_with",
        "to_json",
        "to_jsonb",
        "row_to_json",
        "json_build_object",
        "jsonb_build_object",
        "json_build_array",
        "jsonb_build_array",
        "jsonb_agg",
        "json_object_agg",
        "jsonb_object_agg",
        "json_typeof",
        "jsonb_typeof",
        "json_array_length",
        "jsonb_array_length",
        "json_extract_path",
        "jsonb_extract_path",
        "json_extract_path_text",
        "jsonb_extract_path_text",
        "jsonb_set",
        "jsonb_insert",
        "jsonb_strip_nulls",
        "jsonb_pretty",
        "json_each",
        "jsonb_each",
        "json_each_text",
        "jsonb_each_text",
        "json_array_elements",
        "jsonb_array_elements",
        "json_array_elements_text",
        "jsonb_array_elements_text",
        "json_object_keys",
        "jsonb_object_keys",
        "array_length",
        "array_lower",
        "array_upper",
        "array_position",
        "array_positions",
        "array_remove",
        "array_replace",
        "array_cat",
        "array_append",
        "array_prepend",
        "array_ndims",
        "array_dims",
        "cardinality",
        "string_to_array",
        "string_to_table",
        "unnest",
        "generate_series",
        "generate_subscripts",
        "percentile_cont",
        "percentile_disc",
        "mode",
        "corr",
        "covar_pop",
        "covar_samp",
        "regr_slope",
        "regr_intercept",
        "regr_count",
        "regr_r2",
        "regr_avgx",
        "regr_avgy",
        "var_pop",
        "var_samp",
        "stddev_pop",
        "stddev_samp",
        "bit_and",
        "bit_or",
        "bit_xor",
        "num_nonnulls",
        "num_nulls",
    },
}
"""Functions sqlglot parses as ``Anonymous`` that users' SQL may call, per dialect."""

_OID_ALIAS_TYPES = frozenset(
    {
        "REGCLASS",
        "REGCOLLATION",
        "REGCONFIG",
        "REGDICTIONARY",
        "REGNAMESPACE",
        "REGOPER",
        "REGOPERATOR",
        "REGPROC",
        "REGPROCEDURE",
        "REGROLE",
        "REGTYPE",
    }
)


def allowed_function_names(dialect: str) -> frozenset[str]:
    """Every function name (lower case) a statement of ``dialect`` may call.

    The names sqlglot's parser for the dialect maps to an allowed typed function, with
    the dialect's anonymous allow-list. For documentation and tests: the check itself
    works on the parsed statement.
    """
    parser = Dialect.get_or_raise(dialect).parser_class
    names = set(_ANONYMOUS_ALLOWED[dialect])
    for name in set(parser.FUNCTIONS) | set(parser.FUNCTION_PARSERS):
        try:
            node = sqlglot.parse_one(f"SELECT {name}(1)", read=dialect).expressions[0]
        except Exception:  # noqa: S112 - a builder that needs other arguments: not callable like this
            continue
        if (
            isinstance(node, exp.Func)
            and not isinstance(node, exp.Anonymous)
            and type(node) not in _DENIED_TYPED
        ):
            names.add(name.lower())
    return frozenset(names)


def check_statement(expression: exp.Expr, dialect: str) -> None:
    """Raise ``InvalidArgument`` if ``expression`` calls a refused function or names a schema."""
    allowed = _ANONYMOUS_ALLOWED[dialect]
    for node in expression.walk():
        if isinstance(node, exp.Anonymous):
            name = node.name.lower()
            if name not in allowed:
                raise _function_refused(name)
        elif isinstance(node, exp.Func) and type(node) in _DENIED_TYPED:
            raise _function_refused(node.sql_name().lower())
        elif isinstance(node, exp.Dot) and isinstance(node.expression, exp.Func):
            raise _qualified(
                f"{node.this.sql(dialect=dialect)}.{_function_name(node.expression)}", "function"
            )
        elif isinstance(node, exp.Table | exp.Column):
            qualifier = _schema_of(node)
            if qualifier is not None:
                kind = "table" if isinstance(node, exp.Table) else "column"
                raise _qualified(node.sql(dialect=dialect), kind)
        elif isinstance(node, exp.ObjectIdentifier | exp.DataType) and _oid_alias(node):
            type_name = node.sql(dialect=dialect)
            raise InvalidArgument(
                f"casts to {type_name} are not allowed: object-identifier types look the catalogue up",
                field_violations=[FieldViolation("query", f"casts to {type_name} are not allowed")],
                reason="TYPE_NOT_ALLOWED",
                metadata={"type": type_name},
            )


def _function_name(node: exp.Expr) -> str:
    if isinstance(node, exp.Func) and not isinstance(node, exp.Anonymous):
        return node.sql_name().lower()
    return node.name.lower()


def _schema_of(node: exp.Table | exp.Column) -> str | None:
    for part in ("db", "catalog"):
        value = node.args.get(part)
        if value is not None and (not isinstance(value, exp.Expr) or value.name):
            return value.name if isinstance(value, exp.Expr) else str(value)
    return None


def _oid_alias(node: exp.Expr) -> bool:
    text = node.this.name if isinstance(node.this, exp.Expr) else str(node.this)
    return text.upper().rsplit(".", 1)[-1] in _OID_ALIAS_TYPES


def _function_refused(name: str) -> InvalidArgument:
    return InvalidArgument(
        f"function {name} is not allowed: admin, file, session and catalogue functions are refused "
        "(see docs/databases.md for what may be called)",
        field_violations=[FieldViolation("query", f"function {name} is not allowed")],
        reason="FUNCTION_NOT_ALLOWED",
        metadata={"function": name},
    )


def _qualified(name: str, kind: str) -> InvalidArgument:
    return InvalidArgument(
        f"schema-qualified {kind} name {name} is not allowed: name tables, columns and functions "
        "without a schema (each database's tables live in its own schema)",
        field_violations=[FieldViolation("query", f"{kind} {name} names a schema")],
        reason="SCHEMA_QUALIFIED_NAME",
        metadata={kind: name},
    )
