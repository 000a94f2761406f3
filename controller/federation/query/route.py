"""Stage 2: which shards a statement needs, and whether it can be answered exactly.

:func:`route` analyses a parsed :class:`~.parse.Statement` against the layout and the
schema and returns a :class:`Route` (the shards, and for a multi-row INSERT which rows
go where), or refuses the statement with an error naming the construct.

How it decides
--------------

1. **Scopes.** The statement is split into query scopes (the top-level query, each
   subquery, derived table, CTE and set-operation branch). In each scope every column
   reference is resolved against the scope's tables using the schema, then outwards
   (correlation).
2. **Co-location.** Table instances sharded on the key are joined into groups by
   equalities of their key columns in a conjunctive position of an ``ON`` or
   ``WHERE`` (``o.customer_id = c.customer_id``), by ``USING (key)``, and by
   ``key IN (SELECT key FROM t WHERE ...)``. Rows of one group that can meet live on
   the same shard, so the group can be evaluated shard by shard.
3. **Pruning.** For the top-level group, the ``WHERE`` clause is read for predicates
   on the key: ``key = v``, ``v = key``, ``key IN (...)``, and with range or
   directory sharding (and a known key type) ``<``, ``<=``, ``>``, ``>=``,
   ``BETWEEN``; ``AND`` intersects and ``OR`` unites. Anything else means every
   shard. A predicate no row can meet (``key = NULL``, a key with no directory entry)
   still runs on one shard, so aggregates over nothing keep their one row.
4. **Rules.** :data:`ROUTING_RULES` then refuse what would not be exact: joins of
   tables sharded on different keys, subqueries spanning shards, set operations and
   window functions spanning shards, reference tables on the preserved side of an
   outer join spanning shards, changes to the sharding key, writes to reference tables
   that read sharded ones, and uniqueness constraints without the key.

>>> from controller.federation.query.layout import ShardLayout
>>> from controller.federation.query.parse import parse
>>> layout = ShardLayout("hash", 4, "customer_id")
>>> schema = {"orders": ["id", "customer_id", "amount"], "customers": ["customer_id", "name"]}
>>> route(parse("SELECT * FROM orders WHERE customer_id = 7", "sqlite"), layout, schema).shards
(3,)
>>> route(parse("SELECT count(*) FROM orders", "sqlite"), layout, schema).shards
(0, 1, 2, 3)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from sqlglot import exp

from controller.errors import FailedPrecondition, InvalidArgument, NotFound

from .layout import ShardLayout, ShardSet
from .parse import NotALiteral, Schema, Statement, StatementKind, literal_value, table_name

Collations = Mapping[str, Mapping[str, str]]
"""Table name → column name → declared collation (only columns with a non-default one)."""


def refusal(construct: str, message: str, reason: str) -> FailedPrecondition:
    """The error for a statement that cannot be answered exactly across shards."""
    return FailedPrecondition(message, reason=reason, metadata={"construct": construct})


# -- scopes ----------------------------------------------------------------------------


@dataclass(eq=False)
class TableRef:
    """One use of a real table in a scope (``orders AS o``)."""

    alias: str
    table: str
    node: exp.Table
    scope: Scope
    key: str | None
    """The sharding key column, or ``None`` for a reference table."""

    @property
    def sharded(self) -> bool:
        return self.key is not None

    def describe(self) -> str:
        return self.table if self.alias == self.table else f"{self.table} AS {self.alias}"


@dataclass(frozen=True)
class JoinInfo:
    """One JOIN of a scope: its side (LEFT/RIGHT/FULL or empty) and the tables on each side."""

    side: str
    left: tuple[TableRef, ...]
    right: TableRef | None
    using: tuple[str, ...]
    on: exp.Expr | None


@dataclass(eq=False)
class Scope:
    """One query scope: its tables, conditions and nested scopes."""

    node: exp.Expr
    kind: str
    """``root``, ``branch`` (of a set operation at the top), ``subquery``, ``derived``, ``cte``."""
    parent: Scope | None
    lookup_parent: Scope | None
    """Where unresolved column names are looked up (``None`` for derived tables and CTEs)."""
    depth: int
    tables: dict[str, TableRef] = field(default_factory=dict)
    opaque: set[str] = field(default_factory=set)
    """Aliases of sources the router cannot see into (derived tables, CTEs, functions)."""
    output_aliases: set[str] = field(default_factory=set)
    where: exp.Expr | None = None
    joins: list[JoinInfo] = field(default_factory=list)
    children: list[Scope] = field(default_factory=list)

    def resolve(self, column: exp.Column, columns_of: Callable[[str], frozenset[str]]) -> TableRef | None:
        """The table instance a column reference reads, or ``None`` when unsure."""
        qualifier = column.table.lower() if column.table else None
        name = column.name.lower()
        scope: Scope | None = self
        while scope is not None:
            if qualifier:
                if qualifier in scope.tables:
                    return scope.tables[qualifier]
                if qualifier in scope.opaque:
                    return None
            else:
                candidates = [t for t in scope.tables.values() if name in columns_of(t.table)]
                if len(candidates) == 1 and not scope.opaque:
                    return candidates[0]
                if candidates or scope.opaque or name in scope.output_aliases:
                    return None
            scope = scope.lookup_parent
        return None


@dataclass
class Analysis:
    """What the router learned about a statement: scopes, tables and co-located groups."""

    statement: Statement
    layout: ShardLayout
    columns: Mapping[str, frozenset[str]]
    roots: list[Scope]
    scopes: list[Scope]
    target: TableRef | None = None
    """The written table of an INSERT, UPDATE or DELETE."""
    groups: dict[int, int] = field(default_factory=dict)
    """Union-find parent links over ``id(TableRef)``."""
    refs: dict[int, TableRef] = field(default_factory=dict)
    column_order: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Each table's columns in their declared order (an INSERT without a column list)."""
    collations: Collations = field(default_factory=dict)
    """Declared non-default collations, for the merge's refusals (see :mod:`.collation`)."""

    def columns_of(self, table: str) -> frozenset[str]:
        return self.columns.get(table, frozenset())

    def find(self, ref: TableRef) -> int:
        node = id(ref)
        while self.groups.setdefault(node, node) != node:
            self.groups[node] = self.groups[self.groups[node]]
            node = self.groups[node]
        return node

    def union(self, a: TableRef, b: TableRef) -> None:
        self.groups[self.find(a)] = self.find(b)

    def sharded_refs(self) -> list[TableRef]:
        return [ref for ref in self.refs.values() if ref.sharded]

    def group_of(self, ref: TableRef) -> list[TableRef]:
        root = self.find(ref)
        return [r for r in self.sharded_refs() if self.find(r) == root]


class _ScopeBuilder:
    def __init__(self, analysis: Analysis) -> None:
        self.analysis = analysis

    def query(
        self,
        node: exp.Expr,
        kind: str,
        parent: Scope | None,
        lookup_parent: Scope | None,
        ctes: frozenset[str],
    ) -> list[Scope]:
        """Scopes for a query node (one per branch of a set operation)."""
        if isinstance(node, exp.Subquery):
            return self.query(node.this, kind, parent, lookup_parent, ctes)
        ctes = self._ctes(node, kind, parent, lookup_parent, ctes)
        if isinstance(node, exp.SetOperation):
            branch_kind = "branch" if kind == "root" else kind
            scopes = self.query(node.this, branch_kind, parent, lookup_parent, ctes)
            scopes += self.query(node.expression, branch_kind, parent, lookup_parent, ctes)
            return scopes
        scope = self._new(node, kind, parent, lookup_parent)
        if isinstance(node, exp.Select):
            self._select(scope, node, ctes)
        else:
            self._nested(scope, node, ctes)
        return [scope]

    def _new(self, node: exp.Expr, kind: str, parent: Scope | None, lookup: Scope | None) -> Scope:
        scope = Scope(node=node, kind=kind, parent=parent, lookup_parent=lookup, depth=0)
        if parent is not None:
            scope.depth = parent.depth + 1
            parent.children.append(scope)
        self.analysis.scopes.append(scope)
        return scope

    def _ctes(
        self, node: exp.Expr, kind: str, parent: Scope | None, lookup: Scope | None, ctes: frozenset[str]
    ) -> frozenset[str]:
        with_ = node.args.get("with_")
        if not isinstance(with_, exp.With):
            return ctes
        names = set(ctes)
        for cte in with_.expressions:
            names.add(cte.alias_or_name.lower())
            self.query(cte.this, "cte", parent, lookup, frozenset(names))
        return frozenset(names)

    def _select(self, scope: Scope, node: exp.Select, ctes: frozenset[str]) -> None:
        for projection in node.expressions:
            if isinstance(projection, exp.Alias):
                scope.output_aliases.add(projection.alias.lower())
        from_ = node.args.get("from_")
        introduced: list[TableRef] = []
        if isinstance(from_, exp.From):
            ref = self._source(scope, from_.this, ctes)
            if ref is not None:
                introduced.append(ref)
        for join in node.args.get("joins") or ():
            right = self._source(scope, join.this, ctes)
            using = tuple(ident.name.lower() for ident in join.args.get("using") or ())
            side = str(join.args.get("side") or "").upper()
            scope.joins.append(JoinInfo(side, tuple(introduced), right, using, join.args.get("on")))
            if right is not None:
                introduced.append(right)
        where = node.args.get("where")
        scope.where = where.this if isinstance(where, exp.Where) else None
        self._nested(scope, node, ctes, skip=("with_", "from_"), skip_join_sources=True)

    def source_table(
        self, scope: Scope, table: exp.Table, ctes: frozenset[str], *, register: bool = True
    ) -> TableRef | None:
        name = table_name(table)
        alias = table.alias_or_name.lower()
        if not isinstance(table.this, exp.Identifier) or (name in ctes and not table.args.get("db")):
            scope.opaque.add(alias)
            return None
        if name not in self.analysis.columns:
            raise NotFound(f"table {name} does not exist", reason="TABLE_NOT_FOUND", metadata={"table": name})
        ref = TableRef(
            alias=alias, table=name, node=table, scope=scope, key=self.analysis.layout.key_column(name)
        )
        if register:
            scope.tables[alias] = ref
            self.analysis.refs[id(ref)] = ref
        return ref

    def _source(self, scope: Scope, source: exp.Expr, ctes: frozenset[str]) -> TableRef | None:
        if isinstance(source, exp.Table):
            ref = self.source_table(scope, source, ctes)
            for nested in _nested_queries(source):
                self.query(nested, "subquery", scope, scope, ctes)
            return ref
        scope.opaque.add(source.alias_or_name.lower())
        if isinstance(source, exp.Subquery):
            self.query(source.this, "derived", scope, scope.lookup_parent, ctes)
        else:
            for nested in _nested_queries(source):
                self.query(nested, "subquery", scope, scope, ctes)
        return None

    def _nested(
        self,
        scope: Scope,
        node: exp.Expr,
        ctes: frozenset[str],
        skip: tuple[str, ...] = ("with_",),
        skip_join_sources: bool = False,
    ) -> None:
        for key, value in node.args.items():
            if key in skip or value is None:
                continue
            for child in value if isinstance(value, list) else [value]:
                if not isinstance(child, exp.Expr):
                    continue
                if skip_join_sources and isinstance(child, exp.Join):
                    on = child.args.get("on")
                    if on is not None:
                        self._nested_in(scope, on, ctes)
                    continue
                self._nested_in(scope, child, ctes)

    def _nested_in(self, scope: Scope, node: exp.Expr, ctes: frozenset[str]) -> None:
        if isinstance(node, exp.Query):
            self.query(node, "subquery", scope, scope, ctes)
            return
        for nested in _nested_queries(node):
            self.query(nested, "subquery", scope, scope, ctes)


def _nested_queries(node: exp.Expr) -> Iterator[exp.Expr]:
    """The outermost query nodes inside ``node`` (not descending into them)."""
    stack = [node]
    while stack:
        current = stack.pop()
        for child in current.iter_expressions():
            if isinstance(child, exp.Query):
                yield child
            else:
                stack.append(child)


def conjuncts(expression: exp.Expr | None) -> list[exp.Expr]:
    """The terms of a chain of ANDs (parentheses removed)."""
    if expression is None:
        return []
    while isinstance(expression, exp.Paren):
        expression = expression.this
    if isinstance(expression, exp.And):
        return conjuncts(expression.this) + conjuncts(expression.expression)
    return [expression]


def analyse(
    statement: Statement, layout: ShardLayout, schema: Schema, collations: Collations | None = None
) -> Analysis:
    """Build the scopes of ``statement`` and the co-located groups of its sharded tables."""
    columns = {name.lower(): frozenset(c.lower() for c in cols) for name, cols in schema.items()}
    analysis = Analysis(
        statement=statement,
        layout=layout,
        columns=columns,
        roots=[],
        scopes=[],
        column_order={name.lower(): tuple(c.lower() for c in cols) for name, cols in schema.items()},
        collations={
            t.lower(): {c.lower(): v for c, v in cols.items()} for t, cols in (collations or {}).items()
        },
    )
    builder = _ScopeBuilder(analysis)
    node = statement.expression
    if statement.kind is StatementKind.SELECT:
        analysis.roots = builder.query(node, "root", None, None, frozenset())
    elif statement.kind in (StatementKind.UPDATE, StatementKind.DELETE):
        ctes = builder._ctes(node, "root", None, None, frozenset())
        root = builder._new(node, "root", None, None)
        analysis.target = builder.source_table(root, node.this, ctes)
        extra: list[exp.Expr] = []
        from_ = node.args.get("from_")
        if isinstance(from_, exp.From):
            extra.append(from_.this)
            extra.extend(join.this for join in from_.args.get("joins") or ())
        extra.extend(node.args.get("using") or ())
        for source in extra:
            builder._source(root, source, ctes)
        where = node.args.get("where")
        root.where = where.this if isinstance(where, exp.Where) else None
        builder._nested(root, node, ctes, skip=("with_", "this", "from_", "using"))
        analysis.roots = [root]
    elif statement.kind is StatementKind.INSERT:
        ctes = builder._ctes(node, "root", None, None, frozenset())
        holder = builder._new(node, "insert", None, None)
        target = node.this.this if isinstance(node.this, exp.Schema) else node.this
        assert isinstance(target, exp.Table)
        analysis.target = builder.source_table(holder, target, ctes, register=False)
        inserted = node.args.get("expression")
        if isinstance(inserted, exp.Query | exp.Subquery):
            analysis.roots = builder.query(inserted, "root", None, None, ctes)
        builder._nested(holder, node, ctes, skip=("with_", "this", "expression"))
        if isinstance(inserted, exp.Values):
            builder._nested_in(holder, inserted, ctes)
    if statement.kind is not StatementKind.DDL:
        _check_every_table_seen(analysis)
    _link_groups(analysis)
    return analysis


def _check_every_table_seen(analysis: Analysis) -> None:
    """Refuse a statement naming a table the scopes did not register.

    Pruning decides from the registered tables alone, so a table in a position the
    scope builder does not read (``a LEFT JOIN (b JOIN c ON ...) ON ...``) could
    otherwise send a statement over it to fewer shards than it touches. By this check,
    a route can never be narrower than the tables justify.
    """
    expression = analysis.statement.expression
    cte_names = {cte.alias_or_name.lower() for cte in expression.find_all(exp.CTE)}
    seen = {id(ref.node) for ref in analysis.refs.values()}
    if analysis.target is not None:
        seen.add(id(analysis.target.node))
    for table in expression.find_all(exp.Table):
        if not isinstance(table.this, exp.Identifier) or id(table) in seen:
            continue
        if table_name(table) in cte_names and not table.args.get("db"):
            continue
        raise refusal(
            "parenthesized join",
            f"table {table.alias_or_name} is inside a parenthesized join the router cannot route: "
            "write the joins without parentheses (a JOIN b ON ... JOIN c ON ...), or use a subquery with an alias",
            "UNSUPPORTED_FROM_SHAPE",
        )


def _link_groups(analysis: Analysis) -> None:
    """Union the table instances that are joined on their sharding keys."""
    for ref in analysis.sharded_refs():
        analysis.find(ref)
    for scope in analysis.scopes:
        for term in conjuncts(scope.where) + [t for j in scope.joins for t in conjuncts(j.on)]:
            if isinstance(term, exp.EQ):
                left = _key_ref(term.this, scope, analysis)
                right = _key_ref(term.expression, scope, analysis)
                # At least one side must be this scope's: an equality of two *outer* tables
                # inside a subquery says nothing about the outer rows (think NOT EXISTS).
                local = left is not None and (
                    left.scope is scope or (right is not None and right.scope is scope)
                )
                if local and right is not None and left is not right:
                    assert left is not None
                    analysis.union(left, right)
        for join in scope.joins:
            right_ref = join.right
            if right_ref is None or not right_ref.sharded or right_ref.key not in join.using:
                continue
            for left_ref in join.left:
                if left_ref.sharded and left_ref.key == right_ref.key:
                    analysis.union(left_ref, right_ref)
        for in_node in _local_nodes(scope.node, exp.In):
            _link_in_subquery(in_node, scope, analysis)


def _local_nodes(node: exp.Expr, kind: type[exp.Expr]) -> Iterator[exp.Expr]:
    """Nodes of type ``kind`` inside ``node`` but outside nested queries."""
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, kind):
            yield current
        for child in current.iter_expressions():
            if not isinstance(child, exp.Query):
                stack.append(child)


def _link_in_subquery(in_node: exp.Expr, scope: Scope, analysis: Analysis) -> None:
    """``key IN (SELECT key FROM t WHERE ...)`` co-locates the two tables."""
    query = in_node.args.get("query")
    if query is None:
        return
    left = _key_ref(in_node.this, scope, analysis)
    inner = query.this if isinstance(query, exp.Subquery) else query
    if left is None or not isinstance(inner, exp.Select):
        return
    child = next((s for s in scope.children if s.node is inner), None)
    if child is None or len(child.tables) != 1 or child.opaque or child.joins:
        return
    if any(inner.args.get(k) for k in ("limit", "offset", "qualify", "windows")):
        return
    distinct = inner.args.get("distinct")
    if distinct is not None and distinct.args.get("on") is not None:
        return
    if len(inner.expressions) != 1:
        return
    projection = inner.expressions[0]
    if isinstance(projection, exp.Alias):
        projection = projection.this
    right = _key_ref(projection, child, analysis)
    if right is None or right.scope is not child:
        return
    # Grouped, the subquery must group by the key it returns: each group is then on one shard.
    group = inner.args.get("group")
    if (group is not None or inner.args.get("having") is not None) and not (
        isinstance(group, exp.Group) and any(_key_ref(g, child, analysis) is right for g in group.expressions)
    ):
        return
    analysis.union(left, right)


def _key_ref(node: exp.Expr, scope: Scope, analysis: Analysis) -> TableRef | None:
    """The sharded table instance whose key column ``node`` is, if it is one."""
    while isinstance(node, exp.Paren):
        node = node.this
    if not isinstance(node, exp.Column):
        return None
    ref = scope.resolve(node, analysis.columns_of)
    if ref is None or ref.key is None or node.name.lower() != ref.key:
        return None
    return ref


def _merged_key_ref(node: exp.Expr, scope: Scope, analysis: Analysis) -> TableRef | None:
    """An unqualified key column shared by co-located tables (``JOIN ... USING (key)``).

    The merged column equals the key of whichever side is present, and keys are never
    NULL, so a predicate on it restricts the whole co-located group.
    """
    while isinstance(node, exp.Paren):
        node = node.this
    if not isinstance(node, exp.Column) or node.table:
        return None
    name = node.name.lower()
    candidates = [t for t in scope.tables.values() if name in analysis.columns_of(t.table)]
    if len(candidates) < 2 or scope.opaque or any(t.key != name for t in candidates):
        return None
    if len({analysis.find(t) for t in candidates}) != 1:
        return None
    return candidates[0]


# -- pruning ---------------------------------------------------------------------------

_FLIPPED: dict[type[exp.Expr], type[exp.Expr]] = {
    exp.GT: exp.LT,
    exp.GTE: exp.LTE,
    exp.LT: exp.GT,
    exp.LTE: exp.GTE,
}


def prune(
    condition: exp.Expr | None,
    refs: Iterable[TableRef],
    scope: Scope,
    analysis: Analysis,
) -> ShardSet | None:
    """The shards that can hold rows meeting ``condition`` for the key columns of ``refs``.

    ``None`` = every shard. Reads ``=``, ``IN``, range comparisons, ``BETWEEN``, ``AND``
    (intersection) and ``OR`` (union); anything else is every shard.
    """
    members = {id(r) for r in refs}

    def is_key(node: exp.Expr) -> bool:
        ref = _key_ref(node, scope, analysis) or _merged_key_ref(node, scope, analysis)
        return ref is not None and id(ref) in members

    return _prune(condition, is_key, analysis)


def _prune(node: exp.Expr | None, is_key: Callable[[exp.Expr], bool], analysis: Analysis) -> ShardSet | None:
    if node is None:
        return None
    layout = analysis.layout
    rules = analysis.statement.rules
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, exp.And):
        left = _prune(node.this, is_key, analysis)
        right = _prune(node.expression, is_key, analysis)
        if left is None:
            return right
        return left if right is None else left & right
    if isinstance(node, exp.Or):
        left = _prune(node.this, is_key, analysis)
        right = _prune(node.expression, is_key, analysis)
        return None if left is None or right is None else left | right
    try:
        if isinstance(node, exp.EQ):
            if is_key(node.this):
                return layout.shards_for_value(literal_value(node.expression, rules))
            if is_key(node.expression):
                return layout.shards_for_value(literal_value(node.this, rules))
            return None
        if isinstance(node, exp.In) and node.args.get("query") is None and is_key(node.this):
            if node.args.get("unnest") or node.args.get("field"):
                return None
            found: set[int] = set()
            for item in node.expressions:
                shards = layout.shards_for_value(literal_value(item, rules))
                if shards is None:
                    return None
                found |= shards
            return frozenset(found)
        if isinstance(node, exp.Between) and not node.args.get("symmetric") and is_key(node.this):
            low = literal_value(node.args["low"], rules)
            high = literal_value(node.args["high"], rules)
            if low is None or high is None:
                return frozenset()
            return layout.shards_for_interval(low, True, high, True)
        if type(node) in _FLIPPED:
            op: type[exp.Expr] = type(node)
            if is_key(node.this):
                value = literal_value(node.expression, rules)
            elif is_key(node.expression):
                value = literal_value(node.this, rules)
                op = _FLIPPED[op]
            else:
                return None
            if value is None:
                return frozenset()
            if op in (exp.GT, exp.GTE):
                return layout.shards_for_interval(value, op is exp.GTE, None, False)
            return layout.shards_for_interval(None, False, value, op is exp.LTE)
    except NotALiteral:
        return None
    return None


# -- the route ------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """Where a statement runs."""

    shards: tuple[int, ...]
    """The shards to run on, ascending."""
    why: str
    """A short reason, for explanations and golden files."""
    rows_by_shard: Mapping[int, tuple[int, ...]] | None = None
    """For INSERT ... VALUES into a sharded table: shard → indexes of its rows."""
    reference_write: bool = False
    """A write to a reference table (applied to every shard; counts are not summed)."""

    @property
    def single(self) -> bool:
        return len(self.shards) == 1


@dataclass
class _Decision:
    """Shards needed by one part of a statement: ``None`` = every shard; ``any`` = any one."""

    shards: ShardSet | None
    any_one: bool = False


def _group_names(refs: Iterable[TableRef]) -> str:
    return ", ".join(sorted({f"{r.describe()} ({r.key})" for r in refs}))


def _decide_root(root: Scope, analysis: Analysis) -> _Decision:
    sharded = [ref for ref in root.tables.values() if ref.sharded]
    if not sharded:
        return _Decision(frozenset(), any_one=True)
    groups: dict[int, list[TableRef]] = {}
    for ref in sharded:
        groups.setdefault(analysis.find(ref), []).append(ref)
    pins = [prune(root.where, refs, root, analysis) for refs in groups.values()]
    if len(groups) == 1:
        pin = pins[0]
        if pin is not None and not pin:
            return _Decision(frozenset(), any_one=True)
        return _Decision(pin)
    if all(pin is not None for pin in pins):
        found: set[int] = set()
        for pin in pins:
            assert pin is not None
            found |= pin
        if len(found) <= 1:
            return _Decision(frozenset(found), any_one=not found)
    members = list(groups.values())
    raise refusal(
        "join of tables sharded on different keys",
        "a join of tables sharded on different keys cannot be answered across shards: "
        f"{_group_names(members[0])} and {_group_names(members[1])} are not joined on equality of "
        "their sharding keys (join them on the key, or restrict every sharded table to one key value)",
        "CROSS_SHARD_JOIN",
    )


def _topmost(refs: list[TableRef]) -> Scope:
    return min((r.scope for r in refs), key=lambda s: s.depth)


def _decide(analysis: Analysis) -> _Decision:
    """The shards a SELECT (or the query part of a write) needs, refusing what spans shards."""
    if analysis.layout.shard_count == 1:
        return _Decision(frozenset({0}))
    decisions = [_decide_root(root, analysis) for root in analysis.roots]
    if len(decisions) > 1:
        # A set operation runs on the union of its branches' shards; whether the shards'
        # answers combine exactly is the rewrite's to check (see rewrite_set_operation).
        chosen: set[int] = set()
        spans_all = False
        for branch in decisions:
            if branch.shards is None:
                spans_all = True
            else:
                chosen |= branch.shards
        decision = _Decision(None) if spans_all else _Decision(frozenset(chosen), any_one=not chosen)
    else:
        decision = decisions[0] if decisions else _Decision(frozenset(), any_one=True)
    root_ids = {id(scope) for scope in analysis.roots}
    root_groups = {analysis.find(r) for r in analysis.sharded_refs() if id(r.scope) in root_ids}
    others: dict[int, list[TableRef]] = {}
    for ref in analysis.sharded_refs():
        group = analysis.find(ref)
        if group not in root_groups:
            others.setdefault(group, []).append(ref)
    for refs in others.values():
        scope = _topmost(refs)
        local = [r for r in refs if r.scope is scope]
        pin = prune(scope.where, local, scope, analysis)
        if (pin is None or len(pin) > 1) and _partitioned_source(scope, refs, analysis, root_groups, others):
            decision = _Decision(pin)  # the outer query reads it like a sharded table
            continue
        spanning = decision.shards is None or len(decision.shards) > 1
        if spanning or pin is None or len(pin) > 1 or (pin and decision.shards and pin != decision.shards):
            kind = {"derived": "a subquery in FROM", "cte": "a WITH query"}.get(scope.kind, "a subquery")
            raise refusal(
                "subquery spanning shards",
                f"{kind} over sharded table {_group_names(refs)} spans shards: correlate it with the "
                f"outer query on the sharding key (... = outer.{refs[0].key}), or restrict it to one "
                "key value in a statement that runs on one shard",
                "CROSS_SHARD_SUBQUERY",
            )
        if pin:
            decision = _Decision(pin)
    return decision


def _partitioned_source(
    scope: Scope,
    refs: list[TableRef],
    analysis: Analysis,
    root_groups: set[int],
    others: Mapping[int, list[TableRef]],
) -> bool:
    """A derived table or CTE whose rows each shard computes completely for its own keys.

    It must be the top-level query's only source (no joins, referenced once, no other
    sharded group anywhere), read one co-located group in its own scope, and be either a
    plain row query or grouped by the sharding key; no LIMIT, OFFSET, window or DISTINCT
    ON. Then the shards' derived rows are disjoint and complete, and the outer query
    merges over them as it would over a sharded table.
    """
    if scope.kind not in ("derived", "cte") or root_groups or len(others) != 1 or len(analysis.roots) != 1:
        return False
    root = analysis.roots[0]
    if scope.kind == "derived" and scope.parent is not root:
        return False
    node = scope.node
    if not isinstance(node, exp.Select) or any(r.scope is not scope for r in refs):
        return False
    if root.joins or any(t.sharded for t in root.tables.values()):
        return False
    if scope.kind == "cte":
        name = next(
            (
                c.alias_or_name.lower()
                for c in analysis.statement.expression.find_all(exp.CTE)
                if c.this is node
            ),
            None,
        )
        uses = [
            t
            for t in analysis.statement.expression.find_all(exp.Table)
            if name is not None and t.name.lower() == name and not t.args.get("db")
        ]
        if name is None or len(uses) != 1 or uses[0].find_ancestor(exp.Select) is not root.node:
            return False
    if any(node.args.get(k) for k in ("limit", "offset", "qualify", "windows")) or next(
        node.find_all(exp.Window), None
    ):
        return False
    distinct = node.args.get("distinct")
    if distinct is not None and distinct.args.get("on") is not None:
        return False
    group = node.args.get("group")
    grouped = group is not None or node.args.get("having") is not None or _aggregates(node)
    if grouped or distinct is not None:
        keys = (
            group.expressions if isinstance(group, exp.Group) else [_unaliased(p) for p in node.expressions]
        )
        if not any(_key_ref(k, scope, analysis) is not None for k in keys):
            return False
    return True


def _unaliased(node: exp.Expr) -> exp.Expr:
    return node.this if isinstance(node, exp.Alias) else node


def _aggregates(select: exp.Select) -> bool:
    """Whether the select list aggregates (outside nested queries and window functions)."""
    stack: list[exp.Expr] = list(select.expressions)
    while stack:
        node = stack.pop()
        if isinstance(node, exp.Window | exp.Query):
            continue
        if isinstance(node, exp.AggFunc):
            return True
        stack.extend(node.iter_expressions())
    return False


def _as_route(decision: _Decision, layout: ShardLayout, why: str) -> Route:
    if decision.shards is None:
        return Route(layout.all_shards, f"{why}: every shard")
    if not decision.shards:
        reason = "no sharded table" if decision.any_one else "no row can match"
        return Route((0,), f"{why}: any one shard ({reason})")
    return Route(tuple(sorted(decision.shards)), f"{why}: pruned on the sharding key")


def route(statement: Statement, layout: ShardLayout, schema: Schema) -> Route:
    """The shards ``statement`` runs on; raises when it cannot be answered exactly."""
    analysis = analyse(statement, layout, schema)
    return route_analysis(analysis)


def route_analysis(analysis: Analysis) -> Route:
    """:func:`route` for an already analysed statement (the planner keeps the analysis)."""
    statement = analysis.statement
    layout = analysis.layout
    kind = statement.kind
    if kind is StatementKind.DDL:
        result = Route(layout.all_shards, "DDL: every shard")
    elif kind is StatementKind.INSERT:
        result = _route_insert(analysis)
    elif kind in (StatementKind.UPDATE, StatementKind.DELETE):
        target = analysis.target
        if target is not None and not target.sharded:
            result = Route(layout.all_shards, "write to a reference table: every shard", reference_write=True)
        else:
            result = _as_route(_decide(analysis), layout, kind.value.upper())
    else:
        result = _as_route(_decide(analysis), layout, "SELECT")
    for rule in ROUTING_RULES:
        rule(analysis, result)
    return result


def _route_insert(analysis: Analysis) -> Route:
    node = analysis.statement.expression
    layout = analysis.layout
    target = analysis.target
    assert target is not None
    source = node.args.get("expression")
    if not target.sharded:
        return Route(layout.all_shards, "write to a reference table: every shard", reference_write=True)
    columns = (
        [ident.name.lower() for ident in node.this.expressions]
        if isinstance(node.this, exp.Schema)
        else list(analysis.column_order.get(target.table, ()))  # no list: every column, in schema order
    )
    key = target.key
    assert key is not None
    if key not in columns:
        raise InvalidArgument(
            f"an INSERT into sharded table {target.table} must list its columns, including the sharding key {key}",
            reason="SHARDING_KEY_MISSING",
        )
    position = columns.index(key)
    if isinstance(source, exp.Values):
        rows: dict[int, list[int]] = {}
        for index, row in enumerate(source.expressions):
            values = row.expressions if isinstance(row, exp.Tuple) else [row]
            if len(values) != len(columns):
                raise InvalidArgument(
                    f"row {index + 1} of VALUES has {len(values)} values for {len(columns)} columns",
                    reason="INSERT_ARITY",
                )
            try:
                value = literal_value(values[position], analysis.statement.rules)
            except NotALiteral:
                raise InvalidArgument(
                    f"the sharding key {key} in row {index + 1} of the INSERT must be a literal value, "
                    f"not {values[position].sql(dialect=analysis.statement.rules.sqlglot_dialect)}",
                    reason="SHARDING_KEY_NOT_LITERAL",
                ) from None
            rows.setdefault(layout.shard_for(value), []).append(index)
        return Route(
            tuple(sorted(rows)),
            "INSERT: rows split by the sharding key",
            rows_by_shard={shard: tuple(indexes) for shard, indexes in rows.items()},
        )
    if isinstance(source, exp.Query | exp.Subquery):
        if layout.shard_count == 1:
            return Route((0,), "INSERT ... SELECT: the only shard")
        decision = _decide(analysis)
        query = source.this if isinstance(source, exp.Subquery) else source
        projections = query.expressions if isinstance(query, exp.Select) else []
        if decision.shards is not None and len(decision.shards) <= 1 and position < len(projections):
            projection = _unalias_projection(projections[position])
            shard = next(iter(decision.shards), None)
            if shard is None:  # the SELECT reads no sharded table: the key must be a literal
                shard = _literal_shard(projection, analysis)
            if shard is not None and _value_on_shard(projection, shard, analysis):
                return Route((shard,), "INSERT ... SELECT: one shard")
        raise refusal(
            "INSERT ... SELECT spanning shards",
            "INSERT ... SELECT into a sharded table is only supported when the SELECT is restricted "
            f"to one shard and gives the sharding key {key} as a literal or as that shard's key column",
            "CROSS_SHARD_INSERT_SELECT",
        )
    raise InvalidArgument(
        f"an INSERT into sharded table {target.table} must give the sharding key {key}",
        reason="SHARDING_KEY_MISSING",
    )


def _unalias_projection(projection: exp.Expr) -> exp.Expr:
    return projection.this if isinstance(projection, exp.Alias) else projection


def _literal_shard(projection: exp.Expr, analysis: Analysis) -> int | None:
    try:
        return analysis.layout.shard_for(literal_value(projection, analysis.statement.rules))
    except (NotALiteral, InvalidArgument, FailedPrecondition):
        return None


def _value_on_shard(projection: exp.Expr, shard: int, analysis: Analysis) -> bool:
    try:
        value = literal_value(projection, analysis.statement.rules)
    except NotALiteral:
        root = analysis.roots[0]
        ref = _key_ref(projection, root, analysis)
        return ref is not None and ref.scope is root
    try:
        return analysis.layout.shard_for(value) == shard
    except (InvalidArgument, FailedPrecondition):
        return False


# -- refusal rules, applied in order ----------------------------------------------------

Rule = Callable[[Analysis, Route], None]


def refuse_sharding_key_updates(analysis: Analysis, route: Route) -> None:
    """``UPDATE ... SET key = ...`` (and ``ON CONFLICT DO UPDATE SET key``) would move rows.

    >>> from controller.federation.query.layout import ShardLayout
    >>> from controller.federation.query.parse import parse
    >>> statement = parse("UPDATE orders SET customer_id = 2 WHERE id = 1", "sqlite")
    >>> route(statement, ShardLayout("hash", 2, "customer_id"), {"orders": ["id", "customer_id"]})
    Traceback (most recent call last):
    ...
    controller.errors.FailedPrecondition: updating the sharding key customer_id of orders is not supported: it would move rows between shards (delete the rows and insert them again)
    """
    node = analysis.statement.expression
    target = analysis.target
    if target is None or not target.sharded:
        return
    assignments: list[exp.Expr] = []
    if isinstance(node, exp.Update):
        assignments = list(node.expressions)
    elif isinstance(node, exp.Insert) and isinstance(node.args.get("conflict"), exp.OnConflict):
        assignments = list(node.args["conflict"].expressions or ())
    for assignment in assignments:
        column = assignment.this if isinstance(assignment, exp.EQ) else None
        targets = column.expressions if isinstance(column, exp.Tuple) else [column]
        for item in targets:
            if isinstance(item, exp.Column) and item.name.lower() == target.key:
                raise refusal(
                    "update of the sharding key",
                    f"updating the sharding key {target.key} of {target.table} is not supported: it would "
                    "move rows between shards (delete the rows and insert them again)",
                    "SHARDING_KEY_UPDATE",
                )


def refuse_reference_writes_reading_sharded(analysis: Analysis, route: Route) -> None:
    """A write to a reference table must be the same on every shard: it may not read sharded tables."""
    if not route.reference_write:
        return
    sharded = analysis.sharded_refs()
    if sharded:
        raise refusal(
            "write to a reference table reading sharded tables",
            f"a write to reference table {analysis.target.table if analysis.target else '?'} that reads "
            f"sharded table {_group_names(sharded)} would differ between shards",
            "REFERENCE_WRITE_READS_SHARDED",
        )


def refuse_windows_spanning_shards(analysis: Analysis, route: Route) -> None:
    """Window functions see only their shard's rows: exact when each partition is on one shard.

    A window of the top-level (ungrouped) query whose PARTITION BY includes the sharding
    key of the query's co-located tables sees every row of its partition on that shard.
    """
    if route.single:
        return
    for window in analysis.statement.expression.find_all(exp.Window):
        if _window_partitioned_by_key(window, analysis):
            continue
        raise refusal(
            "window function spanning shards",
            "a window function spanning shards cannot be answered exactly "
            f"({window.sql(dialect=analysis.statement.rules.sqlglot_dialect)}): partition it by the sharding key, "
            "or restrict the query to one sharding key value",
            "CROSS_SHARD_WINDOW",
        )


def _window_partitioned_by_key(window: exp.Window, analysis: Analysis) -> bool:
    if len(analysis.roots) != 1 or analysis.statement.kind is not StatementKind.SELECT:
        return False
    root = analysis.roots[0]
    node = root.node
    if not isinstance(node, exp.Select) or window.find_ancestor(exp.Select) is not node:
        return False
    if node.args.get("group") is not None or node.args.get("having") is not None or _aggregates(node):
        return False
    sharded = [ref for ref in root.tables.values() if ref.sharded]
    if not sharded or any(analysis.find(r) != analysis.find(sharded[0]) for r in sharded):
        return False
    partition = window.args.get("partition_by") or []
    return any(_key_ref(term, root, analysis) is not None for term in partition)


def refuse_reference_outer_joins_spanning_shards(analysis: Analysis, route: Route) -> None:
    """``reference LEFT JOIN sharded`` would keep each reference row once per shard."""
    if route.single or analysis.statement.kind is not StatementKind.SELECT:
        return
    for root in analysis.roots:
        for join in root.joins:
            right = join.right
            left_sharded = any(ref.sharded for ref in join.left)
            left_all_reference = bool(join.left) and not left_sharded
            right_sharded = right is not None and right.sharded
            bad = (join.side in ("LEFT", "FULL") and left_all_reference and right_sharded) or (
                join.side in ("RIGHT", "FULL") and right is not None and not right.sharded and left_sharded
            )
            if bad:
                raise refusal(
                    "outer join preserving a reference table spanning shards",
                    f"a {join.side} JOIN that keeps every row of a reference table and joins sharded table "
                    f"rows spanning shards would repeat the reference rows once per shard; put the sharded "
                    "table first (sharded LEFT JOIN reference) or restrict the query to one key value",
                    "CROSS_SHARD_OUTER_JOIN",
                )


def refuse_limited_writes_spanning_shards(analysis: Analysis, route: Route) -> None:
    """``UPDATE/DELETE ... ORDER BY ... LIMIT`` spanning shards would change too many rows."""
    node = analysis.statement.expression
    if route.single or not isinstance(node, exp.Update | exp.Delete):
        return
    if node.args.get("limit") is not None or node.args.get("order") is not None:
        raise refusal(
            "UPDATE/DELETE with LIMIT spanning shards",
            "UPDATE / DELETE with ORDER BY or LIMIT spanning shards is not supported",
            "CROSS_SHARD_LIMITED_WRITE",
        )


def refuse_subqueries_in_values(analysis: Analysis, route: Route) -> None:
    """Subqueries inside INSERT ... VALUES would be evaluated on the row's shard only."""
    node = analysis.statement.expression
    values = node.args.get("expression") if isinstance(node, exp.Insert) else None
    if isinstance(values, exp.Values) and next(values.find_all(exp.Query), None) is not None:
        raise refusal(
            "subquery in INSERT VALUES",
            "subqueries inside INSERT ... VALUES are not supported on a sharded database",
            "SUBQUERY_IN_VALUES",
        )


def refuse_unsafe_ddl(analysis: Analysis, route: Route) -> None:
    """DDL that would break routing: a sharded table without its key, uniqueness without the key,
    dropping or renaming the key column, CREATE TABLE ... AS SELECT."""
    node = analysis.statement.expression
    layout = analysis.layout
    if isinstance(node, exp.Create) and str(node.args.get("kind")).upper() == "TABLE":
        schema = node.this if isinstance(node.this, exp.Schema) else None
        target = schema.this if schema is not None else node.this
        name = table_name(target) if isinstance(target, exp.Table) else ""
        if node.args.get("expression") is not None:
            raise refusal(
                "CREATE TABLE AS SELECT",
                "CREATE TABLE ... AS SELECT is not supported on a sharded database: create the table, then INSERT",
                "CREATE_TABLE_AS_SELECT",
            )
        key = layout.key_column(name)
        if schema is None or key is None:
            return
        columns = [d.name.lower() for d in schema.expressions if isinstance(d, exp.ColumnDef)]
        if key not in columns:
            raise refusal(
                "sharded table without its sharding key",
                f"table {name} has no column {key}, the sharding key: add it, or declare {name} a reference table",
                "SHARDING_KEY_COLUMN_MISSING",
            )
        for unique_columns in _unique_column_sets(schema):
            if key not in unique_columns:
                raise refusal(
                    "unique constraint without the sharding key",
                    f"a PRIMARY KEY or UNIQUE constraint on {name} ({', '.join(unique_columns)}) must include "
                    f"the sharding key {key}: each shard can only check uniqueness among its own rows",
                    "UNIQUE_WITHOUT_SHARDING_KEY",
                )
    if (
        isinstance(node, exp.Create)
        and str(node.args.get("kind")).upper() == "INDEX"
        and node.args.get("unique")
    ):
        index = node.this
        table = index.args.get("table") if isinstance(index, exp.Index) else None
        key = layout.key_column(table_name(table)) if isinstance(table, exp.Table) else None
        params = index.args.get("params") if isinstance(index, exp.Index) else None
        columns = [
            o.this.name.lower()
            for o in (params.args.get("columns") or [] if params is not None else [])
            if isinstance(o, exp.Ordered) and isinstance(o.this, exp.Column)
        ]
        if key is not None and key not in columns:
            raise refusal(
                "unique constraint without the sharding key",
                f"a UNIQUE index must include the sharding key {key}: each shard can only check "
                "uniqueness among its own rows",
                "UNIQUE_WITHOUT_SHARDING_KEY",
            )
    if isinstance(node, exp.Alter) and isinstance(node.this, exp.Table):
        key = layout.key_column(table_name(node.this))
        for action in node.args.get("actions") or ():
            touched = [action.this] if isinstance(action, exp.RenameColumn) else []
            if isinstance(action, exp.Drop) and str(action.args.get("kind")).upper() == "COLUMN":
                touched = list(action.args.get("tables") or ())
            if key is not None and any(isinstance(c, exp.Expr) and c.name.lower() == key for c in touched):
                raise refusal(
                    "dropping or renaming the sharding key",
                    f"dropping or renaming the sharding key column {key} is not supported",
                    "SHARDING_KEY_ALTERED",
                )


def _unique_column_sets(schema: exp.Schema) -> Iterator[list[str]]:
    for item in schema.expressions:
        if isinstance(item, exp.ColumnDef):
            for constraint in item.args.get("constraints") or ():
                if isinstance(
                    constraint.args.get("kind"), exp.PrimaryKeyColumnConstraint | exp.UniqueColumnConstraint
                ):
                    yield [item.name.lower()]
            continue
        candidates = [item] if not isinstance(item, exp.Constraint) else list(item.expressions)
        for candidate in candidates:
            if isinstance(candidate, exp.PrimaryKey):
                yield [c.name.lower() for c in candidate.expressions]
            elif isinstance(candidate, exp.UniqueColumnConstraint) and isinstance(candidate.this, exp.Schema):
                yield [c.name.lower() for c in candidate.this.expressions]


ROUTING_RULES: tuple[Rule, ...] = (
    refuse_sharding_key_updates,
    refuse_reference_writes_reading_sharded,
    refuse_subqueries_in_values,
    refuse_windows_spanning_shards,
    refuse_reference_outer_joins_spanning_shards,
    refuse_limited_writes_spanning_shards,
    refuse_unsafe_ddl,
)
"""The refusal rules, in the order they are checked after pruning."""

__all__ = [
    "ROUTING_RULES",
    "Analysis",
    "Route",
    "Scope",
    "TableRef",
    "analyse",
    "conjuncts",
    "prune",
    "refusal",
    "route",
    "route_analysis",
]
