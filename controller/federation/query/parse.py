"""Stage 1: parse one SQL statement with sqlglot and classify it.

:func:`parse` turns text into a :class:`Statement` (kind, AST, referenced tables), or
raises ``InvalidArgument`` with the line and column of a syntax error, or for more
than one statement. :func:`resolve_tables` checks the tables against the database's
schema (``NotFound`` naming the first unknown one).

Dialect differences live in one table, :data:`DIALECTS`, of :class:`DialectRules`:
NULL ordering, integer division, what ``1.5`` means, and so on. Code asks the rules,
never ``if dialect == ...``.

>>> statement = parse("SELECT name FROM customers WHERE customer_id = 7", "postgres")
>>> statement.kind.value, sorted(statement.tables)
('select', ['customers'])
>>> parse("SELECT 1; SELECT 2", "sqlite")
Traceback (most recent call last):
...
controller.errors.InvalidArgument: one statement per request: found 2 statements
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from controller.errors import FieldViolation, InvalidArgument, NotFound

from .safety import check_statement

Schema = Mapping[str, Sequence[str]]
"""Table name → column names, as recorded in the database's ``schema_info``."""


@dataclass(frozen=True)
class DialectRules:
    """What differs between the SQL dialects the router speaks."""

    name: str
    """Our name for the dialect (``sqlite`` or ``postgres``)."""
    sqlglot_dialect: str
    """sqlglot's name for it."""
    nulls_first_ascending: bool
    """Where NULLs sort in an ascending ORDER BY without NULLS FIRST/LAST (sqlite: first;
    postgres: last). Descending is the reverse."""
    division_by_zero_is_null: bool
    """``x / 0`` is NULL (sqlite) rather than an error (postgres)."""
    booleans_are_integers: bool
    """Comparisons yield 1/0 (sqlite) rather than true/false (postgres)."""
    decimal_literals_are_exact: bool
    """``1.5`` is an exact numeric (postgres ``numeric``) rather than a float (sqlite)."""
    exact_average: bool
    """AVG over integers or numerics is an exact numeric (postgres) rather than a float."""
    cast_to_integer_rounds: bool
    """``CAST(2.5 AS INTEGER)`` rounds (postgres: 3) rather than truncates (sqlite: 2)."""
    bare_columns_follow_min_max: bool
    """A column outside GROUP BY takes its value from the MIN/MAX row (sqlite)."""
    negative_limit_is_unbounded: bool
    """``LIMIT -1`` means no limit and a negative OFFSET means 0 (sqlite); postgres refuses them."""
    modulo_casts_to_integer: bool
    """``%`` casts both operands to INTEGER first (sqlite: ``99.99 % 100`` is 99.0), rather than
    computing an exact remainder of numerics (postgres)."""
    integer_overflow_becomes_real: bool
    """Integer arithmetic past 64 bits continues in floating point (sqlite) rather than failing
    with "bigint out of range" (postgres)."""
    integer_type: str
    """The type name reported for integer results."""
    float_type: str
    """The type name reported for floating-point results."""
    decimal_type: str
    """The type name reported for exact numeric results."""
    text_type: str
    """The type name reported for text results."""
    boolean_type: str
    """The type name reported for boolean results."""


DIALECTS: Mapping[str, DialectRules] = {
    "sqlite": DialectRules(
        name="sqlite",
        sqlglot_dialect="sqlite",
        nulls_first_ascending=True,
        division_by_zero_is_null=True,
        booleans_are_integers=True,
        decimal_literals_are_exact=False,
        exact_average=False,
        cast_to_integer_rounds=False,
        bare_columns_follow_min_max=True,
        negative_limit_is_unbounded=True,
        modulo_casts_to_integer=True,
        integer_overflow_becomes_real=True,
        integer_type="INTEGER",
        float_type="REAL",
        decimal_type="REAL",
        text_type="TEXT",
        boolean_type="INTEGER",
    ),
    "postgres": DialectRules(
        name="postgres",
        sqlglot_dialect="postgres",
        nulls_first_ascending=False,
        division_by_zero_is_null=False,
        booleans_are_integers=False,
        decimal_literals_are_exact=True,
        exact_average=True,
        cast_to_integer_rounds=True,
        bare_columns_follow_min_max=False,
        negative_limit_is_unbounded=False,
        modulo_casts_to_integer=False,
        integer_overflow_becomes_real=False,
        integer_type="bigint",
        float_type="double precision",
        decimal_type="numeric",
        text_type="text",
        boolean_type="boolean",
    ),
}
_DIALECT_ALIASES = {"postgresql": "postgres", "sqlite3": "sqlite"}


def dialect_rules(dialect: str) -> DialectRules:
    """The rules of ``dialect`` (``sqlite``, ``postgres`` or ``postgresql``).

    >>> dialect_rules("postgresql").nulls_first_ascending
    False
    """
    name = dialect.strip().lower()
    rules = DIALECTS.get(_DIALECT_ALIASES.get(name, name))
    if rules is None:
        raise InvalidArgument(
            f"unknown SQL dialect {dialect!r}: use one of {', '.join(DIALECTS)}",
            field_violations=[FieldViolation("dialect", f"must be one of {', '.join(DIALECTS)}")],
            reason="UNKNOWN_DIALECT",
        )
    return rules


class StatementKind(enum.Enum):
    """What a statement does, which decides how it is routed."""

    SELECT = "select"
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    DDL = "ddl"

    @property
    def is_write(self) -> bool:
        """Whether the statement changes data or schema."""
        return self is not StatementKind.SELECT


@dataclass(frozen=True)
class Statement:
    """One parsed statement. ``expression`` is shared: later stages copy before changing it."""

    sql: str
    """The original text, passed through unchanged to a single shard."""
    rules: DialectRules
    """The dialect the text is written in."""
    kind: StatementKind
    """SELECT, INSERT, UPDATE, DELETE or DDL."""
    expression: exp.Expr
    """The sqlglot AST."""
    tables: tuple[str, ...]
    """Every real table the statement names (CTE names excluded), in order of appearance."""


_DDL_KINDS = {"TABLE", "INDEX"}
_TOKEN_POSITION = re.compile(r"from (\d+):(\d+)")


def parse(sql: str, dialect: str) -> Statement:
    """Parse exactly one statement of ``dialect`` and classify it.

    Raises ``InvalidArgument`` for a syntax error (with line and column), an empty
    query, more than one statement, or a statement this API does not run (explicit
    transaction control, PRAGMA, SET, VACUUM...).

    >>> parse("SELECT * FROM t WHERE", "sqlite")
    Traceback (most recent call last):
    ...
    controller.errors.InvalidArgument: SQL syntax error at line 1, column 17: WHERE needs a condition (near 'WHERE')
    >>> parse("BEGIN", "postgres")
    Traceback (most recent call last):
    ...
    controller.errors.InvalidArgument: explicit transaction control (BEGIN) is not supported: each statement runs atomically on each shard it touches, and statements spanning shards are not atomic across them
    """
    rules = dialect_rules(dialect)
    if not sql.strip():
        raise InvalidArgument(
            "the query is empty",
            field_violations=[FieldViolation("query", "must contain one SQL statement")],
            reason="EMPTY_QUERY",
        )
    try:
        parsed = sqlglot.parse(sql, read=rules.sqlglot_dialect)
    except ParseError as exc:
        raise _syntax_error_from_parse(exc) from None
    except TokenError as exc:
        raise _syntax_error_from_tokens(sql, exc) from None
    except (IndexError, KeyError, TypeError, ValueError, AttributeError) as exc:
        # sqlglot's function builders assume well-formed arguments (VAR_MAP(1) raises IndexError)
        raise _syntax_error(1, 1, f"the statement cannot be read ({type(exc).__name__})", "") from None
    statements = [s for s in parsed if s is not None]
    if not statements:
        raise InvalidArgument(
            "the query is empty",
            field_violations=[FieldViolation("query", "must contain one SQL statement")],
            reason="EMPTY_QUERY",
        )
    if len(statements) > 1:
        raise InvalidArgument(
            f"one statement per request: found {len(statements)} statements",
            field_violations=[FieldViolation("query", "must contain exactly one SQL statement")],
            reason="MULTIPLE_STATEMENTS",
        )
    expression = statements[0]
    kind = classify(expression)
    check_statement(expression, rules.name)
    flatten_parenthesized_from(expression)
    return Statement(
        sql=sql, rules=rules, kind=kind, expression=expression, tables=referenced_tables(expression)
    )


def classify(expression: exp.Expr) -> StatementKind:
    """The :class:`StatementKind` of a parsed statement, or ``InvalidArgument``.

    >>> classify(sqlglot.parse_one("CREATE INDEX i ON t (a)")).value
    'ddl'
    """
    if isinstance(expression, exp.Query):
        if isinstance(expression, exp.Select) and expression.args.get("into") is not None:
            raise _unsupported("SELECT ... INTO")
        return StatementKind.SELECT
    if isinstance(expression, exp.Insert):
        return StatementKind.INSERT
    if isinstance(expression, exp.Update):
        return StatementKind.UPDATE
    if isinstance(expression, exp.Delete):
        return StatementKind.DELETE
    if isinstance(expression, exp.Create | exp.Drop):
        kind = str(expression.args.get("kind") or "").upper()
        if kind not in _DDL_KINDS:
            raise _unsupported(f"{type(expression).__name__.upper()} {kind}".strip())
        return StatementKind.DDL
    if isinstance(expression, exp.Alter):
        if str(expression.args.get("kind") or "").upper() != "TABLE":
            raise _unsupported(f"ALTER {expression.args.get('kind')}")
        return StatementKind.DDL
    if isinstance(expression, exp.TruncateTable):
        return StatementKind.DDL
    if isinstance(expression, exp.Transaction | exp.Commit | exp.Rollback):
        word = {exp.Transaction: "BEGIN", exp.Commit: "COMMIT", exp.Rollback: "ROLLBACK"}[type(expression)]
        raise InvalidArgument(
            f"explicit transaction control ({word}) is not supported: each statement runs atomically "
            "on each shard it touches, and statements spanning shards are not atomic across them",
            reason="TRANSACTION_CONTROL_UNSUPPORTED",
        )
    if isinstance(expression, exp.Command):
        raise _unsupported(str(expression.this).upper())
    raise _unsupported(type(expression).__name__.upper())


def _unsupported(what: str) -> InvalidArgument:
    return InvalidArgument(
        f"unsupported statement: {what} (this API runs SELECT, INSERT, UPDATE, DELETE and "
        "CREATE/ALTER/DROP TABLE, CREATE/DROP INDEX)",
        reason="UNSUPPORTED_STATEMENT",
        metadata={"construct": what},
    )


def flatten_parenthesized_from(expression: exp.Expr) -> None:
    """Rewrite ``FROM (a JOIN b ON ...) JOIN c ...`` as ``FROM a JOIN b ON ... JOIN c ...``, in place.

    Joins associate to the left, so parentheses around the *first* source of a FROM
    clause (with no alias) change nothing; removing them lets the router see every
    table. Parentheses elsewhere (``a LEFT JOIN (b JOIN c)``) do change the meaning and
    are left for the router, which refuses what it cannot see.

    >>> e = sqlglot.parse_one("SELECT COUNT(*) FROM ((t AS a CROSS JOIN t AS b)) JOIN u ON TRUE")
    >>> flatten_parenthesized_from(e)
    >>> e.sql()
    'SELECT COUNT(*) FROM t AS a CROSS JOIN t AS b JOIN u ON TRUE'
    """
    for group in list(expression.find_all(exp.Subquery)):
        inner = group.this
        if isinstance(inner, exp.Table) and not inner.args.get("joins") and not (inner.alias and group.alias):
            if group.alias:  # (t) AS z is t AS z
                inner.set("alias", group.args["alias"].pop())
            group.replace(inner.pop())
    for select in list(expression.find_all(exp.Select, exp.Update, exp.Delete)):
        from_ = select.args.get("from_")
        if not isinstance(from_, exp.From):
            continue
        source = from_.this
        moved: list[exp.Expr] = []
        while isinstance(source, exp.Subquery) and not source.alias and _is_source_group(source.this):
            inner = source.this
            moved = [j.pop() for j in list(inner.args.get("joins") or ())] + moved
            if isinstance(inner, exp.Table | exp.Subquery):
                source = inner
            else:
                break
        if source is not from_.this:
            from_.set("this", source.pop() if source.parent is not None else source)
            select.set("joins", moved + list(select.args.get("joins") or ()))


def _is_source_group(node: exp.Expr) -> bool:
    """A parenthesized table or join group (not a query): ``(t)``, ``(a JOIN b ON ...)``, ``((...))``."""
    if isinstance(node, exp.Subquery):
        return not node.alias and _is_source_group(node.this)
    return isinstance(node, exp.Table)


def referenced_tables(expression: exp.Expr) -> tuple[str, ...]:
    """Names (lower-cased) of the real tables an AST names, CTE names excluded, in order.

    >>> referenced_tables(sqlglot.parse_one("WITH x AS (SELECT * FROM a) SELECT * FROM x JOIN b ON TRUE"))
    ('a', 'b')
    """
    cte_names = {cte.alias_or_name.lower() for cte in expression.find_all(exp.CTE)}
    names: list[str] = []
    tables = sorted(expression.find_all(exp.Table), key=lambda t: int(t.this.meta.get("start", 0)))
    for table in tables:
        if not isinstance(table.this, exp.Identifier):
            continue  # a table function (generate_series(...), json_each(...))
        name = table_name(table)
        if name in cte_names and not table.args.get("db"):
            continue
        if name not in names:
            names.append(name)
    return tuple(names)


def table_name(table: exp.Table) -> str:
    """The schema name of a table reference: lower-cased, ``public.``/``main.`` dropped."""
    name = table.name.lower()
    db = table.args.get("db")
    if db is not None and db.name.lower() not in ("public", "main"):
        return f"{db.name.lower()}.{name}"
    return name


def resolve_tables(statement: Statement, schema: Schema) -> None:
    """Raise ``NotFound`` naming the first table of ``statement`` the schema lacks.

    A ``CREATE TABLE`` may name a new table, and ``DROP ... IF EXISTS`` a missing one.

    >>> resolve_tables(parse("SELECT * FROM ghosts", "sqlite"), {"orders": ["id"]})
    Traceback (most recent call last):
    ...
    controller.errors.NotFound: table ghosts does not exist (known tables: orders)
    """
    known = {name.lower() for name in schema}
    expression = statement.expression
    exempt: set[str] = set()
    if isinstance(expression, exp.Create) and str(expression.args.get("kind")).upper() == "TABLE":
        target = expression.this.this if isinstance(expression.this, exp.Schema) else expression.this
        if isinstance(target, exp.Table):
            exempt.add(table_name(target))
    if isinstance(expression, exp.Drop) and expression.args.get("exists"):
        exempt.update(statement.tables)
    for name in statement.tables:
        if name not in known and name not in exempt:
            listing = ", ".join(sorted(known)) or "none"
            raise NotFound(
                f"table {name} does not exist (known tables: {listing})",
                reason="TABLE_NOT_FOUND",
                metadata={"table": name},
            )


def _syntax_error_from_parse(exc: ParseError) -> InvalidArgument:
    first = exc.errors[0] if exc.errors else {}
    line = int(first.get("line") or 1)
    col = int(first.get("col") or 1)
    description = str(first.get("description") or exc).split("\n")[0]
    near = str(first.get("highlight") or "")
    if near and "\n" not in near:
        col = max(1, col - len(near) + 1)  # sqlglot reports the last column of the offending token
    near = near.strip()
    return _syntax_error(line, col, description, near)


def _syntax_error_from_tokens(sql: str, exc: TokenError) -> InvalidArgument:
    line, col = 1, 1
    cause = str(exc.__cause__ or exc)
    match = _TOKEN_POSITION.search(cause)
    if match:
        line = int(match.group(1))
        offset = min(int(match.group(2)), len(sql))
        col = offset - sql.rfind("\n", 0, offset)
        description = "unterminated string or identifier" if "Missing" in cause else cause
    else:
        description = "the query cannot be tokenized"
    return _syntax_error(line, col, description, "")


_MISSING = re.compile(r"Required keyword: '(\w+)' missing for <class '[\w.]*?(\w+)'>")
_EXPECTED = re.compile(r"Expected (.+?) but got <Token token_type: TokenType\.(\w+), text: (.*?), line")
_OPERATORS = {
    "Add": "+", "Sub": "-", "Mul": "*", "Div": "/", "Mod": "%", "EQ": "=", "NEQ": "<>", "GT": ">",
    "GTE": ">=", "LT": "<", "LTE": "<=", "And": "AND", "Or": "OR", "DPipe": "||", "Like": "LIKE",
    "ILike": "ILIKE", "Is": "IS",
}  # fmt: skip
_CLAUSES = {
    "Where": "WHERE needs a condition",
    "Having": "HAVING needs a condition",
    "Order": "ORDER BY needs at least one expression",
    "Group": "GROUP BY needs at least one expression",
    "Limit": "LIMIT needs a number",
    "Offset": "OFFSET needs a number",
    "Join": "the JOIN is incomplete",
    "From": "FROM needs a table",
    "Values": "VALUES needs at least one row",
    "Between": "BETWEEN needs two values joined by AND",
    "In": "IN needs a list of values or a subquery",
}


def plain_syntax_description(description: str) -> str:
    """sqlglot's error text in plain words, without its internals (class names, token dumps).

    >>> plain_syntax_description("Required keyword: 'this' missing for <class 'sqlglot.expressions.query.Where'>")
    'WHERE needs a condition'
    >>> plain_syntax_description("Required keyword: 'expression' missing for <class 'sqlglot.expressions.core.Mul'>")
    'the operator * needs a value on each side'
    """
    missing = _MISSING.search(description)
    if missing:
        kind = missing.group(2)
        if kind in _OPERATORS:
            return f"the operator {_OPERATORS[kind]} needs a value on each side"
        if kind in _CLAUSES:
            return _CLAUSES[kind]
        words = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", kind).upper()
        return f"{words} is incomplete"
    expected = _EXPECTED.search(description)
    if expected:
        what, kind, text = expected.groups()
        found = "the end of the statement" if kind == "SENTINEL" else repr(text)
        return f"expected {what}, found {found}"
    if description.startswith("Expecting )"):
        return "a closing parenthesis ) is missing"
    if description.startswith("Invalid expression / Unexpected token"):
        return "unexpected word or symbol"
    if "<class '" in description or "<Token" in description:
        return "the statement cannot be read here"
    return description


def _syntax_error(line: int, col: int, description: str, near: str) -> InvalidArgument:
    description = plain_syntax_description(description)
    where = f"line {line}, column {col}"
    suffix = f" (near {near!r})" if near else ""
    return InvalidArgument(
        f"SQL syntax error at {where}: {description}{suffix}",
        field_violations=[FieldViolation("query", f"{where}: {description}")],
        reason="SQL_SYNTAX_ERROR",
        metadata={"line": str(line), "column": str(col)},
    )


# -- literals --------------------------------------------------------------------------


class NotALiteral(Exception):
    """The expression is not a constant the router can read."""


def literal_value(node: exp.Expr, rules: DialectRules) -> object:
    """The Python value of a constant expression (NULL → ``None``), or :class:`NotALiteral`.

    Numbers become ``int``, or ``Decimal`` (postgres) / ``float`` (sqlite) per the dialect.

    >>> literal_value(sqlglot.parse_one("-(3)"), DIALECTS["sqlite"])
    -3
    >>> literal_value(sqlglot.parse_one("1.50"), DIALECTS["postgres"])
    Decimal('1.50')
    """
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, exp.Null):
        return None
    if isinstance(node, exp.Boolean):
        return bool(node.this)
    if isinstance(node, exp.Literal):
        if node.is_string:
            return str(node.this)
        return number_value(str(node.this), rules)
    if isinstance(node, exp.Neg):
        value = literal_value(node.this, rules)
        if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
            return -value
    raise NotALiteral(node.sql())


def number_value(text: str, rules: DialectRules) -> int | float | Decimal:
    """A numeric literal's value: ``int`` when integral in form, else float or Decimal."""
    if re.fullmatch(r"[0-9]+", text):
        return int(text)
    if text.lower().startswith("0x"):
        return int(text, 16)
    if rules.decimal_literals_are_exact:
        return Decimal(text)
    return float(text)
