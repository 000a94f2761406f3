"""PostgreSQL and Redis restarted under load, under two controllers (``A67_SCALE_OUT=1``,
scripts/scale_out.py's topology) with two real agents.

Each test runs a PostgreSQL server and a Redis server of its own (the machine's binaries,
on free ports, in a temporary directory), so it can stop and start them without touching
the servers other tests use. A steady load — who am I, list the nodes, write a row, read
the rows, on both controllers — runs while the server is stopped for a few seconds and
started again. Meanwhile every call answers in time, with its answer or ``UNAVAILABLE``
(never ``INTERNAL``, never a hang); afterwards, with the same controller processes (no
restart of their own), every kind of call works again on both controllers, including
commands relayed between them over Redis and a logout seen by the other controller, every
acknowledged write reads back, and no node was reported failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from automator67.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    common_pb2,
    node_pb2,
    node_pb2_grpc,
    query_pb2,
    query_pb2_grpc,
)

from tests.support import bearer, hash_sharded_database, register, scale_out_script, until_answered

ROOT = Path(__file__).resolve().parents[2]
LIVE = (common_pb2.NODE_STATUS_READY, common_pb2.NODE_STATUS_BUSY)
CALL_SECONDS = 8.0
OUTAGE_SECONDS = 5.0
RECOVER_SECONDS = 60.0
EXPECTED = {"OK", "UNAVAILABLE"}

pytestmark = pytest.mark.postgres


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not found:
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql")
    return found[-1].parent


class PrivatePostgres:
    """A PostgreSQL server of this test's own: initdb, start, stop (as ``postgres`` when root)."""

    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="a67-pg-"))
        self.port = _free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "postgres")
        self.data = self.dir / "data"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync"
        )
        self.start()

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
            "-c fsync=off -c max_prepared_transactions=100 -c max_connections=200"
        )
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.dir / "log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def close(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRedis:
    """A Redis server of this test's own, nothing persisted (a restart loses every key)."""

    def __init__(self) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("no redis-server binary")
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


@dataclass
class Setup:
    topology: object
    pg: PrivatePostgres
    redis: PrivateRedis
    channels: list[grpc.aio.Channel]
    token: str
    db_id: str
    node_ids: list[str]
    pids: list[int]
    acked: set[int] = field(default_factory=set)
    codes: Counter[str] = field(default_factory=Counter)
    failed_nodes: set[str] = field(default_factory=set)
    unexpected: list[str] = field(default_factory=list)

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return bearer(self.token)


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    pg, redis = PrivatePostgres(), PrivateRedis()
    channels: list[grpc.aio.Channel] = []
    topology = None
    try:
        await asyncio.to_thread(pg.init)
        redis.start()
        topology = scale_out_script().Topology(
            tmp_path, controllers=2, postgres_admin_url=pg.admin_url, redis_url=redis.url
        )
        await topology.start()
        controllers = topology.controllers
        channels = [grpc.aio.insecure_channel(c.address) for c in controllers]
        token = (
            await register(auth_pb2_grpc.AuthServiceStub(channels[0]), email="ops2@example.com")
        ).access_token
        md = bearer(token)
        nodes = node_pb2_grpc.NodeServiceStub(channels[0])
        enrollment = await nodes.CreateEnrollmentToken(
            node_pb2.CreateEnrollmentTokenRequest(max_uses=2), metadata=md
        )
        for i in range(2):  # one agent on each controller: half the commands are relayed
            topology.add_agent(enrollment.token, controller=controllers[i])

        async def live() -> str | None:
            listed = (await nodes.ListNodes(node_pb2.ListNodesRequest(), metadata=md)).nodes
            return None if sum(n.status in LIVE for n in listed) == 2 else f"{[n.status for n in listed]}"

        await until_answered(live, 90, "two live nodes")
        node_ids = sorted(
            n.id for n in (await nodes.ListNodes(node_pb2.ListNodesRequest(), metadata=md)).nodes
        )
        query = query_pb2_grpc.QueryServiceStub(channels[1])
        db_id = await hash_sharded_database(
            query, query, md, "restarts", node_ids, "CREATE TABLE t (id INTEGER PRIMARY KEY)"
        )
        pids = [c.process.pid for c in controllers]
        yield Setup(topology, pg, redis, channels, token, db_id, node_ids, pids)
    finally:
        for channel in channels:
            await channel.close()
        if topology is not None:
            topology.stop_agents()
            for controller in topology.controllers:
                controller.stop()
            with contextlib.suppress(Exception):
                pg.start()  # a test that failed with it stopped
            with contextlib.suppress(Exception):
                topology.stop()
        redis.stop()
        pg.close()


async def _load(s: Setup, stop: asyncio.Event) -> None:
    """Four kinds of call, on both controllers in turn, each with a deadline; every answer's
    code counted, and what any answer other than OK or UNAVAILABLE said noted."""
    row = 0
    turn = 0
    while not stop.is_set():
        channel = s.channels[turn % 2]
        kind = turn % 4
        turn += 1
        try:
            if kind == 0:
                await auth_pb2_grpc.AuthServiceStub(channel).GetCurrentUser(
                    auth_pb2.GetCurrentUserRequest(), metadata=s.md, timeout=CALL_SECONDS
                )
            elif kind == 1:
                reply = await node_pb2_grpc.NodeServiceStub(channel).ListNodes(
                    node_pb2.ListNodesRequest(), metadata=s.md, timeout=CALL_SECONDS
                )
                s.failed_nodes.update(n.id for n in reply.nodes if n.status == common_pb2.NODE_STATUS_FAILED)
            elif kind == 2:
                row += 1
                await query_pb2_grpc.QueryServiceStub(channel).ExecuteQuery(
                    query_pb2.ExecuteQueryRequest(db_id=s.db_id, query=f"INSERT INTO t (id) VALUES ({row})"),
                    metadata=s.md,
                    timeout=CALL_SECONDS,
                )
                s.acked.add(row)
            else:
                await query_pb2_grpc.QueryServiceStub(channel).ExecuteQuery(
                    query_pb2.ExecuteQueryRequest(db_id=s.db_id, query="SELECT count(*) FROM t"),
                    metadata=s.md,
                    timeout=CALL_SECONDS,
                )
            s.codes["OK"] += 1
        except grpc.aio.AioRpcError as exc:
            s.codes[exc.code().name] += 1
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE,):
                s.unexpected.append(
                    f"call {kind} on controller {turn % 2}: {exc.code().name} {exc.details()}"
                )
        await asyncio.sleep(0.1)


async def _everything_works(s: Setup) -> None:
    """Every kind of call, on both controllers, succeeds again (within a bound)."""
    for channel in s.channels:
        query = query_pb2_grpc.QueryServiceStub(channel)

        async def works(
            channel: grpc.aio.Channel = channel, query: query_pb2_grpc.QueryServiceStub = query
        ) -> None:
            await auth_pb2_grpc.AuthServiceStub(channel).GetCurrentUser(
                auth_pb2.GetCurrentUserRequest(), metadata=s.md, timeout=CALL_SECONDS
            )
            listed = await node_pb2_grpc.NodeServiceStub(channel).ListNodes(
                node_pb2.ListNodesRequest(), metadata=s.md, timeout=CALL_SECONDS
            )
            live = sum(n.status in LIVE for n in listed.nodes)
            if live != 2:
                return f"{live} of 2 nodes live"  # type: ignore[return-value]
            await query.ExecuteQuery(  # both shards: one node's command is relayed
                query_pb2.ExecuteQueryRequest(db_id=s.db_id, query="SELECT count(*) FROM t"),
                metadata=s.md,
                timeout=CALL_SECONDS,
            )
            return None

        await until_answered(works, RECOVER_SECONDS, "every call works again")
    reply = await query_pb2_grpc.QueryServiceStub(s.channels[0]).ExecuteQuery(
        query_pb2.ExecuteQueryRequest(db_id=s.db_id, query="SELECT id FROM t"),
        metadata=s.md,
        timeout=CALL_SECONDS,
    )
    rows = {int(r.values[0].number_value) for r in reply.data}
    assert not s.acked - rows, f"acknowledged writes lost: {sorted(s.acked - rows)[:10]}"
    assert [c.process.pid for c in s.topology.controllers] == s.pids  # type: ignore[attr-defined]
    assert all(c.process.poll() is None for c in s.topology.controllers)  # type: ignore[attr-defined]
    assert not s.failed_nodes, f"nodes reported failed: {s.failed_nodes}"


async def _outage(s: Setup, down: Iterator[None] | contextlib.AbstractContextManager[None]) -> None:
    stop = asyncio.Event()
    load = asyncio.create_task(_load(s, stop))
    try:
        await asyncio.sleep(2.0)  # the load before
        ok_before = s.codes["OK"]
        assert ok_before > 0, dict(s.codes)
        with down:  # type: ignore[union-attr]
            await asyncio.sleep(OUTAGE_SECONDS)
        await asyncio.sleep(2.0)  # and after
    finally:
        stop.set()
        await load
    print(f"answers during the load: {dict(s.codes)}; acknowledged writes {len(s.acked)}")
    unexpected = {code: n for code, n in s.codes.items() if code not in EXPECTED}
    assert not unexpected, f"calls answered {unexpected}: {s.unexpected[:5]}"


async def test_postgresql_restarted_under_load(setup: Setup) -> None:
    s = setup

    @contextlib.contextmanager
    def postgres_down() -> Iterator[None]:
        s.pg.stop()
        try:
            yield
        finally:
            s.pg.start()

    await _outage(s, postgres_down())
    assert s.codes["UNAVAILABLE"] > 0, f"the outage went unnoticed: {dict(s.codes)}"
    await _everything_works(s)


async def test_redis_restarted_under_load(setup: Setup) -> None:
    s = setup

    @contextlib.contextmanager
    def redis_down() -> Iterator[None]:
        s.redis.stop()  # SIGKILL: nothing saved, every key gone
        try:
            yield
        finally:
            s.redis.start()

    await _outage(s, redis_down())
    await _everything_works(s)
    # revocations travel again: a logout on one controller is refused by the other
    auth = [auth_pb2_grpc.AuthServiceStub(c) for c in s.channels]
    await auth[0].Logout(auth_pb2.LogoutRequest(), metadata=s.md, timeout=CALL_SECONDS)

    async def refused() -> str | None:
        try:
            await auth[1].GetCurrentUser(
                auth_pb2.GetCurrentUserRequest(), metadata=s.md, timeout=CALL_SECONDS
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                return None
            raise
        return "the other controller still accepts the token"

    await until_answered(refused, 10, "the logout seen by the other controller")
