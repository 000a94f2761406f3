"""The one percentile helper of the benchmarks.

``percentile`` is the nearest-rank percentile (the smallest sample with at least
``q`` % of the samples at or below it), so every figure is a real sample.
``tail`` names the tail honestly: with fewer than 100 samples a p99 is just the
maximum, so it is reported as "max of N" instead.

>>> percentile([1.0, 2.0, 3.0, 4.0], 50)
2.0
>>> tail(list(range(10)))
('max of 10', 9)
>>> tail(list(range(1000)))[0]
'p99'
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Below this many samples p99 is not reported: the maximum is, under its own name.
MIN_SAMPLES_FOR_P99 = 100


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of ``values``; NaN if empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = math.ceil(q / 100 * len(ordered))
    return ordered[min(len(ordered) - 1, max(0, rank - 1))]


def tail(values: Sequence[float]) -> tuple[str, float]:
    """``("p99", p99)``, or ``("max of N", max)`` when there are fewer than 100 samples."""
    if len(values) < MIN_SAMPLES_FOR_P99:
        return f"max of {len(values)}", max(values) if values else float("nan")
    return "p99", percentile(values, 99)


def describe(values: Sequence[float], unit: str = "ms", digits: int = 3) -> str:
    """``p50 … p99 … max …`` (or ``p50 … max of N …``) in one line."""
    name, value = tail(values)
    text = f"p50 {percentile(values, 50):.{digits}f}  {name} {value:.{digits}f}"
    if name == "p99":
        text += f"  max {max(values):.{digits}f}"
    return f"{text} {unit} (n={len(values)})"
