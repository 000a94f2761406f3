"""Pure storage decisions: path rules, replication status, repair, inventory reconciliation, GC.

No I/O and no clock: the harness (:mod:`controller.federation.storage.service`) reads the
store and the fleet, calls these functions with what it read and the time, and applies
the plans they return. Every function here is deterministic for its inputs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from controller.errors import FieldViolation

MAX_PATH_BYTES = 1024
MAX_SEGMENT_BYTES = 255
MIN_REPLICAS = 1
MAX_REPLICAS = 5
DEFAULT_REPLICAS = 3
DEFAULT_MIME_TYPE = "application/octet-stream"
_MIME = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}(;[ -~]{0,120})?"
)


def path_problem(path: str) -> str | None:
    """Why ``path`` is not a valid file path, or None.

    >>> path_problem("docs/a.pdf") is None
    True
    >>> path_problem("../etc/passwd")
    'must not contain "." or ".." segments'
    """
    if not path:
        return "is required"
    if len(path.encode("utf-8")) > MAX_PATH_BYTES:
        return f"must be at most {MAX_PATH_BYTES} bytes"
    if path.startswith("/"):
        return "must be relative (no leading /)"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return "must not contain control characters"
    segments = path.split("/")
    if any(s == "" for s in segments):
        return "must not contain empty segments (// or a trailing /)"
    if any(s in (".", "..") for s in segments):
        return 'must not contain "." or ".." segments'
    if any(len(s.encode("utf-8")) > MAX_SEGMENT_BYTES for s in segments):
        return f"segments must be at most {MAX_SEGMENT_BYTES} bytes"
    return None


def metadata_violations(
    path: str, mime_type: str, replicas: int, size: int, sha256: str
) -> list[FieldViolation]:
    """Field violations of an upload's metadata (empty when it is valid)."""
    out: list[FieldViolation] = []
    problem = path_problem(path)
    if problem:
        out.append(FieldViolation("metadata.path", problem))
    if mime_type and not _MIME.fullmatch(mime_type):
        out.append(FieldViolation("metadata.mime_type", "must be a MIME type such as text/plain"))
    if replicas and not MIN_REPLICAS <= replicas <= MAX_REPLICAS:
        out.append(FieldViolation("metadata.replicas", f"must be between {MIN_REPLICAS} and {MAX_REPLICAS}"))
    if size < 0:
        out.append(FieldViolation("metadata.size", "must not be negative"))
    if sha256 and not re.fullmatch(r"[0-9a-f]{64}", sha256):
        out.append(FieldViolation("metadata.sha256", "must be 64 lower-case hex digits"))
    return out


class Replication(StrEnum):
    REPLICATING = "replicating"
    COMPLETE = "complete"
    DEGRADED = "degraded"


@dataclass(frozen=True, slots=True)
class ChunkView:
    """One chunk as repair and status see it."""

    chunk_id: str
    user_id: str
    replicas: int
    stored_size: int
    checksum: str
    copies: Mapping[str, str]
    """node id → copy state (``writing`` or ``ok``)."""


class NodeCondition(StrEnum):
    """How a node holding copies counts."""

    UP = "up"
    """Connected and healthy: its copies count and can be read."""
    AWAY = "away"
    """Suspect, disconnected, or failed within the mass-failure window (or frozen): its
    copies still count (it may come back) but cannot be read now."""
    LOST = "lost"
    """Failed past the window (recovery due) or removed: its copies no longer count."""


def good_copies(chunk: ChunkView, condition: Callable[[str], NodeCondition]) -> list[str]:
    """Nodes whose verified copy of ``chunk`` still counts."""
    return sorted(n for n, s in chunk.copies.items() if s == "ok" and condition(n) != NodeCondition.LOST)


def replication_status(
    chunks: Sequence[ChunkView], condition: Callable[[str], NodeCondition], repairing: bool = False
) -> Replication:
    """§3.5 replication_status: complete when every chunk has ``replicas`` verified copies on
    nodes that are up; replicating while copies are being made; degraded otherwise."""
    short = any(
        sum(1 for n in good_copies(c, condition) if condition(n) == NodeCondition.UP) < c.replicas
        for c in chunks
    )
    if not short:
        return Replication.COMPLETE
    writing = any(s == "writing" for c in chunks for s in c.copies.values())
    return Replication.REPLICATING if (writing or repairing) else Replication.DEGRADED


@dataclass(frozen=True, slots=True)
class RepairTask:
    """Make ``missing`` more copies of a chunk from one of ``sources``."""

    chunk_id: str
    user_id: str
    good: int
    missing: int
    sources: tuple[str, ...]
    holders: frozenset[str]
    """Every node with a copy row (never a target: one copy per node)."""
    lost: tuple[str, ...]
    """Copy rows on lost nodes: dropped once the chunk is whole again."""


def repair_plan(
    chunks: Iterable[ChunkView],
    condition: Callable[[str], NodeCondition],
    frozen_users: frozenset[str] = frozenset(),
) -> list[RepairTask]:
    """Chunks with fewer counting copies than wanted, most endangered first.

    A chunk whose every remaining copy is away waits (nothing to copy from); a frozen
    user's chunks wait for the freeze to lift (mass failure: the fault is most likely
    the controller's own network)."""
    tasks: list[RepairTask] = []
    for chunk in chunks:
        if chunk.user_id in frozen_users:
            continue
        good = good_copies(chunk, condition)
        lost = tuple(sorted(n for n in chunk.copies if condition(n) == NodeCondition.LOST))
        missing = chunk.replicas - len(good)
        if missing <= 0:
            continue
        sources = tuple(n for n in good if condition(n) == NodeCondition.UP)
        if not sources:
            continue
        tasks.append(
            RepairTask(
                chunk_id=chunk.chunk_id,
                user_id=chunk.user_id,
                good=len(good),
                missing=missing,
                sources=sources,
                holders=frozenset(chunk.copies),
                lost=lost,
            )
        )
    tasks.sort(key=lambda t: (t.good, -t.missing, t.chunk_id))
    return tasks


@dataclass(frozen=True, slots=True)
class ReportedCopy:
    chunk_id: str
    sha256: str
    size: int
    corrupt: bool = False


@dataclass(frozen=True, slots=True)
class KnownChunk:
    """What the store says about a chunk a node reported (None if it has no row)."""

    chunk_id: str
    state: str
    checksum: str
    replicas: int
    copy_state: str | None
    """This node's copy row: ``writing``, ``ok`` or None."""
    good_elsewhere: int
    """Counting ok copies on other nodes."""


@dataclass
class InventoryPlan:
    """What to do after a node reported its copies."""

    delete: list[str] = field(default_factory=list)
    """Copies to remove from the node (garbage, stale, corrupt, unknown)."""
    drop_rows: list[str] = field(default_factory=list)
    """This node's copy rows to remove (corrupt or missing copies)."""
    reuse: list[str] = field(default_factory=list)
    """Stale copies of live chunks that are verified and wanted: recorded as ok copies."""
    repair: bool = False
    """Some chunk lost a copy: run a repair pass."""


def reconcile_inventory(
    reported: Sequence[ReportedCopy],
    known: Mapping[str, KnownChunk],
    rows_on_node: Mapping[str, str],
    complete: bool,
) -> InventoryPlan:
    """Compare a node's copies with the store.

    ``known``: the chunk rows of the reported ids; ``rows_on_node``: every copy row of the
    node (chunk id → state) — used only for a complete report, to find copies the node
    lost. A copy row is written before a copy is sent, so a copy on disk without a row
    was abandoned (a failed or timed-out store), belongs to a repair that replaced it,
    or to a chunk already collected: never a copy a running upload still counts on.
    """
    plan = InventoryPlan()
    seen: set[str] = set()
    for copy in reported:
        seen.add(copy.chunk_id)
        chunk = known.get(copy.chunk_id)
        if chunk is None:
            plan.delete.append(copy.chunk_id)  # collected already (its row is gone)
            continue
        if copy.corrupt or copy.sha256 != chunk.checksum:
            plan.delete.append(copy.chunk_id)
            if chunk.copy_state is not None:
                plan.drop_rows.append(copy.chunk_id)
                plan.repair = True
            continue
        if chunk.copy_state is not None:
            continue  # a counted copy (ok), or one being written
        if chunk.state == "live" and chunk.good_elsewhere < chunk.replicas:
            plan.reuse.append(copy.chunk_id)  # fenced out earlier, verified and wanted again
            plan.repair = True
        else:
            plan.delete.append(copy.chunk_id)  # stale: replaced by a repair, or garbage
    if complete:
        for chunk_id, state in rows_on_node.items():
            if state == "ok" and chunk_id not in seen:
                plan.drop_rows.append(chunk_id)  # the node lost it
                plan.repair = True
    return plan


def gc_due(garbage_at: datetime | None, now: datetime, grace: timedelta) -> bool:
    """Whether a garbage chunk's copies may be removed now."""
    return garbage_at is not None and now - garbage_at >= grace


class TokenBucket:
    """A rate limit: ``rate`` tokens per second, at most ``burst`` saved; the clock is injected.

    >>> t = [0.0]
    >>> bucket = TokenBucket(rate=2.0, burst=2.0, clock=lambda: t[0])
    >>> [bucket.take() for _ in range(3)]
    [0.0, 0.0, 0.5]
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._at = clock()

    def take(self) -> float:
        """Take a token; how long to wait before using it (0 if available now)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``(offset, length)`` of an HTTP ``Range: bytes=…`` header for a file of ``size``
    bytes; None when it is absent or not a single byte range (serve the whole file).
    ``ValueError`` when it cannot be satisfied (416).

    >>> parse_range("bytes=0-9", 100), parse_range("bytes=90-", 100), parse_range("bytes=-5", 100)
    ((0, 10), (90, 10), (95, 5))
    """
    header = header.strip()
    if not header.startswith("bytes=") or "," in header:
        return None
    spec = header[len("bytes=") :].strip()
    first, sep, last = spec.partition("-")
    if not sep:
        return None
    try:
        if first == "":
            suffix = int(last)
            if suffix <= 0:
                raise ValueError("an empty suffix range")
            start = max(0, size - suffix)
            return start, size - start
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError as exc:
        if "empty suffix" in str(exc):
            raise
        return None
    if start >= size:
        raise ValueError(f"range starts at {start}, the file has {size} bytes")
    if start < 0 or end < start:
        return None
    end = min(end, size - 1)
    return start, end - start + 1
