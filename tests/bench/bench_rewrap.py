#!/usr/bin/env python3
"""Master-key rotation: rewrap throughput, and the controller's request latency meanwhile.

    .venv/bin/python tests/bench/bench_rewrap.py [--secrets 100000] [--baseline-seconds 5]

Seeds ``--secrets`` vault ciphertexts under master key ``k1`` into a fresh SQLite store
(storage file keys: 100 users, the rest spread over their files), starts a real
controller in this process on that store, and measures two authenticated unary RPCs
from a client thread (its own gRPC channel), one at a time, without pause:

* ``me``     ``AuthService/GetCurrentUser`` (token and session from memory: event-loop latency);
* ``nodes``  ``NodeService/ListNodes`` (a store read).

First for ``--baseline-seconds`` with nothing else running, then while the controller
rewraps every secret after ``a67 vault rotate`` (the keyring file gains ``k2``; the
rewrapper's pass runs as the controller's background task does: 200 rows per
transaction, the event loop yielding between batches, an audit event per secret).
Reports secrets per second, the pass's duration, and latency before and during.

Loopback only; not a test (pytest does not collect it).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from automator67.v1 import auth_pb2, auth_pb2_grpc, node_pb2, node_pb2_grpc
from sqlalchemy import insert

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from controller.store.db import Store
from controller.store.migrate import upgrade
from controller.store.models import StorageFile, User, new_id
from controller.vault import Vault
from controller.vault.keyfile import read_keyring, write_keyring
from controller.vault.keyring import Keyring
from controller.vault.rewrap import count_by_key, totals
from tests.bench.stats import describe
from tests.support import PASSWORD, controller_settings, running_controller

USERS = 100


async def seed(url: str, keyfile: Path, count: int) -> None:
    await asyncio.to_thread(upgrade, url)
    ring = Keyring.generate("k1")
    keyfile.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_keyring(keyfile, ring)
    vault = Vault(ring)
    store = await Store.open(url)
    try:
        users = [new_id() for _ in range(USERS)]
        async with store.session() as session:
            await session.execute(
                insert(User),
                [{"id": u, "email": f"s{i}@example.com", "password_hash": "x"} for i, u in enumerate(users)],
            )
        batch: list[dict[str, object]] = []
        for i in range(count):
            user = users[i % USERS]
            batch.append(
                {
                    "id": new_id(),
                    "user_id": user,
                    "path": f"/bench/{i}",
                    "size": 1,
                    "mime_type": "application/octet-stream",
                    "distribution": [],
                    "chunks": [],
                    "encryption": {
                        "algorithm": "AES-256-GCM",
                        "key_id": f"f{i}",
                        "wrapped_key": vault.encrypt(
                            b"k" * 32, owner=f"user:{user}", purpose=f"storage.file-key:f{i}"
                        ),
                    },
                    "replicas": 1,
                    "replication_status": "ok",
                }
            )
            if len(batch) == 5000:
                async with store.session() as session:
                    await session.execute(insert(StorageFile), batch)
                batch = []
        if batch:
            async with store.session() as session:
                await session.execute(insert(StorageFile), batch)
    finally:
        await store.close()


class Prober:
    """Calls the two RPCs in turn from a thread until stopped; latencies by phase."""

    def __init__(self, address: str, token: str) -> None:
        self.address = address
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.phase = "baseline"
        self.samples: dict[tuple[str, str], list[float]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            auth = auth_pb2_grpc.AuthServiceStub(channel)
            nodes = node_pb2_grpc.NodeServiceStub(channel)
            calls = {
                "me": lambda: auth.GetCurrentUser(
                    auth_pb2.GetCurrentUserRequest(), metadata=self.metadata, timeout=60
                ),
                "nodes": lambda: nodes.ListNodes(
                    node_pb2.ListNodesRequest(), metadata=self.metadata, timeout=60
                ),
            }
            while not self.stop.is_set():
                for name, call in calls.items():
                    phase = self.phase
                    started = time.perf_counter()
                    call()
                    elapsed = (time.perf_counter() - started) * 1000
                    self.samples.setdefault((phase, name), []).append(elapsed)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--secrets", type=int, default=100_000)
    parser.add_argument("--baseline-seconds", type=float, default=5.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="a67-bench-rewrap-") as tmp:
        data = Path(tmp)
        keyfile = data / "keys" / "master.keys"
        url = f"sqlite:///{data / 'controller.db'}"
        started = time.perf_counter()
        await seed(url, keyfile, args.secrets)
        print(f"seeded {args.secrets} secrets under k1 in {time.perf_counter() - started:.1f} s")
        settings = controller_settings(data, vault_keyring_poll_seconds=3600.0, log_level="WARNING")
        async with running_controller(settings) as controller:
            assert controller.rewrapper is not None
            async with grpc.aio.insecure_channel(controller.address) as channel:
                reply = await auth_pb2_grpc.AuthServiceStub(channel).Register(
                    auth_pb2.RegisterRequest(email="bench@example.com", password_hash=PASSWORD)
                )
            # Let the start-up pass (nothing to do: every secret is under the primary) finish.
            while controller.rewrapper.progress.running or controller.rewrapper.progress.passes == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            prober = Prober(controller.address, reply.access_token)
            thread = threading.Thread(target=prober.run, daemon=True)
            thread.start()
            await asyncio.sleep(args.baseline_seconds)

            write_keyring(keyfile, read_keyring(keyfile).rotate())  # a67 vault rotate
            prober.phase = "rewrap"
            assert controller.rewrapper.reload_keyring()
            began = time.perf_counter()
            progress = await controller.rewrapper.run_pass()
            took = time.perf_counter() - began
            prober.phase = "after"
            prober.stop.set()
            await asyncio.to_thread(thread.join)
            counts = totals(await count_by_key(controller.store))
            assert controller.secret_audit is not None
            await controller.secret_audit.flush()

        print(
            f"rewrap: {progress.rewrapped} secrets in {took:.2f} s = {progress.rewrapped / took:,.0f} secrets/s "
            f"(failed {progress.failed}, conflicts {progress.conflicts}); after: {counts}"
        )
        for name in ("me", "nodes"):
            for phase in ("baseline", "rewrap"):
                values = prober.samples.get((phase, name), [])
                if values:
                    print(f"  {name:5s} {phase:8s} {describe(values)}")


if __name__ == "__main__":
    asyncio.run(main())
