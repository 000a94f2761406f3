"""The agent's reconnect backoff resets after a connection that stayed healthy (issue 11)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from controller.agent.client import STABLE_CONNECTION_SECONDS, Agent, AgentConfig, _SessionEnd, stayed_healthy
from controller.agent.identity import Enrollment


@pytest.mark.parametrize(
    ("end", "interval", "healthy"),
    [
        # The report: connected 11 s at a 30 s interval, then a controller restart.
        pytest.param(_SessionEnd(acked=True, lasted_s=11.0, heartbeats_acked=1), 30.0, True, id="11s-at-30s"),
        pytest.param(
            _SessionEnd(acked=True, lasted_s=0.3, heartbeats_acked=1), 0.2, True, id="one-short-interval"
        ),
        pytest.param(
            _SessionEnd(acked=True, lasted_s=STABLE_CONNECTION_SECONDS, heartbeats_acked=2),
            30.0,
            True,
            id="exactly-5s",
        ),
        pytest.param(_SessionEnd(acked=True, lasted_s=4.9, heartbeats_acked=2), 30.0, False, id="too-short"),
        pytest.param(
            _SessionEnd(acked=True, lasted_s=60.0, heartbeats_acked=0), 30.0, False, id="no-heartbeat-acked"
        ),
        pytest.param(_SessionEnd(acked=False, lasted_s=0.0), 30.0, False, id="never-accepted"),
    ],
)
def test_stayed_healthy(end: _SessionEnd, interval: float, healthy: bool) -> None:
    assert stayed_healthy(end, interval) is healthy


async def test_a_healthy_session_resets_the_delay_to_the_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failures grow the backoff; a healthy session of 11 s brings the next delay back
    under the base (0.5 s). Sessions and sleeps are faked: no clock, no network."""
    agent = Agent(AgentConfig(controller="127.0.0.1:1", data_dir=tmp_path), rng=random.Random(3))
    agent._interval_ms = 30_000
    ends = [_SessionEnd(reason="refused") for _ in range(6)]
    ends.append(_SessionEnd(acked=True, lasted_s=11.0, heartbeats_acked=2))  # then the controller restarts
    ends.append(_SessionEnd(reason="refused"))
    stop = asyncio.Event()
    delays: list[float] = []

    async def session(enrollment: object, stop_event: asyncio.Event) -> _SessionEnd:
        if not ends:
            stop.set()
            return _SessionEnd()
        return ends.pop(0)

    async def sleep(stop_event: asyncio.Event, delay: float) -> bool:
        delays.append(delay)
        return False

    monkeypatch.setattr(agent, "_session", session)
    monkeypatch.setattr("controller.agent.client._sleep_unless_stopped", sleep)
    enrollment = Enrollment.__new__(Enrollment)
    object.__setattr__(enrollment, "controller_endpoint", "127.0.0.1:1")
    object.__setattr__(enrollment, "node_id", "n1")
    await agent._stay_connected(enrollment, stop)
    ceilings_before = [0.5 * 2**n for n in range(6)]
    assert all(d <= c for d, c in zip(delays[:6], ceilings_before, strict=True))
    assert delays[6] <= 0.5  # reset after the healthy session: not the grown 32 s ceiling
    assert delays[7] <= 1.0
