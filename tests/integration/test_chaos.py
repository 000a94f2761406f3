"""Chaos: three controllers on one PostgreSQL store and one Redis (``A67_SCALE_OUT=1``,
scripts/scale_out.py), three real agents, a steady mix of work — deployments created and
scaled, rows written to and read from a sharded database, the nodes' heartbeats — while
controllers are killed (SIGKILL) and restarted at random. Afterwards every invariant holds:

* each deployment runs its desired number of replicas, ``running``, on live nodes, and
  the desired number is the last one a user was told was accepted (when no later call's
  outcome is unknown);
* no replica runs twice: one process per (deployment, replica index) on the machine;
* every write a user was told was committed is read back, and every read during the run
  saw every write acknowledged before it started;
* no node was ever reported failed, none was recovered (no agent was harmed).

The run is bounded and seeded: ``A67_CHAOS_SEED`` (default 67) fixes when which
controller is killed, for how long, and the sequence of operations; a failure names its
seed, and ``A67_CHAOS_SEED=<seed> pytest tests/integration/test_chaos.py`` replays that
schedule (the timing of the machine can still differ). ``A67_CHAOS_SECONDS`` (default 30)
is the length of the chaos phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import pytest
from automator67.v1 import (
    auth_pb2_grpc,
    common_pb2,
    deployment_pb2,
    deployment_pb2_grpc,
    node_pb2,
    node_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
)

from tests.integration.test_deployments_real import _environ, app_manifest, app_source
from tests.support import bearer, hash_sharded_database, register, scale_out_script, until_answered

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.postgres

SEED = int(os.environ.get("A67_CHAOS_SEED", "67"))
CHAOS_SECONDS = float(os.environ.get("A67_CHAOS_SECONDS", "30"))
HEARTBEAT_SECONDS = 1.0
SETTLE_SECONDS = 150.0
"""How long the system has, once every controller is back, to converge."""
CALL_SECONDS = 10.0
LIVE = (common_pb2.NODE_STATUS_READY, common_pb2.NODE_STATUS_BUSY)
EXPECTED_ERRORS = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED"}
"""What a call may answer while controllers die: a controller gone mid-call, a node whose
controller is gone, a decision that kept meeting another's writes. Anything else is a bug."""


@dataclass(frozen=True)
class Kill:
    at: float
    """Seconds into the chaos phase."""
    controller: int
    down: float
    """Seconds before it is started again."""


def kill_schedule(seed: int, seconds: float, controllers: int) -> list[Kill]:
    """One controller down at a time: killed, restarted after 1.5-5 s, the next kill 3-8 s later."""
    rng = random.Random(f"{seed}|kills")
    kills: list[Kill] = []
    at = rng.uniform(2.0, 5.0)
    while at < seconds:
        down = rng.uniform(1.5, 5.0)
        kills.append(Kill(at, rng.randrange(controllers), down))
        at += down + rng.uniform(3.0, 8.0)
    return kills


def test_the_schedule_is_the_seeds() -> None:
    first = kill_schedule(5, 60.0, 3)
    assert first == kill_schedule(5, 60.0, 3)
    assert first != kill_schedule(6, 60.0, 3)
    assert all(b.at >= a.at + a.down + 3.0 for a, b in itertools.pairwise(first))


@dataclass
class Record:
    """What the users were told during the run."""

    acked_rows: set[int] = field(default_factory=set)
    unknown_rows: set[int] = field(default_factory=set)
    desired: dict[str, int | None] = field(default_factory=dict)
    """Deployment id -> the replicas last accepted; None when a later call's outcome is unknown."""
    errors: Counter[str] = field(default_factory=Counter)
    reads: int = 0
    stale_reads: list[str] = field(default_factory=list)
    failed_nodes: set[str] = field(default_factory=set)
    log: list[str] = field(default_factory=list)


class Users:
    """Calls to whichever controllers are up (one channel each)."""

    def __init__(self, addresses: list[str], token: str) -> None:
        self.channels = [grpc.aio.insecure_channel(a) for a in addresses]
        self.up = set(range(len(addresses)))
        self.token = token

    def deployments(self, i: int) -> deployment_pb2_grpc.DeploymentServiceStub:
        return deployment_pb2_grpc.DeploymentServiceStub(self.channels[i])

    def nodes(self, i: int) -> node_pb2_grpc.NodeServiceStub:
        return node_pb2_grpc.NodeServiceStub(self.channels[i])

    def query(self, i: int) -> query_pb2_grpc.QueryServiceStub:
        return query_pb2_grpc.QueryServiceStub(self.channels[i])

    def pick(self, rng: random.Random) -> int:
        return rng.choice(sorted(self.up)) if self.up else 0

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


async def _until(check: Callable[[], Awaitable[str | None]], within: float, what: str) -> None:
    await until_answered(check, within, f"seed {SEED}: {what}", pause=0.5)


def _replica_processes(deployment_ids: set[str]) -> Counter[tuple[str, str]]:
    """(deployment id, replica index) -> live replica processes of these deployments (agents
    running as root put their replicas' directories outside their own: found by environment)."""
    found: Counter[tuple[str, str]] = Counter()
    for process in psutil.process_iter():
        env = _environ(process)  # empty for a zombie or a process gone meanwhile
        if env.get("A67_DEPLOYMENT_ID") in deployment_ids:
            found[(env["A67_DEPLOYMENT_ID"], env.get("A67_REPLICA_INDEX", ""))] += 1
    return found


async def test_controllers_killed_at_random_lose_nothing_and_run_nothing_twice(
    tmp_path: Path, postgres_admin_url: str, redis_server_url: str
) -> None:
    scale_out = scale_out_script()
    topology = scale_out.Topology(
        tmp_path,
        controllers=3,
        postgres_admin_url=postgres_admin_url,
        redis_url=redis_server_url,
        heartbeat_interval_seconds=HEARTBEAT_SECONDS,
    )
    users: Users | None = None
    record = Record()
    try:
        await topology.start()
        controllers = topology.controllers
        async with grpc.aio.insecure_channel(controllers[0].address) as channel:
            token = (
                await register(auth_pb2_grpc.AuthServiceStub(channel), email="chaos@example.com")
            ).access_token
        users = Users([c.address for c in controllers], token)
        md = bearer(token)
        enrollment = await users.nodes(0).CreateEnrollmentToken(
            node_pb2.CreateEnrollmentTokenRequest(max_uses=3), metadata=md
        )
        base = 26000 + (os.getpid() % 40) * 100
        for i in range(3):
            topology.add_agent(
                enrollment.token, controller=controllers[i], ports=(base + i * 30, base + i * 30 + 29)
            )

        async def all_live() -> str | None:
            nodes = (await users.nodes(0).ListNodes(node_pb2.ListNodesRequest(), metadata=md)).nodes
            live = [n for n in nodes if n.status in LIVE]
            return None if len(live) == 3 else f"{len(live)} of 3 nodes live"

        await _until(all_live, 90, "three live nodes")
        nodes = (await users.nodes(0).ListNodes(node_pb2.ListNodesRequest(), metadata=md)).nodes
        node_ids = sorted(n.id for n in nodes)

        db_id = await hash_sharded_database(
            users.query(1),
            users.query(2),
            md,
            "chaos",
            node_ids[:2],
            "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)",
        )
        for i in range(2):
            created = await users.deployments(i).CreateDeployment(
                deployment_pb2.CreateDeploymentRequest(
                    manifest=_manifest(f"app-{i}"), source_tar_gz=app_source(f"v{i}")
                ),
                metadata=md,
                timeout=30,
            )
            record.desired[created.deployment_id] = 1

        stop = asyncio.Event()
        work = [
            asyncio.create_task(_workload(users, md, db_id, record, stop)),
            asyncio.create_task(_watch_nodes(users, md, record, stop)),
        ]
        try:
            await _chaos(topology, users, record)
        finally:
            stop.set()
            await asyncio.gather(*work)

        print(f"seed {SEED}: {record.log}")
        print(
            f"acknowledged rows {len(record.acked_rows)}, unknown {len(record.unknown_rows)}, reads "
            f"{record.reads}, deployments {len(record.desired)}, errors {dict(record.errors)}"
        )

        # every controller is back: the system converges, and nothing was lost
        async def converged() -> str | None:
            return await _check_deployments(users, md, record)

        await _until(converged, SETTLE_SECONDS, "deployments converged")
        await _check_rows(users, md, db_id, record)
        assert not record.stale_reads, (
            f"seed {SEED}: reads missed acknowledged writes: {record.stale_reads[:5]}"
        )
        assert not record.failed_nodes, f"seed {SEED}: nodes reported failed: {record.failed_nodes}"
        recovered = [
            line
            for c in controllers
            if c.log.exists()
            for line in c.log.read_text(errors="replace").splitlines()
            if "failed: recovery triggered" in line
        ]
        assert not recovered, f"seed {SEED}: recovery ran for live nodes: {recovered[:3]}"
        unexpected = {code: n for code, n in record.errors.items() if code not in EXPECTED_ERRORS}
        assert not unexpected, (
            f"seed {SEED}: calls failed unexpectedly: {unexpected} (see the controllers' logs)"
        )
        assert len(record.acked_rows) >= 10, f"seed {SEED}: too little work got through: {record.errors}"
        assert record.reads >= 5, f"seed {SEED}: too few reads got through: {record.errors}"
    finally:
        if users is not None:
            await users.close()
        topology.stop_agents()
        _kill_replicas(set(record.desired))
        topology.stop()


def _manifest(name: str) -> deployment_pb2.DeploymentManifest:
    manifest = app_manifest(1)
    manifest.name = name
    return manifest


def _kill_replicas(deployment_ids: set[str]) -> None:
    for process in psutil.process_iter():
        if _environ(process).get("A67_DEPLOYMENT_ID") in deployment_ids:
            with contextlib.suppress(psutil.Error):
                process.kill()


async def _chaos(topology: object, users: Users, record: Record) -> None:
    """Kill and restart controllers on the seed's schedule."""
    controllers = topology.controllers  # type: ignore[attr-defined]
    loop = asyncio.get_running_loop()
    started = loop.time()
    for kill in kill_schedule(SEED, CHAOS_SECONDS, len(controllers)):
        await asyncio.sleep(max(0.0, started + kill.at - loop.time()))
        victim = controllers[kill.controller]
        users.up.discard(kill.controller)
        record.log.append(f"{loop.time() - started:6.1f} s: kill {victim.name}")
        await asyncio.to_thread(victim.kill)
        await asyncio.sleep(kill.down)
        victim.start()
        await victim.serving(within=60)
        users.up.add(kill.controller)
        record.log.append(f"{loop.time() - started:6.1f} s: {victim.name} serving again")
    await asyncio.sleep(max(0.0, started + CHAOS_SECONDS - loop.time()))


async def _workload(
    users: Users, md: tuple[tuple[str, str], ...], db_id: str, record: Record, stop: asyncio.Event
) -> None:
    """The seed's sequence of operations, one every 0.25 s, each on a controller that is up."""
    rng = random.Random(f"{SEED}|work")
    next_id = 0
    creates = 0
    while not stop.is_set():
        op = rng.random()
        target = users.pick(rng)
        try:
            if op < 0.55:
                next_id += 1
                row = next_id
                try:
                    await users.query(target).ExecuteQuery(
                        query_pb2.ExecuteQueryRequest(
                            db_id=db_id, query=f"INSERT INTO t (id, v) VALUES ({row}, 'r{row}')"
                        ),
                        metadata=md,
                        timeout=CALL_SECONDS,
                    )
                except grpc.aio.AioRpcError:
                    record.unknown_rows.add(row)
                    raise
                record.acked_rows.add(row)
            elif op < 0.8:
                before = set(record.acked_rows)
                reply = await users.query(target).ExecuteQuery(
                    query_pb2.ExecuteQueryRequest(db_id=db_id, query="SELECT id FROM t"),
                    metadata=md,
                    timeout=CALL_SECONDS,
                )
                seen = {int(r.values[0].number_value) for r in reply.data}
                record.reads += 1
                if missing := before - seen:
                    record.stale_reads.append(f"read on controller {target} missed {sorted(missing)[:5]}")
            elif op < 0.97 or creates >= 2:
                deployment_id = rng.choice(sorted(record.desired))
                replicas = rng.choice((1, 2))
                record.desired[deployment_id] = None  # unknown until the answer says otherwise
                await users.deployments(target).ScaleDeployment(
                    deployment_pb2.ScaleDeploymentRequest(deployment_id=deployment_id, replicas=replicas),
                    metadata=md,
                    timeout=CALL_SECONDS,
                )
                record.desired[deployment_id] = replicas
            else:
                creates += 1
                created = await users.deployments(target).CreateDeployment(
                    deployment_pb2.CreateDeploymentRequest(
                        manifest=_manifest(f"new-{creates}"), source_tar_gz=app_source(f"c{creates}")
                    ),
                    metadata=md,
                    timeout=CALL_SECONDS,
                )
                record.desired[created.deployment_id] = 1
        except grpc.aio.AioRpcError as exc:
            record.errors[exc.code().name] += 1
        await asyncio.sleep(0.25)


async def _watch_nodes(
    users: Users, md: tuple[tuple[str, str], ...], record: Record, stop: asyncio.Event
) -> None:
    """Every node's status, twice a second, from a controller that is up: none may be failed."""
    rng = random.Random(f"{SEED}|watch")
    while not stop.is_set():
        with contextlib.suppress(grpc.aio.AioRpcError):
            reply = await users.nodes(users.pick(rng)).ListNodes(
                node_pb2.ListNodesRequest(), metadata=md, timeout=5
            )
            record.failed_nodes.update(n.id for n in reply.nodes if n.status == common_pb2.NODE_STATUS_FAILED)
        await asyncio.sleep(0.5)


async def _check_deployments(users: Users, md: tuple[tuple[str, str], ...], record: Record) -> str | None:
    live = {
        n.id
        for n in (await users.nodes(0).ListNodes(node_pb2.ListNodesRequest(), metadata=md, timeout=5)).nodes
        if n.status in LIVE
    }
    processes = _replica_processes(set(record.desired))
    for deployment_id, desired in sorted(record.desired.items()):
        d = (
            await users.deployments(0).GetDeployment(
                deployment_pb2.GetDeploymentRequest(deployment_id=deployment_id), metadata=md, timeout=5
            )
        ).deployment
        want = d.desired_replicas if desired is None else desired
        if d.desired_replicas != want:
            return f"{deployment_id}: {d.desired_replicas} replicas stored, {desired} accepted last"
        if d.status != deployment_pb2.DEPLOYMENT_STATUS_RUNNING:
            return f"{deployment_id}: {deployment_pb2.DeploymentStatus.Name(d.status)}"
        running = [a for a in d.node_assignments if a.status == "running"]
        if len(running) != want or len(d.node_assignments) != want:
            return (
                f"{deployment_id}: {len(running)} running of {len(d.node_assignments)} assigned, want {want}"
            )
        if off := [a.node_id for a in running if a.node_id not in live]:
            return f"{deployment_id}: replicas on nodes not live: {off}"
        indexes = sorted(str(a.replica_index) for a in running)
        found = {i: processes.get((deployment_id, i), 0) for i in indexes}
        if (
            any(count != 1 for count in found.values())
            or sum(count for (d_id, _), count in processes.items() if d_id == deployment_id) != want
        ):
            return f"{deployment_id}: replica processes {dict(found)} (all: {dict(processes)})"
    return None


async def _check_rows(users: Users, md: tuple[tuple[str, str], ...], db_id: str, record: Record) -> None:
    rows: set[int] = set()

    async def read() -> str | None:
        reply = await users.query(2).ExecuteQuery(
            query_pb2.ExecuteQueryRequest(db_id=db_id, query="SELECT id FROM t"),
            metadata=md,
            timeout=CALL_SECONDS,
        )
        rows.clear()
        rows.update(int(r.values[0].number_value) for r in reply.data)
        return None

    await _until(read, 30, "the rows read back")
    lost = record.acked_rows - rows
    assert not lost, f"seed {SEED}: acknowledged writes lost: {sorted(lost)[:10]} ({record.log})"
    invented = rows - record.acked_rows - record.unknown_rows
    assert not invented, f"seed {SEED}: rows nobody wrote: {sorted(invented)[:10]}"
