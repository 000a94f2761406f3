"""Where rows live: the shard layout of one database and the key → shard functions.

A :class:`ShardLayout` says how a database is split: the strategy (``hash``, ``range``
or ``directory``), the number of shards, the sharding key column, the key ranges or
directory entries, and which tables are *reference* tables (copied whole to every
shard) rather than sharded on the key.

Key values
----------

Every key value is first put in a **canonical form**, so that values the database
considers equal always land on the same shard (the router's one correctness rule:
two values the database may find equal must never map to different shards):

* ``bool`` → ``int``; integral ``float`` / ``Decimal`` (``5.0``) → ``int`` (``5``);
  other numbers → ``float``; NaN, infinities and integers beyond 64 bits cannot be
  routed;
* with ``key_type`` ``"integer"`` or ``"numeric"`` (the column's type is known), a
  string that reads as a number is that number (``'05'`` → ``5``, as SQLite's
  affinity and PostgreSQL's casts do); with ``"text"``, an integer is its decimal
  text (``5`` → ``'5'``) and a non-integral float cannot be routed;
* with no ``key_type``, a string in canonical integer form (``'5'``, ``'-12'``) is
  that integer (so ``5`` and ``'5'`` agree whatever the column type), any *other*
  string that reads as a number (``'05'``, ``'5.0'``, ``' 5'``) is **ambiguous**:
  a read with it goes to every shard and an insert with it is refused, and every other
  string is itself.

Strings compare by code point (SQLite's ``BINARY`` collation, PostgreSQL's ``C``
collations); equality is exact (no case folding).

Hash sharding uses the first 8 bytes (big-endian) of the SHA-256 of a type-tagged
encoding of the canonical value, modulo ``shard_count``: stable across processes,
versions and machines (Python's ``hash`` is salted per process, so it is never used).

>>> layout = ShardLayout("hash", 4, "customer_id")
>>> layout.shard_for(42) == layout.shard_for("42") == layout.shard_for(42.0)
True
>>> ranged = ShardLayout("range", 2, "customer_id", ranges=[(None, 100, 0), (100, None, 1)], key_type="integer")
>>> ranged.shard_for(99), ranged.shard_for(100)
(0, 1)
>>> sorted(ranged.shards_for_interval(50, True, 150, False) or ())
[0, 1]
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, TypeAlias

from controller.errors import FailedPrecondition, FieldViolation, InvalidArgument

Strategy: TypeAlias = Literal["hash", "range", "directory"]
KeyType: TypeAlias = Literal["integer", "numeric", "text"]
CanonicalKey: TypeAlias = int | float | str | bytes
ShardSet: TypeAlias = frozenset[int]
"""A set of shard indexes; routing code uses ``None`` for "every shard"."""

STRATEGIES: tuple[Strategy, ...] = ("hash", "range", "directory")
MAX_SHARDS = 4096
"""Upper bound on ``shard_count``: far above any real layout, low enough to catch typos."""

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_FLOAT_EXACT_INT = 2**53
_CANONICAL_INT = re.compile(r"-?(0|[1-9][0-9]*)\Z")
_NUMERIC_LOOKING = re.compile(r"\s*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\s*\Z")


class AmbiguousKey(ValueError):
    """A key value whose shard cannot be decided without knowing the column's type."""


def canonical_key(value: object, key_type: KeyType | None = None) -> CanonicalKey | None:
    """The canonical form of a key value (``None`` for SQL NULL); see the module docstring.

    Raises :class:`AmbiguousKey` when the value cannot be routed.

    >>> canonical_key(5.0), canonical_key("7"), canonical_key("abc"), canonical_key(True)
    (5, 7, 'abc', 1)
    >>> canonical_key("05", "integer"), canonical_key(5, "text")
    (5, '5')
    >>> canonical_key("05")
    Traceback (most recent call last):
    ...
    controller.federation.query.layout.AmbiguousKey: '05' reads as a number but is not in canonical form
    """
    if value is None:
        return None
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        return _canonical_int(value, key_type)
    if isinstance(value, float | Decimal):
        return _canonical_number(value, key_type)
    if isinstance(value, str):
        return _canonical_string(value, key_type)
    if isinstance(value, bytes | bytearray | memoryview):
        if key_type is not None:
            raise AmbiguousKey("a binary value cannot be routed on a typed key")
        return bytes(value)
    raise AmbiguousKey(f"a {type(value).__name__} value cannot be routed")


def _canonical_int(value: int, key_type: KeyType | None) -> CanonicalKey:
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise AmbiguousKey(f"{value} is outside the 64-bit integer range")
    return str(value) if key_type == "text" else value


def _canonical_number(value: float | Decimal, key_type: KeyType | None) -> CanonicalKey:
    if isinstance(value, float) and not math.isfinite(value):
        raise AmbiguousKey(f"{value} cannot be routed")
    if isinstance(value, Decimal) and not value.is_finite():
        raise AmbiguousKey(f"{value} cannot be routed")
    if value == int(value) and abs(int(value)) < _FLOAT_EXACT_INT:
        return _canonical_int(int(value), key_type)
    if key_type == "text":
        raise AmbiguousKey(f"{value} has no single text form")
    return float(value)


def _canonical_string(value: str, key_type: KeyType | None) -> CanonicalKey:
    if key_type == "text":
        return value
    if key_type in ("integer", "numeric"):
        if _NUMERIC_LOOKING.match(value):
            return _canonical_number(Decimal(value.strip()), key_type)
        return value
    if _CANONICAL_INT.match(value):
        return _canonical_int(int(value), key_type)
    if _NUMERIC_LOOKING.match(value):
        raise AmbiguousKey(f"{value!r} reads as a number but is not in canonical form")
    return value


def bound_order(bound: CanonicalKey | None) -> tuple[int, int, CanonicalKey]:
    """A sort key for range bounds: unbounded first, then numbers, text, bytes (never mixing types)."""
    if bound is None:
        return (0, 0, 0)
    if isinstance(bound, int | float):
        return (1, 0, bound)
    return (1, 1 if isinstance(bound, str) else 2, bound)


def stable_hash(key: CanonicalKey) -> int:
    """A 64-bit hash of a canonical key, the same in every process and on every machine.

    >>> stable_hash(1) == stable_hash(1), stable_hash(1) != stable_hash("1x")
    (True, True)
    """
    if isinstance(key, int):
        encoded = b"i:" + str(key).encode()
    elif isinstance(key, float):
        encoded = b"f:" + repr(key).encode()
    elif isinstance(key, str):
        encoded = b"s:" + key.encode("utf-8", "surrogatepass")
    else:
        encoded = b"b:" + key
    return int.from_bytes(hashlib.sha256(encoded).digest()[:8], "big")


def comparable(a: CanonicalKey, b: CanonicalKey) -> bool:
    """Whether two canonical keys are ordered the same way by Python and by SQL."""
    if isinstance(a, int | float):
        return isinstance(b, int | float)
    return type(a) is type(b)


@dataclass(frozen=True)
class KeyRange:
    """One range of range sharding: keys in ``[lower, upper)`` live on ``shard``."""

    lower: object
    """Inclusive lower bound; ``None`` = unbounded below."""
    upper: object
    """Exclusive upper bound; ``None`` = unbounded above."""
    shard: int
    """The shard index the range maps to."""


@dataclass(frozen=True)
class ShardLayout:
    """How one database is split into shards (spec §3.4 ``sharding``)."""

    strategy: Strategy
    """``hash``, ``range`` or ``directory``."""
    shard_count: int
    """Number of shards; shard indexes run from 0 to ``shard_count - 1``."""
    sharding_key: str
    """The key column every sharded table is split on (unless ``sharded_tables`` says otherwise)."""
    ranges: Sequence[KeyRange | tuple[object, object, int]] = ()
    """Range sharding: half-open ``[lower, upper)`` ranges; ``None`` bounds are unbounded."""
    directory: Mapping[object, int] = field(default_factory=dict)
    """Directory sharding: key value → shard index."""
    reference_tables: frozenset[str] = frozenset()
    """Tables copied whole to every shard (joined freely, written to every shard)."""
    sharded_tables: Mapping[str, str] = field(default_factory=dict)
    """Per-table key column, for tables whose key column is not named ``sharding_key``."""
    key_type: KeyType | None = None
    """The key column's type family, when known (``key_type_from_sql``): makes string and
    number literals route exactly and enables range pruning on inequalities."""
    version: int = 0
    """Bumped whenever the layout changes; part of the plan-cache key."""

    def __post_init__(self) -> None:
        ranges = tuple(r if isinstance(r, KeyRange) else KeyRange(*r) for r in self.ranges)
        object.__setattr__(self, "ranges", ranges)
        object.__setattr__(self, "reference_tables", frozenset(t.lower() for t in self.reference_tables))
        object.__setattr__(
            self, "sharded_tables", {t.lower(): c.lower() for t, c in dict(self.sharded_tables).items()}
        )
        canonical: dict[CanonicalKey, int] = {}
        for key, shard in dict(self.directory).items():
            try:
                value = canonical_key(key, self.key_type)
            except AmbiguousKey:
                continue  # reported by validate()
            if value is not None:
                canonical[value] = shard
        object.__setattr__(self, "_directory", canonical)
        bounds: list[tuple[CanonicalKey | None, CanonicalKey | None, int]] = []
        for r in ranges:
            try:
                bounds.append(
                    (canonical_key(r.lower, self.key_type), canonical_key(r.upper, self.key_type), r.shard)
                )
            except AmbiguousKey:
                continue  # reported by validate()
        bounds.sort(key=lambda b: bound_order(b[0]))
        object.__setattr__(self, "_ranges", tuple(bounds))

    # -- tables -------------------------------------------------------------------

    def is_reference(self, table: str) -> bool:
        """Whether ``table`` is a reference table (a full copy on every shard)."""
        return table.lower() in self.reference_tables

    def key_column(self, table: str) -> str | None:
        """The column ``table`` is sharded on, or ``None`` for a reference table.

        >>> ShardLayout("hash", 2, "customer_id", reference_tables=frozenset({"regions"})).key_column("regions")
        >>> ShardLayout("hash", 2, "Customer_ID").key_column("orders")
        'customer_id'
        """
        name = table.lower()
        if name in self.reference_tables:
            return None
        return self.sharded_tables.get(name, self.sharding_key.lower())

    @property
    def all_shards(self) -> tuple[int, ...]:
        """Every shard index, in order."""
        return tuple(range(self.shard_count))

    # -- key → shard ----------------------------------------------------------------

    def shard_for(self, value: object) -> int:
        """The one shard a row with key ``value`` is written to (INSERT).

        Raises ``InvalidArgument`` for a NULL or ambiguous key and ``FailedPrecondition``
        when the layout has no place for it (no directory entry, no covering range).

        >>> ShardLayout("directory", 3, "k", directory={"a": 2}).shard_for("b")
        Traceback (most recent call last):
        ...
        controller.errors.FailedPrecondition: no directory entry for key 'b'
        """
        try:
            key = canonical_key(value, self.key_type)
        except AmbiguousKey as exc:
            raise InvalidArgument(
                f"cannot route sharding key value {value!r}: {exc}; write it as a plain number or string",
                reason="AMBIGUOUS_SHARDING_KEY",
            ) from None
        if key is None:
            raise InvalidArgument(
                f"the sharding key {self.sharding_key} must not be NULL", reason="NULL_SHARDING_KEY"
            )
        shard = self._lookup(key)
        if shard is None:
            if self.strategy == "directory":
                raise FailedPrecondition(f"no directory entry for key {value!r}", reason="NO_DIRECTORY_ENTRY")
            raise FailedPrecondition(f"no shard range covers key {value!r}", reason="NO_SHARD_RANGE")
        return shard

    def shards_for_value(self, value: object) -> ShardSet | None:
        """The shards that can hold rows whose key equals ``value`` (reads).

        ``None`` means every shard (the value cannot be routed); an empty set means no row
        can match (NULL, an unknown directory key, a key outside every range).

        >>> ShardLayout("directory", 3, "k", directory={"a": 2}).shards_for_value("b")
        frozenset()
        >>> ShardLayout("hash", 3, "k").shards_for_value("05") is None
        True
        """
        try:
            key = canonical_key(value, self.key_type)
        except AmbiguousKey:
            return None
        if key is None:
            return frozenset()
        shard = self._lookup(key)
        return frozenset() if shard is None else frozenset((shard,))

    def shards_for_interval(
        self, lower: object, lower_inclusive: bool, upper: object, upper_inclusive: bool
    ) -> ShardSet | None:
        """The shards that can hold keys in an interval (``None`` bound = unbounded).

        Only range and directory layouts with a known ``key_type`` can answer (the
        database compares a text column and a number differently from Python); the rest
        return ``None`` (every shard).
        """
        if self.strategy == "hash" or self.key_type is None:
            return None
        try:
            low = canonical_key(lower, self.key_type)
            high = canonical_key(upper, self.key_type)
        except AmbiguousKey:
            return None
        family_text = self.key_type == "text"
        for bound in (low, high):
            if bound is not None and isinstance(bound, str) != family_text:
                return None
        if self.strategy == "directory":
            return frozenset(
                shard
                for key, shard in self._directory_map.items()
                if comparable(key, low if low is not None else key)
                and comparable(key, high if high is not None else key)
                and _in_interval(key, low, lower_inclusive, high, upper_inclusive)
            )
        shards: set[int] = set()
        for r_low, r_high, shard in self._range_bounds:
            # The range [r_low, r_high) meets the interval unless it ends before or starts after it.
            if low is not None and r_high is not None:
                if not comparable(low, r_high):
                    return None
                if r_high < low or (r_high == low):  # type: ignore[operator]
                    continue
            if high is not None and r_low is not None:
                if not comparable(high, r_low):
                    return None
                if r_low > high or (r_low == high and not upper_inclusive):  # type: ignore[operator]
                    continue
            shards.add(shard)
        return frozenset(shards)

    # -- internals -------------------------------------------------------------------

    @property
    def _directory_map(self) -> dict[CanonicalKey, int]:
        return self.__dict__["_directory"]  # type: ignore[no-any-return]

    @property
    def _range_bounds(self) -> tuple[tuple[CanonicalKey | None, CanonicalKey | None, int], ...]:
        return self.__dict__["_ranges"]  # type: ignore[no-any-return]

    def _lookup(self, key: CanonicalKey) -> int | None:
        if self.strategy == "hash":
            return stable_hash(key) % self.shard_count
        if self.strategy == "directory":
            return self._directory_map.get(key)
        for low, high, shard in self._range_bounds:
            if low is not None and (not comparable(key, low) or key < low):  # type: ignore[operator]
                continue
            if high is not None and (not comparable(key, high) or not key < high):  # type: ignore[operator]
                continue
            return shard
        return None


def _in_interval(
    key: CanonicalKey,
    low: CanonicalKey | None,
    low_inclusive: bool,
    high: CanonicalKey | None,
    high_inclusive: bool,
) -> bool:
    if low is not None and (key < low or (key == low and not low_inclusive)):  # type: ignore[operator]
        return False
    return not (high is not None and (key > high or (key == high and not high_inclusive)))  # type: ignore[operator]


def key_type_from_sql(type_name: str) -> KeyType | None:
    """The key type family of a declared column type (SQLite affinity rules, PostgreSQL names).

    >>> key_type_from_sql("BIGINT"), key_type_from_sql("varchar(20)"), key_type_from_sql("double precision")
    ('integer', 'text', 'numeric')
    """
    name = type_name.strip().lower()
    if not name:
        return None
    if "int" in name or name in ("serial", "bigserial", "smallserial"):
        return "integer"
    if any(word in name for word in ("char", "clob", "text", "uuid")):
        return "text"
    if any(word in name for word in ("real", "floa", "doub", "numeric", "decimal")):
        return "numeric"
    return None


def validate_layout(layout: ShardLayout, *, field_prefix: str = "sharding") -> None:
    """Raise ``InvalidArgument`` listing every problem of ``layout`` as a field violation.

    Ranges must be well-formed (``lower < upper``), not overlap, leave no gap, and
    cover every key (the lowest range unbounded below, the highest unbounded above);
    every shard index must be within ``[0, shard_count)``; directory keys must be
    routable and unique.

    >>> validate_layout(ShardLayout("range", 2, "k", ranges=[(None, 10, 0), (20, None, 1)]))
    Traceback (most recent call last):
    ...
    controller.errors.InvalidArgument: invalid sharding layout: sharding.ranges[1].lower: leaves keys [10, 20) on no shard
    """
    violations = list(_layout_violations(layout, field_prefix))
    if violations:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        raise InvalidArgument(
            f"invalid sharding layout: {summary}", field_violations=violations, reason="INVALID_SHARDING"
        )


def _layout_violations(layout: ShardLayout, prefix: str) -> Iterable[FieldViolation]:
    if layout.strategy not in STRATEGIES:
        yield FieldViolation(f"{prefix}.strategy", f"must be one of {', '.join(STRATEGIES)}")
    if not isinstance(layout.shard_count, int) or not 1 <= layout.shard_count <= MAX_SHARDS:
        yield FieldViolation(f"{prefix}.shard_count", f"must be between 1 and {MAX_SHARDS}")
        return
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", layout.sharding_key or ""):
        yield FieldViolation(f"{prefix}.sharding_key", "must be a column name")
    overlap = set(layout.reference_tables) & set(layout.sharded_tables)
    if overlap:
        yield FieldViolation(
            f"{prefix}.reference_tables", f"tables both sharded and reference: {', '.join(sorted(overlap))}"
        )
    if layout.strategy != "range" and layout.ranges:
        yield FieldViolation(f"{prefix}.ranges", f"only range sharding takes ranges, not {layout.strategy}")
    if layout.strategy != "directory" and layout.directory:
        yield FieldViolation(
            f"{prefix}.directory", f"only directory sharding takes a directory, not {layout.strategy}"
        )
    if layout.strategy == "range":
        yield from _range_violations(layout, prefix)
    if layout.strategy == "directory":
        yield from _directory_violations(layout, prefix)


def _range_violations(layout: ShardLayout, prefix: str) -> Iterable[FieldViolation]:
    if not layout.ranges:
        yield FieldViolation(f"{prefix}.ranges", "range sharding needs at least one range")
        return
    parsed: list[tuple[int, CanonicalKey | None, CanonicalKey | None]] = []
    family: type | None = None
    for i, r in enumerate(layout.ranges):
        assert isinstance(r, KeyRange)
        where = f"{prefix}.ranges[{i}]"
        if not 0 <= r.shard < layout.shard_count:
            yield FieldViolation(f"{where}.shard_index", f"must be between 0 and {layout.shard_count - 1}")
        bounds: list[CanonicalKey | None] = []
        for name, value in (("lower", r.lower), ("upper", r.upper)):
            try:
                bound = canonical_key(value, layout.key_type)
            except AmbiguousKey as exc:
                yield FieldViolation(f"{where}.{name}", str(exc))
                bound = None
                bounds.append(None)
                continue
            if bound is not None:
                kind = str if isinstance(bound, str) else float if isinstance(bound, int | float) else bytes
                if family is None:
                    family = kind
                elif kind is not family and family is not object:
                    family = object
                    yield FieldViolation(
                        f"{where}.{name}", "every bound must be of one type (numbers or strings)"
                    )
            bounds.append(bound)
        low, high = bounds
        if low is not None and high is not None and comparable(low, high) and not low < high:  # type: ignore[operator]
            yield FieldViolation(f"{where}", f"lower ({r.lower!r}) must be below upper ({r.upper!r})")
        parsed.append((i, low, high))
    if family is None and len(parsed) > 1:
        yield FieldViolation(f"{prefix}.ranges", "only one range may be unbounded on both sides")
        return

    if family is object:
        return  # mixed bound types, reported above
    ordered = sorted(parsed, key=lambda item: bound_order(item[1]))
    first_i, first_low, _ = ordered[0]
    if first_low is not None:
        yield FieldViolation(
            f"{prefix}.ranges[{first_i}].lower", "the lowest range must be unbounded below (null lower)"
        )
    for (i, _low, high), (j, next_low, _next_high) in itertools.pairwise(ordered):
        if high is None:
            yield FieldViolation(f"{prefix}.ranges[{i}].upper", f"unbounded above but overlaps ranges[{j}]")
            continue
        if next_low is None:
            yield FieldViolation(f"{prefix}.ranges[{j}].lower", f"unbounded below but overlaps ranges[{i}]")
            continue
        if next_low < high:  # type: ignore[operator]
            yield FieldViolation(
                f"{prefix}.ranges[{j}].lower", f"overlaps ranges[{i}] (which ends at {high!r})"
            )
        elif next_low > high:  # type: ignore[operator]
            yield FieldViolation(
                f"{prefix}.ranges[{j}].lower", f"leaves keys [{high!r}, {next_low!r}) on no shard"
            )
    last_i, _, last_high = ordered[-1]
    if last_high is not None:
        yield FieldViolation(
            f"{prefix}.ranges[{last_i}].upper", "the highest range must be unbounded above (null upper)"
        )


def _directory_violations(layout: ShardLayout, prefix: str) -> Iterable[FieldViolation]:
    if not layout.directory:
        yield FieldViolation(f"{prefix}.directory", "directory sharding needs at least one entry")
        return
    seen: dict[CanonicalKey, tuple[int, object]] = {}
    for i, (key, shard) in enumerate(dict(layout.directory).items()):
        where = f"{prefix}.directory[{i}]"
        if not isinstance(shard, int) or not 0 <= shard < layout.shard_count:
            yield FieldViolation(f"{where}.shard_index", f"must be between 0 and {layout.shard_count - 1}")
        try:
            value = canonical_key(key, layout.key_type)
        except AmbiguousKey as exc:
            yield FieldViolation(f"{where}.key", str(exc))
            continue
        if value is None:
            yield FieldViolation(f"{where}.key", "must not be null")
            continue
        if value in seen and seen[value][0] != shard:
            yield FieldViolation(
                f"{where}.key", f"{key!r} is also mapped by {seen[value][1]!r} to another shard"
            )
        seen.setdefault(value, (shard, key))


_PROTO_STRATEGIES: Mapping[int, Strategy] = {1: "hash", 2: "range", 3: "directory"}


def _from_value(value: Any) -> object:
    """A ``google.protobuf.Value`` as a key value (integral numbers become ``int``)."""
    kind = value.WhichOneof("kind")
    if kind in (None, "null_value"):
        return None
    if kind == "number_value":
        number = float(value.number_value)
        return int(number) if number.is_integer() else number
    if kind == "string_value":
        return str(value.string_value)
    if kind == "bool_value":
        return bool(value.bool_value)
    return value  # a struct or list: validate_layout reports it


def layout_from_proto(
    sharding: Any, *, key_type: KeyType | None = None, version: int = 0, field_prefix: str = "sharding"
) -> ShardLayout:
    """A validated :class:`ShardLayout` from an ``automator67.v1.Sharding`` message.

    Numbers arrive as doubles: keys and bounds beyond 2**53 cannot be given exactly.
    Raises ``InvalidArgument`` with field violations for a bad layout.

    >>> from automator67.v1 import query_pb2
    >>> from google.protobuf import struct_pb2
    >>> message = query_pb2.Sharding(strategy=query_pb2.SHARDING_STRATEGY_RANGE, shard_count=2,
    ...     sharding_key="customer_id", reference_tables=["regions"], ranges=[
    ...         query_pb2.ShardRange(lower=struct_pb2.Value(null_value=0), upper=struct_pb2.Value(number_value=100)),
    ...         query_pb2.ShardRange(lower=struct_pb2.Value(number_value=100),
    ...                              upper=struct_pb2.Value(null_value=0), shard_index=1)])
    >>> layout_from_proto(message).shard_for(150)
    1
    """
    directory: dict[object, int] = {}
    violations: list[FieldViolation] = []
    for i, entry in enumerate(sharding.directory):
        key = _from_value(entry.key)
        try:
            hash(key)
        except TypeError:
            violations.append(
                FieldViolation(f"{field_prefix}.directory[{i}].key", "must be a number or a string")
            )
            continue
        if key in directory and directory[key] != entry.shard_index:
            violations.append(
                FieldViolation(
                    f"{field_prefix}.directory[{i}].key", f"{key!r} is listed twice, for two shards"
                )
            )
        directory[key] = entry.shard_index
    if violations:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        raise InvalidArgument(
            f"invalid sharding layout: {summary}", field_violations=violations, reason="INVALID_SHARDING"
        )
    layout = ShardLayout(
        strategy=_PROTO_STRATEGIES.get(sharding.strategy, "unspecified"),  # type: ignore[arg-type]
        shard_count=sharding.shard_count,
        sharding_key=sharding.sharding_key,
        ranges=[KeyRange(_from_value(r.lower), _from_value(r.upper), r.shard_index) for r in sharding.ranges],
        directory=directory,
        reference_tables=frozenset(sharding.reference_tables),
        key_type=key_type,
        version=version,
    )
    validate_layout(layout, field_prefix=field_prefix)
    return layout
