#!/usr/bin/env python3
"""Provider-token refresh spread: 1,000 tokens expiring in the same minute.

    .venv/bin/python tests/bench/bench_refresh_spread.py [--tokens 1000] [--lifetime 3600]

Seeds ``--tokens`` node tokens into a fresh SQLite store, all obtained within one minute
(so they expire within the same minute), then runs the controller's refresher
(:class:`controller.credentials.refresher.Refresher`: real store, real vault, real
Authlib adapter) against the test OAuth 2.0 server process
(``tests/credentials/oauth_server.py``) until every token is refreshed. The refresher's
clock is virtual (it jumps when the refresher sleeps), so hours of schedule run in
seconds; each refresh is a real HTTP call and real store transactions.

Configurations: the defaults (75 % of the lifetime, ±10 % jitter, at most 20 starts/s),
and without jitter (the rate limit alone), and neither (the herd). Reports the spread of
the refresh start times, the peak starts in any one second and in any ten seconds, and
the wall time.

Loopback only; not a test (pytest does not collect it).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from controller.credentials.providers import load_adapters
from controller.credentials.refresher import Refresher
from controller.credentials.states import (
    OAUTH_TOKEN_PURPOSE,
    REFRESH_TOKEN_PURPOSE,
    CredentialStates,
    initial_state,
)
from controller.store.db import Store
from controller.store.migrate import upgrade
from controller.store.models import Node, User, new_id
from controller.vault import Keyring, Vault
from tests.credentials.support import FakeClock, OAuthServer

T0 = 1_900_000_000.0


async def run(tokens: int, lifetime: float, jitter: float, rate: float, label: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        oauth = OAuthServer(Path(tmp) / "oauth.json")
        oauth.start()
        url = f"sqlite:///{tmp}/store.db"
        upgrade(url)
        store = await Store.open(url)
        vault = Vault(Keyring.generate())
        clock = FakeClock(T0)
        refresher = Refresher(
            states=CredentialStates(store),
            vault=vault,
            adapters=load_adapters(oauth.provider_config()),
            jitter=jitter,
            rate_per_second=rate,
            concurrency=8,
            clock=clock,
            sleep=clock.sleep,
            rng=random.Random(1),
        )
        started: list[float] = []
        refresher.observer = lambda _node, now: started.append(now)
        names = [f"rt-{i}" for i in range(tokens)]
        await oauth.seed(*names)
        rng = random.Random(2)
        user_id = new_id()
        async with store.session() as session:
            session.add(User(id=user_id, email="bench@example.com", password_hash="x"))
            await session.flush()
            for name in names:
                node_id = new_id()
                obtained = T0 + rng.uniform(0, 60)
                expires = obtained + lifetime
                session.add(
                    Node(
                        id=node_id,
                        user_id=user_id,
                        provider="render",
                        endpoint="https://n.example",
                        capabilities={},
                        credentials={
                            "oauth_token": vault.encrypt_str(
                                "at", owner=node_id, purpose=OAUTH_TOKEN_PURPOSE
                            ),
                            "refresh_token": vault.encrypt_str(
                                name, owner=node_id, purpose=REFRESH_TOKEN_PURPOSE
                            ),
                            "oauth_provider": "render",
                            "oauth_expires_at": datetime.fromtimestamp(expires, UTC).isoformat(),
                        },
                    )
                )
                await session.flush()
                session.add(
                    initial_state(
                        node_id,
                        user_id,
                        "render",
                        now=obtained,
                        expires_at=expires,
                        refresh_at=refresher.schedule(obtained, expires, "render", True),
                    )
                )
        wall = time.perf_counter()
        refresher.start()
        for _ in range(100_000):
            if len(started) >= tokens and (await oauth.stats())["grants"] >= tokens:
                break
            await asyncio.sleep(0.05)
        wall = time.perf_counter() - wall
        await refresher.stop()
        await store.close()
        oauth.stop()
    first, last = min(started), max(started)
    per_second = Counter(int(t) for t in started)
    per_ten = Counter(int(t // 10) for t in started)
    expiry_first = T0 + lifetime
    print(
        f"{label:<34} spread {last - first:7.1f} s  peak {max(per_second.values()):3d}/s  "
        f"peak {max(per_ten.values()):4d}/10 s  first at {100 * (first - T0) / lifetime:5.1f} % "
        f"last at {100 * (last - T0) / lifetime:5.1f} % of the lifetime  "
        f"(last {expiry_first - last:7.1f} s before the first expiry)  wall {wall:5.1f} s"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--lifetime", type=float, default=3600.0)
    args = parser.parse_args()
    print(f"{args.tokens} tokens obtained within one minute, lifetime {args.lifetime:.0f} s")
    await run(args.tokens, args.lifetime, 0.1, 20.0, "defaults (jitter ±10 %, 20/s)")
    await run(args.tokens, args.lifetime, 0.0, 20.0, "no jitter (rate limit 20/s only)")
    await run(args.tokens, args.lifetime, 0.0, 1e6, "neither (the herd)")


if __name__ == "__main__":
    asyncio.run(main())
