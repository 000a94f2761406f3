"""Capabilities and live metrics from psutil: types, ranges, cgroup limits, request counters."""

from __future__ import annotations

import math
from collections import namedtuple
from pathlib import Path

import psutil
import pytest
from automator67.v1 import common_pb2

from controller.agent.metrics import (
    CpuSampler,
    MetricsState,
    RequestCounters,
    cgroup_cpu_limit,
    cgroup_memory_limit,
    collect_metrics,
    existing_ancestor,
    logical_cpus,
    measure_capabilities,
)

GIB = 1024**3


def test_collect_metrics_gives_valid_values(tmp_path: Path) -> None:
    state = MetricsState(data_dir=tmp_path)
    for _ in range(2):  # the first reading (before the minimum window) and a later one
        metrics = collect_metrics(state)
        assert isinstance(metrics, common_pb2.NodeMetrics)
        for percent in (
            metrics.cpu_percent,
            metrics.memory_percent,
            metrics.disk_percent,
            metrics.error_rate,
        ):
            assert isinstance(percent, float)
            assert math.isfinite(percent)
            assert 0.0 <= percent <= 100.0
        assert metrics.memory_percent > 0.0
        assert metrics.disk_percent > 0.0
        assert metrics.memory_percent == pytest.approx(psutil.virtual_memory().percent, abs=10)
        assert metrics.disk_percent == pytest.approx(psutil.disk_usage(str(tmp_path)).percent, abs=5)
        assert isinstance(metrics.active_requests, int)
        assert metrics.active_requests == 0
        assert metrics.error_rate == 0.0
        assert metrics.avg_response_time_ms == 0.0
        assert isinstance(metrics.uptime_seconds, int)
        assert metrics.uptime_seconds >= 0
        state.cpu = CpuSampler(min_window_s=0.0)


CpuTimes = namedtuple("CpuTimes", "user nice system idle iowait guest guest_nice")


class FakeCpu:
    """``psutil.cpu_times()`` and a monotonic clock, both advanced by hand."""

    def __init__(self) -> None:
        self.now = 0.0
        self.busy = 600.0
        self.idle = 400.0  # since boot: 60 % busy

    def run(self, seconds: float, busy_fraction: float) -> None:
        self.now += seconds
        self.busy += seconds * busy_fraction
        self.idle += seconds * (1 - busy_fraction)

    def times(self) -> CpuTimes:
        # iowait counts as idle; guest time is part of user time and must not count twice.
        return CpuTimes(
            user=self.busy, nice=0.0, system=0.0, idle=self.idle, iowait=0.0, guest=5.0, guest_nice=0.0
        )


def test_cpu_sampler_measures_over_a_minimum_window() -> None:
    cpu = FakeCpu()
    sampler = CpuSampler(cpu_times=cpu.times, clock=lambda: cpu.now, min_window_s=0.5)
    cpu.run(0.01, 1.0)  # the agent's own start-up: 10 ms at 100 %
    assert sampler.percent() == pytest.approx(100 * 600.01 / 1000.01, abs=0.01)  # since boot, not 100
    cpu.run(1.0, 0.25)
    assert sampler.percent() == pytest.approx(100 * 0.26 / 1.01, abs=0.01)
    cpu.run(0.1, 1.0)  # too short a window: the previous reading stands
    assert sampler.percent() == pytest.approx(100 * 0.26 / 1.01, abs=0.01)
    cpu.run(0.9, 0.0)
    assert sampler.percent() == pytest.approx(10.0)


def test_cpu_sampler_survives_a_clock_without_cpu_time() -> None:
    cpu = FakeCpu()
    sampler = CpuSampler(cpu_times=cpu.times, clock=lambda: cpu.now, min_window_s=0.5)
    cpu.now += 1.0  # time passed but the counters did not move
    assert 0.0 <= sampler.percent() <= 100.0


def test_uptime_counts_from_process_start(tmp_path: Path) -> None:
    state = MetricsState(data_dir=tmp_path, started_at=1000.0, wall_clock=lambda: 1090.7)
    assert collect_metrics(state).uptime_seconds == 90
    default = MetricsState(data_dir=tmp_path)
    assert default.started_at == pytest.approx(psutil.Process().create_time())


def test_metrics_carry_the_request_counters(tmp_path: Path) -> None:
    now = [0.0]
    counters = RequestCounters(clock=lambda: now[0])
    state = MetricsState(data_dir=tmp_path, counters=counters)
    for index in range(4):
        counters.started()
        now[0] += 0.1
        counters.finished(ok=index != 0, duration_s=0.1)
    counters.started()  # one still running
    metrics = collect_metrics(state)
    assert metrics.active_requests == 1
    assert metrics.error_rate == 25.0
    assert metrics.avg_response_time_ms == pytest.approx(100.0)


def test_disk_of_a_data_dir_not_created_yet(tmp_path: Path) -> None:
    missing = tmp_path / "not" / "yet"
    assert existing_ancestor(missing) == tmp_path
    assert 0.0 <= collect_metrics(MetricsState(data_dir=missing)).disk_percent <= 100.0


def test_error_rate_is_over_a_sliding_window() -> None:
    now = [1000.0]
    counters = RequestCounters(window_seconds=10, clock=lambda: now[0])
    counters.started()
    counters.finished(ok=False, duration_s=2.0)
    now[0] += 5
    counters.started()
    counters.finished(ok=True, duration_s=1.0)
    assert counters.error_rate_percent() == 50.0
    assert counters.avg_response_time_ms() == pytest.approx(1500.0)
    now[0] += 6  # the failure is 11 s old: out of the window
    assert counters.error_rate_percent() == 0.0
    assert counters.window() == (1, 0, 1.0)
    now[0] += 60
    assert counters.window() == (0, 0, 0.0)
    assert counters.error_rate_percent() == 0.0
    assert counters.avg_response_time_ms() == 0.0


def test_track_counts_exceptions_and_fail_calls_as_failures() -> None:
    now = [0.0]
    counters = RequestCounters(clock=lambda: now[0])
    with counters.track():
        assert counters.active == 1
        now[0] += 0.5
    with counters.track() as request:
        request.fail()
    with pytest.raises(ValueError, match="bad"), counters.track():
        raise ValueError("bad")
    assert counters.active == 0
    finished, failed, duration = counters.window()
    assert (finished, failed, duration) == (3, 2, 0.5)


def test_counters_memory_stays_bounded() -> None:
    now = [0.0]
    counters = RequestCounters(window_seconds=5, clock=lambda: now[0])
    for _ in range(10_000):
        counters.started()
        counters.finished(ok=True, duration_s=0.001)
        now[0] += 0.01
    assert len(counters._buckets) <= 6


def test_counters_refuse_a_bad_window() -> None:
    with pytest.raises(ValueError, match="window"):
        RequestCounters(window_seconds=0)


def test_capabilities_are_measured(tmp_path: Path) -> None:
    caps = measure_capabilities(
        tmp_path,
        bandwidth_mbps=250,
        max_concurrent_requests=40,
        node_types=["compute", "storage"],
        cgroup_root=tmp_path / "no-cgroup",
    )
    assert isinstance(caps, common_pb2.NodeCapabilities)
    assert caps.cpu_cores == logical_cpus() >= 1
    assert caps.memory_gb == pytest.approx(psutil.virtual_memory().total / GIB, abs=0.01)
    assert caps.disk_gb == pytest.approx(psutil.disk_usage(str(tmp_path)).total / GIB, abs=0.01)
    assert caps.network_bandwidth_mbps == 250.0
    assert caps.max_concurrent_requests == 40
    assert list(caps.node_types) == ["compute", "storage"]


def test_capabilities_respect_cgroup_limits(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    (tmp_path / "memory.max").write_text(f"{GIB // 2}\n")
    caps = measure_capabilities(tmp_path, cgroup_root=tmp_path)
    assert caps.cpu_cores == 0.5
    assert caps.memory_gb == 0.5


@pytest.mark.parametrize(
    ("cpu_max", "memory_max", "cpus", "memory"),
    [
        pytest.param("max 100000", "max", None, None, id="unlimited"),
        pytest.param("200000 100000", "1073741824", 2.0, GIB, id="two-cpus-one-gib"),
        pytest.param("garbage", "garbage", None, None, id="unparseable"),
        pytest.param(None, None, None, None, id="no-files"),
    ],
)
def test_cgroup_limit_parsing(
    tmp_path: Path, cpu_max: str | None, memory_max: str | None, cpus: float | None, memory: int | None
) -> None:
    if cpu_max is not None:
        (tmp_path / "cpu.max").write_text(cpu_max)
    if memory_max is not None:
        (tmp_path / "memory.max").write_text(memory_max)
    assert cgroup_cpu_limit(tmp_path) == cpus
    assert cgroup_memory_limit(tmp_path) == memory
