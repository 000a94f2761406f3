"""Sizes and CPU in a manifest: :func:`parse_size_mb` and :func:`parse_cpu`, and their bounds.

The units and rules are in :mod:`controller.deployments.manifest`, which calls these
for ``resources.memory``, ``resources.storage`` and ``resources.cpu``.
"""

from __future__ import annotations

import re
from decimal import ROUND_CEILING, Decimal, InvalidOperation

MAX_MEMORY_MB = 64 * 1024
"""Largest memory (and storage) a replica may ask for: 64 GB."""

MAX_CPU_CORES = 64.0
"""Most CPU cores a replica may ask for."""

MIN_CPU_CORES = 0.001
"""Fewest CPU cores a replica may ask for (1 millicore); CPU is kept to 3 decimals."""

_SIZE = re.compile(r"(\d{1,12}(?:\.\d{1,6})?|\.\d{1,6})\s*([a-z]*)")
_SIZE_UNITS_MB = {"m": 1, "mb": 1, "mi": 1, "mib": 1, "g": 1024, "gb": 1024, "gi": 1024, "gib": 1024}
_CPU = re.compile(r"(\d{1,6}(?:\.\d{1,6})?|\.\d{1,6})(m?)")
_SIZE_HINT = "must be a size like 512MB, 1GB, 256Mi or 1Gi"


def parse_size_mb(text: str) -> int | str:
    """MB in a size such as ``512MB`` or ``1.5Gi`` (rounded up), or what is wrong with it.

    >>> parse_size_mb("512MB"), parse_size_mb("1gi"), parse_size_mb("1.5 GB"), parse_size_mb("0.1GB")
    (512, 1024, 1536, 103)
    >>> parse_size_mb("512")
    'must have a unit, like 512MB or 1GB'
    """
    match = _SIZE.fullmatch(text.strip().lower())
    if match is None:
        return _SIZE_HINT
    number, unit = match.groups()
    if not unit:
        return "must have a unit, like 512MB or 1GB"
    factor = _SIZE_UNITS_MB.get(unit)
    if factor is None:
        return f"has an unknown unit {unit!r}: use MB, GB, Mi or Gi"
    value = (Decimal(number) * factor).to_integral_value(rounding=ROUND_CEILING)
    if value <= 0:
        return "must be more than 0"
    if value > MAX_MEMORY_MB:
        return f"must be at most 64GB (got {value} MB)"
    return int(value)


def parse_cpu(text: str) -> float | str:
    """CPU cores in ``0.5``, ``2`` or ``500m``, or what is wrong with it.

    >>> parse_cpu("0.5"), parse_cpu("2"), parse_cpu("250m")
    (0.5, 2.0, 0.25)
    """
    match = _CPU.fullmatch(text.strip().lower())
    if match is None:
        return "must be CPU cores like 0.5, 2 or 500m"
    number, milli = match.groups()
    try:
        cores = Decimal(number) / (1000 if milli else 1)
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
        return "must be CPU cores like 0.5, 2 or 500m"
    if cores <= 0:
        return "must be more than 0"
    if cores < Decimal(str(MIN_CPU_CORES)):
        return "must be at least 0.001 (1m)"
    if cores > Decimal(str(MAX_CPU_CORES)):
        return f"must be at most {MAX_CPU_CORES:g} cores"
    return float(round(cores, 3))
