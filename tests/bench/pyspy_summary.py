#!/usr/bin/env python3
"""Summarise a py-spy raw (collapsed) profile: where the samples went, by bucket and by function.

    .venv/bin/py-spy record -p <controller pid> -d 20 -r 200 --native -f raw -o prof.txt
    .venv/bin/python tests/bench/pyspy_summary.py prof.txt [--top 25]

Buckets are the first rule (in order) whose pattern appears in a sample's stack; a
sample is counted once, so the buckets add up to 100 % of the busy samples (py-spy
records no idle samples unless ``--idle``). The function table is inclusive: each
function counts every sample with it anywhere on the stack. Not a test.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

# (bucket, patterns): the first bucket one of whose patterns is in the stack wins.
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    (
        "waiting (epoll, locks, queues: no CPU)",
        (
            "epoll_wait",
            "_queue_SimpleQueue_get",
            "pthread_cond",
            "PyThread_acquire_lock",
            "take_gil",
            "sem_wait",
        ),
    ),
    ("access log line", ("_log_call", "logging/__init__.py")),
    ("token signature + claims", ("verify_access", "_verify (controller/auth/tokens.py")),
    ("session state (cache/store)", ("AuthService.authenticate", "is_family_revoked", "SessionCache")),
    ("user record read (store)", ("GetCurrentUser", "UserRepository", "current_user")),
    ("store worker thread (sqlalchemy/sqlite)", ("sqlalchemy", "sqlite3", "aiosqlite")),
    ("node heartbeat handler (Python)", ("NodeServicer._read", "Fleet.heartbeat", "node_servicer.py")),
    ("interceptor (Python)", ("controller/api/interceptors.py",)),
    ("health servicer (Python)", ("grpc_health",)),
    ("asyncio event loop (Python)", ("asyncio/",)),
    ("grpc C core / cygrpc (no Python frame)", ("cygrpc", "libgrpc", "grpc/_cython")),
]
_FRAME = re.compile(r"^(?P<name>.*?) \((?P<where>[^()]*)\)$")


def parse(path: str) -> list[tuple[list[str], int]]:
    stacks: list[tuple[list[str], int]] = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            stacks.append((stack.split(";"), int(count)))
    return stacks


def label(frame: str) -> str:
    """``function (file)`` without the line number; native addresses by their library."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    name, where = match["name"], match["where"]
    if name.startswith("0x"):
        return f"<native> ({where})"
    return f"{name} ({where.rsplit(':', 1)[0]})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--grep", help="only samples whose stack contains this text")
    args = parser.parse_args()
    stacks = parse(args.profile)
    if args.grep:
        stacks = [(s, n) for s, n in stacks if any(args.grep in f for f in s)]
    total = sum(n for _, n in stacks)
    if not total:
        print("no samples")
        return 1
    buckets: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    for stack, count in stacks:
        joined = ";".join(stack)
        leaf = ";".join(stack[-4:])
        for bucket, patterns in BUCKETS:
            where = leaf if bucket.startswith("waiting") else joined
            if any(p in where for p in patterns):
                buckets[bucket] += count
                break
        else:
            buckets["other"] += count
        for name in {label(f) for f in stack}:
            functions[name] += count
    waiting = sum(c for b, c in buckets.items() if b.startswith("waiting"))
    busy = total - waiting
    print(f"{total} samples, {busy} busy\n\n| bucket | share of busy samples |\n|---|---:|")
    for bucket, count in buckets.most_common():
        if not bucket.startswith("waiting"):
            print(f"| {bucket} | {count / busy:.1%} |")
    print("\n| function (inclusive) | share |\n|---|---:|")
    for name, count in functions.most_common(args.top):
        print(f"| {name} | {count / total:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
