"""The collector policy: survivors of full collections are frozen; one thaw per period."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from controller.nodes.collector import FreezingCollector


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _restore_gc() -> Iterator[None]:
    yield
    gc.unfreeze()


def test_the_survivors_of_a_full_collection_are_frozen_and_thawed_once_per_period() -> None:
    clock = FakeClock()
    policy = FreezingCollector(thaw_seconds=3600.0, clock=clock)
    kept = [[i] for i in range(1000)]
    policy("start", {"generation": 2})
    policy("stop", {"generation": 1, "collected": 0, "uncollectable": 0})  # not a full one
    assert gc.get_freeze_count() == 0
    policy("stop", {"generation": 2, "collected": 0, "uncollectable": 0})
    assert gc.get_freeze_count() >= len(kept)
    assert (policy.freezes, policy.thaws) == (1, 0)
    clock.now += 3599.0
    policy("stop", {"generation": 2, "collected": 0, "uncollectable": 0})
    assert (policy.freezes, policy.thaws) == (2, 0)
    clock.now += 1.0  # a period since the start: the next full collection scans everything
    policy("stop", {"generation": 2, "collected": 0, "uncollectable": 0})
    assert (policy.freezes, policy.thaws) == (2, 1)
    assert gc.get_freeze_count() == 0
    policy("stop", {"generation": 2, "collected": 0, "uncollectable": 0})
    assert (policy.freezes, policy.thaws) == (3, 1)


class Cyclic:
    me: object


def test_a_cycle_among_frozen_objects_is_collected_after_the_thaw() -> None:
    clock = FakeClock()
    policy = FreezingCollector(thaw_seconds=10.0, clock=clock)
    gc.callbacks.append(policy)
    try:
        cycle = Cyclic()
        cycle.me = cycle
        alive = weakref.ref(cycle)
        gc.collect()  # a full collection: the cycle (still referenced) is frozen after it
        assert policy.freezes == 1
        del cycle  # now garbage, but frozen: full collections no longer see it
        gc.collect()
        assert alive() is not None
        clock.now += 10.0
        gc.collect()  # the thaw: this one unfreezes, the next scans everything
        assert policy.thaws == 1
        gc.collect()
        assert alive() is None
    finally:
        gc.callbacks.remove(policy)


def test_install_is_counted_and_the_last_uninstall_removes_the_policy() -> None:
    thresholds = gc.get_threshold()
    first = FreezingCollector.install()
    second = FreezingCollector.install()
    assert first is second
    assert gc.callbacks.count(first) == 1
    assert gc.get_threshold() == (*thresholds[:2], 0)
    FreezingCollector.uninstall()
    assert first in gc.callbacks
    FreezingCollector.uninstall()
    assert first not in gc.callbacks
    assert gc.get_threshold() == thresholds
    FreezingCollector.uninstall()  # more uninstalls than installs: nothing happens


async def test_run_collects_on_its_clock_while_installed_and_freezes_the_survivors() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) > 3:
            raise asyncio.CancelledError

    policy = FreezingCollector.install()
    try:
        kept = [[i] for i in range(100)]
        freezes = policy.freezes
        with pytest.raises(asyncio.CancelledError):
            await FreezingCollector.run(0.5, sleep)
        assert slept == [0.5] * 4
        assert policy.freezes >= freezes + 3  # a full collection per period (and any automatic one)
        assert gc.get_freeze_count() >= len(kept)
    finally:
        FreezingCollector.uninstall()
