"""Collations: which ones the merge honours, and the refusal of the rest.

The merge compares text by code point: SQLite's ``BINARY`` collation, PostgreSQL's
``"C"`` / ``"POSIX"`` (and the default collation of a database created with a ``C``
locale, which the shards use). A collation is *in play* at a merge position — a GROUP BY
key, a DISTINCT output, an ORDER BY term, the argument of MIN/MAX or of a DISTINCT
aggregate, a HAVING condition — when

* it is written there (``GROUP BY name COLLATE NOCASE``), or
* the position is a bare column declared with it (``name TEXT COLLATE NOCASE``; the
  declared collations are read back with the schema, see :func:`declared_collations`).

Any other collation in play in a statement whose answer is merged across shards is
refused, naming it (``CROSS_SHARD_COLLATE``): the merge would split groups that the
collation joins, or order rows differently. Where the shards compute the position
themselves (a WHERE clause; a statement on one shard) every collation is exact.

>>> is_binary("nocase"), is_binary('"C"'), is_binary("BINARY")
(False, True, True)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from .route import Analysis, Collations, Scope, refusal

_BINARY = frozenset({"BINARY", "C", "POSIX", "DEFAULT", "UCS_BASIC"})


def is_binary(collation: str) -> bool:
    """Whether ``collation`` orders and compares text as the merge does (by code point)."""
    return collation.strip().strip('"').upper() in _BINARY


def declared_collations(create_table_sql: str, dialect: str) -> dict[str, str]:
    """Column → collation declared in a ``CREATE TABLE`` statement (SQLite keeps no catalogue of them).

    >>> declared_collations("CREATE TABLE t (a TEXT COLLATE NOCASE, b TEXT, c TEXT COLLATE BINARY)", "sqlite")
    {'a': 'NOCASE'}
    """
    try:
        statement = sqlglot.parse_one(create_table_sql, read=dialect)
    except (SqlglotError, ValueError, IndexError, KeyError, TypeError):
        return {}
    found: dict[str, str] = {}
    for column in statement.find_all(exp.ColumnDef):
        for constraint in column.args.get("constraints") or ():
            kind = constraint.args.get("kind") if isinstance(constraint, exp.ColumnConstraint) else None
            if isinstance(kind, exp.CollateColumnConstraint):
                name = kind.this.name if isinstance(kind.this, exp.Expr) else str(kind.this)
                if not is_binary(name):
                    found[column.name.lower()] = name.upper()
    return found


def refuse_collations_at_merge(analysis: Analysis, positions: Iterable[tuple[exp.Expr, bool]]) -> None:
    """Refuse if a non-binary collation is in play at any of ``positions`` of the root scope.

    Each position comes with whether it is itself compared by the merge (a GROUP BY key,
    an ORDER BY term, a DISTINCT output) or only holds compared parts (a select-list item
    of a grouped query, where only MIN/MAX and DISTINCT aggregates inside it compare).
    """
    root = analysis.roots[0]
    collations = analysis.collations
    for position, compared in positions:
        for node, bare in _merged_nodes(position, compared):
            if isinstance(node, exp.Collate):
                name = _collation_name(node.expression)
                if not is_binary(name):
                    raise _refused(name, node.sql())
            elif isinstance(node, exp.Column) and bare:
                declared = _declared(node, root, analysis, collations)
                if declared is not None:
                    raise _refused(declared, f"column {node.sql()}")


def _merged_nodes(position: exp.Expr, compared: bool) -> Iterator[tuple[exp.Expr, bool]]:
    """Nodes of ``position`` whose collation the merge depends on: (node, is a bare compared value).

    A column is *bare* when it is the position itself, the argument of MIN/MAX or of a
    DISTINCT aggregate, or an operand of a comparison: there its collation decides.
    """
    stack: list[tuple[exp.Expr, bool]] = [(position, compared)]
    while stack:
        node, bare = stack.pop()
        while isinstance(node, exp.Paren):
            node = node.this
        yield node, bare
        if isinstance(node, exp.Query):
            continue
        if isinstance(node, exp.Min | exp.Max | exp.Distinct | exp.Ordered | exp.Collate):
            children_bare = True
        elif isinstance(node, exp.Predicate | exp.Binary) and not isinstance(node, exp.DPipe):
            children_bare = isinstance(node, exp.EQ | exp.NEQ | exp.LT | exp.LTE | exp.GT | exp.GTE | exp.In)
        else:
            children_bare = isinstance(node, exp.AggFunc) and _is_distinct_aggregate(node)
        for child in node.iter_expressions():
            stack.append((child, children_bare))


def _is_distinct_aggregate(node: exp.Expr) -> bool:
    return isinstance(node.this, exp.Distinct)


def _collation_name(node: exp.Expr) -> str:
    if isinstance(node, exp.Literal | exp.Identifier | exp.Var | exp.Column):
        return node.name
    return node.sql()


def _declared(column: exp.Column, root: Scope, analysis: Analysis, collations: Collations) -> str | None:
    if not collations:
        return None
    name = column.name.lower()
    ref = root.resolve(column, analysis.columns_of)
    if ref is not None:
        return collations.get(ref.table, {}).get(name)
    # Unresolved (an alias, a derived table): if any table in scope declares one for this name, refuse.
    for table in {r.table for r in root.tables.values()}:
        declared = collations.get(table, {}).get(name)
        if declared is not None:
            return declared
    return None


def _refused(collation: str, where: str) -> Exception:
    return refusal(
        f"COLLATE {collation} spanning shards",
        f"collation {collation} ({where}) is not supported in GROUP BY, DISTINCT, ORDER BY, MIN/MAX, DISTINCT "
        "aggregates or HAVING of a query spanning shards: the merge compares text by code point (BINARY / "
        '"C"). Restrict the query to one shard, or normalise the value (lower(name) instead of '
        "name COLLATE NOCASE)",
        "CROSS_SHARD_COLLATE",
    )
