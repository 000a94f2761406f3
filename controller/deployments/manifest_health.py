"""Health checks in a manifest: :class:`HealthCheckSpec`, its defaults and bounds, and their validation.

The rules are in :mod:`controller.deployments.manifest`; the agent runs the
checks a :class:`HealthCheckSpec` describes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from automator67.v1 import deployment_pb2

from controller.errors import FieldViolation

DEFAULT_HEALTH_PATH = "/health"
"""The HTTP health check path of a backend app that names none."""

MAX_HEALTH_PATH_CHARS = 256
HEALTH_PATH_PATTERN = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@%/?]*")
"""An absolute URL path with an optional query: RFC 3986 path and query characters."""

DEFAULT_INTERVAL_SECONDS = 10
MIN_INTERVAL_SECONDS = 2
MAX_INTERVAL_SECONDS = 300
DEFAULT_TIMEOUT_SECONDS = 2
MIN_TIMEOUT_SECONDS = 1
MAX_TIMEOUT_SECONDS = 60
DEFAULT_RETRIES = 3
MIN_RETRIES = 1
MAX_RETRIES = 10


@dataclass(frozen=True, slots=True)
class HealthCheckSpec:
    """How the agent checks a replica, defaults filled in."""

    path: str
    """HTTP GET path; empty means no HTTP check (healthy while the process runs)."""
    interval_seconds: int
    timeout_seconds: int
    retries: int
    """Failed checks in a row before the replica counts as unhealthy."""


def _bounded(
    value: int, default: int, low: int, high: int, where: str, violations: list[FieldViolation]
) -> int:
    if value == 0:
        return default
    if not low <= value <= high:
        violations.append(FieldViolation(where, f"must be between {low} and {high} (got {value})"))
    return value


def _validate_health(
    check: deployment_pb2.HealthCheck, app_type: str | None, violations: list[FieldViolation]
) -> HealthCheckSpec:
    prefix = "manifest.health_check"
    path = check.path.strip()
    if not path:
        path = "" if app_type == "worker" else DEFAULT_HEALTH_PATH
    elif len(path) > MAX_HEALTH_PATH_CHARS:
        violations.append(
            FieldViolation(f"{prefix}.path", f"must be at most {MAX_HEALTH_PATH_CHARS} characters")
        )
    elif not path.startswith("/"):
        violations.append(FieldViolation(f"{prefix}.path", "must start with '/', like /health"))
    elif not HEALTH_PATH_PATTERN.fullmatch(path):
        violations.append(FieldViolation(f"{prefix}.path", "must contain only URL path characters"))
    interval = _bounded(
        check.interval_seconds,
        DEFAULT_INTERVAL_SECONDS,
        MIN_INTERVAL_SECONDS,
        MAX_INTERVAL_SECONDS,
        f"{prefix}.interval_seconds",
        violations,
    )
    timeout = _bounded(
        check.timeout_seconds,
        DEFAULT_TIMEOUT_SECONDS,
        MIN_TIMEOUT_SECONDS,
        MAX_TIMEOUT_SECONDS,
        f"{prefix}.timeout_seconds",
        violations,
    )
    if (
        MIN_TIMEOUT_SECONDS <= timeout <= MAX_TIMEOUT_SECONDS
        and MIN_INTERVAL_SECONDS <= interval <= MAX_INTERVAL_SECONDS
        and timeout >= interval
    ):
        violations.append(
            FieldViolation(
                f"{prefix}.timeout_seconds", f"must be less than interval_seconds ({interval}), got {timeout}"
            )
        )
    retries = _bounded(
        check.retries, DEFAULT_RETRIES, MIN_RETRIES, MAX_RETRIES, f"{prefix}.retries", violations
    )
    return HealthCheckSpec(path=path, interval_seconds=interval, timeout_seconds=timeout, retries=retries)
