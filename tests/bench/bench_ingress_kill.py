"""Kill -9 of a node under load, through the ingress: failed requests and time to converge.

    .venv/bin/python tests/bench/bench_ingress_kill.py [--rounds 5] [--interval 1.0]

Each round: a real controller (heartbeats every ``--interval`` s, the spec's default
failure window), 3 real agents, a deployment of 3 replicas, a real ingress Envoy, and 4
client threads sending GETs back to back through the ingress (path route). One agent is
killed with SIGKILL; measured: the GETs that failed, the time from the kill to its
endpoint leaving Envoy's configuration (``config_dump``), and the time to a replacement
replica routed again. The anchor (not runnable here): Kubernetes removes a dead node's
endpoints only once the node is NotReady, ~40-50 s with default settings
(node-monitor-grace-period 40 s), and requests to it fail meanwhile unless retried.
SIGKILL closes the agent's TCP connections, so the controller sees the stream end at
once; a node that vanishes silently (a partition) is removed after the heartbeat failure
window instead (``tests/bench/bench_detection.py`` measures that).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import grpc

from tests.bench.stats import percentile, tail
from tests.integration.ingress_support import running_ingress
from tests.integration.test_deployments_real import Client, _until, processes
from tests.integration.test_ingress_real import _deploy, _Loop, _ports
from tests.integration.test_node_api import _user
from tests.support import controller_settings, running_controller


async def one_round(root: Path, interval: float) -> tuple[int, int, float, float]:
    """(requests ok, failed, seconds to leave Envoy, seconds to a replacement routed)."""
    settings = controller_settings(root / "controller", heartbeat_interval_seconds=interval)
    with processes(root) as procs:
        async with (
            running_controller(settings) as controller,
            grpc.aio.insecure_channel(controller.address) as channel,
        ):
            assert controller.ingress is not None
            client = Client(channel, await _user(channel))
            enrollment = await client.enrollment(uses=3)
            agents = {
                region: procs.agent(controller.address, enrollment, region, ports)
                for region, ports in zip(["eu", "us", "ap"], _ports(3), strict=True)
            }
            nodes = {n.id: n.region for n in await client.wait_ready(3)}
            async with running_ingress(controller.ingress.address, root) as ingress:
                deployment_id = await _deploy(client, "steady", 3)
                d = await client.get(deployment_id)
                everything = {a.endpoint.removeprefix("http://") for a in d.node_assignments}
                await _until(
                    lambda: asyncio.to_thread(lambda: set(ingress.endpoints(deployment_id)) == everything),
                    "every replica in Envoy",
                )
                victim = next(a for a in d.node_assignments if a.replica_index == 0)
                dead = victim.endpoint.removeprefix("http://")
                with _Loop(ingress, f"/apps/{deployment_id}/", "") as loop:
                    await _until(lambda: asyncio.to_thread(lambda: loop.ok >= 200), "200 requests")
                    agents[nodes[victim.node_id]].send_signal(signal.SIGKILL)
                    killed = time.monotonic()
                    await _until(
                        lambda: asyncio.to_thread(lambda: dead not in ingress.endpoints(deployment_id)),
                        "the dead endpoint to leave Envoy",
                        within=60,
                    )
                    left = time.monotonic() - killed
                    await _until(
                        lambda: asyncio.to_thread(lambda: len(ingress.endpoints(deployment_id)) == 3),
                        "a replacement routed",
                        within=90,
                    )
                    replaced = time.monotonic() - killed
                return loop.ok, len(loop.failures), left, replaced


async def run(rounds: int, interval: float) -> None:
    oks, fails, lefts, replaced = [], [], [], []
    for i in range(rounds):
        with tempfile.TemporaryDirectory(prefix="a67-kill-") as tmp:
            ok, failed, left, again = await one_round(Path(tmp), interval)
        oks.append(ok)
        fails.append(failed)
        lefts.append(left)
        replaced.append(again)
        print(f"round {i + 1}: {ok} ok, {failed} failed; endpoint left Envoy after {left:.2f} s; "
              f"replacement routed after {again:.2f} s", flush=True)  # fmt: skip
    name, worst = tail(lefts)
    name2, worst2 = tail(replaced)
    print(f"\nrequests: {sum(oks)} ok, {sum(fails)} failed over {rounds} kills")
    print(f"endpoint removed: p50 {percentile(lefts, 50):.2f} s, {name} {worst:.2f} s "
          f"(Kubernetes anchor: ~40-50 s)")  # fmt: skip
    print(f"replacement routed: p50 {percentile(replaced, 50):.2f} s, {name2} {worst2:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--interval", type=float, default=1.0, help="heartbeat interval, seconds")
    args = parser.parse_args()
    asyncio.run(run(args.rounds, args.interval))


if __name__ == "__main__":
    main()
