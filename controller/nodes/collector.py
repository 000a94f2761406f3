"""Full garbage collections that do not stop the event loop for seconds.

CPython's cyclic collector scans every tracked object in a full (generation 2)
collection, and runs one whenever the objects promoted to the oldest generation since
the last one exceed a quarter of those that survived it. A controller holding 20,000
node streams tracks millions of objects (gRPC calls, tasks, sessions, health records),
so each full collection blocked the event loop for 2-3.5 s on this machine (measured
with ``BENCH_CONTROLLER_GC_LOG``, see BENCHMARKS.md), delaying every heartbeat ack
behind it; with the fleet growing (nodes connecting) one came every 20-30 s.

:class:`FreezingCollector` freezes the survivors of each full collection
(:func:`gc.freeze`): objects that survived one are long-lived (streams, fleet state),
and later full collections scan only what was promoted since, so their cost follows
the churn, not the size of the fleet. Frozen objects are still freed by reference
counting; what freezing gives up is collecting *cycles* among them, so every
``thaw_seconds`` (default one hour) the next full collection is left to scan
everything once (:func:`gc.unfreeze`): cycles left by closed streams are collected
then, and the process pays one long pause per period instead of one per 25 % of growth.

While installed it also sets the third collection threshold to 0: a full collection
may follow every generation-1 collection (when a quarter of the last one's survivors
have been promoted since, the interpreter's own rule), so each scans only what one
generation-1 collection promoted. Every heartbeat leaves objects that live until the
next one (its health record, the stream's pending read), all promoted: with the default
threshold a full collection came every ~30 s at 19,500 nodes and scanned 30 s of them.

And :meth:`FreezingCollector.run` collects **on a clock** (every
:data:`COLLECT_SECONDS`): the interpreter starts a collection when allocations exceed
deallocations by 700, and a steady fleet allocates about as much as it frees (each
heartbeat's new objects replace the previous heartbeat's), so its young generation
filled with live objects for tens of seconds without a collection, and the next one
(young or full) scanned all of them at once (0.16 to 0.66 s at 19,500 nodes). Collected every
second, each holds one second of heartbeats' objects (a few ms), and the survivors are
frozen at once.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

THAW_SECONDS = 3600.0
"""How often a full collection scans every object (and frees cycles among old ones)."""
COLLECT_SECONDS = 1.0
"""How often :meth:`FreezingCollector.run` runs a full collection (of what is not frozen)."""


class FreezingCollector:
    """Freezes the survivors of every full collection; thaws once per ``thaw_seconds``.

    :meth:`install` registers it as a :data:`gc.callbacks` entry (once per process, however
    many times it is called: the count of installs is kept); :meth:`uninstall` undoes the
    last install and, with the last one, unfreezes everything.
    """

    _installed: FreezingCollector | None = None
    _installs = 0
    _thresholds: tuple[int, int, int] | None = None

    def __init__(
        self, thaw_seconds: float = THAW_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if not thaw_seconds > 0:
            raise ValueError("thaw_seconds must be positive")
        self.thaw_seconds = thaw_seconds
        self.clock = clock
        self._thawed_at = clock()
        self.freezes = 0
        self.thaws = 0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        """The :data:`gc.callbacks` entry: acts at the end of each full collection."""
        if phase != "stop" or info.get("generation") != 2:
            return
        now = self.clock()
        if now - self._thawed_at >= self.thaw_seconds:
            # The next full collection scans everything once: it frees the cycles that
            # frozen objects formed since the last thaw; its survivors are frozen again.
            self._thawed_at = now
            self.thaws += 1
            gc.unfreeze()
            return
        # The young generations were merged into this collection: everything tracked
        # now survived it, and only objects promoted from here on will be scanned.
        self.freezes += 1
        gc.freeze()

    @staticmethod
    async def run(
        period: float = COLLECT_SECONDS, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    ) -> None:
        """Run a full collection every ``period`` seconds until cancelled: with the policy
        installed, it scans only what was allocated since the last one and survived (and
        the callback freezes that); without it, every object (so only with it)."""
        while True:
            await sleep(period)
            if FreezingCollector._installed is not None:
                gc.collect()

    @classmethod
    def install(cls, thaw_seconds: float = THAW_SECONDS) -> FreezingCollector:
        """Register the process's collector policy (or count one more user of it)."""
        if cls._installed is None:
            cls._installed = cls(thaw_seconds)
            gc.callbacks.append(cls._installed)
            cls._thresholds = gc.get_threshold()
            gc.set_threshold(cls._thresholds[0], cls._thresholds[1], 0)
            log.debug("freezing the survivors of full collections (thaw every %gs)", thaw_seconds)
        cls._installs += 1
        return cls._installed

    @classmethod
    def uninstall(cls) -> None:
        """Undo one :meth:`install`; the last one removes the policy and unfreezes."""
        if cls._installed is None:
            return
        cls._installs -= 1
        if cls._installs > 0:
            return
        policy, cls._installed, cls._installs = cls._installed, None, 0
        if policy in gc.callbacks:
            gc.callbacks.remove(policy)
        if cls._thresholds is not None:
            gc.set_threshold(*cls._thresholds)
            cls._thresholds = None
        gc.unfreeze()


__all__ = ["COLLECT_SECONDS", "THAW_SECONDS", "FreezingCollector"]
