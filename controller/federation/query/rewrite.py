"""Stage 3: the SQL each shard runs, and the merge that puts the answers together.

A statement that runs on one shard is passed through untouched (the original text).
Otherwise:

* **SELECT without aggregates** keeps its text but gains hidden trailing columns for
  ORDER BY terms that are not in the select list (``_a67_o0``...), and
  ``LIMIT n OFFSET m`` becomes ``LIMIT n+m`` on each shard (the merge skips ``m``).
* **SELECT with GROUP BY or aggregates** becomes a partial aggregation per shard::

      SELECT status, AVG(amount) AS a FROM orders GROUP BY status HAVING COUNT(*) > 2
      ORDER BY a DESC LIMIT 3
      -- each shard:
      SELECT status AS _a67_g0, SUM(amount) AS _a67_p0, COUNT(amount) AS _a67_p1,
             COUNT(*) AS _a67_p2 FROM orders GROUP BY status

  COUNT → SUM of counts, SUM → SUM, MIN/MAX → MIN/MAX, AVG → SUM and COUNT,
  COUNT/SUM/AVG(DISTINCT x) → ``x`` added to the shard's GROUP BY (exact), HAVING,
  ORDER BY, DISTINCT, LIMIT and expressions over aggregates are evaluated by the merge
  (:mod:`.merge`). Non-aggregate expressions (group keys and functions of them) are
  computed on the shards and carried.
* **INSERT ... VALUES** is split: each shard gets the rows whose key it owns.
* **UPDATE, DELETE, DDL** run unchanged on every routed shard.

Refused here (FailedPrecondition naming the construct): aggregates other than
COUNT/SUM/TOTAL/MIN/MAX/AVG across shards, DISTINCT aggregates with FILTER or several
arguments, ``SELECT *`` with aggregates, DISTINCT ON, GROUPING SETS/ROLLUP/CUBE,
ORDER BY ... COLLATE, DISTINCT with ORDER BY terms outside the select list, FETCH ...
WITH TIES / PERCENT, non-constant LIMIT/OFFSET, and expressions over aggregates the
merge cannot evaluate.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlglot import exp
from sqlglot.dialects.dialect import Dialect
from sqlglot.errors import SqlglotError
from sqlglot.tokenizer_core import Token, TokenType

from controller.errors import InvalidArgument

from .collation import refuse_collations_at_merge
from .merge import (
    AggRef,
    Aggregate,
    AggregateFunction,
    Apply,
    Const,
    GroupedMerge,
    MergeExpr,
    MergeSpec,
    OrderTerm,
    OutputColumn,
    OutputRef,
    RowsMerge,
    Slot,
    SortKey,
    WriteMerge,
    arithmetic,
)
from .parse import DialectRules, NotALiteral, Statement, StatementKind, literal_value
from .route import Analysis, Route, refusal

HIDDEN_PREFIX = "_a67_"

_KNOWN_AGGREGATES: Mapping[type[exp.Expr], str] = {
    exp.Count: "count",
    exp.Sum: "sum",
    exp.Avg: "avg",
    exp.Min: "min",
    exp.Max: "max",
    exp.Stddev: "stddev_samp",
    exp.StddevSamp: "stddev_samp",
    exp.StddevPop: "stddev_pop",
    exp.Variance: "var_samp",
    exp.VariancePop: "var_pop",
    exp.GroupConcat: "string_agg",
}
_SPREAD = frozenset({"stddev_samp", "stddev_pop", "var_samp", "var_pop"})
"""Variance and standard deviation: merged from partial counts, sums and sums of squares."""
_ANONYMOUS_AGGREGATES = frozenset(
    {
        "total",
        "group_concat",
        "string_agg",
        "array_agg",
        "json_group_array",
        "json_group_object",
        "json_agg",
        "jsonb_agg",
        "json_object_agg",
        "jsonb_object_agg",
        "every",
        "bool_and",
        "bool_or",
        "bit_and",
        "bit_or",
        "bit_xor",
        "xmlagg",
        "stddev",
        "stddev_pop",
        "stddev_samp",
        "variance",
        "var_pop",
        "var_samp",
        "median",
        "mode",
        "percentile_cont",
        "percentile_disc",
        "range_agg",
        "range_intersect_agg",
        "any_value",
    }
)
_BINARY_OPS: Mapping[type[exp.Expr], str] = {
    exp.Add: "+",
    exp.Sub: "-",
    exp.Mul: "*",
    exp.Div: "/",
    exp.Mod: "%",
    exp.EQ: "=",
    exp.NEQ: "<>",
    exp.LT: "<",
    exp.LTE: "<=",
    exp.GT: ">",
    exp.GTE: ">=",
    exp.And: "and",
    exp.Or: "or",
    exp.DPipe: "concat",
}
_CAST_TARGETS: Mapping[str, str] = {
    "INT": "int4",
    "BIGINT": "integer",
    "SMALLINT": "int2",
    "TINYINT": "integer",
    "FLOAT": "float",
    "DOUBLE": "float",
    "DECIMAL": "numeric",
    "TEXT": "text",
    "VARCHAR": "text",
}


@dataclass(frozen=True)
class Rewritten:
    """The output of the rewrite stage."""

    shard_sql: Mapping[int, str]
    merge: MergeSpec | None


def rewrite(analysis: Analysis, route: Route) -> Rewritten:
    """Shard SQL and merge for a routed statement.

    >>> from controller.federation.query.layout import ShardLayout
    >>> from controller.federation.query.parse import parse
    >>> from controller.federation.query.route import analyse, route_analysis
    >>> statement = parse("SELECT COUNT(*) FROM orders", "sqlite")
    >>> analysis = analyse(statement, ShardLayout("hash", 2, "k"), {"orders": ["k"]})
    >>> rewrite(analysis, route_analysis(analysis)).shard_sql[0]
    'SELECT COUNT(*) AS _a67_p0 FROM orders'
    """
    statement = analysis.statement
    if route.single:
        return Rewritten({route.shards[0]: statement.sql}, None)
    if statement.kind is StatementKind.SELECT:
        select = statement.expression
        if isinstance(select, exp.SetOperation):
            compound_sql, rows = rewrite_set_operation(select, analysis)
            return Rewritten(dict.fromkeys(route.shards, compound_sql), rows)
        if not isinstance(select, exp.Select):
            raise refusal(
                f"{type(select).__name__} spanning shards",
                f"{type(select).__name__} spanning shards is not supported",
                "CROSS_SHARD_QUERY_SHAPE",
            )
        sql, spec = rewrite_select(select, analysis)
        return Rewritten(dict.fromkeys(route.shards, sql), spec)
    if statement.kind is StatementKind.INSERT and route.rows_by_shard is not None:
        return Rewritten(split_insert(statement, route.rows_by_shard), WriteMerge("sum"))
    once = route.reference_write or statement.kind is StatementKind.DDL
    return Rewritten(dict.fromkeys(route.shards, statement.sql), WriteMerge("first" if once else "sum"))


def split_insert(statement: Statement, rows_by_shard: Mapping[int, Sequence[int]]) -> dict[int, str]:
    """One INSERT per shard with the VALUES rows it owns (the original text if only one shard)."""
    if len(rows_by_shard) == 1:
        return {shard: statement.sql for shard in rows_by_shard}
    result: dict[int, str] = {}
    node = statement.expression
    values = node.args["expression"]
    for shard, indexes in sorted(rows_by_shard.items()):
        copy = node.copy()
        copy.args["expression"].set("expressions", [values.expressions[i].copy() for i in indexes])
        result[shard] = copy.sql(dialect=statement.rules.sqlglot_dialect)
    return result


# -- SELECT ------------------------------------------------------------------------------


def aggregate_kind(node: exp.Expr) -> str | None:
    """``count``/``sum``/``avg``/``min``/``max``/``total`` for a supported aggregate call,
    ``unsupported:NAME`` for another aggregate, ``None`` for anything else."""
    if isinstance(node, exp.Filter):
        return aggregate_kind(node.this)
    kind = _KNOWN_AGGREGATES.get(type(node))
    if kind is not None:
        if kind in ("min", "max") and node.expressions:
            return None  # SQLite's multi-argument MIN/MAX are scalar functions
        return kind
    if isinstance(node, exp.AggFunc):
        return f"unsupported:{node.sql_name() if hasattr(node, 'sql_name') else type(node).__name__}"
    if isinstance(node, exp.Anonymous) and str(node.this).lower() in _ANONYMOUS_AGGREGATES:
        name = str(node.this).lower()
        return "total" if name == "total" else f"unsupported:{name}"
    if isinstance(node, exp.WithinGroup):
        return "unsupported:WITHIN GROUP"
    return None


def contains_aggregate(node: exp.Expr) -> bool:
    """Whether an expression has an aggregate call outside nested queries and windows."""
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, exp.Window):
            continue
        if aggregate_kind(current) is not None:
            return True
        stack.extend(c for c in current.iter_expressions() if not isinstance(c, exp.Query))
    return False


def _unalias(node: exp.Expr) -> exp.Expr:
    return node.this if isinstance(node, exp.Alias) else node


def _is_star(node: exp.Expr) -> bool:
    return isinstance(node, exp.Star) or (isinstance(node, exp.Column) and isinstance(node.this, exp.Star))


def _strip_qualifiers(node: exp.Expr) -> exp.Expr:
    def strip(n: exp.Expr) -> exp.Expr:
        if isinstance(n, exp.Column) and n.table:
            return exp.column(n.name, quoted=n.this.quoted if isinstance(n.this, exp.Identifier) else False)
        return n

    return node.copy().transform(strip)


def _same(a: exp.Expr, b: exp.Expr) -> bool:
    return bool(a == b or _strip_qualifiers(a) == _strip_qualifiers(b))


def _limits(select: exp.Select, rules: DialectRules) -> tuple[int | None, int]:
    limit_node = select.args.get("limit")
    offset_node = select.args.get("offset")
    limit: int | None = None
    if isinstance(limit_node, exp.Fetch):
        options = limit_node.args.get("limit_options")
        if options is not None and (options.args.get("percent") or options.args.get("with_ties")):
            raise refusal(
                "FETCH WITH TIES / PERCENT spanning shards",
                "FETCH ... WITH TIES or PERCENT spanning shards is not supported",
                "CROSS_SHARD_FETCH",
            )
        limit = _integer(limit_node.args.get("count"), "FETCH", rules, default=1)
    elif isinstance(limit_node, exp.Limit):
        limit = _integer(limit_node.expression, "LIMIT", rules, default=None)
    offset = _integer(offset_node.expression, "OFFSET", rules, default=0) if offset_node is not None else 0
    return limit, offset or 0


def _integer(node: exp.Expr | None, what: str, rules: DialectRules, default: int | None) -> int | None:
    if node is None or (isinstance(node, exp.Var) and str(node.this).upper() == "ALL"):
        return default
    try:
        value = _constant(node, rules)
    except NotALiteral:
        value = "?"
    if value is None:
        return default
    if isinstance(value, int) and value < 0 and rules.negative_limit_is_unbounded:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise refusal(
            f"non-constant {what}",
            f"{what} must be a non-negative integer constant in a query spanning shards",
            "CROSS_SHARD_LIMIT",
        )
    return min(value, INT64_MAX)


INT64_MAX = 2**63 - 1
"""The largest LIMIT both dialects take; LIMIT/OFFSET arithmetic is clamped to it."""


def _constant(node: exp.Expr, rules: DialectRules) -> object:
    """The value of a constant expression of literals and arithmetic (``2 + 3``), or NotALiteral."""
    while isinstance(node, exp.Paren):
        node = node.this
    op = _BINARY_OPS.get(type(node))
    if op in ("+", "-", "*", "/", "%"):
        return arithmetic(op, _constant(node.this, rules), _constant(node.expression, rules), rules)
    return literal_value(node, rules)


def _shard_limit(limit: int | None, offset: int) -> exp.Limit | None:
    """Each shard's LIMIT: enough rows for the merge to skip ``offset`` and keep ``limit``."""
    return None if limit is None else exp.Limit(expression=exp.Literal.number(min(limit + offset, INT64_MAX)))


def rewrite_select(select: exp.Select, analysis: Analysis) -> tuple[str, MergeSpec]:
    """Shard SQL and merge for a SELECT that spans shards."""
    distinct = select.args.get("distinct")
    if (
        distinct is not None
        and distinct.args.get("on") is not None
        and not _distinct_on_key(select, analysis)
    ):
        raise refusal(
            "DISTINCT ON spanning shards",
            "DISTINCT ON spanning shards is exact only when its expressions include the sharding key "
            "(each group is then on one shard)",
            "CROSS_SHARD_DISTINCT_ON",
        )
    grouped = (
        select.args.get("group") is not None
        or select.args.get("having") is not None
        or any(contains_aggregate(p) for p in select.expressions)
        or any(contains_aggregate(o.this) for o in _order_terms(select))
    )
    whole_groups = grouped and _groups_live_on_one_shard(select, analysis)
    if grouped and not whole_groups and distinct is not None and distinct.args.get("on") is not None:
        raise refusal(
            "DISTINCT ON with aggregates spanning shards",
            "DISTINCT ON over aggregated rows spanning shards is exact only when GROUP BY names the sharding key",
            "CROSS_SHARD_DISTINCT_ON",
        )
    refuse_collations_at_merge(analysis, _merge_positions(select, grouped and not whole_groups))
    if grouped and not whole_groups:
        return _GroupedRewrite(select, analysis).build()
    # Rows, or whole groups: with the sharding key in GROUP BY, every group lives on one
    # shard, so each shard's groups (and its HAVING) are final and merge as rows.
    return _rewrite_rows(select, analysis)


def _merge_positions(select: exp.Select, merged_groups: bool) -> list[tuple[exp.Expr, bool]]:
    """The expressions the merge compares, each with whether it is compared whole."""
    projections = list(select.expressions)
    distinct = select.args.get("distinct") is not None
    positions = [(o.this, True) for o in _order_terms(select)]
    positions += [(_unalias(p), distinct) for p in projections if not _is_star(p)]
    if merged_groups:
        group = select.args.get("group")
        for item in group.expressions if isinstance(group, exp.Group) else []:
            if _is_ordinal(item) and 1 <= int(str(item.this)) <= len(projections):
                item = _unalias(projections[int(str(item.this)) - 1])
            positions.append((item, True))
        having = select.args.get("having")
        if isinstance(having, exp.Having):
            positions.append((having.this, False))
    elif not distinct:
        positions = [p for p in positions if p[1]]  # rows: only ORDER BY and DISTINCT compare
    return positions


def _groups_live_on_one_shard(select: exp.Select, analysis: Analysis) -> bool:
    """Whether GROUP BY names the sharding key of every sharded table of the query."""
    group = select.args.get("group")
    if not isinstance(group, exp.Group) or any(
        group.args.get(k) for k in ("rollup", "cube", "grouping_sets")
    ):
        return False
    root = analysis.roots[0]
    sharded = [ref for ref in root.tables.values() if ref.sharded]
    if not sharded:
        return False
    projections = list(select.expressions)
    aliases = {p.alias.lower(): _unalias(p) for p in projections if isinstance(p, exp.Alias)}
    keyed: set[int] = set()
    for item in group.expressions:
        if _is_ordinal(item):
            position = int(str(item.this))
            item = _unalias(projections[position - 1]) if 1 <= position <= len(projections) else item
        if not isinstance(item, exp.Column):
            continue
        aliased = aliases.get(item.name.lower()) if not item.table else None
        if aliased is not None and not _same(aliased, item):
            continue  # the name is also an output alias: which one GROUP BY means differs by dialect
        ref = root.resolve(item, analysis.columns_of)
        if ref is not None and ref.sharded and item.name.lower() == ref.key:
            keyed.add(analysis.find(ref))
    return all(analysis.find(ref) in keyed for ref in sharded)


# -- set operations ------------------------------------------------------------------------


def _set_operation_parts(node: exp.Expr) -> tuple[list[exp.Select], list[exp.SetOperation]]:
    """The SELECT leaves (left to right) and the set-operation nodes of a compound query."""
    while isinstance(node, exp.Subquery):
        node = node.this
    if isinstance(node, exp.SetOperation):
        left, left_ops = _set_operation_parts(node.this)
        right, right_ops = _set_operation_parts(node.expression)
        return left + right, [node, *left_ops, *right_ops]
    if isinstance(node, exp.Select):
        return [node], []
    raise refusal(
        "set operation branch", "a branch of a set operation must be a SELECT", "CROSS_SHARD_SET_OPERATION"
    )


def _op_name(node: exp.SetOperation) -> str:
    word = {exp.Union: "UNION", exp.Intersect: "INTERSECT", exp.Except: "EXCEPT"}.get(type(node), "UNION")
    return word if node.args.get("distinct") else f"{word} ALL"


def _key_position(leaves: Sequence[exp.Select], analysis: Analysis) -> int | None:
    """An output position that is the sharding key in every branch (rows then meet on one shard)."""
    scopes = {id(scope.node): scope for scope in analysis.roots}
    width = len(leaves[0].expressions)
    for position in range(width):
        keyed = True
        for leaf in leaves:
            scope = scopes.get(id(leaf))
            projections = leaf.expressions
            if scope is None or len(projections) != width or _is_star(projections[position]):
                keyed = False
                break
            column = _unalias(projections[position])
            ref = scope.resolve(column, analysis.columns_of) if isinstance(column, exp.Column) else None
            if ref is None or not ref.sharded or column.name.lower() != ref.key:
                keyed = False
                break
            if any(r.sharded and analysis.find(r) != analysis.find(ref) for r in scope.tables.values()):
                keyed = False
                break
        if keyed:
            return position
    return None


def _groups_keyed_at(leaf: exp.Select, position: int) -> bool:
    """Whether a grouped branch groups by its key column (the output at ``position``)."""
    group = leaf.args.get("group")
    key = _unalias(leaf.expressions[position])
    if not isinstance(group, exp.Group):
        return False
    for item in group.expressions:
        if _is_ordinal(item) and int(str(item.this)) == position + 1:
            return True
        if _same(item, key):
            return True
    return False


def rewrite_set_operation(node: exp.SetOperation, analysis: Analysis) -> tuple[str, RowsMerge]:
    """Shard SQL and merge for UNION [ALL] / INTERSECT [ALL] / EXCEPT [ALL] spanning shards.

    Each shard runs the whole compound query over its rows, and the merge concatenates the
    shards' answers (a k-way merge for ORDER BY, DISTINCT for a distinct UNION), which is
    exact when

    * the branches put the sharding key in the same output column (rows that could meet
      live on one shard): every operator, and branches grouped by that key; or
    * only UNION / UNION ALL combine plain row branches (no aggregates, LIMIT or windows):
      a UNION ALL concatenates, a distinct UNION (at the top) removes duplicates across
      shards too. A branch over reference tables only is on every shard: under a
      distinct UNION its copies collapse; under UNION ALL it would repeat, so it is refused.
    """
    rules = analysis.statement.rules
    leaves, ops = _set_operation_parts(node)
    width = {len(leaf.expressions) for leaf in leaves}
    if len(width) != 1 or any(_is_star(p) for leaf in leaves for p in leaf.expressions):
        raise refusal(
            "set operation with * or unequal branches spanning shards",
            "each branch of a set operation spanning shards must list the same number of columns (no *)",
            "CROSS_SHARD_SET_OPERATION",
        )
    for leaf in leaves:
        if any(leaf.args.get(k) is not None for k in ("limit", "offset", "order")) or next(
            leaf.find_all(exp.Window), None
        ):
            raise refusal(
                "LIMIT, ORDER BY or window function in a branch of a set operation spanning shards",
                "a branch of a set operation spanning shards cannot have its own LIMIT, ORDER BY or "
                "window functions: put ORDER BY and LIMIT after the last branch",
                "CROSS_SHARD_SET_OPERATION",
            )
    position = _key_position(leaves, analysis)
    root_distinct = bool(node.args.get("distinct"))
    if position is not None:
        for leaf in leaves:
            grouped = leaf.args.get("group") is not None or any(
                contains_aggregate(p) for p in leaf.expressions
            )
            if grouped and not _groups_keyed_at(leaf, position):
                raise refusal(
                    "aggregating branch of a set operation spanning shards",
                    "a branch of a set operation spanning shards may aggregate only when it groups by the "
                    "sharding key it returns",
                    "CROSS_SHARD_SET_OPERATION",
                )
    else:
        for op in ops:
            if not isinstance(op, exp.Union):
                raise refusal(
                    f"{_op_name(op)} spanning shards",
                    f"{_op_name(op)} spanning shards is exact only when every branch returns the sharding key "
                    "in the same column (rows that can match then live on one shard): add it, or restrict "
                    "the query to one key value",
                    "CROSS_SHARD_SET_OPERATION",
                )
            if op.args.get("distinct") and not root_distinct:
                raise refusal(
                    "UNION inside UNION ALL spanning shards",
                    "a distinct UNION inside a UNION ALL spanning shards is not supported unless every "
                    "branch returns the sharding key in the same column",
                    "CROSS_SHARD_SET_OPERATION",
                )
        scopes = {id(scope.node): scope for scope in analysis.roots}
        for leaf in leaves:
            if (
                leaf.args.get("group") is not None
                or leaf.args.get("having") is not None
                or any(contains_aggregate(p) for p in leaf.expressions)
            ):
                raise refusal(
                    "aggregating branch of a set operation spanning shards",
                    "a branch of a set operation spanning shards may aggregate only when every branch "
                    "returns the sharding key in the same column and groups by it",
                    "CROSS_SHARD_SET_OPERATION",
                )
            distinct = leaf.args.get("distinct")
            if distinct is not None and (distinct.args.get("on") is not None or not root_distinct):
                raise refusal(
                    "DISTINCT branch of UNION ALL spanning shards",
                    "a DISTINCT branch of a UNION ALL spanning shards is not supported: use UNION, or "
                    "return the sharding key in the same column of every branch",
                    "CROSS_SHARD_SET_OPERATION",
                )
            scope = scopes.get(id(leaf))
            if not root_distinct and (scope is None or not any(r.sharded for r in scope.tables.values())):
                raise refusal(
                    "UNION ALL branch over reference tables spanning shards",
                    "a UNION ALL branch that reads only reference tables would be repeated by every shard: "
                    "use UNION, or read it in a separate query",
                    "CROSS_SHARD_SET_OPERATION",
                )
    names = [_output_name(p) for p in leaves[0].expressions]
    sort_keys: list[SortKey] = []
    for ordered in node.args["order"].expressions if isinstance(node.args.get("order"), exp.Order) else []:
        term = ordered.this
        index: int | None = None
        if _is_ordinal(term):
            index = int(str(term.this)) - 1
        elif isinstance(term, exp.Column) and not term.table and term.name.lower() in names:
            index = names.index(term.name.lower())
        if index is None or not 0 <= index < len(names):
            raise refusal(
                "ORDER BY of a set operation spanning shards",
                "ORDER BY after a set operation spanning shards must name output columns (by name or position)",
                "CROSS_SHARD_SET_OPERATION",
            )
        sort_keys.append(SortKey(index, bool(ordered.args.get("desc")), _explicit_nulls(ordered, rules)))
    limit, offset = _limits(node, rules)  # type: ignore[arg-type]
    shard = node.copy()
    shard.set("offset", None)
    shard.set("limit", _shard_limit(limit, offset))
    spec = RowsMerge(tuple(sort_keys), root_distinct and position is None, offset, limit, 0)
    return shard.sql(dialect=rules.sqlglot_dialect), spec


def _output_name(projection: exp.Expr) -> str:
    if isinstance(projection, exp.Alias):
        return projection.alias.lower()
    if isinstance(projection, exp.Column):
        return projection.name.lower()
    return ""


def _order_terms(select: exp.Select) -> list[exp.Ordered]:
    order = select.args.get("order")
    return list(order.expressions) if isinstance(order, exp.Order) else []


def _projection_index(term: exp.Expr, projections: Sequence[exp.Expr], rules: DialectRules) -> int | None:
    """The select-list position an ORDER BY term names: ordinal, output alias, or the same expression."""
    try:
        value = literal_value(term, rules)
    except NotALiteral:
        value = None
    if isinstance(value, int) and not isinstance(value, bool) and isinstance(term, exp.Literal):
        if not 1 <= value <= len(projections) and not any(_is_star(p) for p in projections):
            raise InvalidArgument(
                f"ORDER BY position {value} is not in the select list", reason="BAD_ORDER_BY"
            )
        return value - 1
    if isinstance(term, exp.Column) and not term.table:
        for i, projection in enumerate(projections):
            if isinstance(projection, exp.Alias) and projection.alias.lower() == term.name.lower():
                return i
    for i, projection in enumerate(projections):
        if not _is_star(projection) and _same(_unalias(projection), term):
            return i
    return None


def _distinct_on_key(select: exp.Select, analysis: Analysis) -> bool:
    """``DISTINCT ON (...)`` naming the sharding key of the query's (one, co-located) group."""
    root = analysis.roots[0]
    sharded = [ref for ref in root.tables.values() if ref.sharded]
    if not sharded or any(analysis.find(r) != analysis.find(sharded[0]) for r in sharded):
        return False
    on = select.args["distinct"].args.get("on")
    terms = on.expressions if isinstance(on, exp.Tuple) else [on]
    for term in terms:
        ref = root.resolve(term, analysis.columns_of) if isinstance(term, exp.Column) else None
        if ref is not None and ref.sharded and term.name.lower() == ref.key:
            return True
    return False


def _rewrite_rows(select: exp.Select, analysis: Analysis) -> tuple[str, RowsMerge]:
    rules = analysis.statement.rules
    projections = list(select.expressions)
    distinct_node = select.args.get("distinct")
    # DISTINCT ON by the key is final on each shard: the merge concatenates, it removes nothing.
    distinct = distinct_node is not None and distinct_node.args.get("on") is None
    shard = select.copy()
    hidden: list[exp.Expr] = []
    keys: list[tuple[int | None, exp.Ordered]] = []
    for ordered in _order_terms(select):
        index = _projection_index(ordered.this, projections, rules)
        term = ordered.this
        if (
            index is not None
            and any(_is_star(p) for p in projections[: index + 1])
            and not _is_ordinal(ordered.this)
        ):
            # Its position after a * expansion is unknown: carry its expression as a hidden column.
            term = _unalias(projections[index])
            index = None
        if index is None:
            if distinct:
                raise refusal(
                    "DISTINCT with ORDER BY outside the select list",
                    "SELECT DISTINCT spanning shards must ORDER BY columns of its select list",
                    "CROSS_SHARD_DISTINCT_ORDER",
                )
            hidden.append(exp.alias_(term.copy(), f"{HIDDEN_PREFIX}o{len(hidden)}"))
        keys.append((index, ordered))
    total_hidden = len(hidden)
    sort_keys: list[SortKey] = []
    hidden_seen = 0
    for index, ordered in keys:
        if index is None:
            position = -(total_hidden - hidden_seen)
            hidden_seen += 1
        else:
            position = index
        sort_keys.append(SortKey(position, bool(ordered.args.get("desc")), _explicit_nulls(ordered, rules)))
    if hidden:
        shard.set("expressions", [p.copy() for p in projections] + hidden)
    limit, offset = _limits(select, rules)
    shard.set("offset", None)
    shard.set("limit", _shard_limit(limit, offset))
    spec = RowsMerge(tuple(sort_keys), distinct, offset, limit, total_hidden)
    return shard.sql(dialect=rules.sqlglot_dialect), spec


def _constant_arithmetic(node: exp.Expr) -> bool:
    """Literals combined by the operators the merge evaluates: ``- 25 * - 73``."""
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, exp.Literal | exp.Null):
        return True
    if isinstance(node, exp.Neg):
        return _constant_arithmetic(node.this)
    if _BINARY_OPS.get(type(node)) in ("+", "-", "*", "/", "%"):
        return _constant_arithmetic(node.this) and _constant_arithmetic(node.expression)
    return False


def _groupable(term: exp.Expr) -> exp.Expr:
    """A GROUP BY term for a shard: a constant is cast to text, so no dialect reads it as a position.

    Grouping by a constant makes one group whatever its type; ``GROUP BY 42`` (or ``(42)``,
    ``-42``) would mean the 42nd output column to SQLite and PostgreSQL.
    """
    if next(term.find_all(exp.Column, exp.Query), None) is None and not contains_aggregate(term):
        return exp.Cast(this=term.copy(), to=exp.DataType.build("TEXT"))
    return term.copy()


def _is_ordinal(node: exp.Expr) -> bool:
    return isinstance(node, exp.Literal) and not node.is_string


def _explicit_nulls(ordered: exp.Ordered, rules: DialectRules) -> bool | None:
    """``nulls_first`` as sqlglot parsed it (it fills in the dialect's default)."""
    nulls_first = ordered.args.get("nulls_first")
    return None if nulls_first is None else bool(nulls_first)


class _GroupedRewrite:
    """Builds the partial-aggregate shard query and the :class:`GroupedMerge` of one SELECT."""

    def __init__(self, select: exp.Select, analysis: Analysis) -> None:
        self.select = select
        self.analysis = analysis
        self.rules = analysis.statement.rules
        self.root = analysis.roots[0]
        self.columns: list[exp.Expr] = []
        self.column_index: dict[str, int] = {}
        self.group_exprs: list[exp.Expr] = []
        self.group_columns: list[int] = []
        self.carried: list[int] = []
        self.carried_index: dict[str, int] = {}
        self.aggregates: list[Aggregate] = []
        self.aggregate_index: dict[tuple[str, tuple[int, ...]], int] = {}
        self.projections = list(select.expressions)
        self.has_distinct_aggregate = False
        self.has_min_max = False
        self.bare_columns: list[str] = []
        statement = analysis.statement
        self.item_texts = select_item_texts(statement.sql, self.rules)

    def sql(self, node: exp.Expr) -> str:
        return node.sql(dialect=self.rules.sqlglot_dialect)

    def _column(self, node: exp.Expr, prefix: str) -> int:
        text = f"{prefix}:{self.sql(node)}"
        if text not in self.column_index:
            index = len(self.columns)
            self.column_index[text] = index
            self.columns.append(exp.alias_(node.copy(), f"{HIDDEN_PREFIX}{prefix}{index}"))
        return self.column_index[text]

    def build(self) -> tuple[str, GroupedMerge]:
        select = self.select
        group = select.args.get("group")
        if isinstance(group, exp.Group) and any(
            group.args.get(k) for k in ("rollup", "cube", "grouping_sets")
        ):
            raise refusal(
                "GROUPING SETS / ROLLUP / CUBE spanning shards",
                "GROUPING SETS, ROLLUP and CUBE spanning shards are not supported",
                "CROSS_SHARD_GROUPING_SETS",
            )
        for item in group.expressions if isinstance(group, exp.Group) else []:
            if isinstance(item, exp.Rollup | exp.Cube | exp.GroupingSets):
                raise refusal(
                    "GROUPING SETS / ROLLUP / CUBE spanning shards",
                    "GROUPING SETS, ROLLUP and CUBE spanning shards are not supported",
                    "CROSS_SHARD_GROUPING_SETS",
                )
            resolved = self._resolve_group_item(item)
            self.group_exprs.append(resolved)
            self.group_columns.append(self._column(resolved, "g"))
        scalar = not self.group_exprs
        outputs: list[OutputColumn] = []
        for projection in self.projections:
            if _is_star(projection):
                raise refusal(
                    "SELECT * with aggregates spanning shards",
                    "SELECT * with GROUP BY or aggregates spanning shards is not supported: list the columns",
                    "CROSS_SHARD_STAR_AGGREGATE",
                )
            outputs.append(self._output(projection, self.transform(_unalias(projection))))
        having_node = select.args.get("having")
        having = (
            self.transform(having_node.this, aliases=True) if isinstance(having_node, exp.Having) else None
        )
        distinct = select.args.get("distinct") is not None
        order: list[OrderTerm] = []
        for ordered in _order_terms(select):
            index = _projection_index(ordered.this, self.projections, self.rules)
            if index is not None:
                expr: MergeExpr = OutputRef(index)
            elif distinct:
                raise refusal(
                    "DISTINCT with ORDER BY outside the select list",
                    "SELECT DISTINCT spanning shards must ORDER BY columns of its select list",
                    "CROSS_SHARD_DISTINCT_ORDER",
                )
            else:
                expr = self.transform(ordered.this, aliases=True)
            order.append(
                OrderTerm(expr, bool(ordered.args.get("desc")), _explicit_nulls(ordered, self.rules))
            )
        if self.rules.bare_columns_follow_min_max and self.has_min_max and self.bare_columns:
            raise refusal(
                "bare column with MIN/MAX spanning shards",
                f"column {self.bare_columns[0]} is neither grouped nor aggregated: next to MIN/MAX SQLite takes "
                "it from the row holding the extreme, which is not computed across shards; GROUP BY it or "
                "aggregate it",
                "CROSS_SHARD_BARE_COLUMN",
            )
        rows_column: int | None = None
        if scalar:
            if self.has_distinct_aggregate and self.carried:
                raise refusal(
                    "non-aggregate expression next to a DISTINCT aggregate without GROUP BY",
                    "without GROUP BY, a DISTINCT aggregate spanning shards can only be combined with other "
                    "aggregates and constants",
                    "CROSS_SHARD_SCALAR_DISTINCT",
                )
            if self.carried:
                rows_column = self._column(exp.Count(this=exp.Star()), "p")
        limit, offset = _limits(select, self.rules)
        shard = select.copy()
        shard.set("expressions", self.columns)
        group_by = self.group_exprs + [
            _unalias(self.columns[i]).copy() for key, i in self.column_index.items() if key.startswith("d:")
        ]
        shard.set("group", exp.Group(expressions=[_groupable(g) for g in group_by]) if group_by else None)
        for key in ("having", "order", "limit", "offset", "distinct"):
            shard.set(key, None)
        spec = GroupedMerge(
            group_columns=tuple(self.group_columns),
            carried_columns=tuple(self.carried),
            aggregates=tuple(self.aggregates),
            outputs=tuple(outputs),
            having=having,
            order=tuple(order),
            distinct=distinct,
            offset=offset,
            limit=limit,
            scalar=scalar,
            rows_column=rows_column,
        )
        return shard.sql(dialect=self.rules.sqlglot_dialect), spec

    def _resolve_group_item(self, item: exp.Expr) -> exp.Expr:
        if _is_ordinal(item):
            position = int(str(item.this))
            if not 1 <= position <= len(self.projections):
                raise InvalidArgument(
                    f"GROUP BY position {position} is not in the select list", reason="BAD_GROUP_BY"
                )
            return _unalias(self.projections[position - 1])
        if isinstance(item, exp.Column) and not item.table and self._is_output_alias(item):
            for projection in self.projections:
                if isinstance(projection, exp.Alias) and projection.alias.lower() == item.name.lower():
                    return _unalias(projection)
        return item

    def _is_output_alias(self, column: exp.Column) -> bool:
        """An unqualified name that is a select-list alias and not a column of the tables."""
        name = column.name.lower()
        aliases = {p.alias.lower() for p in self.projections if isinstance(p, exp.Alias)}
        if name not in aliases:
            return False
        return not any(name in self.analysis.columns_of(ref.table) for ref in self.root.tables.values())

    def written(self, projection: exp.Expr) -> str | None:
        """The select-list item's text as the caller wrote it (SQLite names columns by it)."""
        if self.item_texts is None or len(self.item_texts) != len(self.projections):
            return None
        index = next(i for i, p in enumerate(self.projections) if p is projection)
        return self.item_texts[index]

    def _output(self, projection: exp.Expr, expr: MergeExpr) -> OutputColumn:
        name = output_name(projection, self.analysis.statement, self.written(projection))
        type_column = self.carried[expr.index] if isinstance(expr, Slot) else None
        type_name: str | None = None
        if isinstance(expr, AggRef):
            aggregate = self.aggregates[expr.index]
            if aggregate.function in ("count", "count_distinct"):
                type_name = self.rules.integer_type
            elif aggregate.function in ("min", "max", "sum"):
                type_column = aggregate.columns[0]
        return OutputColumn(name=name, expr=expr, type_column=type_column, type_name=type_name)

    # -- expressions ----------------------------------------------------------------------

    def transform(self, node: exp.Expr, *, aliases: bool = False) -> MergeExpr:
        """A merge expression for ``node``: aggregates become partials, the rest is carried."""
        while isinstance(node, exp.Paren):
            node = node.this
        if aliases and isinstance(node, exp.Column) and not node.table and self._is_output_alias(node):
            for i, projection in enumerate(self.projections):
                if isinstance(projection, exp.Alias) and projection.alias.lower() == node.name.lower():
                    return OutputRef(i)
        kind = aggregate_kind(node)
        if kind is not None:
            return self._aggregate(node, kind)
        if not contains_aggregate(node) and not (aliases and self._references_alias(node)):
            try:
                return Const(literal_value(node, self.rules))
            except NotALiteral:
                pass
            if _constant_arithmetic(node):
                return self._operator(node, aliases)
            self._note_bare_columns(node)
            text = self.sql(node)
            if text not in self.carried_index:
                self.carried_index[text] = len(self.carried)
                group_column = self.column_index.get(f"g:{text}")
                self.carried.append(group_column if group_column is not None else self._column(node, "s"))
            return Slot(self.carried_index[text])
        return self._operator(node, aliases)

    def _references_alias(self, node: exp.Expr) -> bool:
        """Whether ``node`` names a select-list alias (HAVING n > 5, ORDER BY n + 1 in SQLite)."""
        stack = [node]
        while stack:
            current = stack.pop()
            if isinstance(current, exp.Column) and not current.table and self._is_output_alias(current):
                return True
            stack.extend(c for c in current.iter_expressions() if not isinstance(c, exp.Query))
        return False

    def _note_bare_columns(self, node: exp.Expr) -> None:
        if any(_same(node, g) for g in self.group_exprs):
            return
        for column in node.find_all(exp.Column):
            if not any(_same(column, g) for g in self.group_exprs):
                self.bare_columns.append(self.sql(column))

    def _operator(self, node: exp.Expr, aliases: bool) -> MergeExpr:
        op = _BINARY_OPS.get(type(node))
        if op is not None:
            return Apply(
                op,
                (
                    self.transform(node.this, aliases=aliases),
                    self.transform(node.expression, aliases=aliases),
                ),
            )
        if isinstance(node, exp.Neg):
            return Apply("neg", (self.transform(node.this, aliases=aliases),))
        if isinstance(node, exp.Not):
            inner = node.this
            if isinstance(inner, exp.Is) and isinstance(inner.expression, exp.Null):
                return Apply("is_not_null", (self.transform(inner.this, aliases=aliases),))
            return Apply("not", (self.transform(inner, aliases=aliases),))
        if isinstance(node, exp.Is) and isinstance(node.expression, exp.Null):
            return Apply("is_null", (self.transform(node.this, aliases=aliases),))
        if isinstance(node, exp.Between) and not node.args.get("symmetric"):
            parts = (node.this, node.args["low"], node.args["high"])
            return Apply("between", tuple(self.transform(p, aliases=aliases) for p in parts))
        if isinstance(node, exp.In) and node.args.get("query") is None:
            parts = (node.this, *node.expressions)
            return Apply("in", tuple(self.transform(p, aliases=aliases) for p in parts))
        if isinstance(node, exp.Case):
            return self._case(node, aliases)
        if isinstance(node, exp.If):
            parts = (node.this, node.args.get("true"), node.args.get("false"))
            args = tuple(Const(None) if p is None else self.transform(p, aliases=aliases) for p in parts)
            return Apply("case", args)
        if isinstance(node, exp.Coalesce):
            parts = (node.this, *node.expressions)
            return Apply("coalesce", tuple(self.transform(p, aliases=aliases) for p in parts))
        if isinstance(node, exp.Nullif):
            return Apply(
                "nullif",
                (
                    self.transform(node.this, aliases=aliases),
                    self.transform(node.expression, aliases=aliases),
                ),
            )
        if isinstance(node, exp.Abs):
            return Apply("abs", (self.transform(node.this, aliases=aliases),))
        if isinstance(node, exp.Round) and not node.args.get("truncate"):
            decimals = node.args.get("decimals")
            rounded = [node.this] if decimals is None else [node.this, decimals]
            return Apply("round", tuple(self.transform(p, aliases=aliases) for p in rounded))
        if isinstance(node, exp.Cast):
            target = _CAST_TARGETS.get(node.to.this.name if hasattr(node.to.this, "name") else "", "")
            if target:
                return Apply("cast", (self.transform(node.this, aliases=aliases),), target)
        for inner in node.walk():
            kind = aggregate_kind(inner) if isinstance(inner, exp.Expr) else None
            if kind is not None and kind.startswith("unsupported:"):
                self._aggregate(inner, kind)  # raises, naming the aggregate
        raise refusal(
            "expression over aggregates",
            f"the expression {self.sql(node)} over aggregates cannot be computed after merging shards: "
            "select the aggregates and compute it in the client",
            "CROSS_SHARD_AGGREGATE_EXPRESSION",
        )

    def _case(self, node: exp.Case, aliases: bool) -> MergeExpr:
        args: list[MergeExpr] = []
        operand = node.this
        if operand is not None:
            args.append(self.transform(operand, aliases=aliases))
        for when in node.args.get("ifs") or ():
            args.append(self.transform(when.this, aliases=aliases))
            args.append(self.transform(when.args["true"], aliases=aliases))
        default = node.args.get("default")
        args.append(Const(None) if default is None else self.transform(default, aliases=aliases))
        return Apply("case", tuple(args), "operand" if operand is not None else "")

    def _aggregate(self, node: exp.Expr, kind: str) -> MergeExpr:
        if kind.startswith("unsupported:"):
            inner = node.this if isinstance(node, exp.Filter) else node
            # The name as the dialect writes it (PostgreSQL's STRING_AGG, not sqlglot's GROUP_CONCAT).
            name = self.sql(inner).split("(", 1)[0].strip().upper() or kind.split(":", 1)[1].upper()
            raise refusal(
                f"aggregate {name} spanning shards",
                f"the aggregate {name} spanning shards is not supported (supported: COUNT, SUM, TOTAL, MIN, "
                "MAX, AVG, and COUNT/SUM/AVG(DISTINCT ...)); restrict the query to one sharding key value",
                "CROSS_SHARD_AGGREGATE",
            )
        filter_where: exp.Expr | None = None
        if isinstance(node, exp.Filter):
            filter_where = node.expression
            node = node.this
        if kind in ("min", "max"):
            self.has_min_max = True
        argument = node.this
        if isinstance(argument, exp.Distinct):
            if kind in ("min", "max"):
                argument = argument.expressions[0] if len(argument.expressions) == 1 else argument
            else:
                return self._distinct_aggregate(node, kind, argument, filter_where)
        if kind == "avg":
            total = self._partial(exp.Sum(this=argument.copy()), filter_where)
            count = self._partial(exp.Count(this=argument.copy()), filter_where)
            return self._register("avg", (total, count))
        if kind == "string_agg":
            return self._string_agg(node, argument, filter_where)
        if kind in _SPREAD:
            if self.rules.name != "postgres":
                raise InvalidArgument(
                    f"no such function: {self.sql(node).split('(', 1)[0]} ({self.rules.name} has no variance "
                    "or standard deviation aggregates)",
                    reason="UNKNOWN_FUNCTION",
                )
            total = self._partial(exp.Sum(this=argument.copy()), filter_where)
            count = self._partial(exp.Count(this=argument.copy()), filter_where)
            # CAST(x AS NUMERIC) * x: exact for integers and numerics, double precision for floats.
            square = exp.Mul(
                this=exp.Cast(this=argument.copy(), to=exp.DataType.build("DECIMAL")),
                expression=argument.copy(),
            )
            squares = self._partial(exp.Sum(this=square), filter_where)
            function: AggregateFunction = kind  # type: ignore[assignment]
            return self._register(function, (total, count, squares))
        partial: exp.Expr
        if kind == "count":
            partial = exp.Count(this=argument.copy() if argument is not None else exp.Star())
        elif kind == "total":
            partial = exp.Anonymous(this="TOTAL", expressions=[e.copy() for e in node.expressions])
        else:
            partial = {"sum": exp.Sum, "min": exp.Min, "max": exp.Max}[kind](this=argument.copy())
        plain: AggregateFunction = kind  # type: ignore[assignment]
        return self._register(plain, (self._partial(partial, filter_where),))

    def _string_agg(self, node: exp.Expr, argument: exp.Expr, filter_where: exp.Expr | None) -> MergeExpr:
        """STRING_AGG / GROUP_CONCAT without an order: the shards' strings joined by the separator.

        Without ORDER BY inside the call the order of the pieces is unspecified in SQL, so
        any order of the shards' partial strings is a right answer. With ORDER BY or DISTINCT
        inside, the pieces would have to be merged element by element: refused.
        """
        name = self.sql(node).split("(", 1)[0].strip().upper()
        separator = node.args.get("separator")
        if isinstance(argument, exp.Order | exp.Distinct) or (
            separator is not None and not (isinstance(separator, exp.Literal) and separator.is_string)
        ):
            raise refusal(
                f"aggregate {name} with ORDER BY, DISTINCT or a non-constant separator spanning shards",
                f"{self.sql(node)} spanning shards is not supported: the pieces of each shard would have to be "
                f"merged one by one ({name} without ORDER BY or DISTINCT, with a constant separator, is)",
                "CROSS_SHARD_AGGREGATE",
            )
        text = str(separator.this) if separator is not None else ","
        column = self._partial(node.copy(), filter_where)
        key = ("string_agg", (column,))
        if key not in self.aggregate_index:
            self.aggregate_index[key] = len(self.aggregates)
            self.aggregates.append(Aggregate("string_agg", (column,), text))
        return AggRef(self.aggregate_index[key])

    def _distinct_aggregate(
        self, node: exp.Expr, kind: str, argument: exp.Distinct, filter_where: exp.Expr | None
    ) -> MergeExpr:
        if filter_where is not None or len(argument.expressions) != 1 or kind == "total":
            raise refusal(
                "DISTINCT aggregate with FILTER or several arguments spanning shards",
                f"{self.sql(node)} spanning shards is not supported",
                "CROSS_SHARD_DISTINCT_AGGREGATE",
            )
        self.has_distinct_aggregate = True
        column = self._column(argument.expressions[0], "d")
        function: AggregateFunction = {
            "count": "count_distinct",
            "sum": "sum_distinct",
            "avg": "avg_distinct",
        }[kind]  # type: ignore[assignment]
        return self._register(function, (column,))

    def _partial(self, partial: exp.Expr, filter_where: exp.Expr | None) -> int:
        if filter_where is not None:
            partial = exp.Filter(this=partial, expression=filter_where.copy())
        return self._column(partial, "p")

    def _register(self, function: AggregateFunction, columns: tuple[int, ...]) -> AggRef:
        key = (function, columns)
        if key not in self.aggregate_index:
            self.aggregate_index[key] = len(self.aggregates)
            self.aggregates.append(Aggregate(function, columns))
        return AggRef(self.aggregate_index[key])


# -- output names ----------------------------------------------------------------------

_PG_CAST_NAMES: Mapping[str, str] = {
    "INT": "int4",
    "BIGINT": "int8",
    "SMALLINT": "int2",
    "FLOAT": "float4",
    "DOUBLE": "float8",
    "DECIMAL": "numeric",
    "TEXT": "text",
    "VARCHAR": "varchar",
    "BOOLEAN": "bool",
}


def output_name(projection: exp.Expr, statement: Statement, written: str | None = None) -> str:
    """The column name the database would give a select-list item.

    PostgreSQL: the alias, else the column or function name, else ``?column?``.
    SQLite: the alias, else the column name, else the item's text as written
    (``written``, from :func:`select_item_texts`).
    """
    if isinstance(projection, exp.Alias):
        return projection.alias
    node = projection
    if isinstance(node, exp.Column):
        return node.name
    if statement.rules.name == "postgres":
        name = _postgres_name(node)
        called = _WRITTEN_CALL.match(written or "")
        if isinstance(node, exp.Func) and not isinstance(node, exp.Anonymous | exp.Cast) and called:
            return called.group(1).lower()  # the function as written: var_pop, not sqlglot's VARIANCE_POP
        return name
    return written or node.sql(dialect=statement.rules.sqlglot_dialect)


_WRITTEN_CALL = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*\(")


_SELECT_LIST_ENDS = frozenset(
    {
        TokenType.FROM,
        TokenType.WHERE,
        TokenType.GROUP_BY,
        TokenType.HAVING,
        TokenType.ORDER_BY,
        TokenType.LIMIT,
        TokenType.OFFSET,
        TokenType.WINDOW,
        TokenType.UNION,
        TokenType.INTERSECT,
        TokenType.EXCEPT,
        TokenType.SEMICOLON,
        TokenType.FETCH,
    }
)


def select_item_texts(sql: str, rules: DialectRules) -> list[str] | None:
    """The text of each item of the top-level select list, as written.

    >>> from controller.federation.query.parse import DIALECTS
    >>> select_item_texts("SELECT DISTINCT count(*)>7, NOT a , f(x, y) FROM t", DIALECTS["sqlite"])
    ['count(*)>7', 'NOT a', 'f(x, y)']
    """
    try:
        tokens = Dialect.get_or_raise(rules.sqlglot_dialect).tokenize(sql)
    except SqlglotError:
        return None
    depth = 0
    start = None
    for index, scanned in enumerate(tokens):
        if scanned.token_type is TokenType.L_PAREN:
            depth += 1
        elif scanned.token_type is TokenType.R_PAREN:
            depth -= 1
        elif scanned.token_type is TokenType.SELECT and depth == 0:
            start = index + 1
            break
    if start is None:
        return None
    while start < len(tokens) and tokens[start].token_type in (TokenType.DISTINCT, TokenType.ALL):
        start += 1
    items: list[str] = []
    first = start
    depth = 0
    for index in range(start, len(tokens) + 1):
        token: Token | None = tokens[index] if index < len(tokens) else None
        if token is not None and token.token_type is TokenType.L_PAREN:
            depth += 1
        elif token is not None and token.token_type is TokenType.R_PAREN:
            depth -= 1
        elif depth == 0 and (
            token is None or token.token_type is TokenType.COMMA or token.token_type in _SELECT_LIST_ENDS
        ):
            if index == first:
                return None
            items.append(sql[tokens[first].start : tokens[index - 1].end + 1])
            if token is None or token.token_type is not TokenType.COMMA:
                return items
            first = index + 1
    return items


def _postgres_name(node: exp.Expr) -> str:
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, exp.Column):
        return node.name
    if isinstance(node, exp.Cast):
        inner = _postgres_name(node.this)
        if inner != "?column?":
            return inner
        return _PG_CAST_NAMES.get(node.to.this.name if hasattr(node.to.this, "name") else "", "?column?")
    if isinstance(node, exp.Case):
        return "case"
    if isinstance(node, exp.Exists):
        return "exists"
    if isinstance(node, exp.Anonymous):
        return str(node.this).lower()
    if isinstance(node, exp.Func):
        return node.sql_name().lower()
    return "?column?"
