"""SQL over sharded databases: parse → route → rewrite → execute → merge, exactly.

The pure core (no I/O): :func:`parse` a statement, :func:`plan` it against a
:class:`ShardLayout` and the schema (or :class:`PlanCache` it), then :func:`execute`
the :class:`Plan` through a :class:`ShardExecutor`, which merges the shards' answers
into a :class:`QueryResult` equal to what one unsharded database would return.

Modules, in pipeline order: :mod:`.layout` (key → shard), :mod:`.parse` (sqlglot,
dialect rules), :mod:`.route` (scopes, pruning, refusal rules), :mod:`.rewrite`
(shard SQL, merge specs), :mod:`.plan` (the stages in order, the cache),
:mod:`.execute` (parallel, deadline, partial results), :mod:`.merge` (k-way merge,
partial aggregates, HAVING/ORDER BY/LIMIT after the merge).

Errors (all from :mod:`controller.errors`)::

    InvalidArgument      syntax error (line, column), several statements, unsupported
                         statement, missing/ambiguous/NULL sharding key, bad layout
    NotFound             unknown table
    FailedPrecondition   not answerable exactly across shards (reason CROSS_SHARD_*,
                         metadata["construct"]), no directory entry / range for a key,
                         a shard's own error (constraint violation)
    Unavailable          a shard (or every shard) did not answer
    DeadlineExceeded     the deadline passed

Requirement on shard databases: text compares by code point (SQLite's default
``BINARY`` collation; PostgreSQL databases created with a ``C`` / ``C.UTF-8``
collation), as the merge orders text that way. Other collations, declared on a column
or written in the statement, are refused where the merge would compare by them
(:mod:`.collation`).
"""

from .collation import declared_collations, is_binary
from .execute import (
    DEFAULT_DEADLINE_SECONDS,
    FunctionExecutor,
    QueryResult,
    ShardError,
    ShardExecutor,
    ShardResult,
    ShardStatus,
    execute,
)
from .layout import (
    KeyRange,
    KeyType,
    ShardLayout,
    Strategy,
    canonical_key,
    key_type_from_sql,
    layout_from_proto,
    validate_layout,
)
from .merge import MergeSpec
from .parse import DIALECTS, DialectRules, Schema, Statement, StatementKind, parse
from .plan import STAGES, Plan, PlanCache, plan, plan_sql
from .route import ROUTING_RULES, Collations, Route, route

__all__ = [
    "DEFAULT_DEADLINE_SECONDS",
    "DIALECTS",
    "ROUTING_RULES",
    "STAGES",
    "Collations",
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
]
