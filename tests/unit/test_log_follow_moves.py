"""Which reads a followed log starts when the placement changes (``reads_to_start``): a pure
decision over what is followed and where the replicas are now."""

from __future__ import annotations

import doctest

import pytest

from controller.deployments import logs as logs_module
from controller.deployments.logs import Followed, reads_to_start
from controller.deployments.records import Replica
from controller.deployments.records import ReplicaStatus as S

A_READING = Followed("a", 3, reading=True)
A_ENDED = Followed("a", 3, reading=False)


@pytest.mark.parametrize(
    ("followed", "now", "only", "expected"),
    [
        pytest.param(
            {0: A_READING}, [Replica(0, "a", 3, S.RUNNING)], None, {}, id="still-there-nothing-to-do"
        ),
        pytest.param(
            {0: A_READING},
            [Replica(0, "a", 4, S.RUNNING)],
            None,
            {},
            id="restart-on-same-node-agent-follows-it",
        ),
        pytest.param(
            {0: A_ENDED}, [Replica(0, "b", 4, S.RUNNING)], None, {"b": [0]}, id="moved-after-its-node-failed"
        ),
        pytest.param(
            {0: A_READING}, [Replica(0, "b", 4, S.RUNNING)], None, {"b": [0]}, id="moved-while-old-read-open"
        ),
        pytest.param(
            {0: A_ENDED}, [Replica(0, "b", 4, S.STARTING)], None, {}, id="moved-but-not-running-yet"
        ),
        pytest.param({0: A_ENDED}, [Replica(0, "", 4, S.PENDING)], None, {}, id="not-placed-yet"),
        pytest.param(
            {0: A_ENDED},
            [Replica(0, "a", 4, S.RUNNING)],
            None,
            {"a": [0]},
            id="started-again-where-read-ended",
        ),
        pytest.param(
            {0: A_ENDED}, [Replica(0, "a", 3, S.RUNNING)], None, {}, id="same-generation-no-duplicate-read"
        ),
        pytest.param(
            {0: A_READING},
            [Replica(0, "a", 3, S.RUNNING), Replica(1, "b", 1, S.RUNNING), Replica(2, "b", 1, S.UNHEALTHY)],
            None,
            {"b": [1, 2]},
            id="scaled-up-replicas-joined",
        ),
        pytest.param(
            {0: A_READING},
            [Replica(0, "a", 3, S.RUNNING), Replica(1, "b", 1, S.RUNNING)],
            0,
            {},
            id="one-replica-asked-others-ignored",
        ),
        pytest.param({0: A_READING}, [Replica(0, "b", 1, S.FAILED)], None, {}, id="failed-replica-not-read"),
    ],
)
def test_reads_to_start(
    followed: dict[int, Followed], now: list[Replica], only: int | None, expected: dict[str, list[int]]
) -> None:
    assert reads_to_start(followed, now, only) == expected


def test_docstring_examples() -> None:
    assert doctest.testmod(logs_module).failed == 0
