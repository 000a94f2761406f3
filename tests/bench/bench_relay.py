#!/usr/bin/env python3
"""Commands relayed between controllers over Redis (controller/nodes/relay.py): what the
relay adds to a command's round trip.

    .venv/bin/python tests/bench/bench_relay.py [--commands 2000] [--rounds 3] [--concurrency 32]

Two controllers' stream registries ("A" and "B") in this process, each with its relay on
the Redis at ``--redis`` (default the test one, 127.0.0.1:6379/15), B finding the node's
holder in a real store as production does (a fresh SQLite file; ``--store-url`` for
another); one node whose stream A holds, answered at once by a node loop reading A's
outbound queue (no network between controller and node: what is measured is the
controller side). Each round sends
``--commands`` commands to the node, one at a time, from A (local: the stream is here)
and from B (relayed through A), alternating which goes first; then the same number
with ``--concurrency`` in flight, for throughput. Both controllers share one event loop
and one core here; on separate machines each side's work runs in parallel.

Loopback only; not a test (pytest does not collect it).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

from automator67.v1 import node_pb2

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from controller.nodes.relay import CommandRelay
from controller.nodes.repository import NodeRepository
from controller.nodes.sessions import NodeSession, StreamRegistry
from controller.store import Store, UserRepository
from controller.store.migrate import upgrade
from tests.bench.stats import describe


async def _node(session: NodeSession) -> None:
    while (message := await session.outbound.get()) is not None:
        session.resolve(node_pb2.CommandResult(command_id=message.command.command_id, ok=True))


def _command() -> node_pb2.NodeCommand:
    return node_pb2.NodeCommand(stop_replica=node_pb2.StopReplica(deployment_id="d1", replica_index=0))


async def _sequential(streams: StreamRegistry, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        await streams.send_command("n1", _command(), 10)
        times.append((time.perf_counter() - started) * 1000)
    return times


async def _concurrent(streams: StreamRegistry, count: int, concurrency: int) -> float:
    """Commands per second with ``concurrency`` in flight."""
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await streams.send_command("n1", _command(), 30)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - started)


async def main(args: argparse.Namespace) -> None:
    prefix = f"a67bench:{uuid.uuid4().hex}:"
    url = args.store_url or f"sqlite:///{tempfile.mkdtemp(prefix='a67-bench-relay-')}/store.db"
    await asyncio.to_thread(upgrade, url)
    store = await Store.open(url)
    nodes = NodeRepository(store)
    user = await UserRepository(store).create(f"bench-{uuid.uuid4().hex[:8]}@example.com", "hash")
    await nodes.create(
        user_id=user.id, provider="bench", endpoint="http://n1", region="eu", capabilities={}, node_id="n1"
    )
    await nodes.record_stream_holders("A", ["n1"])
    holder_of = nodes.stream_holder

    a, b = StreamRegistry(), StreamRegistry()
    relays = []
    for name, streams in (("A", a), ("B", b)):
        relay = CommandRelay(args.redis, name, streams.send_local, holder_of, key_prefix=prefix)
        await relay.listening()
        streams.relay = relay
        relays.append(relay)
    session = a.open("n1", "u1")
    node = asyncio.create_task(_node(session))
    try:
        await _sequential(a, 200)  # warm-up, both paths
        await _sequential(b, 200)
        local: list[float] = []
        relayed: list[float] = []
        for round_ in range(args.rounds):
            order = [("local", a, local), ("relayed", b, relayed)]
            if round_ % 2:
                order.reverse()
            for _, streams, into in order:
                into.extend(await _sequential(streams, args.commands))
        print(f"one at a time, {args.rounds} rounds of {args.commands}, alternating:")
        print(f"  local (A, holds the stream)   {describe(local)}")
        print(f"  relayed (B, through A)        {describe(relayed)}")
        for round_ in range(args.rounds):
            order = [("local", a), ("relayed", b)]
            if round_ % 2:
                order.reverse()
            for name, streams in order:
                rate = await _concurrent(streams, args.commands, args.concurrency)
                print(f"  {args.concurrency} in flight, {name:8s} round {round_ + 1}: {rate:,.0f} commands/s")
    finally:
        session.close("bench over")
        await node
        for relay in relays:
            await relay.close()
        await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--store-url", default="", help="SQLAlchemy URL (default: a fresh SQLite file)")
    asyncio.run(main(parser.parse_args()))
