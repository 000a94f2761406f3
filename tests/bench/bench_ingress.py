"""Ingress benchmark: the cost of the Envoy hop, and how fast xDS pushes reach Envoy.

    .venv/bin/python tests/bench/bench_ingress.py [--requests 5000] [--changes 100]

1. **Hop.** One replica stand-in (a minimal asyncio HTTP/1.1 server answering ``ok``
   with keep-alive, in its own process so it does not share the client's GIL) and one
   real ingress Envoy (2 worker threads) whose routes come from the real xDS server.
   The same keep-alive client sends ``--requests`` sequential GETs straight to the replica
   and through the ingress (host route): p50/p99 per request, requests/s, and the
   difference (the hop's added latency). Then 4 client threads for throughput.
2. **Push latency.** The real ``IngressService`` (fleet and users stubbed: one node, always
   routable) in front of Envoy: ``--changes`` times, a deployment's only replica is
   replaced by one on another port — ``deployment_changed`` as the deployments service
   calls it when a replica becomes healthy — and a client polls through Envoy until the
   new replica answers. The time from the call to the first answer from the new replica:
   p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import multiprocessing
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.stats import percentile, tail

HOST = "web.ada-12345678.apps.localhost"


def _serve(port_queue: Any, count: int) -> None:
    """Replica stand-ins: ``count`` asyncio HTTP servers answering their index."""

    async def main() -> None:
        async def handle(index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            body = str(index).encode()
            response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    if not head:
                        return
                    writer.write(response)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            finally:
                writer.close()

        ports = []
        for index in range(count):
            server = await asyncio.start_server(lambda r, w, i=index: handle(i, r, w), "127.0.0.1", 0)
            ports.append(server.sockets[0].getsockname()[1])
        port_queue.put(ports)
        await asyncio.Event().wait()

    asyncio.run(main())


def _timed_gets(port: int, host: str, n: int) -> tuple[list[float], float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    headers = {"Host": host} if host else {}
    samples = []
    start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        connection.request("GET", "/", headers=headers)
        response = connection.getresponse()
        response.read()
        samples.append((time.perf_counter() - t0) * 1000)
        assert response.status == 200, response.status
    elapsed = time.perf_counter() - start
    connection.close()
    return samples, elapsed


def _parallel_rps(port: int, host: str, n: int, threads: int = 4) -> float:
    start = time.perf_counter()
    workers = [threading.Thread(target=_timed_gets, args=(port, host, n // threads)) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return (n // threads * threads) / (time.perf_counter() - start)


def _line(name: str, samples: list[float], elapsed: float) -> str:
    label, value = tail(samples)
    return f"{name:<18} p50 {percentile(samples, 50):.3f} ms  {label} {value:.3f} ms  {len(samples) / elapsed:,.0f} req/s"


async def run(requests: int, changes: int) -> None:
    from controller.ingress.service import IngressService
    from controller.ingress.snapshot import IngressOptions
    from controller.nodes.sessions import StreamRegistry
    from tests.integration.ingress_support import running_ingress

    queue: Any = multiprocessing.Queue()
    backend = multiprocessing.Process(target=_serve, args=(queue, 2), daemon=True)
    backend.start()
    ports = queue.get(timeout=10)

    fleet = SimpleNamespace(live={}, streams=StreamRegistry(), state_of=lambda node_id: None)

    class Users:
        async def get(self, user_id: str) -> Any:
            return SimpleNamespace(email="ada@example.com")

    service = IngressService(
        fleet=fleet,  # type: ignore[arg-type]
        users=Users(),  # type: ignore[arg-type]
        listen_address="127.0.0.1:0",
        options=IngressOptions(),
    )
    await service.start()
    service._handles["u"] = "ada-12345678"

    def row(port: int) -> Any:
        return SimpleNamespace(
            name="web",
            user_id="u",
            status="running",
            node_assignments=[
                {
                    "replica_index": 0,
                    "node_id": "n",
                    "status": "running",
                    "endpoint": f"http://127.0.0.1:{port}",
                }
            ],
        )

    service.deployment_changed("d1", row(ports[0]))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            async with running_ingress(service.address, Path(tmp)) as ingress:
                # 1. the hop
                def bench_hop() -> None:
                    _timed_gets(ports[0], "", 500)  # warm-up
                    _timed_gets(ingress.port, HOST, 500)
                    direct, direct_s = _timed_gets(ports[0], "", requests)
                    via, via_s = _timed_gets(ingress.port, HOST, requests)
                    print(f"## hop ({requests} sequential keep-alive GETs each)")
                    print(_line("direct to replica", direct, direct_s))
                    print(_line("through ingress", via, via_s))
                    print(
                        f"added by the hop   p50 {percentile(via, 50) - percentile(direct, 50):+.3f} ms  "
                        f"p99 {percentile(via, 99) - percentile(direct, 99):+.3f} ms  "
                        f"throughput ratio {(requests / via_s) / (requests / direct_s):.2f}"
                    )
                    d4 = _parallel_rps(ports[0], "", requests)
                    v4 = _parallel_rps(ingress.port, HOST, requests)
                    print(
                        f"4 client threads   direct {d4:,.0f} req/s, ingress {v4:,.0f} req/s, ratio {v4 / d4:.2f}"
                    )

                await asyncio.to_thread(bench_hop)

                # 2. push latency
                latencies: list[float] = []
                current = 0
                for _ in range(changes):
                    current = 1 - current
                    want = str(current).encode()
                    t0 = time.perf_counter()
                    service.deployment_changed("d1", row(ports[current]))

                    def poll(want: bytes = want, t0: float = t0) -> float:
                        connection = http.client.HTTPConnection("127.0.0.1", ingress.port, timeout=5)
                        try:
                            while True:
                                connection.request("GET", "/", headers={"Host": HOST})
                                response = connection.getresponse()
                                if response.read() == want:
                                    return (time.perf_counter() - t0) * 1000
                        finally:
                            connection.close()

                    latencies.append(await asyncio.to_thread(poll))
                label, value = tail(latencies)
                print(f"## push latency (replica healthy -> Envoy routes to it), {changes} changes")
                print(
                    f"p50 {percentile(latencies, 50):.1f} ms  {label} {value:.1f} ms  "
                    f"max {max(latencies):.1f} ms  (xDS versions published: {service.xds.version})"
                )
    finally:
        await service.stop()
        backend.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--changes", type=int, default=100)
    args = parser.parse_args()
    asyncio.run(run(args.requests, args.changes))


if __name__ == "__main__":
    main()
