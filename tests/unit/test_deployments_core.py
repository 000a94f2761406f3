"""Table tests of the pure deployments core: every decision on an injected clock, no I/O.

Each case builds a :class:`DeploymentView` (a snapshot of one deployment), calls one
decision with an explicit ``now`` and checks the plan: the store changes, the
commands, the reason. Nothing here sleeps, reads a store or opens a stream.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from controller.deployments import decide, fencing, versions
from controller.deployments.alerts import ROLLOUT_FAILED
from controller.deployments.fencing import Failure, HealthChange, Reported
from controller.deployments.plans import Stop
from controller.deployments.records import (
    DeploymentStatus,
    DeploymentView,
    Replica,
    ReplicaStatus,
    draining_of,
    surging_of,
    with_draining,
    without_draining,
)
from controller.errors import FailedPrecondition
from controller.nodes.health import NodeState

D = DeploymentStatus
R = ReplicaStatus
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
DEP = "d1"


def rep(index: int, status: R, node: str = "", generation: int = 0, **more: Any) -> Replica:
    return Replica(
        replica_index=index,
        node_id=node or f"n{index}",
        generation=generation or index + 1,
        status=status,
        **more,
    )


def view(
    status: D,
    *replicas: Replica,
    desired: int | None = None,
    meta: dict[str, Any] | None = None,
    deployed_at: datetime | None = None,
) -> DeploymentView:
    return DeploymentView(
        id=DEP,
        user_id="u1",
        name="web",
        status=status,
        desired_replicas=len(replicas) if desired is None else desired,
        replicas=tuple(replicas),
        meta={"generation": 10, "version": 1, **(meta or {})},
        deployed_at=deployed_at,
    )


def statuses(replicas: tuple[Replica, ...] | None) -> list[str]:
    assert replicas is not None
    return [r.status.value for r in replicas]


# -- records -----------------------------------------------------------------------------------


def test_statuses_are_the_stored_strings() -> None:
    assert D.RUNNING == "running"
    assert R.UNHEALTHY == "unhealthy"
    stored = {"replica_index": 1, "node_id": "n", "generation": 3, "status": "lost"}
    replica = Replica.from_dict(stored)
    assert replica.status is R.LOST
    assert replica.to_dict() == {**stored, "endpoint": "", "error_message": "", "started_at": None}
    assert Replica.from_dict({**stored, "version": 2}).to_dict()["version"] == 2


# -- rollout -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "initial", "expected"),
    [
        (D.PENDING, True, D.DEPLOYING),
        (D.PENDING, False, None),
        (D.SCALING, False, None),
        (D.RUNNING, True, None),
    ],
)
def test_start_rollout(status: D, initial: bool, expected: D | None) -> None:
    plan = decide.start_rollout(view(status, rep(0, R.PENDING)), initial=initial)
    assert (plan.status if plan else None) == expected


@pytest.mark.parametrize(
    ("case", "replicas", "initial", "atomic", "timed_out", "status", "after", "stopped", "alert"),
    [
        pytest.param(
            "all up",
            [rep(0, R.RUNNING, endpoint="e0"), rep(1, R.RUNNING, endpoint="e1")],
            True,
            False,
            [],
            D.RUNNING,
            ["running", "running"],
            [],
            "",
            id="all-running",
        ),
        pytest.param(
            "best effort, one failed",
            [rep(0, R.RUNNING), rep(1, R.FAILED, error_message="boom")],
            True,
            False,
            [],
            D.RUNNING,
            ["running", "failed"],
            [],
            "",
            id="best-effort-degraded",
        ),
        pytest.param(
            "atomic, one failed: rolled back",
            [rep(0, R.RUNNING), rep(1, R.FAILED, error_message="boom")],
            True,
            True,
            [],
            D.FAILED,
            ["stopped", "failed"],
            [0],
            ROLLOUT_FAILED,
            id="atomic-rolls-back",
        ),
        pytest.param(
            "none up: rolled back",
            [rep(0, R.FAILED), rep(1, R.STARTING)],
            True,
            False,
            [1],
            D.FAILED,
            ["failed", "failed"],
            [1],
            ROLLOUT_FAILED,
            id="initial-none-running-fails",
        ),
        pytest.param(
            "not initial, none up: failing",
            [rep(0, R.FAILED), rep(1, R.PENDING)],
            False,
            False,
            [1],
            D.FAILING,
            ["failed", "failed"],
            [1],
            "",
            id="scale-none-running-failing",
        ),
    ],
)
def test_finish_rollout(
    case: str,
    replicas: list[Replica],
    initial: bool,
    atomic: bool,
    timed_out: list[int],
    status: D,
    after: list[str],
    stopped: list[int],
    alert: str,
) -> None:
    v = view(D.DEPLOYING, *replicas, meta={"atomic": atomic})
    plan = decide.finish_rollout(v, [0, 1], timed_out, initial=initial, now=NOW)
    assert plan.status == status, case
    assert statuses(plan.replicas) == after
    assert sorted(s.replica_index for s in plan.stops) == stopped
    assert plan.alert == alert
    assert plan.meta is not None
    assert plan.meta["message"] == plan.reason
    assert plan.deployed_at == (NOW if status == D.RUNNING else None)


def test_finish_rollout_names_why_replicas_are_missing() -> None:
    v = view(D.DEPLOYING, rep(0, R.RUNNING), rep(1, R.STARTING), desired=2)
    plan = decide.finish_rollout(v, [0, 1], [1], initial=True, now=NOW)
    assert plan.reason == (
        "1 of 2 replicas running (the reconciler keeps trying: "
        "replica 1: rollout deadline passed before the replica was healthy)"
    )
    assert plan.stops == (Stop("n1", DEP, 1, 2),)


def test_finish_rollout_keeps_the_first_deployed_at() -> None:
    earlier = datetime(2026, 1, 1, tzinfo=UTC)
    plan = decide.finish_rollout(
        view(D.SCALING, rep(0, R.RUNNING), deployed_at=earlier), [0], [], initial=False, now=NOW
    )
    assert plan.deployed_at is None


# -- one replica's attempts (retry elsewhere) -------------------------------------------------


@pytest.mark.parametrize(
    ("status", "replica", "attempt"),
    [
        (D.DEPLOYING, R.PENDING, True),
        (D.RUNNING, R.FAILED, True),
        (D.RUNNING, R.LOST, True),
        (D.RUNNING, R.RUNNING, False),
        (D.RUNNING, R.UNHEALTHY, False),
        (D.FAILED, R.FAILED, False),
        (D.STOPPED, R.PENDING, False),
    ],
)
def test_to_attempt(status: D, replica: R, attempt: bool) -> None:
    assert (decide.to_attempt(view(status, rep(0, replica)), 0) is not None) == attempt
    assert decide.to_attempt(view(status, rep(0, replica)), 5) is None


@pytest.mark.parametrize(
    ("replica", "node", "generation", "meta_generation"),
    [
        pytest.param(rep(0, R.PENDING, "a", 3), "a", 3, 10, id="pending-on-its-node-keeps-generation"),
        pytest.param(rep(0, R.PENDING, "a", 3), "b", 11, 11, id="moved-takes-next-generation"),
        pytest.param(rep(0, R.FAILED, "a", 3), "a", 11, 11, id="retry-takes-next-generation"),
    ],
)
def test_start_attempt_fences_every_new_attempt(
    replica: Replica, node: str, generation: int, meta_generation: int
) -> None:
    plan, got = decide.start_attempt(view(D.RUNNING, replica, meta={"version": 4}), 0, node)
    assert got == generation
    assert plan.meta is not None
    assert plan.meta["generation"] == meta_generation
    assert plan.replicas == (Replica(0, node, generation, R.STARTING, version=4),)
    assert plan.event_replica == plan.replicas[0]


@pytest.mark.parametrize(
    ("previous", "expected"),
    [("", "no room"), ("node a: crashed", "node a: crashed; no other node: no room")],
)
def test_cannot_place_fails_the_replica_with_why(previous: str, expected: str) -> None:
    plan = decide.cannot_place(view(D.RUNNING, rep(0, R.FAILED, error_message=previous)), 0, "no room")
    assert plan is not None
    assert plan.replicas is not None
    assert plan.replicas[0].status == R.FAILED
    assert plan.replicas[0].error_message == expected


@pytest.mark.parametrize(
    ("status", "deployed_at", "new_status", "new_deployed_at"),
    [
        (D.FAILING, None, D.RUNNING, NOW),
        (D.RUNNING, datetime(2026, 1, 1, tzinfo=UTC), D.RUNNING, None),
        (D.DEPLOYING, None, None, None),  # the rollout decides when it ends
    ],
)
def test_mark_running(
    status: D, deployed_at: datetime | None, new_status: D | None, new_deployed_at: datetime | None
) -> None:
    v = view(status, rep(0, R.STARTING, "a", 5), deployed_at=deployed_at)
    plan = decide.mark_running(v, 0, "a", 5, "http://a:1", NOW)
    assert plan is not None
    assert plan.replicas is not None
    assert plan.replicas[0] == rep(0, R.RUNNING, "a", 5, endpoint="http://a:1", started_at=NOW.isoformat())
    assert (plan.status, plan.deployed_at) == (new_status, new_deployed_at)


@pytest.mark.parametrize(("node", "generation"), [("b", 5), ("a", 4), ("a", 6)])
def test_writes_of_a_stale_attempt_are_fenced(node: str, generation: int) -> None:
    v = view(D.RUNNING, rep(0, R.STARTING, "a", 5))
    assert decide.mark_running(v, 0, node, generation, "e", NOW) is None
    assert decide.mark_failed(v, 0, node, generation, "x") is None
    assert decide.set_health(v, 0, node, generation, R.UNHEALTHY, "") is None


@pytest.mark.parametrize(
    ("before", "reported", "endpoint", "kept"),
    [
        (R.RUNNING, R.UNHEALTHY, "", "http://old"),
        (R.UNHEALTHY, R.RUNNING, "http://new", "http://new"),
    ],
)
def test_set_health(before: R, reported: R, endpoint: str, kept: str) -> None:
    v = view(D.RUNNING, rep(0, before, "a", 5, endpoint="http://old"))
    plan = decide.set_health(v, 0, "a", 5, reported, endpoint)
    assert plan is not None
    assert plan.replicas is not None
    assert (plan.replicas[0].status, plan.replicas[0].endpoint) == (reported, kept)
    assert plan.reason == f"replica 0 is {reported.value}"


def test_retry_backoff_doubles_from_one_second_to_a_minute_and_is_stored() -> None:
    v = view(D.RUNNING, rep(0, R.FAILED, "a"), rep(1, R.RUNNING, "b"))
    delays = []
    for _ in range(9):
        plan = decide.backoff(v, 0, NOW)
        assert plan is not None
        assert plan.replicas is not None
        v = replace(v, replicas=plan.replicas)
        failed = v.replica(0)
        assert failed is not None
        delays.append(failed.retry_delay)
        assert failed.retry_at == (NOW + timedelta(seconds=failed.retry_delay)).isoformat()
        # in the record every controller reads
        assert Replica.from_dict(failed.to_dict()) == failed
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert v.replica(1) == rep(1, R.RUNNING, "b")
    assert decide.backoff(v, 7, NOW) is None


def test_running_clears_the_backoff() -> None:
    v = view(D.RUNNING, rep(0, R.STARTING, "a", 5))
    failed = decide.backoff(v, 0, NOW)
    assert failed is not None
    assert failed.replicas is not None
    plan = decide.mark_running(replace(v, replicas=failed.replicas), 0, "a", 5, "http://x", NOW)
    assert plan is not None
    assert plan.replicas is not None
    assert (plan.replicas[0].retry_at, plan.replicas[0].retry_delay) == (None, 0.0)
    assert "retry_at" not in plan.replicas[0].to_dict()


# -- settle ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "replicas", "rolling", "expected", "reason"),
    [
        (D.FAILING, [R.RUNNING, R.FAILED], False, D.RUNNING, "1 of 2 replicas running"),
        (D.RUNNING, [R.LOST, R.FAILED], False, D.FAILING, "0 of 2 replicas running"),
        (D.SCALING, [R.RUNNING, R.RUNNING], False, D.RUNNING, "2 of 2 replicas running"),
        (D.RUNNING, [R.RUNNING, R.FAILED], False, None, "1 of 2 replicas running"),  # no change, told
        (D.RUNNING, [R.LOST, R.FAILED], True, None, None),  # a rollout in progress decides
        (D.DEPLOYING, [R.RUNNING], False, None, None),
        (D.FAILED, [R.STOPPED], False, None, None),
    ],
)
def test_settle(status: D, replicas: list[R], rolling: bool, expected: D | None, reason: str | None) -> None:
    plan = decide.settle(view(status, *(rep(i, s) for i, s in enumerate(replicas))), rolling=rolling)
    assert (plan.reason if plan else None) == reason
    assert (plan.status if plan else None) == expected


# -- scale -------------------------------------------------------------------------------------


def test_scale_up_adds_pending_replicas_with_new_generations() -> None:
    v = view(D.RUNNING, rep(0, R.RUNNING), desired=1)
    plan = decide.scale(v, 3, ["b", "c"], NOW)
    assert plan.status == D.SCALING
    assert plan.replicas is not None
    assert [(r.replica_index, r.node_id, r.generation, r.status) for r in plan.replicas[1:]] == [
        (1, "b", 11, R.PENDING),
        (2, "c", 12, R.PENDING),
    ]
    assert plan.meta is not None
    assert plan.meta["generation"] == 12
    assert plan.rollout == (1, 2)
    assert (plan.desired_replicas, plan.last_scaled_at) == (3, NOW)
    assert plan.reason == "scaling from 1 to 3 replicas"
    assert plan.drains == ()


@pytest.mark.parametrize(
    ("status", "expected"), [(D.FAILED, D.SCALING), (D.FAILING, D.SCALING), (D.DEPLOYING, None)]
)
def test_scale_up_status(status: D, expected: D | None) -> None:
    assert decide.scale(view(status, rep(0, R.FAILED), desired=1), 2, ["b"], NOW).status == expected


def test_scale_down_drains_the_highest_active_replicas() -> None:
    v = view(D.RUNNING, rep(0, R.RUNNING), rep(1, R.RUNNING), rep(2, R.FAILED), rep(3, R.UNHEALTHY))
    plan = decide.scale(v, 1, [], NOW)
    assert statuses(plan.replicas) == ["running"]
    assert [r.replica_index for r in plan.drains] == [1, 3]  # the failed one holds nothing
    assert plan.status is None
    assert plan.rollout == ()
    assert plan.desired_replicas == 1


# -- recovery ----------------------------------------------------------------------------------


def test_a_failed_nodes_serving_replicas_are_lost_unless_in_flight() -> None:
    v = view(
        D.RUNNING,
        rep(0, R.RUNNING, "x"),
        rep(1, R.UNHEALTHY, "x"),
        rep(2, R.STARTING, "x"),
        rep(3, R.RUNNING, "x"),
        rep(4, R.RUNNING, "y"),
    )
    assert decide.lost_replicas(v, "x", inflight={3}) == [0, 1]


@pytest.mark.parametrize(
    ("others", "status", "expected"),
    [([R.RUNNING], D.RUNNING, None), ([], D.RUNNING, D.FAILING), ([], D.SCALING, None)],
)
def test_drop_lost(others: list[R], status: D, expected: D | None) -> None:
    v = view(
        status, rep(0, R.RUNNING, "x", endpoint="e"), *(rep(i + 1, s, "y") for i, s in enumerate(others))
    )
    plan = decide.drop_lost(v, "x", [0])
    assert plan.replicas is not None
    assert plan.replicas[0] == rep(0, R.LOST, "x", error_message="node x failed")
    assert plan.status == expected
    assert plan.reason == "node x failed: re-placing 1 replica(s)"


def test_recovery_rate_limit_burst_then_rate_per_user() -> None:
    now = 50.0
    slots: dict[str, float] = {}
    waits = []
    for _ in range(13):
        wait, slots["u1"] = decide.recovery_wait(slots.get("u1"), now, rate=5.0, burst=10)
        waits.append(wait)
    assert waits[:10] == [0.0] * 10
    assert waits[10:] == pytest.approx([0.2, 0.4, 0.6])
    # the bucket refills with time: 1 s later five more go at once... after the queued ones
    wait, _ = decide.recovery_wait(slots["u1"], now + 10.0, rate=5.0, burst=10)
    assert wait == 0.0
    assert decide.recovery_wait(None, now, rate=5.0)[0] == 0.0  # another user


# -- reconcile ---------------------------------------------------------------------------------

UP = decide.NodeFact(NodeState.READY, connected=True)
AWAY = decide.NodeFact(NodeState.SUSPECT, connected=False)
FAILED_DUE = decide.NodeFact(NodeState.FAILED, connected=False, recovery_due=True)
FAILED_HELD = decide.NodeFact(NodeState.FAILED, connected=False, recovery_due=False)
REMOVED = decide.NodeFact(NodeState.REMOVED)


@pytest.mark.parametrize(
    ("status", "replicas", "nodes", "expected"),
    [
        pytest.param(
            D.DEPLOYING,
            [rep(0, R.RUNNING, "a"), rep(1, R.STARTING, "b")],
            {"a": UP, "b": UP},
            decide.Reconcile(resume=(1,), initial=True),
            id="interrupted-rollout-resumes",
        ),
        pytest.param(
            D.SCALING,
            [rep(0, R.RUNNING, "a"), rep(1, R.PENDING, "b")],
            {"a": UP, "b": UP},
            decide.Reconcile(resume=(1,), initial=False),
            id="interrupted-scale-resumes-not-initial",
        ),
        pytest.param(
            D.PENDING,
            [rep(0, R.PENDING, "a")],
            {"a": AWAY},
            decide.Reconcile(),
            id="rollout-waits-for-its-node-to-reconnect",
        ),
        pytest.param(
            D.RUNNING,
            [rep(0, R.RUNNING, "a"), rep(1, R.FAILED, "b"), rep(2, R.LOST, "c")],
            {"a": UP, "b": UP},
            decide.Reconcile(retry=(1, 2)),
            id="failed-and-lost-retried",
        ),
        pytest.param(
            D.RUNNING,
            [rep(0, R.STARTING, "a"), rep(1, R.PENDING, "b")],
            {"a": AWAY, "b": FAILED_HELD},
            decide.Reconcile(retry=(1,)),
            id="pending-waits-for-a-suspect-node-not-a-failed-one",
        ),
        pytest.param(
            D.RUNNING,
            [rep(0, R.RUNNING, "a"), rep(1, R.RUNNING, "b"), rep(2, R.UNHEALTHY, "c")],
            {"a": FAILED_DUE, "b": FAILED_HELD, "c": REMOVED},
            decide.Reconcile(failed_nodes=frozenset({"a", "c"})),
            id="missed-failures-but-not-frozen-ones",
        ),
        pytest.param(D.FAILED, [rep(0, R.FAILED)], {}, decide.Reconcile(), id="failed-left-alone"),
    ],
)
def test_reconcile(
    status: D, replicas: list[Replica], nodes: dict[str, decide.NodeFact], expected: decide.Reconcile
) -> None:
    assert decide.reconcile(view(status, *replicas), now=NOW, inflight=(), nodes=nodes) == expected


@pytest.mark.parametrize(("after", "retried"), [(-0.1, ()), (0.0, (0,)), (1.0, (0,))])
def test_reconcile_waits_out_the_stored_retry_backoff(after: float, retried: tuple[int, ...]) -> None:
    due = NOW + timedelta(seconds=10)
    failed = replace(rep(0, R.FAILED, "a"), retry_at=due.isoformat(), retry_delay=8.0)
    v = view(D.RUNNING, failed, rep(1, R.FAILED, "a"))
    got = decide.reconcile(v, now=due + timedelta(seconds=after), inflight={1}, nodes={"a": UP})
    assert got.retry == retried  # and 1 is in flight already


# -- fencing -----------------------------------------------------------------------------------


def known(*replicas: Replica) -> dict[str, dict[int, Replica]]:
    return {DEP: {r.replica_index: r for r in replicas}}


def fence(
    reported: list[Reported],
    assignments: dict[str, dict[int, Replica]],
    *,
    complete: bool = False,
    surging: dict[tuple[str, int], tuple[str, int]] | None = None,
    draining: set[tuple[str, str, int, int]] | None = None,
    sent: dict[tuple[str, str, int, int], float] | None = None,
    now: float = 100.0,
) -> fencing.FencePlan:
    return fencing.fence(
        "a",
        reported,
        complete=complete,
        assignments=assignments,
        surging=surging or {},
        draining=draining or set(),
        sent=sent or {},
        now=now,
    )


@pytest.mark.parametrize(
    ("case", "assigned", "reported", "stopped"),
    [
        ("the assignment", rep(0, R.RUNNING, "a", 5), Reported(DEP, 0, 5, "running"), False),
        ("moved to another node", rep(0, R.RUNNING, "b", 6), Reported(DEP, 0, 5, "running"), True),
        ("an older generation", rep(0, R.RUNNING, "a", 6), Reported(DEP, 0, 5, "running"), True),
        ("rolled back", rep(0, R.STOPPED, "a", 5), Reported(DEP, 0, 5, "running"), True),
        ("lost meanwhile", rep(0, R.LOST, "a", 5), Reported(DEP, 0, 5, "starting"), True),
        ("scaled away", rep(1, R.RUNNING, "a", 5), Reported(DEP, 0, 5, "running"), True),
        ("already stopped", rep(0, R.RUNNING, "b", 6), Reported(DEP, 0, 5, "stopped"), False),
        (
            "a newer generation (being sent)",
            rep(0, R.STARTING, "a", 5),
            Reported(DEP, 0, 6, "running"),
            False,
        ),
    ],
)
def test_stale_replicas_are_stopped(case: str, assigned: Replica, reported: Reported, stopped: bool) -> None:
    plan = fence([reported], known(assigned))
    expected = (Stop("a", DEP, reported.replica_index, reported.generation),) if stopped else ()
    assert plan.stops == expected, case
    assert plan.health == ()
    assert plan.remove == ()


def test_a_deleted_deployments_replicas_are_removed_once_per_resend_time() -> None:
    reported = [Reported("gone", 0, 1, "running"), Reported("gone", 1, 2, "running")]
    plan = fence(reported, known())
    assert plan.remove == ("gone",)
    assert plan.sent == {("a", "gone", -1, -1): 100.0}
    assert fence(reported, known(), sent=dict(plan.sent), now=105.0).remove == ()
    assert fence(reported, known(), sent=dict(plan.sent), now=110.0).remove == ("gone",)


@pytest.mark.parametrize(("later", "resent"), [(0.0, False), (9.9, False), (10.0, True)])
def test_a_stop_is_not_resent_within_the_resend_time(later: float, resent: bool) -> None:
    report = [Reported(DEP, 0, 5, "running")]
    assigned = known(rep(0, R.RUNNING, "b", 6))
    first = fence(report + report, assigned)
    assert len(first.stops) == 1  # once, although reported twice
    again = fence(report, assigned, sent=dict(first.sent), now=100.0 + later)
    assert bool(again.stops) == resent
    assert fencing.prune_sent(first.sent, 100.0 + later) == ({} if resent else first.sent)


def test_surging_and_draining_replicas_are_left_running() -> None:
    assigned = known(rep(0, R.RUNNING, "b", 6), rep(1, R.RUNNING, "b", 7))
    report = [Reported(DEP, 0, 8, "running"), Reported(DEP, 1, 4, "running")]
    plan = fence(report, assigned, surging={(DEP, 0): ("a", 8)}, draining={("a", DEP, 1, 4)})
    assert plan.stops == ()
    # not the surge's generation, or drained on another node: stale
    plan = fence(report, assigned, surging={(DEP, 0): ("a", 9)}, draining={("c", DEP, 1, 4)})
    assert plan.stops == (Stop("a", DEP, 0, 8), Stop("a", DEP, 1, 4))


def test_health_follows_what_the_node_reports() -> None:
    assigned = known(rep(0, R.RUNNING, "a", 5), rep(1, R.UNHEALTHY, "a", 6), rep(2, R.RUNNING, "a", 7))
    report = [
        Reported(DEP, 0, 5, "unhealthy"),
        Reported(DEP, 1, 6, "running", endpoint="http://a:2"),
        Reported(DEP, 2, 7, "running"),
    ]
    plan = fence(report, assigned)
    assert plan.health == (
        HealthChange(DEP, 0, 5, R.UNHEALTHY, ""),
        HealthChange(DEP, 1, 6, R.RUNNING, "http://a:2"),
    )


def test_failures_reported_and_replicas_missing_from_a_hello() -> None:
    assigned = known(
        rep(0, R.RUNNING, "a", 5),
        rep(1, R.UNHEALTHY, "a", 6),
        rep(2, R.STARTING, "a", 7),  # being deployed: not missing
        rep(3, R.RUNNING, "b", 8),  # another node's
    )
    report = [Reported(DEP, 0, 5, "failed", error_message="exit 1")]
    assert fence(report, assigned).failures == (Failure(DEP, 0, 5, "exit 1"),)
    assert fence(report, assigned, complete=True).failures == (
        Failure(DEP, 1, 6, "node a reconnected without the replica"),
        Failure(DEP, 0, 5, "exit 1"),
    )
    # a stale failure (another generation) is nobody's business
    assert fence([Reported(DEP, 0, 4, "failed")], assigned).failures == ()


# -- rolling update and revert -----------------------------------------------------------------

V1 = {"package_sha256": "p1", "resources": {"cpu_cores": 0.5, "memory_mb": 256, "disk_mb": 1024}}
V2 = {"package_sha256": "p2", "resources": {"cpu_cores": 1.0, "memory_mb": 512, "disk_mb": 1024}}


def test_update_records_a_new_version_and_remembers_the_previous() -> None:
    v = view(D.RUNNING, rep(0, R.RUNNING), meta={**V1, "version": 1})
    plan, goal, current, earlier = versions.begin(v, rolling=False, record=V2, target=None)
    assert (goal, current, earlier) == (2, 1, 0)
    assert plan.status == D.DEPLOYING
    assert plan.meta is not None
    assert plan.meta["package_sha256"] == "p2"
    assert plan.meta["previous_version"] == 1
    assert plan.meta["versions"]["1"]["package_sha256"] == "p1"
    assert plan.reason == "updating from version 1 to version 2"


def test_rollback_goes_to_the_previous_version_by_default() -> None:
    meta = {**V2, "version": 2, "previous_version": 1, "versions": {"1": V1, "2": V2}}
    plan, goal, current, earlier = versions.begin(
        view(D.FAILING, rep(0, R.RUNNING), meta=meta), rolling=False, record=None, target=0
    )
    assert (goal, current, earlier) == (1, 2, 1)
    assert plan.meta is not None
    assert plan.meta["package_sha256"] == "p1"
    assert plan.reason == "rolling back from version 2 to version 1"


@pytest.mark.parametrize(
    ("status", "rolling", "target", "reason"),
    [
        (D.DEPLOYING, False, None, "DEPLOYMENT_BUSY"),
        (D.RUNNING, True, None, "DEPLOYMENT_BUSY"),
        (D.RUNNING, False, 7, "VERSION_NOT_FOUND"),
        (D.RUNNING, False, 2, "VERSION_NOT_FOUND"),  # the current one
    ],
)
def test_update_and_rollback_refusals(status: D, rolling: bool, target: int | None, reason: str) -> None:
    meta = {**V2, "version": 2, "versions": {"1": V1, "2": V2}}
    with pytest.raises(FailedPrecondition) as info:
        versions.begin(
            view(status, rep(0, R.RUNNING), meta=meta),
            rolling=rolling,
            record=V2 if target is None else None,
            target=target,
        )
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("replica", "version", "replace"),
    [
        (rep(0, R.RUNNING, version=2), 2, False),
        (rep(0, R.RUNNING), 1, False),  # no version recorded: version 1
        (rep(0, R.RUNNING, version=1), 2, True),
        (rep(0, R.FAILED, version=2), 2, True),
    ],
)
def test_which_replicas_a_rolling_update_replaces(replica: Replica, version: int, replace: bool) -> None:
    assert (versions.to_replace(view(D.DEPLOYING, replica), 0, version) is not None) == replace


@pytest.mark.parametrize(
    ("old", "node", "drained"),
    [
        pytest.param(rep(0, R.RUNNING, "a", 5), "b", True, id="surge-on-another-node-drains-the-old"),
        pytest.param(rep(0, R.RUNNING, "a", 5), "a", False, id="in-place-the-agent-replaced-it"),
        pytest.param(rep(0, R.FAILED, "a", 5), "b", False, id="a-failed-old-one-holds-nothing"),
    ],
)
def test_switch_to_a_healthy_surge_replica(old: Replica, node: str, drained: bool) -> None:
    v = view(D.DEPLOYING, old)
    reserve, generation = versions.reserve_generation(v, 0, node)
    assert generation == 11
    assert reserve.meta is not None
    assert reserve.meta["generation"] == 11
    assert surging_of(reserve.meta) == {0: (node, 11)}  # stored: every controller's fence sees it
    v = replace(v, meta=reserve.meta)
    plan = versions.switch_replica(v, 0, node, generation, "http://new", 2, NOW)
    assert plan is not None
    assert plan.replicas is not None
    assert plan.meta is not None
    assert surging_of(plan.meta) == {}
    assert plan.replicas[0] == Replica(0, node, 11, R.RUNNING, "http://new", "", NOW.isoformat(), 2)
    assert plan.drains == ((old,) if drained else ())
    assert versions.switch_replica(v, 3, node, generation, "e", 2, NOW) is None  # scaled away
    dropped = versions.drop_surge(v, 0)
    assert dropped is not None
    assert dropped.meta is not None
    assert surging_of(dropped.meta) == {}
    assert versions.drop_surge(v, 3) is None


def test_draining_entries_are_kept_until_their_time_in_the_metadata() -> None:
    a, b = rep(0, R.RUNNING, "a", 5), rep(1, R.RUNNING, "b", 6)
    meta = with_draining({"generation": 6}, [a], NOW + timedelta(seconds=30), NOW)
    meta = with_draining(meta, [b], NOW + timedelta(seconds=60), NOW + timedelta(seconds=10))
    assert draining_of(meta) == {
        ("a", 0, 5): NOW + timedelta(seconds=30),
        ("b", 1, 6): NOW + timedelta(seconds=60),
    }
    # an entry past its time is dropped at the next change; a stopped one is removed
    later = without_draining(meta, [("b", 1, 6)], NOW + timedelta(seconds=31))
    assert draining_of(later) == {}
    assert "draining" not in later
    assert meta["generation"] == 6


def test_revert_switches_back_and_end_settles() -> None:
    meta = {**V2, "version": 2, "previous_version": 1, "versions": {"1": V1, "2": V2}}
    v = view(D.DEPLOYING, rep(0, R.FAILED), meta=meta)
    switched = versions.switch_version(v, 1, 0)
    assert switched.meta is not None
    assert (switched.meta["version"], switched.meta["previous_version"], switched.meta["package_sha256"]) == (
        1,
        0,
        "p1",
    )
    assert versions.end(v, "reverted").status == D.FAILING
    assert versions.end(view(D.DEPLOYING, rep(0, R.RUNNING), meta=meta), "done").status == D.RUNNING
