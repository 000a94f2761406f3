"""What the agent reports about its machine: capabilities once, metrics every heartbeat.

* :func:`measure_capabilities` — what the node offers, sent at enrollment and in every
  ``NodeHello``: logical CPUs, memory and the disk of the data directory's filesystem.
  Inside a container with cgroup v2 limits (the usual case on PaaS providers), the
  limits win over the host's totals.
* :func:`collect_metrics` — the live ``NodeMetrics`` of a heartbeat (spec §3.6): CPU,
  memory and disk percent from psutil, plus the request counters that command
  handlers (and later the replica proxies) keep in :class:`RequestCounters`.

Every percentage is clamped to ``[0, 100]`` and every value is finite: the controller
marks a node *degraded* for an invalid heartbeat, so the agent never sends one.

Example::

    state = MetricsState(data_dir=Path("/var/lib/a67"))
    metrics = collect_metrics(state)          # common_pb2.NodeMetrics
    with state.counters.track() as request:   # one request served by the node
        ...
        request.fail()                        # counts towards error_rate
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from automator67.v1 import common_pb2

GIB = 1024**3
DEFAULT_WINDOW_SECONDS = 60.0
"""``error_rate`` and ``avg_response_time_ms`` cover the requests finished in the last minute."""

DEFAULT_CGROUP_ROOT = Path("/sys/fs/cgroup")
"""Where cgroup v2 limits are read (``cpu.max``, ``memory.max``)."""

NODE_TYPES = ("compute", "database", "storage")
"""The node types a node may offer (``NodeCapabilities.node_types``)."""


# --------------------------------------------------------------------------- counters


@dataclass
class _Bucket:
    second: int
    finished: int = 0
    failed: int = 0
    duration_s: float = 0.0


class RequestTracker:
    """One request in flight; call :meth:`fail` if it failed (before the ``with`` block ends)."""

    __slots__ = ("failed",)

    def __init__(self) -> None:
        self.failed = False

    def fail(self) -> None:
        """Count this request as failed."""
        self.failed = True


class RequestCounters:
    """Active requests now, and failures and durations over a sliding window.

    The window is kept as one bucket per second of the injected monotonic ``clock``,
    so memory stays bounded whatever the request rate.
    """

    def __init__(
        self,
        window_seconds: float = DEFAULT_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window_seconds <= 0:
            raise ValueError(f"window_seconds must be positive, got {window_seconds!r}")
        self.window_seconds = window_seconds
        self._clock = clock
        self._active = 0
        self._buckets: deque[_Bucket] = deque()

    @property
    def active(self) -> int:
        """Requests started and not yet finished."""
        return self._active

    def started(self) -> None:
        """A request began."""
        self._active += 1

    def finished(self, *, ok: bool, duration_s: float) -> None:
        """A request that :meth:`started` ended, successfully or not, after ``duration_s``."""
        self._active = max(0, self._active - 1)
        now = self._clock()
        self._prune(now)
        second = math.floor(now)
        if not self._buckets or self._buckets[-1].second != second:
            self._buckets.append(_Bucket(second))
        bucket = self._buckets[-1]
        bucket.finished += 1
        bucket.failed += 0 if ok else 1
        bucket.duration_s += max(0.0, duration_s) if math.isfinite(duration_s) else 0.0

    @contextmanager
    def track(self) -> Iterator[RequestTracker]:
        """Count one request for the duration of a ``with`` block; an exception counts as a failure."""
        tracker = RequestTracker()
        start = self._clock()
        self.started()
        try:
            yield tracker
        except Exception:
            tracker.failed = True
            raise
        finally:
            self.finished(ok=not tracker.failed, duration_s=self._clock() - start)

    def window(self) -> tuple[int, int, float]:
        """``(finished, failed, total duration in seconds)`` over the window ending now."""
        self._prune(self._clock())
        finished = sum(b.finished for b in self._buckets)
        failed = sum(b.failed for b in self._buckets)
        duration = sum(b.duration_s for b in self._buckets)
        return finished, failed, duration

    def error_rate_percent(self) -> float:
        """Percent of the window's finished requests that failed (0 when there were none)."""
        finished, failed, _ = self.window()
        return 100.0 * failed / finished if finished else 0.0

    def avg_response_time_ms(self) -> float:
        """Mean duration of the window's finished requests, in milliseconds (0 when none)."""
        finished, _, duration = self.window()
        return 1000.0 * duration / finished if finished else 0.0

    def _prune(self, now: float) -> None:
        oldest = math.floor(now - self.window_seconds)
        while self._buckets and self._buckets[0].second <= oldest:
            self._buckets.popleft()


# --------------------------------------------------------------------------- metrics

MIN_CPU_WINDOW_SECONDS = 0.5
"""CPU utilisation is measured over at least this long: a reading over a few milliseconds
(the first heartbeat right after connecting) says more about the agent's own start-up
than about the machine, and would flash the node *busy* for an interval."""


def _cpu_totals(times: Any) -> tuple[float, float]:
    """``(total, busy)`` CPU seconds of a ``psutil.cpu_times()`` sample, as psutil counts them
    (guest time is already in user time on Linux; idle and iowait are not busy)."""
    total = float(sum(times))
    total -= float(getattr(times, "guest", 0.0)) + float(getattr(times, "guest_nice", 0.0))
    busy = total - float(times.idle) - float(getattr(times, "iowait", 0.0))
    return total, busy


class CpuSampler:
    """System-wide CPU percent between readings, like ``psutil.cpu_percent(interval=None)``
    but with its own baseline (no state shared with other psutil users in the process)
    and a minimum window (:data:`MIN_CPU_WINDOW_SECONDS`).

    The baseline is taken at construction (priming). A reading over a window shorter than
    the minimum repeats the previous reading; before there is one, it reports the
    average since boot. Never blocks.
    """

    def __init__(
        self,
        *,
        cpu_times: Callable[[], Any] = psutil.cpu_times,
        clock: Callable[[], float] = time.monotonic,
        min_window_s: float = MIN_CPU_WINDOW_SECONDS,
    ) -> None:
        self._cpu_times = cpu_times
        self._clock = clock
        self._min_window_s = min_window_s
        self._base = (clock(), *_cpu_totals(cpu_times()))
        self._last: float | None = None

    def percent(self) -> float:
        """CPU utilisation (0-100) since the previous reading."""
        now = self._clock()
        total, busy = _cpu_totals(self._cpu_times())
        since, total0, busy0 = self._base
        if now - since < self._min_window_s or total <= total0:
            if self._last is not None:
                return self._last
            return _percent(100.0 * busy / total) if total > 0 else 0.0  # the average since boot
        self._base = (now, total, busy)
        self._last = _percent(100.0 * (busy - busy0) / (total - total0))
        return self._last


def _process_start_time() -> float:
    """When this process started (wall-clock seconds since the epoch)."""
    return float(psutil.Process().create_time())


@dataclass
class MetricsState:
    """What :func:`collect_metrics` needs between calls."""

    data_dir: Path
    """The agent's data directory; ``disk_percent`` is of the filesystem holding it."""
    counters: RequestCounters = field(default_factory=RequestCounters)
    """Request counters the command handlers update."""
    started_at: float = field(default_factory=_process_start_time)
    """When the agent's process started (wall-clock seconds), for ``uptime_seconds``."""
    wall_clock: Callable[[], float] = time.time
    """The wall clock ``uptime_seconds`` is measured with."""
    cpu: CpuSampler = field(default_factory=CpuSampler)
    """The CPU measurement, primed when the state is made."""


def _percent(value: float) -> float:
    """``value`` as a valid percentage: finite and within ``[0, 100]``."""
    if not math.isfinite(value):
        return 0.0
    return min(100.0, max(0.0, float(value)))


def existing_ancestor(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing parent (for ``disk_usage``)."""
    candidate = path.expanduser().absolute()
    while not candidate.exists() and candidate != candidate.parent:
        candidate = candidate.parent
    return candidate


def collect_metrics(state: MetricsState) -> common_pb2.NodeMetrics:
    """The node's live metrics now (spec §3.6), every value finite and every percent in range.

    CPU is the system-wide utilisation since the previous call, over at least
    :data:`MIN_CPU_WINDOW_SECONDS` (see :class:`CpuSampler`; nothing sleeps).
    """
    cpu = state.cpu.percent()
    memory = psutil.virtual_memory().percent
    disk = psutil.disk_usage(str(existing_ancestor(state.data_dir))).percent
    counters = state.counters
    avg_ms = counters.avg_response_time_ms()
    return common_pb2.NodeMetrics(
        cpu_percent=_percent(cpu),
        memory_percent=_percent(memory),
        disk_percent=_percent(disk),
        active_requests=min(counters.active, 2**31 - 1),
        error_rate=_percent(counters.error_rate_percent()),
        avg_response_time_ms=avg_ms if math.isfinite(avg_ms) and avg_ms >= 0 else 0.0,
        uptime_seconds=max(0, int(state.wall_clock() - state.started_at)),
    )


# --------------------------------------------------------------------------- capabilities


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def cgroup_cpu_limit(root: Path = DEFAULT_CGROUP_ROOT) -> float | None:
    """CPUs allowed by cgroup v2 ``cpu.max`` (``"quota period"``), or None when unlimited/unknown."""
    text = _read_text(root / "cpu.max")
    if not text:
        return None
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_memory_limit(root: Path = DEFAULT_CGROUP_ROOT) -> int | None:
    """Bytes allowed by cgroup v2 ``memory.max``, or None when unlimited/unknown."""
    text = _read_text(root / "memory.max")
    if not text or text == "max":
        return None
    try:
        limit = int(text)
    except ValueError:
        return None
    return limit if limit > 0 else None


def logical_cpus() -> int:
    """Logical CPUs this process may run on (its affinity set when the OS tells it)."""
    sched_getaffinity = getattr(os, "sched_getaffinity", None)
    if sched_getaffinity is not None:
        try:
            return max(1, len(sched_getaffinity(0)))
        except OSError:
            pass
    return max(1, psutil.cpu_count(logical=True) or os.cpu_count() or 1)


def measure_capabilities(
    data_dir: Path,
    *,
    bandwidth_mbps: float = 100.0,
    max_concurrent_requests: int = 100,
    node_types: Sequence[str] = ("compute",),
    cgroup_root: Path = DEFAULT_CGROUP_ROOT,
) -> common_pb2.NodeCapabilities:
    """What this machine offers: CPUs, memory and disk (GB = GiB, two decimals), plus the
    operator's declared bandwidth, concurrency and node types.

    ``cpu_cores`` is the number of logical CPUs, lowered to the cgroup v2 CPU quota when
    one is set (it may then be fractional); ``memory_gb`` likewise respects
    ``memory.max``. ``disk_gb`` is the size of the filesystem holding ``data_dir``.
    """
    cpus: float = float(logical_cpus())
    cpu_quota = cgroup_cpu_limit(cgroup_root)
    if cpu_quota is not None:
        cpus = min(cpus, cpu_quota)
    memory = int(psutil.virtual_memory().total)
    memory_limit = cgroup_memory_limit(cgroup_root)
    if memory_limit is not None:
        memory = min(memory, memory_limit)
    disk = int(psutil.disk_usage(str(existing_ancestor(data_dir))).total)
    return common_pb2.NodeCapabilities(
        cpu_cores=round(cpus, 2),
        memory_gb=round(memory / GIB, 2),
        disk_gb=round(disk / GIB, 2),
        network_bandwidth_mbps=float(bandwidth_mbps),
        max_concurrent_requests=int(max_concurrent_requests),
        node_types=list(node_types),
    )
