"""A bank test in the manner of Jepsen: transfers across shards while processes are SIGKILLed.

Real processes: the controller (``a67 serve``, its store an SQLite file in its data dir,
fixed ports so it can come back) and two agents serving one shard each. Accounts live on
both shards; every transfer is a distributed transaction that moves an amount between an
account on one shard and one on the other and writes a ledger row (on either shard).
Clients run concurrently; after every few finished attempts (a seeded choice, counted in
attempts, not in time) the chaos task SIGKILLs the controller or an agent and starts it
again. The run is bounded: a fixed number of attempts and kills.

Afterwards, once the decision log has nothing unresolved:

* the total balance is unchanged;
* no transfer is half-applied: every account's balance equals its opening balance plus
  the ledger rows that credit it minus those that debit it;
* every transfer the client saw committed has its ledger row.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from automator67.v1 import auth_pb2_grpc, node_pb2, node_pb2_grpc, query_pb2, query_pb2_grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import require_prepared_transactions
from tests.support import bearer, register

ACCOUNTS_PER_SHARD = 4
OPENING = 1000
CLIENTS = 4
ATTEMPTS = 48
KILLS = 6
TRIES = 40
IDLE_MS = 3000  # a client that vanishes mid-transaction holds its shards this long at most
SEED = int(os.environ.get("A67_BANK_SEED", "67"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    def __init__(self, root: Path, postgres_url: str) -> None:
        self.root = root
        self.api = f"127.0.0.1:{free_port()}"
        self.nodes = f"127.0.0.1:{free_port()}"
        self.postgres_url = postgres_url
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.token = ""
        self.kills: list[str] = []

    def _env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("A67_")}

    def start(self, name: str) -> None:
        env = self._env()
        if name == "controller":
            args = [sys.executable, "-m", "controller.cli", "serve", "--listen", self.api,
                    "--node-listen", self.nodes, "--data-dir", str(self.root / "controller")]  # fmt: skip
            env["A67_HEARTBEAT_INTERVAL_SECONDS"] = "0.3"
            env["A67_XDS_LISTEN_ADDRESS"] = ""  # the ingress xDS port is of no use here and may be taken
        else:
            args = [sys.executable, "-m", "controller.cli", "agent", "--data-dir", str(self.root / name),
                    "--region", name, "--node-types", "database", "--controller", self.api]  # fmt: skip
            if self.token:
                env["A67_AGENT_TOKEN"] = self.token
            if self.postgres_url:
                env["A67_SHARD_POSTGRES_URL"] = self.postgres_url
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 (the child owns it)
        self.running[name] = subprocess.Popen(args, stdout=log, stderr=log, env=env)
        log.close()

    def kill(self, name: str) -> None:
        process = self.running[name]
        process.send_signal(signal.SIGKILL)
        process.wait()
        self.kills.append(name)

    def stop_all(self) -> None:
        for process in self.running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()


async def until(condition, what: str, attempts: int = 1200):  # type: ignore[no-untyped-def]
    """Wait for ``condition()`` to return something truthy (polling, bounded)."""
    last: BaseException | None = None
    for _ in range(attempts):
        try:
            result = await condition()
            if result:
                return result
        except grpc.aio.AioRpcError as exc:
            last = exc
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last error: {last})")


def unresolved(store: Path) -> int:
    with sqlite3.connect(store) as conn:
        return int(
            conn.execute("SELECT count(*) FROM database_transactions WHERE resolved_at IS NULL").fetchone()[0]
        )


@pytest.mark.parametrize(
    "backend",
    [
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
    ],
)
async def test_bank_transfers_survive_sigkill_of_controller_and_agents(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    postgres_url = ""
    if backend == "postgres":
        postgres_url = (
            request.getfixturevalue("postgres_databases")
            .create()
            .replace("postgresql+psycopg://", "postgresql://")
        )
        require_prepared_transactions(postgres_url)
    rng = random.Random(SEED)
    procs = Processes(tmp_path, postgres_url)
    store = tmp_path / "controller" / "controller.db"
    try:
        procs.start("controller")
        async with grpc.aio.insecure_channel(procs.api) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def serving() -> bool:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                return reply.status == health_pb2.HealthCheckResponse.SERVING

            await until(serving, "the controller to serve")
            token = (await register(auth_pb2_grpc.AuthServiceStub(channel))).access_token
            nodes = node_pb2_grpc.NodeServiceStub(channel)
            procs.token = (
                await nodes.CreateEnrollmentToken(
                    node_pb2.CreateEnrollmentTokenRequest(max_uses=2), metadata=bearer(token)
                )
            ).token
            procs.start("a")
            procs.start("b")

            async def both_ready() -> dict[str, str] | None:
                listed = (await nodes.ListNodes(node_pb2.ListNodesRequest(), metadata=bearer(token))).nodes
                ready = {n.region: n.id for n in listed if n.status in (2, 3)}  # READY, or BUSY (CPU > 90 %)
                return ready if len(ready) == 2 else None

            ids = await until(both_ready, "both agents to be ready")
            stub = query_pb2_grpc.QueryServiceStub(channel)
            db_id = (
                await stub.CreateDatabase(
                    query_pb2.CreateDatabaseRequest(
                        name="bank",
                        dialect="postgres" if postgres_url else "sqlite",
                        sharding=query_pb2.Sharding(
                            strategy=query_pb2.SHARDING_STRATEGY_RANGE,
                            shard_count=2,
                            sharding_key="id",
                            ranges=[
                                query_pb2.ShardRange(
                                    upper=struct_pb2.Value(number_value=1000), shard_index=0
                                ),
                                query_pb2.ShardRange(
                                    lower=struct_pb2.Value(number_value=1000), shard_index=1
                                ),
                            ],
                        ),
                        shards=[
                            query_pb2.ShardPlacement(shard_index=0, primary_node_id=ids["a"]),
                            query_pb2.ShardPlacement(shard_index=1, primary_node_id=ids["b"]),
                        ],
                    ),
                    metadata=bearer(token),
                )
            ).database.id
            for ddl in (
                "CREATE TABLE acct (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)",
                "CREATE TABLE ledger (id INTEGER PRIMARY KEY, src INTEGER NOT NULL, dst INTEGER NOT NULL, "
                "amount INTEGER NOT NULL)",
            ):
                await stub.ApplySchema(
                    query_pb2.ApplySchemaRequest(db_id=db_id, ddl=ddl), metadata=bearer(token)
                )
            shard0 = list(range(1, 1 + ACCOUNTS_PER_SHARD))
            shard1 = list(range(1001, 1001 + ACCOUNTS_PER_SHARD))
            values = ", ".join(f"({i}, {OPENING})" for i in shard0 + shard1)
            await stub.ExecuteQuery(
                query_pb2.ExecuteQueryRequest(
                    db_id=db_id, query=f"INSERT INTO acct (id, balance) VALUES {values}"
                ),
                metadata=bearer(token),
            )

            # -- the run
            plan = []
            for attempt in range(ATTEMPTS):
                src, dst = rng.choice(shard0), rng.choice(shard1)
                if rng.random() < 0.5:
                    src, dst = dst, src
                ledger_id = attempt + 1 if rng.random() < 0.5 else 1000 + attempt + 1
                plan.append((ledger_id, src, dst, rng.randint(1, 50)))
            kill_after = sorted(rng.sample(range(4, ATTEMPTS - 4), KILLS))
            victims = [rng.choice(["controller", "a", "b"]) for _ in range(KILLS)]
            queue: asyncio.Queue[tuple[int, int, int, int]] = asyncio.Queue()
            for item in plan:
                queue.put_nowait(item)
            committed: list[int] = []
            errors: list[str] = []
            timeline: list[str] = []
            t0 = asyncio.get_running_loop().time()
            finished = [0]
            progressed = asyncio.Condition()

            async def transfer(ledger_id: int, src: int, dst: int, amount: int) -> str:
                md = bearer(token)
                try:
                    begun = await stub.BeginTransaction(
                        query_pb2.BeginTransactionRequest(
                            db_id=db_id, distributed=True, idle_timeout_ms=IDLE_MS
                        ),
                        metadata=md,
                        timeout=10,
                    )
                    txid = begun.transaction.id
                    for sql in (
                        f"UPDATE acct SET balance = balance - {amount} WHERE id = {src}",
                        f"UPDATE acct SET balance = balance + {amount} WHERE id = {dst}",
                        f"INSERT INTO ledger (id, src, dst, amount) VALUES ({ledger_id}, {src}, {dst}, {amount})",
                    ):
                        await stub.ExecuteQuery(
                            query_pb2.ExecuteQueryRequest(db_id=db_id, query=sql, transaction_id=txid),
                            metadata=md,
                            timeout=20,
                        )
                except grpc.aio.AioRpcError as exc:
                    errors.append(f"{exc.code().name}: {exc.details()}")
                    if (
                        exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                        and "UNIQUE" in (exc.details() or "").upper()
                    ):
                        return "duplicate"
                    return "failed"  # before the commit: never committed (rolled back or left to recovery)
                try:
                    await stub.CommitTransaction(
                        query_pb2.CommitTransactionRequest(db_id=db_id, transaction_id=txid),
                        metadata=md,
                        timeout=20,
                    )
                except grpc.aio.AioRpcError as exc:
                    errors.append(f"commit {exc.code().name}: {exc.details()}")
                    return "aborted" if exc.code() == grpc.StatusCode.ABORTED else "unknown"
                return "committed"

            async def client() -> None:
                while True:
                    try:
                        item = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    for _ in range(TRIES):
                        outcome = await transfer(*item)
                        if outcome == "committed":
                            committed.append(item[0])
                            break
                        if outcome == "duplicate":  # an earlier try, whose outcome was unknown, committed
                            break
                        # retrying is safe: the ledger id makes a second application fail
                        await until(serving, "the controller to serve")
                        await asyncio.sleep(0.05 * rng.random())  # jitter between retries, not a wait
                    async with progressed:
                        finished[0] += 1
                        progressed.notify_all()

            async def chaos() -> None:
                for threshold, victim in zip(kill_after, victims, strict=True):
                    async with progressed:
                        await progressed.wait_for(lambda t=threshold: finished[0] >= t)
                    procs.kill(victim)
                    procs.start(victim)
                    timeline.append(
                        f"{asyncio.get_running_loop().time() - t0:.1f}s kill {victim} at {finished[0]}"
                    )

            await asyncio.wait_for(asyncio.gather(chaos(), *(client() for _ in range(CLIENTS))), 240)

            timeline.append(f"{asyncio.get_running_loop().time() - t0:.1f}s run done")
            # -- the checks, once every in-doubt transaction is resolved
            await until(serving, "the controller to serve again")

            async def settled() -> bool:
                return unresolved(store) == 0

            await until(settled, "the decision log to have nothing unresolved")

            async def read(sql: str) -> list[list[int]]:
                response = await stub.ExecuteQuery(
                    query_pb2.ExecuteQueryRequest(db_id=db_id, query=sql), metadata=bearer(token), timeout=10
                )
                return [[int(v.number_value) for v in row.values] for row in response.data]

            balances = dict(await until(lambda: read("SELECT id, balance FROM acct ORDER BY id"), "balances"))
            ledger = await read("SELECT id, src, dst, amount FROM ledger ORDER BY id")
            assert sum(balances.values()) == OPENING * 2 * ACCOUNTS_PER_SHARD
            expected = dict.fromkeys(shard0 + shard1, OPENING)
            for _, src, dst, amount in ledger:
                expected[src] -= amount
                expected[dst] += amount
            assert balances == expected  # no transfer half-applied
            seen = {row[0] for row in ledger}
            assert set(committed) <= seen  # every acknowledged commit is there
            assert len(procs.kills) == KILLS
            assert committed, f"no transfer committed at all: {errors}"
            print(
                f"{backend}: {len(committed)} acknowledged, {len(ledger)} applied, of {ATTEMPTS} attempts; "
                f"kills: {procs.kills}; {timeline}; "
                f"{asyncio.get_running_loop().time() - t0:.1f}s settled; {len(errors)} failed tries"
            )
    finally:
        procs.stop_all()
