"""The planner: the router's stages applied in order, and a plan cache.

A statement goes through :data:`STAGES`, in order, each a small function over one
:class:`Planning` record:

1. :func:`resolve_tables_stage`: every table exists (``NotFound`` naming it);
2. :func:`analyse_stage`: scopes, column resolution, co-located groups (:mod:`.route`);
3. :func:`route_stage`: shard pruning and the refusal rules (:mod:`.route`);
4. :func:`rewrite_stage`: per-shard SQL and the merge spec (:mod:`.rewrite`).

Parsing (:func:`.parse.parse`) comes before; :func:`plan_sql` does both. The result,
a :class:`Plan`, is immutable plain data, so :class:`PlanCache` can hand the same plan
to every repeat of a statement.

>>> from controller.federation.query.layout import ShardLayout
>>> layout = ShardLayout("hash", 4, "customer_id")
>>> schema = {"orders": ["id", "customer_id", "amount"]}
>>> point = plan_sql("SELECT * FROM orders WHERE customer_id = 7", "sqlite", layout, schema)
>>> point.shards, point.merge is None, point.shard_sql[point.shards[0]] == point.sql
((3,), True, True)
>>> fan_out = plan_sql("SELECT id FROM orders ORDER BY amount DESC LIMIT 5 OFFSET 5", "sqlite", layout, schema)
>>> fan_out.shard_sql[0]
'SELECT id, amount AS _a67_o0 FROM orders ORDER BY amount DESC LIMIT 10'
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .layout import ShardLayout
from .merge import MergeSpec
from .parse import DialectRules, Schema, Statement, StatementKind, parse, resolve_tables
from .rewrite import rewrite
from .route import Analysis, Collations, Route, analyse, route_analysis


@dataclass(frozen=True)
class Plan:
    """How to run one statement: where, with which SQL, and how to merge the answers."""

    sql: str
    """The statement as the caller wrote it."""
    rules: DialectRules
    """The dialect of the statement and the shards."""
    kind: StatementKind
    """SELECT, INSERT, UPDATE, DELETE or DDL."""
    shards: tuple[int, ...]
    """The shards to run on, ascending."""
    shard_sql: Mapping[int, str]
    """The SQL each shard runs (the original text when the plan has one shard)."""
    merge: MergeSpec | None
    """How to merge the shards' answers; ``None`` when one shard answers alone."""
    why: str = ""
    """Why these shards (for explanations and golden files)."""

    @property
    def is_write(self) -> bool:
        return self.kind.is_write


@dataclass
class Planning:
    """The record the stages fill in, one field per stage."""

    statement: Statement
    layout: ShardLayout
    schema: Schema
    collations: Collations | None = None
    analysis: Analysis | None = None
    route: Route | None = None
    plan: Plan | None = None


def resolve_tables_stage(planning: Planning) -> None:
    """Every table the statement names must be in the schema (``NotFound`` otherwise)."""
    resolve_tables(planning.statement, planning.schema)


def analyse_stage(planning: Planning) -> None:
    """Scopes, column resolution and co-located groups of sharded tables."""
    planning.analysis = analyse(planning.statement, planning.layout, planning.schema, planning.collations)


def route_stage(planning: Planning) -> None:
    """Shard pruning, then the refusal rules."""
    assert planning.analysis is not None
    planning.route = route_analysis(planning.analysis)


def rewrite_stage(planning: Planning) -> None:
    """Per-shard SQL and the merge spec."""
    assert planning.analysis is not None
    assert planning.route is not None
    rewritten = rewrite(planning.analysis, planning.route)
    statement = planning.statement
    planning.plan = Plan(
        sql=statement.sql,
        rules=statement.rules,
        kind=statement.kind,
        shards=planning.route.shards,
        shard_sql=rewritten.shard_sql,
        merge=rewritten.merge,
        why=planning.route.why,
    )


Stage = Callable[[Planning], None]
STAGES: tuple[Stage, ...] = (resolve_tables_stage, analyse_stage, route_stage, rewrite_stage)
"""The planner's stages, in order."""


def plan(
    statement: Statement, layout: ShardLayout, schema: Schema, collations: Collations | None = None
) -> Plan:
    """The :class:`Plan` of a parsed statement (raises what the stages raise)."""
    planning = Planning(statement, layout, schema, collations)
    for stage in STAGES:
        stage(planning)
    assert planning.plan is not None
    return planning.plan


def plan_sql(
    sql: str, dialect: str, layout: ShardLayout, schema: Schema, collations: Collations | None = None
) -> Plan:
    """Parse and plan ``sql`` in one call (``collations``: the schema's declared ones)."""
    return plan(parse(sql, dialect), layout, schema, collations)


@dataclass
class PlanCache:
    """A least-recently-used cache of plans, keyed by (database, SQL text, dialect, layout
    version, schema version): a repeated statement skips parsing and planning.

    Bump ``ShardLayout.version`` when the layout changes and pass a new ``schema_version``
    when the schema changes (after DDL). Errors are not cached.

    >>> from controller.federation.query.layout import ShardLayout
    >>> cache = PlanCache(maxsize=2)
    >>> layout = ShardLayout("hash", 2, "k")
    >>> first = cache.plan("SELECT * FROM t WHERE k = 1", "sqlite", layout, {"t": ["k"]})
    >>> cache.plan("SELECT * FROM t WHERE k = 1", "sqlite", layout, {"t": ["k"]}) is first
    True
    >>> cache.hits, cache.misses
    (1, 1)
    """

    maxsize: int = 1024
    hits: int = 0
    misses: int = 0
    _plans: collections.OrderedDict[tuple[str, str, str, int, int], Plan] = field(
        default_factory=collections.OrderedDict
    )

    def plan(
        self,
        sql: str,
        dialect: str,
        layout: ShardLayout,
        schema: Schema,
        *,
        schema_version: int = 0,
        database: str = "",
        collations: Collations | None = None,
    ) -> Plan:
        """The cached plan of ``sql``, planning it on a miss."""
        key = (database, sql, dialect, layout.version, schema_version)
        cached = self._plans.get(key)
        if cached is not None:
            self._plans.move_to_end(key)
            self.hits += 1
            return cached
        self.misses += 1
        result = plan_sql(sql, dialect, layout, schema, collations)
        self._plans[key] = result
        if len(self._plans) > self.maxsize:
            self._plans.popitem(last=False)
        return result

    def cached(
        self,
        sql: str,
        dialect: str,
        layout: ShardLayout,
        *,
        schema_version: int = 0,
        database: str = "",
    ) -> Plan | None:
        """The cached plan of ``sql`` (counted as a hit), or None without planning: a
        caller on the event loop can take a hit there and plan a miss in a thread."""
        key = (database, sql, dialect, layout.version, schema_version)
        cached = self._plans.get(key)
        if cached is not None:
            self._plans.move_to_end(key)
            self.hits += 1
        return cached

    def clear(self) -> None:
        """Forget every plan."""
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)
