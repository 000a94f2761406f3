"""Reconnect delays: exponential backoff with full jitter (DESIGN.md, decision 2).

The *n*-th retry (``attempt`` counts from 0) waits a delay drawn uniformly from
``[0, min(cap, base * 2**attempt)]`` ("full jitter", as in the AWS Architecture
Blog's *Exponential Backoff and Jitter*): a fleet of nodes that lost the
controller at the same moment spreads its reconnects over the whole window instead
of arriving in waves. Retries go on for ever; :meth:`Backoff.reset` starts again
from ``base`` once a connection has proved itself.

Nothing here sleeps or reads a clock, and the randomness is injected, so tests
replay exactly::

    >>> import random
    >>> backoff = Backoff(rng=random.Random(7))
    >>> [backoff.ceiling(n) for n in (0, 1, 2, 9, 10, 50)]
    [0.5, 1.0, 2.0, 256.0, 300.0, 300.0]
    >>> 0.0 <= backoff.next_delay() <= 0.5 and backoff.attempt == 1
    True
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

DEFAULT_BASE_SECONDS = 0.5
"""The first retry waits up to half a second (DESIGN.md, decision 2)."""

DEFAULT_CAP_SECONDS = 300.0
"""No retry waits more than five minutes (DESIGN.md, decision 2)."""

_MAX_EXPONENT = 1000
"""``2**attempt`` is computed with the exponent clamped here, far past any cap, so that
``base * 2**attempt`` never overflows a float however long the retries go on."""


@dataclass
class Backoff:
    """Exponential backoff with full jitter; one instance per retry loop."""

    base: float = DEFAULT_BASE_SECONDS
    """The ceiling of the first delay, in seconds (> 0)."""
    cap: float = DEFAULT_CAP_SECONDS
    """The largest ceiling, in seconds (>= ``base``)."""
    rng: random.Random = field(default_factory=random.Random, repr=False)
    """The source of jitter; inject a seeded one to replay."""
    attempt: int = 0
    """How many delays have been drawn since the last :meth:`reset`."""

    def __post_init__(self) -> None:
        if not self.base > 0:
            raise ValueError(f"backoff base must be positive, got {self.base!r}")
        if not self.cap >= self.base:
            raise ValueError(f"backoff cap ({self.cap!r}) must be at least its base ({self.base!r})")

    def ceiling(self, attempt: int | None = None) -> float:
        """The largest delay of retry number ``attempt`` (default: the next one)."""
        n = self.attempt if attempt is None else attempt
        if n < 0:
            raise ValueError(f"attempt must be >= 0, got {n}")
        return min(self.cap, self.base * 2.0 ** min(n, _MAX_EXPONENT))

    def next_delay(self) -> float:
        """Draw the delay before the next retry and count the attempt."""
        delay = self.rng.uniform(0.0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Start again from ``base`` (after a connection that worked)."""
        self.attempt = 0
