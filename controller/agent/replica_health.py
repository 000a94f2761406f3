"""Health checks of replicas: :func:`http_health_check` and the loop a replica runs
while it lives (:func:`check_health`).

Health timing
=============

With the manifest's ``health_check`` (``path``, ``interval``, ``timeout``, ``retries``):

* **Startup**: ``GET http://127.0.0.1:<port><path>`` every :data:`STARTUP_POLL_SECONDS`
  (0.2 s), each attempt bounded by ``timeout``, from the moment the process starts.
  The replica is healthy at the first answer with status 2xx or 3xx. It has failed
  when no attempt succeeded within the **startup deadline = interval * retries +
  timeout** seconds (the time a running replica may go without a successful check
  before it counts as unhealthy, plus one check), or when the process exits first.
  A replica that fails its startup is stopped (status ``failed``), so it holds no port.
* **Afterwards**: one check every ``interval`` seconds; ``retries`` failed checks in a
  row → ``unhealthy`` (the process keeps running and gets no traffic); the next
  successful check → ``running`` again.
* **No path** (workers): healthy once the process has been alive for
  :data:`WORKER_GRACE_SECONDS` (1 s); afterwards healthy while it runs.
* A process that exits at any time → ``failed``, with its exit code (or signal) and
  the last lines of its log in ``error_message``.

Restart policy: **none on the agent**. A failed or unhealthy replica is reported
(:meth:`~controller.agent.replicas.ReplicaSupervisor.states`) and left as it is; the controller decides whether to start it again
(with a new deploy, here or elsewhere). Restarting locally would hide a crash loop
from the controller and race with its re-placement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from controller.agent.replica_process import _Replica, _with_tail
from controller.agent.replica_spec import FAILED, RUNNING, UNHEALTHY
from controller.deployments.manifest_health import HealthCheckSpec

log = logging.getLogger("controller.agent.replicas")

STARTUP_POLL_SECONDS = 0.2
"""How often the health check is tried while a replica starts."""

WORKER_GRACE_SECONDS = 1.0
"""How long a replica without an HTTP check must stay alive to count as healthy."""


def startup_deadline_seconds(check: HealthCheckSpec) -> float:
    """How long a starting replica has for its first successful health check:
    ``interval * retries + timeout`` seconds (see the module docstring)."""
    return float(check.interval_seconds * check.retries + check.timeout_seconds)


async def http_health_check(
    port: int, path: str, timeout_seconds: float, host: str = "127.0.0.1"
) -> str | None:
    """``GET http://host:port/path`` once: ``None`` when the answer is 2xx or 3xx, else
    why the check failed (``"HTTP 500"``, ``"timed out after 1 s"``, ``"connection refused"``)."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_seconds):
            reader, writer = await asyncio.open_connection(host, port)
            request = (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: a67-agent\r\n"
                "Accept: */*\r\nConnection: close\r\n\r\n"
            )
            writer.write(request.encode("ascii", "replace"))
            await writer.drain()
            status_line = await reader.readline()
    except TimeoutError:
        return f"timed out after {timeout_seconds:g} s"
    except ConnectionRefusedError:
        return "connection refused"
    except OSError as exc:
        return f"connection failed ({exc.strerror or type(exc).__name__})"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(0.5):
                    await writer.wait_closed()
    parts = status_line.decode("latin-1").split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return "not an HTTP answer"
    code = int(parts[1])
    return None if 200 <= code < 400 else f"HTTP {code}"


async def check_health(
    r: _Replica,
    clock: Callable[[], float],
    terminate: Callable[[_Replica, str, str, str], Awaitable[None]],
) -> None:
    """Run ``r``'s health checks while it lives: settle its startup (healthy, or stopped
    with ``terminate`` as ``failed``), then keep its status ``running``/``unhealthy``."""
    check = r.spec.health_check
    if not check.path or not r.port:
        await asyncio.sleep(WORKER_GRACE_SECONDS)
        if r.process.returncode is None and not r.stopping:
            r.status = RUNNING
            r.settle(True)
        return
    deadline_s = startup_deadline_seconds(check)
    deadline = clock() + deadline_s
    attempts = 0
    while True:
        remaining = deadline - clock()
        reason = await http_health_check(r.port, check.path, max(0.05, min(check.timeout_seconds, remaining)))
        attempts += 1
        if reason is None:
            break
        remaining = deadline - clock()
        if remaining <= 0:
            message = _with_tail(
                f"health check failed {attempts} times: GET {check.path} did not succeed within "
                f"{deadline_s:g} s (last: {reason})",
                r.log.tail(),
            )
            await terminate(r, FAILED, message, "unhealthy")
            return
        await asyncio.sleep(min(STARTUP_POLL_SECONDS, remaining))
    r.status = RUNNING
    r.settle(True)
    log.info("replica %s/%d-g%d healthy at %s", *r.key, r.generation, r.endpoint)
    failures = 0
    while True:
        await asyncio.sleep(check.interval_seconds)
        reason = await http_health_check(r.port, check.path, check.timeout_seconds)
        if r.stopping or r.process.returncode is not None:
            return
        if reason is None:
            if r.status == UNHEALTHY:
                log.info("replica %s/%d-g%d is healthy again", *r.key, r.generation)
            failures = 0
            r.status = RUNNING
            r.error_message = ""
            continue
        failures += 1
        if failures >= check.retries:
            if r.status == RUNNING:
                log.warning("replica %s/%d-g%d is unhealthy: %s", *r.key, r.generation, reason)
            r.status = UNHEALTHY
            r.error_message = f"health check failed {failures} times in a row (last: {reason})"
