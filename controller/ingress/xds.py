"""Envoy's aggregated discovery service (ADS, state of the world) over gRPC.

:class:`XdsServer` holds the current resources (set with :meth:`XdsServer.publish`)
and serves every connected Envoy over one ``StreamAggregatedResources`` stream each.
Per stream and per resource type it remembers what it sent (nonce, version, a digest
of the content) and what Envoy said about it:

* a request whose ``response_nonce`` is not the latest one sent for its type is stale
  and ignored (the protocol's rule);
* an **ACK** (the latest nonce, no ``error_detail``) records the accepted version and
  takes the (possibly changed) resource names Envoy subscribes to;
* a **NACK** (the latest nonce with ``error_detail``) is logged once with Envoy's
  message and recorded in :attr:`ClientInfo.nacks`; the rejected content is **not**
  sent again — the stream waits for new content, so a bad resource cannot turn into a
  push loop;
* after a change, each type whose content (as this stream subscribes to it) differs
  from what the stream last got is pushed, clusters before endpoints and listeners
  before routes.

Versions are one counter for the whole server, bumped by every publish that changes
something: ``version_info`` is the counter at the publish that produced the content.
The listener is per Envoy: an ingress names its own listen address in its node
metadata (``listen_address``, see ``gateway/ingress.yaml.tmpl``), so several ingresses on
one machine share everything but their port.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2, struct_pb2

from controller.config import split_host_port
from controller.ingress.envoy_types import ads_pb2_grpc, discovery_pb2
from controller.ingress.snapshot import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    LISTENER_NAME,
    ROUTE,
    TYPE_ORDER,
    Encoded,
    IngressOptions,
    Snapshot,
    content_digest,
    encode,
    listener,
)

log = logging.getLogger("a67.ingress.xds")

WILDCARD_TYPES = frozenset({LISTENER, CLUSTER})
"""Types Envoy asks for as a whole (no names): every resource is sent."""
SHARED_TYPES = (CLUSTER, ENDPOINT, ROUTE)
MAX_NACKS_KEPT = 20


@dataclass(frozen=True, slots=True)
class Nack:
    type_url: str
    version: str
    message: str
    at: float


@dataclass
class ClientInfo:
    """One connected Envoy, as operators and tests see it."""

    stream_id: int
    node_id: str
    cluster: str
    listen_address: str
    connected_at: float
    acked: dict[str, str] = field(default_factory=dict)
    """The version Envoy accepted last, per type URL."""
    sent: dict[str, str] = field(default_factory=dict)
    """The version sent last, per type URL."""
    nacks: list[Nack] = field(default_factory=list)


@dataclass
class _TypeState:
    names: frozenset[str] | None = None
    """What Envoy subscribes to (empty = everything); None until it asks."""
    nonce: str = ""
    digest: str = ""
    """Digest of the content sent last."""
    rejected: str = ""
    """Digest of content Envoy NACKed: not sent again."""


def _metadata_string(metadata: struct_pb2.Struct, key: str) -> str:
    value = metadata.fields.get(key)
    return value.string_value if value is not None else ""


class XdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """The ADS servicer and its snapshot cache."""

    def __init__(self, options: IngressOptions, clock: Callable[[], float] = time.monotonic) -> None:
        self._options = options
        self._clock = clock
        self._snapshot = Snapshot({})
        self._version = 0
        self._type_versions: dict[str, int] = {}
        self._type_digests: dict[str, str] = {}
        self._wakers: dict[int, asyncio.Event] = {}
        self._ids = itertools.count(1)
        self._nonces = itertools.count(1)
        self.clients: dict[int, ClientInfo] = {}
        self.responses_sent = 0
        """DiscoveryResponses sent over all streams (a NACK must not make this grow)."""
        self.published_at: dict[int, float] = {}
        """When each version was published (for push-latency measurements)."""

    # -- the snapshot ----------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    def publish(self, snapshot: Snapshot) -> bool:
        """Make ``snapshot`` current; streams whose content changes are pushed. False if nothing changed."""
        digests = {t: snapshot.digest(t) for t in SHARED_TYPES}
        changed = [t for t in SHARED_TYPES if digests[t] != self._type_digests.get(t)]
        if not changed:
            return False
        self._version += 1
        for t in changed:
            self._type_versions[t] = self._version
            self._type_digests[t] = digests[t]
        self._snapshot = snapshot
        self.published_at[self._version] = self._clock()
        while len(self.published_at) > 1000:
            del self.published_at[next(iter(self.published_at))]
        for event in self._wakers.values():
            event.set()
        return True

    def _resources(
        self, type_url: str, names: frozenset[str], own_listener: Encoded | None
    ) -> tuple[Mapping[str, Encoded], str]:
        """What a stream subscribing to ``names`` gets of ``type_url``, and its digest."""
        if type_url == LISTENER:
            mine = {LISTENER_NAME: own_listener} if own_listener is not None else {}
            return mine, content_digest(mine.values())
        everything = self._snapshot.encoded(type_url)
        if type_url in WILDCARD_TYPES or not names:
            return everything, self._snapshot.digest(type_url)
        chosen = {n: everything[n] for n in sorted(names) if n in everything}
        if len(chosen) == len(everything):  # every resource, in name order: the type's digest
            return chosen, self._snapshot.digest(type_url)
        return chosen, content_digest(chosen.values())

    # -- the stream ------------------------------------------------------------------------------

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context: Any
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        stream_id = next(self._ids)
        wake = asyncio.Event()
        self._wakers[stream_id] = wake
        inbox: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    inbox.put_nowait(request)
            finally:
                inbox.put_nowait(None)

        reader = asyncio.create_task(read())
        states: dict[str, _TypeState] = {}
        info: ClientInfo | None = None
        own_listener: Encoded | None = None
        try:
            while True:
                batch: list[discovery_pb2.DiscoveryRequest | None] = []
                if inbox.empty() and not wake.is_set():
                    getter = asyncio.ensure_future(inbox.get())
                    waiter = asyncio.ensure_future(wake.wait())
                    try:
                        await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waiter.cancel()
                        if not getter.done():
                            getter.cancel()
                    if getter.done() and not getter.cancelled():
                        batch.append(getter.result())
                wake.clear()
                while not inbox.empty():
                    batch.append(inbox.get_nowait())
                for request in batch:
                    if request is None:
                        return
                    if info is None:
                        info, own_listener = self._hello(stream_id, request)
                    self._on_request(info, states, request)
                for type_url in TYPE_ORDER:
                    state = states.get(type_url)
                    if state is None or state.names is None or info is None:
                        continue
                    response = self._maybe_response(info, type_url, state, own_listener)
                    if response is not None:
                        yield response
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self._wakers.pop(stream_id, None)
            gone = self.clients.pop(stream_id, None)
            if gone is not None:
                log.info("ingress %s (%s) disconnected", gone.node_id, gone.listen_address)

    def _hello(
        self, stream_id: int, request: discovery_pb2.DiscoveryRequest
    ) -> tuple[ClientInfo, Encoded | None]:
        node = request.node
        address = _metadata_string(node.metadata, "listen_address")
        own: Encoded | None = None
        try:
            host, port = split_host_port(address)
            own = encode(LISTENER_NAME, listener(LISTENER_NAME, host, port, self._options))
        except ValueError:
            log.error(
                "ingress %s connected without a valid listen_address in its node metadata (%r): "
                "it gets clusters and routes but no listener",
                node.id or "?",
                address,
            )
        info = ClientInfo(
            stream_id=stream_id,
            node_id=node.id,
            cluster=node.cluster,
            listen_address=address,
            connected_at=self._clock(),
        )
        self.clients[stream_id] = info
        log.info("ingress %s connected (listener %s)", node.id or "?", address or "none")
        return info, own

    def _on_request(
        self, info: ClientInfo, states: dict[str, _TypeState], request: discovery_pb2.DiscoveryRequest
    ) -> None:
        type_url = request.type_url
        if type_url not in TYPE_ORDER:
            log.debug("ingress %s asked for unsupported type %s", info.node_id, type_url)
            return
        state = states.setdefault(type_url, _TypeState())
        if request.response_nonce and request.response_nonce != state.nonce:
            return  # stale: answers a response that has been superseded
        if request.response_nonce and request.HasField("error_detail"):
            state.rejected = state.digest
            nack = Nack(type_url, info.sent.get(type_url, ""), request.error_detail.message, self._clock())
            info.nacks = [*info.nacks[-(MAX_NACKS_KEPT - 1) :], nack]
            log.warning(
                "ingress %s rejected %s version %s: %s (kept until the content changes)",
                info.node_id,
                type_url.rsplit(".", 1)[-1],
                nack.version,
                nack.message,
            )
            return
        if request.response_nonce:
            info.acked[type_url] = request.version_info
        state.names = frozenset(request.resource_names) - {"*"}

    def _maybe_response(
        self, info: ClientInfo, type_url: str, state: _TypeState, own_listener: Encoded | None
    ) -> discovery_pb2.DiscoveryResponse | None:
        resources, digest = self._resources(type_url, state.names or frozenset(), own_listener)
        if digest == state.digest or digest == state.rejected:
            return None
        state.digest = digest
        state.nonce = str(next(self._nonces))
        version = str(self._type_versions.get(type_url, self._version) if type_url != LISTENER else 1)
        info.sent[type_url] = version
        self.responses_sent += 1
        # the kept bytes, as ``Any.Pack`` would serialize the message (every type here is
        # ``type.googleapis.com/<full name>``)
        packed = [any_pb2.Any(type_url=type_url, value=r.data) for r in resources.values()]
        return discovery_pb2.DiscoveryResponse(
            version_info=version, resources=packed, type_url=type_url, nonce=state.nonce
        )


def add_to_server(server: grpc.aio.Server, xds: XdsServer) -> None:
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(xds, server)
