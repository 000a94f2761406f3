"""Stage 5: merge the shards' answers into the one answer the unsharded database would give.

Three kinds of merge, described by plain data (a :data:`MergeSpec`) that the rewrite
stage builds and this module executes:

* :class:`RowsMerge` (SELECT without aggregates): a **k-way merge** of the shards'
  sorted streams (``heapq.merge``; ties keep shard order), then DISTINCT, OFFSET and
  LIMIT, then the hidden ORDER BY columns are dropped. It streams: memory holds one row
  per shard (plus the distinct rows seen, with DISTINCT).
* :class:`GroupedMerge` (GROUP BY, aggregates, HAVING): partial aggregates are combined
  per group (COUNT → sum of counts, SUM → sum or NULL, MIN/MAX, AVG = sum / count,
  COUNT/SUM/AVG(DISTINCT x) over the union of the distinct values), then HAVING, the
  select list (expressions over aggregates are evaluated here), DISTINCT, ORDER BY,
  OFFSET and LIMIT. Memory holds the groups, not the rows.
* :class:`WriteMerge` (INSERT/UPDATE/DELETE/DDL): RETURNING rows are concatenated and
  affected-row counts summed (or taken once, for a reference table written to every
  shard).

Values compare as SQL compares them: NULLs sort per dialect (SQLite: first ascending,
last descending; PostgreSQL: the reverse) unless NULLS FIRST/LAST says otherwise;
numbers of any Python type compare by value; across types SQLite's order applies
(numbers < text < blobs); text compares by code point.

>>> spec = RowsMerge(order=(SortKey(0),), distinct=False, offset=1, limit=3, hidden=0)
>>> rules = DIALECTS["postgres"]
>>> merge_rows(spec, [[(1,), (4,), (None,)], [(2,), (3,)]], rules)
[(2,), (3,), (4,)]
"""

from __future__ import annotations

import heapq
import itertools
import math
import sys
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, localcontext
from typing import Any, Literal, TypeAlias

from controller.errors import FailedPrecondition, InvalidArgument

from .parse import DIALECTS, DialectRules  # noqa: F401  (DIALECTS: used by the doctests)

Row: TypeAlias = tuple[Any, ...]
Column: TypeAlias = tuple[str, str]


# -- merge specs ----------------------------------------------------------------------


@dataclass(frozen=True)
class SortKey:
    """One ORDER BY term of a rows merge: a column of the shard rows and its direction."""

    index: int
    """Column index in the shard rows (negative = counted from the end: a hidden column)."""
    descending: bool = False
    nulls_first: bool | None = None
    """Explicit NULLS FIRST/LAST; ``None`` = the dialect's default for the direction."""


@dataclass(frozen=True)
class RowsMerge:
    """Merge of plain rows: k-way ORDER BY merge, DISTINCT, OFFSET/LIMIT, drop hidden columns."""

    order: tuple[SortKey, ...]
    distinct: bool
    offset: int
    limit: int | None
    hidden: int
    """How many trailing columns were added for ORDER BY and must be dropped."""


# Expressions evaluated after the merge, over one group.


@dataclass(frozen=True)
class Const:
    """A constant."""

    value: object


@dataclass(frozen=True)
class Slot:
    """A value computed on the shards that is the same for the whole group (a group key or a
    function of the keys): the ``index``-th carried column."""

    index: int


@dataclass(frozen=True)
class AggRef:
    """The merged value of the ``index``-th aggregate."""

    index: int


@dataclass(frozen=True)
class OutputRef:
    """The value of the ``index``-th output column (ORDER BY 2, ORDER BY alias)."""

    index: int


@dataclass(frozen=True)
class Apply:
    """An operator or function over other merge expressions (see :func:`evaluate`)."""

    op: str
    args: tuple[MergeExpr, ...]
    param: str = ""


MergeExpr: TypeAlias = Const | Slot | AggRef | OutputRef | Apply

AggregateFunction: TypeAlias = Literal[
    "count",
    "sum",
    "total",
    "min",
    "max",
    "avg",
    "count_distinct",
    "sum_distinct",
    "avg_distinct",
    "var_samp",
    "var_pop",
    "stddev_samp",
    "stddev_pop",
    "string_agg",
]
_SPREAD_FUNCTIONS = ("var_samp", "var_pop", "stddev_samp", "stddev_pop")


@dataclass(frozen=True)
class Aggregate:
    """One aggregate of a grouped merge and the shard columns holding its partials."""

    function: AggregateFunction
    columns: tuple[int, ...]
    """``avg``: (partial sum, partial count); variances and standard deviations: (partial sum,
    partial count, partial sum of squares); ``*_distinct``: (the distinct value); else (partial,)."""
    separator: str = ""
    """``string_agg``: what joins the shards' partial strings."""


@dataclass(frozen=True)
class OutputColumn:
    """One column of the final result of a grouped merge."""

    name: str
    expr: MergeExpr
    type_column: int | None = None
    """A shard column whose reported type this column has, if it is passed through."""
    type_name: str | None = None
    """A fixed type name (COUNT → integer); else inferred from the values."""


@dataclass(frozen=True)
class OrderTerm:
    """One ORDER BY term of a grouped merge."""

    expr: MergeExpr
    descending: bool = False
    nulls_first: bool | None = None


@dataclass(frozen=True)
class GroupedMerge:
    """Merge of partial aggregates grouped by key, then HAVING, select list, ORDER BY, LIMIT."""

    group_columns: tuple[int, ...]
    """Shard columns that together identify a group."""
    carried_columns: tuple[int, ...]
    """Shard columns carried per group (``Slot(i)`` is ``carried_columns[i]``)."""
    aggregates: tuple[Aggregate, ...]
    outputs: tuple[OutputColumn, ...]
    having: MergeExpr | None
    order: tuple[OrderTerm, ...]
    distinct: bool
    offset: int
    limit: int | None
    scalar: bool
    """No GROUP BY: exactly one result row, even when no shard returned a row."""
    rows_column: int | None = None
    """With ``scalar``: a shard column counting the input rows, so carried values come
    from a shard that had rows."""


@dataclass(frozen=True)
class WriteMerge:
    """Merge of a write: RETURNING rows concatenated; affected counts summed or taken once."""

    counts: Literal["sum", "first"]


MergeSpec: TypeAlias = RowsMerge | GroupedMerge | WriteMerge


# -- SQL ordering ---------------------------------------------------------------------

_NUMBER = 1
_TEXT = 2
_BLOB = 3
_OTHER = 4


_TYPE_RANKS: dict[type, tuple[int, str]] = {
    int: (_NUMBER, ""),
    bool: (_NUMBER, ""),
    float: (_NUMBER, ""),
    Decimal: (_NUMBER, ""),
    str: (_TEXT, ""),
    bytes: (_BLOB, ""),
    bytearray: (_BLOB, ""),
}


def _rank(value: object) -> tuple[int, str]:
    rank = _TYPE_RANKS.get(type(value))
    if rank is not None:
        return rank
    if isinstance(value, int | float | Decimal):
        return (_NUMBER, "")
    if isinstance(value, str):
        return (_TEXT, "")
    if isinstance(value, bytes | bytearray | memoryview):
        return (_BLOB, "")
    return (_OTHER, type(value).__name__)


def sql_less(a: object, b: object) -> bool:
    """``a < b`` for two non-NULL values, as SQL orders them (SQLite's order across types).

    >>> sql_less(2, 10), sql_less("10", 2), sql_less(Decimal("1.5"), 2.0)
    (True, False, True)
    """
    try:
        return bool(a < b)  # type: ignore[operator]
    except TypeError:
        return _rank(a) < _rank(b)


def _nulls_first(descending: bool, explicit: bool | None, rules: DialectRules) -> bool:
    if explicit is not None:
        return explicit
    return rules.nulls_first_ascending != descending


class _Reversed:
    """Inverts the order of a key (for DESC terms in a key that mixes directions)."""

    __slots__ = ("key",)

    def __init__(self, key: tuple[Any, ...]) -> None:
        self.key = key

    def __lt__(self, other: _Reversed) -> bool:
        return bool(other.key < self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Reversed) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)


def value_key(descending: bool, nulls_first: bool) -> Callable[[object], tuple[Any, ...]]:
    """A sort key for one column's values, to be sorted ascending, or reversed when ``descending``.

    Keys are ``(null rank, type rank, type name, value)``: NULL sorts per ``nulls_first``
    in the final order, values of different kinds never meet (numbers < text < blobs <
    others, SQLite's order), and values of one kind compare natively.
    """
    # Ascending: NULL gets -1 to come first, +1 to come last. A descending term is
    # reversed afterwards, so its NULL rank is mirrored here.
    null_key = (-1 if nulls_first != descending else 1, 0, "", 0)
    ranks = _TYPE_RANKS

    def key(value: object) -> tuple[Any, ...]:
        if value is None:
            return null_key
        rank = ranks.get(type(value)) or _rank(value)
        return (0, rank[0], rank[1], value)

    return key


def row_key(order: Sequence[SortKey], rules: DialectRules) -> tuple[Callable[[Row], Any], bool]:
    """A key function ordering rows as ``ORDER BY`` would, and whether to apply it reversed
    (for ``heapq.merge`` and ``sorted``; both stay stable, so ties keep shard order)."""
    return _ordering(
        [(t.index, t.descending, _nulls_first(t.descending, t.nulls_first, rules)) for t in order]
    )


def _ordering(terms: Sequence[tuple[int, bool, bool]]) -> tuple[Callable[[Sequence[Any]], Any], bool]:
    directions = {descending for _, descending, _ in terms}
    if len(directions) == 1:
        (reverse,) = directions
        keys = [(i, value_key(reverse, nulls_first)) for i, _, nulls_first in terms]
        if len(keys) == 1:
            ((index, only),) = keys
            return (lambda row: only(row[index])), reverse
        return (lambda row: tuple(k(row[i]) for i, k in keys)), reverse
    mixed = [(i, descending, value_key(descending, nulls_first)) for i, descending, nulls_first in terms]

    def key(row: Sequence[Any]) -> Any:
        return tuple(_Reversed(k(row[i])) if descending else k(row[i]) for i, descending, k in mixed)

    return key, False


def _hashable(row: Row) -> Hashable:
    try:
        hash(row)
    except TypeError:
        return tuple(repr(v) if not isinstance(v, Hashable) else v for v in row)
    return row


def _distinct(rows: Iterable[Row], width: int | None = None) -> Iterator[Row]:
    seen: set[Hashable] = set()
    for row in rows:
        marker = _hashable(row if width is None else row[:width])
        if marker not in seen:
            seen.add(marker)
            yield row


def _window(rows: Iterable[Row], offset: int, limit: int | None) -> Iterator[Row]:
    if offset == 0 and limit is None:
        return iter(rows)
    return itertools.islice(
        rows, min(offset, sys.maxsize), None if limit is None else min(offset + limit, sys.maxsize)
    )


# -- rows merge -----------------------------------------------------------------------


def iter_rows(spec: RowsMerge, streams: Sequence[Iterable[Row]], rules: DialectRules) -> Iterator[Row]:
    """The merged rows of ``streams`` (each sorted by ``spec.order`` if it has one), lazily."""
    merged: Iterator[Row]
    if spec.order:
        key, reverse = row_key(spec.order, rules)
        merged = heapq.merge(*streams, key=key, reverse=reverse)
    else:
        merged = itertools.chain.from_iterable(streams)
    if spec.distinct:
        merged = _distinct(merged)
    merged = _window(merged, spec.offset, spec.limit)
    if spec.hidden:
        cut = -spec.hidden
        merged = (row[:cut] for row in merged)
    return merged


def merge_rows(spec: RowsMerge, streams: Sequence[Iterable[Row]], rules: DialectRules) -> list[Row]:
    """:func:`iter_rows` as a list."""
    return list(iter_rows(spec, streams, rules))


# -- grouped merge ---------------------------------------------------------------------


class _Group:
    __slots__ = ("carried", "has_rows", "states")

    def __init__(self, carried: tuple[Any, ...], states: list[Any], has_rows: bool) -> None:
        self.carried = carried
        self.states = states
        self.has_rows = has_rows


def _initial(aggregate: Aggregate) -> Any:
    function = aggregate.function
    if function == "count":
        return 0
    if function == "total":
        return None
    if function == "avg":
        return [None, 0]
    if function in _SPREAD_FUNCTIONS:
        return [None, 0, None]
    if function == "string_agg":
        return []
    if function.endswith("_distinct"):
        return set()
    return None


Updater: TypeAlias = Callable[[list[Any], Row], None]


def _updater(i: int, aggregate: Aggregate) -> Updater:
    """A function folding one shard row into the ``i``-th aggregate state of a group."""
    function = aggregate.function
    c = aggregate.columns[0]
    if function == "count":

        def update(states: list[Any], row: Row) -> None:
            value = row[c]
            if value:
                states[i] += value

    elif function in ("sum", "total"):

        def update(states: list[Any], row: Row) -> None:
            value = row[c]
            if value is not None:
                state = states[i]
                states[i] = value if state is None else _add(state, value)

    elif function == "min":

        def update(states: list[Any], row: Row) -> None:
            value = row[c]
            if value is not None:
                state = states[i]
                if state is None or sql_less(value, state):
                    states[i] = value

    elif function == "max":

        def update(states: list[Any], row: Row) -> None:
            value = row[c]
            if value is not None:
                state = states[i]
                if state is None or sql_less(state, value):
                    states[i] = value

    elif function == "string_agg":

        def update(states: list[Any], row: Row) -> None:
            value = row[c]
            if value is not None:
                states[i].append(value)

    elif function in _SPREAD_FUNCTIONS:
        count_column, squares_column = aggregate.columns[1], aggregate.columns[2]

        def update(states: list[Any], row: Row) -> None:
            state = states[i]
            value, squares = row[c], row[squares_column]
            if value is not None:
                state[0] = value if state[0] is None else _add(state[0], value)
            if squares is not None:
                state[2] = squares if state[2] is None else _add(state[2], squares)
            state[1] += row[count_column] or 0

    elif function == "avg":
        count_column = aggregate.columns[1]

        def update(states: list[Any], row: Row) -> None:
            state = states[i]
            value = row[c]
            if value is not None:
                state[0] = value if state[0] is None else _add(state[0], value)
            state[1] += row[count_column] or 0

    else:

        def update(states: list[Any], row: Row) -> None:
            value = row[c]
            if value is not None:
                states[i].add(value if isinstance(value, Hashable) else repr(value))

    return update


def _add(a: Any, b: Any) -> Any:
    try:
        return a + b
    except TypeError:  # numeric + float
        return float(a) + float(b)


def _finish(aggregate: Aggregate, state: Any, rules: DialectRules) -> Any:
    function = aggregate.function
    if function == "avg":
        total, count = state
        return None if not count or total is None else average(total, count, rules)
    if function in _SPREAD_FUNCTIONS:
        return spread(function, state[0], state[1], state[2])
    if function == "string_agg":
        return aggregate.separator.join(str(piece) for piece in state) if state else None
    if function == "total":
        return 0.0 if state is None else float(state)
    if function == "count_distinct":
        return len(state)
    if function == "sum_distinct":
        return _sum(state) if state else None
    if function == "avg_distinct":
        return average(_sum(state), len(state), rules) if state else None
    return state


def _sum(values: Iterable[Any]) -> Any:
    total: Any = None
    for value in values:
        total = value if total is None else _add(total, value)
    return total


def average(total: Any, count: int, rules: DialectRules) -> Any:
    """``total / count`` as the dialect's AVG returns it (float, or numeric in PostgreSQL).

    >>> average(5, 2, DIALECTS["postgres"]), average(5, 2, DIALECTS["sqlite"])
    (Decimal('2.5000000000000000'), 2.5)
    """
    if rules.exact_average and isinstance(total, int | Decimal) and not isinstance(total, bool):
        return numeric_divide(Decimal(total), Decimal(count))
    return float(total) / count


def spread(function: str, total: Any, count: int, squares: Any) -> Any:
    """PostgreSQL's VAR_SAMP/VAR_POP/STDDEV_SAMP/STDDEV_POP from a count, a sum and a sum of squares.

    Exact numerics (integer or numeric input) follow ``numeric_stddev_internal``: the
    numerator ``n·Σx² - (Σx)²`` (0 if negative), divided at ``select_div_scale``'s scale,
    and the square root rounded to that scale; double precision input gives a float.

    >>> spread("var_samp", 6, 3, 14), spread("stddev_pop", 6, 3, 14), spread("var_samp", 1, 1, 1)
    (Decimal('1.00000000000000000000'), Decimal('0.81649658092772603273'), None)
    """
    sample = function in ("var_samp", "stddev_samp")
    if count == 0 or (sample and count == 1) or total is None or squares is None:
        return None
    if isinstance(total, float) or isinstance(squares, float):
        n = float(count)
        numerator = max(0.0, n * float(squares) - float(total) * float(total))
        variance = numerator / (n * (n - 1) if sample else n * n)
        return math.sqrt(variance) if function.startswith("stddev") else variance
    n_exact = Decimal(count)
    numerator_exact = max(Decimal(0), n_exact * Decimal(squares) - Decimal(total) * Decimal(total))
    denominator = n_exact * (n_exact - 1) if sample else n_exact * n_exact
    variance_exact = numeric_divide(numerator_exact, denominator)
    if not function.startswith("stddev"):
        return variance_exact
    exponent = variance_exact.as_tuple().exponent
    scale = max(0, -exponent) if isinstance(exponent, int) else 0
    with localcontext() as context:
        context.prec = max(50, scale + variance_exact.adjusted() + 10)
        root = variance_exact.sqrt()
    return root.quantize(Decimal(1).scaleb(-scale), rounding=ROUND_HALF_UP)


def numeric_divide(a: Decimal, b: Decimal) -> Decimal:
    """PostgreSQL's ``numeric / numeric``: rounded to the scale ``select_div_scale`` picks.

    >>> numeric_divide(Decimal(10), Decimal(3)), numeric_divide(Decimal(123456), Decimal(10))
    (Decimal('3.3333333333333333'), Decimal('12345.600000000000'))
    """
    if b == 0:
        raise InvalidArgument("division by zero", reason="DIVISION_BY_ZERO")

    def weight_and_first(x: Decimal) -> tuple[int, int]:
        if x == 0:
            return 0, 0
        magnitude = abs(x)
        weight = magnitude.adjusted() // 4
        first = int(magnitude.scaleb(-4 * weight))
        return weight, first

    def dscale(x: Decimal) -> int:
        exponent = x.as_tuple().exponent
        return max(0, -exponent) if isinstance(exponent, int) else 0

    weight1, first1 = weight_and_first(a)
    weight2, first2 = weight_and_first(b)
    qweight = weight1 - weight2
    if first1 <= first2:
        qweight -= 1
    scale = max(16 - qweight * 4, dscale(a), dscale(b), 0)
    scale = min(scale, 1000)
    with localcontext() as context:
        context.prec = max(60, scale + abs(a.adjusted()) + 10)
        quotient = a / b
        return quotient.quantize(Decimal(1).scaleb(-scale), rounding=ROUND_HALF_UP)


def iter_groups(
    spec: GroupedMerge, streams: Sequence[Iterable[Row]], rules: DialectRules
) -> list[tuple[tuple[Any, ...], list[Any]]]:
    """Combine the partial rows of every shard into (carried values, finished aggregates) per group."""
    groups: dict[Hashable, _Group] = {}
    key_columns = spec.group_columns
    carried_columns = spec.carried_columns
    aggregates = spec.aggregates
    updaters = [_updater(i, a) for i, a in enumerate(aggregates)]
    rows_column = spec.rows_column
    single_key = key_columns[0] if len(key_columns) == 1 else None
    for stream in streams:
        for row in stream:
            key: Hashable = (
                row[single_key] if single_key is not None else tuple([row[i] for i in key_columns])
            )
            try:
                group = groups.get(key)
            except TypeError:  # an unhashable value (a JSON document, an array)
                key = _hashable(key if isinstance(key, tuple) else (key,))
                group = groups.get(key)
            has_rows = rows_column is None or bool(row[rows_column])
            if group is None:
                group = _Group(
                    tuple([row[i] for i in carried_columns]), [_initial(a) for a in aggregates], has_rows
                )
                groups[key] = group
            elif has_rows and not group.has_rows:
                group.carried = tuple([row[i] for i in carried_columns])
                group.has_rows = True
            states = group.states
            for update in updaters:
                update(states, row)
    if spec.scalar and not groups:
        groups[()] = _Group(tuple(None for _ in carried_columns), [_initial(a) for a in aggregates], False)
    return [
        (group.carried, [_finish(a, s, rules) for a, s in zip(aggregates, group.states, strict=True)])
        for group in groups.values()
    ]


def merge_groups(spec: GroupedMerge, streams: Sequence[Iterable[Row]], rules: DialectRules) -> list[Row]:
    """The final rows of a grouped merge (HAVING, select list, DISTINCT, ORDER BY, LIMIT applied)."""
    produced: list[tuple[Row, tuple[Any, ...]]] = []
    output_exprs = [column.expr for column in spec.outputs]
    for carried, aggregates in iter_groups(spec, streams, rules):
        context = _Context(carried, aggregates, output_exprs, rules)
        if spec.having is not None and truth(evaluate(spec.having, context)) is not True:
            continue
        output = tuple(context.output(i) for i in range(len(output_exprs)))
        order_values = tuple(evaluate(term.expr, context) for term in spec.order)
        produced.append((output, order_values))
    if spec.distinct:
        seen: set[Hashable] = set()
        unique: list[tuple[Row, tuple[Any, ...]]] = []
        for item in produced:
            marker = _hashable(item[0])
            if marker not in seen:
                seen.add(marker)
                unique.append(item)
        produced = unique
    if spec.order:
        order_key, reverse = _ordering(
            [
                (i, term.descending, _nulls_first(term.descending, term.nulls_first, rules))
                for i, term in enumerate(spec.order)
            ]
        )
        produced.sort(key=lambda item: order_key(item[1]), reverse=reverse)
    end = None if spec.limit is None else spec.offset + spec.limit
    return [output for output, _ in produced[spec.offset : end]]


# -- evaluation -----------------------------------------------------------------------


class _Context:
    """One group's values; output columns are computed on first use (HAVING may name them)."""

    __slots__ = ("aggregates", "carried", "computed", "output_exprs", "rules")

    def __init__(
        self,
        carried: tuple[Any, ...],
        aggregates: list[Any],
        output_exprs: Sequence[MergeExpr],
        rules: DialectRules,
    ) -> None:
        self.carried = carried
        self.aggregates = aggregates
        self.output_exprs = output_exprs
        self.computed: dict[int, Any] = {}
        self.rules = rules

    def output(self, index: int) -> Any:
        if index not in self.computed:
            self.computed[index] = evaluate(self.output_exprs[index], self)
        return self.computed[index]


def truth(value: object) -> bool | None:
    """SQL truth of a value: NULL → ``None``; numbers are true when non-zero."""
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float | Decimal):
        return value != 0
    if isinstance(value, str):
        try:
            return float(value) != 0
        except ValueError:
            return False
    return bool(value)


def _boolean(value: bool | None, rules: DialectRules) -> object:
    if value is None:
        return None
    return int(value) if rules.booleans_are_integers else value


def evaluate(expr: MergeExpr, context: _Context) -> Any:
    """The value of a merge expression for one group.

    >>> ctx = _Context((), [7, 2], [], DIALECTS["sqlite"])
    >>> evaluate(Apply("/", (AggRef(0), AggRef(1))), ctx)
    3
    """
    if isinstance(expr, Const):
        return expr.value
    if isinstance(expr, AggRef):
        return context.aggregates[expr.index]
    if isinstance(expr, Slot):
        return context.carried[expr.index]
    if isinstance(expr, OutputRef):
        return context.output(expr.index)
    rules = context.rules
    op = expr.op
    if op == "and":
        left = truth(evaluate(expr.args[0], context))
        if left is False:
            return _boolean(False, rules)
        right = truth(evaluate(expr.args[1], context))
        if right is False:
            return _boolean(False, rules)
        return _boolean(None if left is None or right is None else True, rules)
    if op == "or":
        left = truth(evaluate(expr.args[0], context))
        if left is True:
            return _boolean(True, rules)
        right = truth(evaluate(expr.args[1], context))
        if right is True:
            return _boolean(True, rules)
        return _boolean(None if left is None or right is None else False, rules)
    if op == "case":
        return _case(expr, context)
    if op == "coalesce":
        for arg in expr.args:
            value = evaluate(arg, context)
            if value is not None:
                return value
        return None
    values = [evaluate(arg, context) for arg in expr.args]
    return apply_operator(op, values, expr.param, rules)


def _case(expr: Apply, context: _Context) -> Any:
    args = expr.args
    has_operand = expr.param == "operand"
    operand = evaluate(args[0], context) if has_operand else None
    pairs = args[1:-1] if has_operand else args[:-1]
    for when, then in zip(pairs[0::2], pairs[1::2], strict=True):
        value = evaluate(when, context)
        matched = compare("=", operand, value) if has_operand else truth(value)
        if matched is True:
            return evaluate(then, context)
    return evaluate(args[-1], context)


def compare(op: str, a: object, b: object) -> bool | None:
    """SQL comparison of two values (``None`` when either is NULL)."""
    if a is None or b is None:
        return None
    if isinstance(a, Decimal) and isinstance(b, float):
        a = float(a)
    elif isinstance(a, float) and isinstance(b, Decimal):
        b = float(b)
    equal = _rank(a) == _rank(b) and a == b
    if op == "=":
        return equal
    if op == "<>":
        return not equal
    less = sql_less(a, b)
    if op == "<":
        return less
    if op == "<=":
        return less or equal
    if op == ">":
        return not less and not equal
    return not less  # ">="


def _number(value: object, what: str) -> int | float | Decimal:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float | Decimal):
        return value
    raise FailedPrecondition(
        f"cannot compute {what} over a {type(value).__name__} value after merging shards",
        reason="MERGE_EVALUATION_UNSUPPORTED",
    )


def arithmetic(op: str, a: object, b: object, rules: DialectRules) -> object:
    """``a op b`` with SQL semantics: NULL propagates, integer division truncates.

    >>> arithmetic("/", -7, 2, DIALECTS["sqlite"]), arithmetic("%", -7, 2, DIALECTS["postgres"])
    (-3, -1)
    """
    if a is None or b is None:
        return None
    x = _number(a, op)
    y = _number(b, op)
    if op == "%" and rules.modulo_casts_to_integer:
        # SQLite: both operands become INTEGER (truncated); the result is REAL if either was.
        ix, iy = _to_integer(x), _to_integer(y)
        if iy == 0:
            return None
        remainder = abs(ix) % abs(iy)
        remainder = remainder if ix >= 0 else -remainder
        return float(remainder) if isinstance(x, float) or isinstance(y, float) else remainder
    if isinstance(x, float) or isinstance(y, float):
        x, y = float(x), float(y)
    elif isinstance(x, Decimal) or isinstance(y, Decimal):
        x, y = Decimal(x), Decimal(y)
    if op in ("+", "-", "*"):
        result = x + y if op == "+" else x - y if op == "-" else x * y  # type: ignore[operator]
        if isinstance(result, int) and not -(2**63) <= result < 2**63:
            if rules.integer_overflow_becomes_real:
                return arithmetic(op, float(x), float(y), rules)
            raise InvalidArgument("bigint out of range", reason="NUMERIC_OUT_OF_RANGE")
        return _no_negative_zero(result)
    if op == "%" and isinstance(x, float) and not rules.modulo_casts_to_integer:
        raise InvalidArgument(
            "operator does not exist: double precision % (cast to numeric first)", reason="UNDEFINED_OPERATOR"
        )
    if y == 0:
        if rules.division_by_zero_is_null:
            return None
        raise InvalidArgument("division by zero", reason="DIVISION_BY_ZERO")
    if op == "/":
        if isinstance(x, int) and isinstance(y, int):
            quotient = abs(x) // abs(y)
            quotient = quotient if (x >= 0) == (y >= 0) else -quotient
            if quotient >= 2**63:  # -2^63 / -1
                if rules.integer_overflow_becomes_real:
                    return float(x) / float(y)
                raise InvalidArgument("bigint out of range", reason="NUMERIC_OUT_OF_RANGE")
            return quotient
        if isinstance(x, Decimal) and isinstance(y, Decimal):
            return _no_negative_zero(numeric_divide(x, y))
        return x / y  # type: ignore[operator]
    if op == "%":
        if isinstance(x, int) and isinstance(y, int):
            remainder = abs(x) % abs(y)
            return remainder if x >= 0 else -remainder
        if isinstance(x, float):
            return math.fmod(x, float(y))
        return _no_negative_zero(x % y)  # type: ignore[operator]
    raise FailedPrecondition(f"unknown operator {op}", reason="MERGE_EVALUATION_UNSUPPORTED")


def _to_integer(value: int | float | Decimal) -> int:
    """SQLite's CAST(x AS INTEGER) of a number: truncation toward zero, saturating at 64 bits."""
    if isinstance(value, float) and math.isnan(value):
        return 0
    if isinstance(value, float) and math.isinf(value):
        return 2**63 - 1 if value > 0 else -(2**63)
    return max(-(2**63), min(2**63 - 1, int(value)))


def apply_operator(op: str, values: list[Any], param: str, rules: DialectRules) -> Any:
    """Apply a non-short-circuit operator or function to evaluated arguments."""
    if op in ("+", "-", "*", "/", "%"):
        return arithmetic(op, values[0], values[1], rules)
    if op == "neg":
        return None if values[0] is None else _negate(_number(values[0], "-"), rules)
    if op in ("=", "<>", "<", "<=", ">", ">="):
        return _boolean(compare(op, values[0], values[1]), rules)
    if op == "not":
        value = truth(values[0])
        return _boolean(None if value is None else not value, rules)
    if op == "is_null":
        return _boolean(values[0] is None, rules)
    if op == "is_not_null":
        return _boolean(values[0] is not None, rules)
    if op == "between":
        low = compare(">=", values[0], values[1])
        high = compare("<=", values[0], values[2])
        if low is False or high is False:
            return _boolean(False, rules)
        return _boolean(None if low is None or high is None else True, rules)
    if op == "in":
        found: bool | None = False
        for candidate in values[1:]:
            result = compare("=", values[0], candidate)
            if result is True:
                return _boolean(True, rules)
            if result is None:
                found = None
        return _boolean(found, rules)
    if op == "nullif":
        return None if compare("=", values[0], values[1]) is True else values[0]
    if op == "abs":
        if values[0] is None:
            return None
        number = _number(values[0], "ABS")
        return _negate(number, rules, "integer overflow") if number < 0 else number
    if op == "round":
        return _round(values[0], values[1] if len(values) > 1 else 0, rules, len(values) > 1)
    if op == "cast":
        return _cast(values[0], param, rules)
    if op == "concat":
        if values[0] is None or values[1] is None:
            return None
        return _text(values[0]) + _text(values[1])
    raise FailedPrecondition(
        f"cannot evaluate {op} after merging shards", reason="MERGE_EVALUATION_UNSUPPORTED"
    )


def _negate(number: int | float | Decimal, rules: DialectRules, overflow: str = "") -> int | float | Decimal:
    """``-x`` with the dialect's 64-bit edge: -(-2^63) is a REAL in SQLite (ABS fails), an error in PostgreSQL."""
    if isinstance(number, int) and number == -(2**63):
        if rules.integer_overflow_becomes_real and not overflow:
            return -float(number)
        raise InvalidArgument(overflow or "bigint out of range", reason="NUMERIC_OUT_OF_RANGE")
    negated: int | float | Decimal = _no_negative_zero(-number)
    return negated


def _no_negative_zero(value: Any) -> Any:
    """PostgreSQL's numeric has no negative zero (Python's Decimal does)."""
    if isinstance(value, Decimal) and value.is_zero() and value.is_signed():
        return value.copy_abs()
    return value


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | Decimal) and not isinstance(value, bool):
        return str(value)
    raise FailedPrecondition(
        f"cannot convert a {type(value).__name__} value to text after merging shards",
        reason="MERGE_EVALUATION_UNSUPPORTED",
    )


def _round(value: object, digits: object, rules: DialectRules, with_digits: bool = True) -> object:
    if value is None or digits is None:
        return None
    places = int(_number(digits, "ROUND"))
    number = _number(value, "ROUND")
    quantum = Decimal(1).scaleb(-places)
    if isinstance(number, Decimal):
        return number.quantize(quantum, rounding=ROUND_HALF_UP)
    if isinstance(number, int) and rules.exact_average:
        if not with_digits:  # PostgreSQL resolves round(bigint) to round(double precision)
            return float(number)
        return Decimal(number).quantize(quantum, rounding=ROUND_HALF_UP)
    if isinstance(number, float) and rules.exact_average and with_digits:
        raise InvalidArgument(
            "function round(double precision, integer) does not exist (cast to numeric first)",
            reason="UNDEFINED_FUNCTION",
        )
    if isinstance(number, float) and not rules.division_by_zero_is_null and places == 0:
        return float(round(number))  # PostgreSQL's round(double precision) rounds half to even
    return float(Decimal(repr(float(number))).quantize(quantum, rounding=ROUND_HALF_UP))


_INTEGER_BITS = {"integer": 64, "int4": 32, "int2": 16}
"""CAST targets of the integer kind and their width in PostgreSQL (``integer``: bigint)."""


def _cast(value: object, target: str, rules: DialectRules) -> object:
    if value is None:
        return None
    if target in _INTEGER_BITS:
        number = _number(value, "CAST") if not isinstance(value, str) else Decimal(value.strip())
        if not rules.cast_to_integer_rounds:
            return int(number)  # SQLite truncates; its INTEGER is 64 bits whatever the name
        # PostgreSQL: a double rounds half to even (rint), a numeric half away from zero.
        whole = (
            round(number)
            if isinstance(number, float)
            else int(Decimal(number).quantize(Decimal(1), ROUND_HALF_UP))
        )
        bits = _INTEGER_BITS[target]
        if not -(2 ** (bits - 1)) <= whole < 2 ** (bits - 1):
            name = {16: "smallint", 32: "integer", 64: "bigint"}[bits]
            raise InvalidArgument(f"{name} out of range", reason="NUMERIC_OUT_OF_RANGE")
        return whole
    if target == "float":
        return float(_number(value, "CAST") if not isinstance(value, str) else float(value))
    if target == "numeric":
        if rules.decimal_literals_are_exact:
            return Decimal(str(value)) if not isinstance(value, Decimal) else value
        number = _number(value, "CAST")
        return int(number) if number == int(number) else float(number)
    if target == "text":
        return _text(value)
    raise FailedPrecondition(
        f"cannot CAST to {target} after merging shards", reason="MERGE_EVALUATION_UNSUPPORTED"
    )


# -- results --------------------------------------------------------------------------


def type_name(value: object, rules: DialectRules) -> str:
    """The type name reported for a value computed by the merge."""
    if isinstance(value, bool):
        return rules.boolean_type
    if isinstance(value, int):
        return rules.integer_type
    if isinstance(value, float):
        return rules.float_type
    if isinstance(value, Decimal):
        return rules.decimal_type
    if isinstance(value, str):
        return rules.text_type
    return ""


def grouped_columns(
    spec: GroupedMerge, shard_columns: Sequence[Column], rows: Sequence[Row], rules: DialectRules
) -> list[Column]:
    """Names and types of a grouped merge's result columns."""
    columns: list[Column] = []
    for i, output in enumerate(spec.outputs):
        if output.type_name is not None:
            kind = output.type_name
        elif output.type_column is not None and output.type_column < len(shard_columns):
            kind = shard_columns[output.type_column][1]
        else:
            kind = next((type_name(row[i], rules) for row in rows if row[i] is not None), "")
        columns.append((output.name, kind))
    return columns


__all__ = [
    "AggRef",
    "Aggregate",
    "Apply",
    "Const",
    "GroupedMerge",
    "MergeExpr",
    "MergeSpec",
    "OrderTerm",
    "OutputColumn",
    "OutputRef",
    "RowsMerge",
    "Slot",
    "SortKey",
    "WriteMerge",
    "average",
    "evaluate",
    "grouped_columns",
    "iter_groups",
    "iter_rows",
    "merge_groups",
    "merge_rows",
    "numeric_divide",
    "row_key",
    "sql_less",
]
