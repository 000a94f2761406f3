#!/usr/bin/env python3
"""Failure detection time: kill -9 a real agent, time until the controller says `failed`.

    .venv/bin/python tests/bench/bench_detection.py --runs 20

Starts a real controller (``python -m controller.cli serve``, SQLite in a temp
dir, ``--heartbeat-interval 1``), registers one user, enrolls one real agent
(``python -m controller.cli agent``) with an enrollment token, then ``--runs``
times:

1. (re)start the agent on the same data dir (it resumes as the same node) and
   wait until ListNodes says READY;
2. wait a random 0-1 s (so the kill falls at a random phase of the heartbeat
   cycle), then SIGKILL the agent and note the kill time;
3. poll ListNodes every 20 ms until the node is FAILED; detection = time FAILED
   was first seen - kill time, and (the issue's measure) time FAILED was first
   seen - the node's last heartbeat, which the controller stores exactly when
   the node changes state (both wall clock on this machine; +0-20 ms polling).

The issue defines detection from the node's *last heartbeat*; the last heartbeat
precedes the kill by 0-1 interval, so this figure *under*-states that time by up
to one interval (and over-states it by up to the 20 ms poll period).  To keep
the comparison honest the report also gives "kill time + 1 interval" as the
worst-case bound on time-since-last-heartbeat.  Goal (issue 3): p99 <= 3.5 s
over 100 runs; the default here is 100, a short run uses --runs 20.

Loopback only. Not a test: pytest does not collect it.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from automator67.v1 import common_pb2, node_pb2, node_pb2_grpc  # noqa: E402

from tests.bench.bench_node_streams import make_user_and_tokens, pct, start_controller  # noqa: E402


def start_agent(address: str, data_dir: Path, token: str | None) -> subprocess.Popen[bytes]:
    args = [
        sys.executable,
        "-m",
        "controller.cli",
        "agent",
        "--data-dir",
        str(data_dir),
        "--region",
        "eu-west",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("A67_")}
    if token is not None:
        args += ["--controller", address]
        env["A67_AGENT_TOKEN"] = token
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--poll", type=float, default=0.02)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="a67-bench-detect-") as tmp:
        (Path(tmp) / "controller").mkdir()
        ctl = start_controller(Path(tmp) / "controller", args.interval)
        agent: subprocess.Popen[bytes] | None = None
        try:
            access, tokens = make_user_and_tokens(ctl.address, 1, max_uses=1)
            md = (("authorization", f"Bearer {access}"),)
            channel = grpc.insecure_channel(ctl.address)
            stub = node_pb2_grpc.NodeServiceStub(channel)

            def node() -> node_pb2.Node | None:
                nodes = stub.ListNodes(node_pb2.ListNodesRequest(), metadata=md, timeout=5).nodes
                return nodes[0] if nodes else None

            def status() -> int | None:
                current = node()
                return current.status if current else None

            def wait(target: int, within: float) -> float:
                deadline = time.monotonic() + within
                while True:
                    if status() == target:
                        return time.monotonic()
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"node not {common_pb2.NodeStatus.Name(target)} in {within} s")
                    time.sleep(args.poll)

            agent_dir = Path(tmp) / "agent"
            token: str | None = tokens[0]
            detections: list[float] = []
            suspects: list[float] = []
            from_heartbeat: list[float] = []
            for run in range(args.runs):
                agent = start_agent(ctl.address, agent_dir, token)
                token = None  # enrolled once; later runs resume
                wait(common_pb2.NODE_STATUS_READY, 60)
                time.sleep(1.0 + random.random() * args.interval)
                agent.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                agent.wait()
                suspect_at = None
                deadline = killed + 30
                while True:
                    current = node()
                    now_status = current.status if current else None
                    now = time.monotonic()
                    if now_status == common_pb2.NODE_STATUS_SUSPECT and suspect_at is None:
                        suspect_at = now
                    if now_status == common_pb2.NODE_STATUS_FAILED and current is not None:
                        # The store holds the exact last heartbeat once the node changes state.
                        last = current.last_heartbeat.ToDatetime(tzinfo=UTC).timestamp()
                        from_heartbeat.append(time.time() - last)
                        break
                    if now > deadline:
                        raise RuntimeError("node not FAILED within 30 s of kill -9")
                    time.sleep(args.poll)
                detections.append(now - killed)
                if suspect_at is not None:
                    suspects.append(suspect_at - killed)
                print(f"run {run + 1:3d}: failed after {now - killed:.3f} s"
                      + (f" (suspect after {suspect_at - killed:.3f} s)" if suspect_at else ""), flush=True)  # fmt: skip
            print()
            print(f"runs={len(detections)} interval={args.interval}s poll={args.poll * 1000:.0f}ms")
            print(f"kill -> failed   p50 {pct(detections, 50):.3f}  p99 {pct(detections, 99):.3f}  "
                  f"max {max(detections):.3f} s")  # fmt: skip
            if suspects:
                print(f"kill -> suspect  p50 {pct(suspects, 50):.3f}  p99 {pct(suspects, 99):.3f}  "
                      f"max {max(suspects):.3f} s")  # fmt: skip
            print(f"last heartbeat -> failed (seen)  p50 {pct(from_heartbeat, 50):.3f}  "
                  f"p99 {pct(from_heartbeat, 99):.3f}  max {max(from_heartbeat):.3f} s")  # fmt: skip
            print(f"bound on last heartbeat -> failed (kill->failed + {args.interval:g} s): "
                  f"p99 <= {pct(detections, 99) + args.interval:.3f} s, max <= {max(detections) + args.interval:.3f} s")  # fmt: skip
            print("goal: p99 <= 3.5 s")
        finally:
            if agent is not None and agent.poll() is None:
                agent.kill()
                agent.wait()
            ctl.stop()


if __name__ == "__main__":
    main()
